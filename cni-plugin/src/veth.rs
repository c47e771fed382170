//! The pod's veth pair and the pod side of it: the pair made with one
//! message, the pod's addresses, routes and neighbours, as ADD makes them
//! and DEL, CHECK and GC find, retire and reap them.

use std::fs::File;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use crate::error::{CniError, CniResult, Code};
use crate::naming::{self, gateway_for};
use crate::netlink::{Link, Netlink, NetlinkError, Req, RouteSpec, VethEnd};
use ferrite_netlink::Request;
use netlink_packet_route::RouteNetlinkMessage;

const NSFS_MAGIC: i64 = 0x6e73_6673;

pub fn kernel_error(msg: impl Into<String>, e: &NetlinkError) -> CniError {
    CniError::from_error(Code::Kernel, msg, e)
}

/// Opens CNI_NETNS and checks that it is a network namespace.
pub fn open_netns(path: &Path) -> CniResult<File> {
    let file = File::open(path).map_err(|e| {
        let code = if e.kind() == std::io::ErrorKind::NotFound {
            Code::UnknownContainer
        } else {
            Code::InvalidEnvironment
        };
        CniError::new(code, format!("cannot open CNI_NETNS {}", path.display())).with_details(e)
    })?;
    // SAFETY: fstatfs fills the struct for a valid fd.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) };
    if rc != 0 || st.f_type as i64 != NSFS_MAGIC {
        return Err(CniError::new(
            Code::InvalidEnvironment,
            format!("CNI_NETNS {} is not a network namespace", path.display()),
        ));
    }
    Ok(file)
}

/// What ADD asks for.
pub struct PodSpec<'a> {
    pub host_name: &'a str,
    pub ifname: &'a str,
    /// The network's device group: ferrite's mark on the host veth.
    pub group: u32,
    /// The alias set with the link up, for people reading `ip link`.
    pub alias: &'a str,
    pub mtu: u32,
    /// IPv4 GSO/GRO maximum of both ends (BIG TCP), if not the default.
    pub gso_ipv4_max: Option<u32>,
}

/// What ADD made, as the datapath and the result need it.
pub struct PodLink {
    pub host: Link,
    pub pod_mac: [u8; 6],
}

fn ends<'a>(spec: &PodSpec<'a>) -> (VethEnd<'a>, VethEnd<'a>) {
    let [host_mac, pod_mac] = naming::random_macs::<2>();
    let end = |name, mac| VethEnd {
        name,
        mtu: spec.mtu,
        mac,
        gso_ipv4_max: spec.gso_ipv4_max,
    };
    (end(spec.host_name, host_mac), end(spec.ifname, pod_mac))
}

/// Makes the veth pair, the host end in the node's namespace and the pod
/// end directly in the pod's, with one message: the first thing ADD asks
/// of the kernel, so that the common case takes no look-up first.
/// `Ok(None)` when a name is taken (EEXIST: the host veth's name in the
/// node, or `CNI_IFNAME` in the pod): nothing was made, and the caller
/// decides whether what holds the name may go ([`make_pair`] after it).
pub fn try_make_pair(
    host_nl: &mut Netlink,
    netns: &File,
    spec: &PodSpec<'_>,
) -> CniResult<Option<PodLink>> {
    let (host, peer) = ends(spec);
    match host_nl.link_add_veth(&host, spec.group, &peer, netns.as_fd()) {
        Ok(made) => made_pair(spec, made, peer.mac).map(Some),
        Err(e) if e.errno() == Some(libc::EEXIST) => Ok(None),
        Err(e) => Err(kernel_error("cannot create the veth pair", &e)),
    }
}

/// As [`try_make_pair`], once the caller has cleared the pod's side of
/// what held a name: a host veth of this network still holding its name
/// (left by a killed ADD) is removed and the pair made once more.
pub fn make_pair(host_nl: &mut Netlink, netns: &File, spec: &PodSpec<'_>) -> CniResult<PodLink> {
    let (host, peer) = ends(spec);
    let made = match host_nl.link_add_veth(&host, spec.group, &peer, netns.as_fd()) {
        Ok(made) => made,
        Err(e) if e.errno() != Some(libc::EEXIST) => {
            return Err(kernel_error("cannot create the veth pair", &e));
        }
        Err(e) => retry_over_leftover(host_nl, netns, &host, spec.group, &peer, e)?,
    };
    made_pair(spec, made, peer.mac)
}

fn made_pair(spec: &PodSpec<'_>, made: Option<Link>, pod_mac: [u8; 6]) -> CniResult<PodLink> {
    let Some(host) = made else {
        return Err(CniError::new(
            Code::Kernel,
            format!("host veth {} vanished after creation", spec.host_name),
        ));
    };
    log::debug!("veth pair made");
    crate::failpoint::hit("add-veth-created");
    Ok(PodLink { host, pod_mac })
}

/// Configures both ends of a pair [`make_pair`] made for `ips`; `attach`
/// (the datapath's clsact requests, or none) goes first in the host veth's
/// datagram, so that the programs are in place before the veth is up and
/// ADD waits for the RTNL lock once for both. On error the host veth,
/// which takes its peer, filters, routes and neighbours with it, is
/// deleted again.
pub fn configure_pair(
    host_nl: &mut Netlink,
    pod_nl: &mut Netlink,
    netns: &File,
    link: &PodLink,
    spec: &PodSpec<'_>,
    ips: &[IpAddr],
    attach: Vec<Request<RouteNetlinkMessage>>,
) -> CniResult<()> {
    let configured = configure(host_nl, pod_nl, netns, link, spec, ips, attach);
    if configured.is_err() {
        undo_pair(host_nl, link);
    }
    configured
}

/// Rollback of a later step of ADD: the pair goes (its host end takes its
/// peer, routes and neighbours with it); a failure is only logged, since
/// the step's own error is the one ADD reports.
pub fn undo_pair(host_nl: &mut Netlink, link: &PodLink) {
    if let Err(undo) = host_nl.link_del(link.host.index) {
        log::warn!("rollback: cannot delete {}: {undo}", link.host.name);
    }
}

/// The veth pair's creation failed with EEXIST (`e`): our host name is
/// taken. If it is ours and the pod has no such interface, it is what a
/// killed ADD left behind: remove it and try once more. Anything else is
/// not ours to touch.
fn retry_over_leftover(
    host_nl: &mut Netlink,
    netns: &File,
    host: &VethEnd<'_>,
    group: u32,
    peer: &VethEnd<'_>,
    e: NetlinkError,
) -> CniResult<Option<Link>> {
    let host_name = host.name;
    let leftover = host_nl
        .link_get(host_name)
        .map_err(|e| kernel_error("cannot look up the host veth", &e))?;
    match leftover {
        Some(l) if l.group == group => {
            host_nl
                .link_del(l.index)
                .map_err(|e| kernel_error("cannot remove a leftover host veth", &e))?;
            host_nl
                .link_add_veth(host, group, peer, netns.as_fd())
                .map_err(|e| kernel_error("cannot create the veth pair", &e))
        }
        Some(_) => Err(CniError::new(
            Code::InterfaceExists,
            format!("host interface {host_name} exists and was not made by this network"),
        )),
        None => Err(kernel_error("cannot create the veth pair", &e)),
    }
}

fn configure(
    host_nl: &mut Netlink,
    pod_nl: &mut Netlink,
    netns: &File,
    link: &PodLink,
    spec: &PodSpec<'_>,
    ips: &[IpAddr],
    attach: Vec<Request<RouteNetlinkMessage>>,
) -> CniResult<()> {
    let (host, pod_mac) = (&link.host, link.pod_mac);
    let ifname = spec.ifname;
    if !ips.iter().any(IpAddr::is_ipv6) {
        host_ipv6_off(&host.name)?;
        log::debug!("IPv6 off on the host veth");
    }
    // The pod end's index, as the host end reports its peer (IFLA_LINK):
    // no lookup in the pod needed.
    let pod_index = match host.peer_index {
        Some(index) => index,
        None => {
            pod_nl
                .link_get(ifname)
                .map_err(|e| kernel_error("cannot look up the pod interface", &e))?
                .ok_or_else(|| CniError::new(Code::Kernel, format!("{ifname} missing in the pod")))?
                .index
        }
    };
    if ips.iter().any(IpAddr::is_ipv6) {
        pod_ipv6_sysctls(netns, ifname)?;
    }

    // Host side: the programs (if `attach` has them), up, a route to each
    // pod address, and its neighbour entry so the host never has to ARP
    // for the pod. One datagram, one answer.
    let mut host_side = vec![Req::link_set_up(host.index, Some(spec.alias))];
    for ip in ips {
        let len = if ip.is_ipv4() { 32 } else { 128 };
        host_side.push(Req::route_add(&RouteSpec {
            destination: *ip,
            prefix_len: len,
            gateway: None,
            oif: host.index,
        }));
        host_side.push(Req::neigh_add_permanent(host.index, *ip, pod_mac));
    }
    host_nl
        .apply(
            attach
                .into_iter()
                .chain(host_side.into_iter().map(Request::from)),
        )
        .map_err(|e| kernel_error("cannot configure the host veth", &e))?;
    log::debug!("host veth configured");

    // Pod side: lo up, address, eth0 up, gateway neighbour, default route,
    // in this order (the route needs the device up), in one datagram.
    let mut pod_side = vec![Req::link_set_up(1, None)];
    for ip in ips {
        let len = if ip.is_ipv4() { 32 } else { 128 };
        pod_side.push(Req::addr_add(pod_index, *ip, len));
    }
    pod_side.push(Req::link_set_up(pod_index, None));
    let mut families: Vec<IpAddr> = Vec::new();
    for ip in ips {
        let gw = gateway_for(*ip);
        if families.contains(&gw) {
            continue;
        }
        families.push(gw);
        pod_side.push(Req::neigh_add_permanent(pod_index, gw, host.mac));
        let any = if ip.is_ipv4() {
            IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
        } else {
            IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
        };
        pod_side.push(Req::route_add(&RouteSpec {
            destination: any,
            prefix_len: 0,
            gateway: Some(gw),
            oif: pod_index,
        }));
    }
    pod_nl
        .apply(pod_side)
        .map_err(|e| kernel_error("cannot configure the pod interface", &e))
}

/// IPv6 off on the host veth of a pod without IPv6, before it goes up.
/// Otherwise each veth gets a link-local address, and with it an fe80::/64
/// and an ff00::/8 route; the kernel keeps the routes of one prefix in a
/// list, so every ADD got slower as the node filled (bringing the veth up
/// took 0.07 ms with 60 pods, 0.8 ms with 1,000).
fn host_ipv6_off(host_name: &str) -> CniResult<()> {
    let path = format!("/proc/sys/net/ipv6/conf/{host_name}/disable_ipv6");
    match std::fs::write(&path, b"1") {
        Ok(()) => Ok(()),
        // A kernel without IPv6 has nothing to turn off.
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                && !std::path::Path::new("/proc/sys/net/ipv6").exists() =>
        {
            Ok(())
        }
        Err(e) => Err(CniError::new(
            Code::Kernel,
            format!("cannot turn IPv6 off on the host veth ({path}): {e}"),
        )),
    }
}

/// IPv6 on the pod's interface, usable at once: enabled, and without
/// duplicate address detection (ferrite's IPAM already guarantees the
/// address is unique). Written from inside the pod's namespace
/// (`netns::within`): /proc/sys/net belongs to the namespace of whoever
/// opens it, so the node's own settings are never touched.
fn pod_ipv6_sysctls(netns: &File, ifname: &str) -> CniResult<()> {
    crate::netns::within(netns.as_fd(), || -> CniResult<()> {
        for (key, value) in [("disable_ipv6", "0"), ("accept_dad", "0")] {
            let path = format!("/proc/sys/net/ipv6/conf/{ifname}/{key}");
            std::fs::write(&path, value).map_err(|e| {
                CniError::new(Code::Kernel, format!("cannot set {path} in the pod")).with_details(e)
            })?;
        }
        Ok(())
    })
    .unwrap_or_else(|e| {
        Err(CniError::new(Code::Kernel, "cannot enter the pod's namespace").with_details(e))
    })
}

/// The host veth `name` if ferrite made it for this network (it carries the
/// network's device group); a link of that name that is not ours is left
/// alone, with a warning.
pub fn find_host_veth(nl: &mut Netlink, name: &str, group: u32) -> CniResult<Option<Link>> {
    let link = nl
        .link_get(name)
        .map_err(|e| kernel_error("cannot look up the host veth", &e))?;
    match link {
        Some(l) if l.group == group => Ok(Some(l)),
        Some(_) => {
            log::warn!("{name} exists but is not ferrite's for this network: left alone");
            Ok(None)
        }
        None => Ok(None),
    }
}

/// Whose is the interface ADD finds under the pod's `CNI_IFNAME`?
#[derive(Debug)]
pub enum Occupant {
    /// ferrite's own, of an earlier container of this namespace: a veth
    /// whose peer is this host veth, named like ferrite's, in this
    /// network's device group and down (retired by a DEL whose reaper has
    /// not finished, or never brought up by a killed ADD). Whether an
    /// endpoint entry still points at it is for the caller to ask.
    Retired(Link),
    /// Its peer is not in the node's namespace any more: a reaper may be
    /// deleting the pair right now.
    PeerGone,
    /// Anything else, with the reason; not ferrite's to touch.
    Foreign(String),
}

/// Identifies the pod interface `pod_link` (looked up in `netns`) from
/// the host side. Only ever reads.
pub fn occupant(
    host_nl: &mut Netlink,
    netns: &File,
    pod_link: &Link,
    group: u32,
    alias: &str,
) -> CniResult<Occupant> {
    let foreign = |why: &str| Ok(Occupant::Foreign(why.to_string()));
    if pod_link.kind.as_deref() != Some("veth") {
        return foreign("it is not a veth");
    }
    let Some(peer_index) = pod_link.peer_index else {
        return foreign("it has no peer");
    };
    // The pod's view of the peer's namespace cannot be compared with ours
    // directly; the host veth's view of the pod's namespace can.
    let Some(host) = host_nl
        .link_get_index(peer_index)
        .map_err(|e| kernel_error("cannot look up the pod interface's peer", &e))?
    else {
        return Ok(Occupant::PeerGone);
    };
    if host.kind.as_deref() != Some("veth") || !naming::is_host_veth_name(&host.name) {
        return foreign("its peer is not one of ferrite's veths");
    }
    if host.group != group {
        return foreign("its peer is not in this network's device group");
    }
    if host.alias.as_deref().is_some_and(|a| a != alias) {
        return foreign("its peer carries another alias");
    }
    if host.up {
        return foreign("its peer is up");
    }
    // The host veth must point back at this very interface in this very
    // namespace: an index alone could name a link of any namespace. Asked
    // after the link lookup, which gave the pod's namespace its id if it
    // had none.
    let pod_nsid = host_nl
        .netns_id(netns.as_fd())
        .map_err(|e| kernel_error("cannot get the pod namespace's id", &e))?;
    if host.peer_index != Some(pod_link.index)
        || pod_nsid.is_none()
        || host.peer_netnsid != pod_nsid
    {
        return foreign("its peer's peer is another interface");
    }
    Ok(Occupant::Retired(host))
}

/// Takes a host veth out of service at once: down, which also removes
/// every route through it and stops the pod's traffic, so its addresses can
/// be handed out again immediately.
pub fn retire(nl: &mut Netlink, link: &Link) -> CniResult<()> {
    match nl.link_set_down(link.index) {
        Ok(()) => Ok(()),
        Err(e) if e.errno() == Some(libc::ENODEV) => Ok(()),
        Err(e) => Err(kernel_error("cannot set the host veth down", &e)),
    }
}

/// Deletes retired links in a detached child process. Unregistering a
/// veth waits for RCU grace periods (10-20 ms here), which is the kernel's
/// housekeeping, not the pod's: the caller returns while it finishes. A
/// reaper that dies leaves a down veth in ferrite's group, which the next
/// ADD for that container or any GC removes.
pub fn reap(mut nl: Netlink, links: Vec<Link>) {
    if links.is_empty() {
        return;
    }
    // SAFETY: the plugin is single-threaded (it starts no threads); the
    // child only makes netlink requests and _exits.
    match unsafe { libc::fork() } {
        0 => {
            // SAFETY: plain syscalls on fds this process owns.
            unsafe {
                libc::setsid();
                let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
                if null >= 0 {
                    // The runtime reads our stdout to EOF: let go of it.
                    libc::dup2(null, 0);
                    libc::dup2(null, 1);
                    libc::dup2(null, 2);
                }
            }
            crate::logging::forked();
            crate::failpoint::reaper_hold();
            for l in &links {
                if let Err(e) = nl.link_del(l.index) {
                    if e.errno() != Some(libc::ENODEV) {
                        log::warn!("reaper: cannot delete {}: {e}", l.name);
                    }
                }
            }
            // SAFETY: ends the child without running the parent's exit path.
            unsafe { libc::_exit(0) }
        }
        -1 => {
            for l in &links {
                let _ = nl.link_del(l.index);
            }
        }
        _ => {}
    }
}
