// SPDX-License-Identifier: Apache-2.0
//! CHECK: reads what ADD made and reports drift; changes nothing.

use std::net::IpAddr;

use ferrite_datapath::Datapath;

use super::{datapath_error, host_netlink};
use crate::addresses;
use crate::config::{CniEnv, Ipam, NetConf};
use crate::error::{CniError, CniResult, Code};
use crate::naming::{self, format_mac, gateway_for};
use crate::netlink::Netlink;
use crate::result::CniOutput;
use crate::veth;

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
        .map_err(|e| veth::kernel_error("cannot look up the host veth", &e))?
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
        .map_err(|e| veth::kernel_error("cannot list host routes", &e))?
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
    let netns = veth::open_netns(netns_path)?;
    let mut pod_nl = Netlink::in_netns(std::os::fd::AsFd::as_fd(&netns))
        .map_err(|e| veth::kernel_error("cannot open netlink in the pod namespace", &e))?;
    let pod_link = pod_nl
        .link_get(&env.ifname)
        .map_err(|e| veth::kernel_error("cannot look up the pod interface", &e))?
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
        .map_err(|e| veth::kernel_error("cannot list pod addresses", &e))?;
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
        .map_err(|e| veth::kernel_error("cannot list pod neighbours", &e))?;
    for ip in &ips {
        let gw = gateway_for(*ip);
        let routes = pod_nl
            .route_list(ip.is_ipv6())
            .map_err(|e| veth::kernel_error("cannot list pod routes", &e))?;
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
