//! A small synchronous rtnetlink handle.
//!
//! The plugin lives for a few milliseconds and makes a dozen requests, so it
//! talks to the kernel over one blocking socket per namespace instead of
//! running an async runtime. Requests read like iproute2: `link_add_veth`,
//! `addr_add`, `route_add`, `neigh_add`; every failure names the request.

use std::net::IpAddr;
use std::os::fd::{AsRawFd, BorrowedFd};

use ferrite_netlink::route::{family, route_ip, RouteNetlink};
use ferrite_netlink::wire::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use ferrite_netlink::{Batch, Request};
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

pub use ferrite_netlink::{NetlinkError, Result};

/// Routes ferrite installs carry this protocol number, so they can be told
/// apart from everyone else's (iproute2's rt_protos lists 0-4 and a few
/// daemons; 0x46 'F' is unassigned).
pub const FERRITE_ROUTE_PROTOCOL: u8 = 0x46;

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
    /// IFLA_GSO_IPV4_MAX_SIZE, where the kernel reports it.
    pub gso_ipv4_max: Option<u32>,
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
    nl: RouteNetlink,
}

impl Netlink {
    /// A socket in the caller's current network namespace.
    pub fn new() -> Result<Self> {
        Ok(Self {
            nl: ferrite_netlink::route::open()?,
        })
    }

    /// A socket inside the network namespace `netns`, made from inside it
    /// on the calling thread, which then comes back (`netns::within`).
    pub fn in_netns(netns: BorrowedFd<'_>) -> Result<Self> {
        crate::netns::within(netns, Self::new).unwrap_or_else(|source| {
            Err(NetlinkError::Socket {
                call: "setns(CLONE_NEWNET)",
                source,
            })
        })
    }

    /// Sends `requests` in one datagram and waits for the kernel's one
    /// answer to the last (`Batch::ack_last_only`): the first refusal,
    /// named after its request, is the error. The kernel carries on with
    /// the requests after a refused one; callers undo the whole set.
    /// Requests built elsewhere (the datapath's clsact attach) may be among
    /// them.
    pub fn apply<R: Into<Request<RouteNetlinkMessage>>>(
        &mut self,
        requests: impl IntoIterator<Item = R>,
    ) -> Result<()> {
        let mut batch = Batch::new();
        for r in requests {
            batch.push(r.into());
        }
        self.nl.batch(batch.ack_last_only())
    }

    /// `ip link add <host> mtu M address A group G type veth peer name <peer> netns <fd> mtu M address B`
    /// in one RTM_NEWLINK, then `ip link show <host>` in the same datagram:
    /// the host end as the kernel made it (`None` if it is already gone).
    /// Fails with EEXIST if either name is taken.
    pub fn link_add_veth(
        &mut self,
        host: &VethEnd<'_>,
        host_group: u32,
        peer: &VethEnd<'_>,
        peer_netns: BorrowedFd<'_>,
    ) -> Result<Option<Link>> {
        let mut peer_msg = LinkMessage::default();
        peer_msg.attributes = peer.attributes();
        peer_msg
            .attributes
            .push(LinkAttribute::NetNsFd(peer_netns.as_raw_fd()));
        let mut msg = LinkMessage::default();
        msg.attributes = host.attributes();
        msg.attributes.extend([
            LinkAttribute::Group(host_group),
            LinkAttribute::LinkInfo(vec![
                LinkInfo::Kind(InfoKind::Veth),
                LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer_msg))),
            ]),
        ]);
        let mut make = Batch::new();
        make.push(
            Request::new(
                format!("link add {} type veth peer {}", host.name, peer.name),
                RouteNetlinkMessage::NewLink(msg),
                NLM_F_CREATE | NLM_F_EXCL,
            )
            .without_ack(),
        );
        let mut show = LinkMessage::default();
        show.attributes
            .push(LinkAttribute::IfName(host.name.to_string()));
        let what = format!("link show {}", host.name);
        match self
            .nl
            .batch_get(&make, &what, RouteNetlinkMessage::GetLink(show), 0)
        {
            Ok(Some(RouteNetlinkMessage::NewLink(link))) => Ok(Some(Link::from_message(&link))),
            Ok(None) => Ok(None),
            Ok(Some(_)) => Err(NetlinkError::decode(what, "unexpected reply")),
            // The get's own "no such device": made, and gone already.
            Err(NetlinkError::Kernel {
                request, source, ..
            }) if request == what && source.raw_os_error() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `ip link set <index> down`: the kernel also drops every route through it.
    pub fn link_set_down(&mut self, index: u32) -> Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.change_mask = LinkFlags::Up;
        self.nl.request(
            &format!("link set {index} down"),
            RouteNetlinkMessage::SetLink(msg),
            0,
        )
    }

    /// `ip link del <index>`
    pub fn link_del(&mut self, index: u32) -> Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        self.nl.request(
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
        match self.nl.get(&what, RouteNetlinkMessage::GetLink(msg), 0) {
            Ok(Some(RouteNetlinkMessage::NewLink(link))) => Ok(Some(Link::from_message(&link))),
            Ok(None) => Ok(None),
            Ok(Some(_)) => Err(NetlinkError::decode(what, "unexpected reply")),
            Err(e) if e.errno() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
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
        let reply = self
            .nl
            .get("netns id", RouteNetlinkMessage::GetNsId(msg), 0)?;
        let Some(RouteNetlinkMessage::NewNsId(m)) = reply else {
            return Ok(None);
        };
        let id = m.attributes.iter().find_map(|a| match a {
            NsidAttribute::Id(id) => Some(*id),
            _ => None,
        });
        // -1: NETNSA_NSID_NOT_ASSIGNED.
        Ok(id.filter(|id| *id >= 0))
    }

    /// `ip link show`
    pub fn link_list(&mut self) -> Result<Vec<Link>> {
        let replies = self.nl.dump(
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

    /// `ip addr show dev <index>`: (address, prefix length) pairs.
    pub fn addr_list(&mut self, index: u32) -> Result<Vec<(IpAddr, u8)>> {
        let replies = self.nl.dump(
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

    /// `ip route show table main` for one family.
    pub fn route_list(&mut self, ipv6: bool) -> Result<Vec<Route>> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = if ipv6 {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        let replies = self
            .nl
            .dump("route show", RouteNetlinkMessage::GetRoute(msg))?;
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

    /// `tc qdisc show dev <index>`: (at the root?, kind) of each qdisc.
    pub fn qdiscs(&mut self, index: u32) -> Result<Vec<(bool, String)>> {
        use netlink_packet_route::tc::{TcAttribute, TcHandle, TcMessage};
        let mut msg = TcMessage::default();
        msg.header.index = index as i32;
        let replies = self
            .nl
            .dump("qdisc show", RouteNetlinkMessage::GetQueueDiscipline(msg))?;
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
        let replies = self.nl.dump(
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

/// One request, built but not yet sent: several go to the kernel in one
/// datagram with [`Netlink::apply`]. Named like the iproute2 command.
pub struct Req {
    what: String,
    msg: RouteNetlinkMessage,
    flags: u16,
}

impl From<Req> for Request<RouteNetlinkMessage> {
    fn from(r: Req) -> Self {
        Request::new(r.what, r.msg, r.flags)
    }
}

impl Req {
    fn new(what: String, msg: RouteNetlinkMessage, flags: u16) -> Self {
        Self { what, msg, flags }
    }

    /// `ip link set <index> up [alias A]`
    pub fn link_set_up(index: u32, alias: Option<&str>) -> Req {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        if let Some(alias) = alias {
            msg.attributes
                .push(LinkAttribute::IfAlias(alias.to_string()));
        }
        Req::new(
            format!("link set {index} up"),
            RouteNetlinkMessage::SetLink(msg),
            0,
        )
    }

    /// `ip addr add <ip>/<prefix> dev <index> [nodad]`
    pub fn addr_add(index: u32, ip: IpAddr, prefix_len: u8) -> Req {
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
        Req::new(
            format!("addr add {ip}/{prefix_len} dev {index}"),
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// `ip route add <dst>/<len> [via <gw> onlink] dev <index> [scope link] proto ferrite`
    pub fn route_add(route: &RouteSpec) -> Req {
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
        Req::new(
            format!(
                "route add {}/{} dev {}",
                route.destination, route.prefix_len, route.oif
            ),
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// `ip neigh replace <ip> lladdr <mac> nud permanent dev <index>`
    pub fn neigh_add_permanent(index: u32, ip: IpAddr, mac: [u8; 6]) -> Req {
        let mut msg = NeighbourMessage::default();
        msg.header.family = family(ip);
        msg.header.ifindex = index;
        msg.header.state = NeighbourState::Permanent;
        msg.header.flags = NeighbourFlags::empty();
        msg.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::from(ip)));
        msg.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        Req::new(
            format!("neigh add {ip} dev {index}"),
            RouteNetlinkMessage::NewNeighbour(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
    }
}

/// One end of a veth pair as `link_add_veth` creates it.
pub struct VethEnd<'a> {
    pub name: &'a str,
    pub mtu: u32,
    pub mac: [u8; 6],
    /// IPv4 GSO and GRO maximum size (BIG TCP), if not the kernel's 64 KiB.
    pub gso_ipv4_max: Option<u32>,
}

impl VethEnd<'_> {
    /// The end's attributes in the create message (besides the peer's
    /// namespace and the host end's group and kind).
    fn attributes(&self) -> Vec<LinkAttribute> {
        let mut attrs = vec![
            LinkAttribute::IfName(self.name.to_string()),
            LinkAttribute::Mtu(self.mtu),
            LinkAttribute::Address(self.mac.to_vec()),
        ];
        if let Some(size) = self.gso_ipv4_max {
            attrs.push(LinkAttribute::GsoIpv4MaxSize(size));
            attrs.push(LinkAttribute::GroIpv4MaxSize(size));
        }
        attrs
    }
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
            gso_ipv4_max: None,
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
                LinkAttribute::GsoIpv4MaxSize(size) => link.gso_ipv4_max = Some(*size),
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
        self.nl.request(
            &format!("RTM_NEWQDISC {kind} root dev {index}"),
            RouteNetlinkMessage::NewQueueDiscipline(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }
}
