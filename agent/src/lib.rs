// SPDX-License-Identifier: Apache-2.0
//! ferrite's node agent: it writes the CNI configuration from the Node's pod
//! CIDRs, installs the plugin, routes other nodes' pod CIDRs via their
//! InternalIPs, masquerades traffic leaving the cluster, enforces
//! NetworkPolicy, computes the node's Service table, and serves health and
//! metrics. The binary (`main.rs`) wires these together; everything
//! here is usable without an API server, which is how the tests drive it.

pub mod config;
pub mod conflist;
pub mod deltas;
pub mod fastpath;
pub mod files;
pub mod http;
pub mod install;
pub mod masquerade;
pub mod metrics;
pub mod netlink;
pub mod nft;
pub mod node;
pub mod policy;
pub mod routes;
pub mod service;
pub mod sync;
pub mod uninstall;
pub mod watch;
