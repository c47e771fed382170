// SPDX-License-Identifier: Apache-2.0
//! `ferrite services`: each Service frontend as the pinned maps hold it
//! (the agent writes them; this only reads): its backends in slot order,
//! the terminating ones, affinity, and its counters; then the pods'
//! hostPorts (ADD writes them).

use std::collections::BTreeMap;
use std::io::Write;
use std::net::IpAddr;

use ferrite_datapath::service::{Backend, Frontend};
use ferrite_datapath::Datapath;

pub(crate) fn proto(p: u8) -> String {
    match p {
        6 => "tcp".into(),
        17 => "udp".into(),
        132 => "sctp".into(),
        n => n.to_string(),
    }
}

pub(crate) fn socket(addr: IpAddr, port: u16) -> String {
    match addr {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

fn frontend(fe: &Frontend) -> String {
    if fe.addr.is_unspecified() {
        // A NodePort: every address of the node, of one family.
        let family = if fe.addr.is_ipv4() { "IPv4" } else { "IPv6" };
        return format!("NodePort {}/{} ({family})", fe.port, proto(fe.proto));
    }
    format!("{}/{}", socket(fe.addr, fe.port), proto(fe.proto))
}

/// Writes every frontend with its backends and counters, then how many
/// flows have a backend remembered.
pub fn write(dp: &Datapath, out: &mut dyn Write) -> anyhow::Result<()> {
    let maps = dp.service_maps()?;
    let backends: BTreeMap<u32, Backend> = maps.backends()?.into_iter().collect();
    let frontends = maps.frontends()?;
    for (fe, st) in &frontends {
        let mut affinity = st
            .affinity_timeout
            .map_or("none".to_string(), |t| format!("ClientIP {t} s"));
        if st.source_nat {
            affinity.push_str(", other nodes' backends from this node's address");
        }
        let stats = maps.stats(st.id)?.unwrap_or_default();
        writeln!(
            out,
            "{} id {}: {} backends, affinity {affinity}; {} packets, {} bytes, {} flows, {} rejected",
            frontend(fe),
            st.id,
            st.backends.len(),
            stats.packets,
            stats.bytes,
            stats.flows,
            stats.rejected
        )?;
        if st.backends.is_empty() {
            writeln!(out, "  no backend: answered \"port unreachable\"")?;
        }
        for (slot, id) in st.backends.iter().enumerate() {
            match backends.get(id) {
                Some(b) => writeln!(out, "  {} {}", slot + 1, socket(b.addr, b.port))?,
                None => writeln!(out, "  {} backend {id} (missing from the maps)", slot + 1)?,
            }
        }
        for b in backends
            .values()
            .filter(|b| b.frontend == st.id && b.terminating)
        {
            writeln!(out, "  - {} terminating", socket(b.addr, b.port))?;
        }
    }
    let host_ports = maps.host_ports()?;
    for (hp, id) in &host_ports {
        let stats = maps.stats(*id)?.unwrap_or_default();
        writeln!(out, "HostPort {}", crate::hostport::describe(hp))?;
        writeln!(
            out,
            "  {} packets, {} bytes, {} flows",
            stats.packets, stats.bytes, stats.flows
        )?;
    }
    writeln!(
        out,
        "{} frontends, {} backends, {} flows with a backend; NodePorts {}; hostPorts {}; the node's own sockets {}",
        frontends.len(),
        backends.len(),
        maps.flows()?,
        if maps.nodeports()? {
            "served (no kube-proxy)"
        } else {
            "left to kube-proxy"
        },
        if maps.hostports()? {
            format!("served ({})", host_ports.len())
        } else {
            "left to portmap".to_string()
        },
        if Datapath::host_sockets_attached(dp.bpffs_root()) {
            "served (cgroup hooks)"
        } else {
            "left to kube-proxy"
        }
    )?;
    Ok(())
}
