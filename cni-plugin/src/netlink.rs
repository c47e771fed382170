//! A small synchronous rtnetlink handle.
//!
//! The plugin lives for a few milliseconds and makes a dozen requests, so it
//! talks to the kernel over one blocking socket per namespace instead of
//! running an async runtime. Requests read like iproute2: `link_add_veth`,
//! `addr_add`, `route_add`, `neigh_add`; every failure names the request.

use std::net::IpAddr;
use std::os::fd::{AsRawFd, BorrowedFd};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// Routes ferrite installs carry this protocol number, so they can be told
/// apart from everyone else's (iproute2's rt_protos lists 0-4 and a few
/// daemons; 0x46 'F' is unassigned).
pub const FERRITE_ROUTE_PROTOCOL: u8 = 0x46;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("netlink {request}: {source}")]
    Request {
        request: String,
        #[source]
        source: std::io::Error,
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

pub type Result<T> = std::result::Result<T, NetlinkError>;

/// A link as the plugin needs to know it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: [u8; 6],
    pub mtu: u32,
    pub up: bool,
    pub alias: Option<String>,
    pub group: u32,
    pub kind: Option<String>,
    /// IFLA_LINK: a veth's peer ifindex, in the namespace `peer_netnsid`
    /// names (or this one when that is absent).
    pub peer_index: Option<u32>,
    /// IFLA_LINK_NETNSID: the peer's namespace, as this one numbers it.
    pub peer_netnsid: Option<i32>,
}

/// A route as CHECK compares it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub destination: Option<IpAddr>,
    pub prefix_len: u8,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
    pub protocol: u8,
}

/// A neighbour entry as CHECK compares it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Neighbour {
    pub ifindex: u32,
    pub destination: IpAddr,
    pub mac: Option<[u8; 6]>,
    pub permanent: bool,
}

pub struct Netlink {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Netlink {
    /// A socket in the caller's current network namespace.
    pub fn new() -> Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Socket)?;
        socket.bind_auto().map_err(NetlinkError::Socket)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(NetlinkError::Socket)?;
        // Extended acks give the kernel's text ("Nexthop device is not up").
        let _ = socket.set_ext_ack(true);
        Ok(Self {
            socket,
            seq: 0,
            buf: vec![0; 64 * 1024],
        })
    }

    /// A socket inside the network namespace `netns`. The socket keeps the
    /// namespace it was created in, so only its creation runs there, on a
    /// short-lived thread: the caller's thread never changes namespace.
    pub fn in_netns(netns: BorrowedFd<'_>) -> Result<Self> {
        let fd = netns.as_raw_fd();
        std::thread::scope(|s| {
            s.spawn(move || {
                // SAFETY: setns on this thread only; the fd outlives the scope.
                if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                    return Err(NetlinkError::Request {
                        request: "setns(CLONE_NEWNET)".into(),
                        source: std::io::Error::last_os_error(),
                    });
                }
                Self::new()
            })
            .join()
            .unwrap_or_else(|_| {
                Err(NetlinkError::Socket(std::io::Error::other(
                    "namespace thread panicked",
                )))
            })
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

    /// Sends one request and waits for its ack.
    fn request(&mut self, what: &str, msg: RouteNetlinkMessage, flags: u16) -> Result<()> {
        let seq = self.send(msg, NLM_F_REQUEST | NLM_F_ACK | flags)?;
        loop {
            for msg in self.recv_messages(what, seq)? {
                if let NetlinkPayload::Error(err) = msg {
                    return match err.code {
                        None => Ok(()),
                        Some(code) => Err(kernel_errno(what, code.get())),
                    };
                }
            }
        }
    }

    /// Sends a dump request and collects every inner message.
    fn dump(&mut self, what: &str, msg: RouteNetlinkMessage) -> Result<Vec<RouteNetlinkMessage>> {
        let seq = self.send(msg, NLM_F_REQUEST | NLM_F_DUMP)?;
        let mut out = Vec::new();
        loop {
            for msg in self.recv_messages(what, seq)? {
                match msg {
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(err) => {
                        if let Some(code) = err.code {
                            return Err(kernel_errno(what, code.get()));
                        }
                    }
                    NetlinkPayload::InnerMessage(inner) => out.push(inner),
                    _ => {}
                }
            }
        }
    }

    /// Receives one datagram and returns the payloads of its messages that
    /// answer `seq`.
    fn recv_messages(
        &mut self,
        what: &str,
        seq: u32,
    ) -> Result<Vec<NetlinkPayload<RouteNetlinkMessage>>> {
        let n = self.recv(what)?;
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
            offset += nl_align(len);
        }
        Ok(out)
    }

    fn recv(&mut self, what: &str) -> Result<usize> {
        let buf = &mut &mut self.buf[..];
        self.socket
            .recv(buf, 0)
            .map_err(|source| NetlinkError::Request {
                request: what.into(),
                source,
            })
    }

    /// `ip link add <host> mtu M address A group G type veth peer name <peer> netns <fd> mtu M address B`
    /// in one RTM_NEWLINK. Fails with EEXIST if either name is taken.
    pub fn link_add_veth(
        &mut self,
        host: &VethEnd<'_>,
        host_group: u32,
        peer: &VethEnd<'_>,
        peer_netns: BorrowedFd<'_>,
    ) -> Result<()> {
        let mut peer_msg = LinkMessage::default();
        peer_msg.attributes = vec![
            LinkAttribute::IfName(peer.name.to_string()),
            LinkAttribute::Mtu(peer.mtu),
            LinkAttribute::Address(peer.mac.to_vec()),
            LinkAttribute::NetNsFd(peer_netns.as_raw_fd()),
        ];
        let mut msg = LinkMessage::default();
        msg.attributes = vec![
            LinkAttribute::IfName(host.name.to_string()),
            LinkAttribute::Mtu(host.mtu),
            LinkAttribute::Address(host.mac.to_vec()),
            LinkAttribute::Group(host_group),
            LinkAttribute::LinkInfo(vec![
                LinkInfo::Kind(InfoKind::Veth),
                LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer_msg))),
            ]),
        ];
        self.request(
            &format!("link add {} type veth peer {}", host.name, peer.name),
            RouteNetlinkMessage::NewLink(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// `ip link set <index> up [alias A]`
    pub fn link_set_up(&mut self, index: u32, alias: Option<&str>) -> Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        if let Some(alias) = alias {
            msg.attributes
                .push(LinkAttribute::IfAlias(alias.to_string()));
        }
        self.request(
            &format!("link set {index} up"),
            RouteNetlinkMessage::SetLink(msg),
            0,
        )
    }

    /// `ip link set <index> down`: the kernel also drops every route through it.
    pub fn link_set_down(&mut self, index: u32) -> Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.change_mask = LinkFlags::Up;
        self.request(
            &format!("link set {index} down"),
            RouteNetlinkMessage::SetLink(msg),
            0,
        )
    }

    /// `ip link del <index>`
    pub fn link_del(&mut self, index: u32) -> Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        self.request(
            &format!("link del {index}"),
            RouteNetlinkMessage::DelLink(msg),
            0,
        )
    }

    /// `ip link show <name>`; `Ok(None)` when there is no such link.
    pub fn link_get(&mut self, name: &str) -> Result<Option<Link>> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        self.link_get_one(format!("link show {name}"), msg)
    }

    /// `ip link show <index>`; `Ok(None)` when there is no such link.
    pub fn link_get_index(&mut self, index: u32) -> Result<Option<Link>> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        self.link_get_one(format!("link show {index}"), msg)
    }

    fn link_get_one(&mut self, what: String, msg: LinkMessage) -> Result<Option<Link>> {
        let seq = self.send(RouteNetlinkMessage::GetLink(msg), NLM_F_REQUEST)?;
        loop {
            let n = self.recv(&what)?;
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[..n]).map_err(
                |e| NetlinkError::Decode {
                    request: what.clone(),
                    detail: e.to_string(),
                },
            )?;
            if msg.header.sequence_number != seq {
                continue;
            }
            return match msg.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                    Ok(Some(Link::from_message(&link)))
                }
                NetlinkPayload::Error(err) => match err.code.map(|c| -c.get()) {
                    Some(libc::ENODEV) => Ok(None),
                    Some(code) => Err(NetlinkError::Request {
                        request: what,
                        source: std::io::Error::from_raw_os_error(code),
                    }),
                    None => Ok(None),
                },
                _ => Err(NetlinkError::Decode {
                    request: what,
                    detail: "unexpected reply".into(),
                }),
            };
        }
    }

    /// `ip netns list-id` for one namespace: the id this socket's namespace
    /// gives the namespace `netns` (what IFLA_LINK_NETNSID of a link whose
    /// peer lives there says), or `None` when it has given it none.
    pub fn netns_id(&mut self, netns: BorrowedFd<'_>) -> Result<Option<i32>> {
        use netlink_packet_route::nsid::{NsidAttribute, NsidMessage};
        let mut msg = NsidMessage::default();
        msg.attributes
            .push(NsidAttribute::Fd(netns.as_raw_fd() as u32));
        let what = "netns id";
        let seq = self.send(RouteNetlinkMessage::GetNsId(msg), NLM_F_REQUEST)?;
        loop {
            for payload in self.recv_messages(what, seq)? {
                match payload {
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNsId(m)) => {
                        let id = m.attributes.iter().find_map(|a| match a {
                            NsidAttribute::Id(id) => Some(*id),
                            _ => None,
                        });
                        // -1: NETNSA_NSID_NOT_ASSIGNED.
                        return Ok(id.filter(|id| *id >= 0));
                    }
                    NetlinkPayload::Error(err) => {
                        return match err.code {
                            Some(code) => Err(kernel_errno(what, code.get())),
                            None => Ok(None),
                        };
                    }
                    _ => {}
                }
            }
        }
    }

    /// `ip link show`
    pub fn link_list(&mut self) -> Result<Vec<Link>> {
        let replies = self.dump(
            "link show",
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
        )?;
        Ok(replies
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(link) => Some(Link::from_message(link)),
                _ => None,
            })
            .collect())
    }

    /// `ip addr add <ip>/<prefix> dev <index> [nodad]`
    pub fn addr_add(&mut self, index: u32, ip: IpAddr, prefix_len: u8) -> Result<()> {
        let mut msg = AddressMessage::default();
        msg.header.family = family(ip);
        msg.header.prefix_len = prefix_len;
        msg.header.index = index;
        msg.attributes.push(AddressAttribute::Local(ip));
        if ip.is_ipv6() {
            msg.attributes.push(AddressAttribute::Address(ip));
            msg.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        } else {
            msg.attributes.push(AddressAttribute::Address(ip));
        }
        self.request(
            &format!("addr add {ip}/{prefix_len} dev {index}"),
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// `ip addr show dev <index>`: (address, prefix length) pairs.
    pub fn addr_list(&mut self, index: u32) -> Result<Vec<(IpAddr, u8)>> {
        let replies = self.dump(
            "addr show",
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
        )?;
        let mut out = Vec::new();
        for m in replies {
            if let RouteNetlinkMessage::NewAddress(a) = m {
                if a.header.index != index {
                    continue;
                }
                for attr in &a.attributes {
                    if let AddressAttribute::Address(ip) = attr {
                        out.push((*ip, a.header.prefix_len));
                    }
                }
            }
        }
        Ok(out)
    }

    /// `ip route add <dst>/<len> [via <gw> onlink] dev <index> [scope link] proto ferrite`
    pub fn route_add(&mut self, route: &RouteSpec) -> Result<()> {
        let mut msg = RouteMessage::default();
        let fam = family(route.destination);
        msg.header.address_family = fam;
        msg.header.destination_prefix_length = route.prefix_len;
        msg.header.table = libc::RT_TABLE_MAIN;
        msg.header.protocol = RouteProtocol::Other(FERRITE_ROUTE_PROTOCOL);
        msg.header.kind = RouteType::Unicast;
        msg.header.scope = if route.gateway.is_some() {
            RouteScope::Universe
        } else {
            RouteScope::Link
        };
        if route.prefix_len > 0 {
            msg.attributes
                .push(RouteAttribute::Destination(RouteAddress::from(
                    route.destination,
                )));
        }
        if let Some(gw) = route.gateway {
            msg.attributes
                .push(RouteAttribute::Gateway(RouteAddress::from(gw)));
            msg.header.flags = RouteFlags::Onlink;
        }
        msg.attributes.push(RouteAttribute::Oif(route.oif));
        self.request(
            &format!(
                "route add {}/{} dev {}",
                route.destination, route.prefix_len, route.oif
            ),
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// `ip route show table main` for one family.
    pub fn route_list(&mut self, ipv6: bool) -> Result<Vec<Route>> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = if ipv6 {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        let replies = self.dump("route show", RouteNetlinkMessage::GetRoute(msg))?;
        let mut out = Vec::new();
        for m in replies {
            let RouteNetlinkMessage::NewRoute(r) = m else {
                continue;
            };
            if r.header.table != libc::RT_TABLE_MAIN {
                continue;
            }
            let mut route = Route {
                destination: None,
                prefix_len: r.header.destination_prefix_length,
                gateway: None,
                oif: None,
                protocol: u8::from(r.header.protocol),
            };
            for attr in &r.attributes {
                match attr {
                    RouteAttribute::Destination(a) => route.destination = route_ip(a),
                    RouteAttribute::Gateway(a) => route.gateway = route_ip(a),
                    RouteAttribute::Oif(i) => route.oif = Some(*i),
                    _ => {}
                }
            }
            out.push(route);
        }
        Ok(out)
    }

    /// `ip neigh replace <ip> lladdr <mac> nud permanent dev <index>`
    pub fn neigh_add_permanent(&mut self, index: u32, ip: IpAddr, mac: [u8; 6]) -> Result<()> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = family(ip);
        msg.header.ifindex = index;
        msg.header.state = NeighbourState::Permanent;
        msg.header.flags = NeighbourFlags::empty();
        msg.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::from(ip)));
        msg.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        self.request(
            &format!("neigh add {ip} dev {index}"),
            RouteNetlinkMessage::NewNeighbour(msg),
            NLM_F_CREATE | libc::NLM_F_REPLACE as u16,
        )
    }

    /// `tc qdisc show dev <index>`: (at the root?, kind) of each qdisc.
    pub fn qdiscs(&mut self, index: u32) -> Result<Vec<(bool, String)>> {
        use netlink_packet_route::tc::{TcAttribute, TcHandle, TcMessage};
        let mut msg = TcMessage::default();
        msg.header.index = index as i32;
        let replies = self.dump("qdisc show", RouteNetlinkMessage::GetQueueDiscipline(msg))?;
        let mut out = Vec::new();
        for m in replies {
            let RouteNetlinkMessage::NewQueueDiscipline(q) = m else {
                continue;
            };
            if q.header.index != index as i32 {
                continue;
            }
            for attr in &q.attributes {
                if let TcAttribute::Kind(k) = attr {
                    out.push((q.header.parent == TcHandle::ROOT, k.clone()));
                }
            }
        }
        Ok(out)
    }

    /// `ip neigh show dev <index>`
    pub fn neigh_list(&mut self, index: u32) -> Result<Vec<Neighbour>> {
        let replies = self.dump(
            "neigh show",
            RouteNetlinkMessage::GetNeighbour(NeighbourMessage::default()),
        )?;
        let mut out = Vec::new();
        for m in replies {
            let RouteNetlinkMessage::NewNeighbour(n) = m else {
                continue;
            };
            if n.header.ifindex != index {
                continue;
            }
            let mut dest = None;
            let mut mac = None;
            for attr in &n.attributes {
                match attr {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => {
                        dest = Some(IpAddr::V4(*a))
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                        dest = Some(IpAddr::V6(*a))
                    }
                    NeighbourAttribute::LinkLayerAddress(l) if l.len() == 6 => {
                        let mut m = [0u8; 6];
                        m.copy_from_slice(l);
                        mac = Some(m);
                    }
                    _ => {}
                }
            }
            if let Some(destination) = dest {
                out.push(Neighbour {
                    ifindex: index,
                    destination,
                    mac,
                    permanent: n.header.state == NeighbourState::Permanent,
                });
            }
        }
        Ok(out)
    }
}

/// One end of a veth pair as `link_add_veth` creates it.
pub struct VethEnd<'a> {
    pub name: &'a str,
    pub mtu: u32,
    pub mac: [u8; 6],
}

/// A route as `route_add` installs it.
pub struct RouteSpec {
    pub destination: IpAddr,
    pub prefix_len: u8,
    pub gateway: Option<IpAddr>,
    pub oif: u32,
}

impl Link {
    fn from_message(msg: &LinkMessage) -> Self {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            mac: [0; 6],
            mtu: 0,
            up: msg.header.flags.contains(LinkFlags::Up),
            alias: None,
            group: 0,
            kind: None,
            peer_index: None,
            peer_netnsid: None,
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name = n.clone(),
                LinkAttribute::Mtu(m) => link.mtu = *m,
                LinkAttribute::Address(a) if a.len() == 6 => link.mac.copy_from_slice(a),
                LinkAttribute::IfAlias(a) => link.alias = Some(a.clone()),
                LinkAttribute::Group(g) => link.group = *g,
                // 0 is "no link", as the kernel reports a device without one.
                LinkAttribute::Link(i) if *i != 0 => link.peer_index = Some(*i),
                LinkAttribute::LinkNetNsId(id) => link.peer_netnsid = Some(*id),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let LinkInfo::Kind(k) = info {
                            link.kind = Some(k.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }
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

/// The kernel's negative errno in an NLMSG_ERROR, as an error naming the request.
fn kernel_errno(what: &str, negative: i32) -> NetlinkError {
    NetlinkError::Request {
        request: what.into(),
        source: std::io::Error::from_raw_os_error(-negative),
    }
}

fn nl_align(len: usize) -> usize {
    (len + 3) & !3
}

// ---------------------------------------------------------------------------
// Queueing disciplines, for the bandwidth capability (see bandwidth.rs).
// netlink-packet-route has no typed TBF options, so the caller passes the
// option attributes as raw (type, payload) pairs.

impl Netlink {
    /// `tc qdisc add dev <index> root handle <major>: <kind> <options>`.
    /// Fails with EEXIST if the device already has a root qdisc of its own.
    pub fn qdisc_add_root(
        &mut self,
        index: u32,
        major: u16,
        kind: &str,
        options: Vec<(u16, Vec<u8>)>,
    ) -> Result<()> {
        use netlink_packet_core::DefaultNla;
        use netlink_packet_route::tc::{TcAttribute, TcHandle, TcMessage, TcOption};

        let mut msg = TcMessage::default();
        msg.header.index = index as i32;
        msg.header.handle = TcHandle { major, minor: 0 };
        msg.header.parent = TcHandle::ROOT;
        msg.attributes.push(TcAttribute::Kind(kind.to_string()));
        msg.attributes.push(TcAttribute::Options(
            options
                .into_iter()
                .map(|(t, v)| TcOption::Other(DefaultNla::new(t, v)))
                .collect(),
        ));
        self.request(
            &format!("RTM_NEWQDISC {kind} root dev {index}"),
            RouteNetlinkMessage::NewQueueDiscipline(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }
}
