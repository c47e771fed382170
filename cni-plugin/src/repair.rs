//! Bringing running pods onto the datapath this binary pinned.
//!
//! Two things leave pods on programs and maps that are no longer pinned
//! where ferrite looks: a new ferrite whose programs differ (a new version
//! directory), and a bpffs wiped or remounted under running pods. Old
//! programs stay attached and keep working among themselves, but they do not
//! know pods added since, and new pods' programs do not know them. So when
//! an ADD (or `ferrite repair`) finds it had to load the datapath, every pod
//! of its network whose veth still exists is re-attached to the new programs
//! (the filter is replaced in place) and written into the new endpoint map,
//! from the IPAM store and the kernel's own view of the veth. Then the pins
//! of versions no veth runs any more are removed.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ferrite_datapath::{
    AttachMode, Datapath, Endpoint, ENDPOINT_F_HOSTPORT, ENDPOINT_F_SHAPED, ENDPOINT_F_VIA_STACK,
};

use crate::addresses;
use crate::config::NetConf;
use crate::error::{CniError, CniResult, Code};
use crate::naming;
use crate::netlink::Netlink;
use crate::veth;

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Pods re-attached and re-entered in the map.
    pub restored: usize,
    /// Addresses on record whose veth is gone or incomplete.
    pub skipped: usize,
    /// Old version directories removed.
    pub pruned: Vec<String>,
}

fn dp_err(msg: &str, e: &ferrite_datapath::DatapathError) -> CniError {
    CniError::from_error(Code::Datapath, msg, e)
}

/// Re-attaches and re-enters every pod of this network that still has its veth.
pub fn restore(conf: &NetConf, dp: &Datapath, nl: &mut Netlink) -> CniResult<Report> {
    let mut report = Report::default();
    let Some(_) = conf.pool()? else {
        // A delegated IPAM keeps its own records; nothing to restore from.
        return Ok(report);
    };
    let state = addresses::open_store(conf)?
        .read()
        .map_err(|e| addresses::store_error(&conf.state_dir, &e))?;
    let mut pods: BTreeMap<(String, String), Vec<IpAddr>> = BTreeMap::new();
    for (ip, owner) in state.records() {
        pods.entry((owner.container_id.clone(), owner.ifname.clone()))
            .or_default()
            .push(*ip);
    }
    let group = naming::host_veth_group(&conf.name);
    let alias = naming::host_veth_alias(&conf.name);
    let host_port_pods: std::collections::HashSet<IpAddr> = if conf.host_ports {
        dp.host_ports()
            .map_err(|e| dp_err("cannot read the hostPorts", &e))?
            .into_iter()
            .map(|(hp, _)| hp.backend)
            .collect()
    } else {
        Default::default()
    };
    let mut found = Vec::new();
    for ((cid, ifname), ips) in pods {
        let name = naming::host_veth_name(&cid, &ifname);
        let link = match veth::find_host_veth(nl, &name, group)? {
            Some(l) if l.up && l.alias.as_deref() == Some(alias.as_str()) => l,
            _ => {
                report.skipped += ips.len();
                continue;
            }
        };
        // The pod's MAC is in the permanent neighbour entry ADD made.
        let neigh = nl
            .neigh_list(link.index)
            .map_err(|e| veth::kernel_error("cannot list the host veth's neighbours", &e))?;
        let Some(pod_mac) = neigh
            .iter()
            .find(|n| ips.contains(&n.destination) && n.permanent)
            .and_then(|n| n.mac)
        else {
            report.skipped += ips.len();
            continue;
        };
        // Shaping, ferrite's or a chained plugin's, is in the qdiscs.
        let qdiscs = nl
            .qdiscs(link.index)
            .map_err(|e| veth::kernel_error("cannot read the host veth's qdiscs", &e))?;
        let mut flags = 0;
        if qdiscs.iter().any(|(root, kind)| *root && kind == "tbf") {
            flags |= ENDPOINT_F_SHAPED;
        }
        if qdiscs.iter().any(|(_, kind)| kind == "ingress") {
            flags |= ENDPOINT_F_VIA_STACK;
        }
        // hostPorts are in the maps every version shares.
        if ips.iter().any(|ip| host_port_pods.contains(ip)) {
            flags |= ENDPOINT_F_HOSTPORT;
        }
        // A veth keeps the attach mode it was made with.
        let mode = Datapath::attach_mode_of(link.index)
            .map_err(|e| dp_err("cannot query the host veth's programs", &e))?
            .unwrap_or(if conf.chained_bandwidth {
                AttachMode::Tcx
            } else {
                AttachMode::Clsact
            });
        found.push((
            ips,
            mode,
            Endpoint {
                ifindex: link.index,
                flags,
                pod_mac,
                host_mac: link.mac,
            },
        ));
    }
    // Every endpoint into the map first, then the programs that read it:
    // a pod moved early must already find the ones moved late.
    for (ips, _, ep) in &found {
        for ip in ips {
            dp.upsert_endpoint(*ip, ep)
                .map_err(|e| dp_err("cannot restore an endpoint", &e))?;
        }
    }
    for (_, mode, ep) in &found {
        dp.attach(ep.ifindex, *mode)
            .map_err(|e| dp_err("cannot re-attach the datapath", &e))?;
        report.restored += 1;
    }
    Ok(report)
}

/// Removes the pins of every other datapath version that no ferrite veth
/// on this node runs any more.
pub fn prune(conf: &NetConf, dp: &Datapath, nl: &mut Netlink) -> CniResult<Vec<String>> {
    let versions = Datapath::pinned_versions(&conf.bpffs_root)
        .map_err(|e| dp_err("cannot list datapath versions", &e))?;
    let ours = dp
        .version_dir()
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("");
    let others: Vec<String> = versions.into_iter().filter(|v| v != ours).collect();
    if others.is_empty() {
        return Ok(Vec::new());
    }
    let mut in_use = Vec::new();
    let links = nl
        .link_list()
        .map_err(|e| veth::kernel_error("cannot list links", &e))?;
    for l in links.iter().filter(|l| l.name.starts_with("fer")) {
        in_use.extend(
            Datapath::attached_program_ids(l.index)
                .map_err(|e| dp_err("cannot query tc filters", &e))?,
        );
    }
    let mut pruned = Vec::new();
    for v in others {
        let ids = Datapath::version_program_ids(&conf.bpffs_root, &v)
            .map_err(|e| dp_err("cannot read an old version's programs", &e))?;
        if ids.iter().any(|id| in_use.contains(id)) {
            continue;
        }
        Datapath::remove_version(&conf.bpffs_root, &v)
            .map_err(|e| dp_err("cannot remove an old version's pins", &e))?;
        pruned.push(v);
    }
    Ok(pruned)
}

/// Restore, then prune: what a freshly loaded datapath does first.
pub fn run(conf: &NetConf, dp: &Datapath, nl: &mut Netlink) -> CniResult<Report> {
    let mut report = restore(conf, dp, nl)?;
    report.pruned = prune(conf, dp, nl)?;
    log::info!(
        "repair: {} pods restored onto datapath {}, {} addresses without a live veth, old versions removed: {:?}",
        report.restored,
        dp.version_dir().display(),
        report.skipped,
        report.pruned
    );
    Ok(report)
}
