// SPDX-License-Identifier: Apache-2.0
//! GC: releases every attachment not in `cni.dev/valid-attachments`.

use std::collections::HashSet;

use ferrite_datapath::Datapath;

use super::{datapath_error, host_netlink};
use crate::addresses;
use crate::config::NetConf;
use crate::error::{CniError, CniResult, Code};
use crate::hostport;
use crate::naming::{self};
use crate::veth;

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
        .map_err(|e| veth::kernel_error("cannot list links", &e))?;
    let stale: Vec<_> = links
        .into_iter()
        .filter(|l| l.group == group && l.name.starts_with("fer") && !valid_names.contains(&l.name))
        .collect();
    for l in &stale {
        veth::retire(&mut host_nl, l)?;
        if let Some(dp) = &dp {
            dp.forget_interface(l.index)
                .map_err(|e| datapath_error("cannot clear a stale endpoint", &e))?;
        }
    }
    let removed_links = stale.len();

    let Some(pool) = conf.pool()? else {
        log::info!("gc: removed {removed_links} veths (IPAM is delegated)");
        veth::reap(host_nl, stale);
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
        let in_pool = |ip| {
            pool.sets
                .iter()
                .any(|s| s.0.iter().any(|r| r.subnet.contains(ip)))
        };
        let entries = dp
            .endpoints()
            .map_err(|e| datapath_error("cannot read the endpoint map", &e))?;
        for (ip, ep) in entries {
            if in_pool(ip) && locked.state().owner_of(ip).is_none() {
                dp.remove_endpoint(ip, ep.ifindex)
                    .map_err(|e| datapath_error("cannot remove an endpoint", &e))?;
            }
        }
        // hostPorts to such addresses (a DEL that never came).
        if conf.host_ports {
            let orphans: Vec<_> = dp
                .host_ports()
                .map_err(|e| datapath_error("cannot read the hostPorts", &e))?
                .into_iter()
                .map(|(hp, _)| hp)
                .filter(|hp| in_pool(hp.backend) && locked.state().owner_of(hp.backend).is_none())
                .collect();
            hostport::remove(dp, &orphans)?;
        }
    }
    locked
        .commit()
        .map_err(|e| addresses::store_error(&conf.state_dir, &e))?;
    log::info!(
        "gc: removed {removed_links} veths, released {} addresses",
        released.len()
    );
    veth::reap(host_nl, stale);
    Ok(())
}
