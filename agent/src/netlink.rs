// SPDX-License-Identifier: Apache-2.0
//! A small synchronous rtnetlink handle for the agent: routes to other
//! nodes, and the node's addresses and links.
//!
//! The agent makes a few requests per node-list change, from its sync
//! thread, so one blocking socket is enough (no async netlink stack).
//! Requests read like iproute2; every failure names its request.

use std::net::IpAddr;
use std::time::Duration;

use ferrite_netlink::route::{family, route_ip, RouteNetlink};
use ferrite_netlink::wire::{NLM_F_CREATE, NLM_F_REPLACE};
use ipnetwork::IpNetwork;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use crate::routes::{PresentRoute, RTPROT_FERRITE_NODES, TABLE_MAIN};

pub use ferrite_netlink::{NetlinkError, Result};

/// How long the sync thread waits for the kernel before giving up on a
/// request.
pub(crate) const RECV_TIMEOUT: Duration = Duration::from_secs(10);

/// An address on one of the node's links.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkAddress {
    pub ifindex: u32,
    pub address: IpAddr,
    pub prefix_len: u8,
}

/// A link: index and name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkName {
    pub index: u32,
    pub name: String,
}

pub struct Netlink {
    nl: RouteNetlink,
}

impl Netlink {
    /// A socket in the calling thread's network namespace.
    pub fn new() -> Result<Self> {
        let nl = ferrite_netlink::route::open()?;
        nl.set_recv_timeout(RECV_TIMEOUT)?;
        Ok(Self { nl })
    }

    /// `ip route show table all` for both families, unicast routes only.
    pub fn routes(&mut self) -> Result<Vec<PresentRoute>> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut msg = RouteMessage::default();
            msg.header.address_family = family;
            for reply in self
                .nl
                .dump("route show", RouteNetlinkMessage::GetRoute(msg))?
            {
                let RouteNetlinkMessage::NewRoute(r) = reply else {
                    continue;
                };
                if r.header.kind != RouteType::Unicast {
                    continue;
                }
                if let Some(route) = present_route(&r) {
                    out.push(route);
                }
            }
        }
        Ok(out)
    }

    /// `ip route replace <dst> via <gw> proto 71`: the kernel picks the
    /// device that reaches the gateway.
    pub fn route_replace(&mut self, dst: IpNetwork, gateway: IpAddr) -> Result<()> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = family(dst.ip());
        msg.header.destination_prefix_length = dst.prefix();
        msg.header.table = TABLE_MAIN as u8;
        msg.header.protocol = RouteProtocol::from(RTPROT_FERRITE_NODES);
        msg.header.scope = RouteScope::Universe;
        msg.header.kind = RouteType::Unicast;
        msg.attributes
            .push(RouteAttribute::Destination(RouteAddress::from(
                dst.network(),
            )));
        msg.attributes
            .push(RouteAttribute::Gateway(RouteAddress::from(gateway)));
        self.nl.request(
            &format!("route replace {dst} via {gateway} proto {RTPROT_FERRITE_NODES}"),
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
    }

    /// `ip route del <dst> [via <gw>] table <t> metric <m> proto <p>`: the
    /// kernel deletes only a route of that protocol. Gone already is fine.
    pub fn route_delete(&mut self, route: &PresentRoute) -> Result<()> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = family(route.destination.ip());
        msg.header.destination_prefix_length = route.destination.prefix();
        msg.header.protocol = RouteProtocol::from(route.protocol);
        msg.header.scope = RouteScope::NoWhere;
        msg.header.kind = RouteType::Unicast;
        if route.table < 256 {
            msg.header.table = route.table as u8;
        } else {
            msg.header.table = 0;
            msg.attributes.push(RouteAttribute::Table(route.table));
        }
        msg.attributes
            .push(RouteAttribute::Destination(RouteAddress::from(
                route.destination.network(),
            )));
        if let Some(gw) = route.gateway {
            msg.attributes
                .push(RouteAttribute::Gateway(RouteAddress::from(gw)));
        }
        if route.priority != 0 {
            msg.attributes
                .push(RouteAttribute::Priority(route.priority));
        }
        let what = format!(
            "route del {} table {} proto {}",
            route.destination, route.table, route.protocol
        );
        match self
            .nl
            .request(&what, RouteNetlinkMessage::DelRoute(msg), 0)
        {
            Err(e) if e.errno() == Some(libc::ESRCH) => Ok(()),
            other => other,
        }
    }

    /// `ip addr show`: every address of every link.
    pub fn addresses(&mut self) -> Result<Vec<LinkAddress>> {
        let replies = self.nl.dump(
            "addr show",
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
        )?;
        let mut out = Vec::new();
        for m in replies {
            let RouteNetlinkMessage::NewAddress(a) = m else {
                continue;
            };
            // IFA_LOCAL is the address itself on point-to-point links;
            // IFA_ADDRESS is everywhere else.
            let local = a.attributes.iter().find_map(|attr| match attr {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let address = local.or_else(|| {
                a.attributes.iter().find_map(|attr| match attr {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            });
            if let Some(address) = address {
                out.push(LinkAddress {
                    ifindex: a.header.index,
                    address,
                    prefix_len: a.header.prefix_len,
                });
            }
        }
        Ok(out)
    }

    /// The node's own addresses, every link's, sorted and once each.
    pub fn host_addresses(&mut self) -> Result<Vec<std::net::IpAddr>> {
        let mut addrs: Vec<std::net::IpAddr> =
            self.addresses()?.into_iter().map(|a| a.address).collect();
        addrs.sort();
        addrs.dedup();
        Ok(addrs)
    }

    /// `ip link show`: index and name of every link.
    pub fn links(&mut self) -> Result<Vec<LinkName>> {
        let replies = self.nl.dump(
            "link show",
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
        )?;
        Ok(replies
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(link) => Some(LinkName {
                    index: link.header.index,
                    name: link
                        .attributes
                        .iter()
                        .find_map(|a| match a {
                            LinkAttribute::IfName(n) => Some(n.clone()),
                            _ => None,
                        })
                        .unwrap_or_default(),
                }),
                _ => None,
            })
            .collect())
    }
}

fn present_route(r: &RouteMessage) -> Option<PresentRoute> {
    let mut destination = None;
    let mut gateway = None;
    let mut table = u32::from(r.header.table);
    let mut priority = 0;
    for attr in &r.attributes {
        match attr {
            RouteAttribute::Destination(a) => destination = route_ip(a),
            RouteAttribute::Gateway(a) => gateway = route_ip(a),
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Priority(p) => priority = *p,
            _ => {}
        }
    }
    let prefix = r.header.destination_prefix_length;
    let destination = match destination {
        Some(ip) => ip,
        // The default route has no RTA_DST.
        None if r.header.address_family == AddressFamily::Inet => IpAddr::from([0u8; 4]),
        None => IpAddr::from([0u8; 16]),
    };
    Some(PresentRoute {
        destination: IpNetwork::new(destination, prefix).ok()?,
        gateway,
        protocol: u8::from(r.header.protocol),
        table,
        priority,
    })
}
