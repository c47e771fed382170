// SPDX-License-Identifier: Apache-2.0
//! `ferrite-agent uninstall`: removes everything ferrite put on the node,
//! without the API server (the DaemonSet is gone by then).

use std::collections::BTreeSet;
use std::net::IpAddr;

use crate::config::Config;
use crate::fastpath::{remove_all_pins, DatapathPins, FastPath};
use crate::files;
use crate::install;
use crate::masquerade;
use crate::netlink::Netlink;
use crate::nft::NfTables;
use crate::routes::RTPROT_FERRITE_NODES;
use crate::sync::SyncError;

/// What uninstall removed.
#[derive(Debug, Default)]
pub struct UninstallReport {
    pub conflist: bool,
    pub plugin: bool,
    /// Reference plugins the agent had installed (see [`install`]).
    pub companions: Vec<String>,
    pub routes: usize,
    pub masquerade_table: bool,
    /// ferrite's uplink programs taken off the node's links.
    pub detached_programs: usize,
    /// Socket hooks (of the node's root cgroup) whose programs were ferrite's.
    pub host_socket_hooks: usize,
    pub pin_versions: Vec<String>,
    pub errors: Vec<SyncError>,
}

/// Removes everything ferrite put on the node, and nothing else: the
/// conflist first (so kubelet stops using ferrite), the plugin binary (and
/// the reference plugins the agent installed where the node had none), the
/// routes with ferrite's protocol, the masquerade table, the fast path's
/// programs, and the datapath pins. Goes on after a failure and reports
/// every error.
pub fn uninstall(
    cfg: &Config,
    fast_path: &mut dyn FastPath,
    pins: &dyn DatapathPins,
) -> UninstallReport {
    let mut report = UninstallReport::default();
    let conflist = cfg.conflist_path();
    match files::remove_if_present(&conflist)
        .and_then(|r| files::remove_temp_files(&conflist).map(|_| r))
    {
        Ok(removed) => report.conflist = removed,
        Err(e) => report.errors.push(SyncError::Conflist(e)),
    }
    let plugin = cfg.plugin_path();
    match files::remove_if_present(&plugin)
        .and_then(|r| files::remove_temp_files(&plugin).map(|_| r))
    {
        Ok(removed) => report.plugin = removed,
        Err(e) => report.errors.push(SyncError::Plugin(e)),
    }
    match install::remove_companions(cfg) {
        Ok(names) => report.companions = names,
        Err(e) => report.errors.push(SyncError::Plugin(e)),
    }
    match Netlink::new() {
        Ok(mut nl) => {
            match nl.routes() {
                Ok(routes) => {
                    for r in routes.iter().filter(|r| r.protocol == RTPROT_FERRITE_NODES) {
                        match nl.route_delete(r) {
                            Ok(()) => report.routes += 1,
                            Err(e) => report.errors.push(SyncError::Routes(e)),
                        }
                    }
                }
                Err(e) => report.errors.push(SyncError::Routes(e)),
            }
            // The uplink is the link with the node's InternalIP; without the
            // API, every link with a global address is a candidate (detach
            // touches only ferrite's programs).
            match nl.addresses() {
                Ok(addrs) => {
                    let links: BTreeSet<u32> = addrs
                        .iter()
                        .filter(|a| is_global(a.address))
                        .map(|a| a.ifindex)
                        .collect();
                    for ifindex in links {
                        match fast_path.detach_uplink(ifindex) {
                            Ok(n) => report.detached_programs += n,
                            Err(e) => report.errors.push(SyncError::FastPath(e)),
                        }
                    }
                }
                Err(e) => report.errors.push(SyncError::Routes(e)),
            }
        }
        Err(e) => report.errors.push(SyncError::Routes(e)),
    }
    match NfTables::new().and_then(|mut nft| {
        let existed = nft.table_exists(masquerade::TABLE)?;
        let mut batch = nft.batch();
        masquerade::remove(&mut batch);
        nft.commit(batch).map(|()| existed)
    }) {
        Ok(existed) => report.masquerade_table = existed,
        Err(e) => report.errors.push(SyncError::Masquerade(e)),
    }
    match pins.detach_host_sockets() {
        Ok(n) => report.host_socket_hooks = n,
        Err(e) => report.errors.push(SyncError::Pins(e)),
    }
    match remove_all_pins(pins, &cfg.bpffs_root) {
        Ok(versions) => report.pin_versions = versions,
        Err(e) => report.errors.push(SyncError::Pins(e)),
    }
    report
}

fn is_global(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local() && !v4.is_unspecified(),
        IpAddr::V6(v6) => {
            !v6.is_loopback() && !v6.is_unspecified() && (v6.segments()[0] & 0xffc0) != 0xfe80
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_addresses() {
        assert!(is_global("192.0.2.1".parse().unwrap()));
        assert!(is_global("2001:db8::1".parse().unwrap()));
        assert!(!is_global("127.0.0.1".parse().unwrap()));
        assert!(!is_global("169.254.1.1".parse().unwrap()));
        assert!(!is_global("fe80::1".parse().unwrap()));
        assert!(!is_global("::1".parse().unwrap()));
    }
}
