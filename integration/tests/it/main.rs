//! ferrite's privileged tests: one binary, a module per area.
//! Each test skips with a reason when not root, and fails instead under CI=true.

mod chaining;
mod cni;
mod crossnode;
mod edges;
mod harness;
mod ipv6;
mod node;
mod policy;
mod reliability;
mod reuse;
mod security;
mod services;
mod traffic;
mod upgrade;
