// SPDX-License-Identifier: Apache-2.0
//! DEL: takes the pod off the network; succeeds whatever is already gone.

use ferrite_datapath::Datapath;

use super::{datapath_error, host_netlink, prev_result_ips};
use crate::addresses;
use crate::config::{CniEnv, Ipam, NetConf};
use crate::error::CniResult;
use crate::hostport;
use crate::naming::{self};
use crate::veth;

pub fn del(conf: &NetConf, env: &CniEnv) -> CniResult<()> {
    let mut host_nl = host_netlink()?;
    let host_name = naming::host_veth_name(&env.container_id, &env.ifname);
    // Taking the host veth down cuts the pod off and drops its routes; the
    // veth, its peer and its tc filters go with the reaper below.
    // CNI_NETNS is not needed and may be gone.
    let link = veth::find_host_veth(
        &mut host_nl,
        &host_name,
        naming::host_veth_group(&conf.name),
    )?;
    if let Some(l) = &link {
        veth::retire(&mut host_nl, l)?;
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
        // Its hostPorts first, where they still point at this pod. Mappings
        // the runtime sends that cannot be read were never written.
        let mappings = hostport::mappings(conf).unwrap_or_default();
        hostport::remove(&dp, &hostport::host_ports(&mappings, &ips))?;
        let mut veths: std::collections::BTreeSet<u32> = link.iter().map(|l| l.index).collect();
        for ip in &ips {
            let ifindex = match (&link, dp.endpoint(*ip)) {
                (Some(l), _) => l.index,
                (None, Ok(Some(ep))) => ep.ifindex,
                _ => continue,
            };
            dp.remove_endpoint(*ip, ifindex)
                .map_err(|e| datapath_error("cannot remove the endpoint from the map", &e))?;
            veths.insert(ifindex);
        }
        // Once per veth, however many addresses it had.
        for ifindex in veths {
            dp.forget_endpoint_policy(ifindex)
                .map_err(|e| datapath_error("cannot remove the endpoint's policy", &e))?;
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
    veth::reap(host_nl, link.into_iter().collect());
    Ok(())
}
