// SPDX-License-Identifier: Apache-2.0
//! The agent's privileged tests: the real netlink, nf_tables and datapath
//! code paths, run on threads inside network namespaces the tests make (the
//! machine's own interfaces, routes and tables are never touched). Each test
//! skips with a reason when not root, and fails instead under CI=true.

mod binary;
mod harness;
mod lifecycle;
mod masquerade;
mod routes;
