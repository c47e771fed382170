// SPDX-License-Identifier: Apache-2.0
//! Service load balancing, the agent's half: the view of Services and
//! Endpoints ([`model`]), this node's desired table of frontends and
//! backends computed from it ([`compile`]), the maps programmed from that
//! table through [`engine::ServiceTarget`] ([`engine`]); the watches that
//! feed the view ([`watch`]) and the thread that runs it all ([`run`]).

pub mod compile;
pub mod engine;
#[cfg(test)]
pub(crate) mod fake;
pub mod model;
pub mod run;
pub mod watch;
