// SPDX-License-Identifier: Apache-2.0
//! ADD: the pod's veth pair, addresses, routes, qdiscs, programs and
//! endpoint entry, each undone if a later step fails.

use std::net::IpAddr;
use std::path::Path;

use ferrite_datapath::policy::PolicyStart;
use ferrite_datapath::{AttachMode, Datapath, Endpoint};
use ipnetwork::IpNetwork;

use super::{datapath_error, host_netlink};
use crate::addresses;
use crate::bandwidth;
use crate::config::{CniEnv, NetConf};
use crate::error::{CniError, CniResult, Code};
use crate::hostport;
use crate::naming::{self, format_mac, gateway_for};
use crate::netlink::Netlink;
use crate::result::{CniOutput, Interface, IpConfig, RouteEntry};
use crate::veth;

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
    let mappings = hostport::mappings(conf)?;
    let netns = veth::open_netns(netns_path)?;

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
    let mut pod_nl = Netlink::in_netns(std::os::fd::AsFd::as_fd(&netns))
        .map_err(|e| veth::kernel_error("cannot open netlink in the pod namespace", &e))?;
    mark("pod namespace open");

    // The pair is made first, before any look-up: each request that needs
    // the kernel's RTNL lock waits behind every other one on a busy node
    // (100 pods at once through kubelet: up to a second each). Only when a
    // name is taken does ADD look at who holds it.
    let host_name = naming::host_veth_name(&env.container_id, &env.ifname);
    let alias = naming::host_veth_alias(&conf.name);
    let spec = veth::PodSpec {
        host_name: &host_name,
        ifname: &env.ifname,
        group: naming::host_veth_group(&conf.name),
        alias: &alias,
        mtu: conf.mtu,
        gso_ipv4_max: conf.big_tcp.then_some(crate::config::BIG_TCP_SIZE),
    };
    let link = match veth::try_make_pair(&mut host_nl, &netns, &spec)? {
        Some(link) => link,
        None => {
            clear_name_holders(conf, env, &spec, &dp, &mut host_nl, &mut pod_nl, &netns)?;
            veth::make_pair(&mut host_nl, &netns, &spec)?
        }
    };
    // Refusals (a full pool) come after the pair exists: it goes again.
    let ips = match addresses::allocate(conf, env, pool.as_ref()) {
        Ok(ips) => ips,
        Err(err) => {
            veth::undo_pair(&mut host_nl, &link);
            return Err(err);
        }
    };
    mark("addresses allocated");
    crate::failpoint::hit("add-allocated");
    let mut handles = Handles {
        host_nl,
        pod_nl,
        netns,
    };
    let wants = Wants {
        limits: &limits,
        mappings: &mappings,
    };
    let made = setup(conf, env, &dp, &mut handles, &spec, &link, &ips, &wants);
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

/// The pair's creation found a name taken: the host veth's (in the node)
/// or `CNI_IFNAME` (in the pod). A veth of ours that is down, or that no
/// endpoint entry points at, is a retired or half-made one (a DEL whose
/// reaper has not finished, a killed ADD): it goes with whatever map
/// entries point at it, and its peer leaves the pod with it. An interface
/// in the pod that is not such a leftover is refused (104) and left alone.
fn clear_name_holders(
    conf: &NetConf,
    env: &CniEnv,
    spec: &veth::PodSpec<'_>,
    dp: &Datapath,
    host_nl: &mut Netlink,
    pod_nl: &mut Netlink,
    netns: &std::fs::File,
) -> CniResult<()> {
    if let Some(l) = veth::find_host_veth(host_nl, spec.host_name, spec.group)? {
        let complete = l.up
            && l.alias.as_deref() == Some(spec.alias)
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
                Err(e) => {
                    return Err(veth::kernel_error(
                        "cannot remove a half-made host veth",
                        &e,
                    ))
                }
            }
        }
    }
    // The interface must not exist, unless it is ferrite's own from an
    // earlier container of this namespace, waiting for its reaper.
    if let Some(existing) = pod_nl
        .link_get(&env.ifname)
        .map_err(|e| veth::kernel_error("cannot look up the pod interface", &e))?
    {
        reclaim_retired(conf, env, dp, host_nl, pod_nl, netns, &existing)?;
    }
    Ok(())
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
    let host = match veth::occupant(host_nl, netns, existing, group, &alias)? {
        veth::Occupant::Retired(host) => host,
        veth::Occupant::Foreign(why) => return Err(exists(&why)),
        veth::Occupant::PeerGone => {
            // A reaper unlists both ends of the pair in one step: once the
            // host end is gone, the pod end is gone too, or is about to be.
            return match pod_nl.link_get(&env.ifname) {
                Ok(Some(again)) if again.index == existing.index => {
                    Err(exists("its peer is not in the node's namespace"))
                }
                Ok(None) => Ok(()),
                Ok(Some(_)) => Err(exists("it was replaced while ADD looked at it")),
                Err(e) => Err(veth::kernel_error("cannot look up the pod interface", &e)),
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
        Err(e) => return Err(veth::kernel_error("cannot remove a retired host veth", &e)),
    }
    // The pair goes as one, so the name is free now.
    match pod_nl.link_get(&env.ifname) {
        Ok(None) => Ok(()),
        Ok(Some(_)) => Err(exists("it is still there after its peer was removed")),
        Err(e) => Err(veth::kernel_error("cannot look up the pod interface", &e)),
    }
}

/// What the runtime asked for beside the pod's network itself.
struct Wants<'a> {
    limits: &'a bandwidth::Limits,
    mappings: &'a [hostport::Mapping],
}

#[allow(clippy::too_many_arguments)]
fn setup(
    conf: &NetConf,
    env: &CniEnv,
    dp: &Datapath,
    handles: &mut Handles,
    spec: &veth::PodSpec<'_>,
    link: &veth::PodLink,
    ips: &[IpAddr],
    wants: &Wants<'_>,
) -> CniResult<CniOutput> {
    let limits = wants.limits;
    let host_ports = hostport::host_ports(wants.mappings, ips);
    let Handles {
        host_nl,
        pod_nl,
        netns,
    } = handles;
    let host_name = spec.host_name.to_string();
    // Clsact's qdisc and filters ride in the host veth's datagram; TCX
    // (beside a chained bandwidth plugin) attaches by bpf(2) below.
    let attach = if conf.chained_bandwidth {
        Vec::new()
    } else {
        dp.attach_requests(link.host.index).into()
    };
    veth::configure_pair(host_nl, pod_nl, netns, link, spec, ips, attach)?;
    log::debug!("pod interface configured");
    // With a chained bandwidth plugin, that plugin shapes; ferrite only
    // leaves room for its qdiscs and routes the pod's traffic through them.
    let shaped = if conf.chained_bandwidth {
        Ok(())
    } else {
        bandwidth::apply(limits, host_nl, link.host.index, pod_nl, &env.ifname)
    };
    if let Err(err) = shaped {
        veth::undo_pair(host_nl, link);
        return Err(err);
    }
    let mut flags = limits.endpoint_flags(conf.chained_bandwidth);
    if !host_ports.is_empty() {
        flags |= ferrite_datapath::ENDPOINT_F_HOSTPORT;
    }
    let endpoint = Endpoint {
        ifindex: link.host.index,
        flags,
        pod_mac: link.pod_mac,
        host_mac: link.host.mac,
    };
    crate::failpoint::hit("add-configured");
    let tcx = if conf.chained_bandwidth {
        dp.attach(link.host.index, AttachMode::Tcx)
            .inspect(|()| log::debug!("programs attached"))
    } else {
        Ok(())
    };
    let wired = tcx
        .map_err(|e| datapath_error("cannot attach the datapath to the host veth", &e))
        .and_then(|()| {
            crate::failpoint::hit("add-attached");
            // Before the endpoint is visible: in a namespace with policies
            // it starts closed, and stays so until the agent programs it.
            let start = dp
                .start_endpoint_policy(link.host.index, env.args.pod())
                .map_err(|e| datapath_error("cannot set the endpoint's policy", &e))?;
            match start {
                PolicyStart::Open => {}
                PolicyStart::Programmed => {
                    log::debug!("{host_name}: policy in place from the agent's computed rules");
                    wake_agent(&conf.state_dir, link.host.index, monotonic_ns(), false);
                }
                PolicyStart::Pending => {
                    log::info!("{host_name}: policy pending until the agent programs it");
                    // Now, not at the end: the agent reads the pod from
                    // ADD's record and programs it while ADD finishes.
                    wake_agent(&conf.state_dir, link.host.index, monotonic_ns(), true);
                }
            }
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
            // Its hostPorts, once it can be reached.
            hostport::add(dp, &host_ports)
        });
    if let Err(err) = wired {
        if let Err(undo) = hostport::remove(dp, &host_ports) {
            log::warn!("rollback: cannot remove the pod's hostPorts: {undo}");
        }
        for ip in ips {
            if let Err(undo) = dp.remove_endpoint(*ip, link.host.index) {
                log::warn!("rollback: cannot remove endpoint {ip}: {undo}");
            }
        }
        if let Err(undo) = dp.forget_endpoint_policy(link.host.index) {
            log::warn!("rollback: cannot clear the endpoint's policy: {undo}");
        }
        veth::undo_pair(host_nl, link);
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

/// The agent's socket in the state directory: ADD sends it a pending
/// endpoint's ifindex so that it programs the endpoint at once.
pub const AGENT_SOCKET: &str = "agent.sock";

/// CLOCK_MONOTONIC in nanoseconds (the agent reads the same clock).
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// How long ADD waits for room in the agent's queue: a burst of ADDs can
/// fill it (net.unix.max_dgram_qlen, 10 by default) while the agent waits
/// for a CPU.
const REPORT_WAIT: std::time::Duration = std::time::Duration::from_millis(10);

/// Tells the agent, if it listens, of an endpoint in a namespace with
/// policies: waiting for its policy, or started with the one it computed.
/// Best effort, waiting REPORT_WAIT at most: the agent also finds the
/// endpoint on its own, at its next sync.
fn wake_agent(state_dir: &Path, ifindex: u32, since: u64, pending: bool) {
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    if sock.set_write_timeout(Some(REPORT_WAIT)).is_ok() {
        // The host veth, when its policy was set, and whether it waits:
        // the agent measures the time from then to the endpoint programmed.
        let mut report = [0u8; 16];
        report[..4].copy_from_slice(&ifindex.to_ne_bytes());
        report[4..12].copy_from_slice(&since.to_ne_bytes());
        report[12..].copy_from_slice(&u32::from(pending).to_ne_bytes());
        if let Err(e) = sock.send_to(&report, state_dir.join(AGENT_SOCKET)) {
            log::info!("agent not told of ifindex {ifindex}: {e}");
        }
    }
}
