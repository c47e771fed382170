//! ADD, DEL, CHECK, STATUS and GC.

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::Path;

use ferrite_datapath::{AttachMode, Datapath, Endpoint};
use ipnetwork::IpNetwork;

use crate::addresses;
use crate::bandwidth;
use crate::config::{CniEnv, Ipam, NetConf};
use crate::error::{CniError, CniResult, Code};
use crate::naming::{self, format_mac, gateway_for};
use crate::netlink::Netlink;
use crate::pod;
use crate::result::{CniOutput, Interface, IpConfig, RouteEntry};

fn datapath_error(msg: &str, e: &ferrite_datapath::DatapathError) -> CniError {
    CniError::from_error(Code::Datapath, msg, e)
}

fn host_netlink() -> CniResult<Netlink> {
    Netlink::new().map_err(|e| pod::kernel_error("cannot open a netlink socket", &e))
}

/// The open handles one ADD works through.
struct Handles {
    host_nl: Netlink,
    pod_nl: Netlink,
    netns: std::fs::File,
}

pub fn add(conf: &NetConf, env: &CniEnv) -> CniResult<CniOutput> {
    let started = std::time::Instant::now();
    let mark =
        |what: &str| log::debug!("{what} at {:.3} ms", started.elapsed().as_secs_f64() * 1e3);
    let netns_path = env.netns.as_deref().expect("validated: ADD has CNI_NETNS");
    // Everything that can be refused is refused before anything is touched.
    let pool = conf.pool()?;
    let limits = bandwidth::Limits::from_config(conf.runtime_config.bandwidth.as_ref())?;
    let netns = pod::open_netns(netns_path)?;

    let mut host_nl = host_netlink()?;
    let (dp, outcome) = Datapath::open_or_load(&conf.bpffs_root)
        .map_err(|e| datapath_error("cannot load the eBPF datapath", &e))?;
    mark(&format!(
        "datapath {outcome:?} {}",
        dp.version_dir().display()
    ));
    if outcome == ferrite_datapath::LoadOutcome::Loaded {
        // A new version, or a wiped bpffs: bring running pods along. A
        // failure here must not keep new pods from starting.
        if let Err(e) = crate::repair::run(conf, &dp, &mut host_nl) {
            log::warn!("repair after loading the datapath failed: {e}");
        }
    }
    // A veth of ours that is down, or that no endpoint entry points at, is a
    // retired or half-made one (a DEL whose reaper has not finished, a
    // killed ADD): remove it and whatever map entries point at it; its peer
    // leaves the pod with it. (Rare: only when a veth of our name exists.)
    let host_name = naming::host_veth_name(&env.container_id, &env.ifname);
    let group = naming::host_veth_group(&conf.name);
    let alias = naming::host_veth_alias(&conf.name);
    if let Some(l) = pod::find_host_veth(&mut host_nl, &host_name, group)? {
        let complete = l.up
            && l.alias.as_deref() == Some(alias.as_str())
            && dp
                .endpoints()
                .map_err(|e| datapath_error("cannot read the endpoint map", &e))?
                .iter()
                .any(|(_, ep)| ep.ifindex == l.index);
        if !complete {
            log::info!("removing {} left by an earlier attempt", l.name);
            dp.forget_interface(l.index)
                .map_err(|e| datapath_error("cannot clear a half-made endpoint", &e))?;
            match host_nl.link_del(l.index) {
                Ok(()) => {}
                Err(e) if e.errno() == Some(libc::ENODEV) => {}
                Err(e) => return Err(pod::kernel_error("cannot remove a half-made host veth", &e)),
            }
        }
    }
    let mut pod_nl = Netlink::in_netns(std::os::fd::AsFd::as_fd(&netns))
        .map_err(|e| pod::kernel_error("cannot open netlink in the pod namespace", &e))?;
    // The interface must not exist yet, unless it is ferrite's own from an
    // earlier container of this namespace, waiting for its reaper.
    if let Some(existing) = pod_nl
        .link_get(&env.ifname)
        .map_err(|e| pod::kernel_error("cannot look up the pod interface", &e))?
    {
        reclaim_retired(conf, env, &dp, &mut host_nl, &mut pod_nl, &netns, &existing)?;
    }
    mark("pod namespace open");

    let ips = addresses::allocate(conf, env, pool.as_ref())?;
    mark("addresses allocated");
    crate::failpoint::hit("add-allocated");
    let mut handles = Handles {
        host_nl,
        pod_nl,
        netns,
    };
    let made = setup(conf, env, &dp, &mut handles, &ips, &limits);
    mark("pod set up");
    match made {
        Ok(out) => Ok(out),
        Err(err) => {
            if let Err(undo) = addresses::release(conf, env) {
                log::warn!("rollback: cannot release {ips:?}: {undo}");
            }
            Err(err)
        }
    }
}

/// ADD found `existing` under the pod's interface name. A runtime that
/// reuses a network namespace (podman's disconnect and connect, a new
/// container in a kept sandbox) can ADD right after a DEL, while the
/// reaper is still deleting the old veth: when `existing` is ferrite's own
/// veth of this network, retired (its host side down, no endpoint entry
/// pointing at it), it is removed here. Anything else is refused with 104
/// and left as it is.
fn reclaim_retired(
    conf: &NetConf,
    env: &CniEnv,
    dp: &Datapath,
    host_nl: &mut Netlink,
    pod_nl: &mut Netlink,
    netns: &std::fs::File,
    existing: &crate::netlink::Link,
) -> CniResult<()> {
    let exists = |why: &str| {
        let netns_path = env.netns.as_deref().unwrap_or(Path::new(""));
        CniError::new(
            Code::InterfaceExists,
            format!(
                "interface {} already exists in {}",
                env.ifname,
                netns_path.display()
            ),
        )
        .with_details(why)
    };
    let group = naming::host_veth_group(&conf.name);
    let alias = naming::host_veth_alias(&conf.name);
    let host = match pod::occupant(host_nl, netns, existing, group, &alias)? {
        pod::Occupant::Retired(host) => host,
        pod::Occupant::Foreign(why) => return Err(exists(&why)),
        pod::Occupant::PeerGone => {
            // A reaper unlists both ends of the pair in one step: once the
            // host end is gone, the pod end is gone too, or is about to be.
            return match pod_nl.link_get(&env.ifname) {
                Ok(Some(again)) if again.index == existing.index => {
                    Err(exists("its peer is not in the node's namespace"))
                }
                Ok(None) => Ok(()),
                Ok(Some(_)) => Err(exists("it was replaced while ADD looked at it")),
                Err(e) => Err(pod::kernel_error("cannot look up the pod interface", &e)),
            };
        }
    };
    let live = dp
        .endpoints()
        .map_err(|e| datapath_error("cannot read the endpoint map", &e))?
        .iter()
        .any(|(_, ep)| ep.ifindex == host.index);
    if live {
        return Err(exists("an endpoint entry still points at its peer"));
    }
    log::info!(
        "{} in {} is the retired {} of an earlier container: removing it",
        env.ifname,
        env.netns.as_deref().unwrap_or(Path::new("")).display(),
        host.name
    );
    dp.forget_interface(host.index)
        .map_err(|e| datapath_error("cannot clear a retired endpoint", &e))?;
    match host_nl.link_del(host.index) {
        Ok(()) => {}
        // Its reaper was quicker.
        Err(e) if e.errno() == Some(libc::ENODEV) => {}
        Err(e) => return Err(pod::kernel_error("cannot remove a retired host veth", &e)),
    }
    // The pair goes as one, so the name is free now.
    match pod_nl.link_get(&env.ifname) {
        Ok(None) => Ok(()),
        Ok(Some(_)) => Err(exists("it is still there after its peer was removed")),
        Err(e) => Err(pod::kernel_error("cannot look up the pod interface", &e)),
    }
}

fn setup(
    conf: &NetConf,
    env: &CniEnv,
    dp: &Datapath,
    handles: &mut Handles,
    ips: &[IpAddr],
    limits: &bandwidth::Limits,
) -> CniResult<CniOutput> {
    let Handles {
        host_nl,
        pod_nl,
        netns,
    } = handles;
    let host_name = naming::host_veth_name(&env.container_id, &env.ifname);
    let spec = pod::PodSpec {
        host_name: &host_name,
        ifname: &env.ifname,
        group: naming::host_veth_group(&conf.name),
        alias: &naming::host_veth_alias(&conf.name),
        mtu: conf.mtu,
        ips,
    };
    let link = pod::create(host_nl, pod_nl, netns, &spec)?;
    // With a chained bandwidth plugin, that plugin shapes; ferrite only
    // leaves room for its qdiscs and routes the pod's traffic through them.
    let shaped = if conf.chained_bandwidth {
        Ok(())
    } else {
        bandwidth::apply(limits, host_nl, link.host.index, pod_nl, &env.ifname)
    };
    if let Err(err) = shaped {
        if let Err(undo) = host_nl.link_del(link.host.index) {
            log::warn!("rollback: cannot delete {host_name}: {undo}");
        }
        return Err(err);
    }
    let endpoint = Endpoint {
        ifindex: link.host.index,
        flags: limits.endpoint_flags(conf.chained_bandwidth),
        pod_mac: link.pod_mac,
        host_mac: link.host.mac,
    };
    crate::failpoint::hit("add-configured");
    let wired = dp
        .attach(
            link.host.index,
            if conf.chained_bandwidth {
                AttachMode::Tcx
            } else {
                AttachMode::Clsact
            },
        )
        .map_err(|e| datapath_error("cannot attach the datapath to the host veth", &e))
        .and_then(|()| {
            crate::failpoint::hit("add-attached");
            for ip in ips {
                dp.upsert_endpoint(*ip, &endpoint).map_err(|e| {
                    let full = dp
                        .endpoints()
                        .is_ok_and(|eps| eps.len() >= ferrite_datapath::MAX_ENDPOINTS);
                    if full {
                        datapath_error(
                            &format!(
                                "the endpoint map is full ({} endpoints)",
                                ferrite_datapath::MAX_ENDPOINTS
                            ),
                            &e,
                        )
                    } else {
                        datapath_error("cannot add the endpoint to the map", &e)
                    }
                })?;
            }
            // The map entry is the last step: it makes the pod complete.
            crate::failpoint::hit("add-mapped");
            Ok(())
        });
    if let Err(err) = wired {
        for ip in ips {
            if let Err(undo) = dp.remove_endpoint(*ip, link.host.index) {
                log::warn!("rollback: cannot remove endpoint {ip}: {undo}");
            }
        }
        if let Err(undo) = host_nl.link_del(link.host.index) {
            log::warn!("rollback: cannot delete {host_name}: {undo}");
        }
        return Err(err);
    }

    let netns_path = env.netns.as_ref().map(|p| p.display().to_string());
    let mut out = CniOutput::default();
    out.interfaces.push(Interface {
        name: host_name,
        mac: format_mac(&link.host.mac),
        mtu: Some(conf.mtu),
        sandbox: None,
    });
    out.interfaces.push(Interface {
        name: env.ifname.clone(),
        mac: format_mac(&link.pod_mac),
        mtu: Some(conf.mtu),
        sandbox: netns_path,
    });
    let mut defaults = Vec::new();
    for ip in ips {
        let gw = gateway_for(*ip);
        let len = if ip.is_ipv4() { 32 } else { 128 };
        out.ips.push(IpConfig {
            address: IpNetwork::new(*ip, len).expect("host prefix is valid"),
            gateway: Some(gw),
            interface: Some(1),
        });
        if !defaults.contains(&gw) {
            defaults.push(gw);
            let any = if ip.is_ipv4() { "0.0.0.0/0" } else { "::/0" };
            out.routes.push(RouteEntry {
                dst: any.parse().expect("default route parses"),
                gw: Some(gw),
            });
        }
    }
    log::info!(
        "added {} ips={:?} host={} ifindex={}",
        env.ifname,
        ips,
        out.interfaces[0].name,
        link.host.index
    );
    Ok(out)
}

pub fn del(conf: &NetConf, env: &CniEnv) -> CniResult<()> {
    let mut host_nl = host_netlink()?;
    let host_name = naming::host_veth_name(&env.container_id, &env.ifname);
    // Taking the host veth down cuts the pod off and drops its routes; the
    // veth, its peer and its tc filters go with the reaper below.
    // CNI_NETNS is not needed and may be gone.
    let link = pod::find_host_veth(
        &mut host_nl,
        &host_name,
        naming::host_veth_group(&conf.name),
    )?;
    if let Some(l) = &link {
        pod::retire(&mut host_nl, l)?;
    }
    crate::failpoint::hit("del-retired");

    let ips = match &conf.ipam {
        Ipam::Builtin { .. } => addresses::held(conf, env)?,
        Ipam::Delegated { .. } => prev_result_ips(conf),
    };
    // Map entries go before the address is released, so a released address
    // never still points at the old pod.
    if let Some(dp) = Datapath::open(&conf.bpffs_root)
        .map_err(|e| datapath_error("cannot open the eBPF datapath", &e))?
    {
        for ip in &ips {
            let ifindex = match (&link, dp.endpoint(*ip)) {
                (Some(l), _) => l.index,
                (None, Ok(Some(ep))) => ep.ifindex,
                _ => continue,
            };
            dp.remove_endpoint(*ip, ifindex)
                .map_err(|e| datapath_error("cannot remove the endpoint from the map", &e))?;
        }
        if let (Some(l), true) = (&link, ips.is_empty()) {
            // No address on record (a half-made pod): whatever points at it.
            dp.forget_interface(l.index)
                .map_err(|e| datapath_error("cannot clear the endpoint", &e))?;
        }
    }
    crate::failpoint::hit("del-unmapped");
    let released = addresses::release(conf, env)?;
    crate::failpoint::hit("del-released");
    log::info!(
        "deleted {} (veth {}) released={:?}",
        env.ifname,
        host_name,
        released
    );
    pod::reap(host_nl, link.into_iter().collect());
    Ok(())
}

fn prev_result_ips(conf: &NetConf) -> Vec<IpAddr> {
    conf.prev_result
        .as_ref()
        .and_then(|v| CniOutput::from_json(v).ok())
        .map(|r| r.ips.iter().map(|i| i.address.ip()).collect())
        .unwrap_or_default()
}

fn drift(msg: impl Into<String>) -> CniError {
    CniError::new(Code::Drift, msg)
}

pub fn check(conf: &NetConf, env: &CniEnv) -> CniResult<()> {
    let prev = conf
        .prev_result
        .as_ref()
        .ok_or_else(|| CniError::new(Code::InvalidConfig, "CHECK needs prevResult"))?;
    let prev = CniOutput::from_json(prev)?;
    let pod_if = prev
        .interfaces
        .iter()
        .position(|i| i.name == env.ifname && i.sandbox.is_some())
        .ok_or_else(|| {
            CniError::new(
                Code::InvalidConfig,
                format!("prevResult has no interface {} in a sandbox", env.ifname),
            )
        })?;
    let ips: Vec<IpAddr> = prev
        .ips
        .iter()
        .filter(|i| i.interface.is_none_or(|n| n == pod_if))
        .map(|i| i.address.ip())
        .collect();
    if ips.is_empty() {
        return Err(CniError::new(
            Code::InvalidConfig,
            "prevResult lists no address",
        ));
    }

    // Host side.
    let mut host_nl = host_netlink()?;
    let host_name = naming::host_veth_name(&env.container_id, &env.ifname);
    let host = host_nl
        .link_get(&host_name)
        .map_err(|e| pod::kernel_error("cannot look up the host veth", &e))?
        .ok_or_else(|| drift(format!("host veth {host_name} is missing")))?;
    if host.group != naming::host_veth_group(&conf.name)
        || host.alias.as_deref() != Some(naming::host_veth_alias(&conf.name).as_str())
    {
        return Err(drift(format!(
            "host veth {host_name} is not marked as a complete ferrite pod"
        )));
    }
    if !host.up {
        return Err(drift(format!("host veth {host_name} is down")));
    }
    let host_routes: Vec<_> = [false, true]
        .iter()
        .filter(|v6| ips.iter().any(|ip| ip.is_ipv6() == **v6))
        .map(|v6| host_nl.route_list(*v6))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pod::kernel_error("cannot list host routes", &e))?
        .concat();
    for ip in &ips {
        let len = if ip.is_ipv4() { 32 } else { 128 };
        if !host_routes
            .iter()
            .any(|r| r.destination == Some(*ip) && r.prefix_len == len && r.oif == Some(host.index))
        {
            return Err(drift(format!(
                "host route {ip}/{len} via {host_name} is missing"
            )));
        }
    }

    // Datapath.
    let dp = Datapath::open(&conf.bpffs_root)
        .map_err(|e| datapath_error("cannot open the eBPF datapath", &e))?
        .ok_or_else(|| {
            drift(format!(
                "datapath pins under {} are missing",
                conf.bpffs_root.display()
            ))
        })?;
    let att = dp
        .attachment(host.index)
        .map_err(|e| datapath_error("cannot query tc filters", &e))?;
    if !att.ingress || !att.egress {
        return Err(drift(format!(
            "datapath programs are not attached to {host_name} (ingress: {}, egress: {})",
            att.ingress, att.egress
        )));
    }
    let prev_pod_mac = prev.interfaces[pod_if].mac.to_ascii_lowercase();
    for ip in &ips {
        let ep = dp
            .endpoint(*ip)
            .map_err(|e| datapath_error("cannot read the endpoint map", &e))?
            .ok_or_else(|| drift(format!("endpoint map has no entry for {ip}")))?;
        if ep.ifindex != host.index || ep.host_mac != host.mac {
            return Err(drift(format!(
                "endpoint map entry for {ip} points elsewhere"
            )));
        }
        if !prev_pod_mac.is_empty() && format_mac(&ep.pod_mac) != prev_pod_mac {
            return Err(drift(format!(
                "endpoint map entry for {ip} has another pod MAC"
            )));
        }
    }

    // Pod side.
    let netns_path = env
        .netns
        .as_deref()
        .expect("validated: CHECK has CNI_NETNS");
    let netns = pod::open_netns(netns_path)?;
    let mut pod_nl = Netlink::in_netns(std::os::fd::AsFd::as_fd(&netns))
        .map_err(|e| pod::kernel_error("cannot open netlink in the pod namespace", &e))?;
    let pod_link = pod_nl
        .link_get(&env.ifname)
        .map_err(|e| pod::kernel_error("cannot look up the pod interface", &e))?
        .ok_or_else(|| drift(format!("interface {} is missing in the pod", env.ifname)))?;
    if !prev_pod_mac.is_empty() && format_mac(&pod_link.mac) != prev_pod_mac {
        return Err(drift(format!(
            "{} has MAC {}, prevResult says {prev_pod_mac}",
            env.ifname,
            format_mac(&pod_link.mac)
        )));
    }
    if !pod_link.up {
        return Err(drift(format!("{} is down in the pod", env.ifname)));
    }
    let addrs = pod_nl
        .addr_list(pod_link.index)
        .map_err(|e| pod::kernel_error("cannot list pod addresses", &e))?;
    for ip in &ips {
        if !addrs.iter().any(|(a, _)| a == ip) {
            return Err(drift(format!(
                "address {ip} is missing on {} in the pod",
                env.ifname
            )));
        }
    }
    let neigh = pod_nl
        .neigh_list(pod_link.index)
        .map_err(|e| pod::kernel_error("cannot list pod neighbours", &e))?;
    for ip in &ips {
        let gw = gateway_for(*ip);
        let routes = pod_nl
            .route_list(ip.is_ipv6())
            .map_err(|e| pod::kernel_error("cannot list pod routes", &e))?;
        if !routes
            .iter()
            .any(|r| r.prefix_len == 0 && r.gateway == Some(gw) && r.oif == Some(pod_link.index))
        {
            return Err(drift(format!(
                "default route via {gw} is missing in the pod"
            )));
        }
        if !neigh
            .iter()
            .any(|n| n.destination == gw && n.permanent && n.mac == Some(host.mac))
        {
            return Err(drift(format!(
                "permanent neighbour {gw} is missing in the pod"
            )));
        }
    }

    // Addresses.
    if let Ipam::Builtin { .. } = conf.ipam {
        let held = addresses::held(conf, env)?;
        for ip in &ips {
            if !held.contains(ip) {
                return Err(drift(format!(
                    "IPAM does not record {ip} for this container"
                )));
            }
        }
    }
    Ok(())
}

/// Is `path` on a bpf filesystem, or could ferrite create it inside one?
fn bpffs_usable(path: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let mut p = Some(path);
    while let Some(dir) = p {
        if dir.exists() {
            let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
                return false;
            };
            // SAFETY: statfs fills the struct for a valid path.
            let mut st: libc::statfs = unsafe { std::mem::zeroed() };
            let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
            return rc == 0 && st.f_type as i64 == BPF_FS_MAGIC;
        }
        p = dir.parent();
    }
    false
}

pub fn status(conf: &NetConf) -> CniResult<()> {
    if !bpffs_usable(&conf.bpffs_root) {
        return Err(CniError::new(
            Code::NotAvailable,
            format!("no bpf filesystem at {}", conf.bpffs_root.display()),
        )
        .with_details("mount one: mount -t bpf bpf /sys/fs/bpf"));
    }
    if let Ok(Some(dp)) = Datapath::open(&conf.bpffs_root) {
        let used = dp
            .endpoints()
            .map_err(|e| datapath_error("cannot read the endpoint map", &e))?
            .len();
        if used >= ferrite_datapath::MAX_ENDPOINTS {
            return Err(CniError::new(
                Code::NotAvailable,
                format!("the endpoint map is full ({used} endpoints)"),
            ));
        }
    }
    if let Some(pool) = conf.pool()? {
        let store = addresses::open_store(conf).map_err(|e| {
            CniError::new(Code::NotAvailable, "the IPAM store is not usable").with_details(e)
        })?;
        let state = store.read().map_err(|e| {
            CniError::new(Code::NotAvailable, "the IPAM store cannot be read").with_details(e)
        })?;
        let free = state.free_per_set(&pool);
        if let Some(set) = free.iter().position(|f| *f == 0) {
            return Err(CniError::new(
                Code::NotAvailable,
                format!("range set {set} has no free address"),
            ));
        }
        // An ADD must be able to write the store.
        let probe = conf
            .state_dir
            .join("ipam")
            .join(&conf.name)
            .join(".status-probe");
        std::fs::write(&probe, b"")
            .and_then(|()| std::fs::remove_file(&probe))
            .map_err(|e| {
                CniError::new(
                    Code::NotAvailable,
                    format!(
                        "state directory {} is not writable",
                        conf.state_dir.display()
                    ),
                )
                .with_details(e)
            })?;
    }
    Ok(())
}

pub fn gc(conf: &NetConf) -> CniResult<()> {
    let valid = conf
        .valid_attachments
        .as_ref()
        .ok_or_else(|| CniError::new(Code::InvalidConfig, "GC needs cni.dev/valid-attachments"))?;
    let valid_names: HashSet<String> = valid
        .iter()
        .map(|a| naming::host_veth_name(&a.container_id, &a.ifname))
        .collect();
    let group = naming::host_veth_group(&conf.name);
    let mut host_nl = host_netlink()?;
    let dp = Datapath::open(&conf.bpffs_root)
        .map_err(|e| datapath_error("cannot open the eBPF datapath", &e))?;

    // Veths of this network that no valid attachment owns.
    let links = host_nl
        .link_list()
        .map_err(|e| pod::kernel_error("cannot list links", &e))?;
    let stale: Vec<_> = links
        .into_iter()
        .filter(|l| l.group == group && l.name.starts_with("fer") && !valid_names.contains(&l.name))
        .collect();
    for l in &stale {
        pod::retire(&mut host_nl, l)?;
        if let Some(dp) = &dp {
            dp.forget_interface(l.index)
                .map_err(|e| datapath_error("cannot clear a stale endpoint", &e))?;
        }
    }
    let removed_links = stale.len();

    let Some(pool) = conf.pool()? else {
        log::info!("gc: removed {removed_links} veths (IPAM is delegated)");
        pod::reap(host_nl, stale);
        return Ok(());
    };
    let valid: HashSet<(&str, &str)> = valid
        .iter()
        .map(|a| (a.container_id.as_str(), a.ifname.as_str()))
        .collect();
    let store = addresses::open_store(conf)?;
    let mut locked = store
        .lock()
        .map_err(|e| addresses::store_error(&conf.state_dir, &e))?;
    let released = locked
        .state()
        .retain(|o| valid.contains(&(o.container_id.as_str(), o.ifname.as_str())));
    if let Some(dp) = &dp {
        for (ip, _) in &released {
            if let Some(ep) = dp
                .endpoint(*ip)
                .map_err(|e| datapath_error("cannot read the endpoint map", &e))?
            {
                dp.remove_endpoint(*ip, ep.ifindex)
                    .map_err(|e| datapath_error("cannot remove an endpoint", &e))?;
            }
        }
        // Entries for addresses of this pool that no record holds.
        let entries = dp
            .endpoints()
            .map_err(|e| datapath_error("cannot read the endpoint map", &e))?;
        for (ip, ep) in entries {
            let in_pool = pool
                .sets
                .iter()
                .any(|s| s.0.iter().any(|r| r.subnet.contains(ip)));
            if in_pool && locked.state().owner_of(ip).is_none() {
                dp.remove_endpoint(ip, ep.ifindex)
                    .map_err(|e| datapath_error("cannot remove an endpoint", &e))?;
            }
        }
    }
    locked
        .commit()
        .map_err(|e| addresses::store_error(&conf.state_dir, &e))?;
    log::info!(
        "gc: removed {removed_links} veths, released {} addresses",
        released.len()
    );
    pod::reap(host_nl, stale);
    Ok(())
}
