// SPDX-License-Identifier: Apache-2.0
//! ferrite's one netlink layer, under the CNI plugin, the datapath's tc
//! attach and the agent alike: the socket (extended and capped acks, a
//! receive timeout where wanted, opening inside another network namespace),
//! sequence numbers, requests that wait for their ack, gets, dumps up to
//! NLMSG_DONE, and batches sent in one `sendmsg` whose acks are matched to
//! their requests by sequence number. Errors carry the kernel's extended
//! ack text.
//!
//! Synchronous and small on purpose: the plugin lives for milliseconds and
//! makes a dozen requests, the agent a few per change; neither needs an
//! async runtime. Messages are generic: netlink-packet-route's
//! `RouteNetlinkMessage` for NETLINK_ROUTE, [`RawMessage`] for bodies built
//! by hand (nf_tables, with [`wire::AttrWriter`]).

mod conn;
mod error;
mod raw;
pub mod route;
mod socket;
pub mod wire;

pub use conn::{Batch, Message, Netlink, Request};
pub use error::{NetlinkError, Result};
pub use raw::RawMessage;
pub use socket::{Socket, Transport, NETLINK_NETFILTER, NETLINK_ROUTE};

#[cfg(test)]
mod tests;
