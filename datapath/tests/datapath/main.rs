//! Datapath tests: one binary, a module per area, a small DSL in `harness`
//! and `packet`. Tests that need root skip with a printed reason, or fail
//! under CI=true.

mod harness;
mod packet;

mod attach;
mod edges;
mod host_sock;
mod load;
mod maps;
mod policy;
mod programs;
mod services;
