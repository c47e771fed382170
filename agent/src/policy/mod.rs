// SPDX-License-Identifier: Apache-2.0
//! NetworkPolicy: the agent's view of Pods, Namespaces and NetworkPolicies
//! ([`model`]), each local endpoint's rules computed from it ([`compile`]),
//! and the maps programmed from those rules ([`engine`]); the watches that
//! feed the view ([`watch`]) and the thread that runs it all ([`run`]).

pub mod compile;
pub mod engine;
pub mod model;
pub mod run;
pub mod watch;
