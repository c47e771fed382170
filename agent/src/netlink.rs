// SPDX-License-Identifier: Apache-2.0
//! A small synchronous rtnetlink handle for the agent: routes to other
//! nodes, and the node's addresses and links.
//!
//! The agent makes a few requests per node-list change, from its sync
//! thread, so one blocking socket is enough (no async netlink stack).
//! Requests read like iproute2; every failure names its request.

use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::time::Duration;

use ipnetwork::IpNetwork;
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use crate::routes::{PresentRoute, RTPROT_FERRITE_NODES, TABLE_MAIN};

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("netlink {request}: {source}")]
    Request {
        request: String,
        #[source]
        source: io::Error,
    },
    #[error("netlink {request}: cannot decode reply: {detail}")]
    Decode { request: String, detail: String },
}

impl NetlinkError {
    /// The errno the kernel answered with, if this was a kernel error.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Request { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

type Result<T> = std::result::Result<T, NetlinkError>;

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
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Netlink {
    /// A socket in the calling thread's network namespace.
    pub fn new() -> Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Socket)?;
        socket.bind_auto().map_err(NetlinkError::Socket)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(NetlinkError::Socket)?;
        let _ = socket.set_ext_ack(true);
        set_recv_timeout(&socket, Duration::from_secs(10)).map_err(NetlinkError::Socket)?;
        Ok(Self {
            socket,
            seq: 0,
            buf: vec![0; 64 * 1024],
        })
    }

    fn send(&mut self, msg: RouteNetlinkMessage, flags: u16) -> Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        packet.finalize();
        let mut out = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut out);
        self.socket
            .send(&out, 0)
            .map_err(|source| NetlinkError::Request {
                request: "send".into(),
                source,
            })?;
        Ok(self.seq)
    }

    fn request(&mut self, what: &str, msg: RouteNetlinkMessage, flags: u16) -> Result<()> {
        let seq = self.send(msg, NLM_F_REQUEST | NLM_F_ACK | flags)?;
        loop {
            for msg in self.recv_messages(what, seq)? {
                if let NetlinkPayload::Error(err) = msg {
                    return match err.code {
                        None => Ok(()),
                        Some(code) => Err(NetlinkError::Request {
                            request: what.into(),
                            source: io::Error::from_raw_os_error(-code.get()),
                        }),
                    };
                }
            }
        }
    }

    fn dump(&mut self, what: &str, msg: RouteNetlinkMessage) -> Result<Vec<RouteNetlinkMessage>> {
        let seq = self.send(msg, NLM_F_REQUEST | NLM_F_DUMP)?;
        let mut out = Vec::new();
        loop {
            for msg in self.recv_messages(what, seq)? {
                match msg {
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(err) => {
                        if let Some(code) = err.code {
                            return Err(NetlinkError::Request {
                                request: what.into(),
                                source: io::Error::from_raw_os_error(-code.get()),
                            });
                        }
                    }
                    NetlinkPayload::InnerMessage(inner) => out.push(inner),
                    _ => {}
                }
            }
        }
    }

    fn recv_messages(
        &mut self,
        what: &str,
        seq: u32,
    ) -> Result<Vec<NetlinkPayload<RouteNetlinkMessage>>> {
        let n = {
            let buf = &mut &mut self.buf[..];
            self.socket
                .recv(buf, 0)
                .map_err(|source| NetlinkError::Request {
                    request: what.into(),
                    source,
                })?
        };
        let mut out = Vec::new();
        let mut offset = 0;
        while offset < n {
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[offset..n])
                .map_err(|e| NetlinkError::Decode {
                    request: what.into(),
                    detail: e.to_string(),
                })?;
            let len = msg.header.length as usize;
            if msg.header.sequence_number == seq {
                out.push(msg.payload);
            }
            if len == 0 {
                break;
            }
            offset += (len + 3) & !3;
        }
        Ok(out)
    }

    /// `ip route show table all` for both families, unicast routes only.
    pub fn routes(&mut self) -> Result<Vec<PresentRoute>> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut msg = RouteMessage::default();
            msg.header.address_family = family;
            for reply in self.dump("route show", RouteNetlinkMessage::GetRoute(msg))? {
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
        self.request(
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
        match self.request(&what, RouteNetlinkMessage::DelRoute(msg), 0) {
            Err(e) if e.errno() == Some(libc::ESRCH) => Ok(()),
            other => other,
        }
    }

    /// `ip addr show`: every address of every link.
    pub fn addresses(&mut self) -> Result<Vec<LinkAddress>> {
        let replies = self.dump(
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

    /// `ip link show`: index and name of every link.
    pub fn links(&mut self) -> Result<Vec<LinkName>> {
        let replies = self.dump(
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

fn family(ip: IpAddr) -> AddressFamily {
    if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// A receive timeout, so a kernel that never answers cannot hang the sync
/// thread forever.
pub(crate) fn set_recv_timeout(socket: &Socket, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: a valid timeval of the size passed, on a socket we own.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
