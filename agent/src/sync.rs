// SPDX-License-Identifier: Apache-2.0
//! The agent's work on the node, driven by complete lists of Nodes: the
//! first time its own Node has pod CIDRs it loads the datapath, installs the
//! plugin, builds the masquerade table, syncs routes and finally writes the
//! conflist; every later list re-checks all of it and changes only what
//! differs. Runs on one thread with blocking netlink sockets, so the tests
//! can run it inside a network namespace without an API server.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferrite_datapath::{Datapath, DatapathError, LoadOutcome};
use ipnetwork::IpNetwork;

use crate::config::Config;
use crate::conflist::{self, ConflistParams};
use crate::fastpath::{FastPath, FastPathError};
use crate::files::{self, FileError};
use crate::install;
use crate::masquerade::{self, Family, MasqueradeSpec};
use crate::metrics::AgentState;
use crate::netlink::{LinkAddress, Netlink, NetlinkError};
use crate::nft::{NfTables, NftError};
use crate::node::{desired_routes, node_ips, NodeInfo};
use crate::routes::{plan, RTPROT_FERRITE_NODES};

/// A complete view of the cluster's Nodes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub nodes: Vec<NodeInfo>,
    /// Made from a fresh list (start, 410 Gone, an API server restart):
    /// worth a full resync.
    pub relisted: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("loading the datapath under {root}: {source}")]
    Datapath {
        root: PathBuf,
        #[source]
        source: DatapathError,
    },
    #[error("installing the plugin: {0}")]
    Plugin(#[source] FileError),
    #[error("writing the conflist: {0}")]
    Conflist(#[source] FileError),
    #[error("masquerade: {0}")]
    Masquerade(#[source] NftError),
    #[error("routes: {0}")]
    Routes(#[source] NetlinkError),
    #[error("fast path: {0}")]
    FastPath(#[source] FastPathError),
    #[error("removing the datapath pins: {0}")]
    Pins(#[source] DatapathError),
}

/// What one sync did.
#[derive(Debug, Default)]
pub struct SyncReport {
    /// Set when the agent is still waiting for its Node (and why).
    pub waiting: Option<String>,
    pub routes_replaced: usize,
    pub routes_deleted: usize,
    pub routes_programmed: usize,
    pub wrote_conflist: bool,
    pub installed_plugin: bool,
    pub warnings: Vec<String>,
    pub errors: Vec<SyncError>,
}

/// This node as bootstrap found it.
struct Local {
    pod_cidrs: Vec<IpNetwork>,
    /// The fast path is as configured; if not, full resyncs try again.
    fast_path_done: bool,
}

/// The node agent's state on the node.
pub struct NodeAgent {
    cfg: Config,
    state: Arc<AgentState>,
    fast_path: Box<dyn FastPath>,
    netlink: Option<Netlink>,
    nft: Option<NfTables>,
    datapath: Option<Arc<Datapath>>,
    /// This process loaded the datapath (rather than finding it pinned) and
    /// has not yet moved running pods onto it.
    repair_pending: bool,
    local: Option<Local>,
    /// What the masquerade table holds, once this process built it.
    masquerade: Option<MasqueradeSpec>,
    masquerade_removed: bool,
}

impl NodeAgent {
    pub fn new(cfg: Config, state: Arc<AgentState>, fast_path: Box<dyn FastPath>) -> Self {
        Self {
            cfg,
            state,
            fast_path,
            netlink: None,
            nft: None,
            datapath: None,
            repair_pending: false,
            local: None,
            masquerade: None,
            masquerade_removed: false,
        }
    }

    fn netlink(&mut self) -> Result<&mut Netlink, NetlinkError> {
        if self.netlink.is_none() {
            self.netlink = Some(Netlink::new()?);
        }
        Ok(self.netlink.as_mut().expect("just set"))
    }

    fn nft(&mut self) -> Result<&mut NfTables, NftError> {
        if self.nft.is_none() {
            self.nft = Some(NfTables::new()?);
        }
        Ok(self.nft.as_mut().expect("just set"))
    }

    /// One pass over everything. `full` also re-checks what only changes
    /// behind the agent's back (a deleted nftables table).
    pub fn sync(&mut self, snap: &Snapshot, full: bool) -> SyncReport {
        let mut report = SyncReport::default();
        let name = self.cfg.node_name.clone().unwrap_or_default();
        let Some(me) = snap.nodes.iter().find(|n| n.name == name) else {
            report.waiting = Some(format!("Node {name} is not in the API yet"));
            return report;
        };
        if me.pod_cidrs.is_empty() {
            report.waiting = Some(format!(
                "Node {name} has no podCIDRs yet (is the controller manager allocating them?)"
            ));
            return report;
        }
        let me = me.clone();

        // Without the datapath and the plugin a pod cannot start: nothing
        // else is worth doing, and the conflist must not be written.
        if let Err(e) = self.ensure_datapath() {
            report.errors.push(e);
            return report;
        }
        // The plugin is a few MB: compared at start and on full resyncs only.
        if self.local.is_none() || full {
            match self.install_plugin() {
                Ok(wrote) => report.installed_plugin = wrote,
                Err(e) => {
                    report.errors.push(e);
                    return report;
                }
            }
        }
        if self.repair_pending {
            self.repair_running_pods(&mut report);
        }
        if let Some(local) = &self.local {
            if local.pod_cidrs != me.pod_cidrs {
                report.warnings.push(format!(
                    "this Node's podCIDRs changed from {} to {}",
                    list(&local.pod_cidrs),
                    list(&me.pod_cidrs)
                ));
                self.local = None;
            }
        }
        let fast_path_done = self.local.as_ref().is_some_and(|l| l.fast_path_done);
        if self.local.is_none() || (full && !fast_path_done) {
            let done = match self.find_uplink(&me, &mut report) {
                Ok(uplink) => self.start_fast_path(uplink, &mut report),
                Err(e) => {
                    report.errors.push(e);
                    false
                }
            };
            self.local = Some(Local {
                pod_cidrs: me.pod_cidrs.clone(),
                fast_path_done: done,
            });
        }

        let masquerade_ok = self.sync_masquerade(&me, snap, full, &mut report);
        self.sync_routes(&name, snap, &mut report);

        // Last: from here on kubelet sees the network as ready, so
        // everything a pod needs is in place first.
        if masquerade_ok {
            match self.write_conflist(&me) {
                Ok(wrote) => {
                    report.wrote_conflist = wrote;
                    self.state.conflist_written.store(true, Ordering::Relaxed);
                }
                Err(e) => report.errors.push(e),
            }
        }
        if report.errors.is_empty() {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            self.state.last_sync_seconds.store(now, Ordering::Relaxed);
        }
        report
    }

    fn ensure_datapath(&mut self) -> Result<(), SyncError> {
        if self.datapath.is_some() {
            return Ok(());
        }
        let root = self.cfg.bpffs_root.clone();
        let options = ferrite_datapath::LoadOptions {
            conntrack_entries: Some(self.cfg.conntrack_entries),
            service_conntrack_entries: Some(self.cfg.service_conntrack_entries),
        };
        let (dp, outcome) =
            Datapath::open_or_load_with(&root, &options).map_err(|source| SyncError::Datapath {
                root: root.clone(),
                source,
            })?;
        match outcome {
            LoadOutcome::Loaded => {
                log::info!("loaded the datapath: {}", dp.version_dir().display());
                self.repair_pending = true;
            }
            LoadOutcome::Opened => {
                log::info!("datapath already pinned: {}", dp.version_dir().display())
            }
        }
        let dp = Arc::new(dp);
        self.state.set_counters(dp.clone());
        self.datapath = Some(dp);
        Ok(())
    }

    fn install_plugin(&mut self) -> Result<bool, SyncError> {
        let done = install::install(&self.cfg).map_err(SyncError::Plugin)?;
        if done.plugin {
            log::info!(
                "installed {} from {}",
                self.cfg.plugin_path().display(),
                self.cfg.plugin_source.display()
            );
        }
        for name in &done.companions {
            log::info!(
                "installed {} (the node had none)",
                self.cfg.cni_bin_dir.join(name).display()
            );
        }
        Ok(done.plugin || !done.companions.is_empty())
    }

    /// After this process loaded the datapath (a new version, or a wiped
    /// bpffs), pods that were running on the node are still on the old
    /// programs and maps. A CNI ADD that loads the datapath moves them over
    /// itself; now the agent loaded it, no ADD will, so the agent asks the
    /// plugin to (`ferrite repair`, the same code path). Only a node that
    /// already had ferrite's conflist can have such pods. A failure is
    /// reported and not retried: new pods work either way, and
    /// `ferrite repair` can be run by hand.
    fn repair_running_pods(&mut self, report: &mut SyncReport) {
        self.repair_pending = false;
        let conflist = self.cfg.conflist_path();
        let plugin = self.cfg.plugin_path();
        if !conflist.exists() || !plugin.exists() {
            return;
        }
        let out = std::process::Command::new(&plugin)
            .arg("repair")
            .arg("--conf")
            .arg(&conflist)
            .env_clear()
            .stdin(std::process::Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() => log::info!(
                "moved running pods onto the new datapath: {}",
                String::from_utf8_lossy(&o.stdout).trim()
            ),
            Ok(o) => report.warnings.push(format!(
                "{} repair failed ({}): {}",
                plugin.display(),
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => report
                .warnings
                .push(format!("running {} repair: {e}", plugin.display())),
        }
    }

    /// The link that holds this Node's InternalIP (IPv4 preferred).
    fn find_uplink(
        &mut self,
        me: &NodeInfo,
        report: &mut SyncReport,
    ) -> Result<Option<u32>, SyncError> {
        let addrs = match self.netlink().and_then(|n| n.addresses()) {
            Ok(a) => a,
            Err(e) => {
                self.netlink = None;
                return Err(SyncError::Routes(e));
            }
        };
        let found = uplink_of(&me.internal_ips, &addrs);
        if found.is_none() {
            report.warnings.push(format!(
                "no link holds this Node's InternalIPs {}",
                list(&me.internal_ips)
            ));
        }
        Ok(found)
    }

    /// On: the uplink programs first (so the flows the stack carries out
    /// are recorded), then the cluster CIDRs that let `from_pod` use them.
    /// Off, or no uplink found: the CIDRs cleared first (`from_pod` stops
    /// sending to the uplink), then the programs detached. Kernel routing
    /// carries the traffic either way, so errors are reported, not fatal.
    fn start_fast_path(&mut self, uplink: Option<u32>, report: &mut SyncReport) -> bool {
        let dp = self.datapath.clone().expect("loaded before the fast path");
        let result = match (self.cfg.fast_path, uplink) {
            (true, Some(ifindex)) => {
                let cidrs = self.cfg.cluster_cidrs.clone();
                self.fast_path
                    .attach_uplink(&dp, ifindex)
                    .and_then(|()| self.fast_path.set_cluster_cidrs(&dp, &cidrs))
                    .map(|()| {
                        log::info!(
                            "cross-node fast path on uplink {ifindex} for {}",
                            list(&cidrs)
                        )
                    })
            }
            (on, uplink) => {
                if on {
                    report
                        .warnings
                        .push("no uplink: the cross-node fast path stays off".into());
                }
                self.fast_path.set_cluster_cidrs(&dp, &[]).and_then(|()| {
                    uplink.map_or(Ok(()), |ifindex| {
                        self.fast_path.detach_uplink(ifindex).map(drop)
                    })
                })
            }
        };
        match result {
            Ok(()) => true,
            Err(e) => {
                report.errors.push(SyncError::FastPath(e));
                false
            }
        }
    }

    /// Returns whether the masquerade state is as configured.
    fn sync_masquerade(
        &mut self,
        me: &NodeInfo,
        snap: &Snapshot,
        full: bool,
        report: &mut SyncReport,
    ) -> bool {
        if !self.cfg.masquerade {
            if self.masquerade_removed {
                return true;
            }
            let result = self.nft().and_then(|nft| {
                let mut batch = nft.batch();
                masquerade::remove(&mut batch);
                nft.commit(batch)
            });
            return match result {
                Ok(()) => {
                    self.masquerade_removed = true;
                    true
                }
                Err(e) => {
                    self.nft = None;
                    report.errors.push(SyncError::Masquerade(e));
                    false
                }
            };
        }
        let spec = MasqueradeSpec {
            pod_cidrs: me.pod_cidrs.clone(),
            cluster_cidrs: self.cfg.cluster_cidrs.clone(),
            node_ips: node_ips(&snap.nodes),
        };
        for family in Family::BOTH {
            let has_pods = spec.pod_cidrs.iter().any(|c| Family::of_net(c) == family);
            let has_cluster = spec
                .cluster_cidrs
                .iter()
                .any(|c| Family::of_net(c) == family);
            if has_pods && !has_cluster {
                report.warnings.push(format!(
                    "no {family} --cluster-cidr: only this node's {family} pod CIDRs count as inside the cluster"
                ));
            }
        }
        let current = self.masquerade.clone();
        let result = self.nft().and_then(|nft| {
            let rebuild = match &current {
                None => true,
                Some(old) if old.pod_cidrs != spec.pod_cidrs => true,
                Some(_) if full => !nft.table_exists(masquerade::TABLE)?,
                Some(_) => false,
            };
            let mut batch = nft.batch();
            if rebuild {
                masquerade::recreate(&mut batch, &spec);
            } else if current.as_ref().map(|c| &c.node_ips) != Some(&spec.node_ips) {
                masquerade::set_node_ips(&mut batch, &spec.node_ips);
            } else {
                return Ok(false);
            }
            nft.commit(batch).map(|()| rebuild)
        });
        match result {
            Ok(rebuilt) => {
                if rebuilt {
                    log::info!(
                        "masquerade table inet {} built: pods {}, cluster {}, {} node addresses",
                        masquerade::TABLE,
                        list(&spec.pod_cidrs),
                        list(&spec.cluster_cidrs),
                        spec.node_ips.len()
                    );
                }
                self.masquerade = Some(spec);
                true
            }
            Err(e) => {
                // Unknown state: rebuild next time, on a fresh socket.
                self.masquerade = None;
                self.nft = None;
                report.errors.push(SyncError::Masquerade(e));
                false
            }
        }
    }

    fn sync_routes(&mut self, local: &str, snap: &Snapshot, report: &mut SyncReport) {
        let result = self
            .netlink()
            .and_then(|nl| apply_routes(nl, local, &snap.nodes));
        let outcome = match result {
            Ok(o) => o,
            Err(e) => {
                // A broken socket is made anew next time.
                self.netlink = None;
                report.errors.push(SyncError::Routes(e));
                return;
            }
        };
        report.routes_replaced = outcome.replaced;
        report.routes_deleted = outcome.deleted;
        report.routes_programmed = outcome.programmed;
        report.warnings.extend(outcome.warnings);
        report
            .errors
            .extend(outcome.errors.into_iter().map(SyncError::Routes));
        self.state
            .routes_programmed
            .store(outcome.programmed as u64, Ordering::Relaxed);
        self.state.routes_synced.store(true, Ordering::Relaxed);
    }

    fn write_conflist(&mut self, me: &NodeInfo) -> Result<bool, SyncError> {
        let text = conflist::render(&ConflistParams {
            pod_cidrs: me.pod_cidrs.clone(),
            mtu: self.cfg.mtu,
            bpffs_root: self.cfg.bpffs_root.clone(),
            state_dir: self.cfg.state_dir.clone(),
            log_file: self.cfg.cni_log_file.clone(),
            log_level: self.cfg.cni_log_level,
            big_tcp: self.cfg.big_tcp,
            host_ports: self.cfg.host_ports_in_datapath,
        });
        let path = self.cfg.conflist_path();
        let wrote =
            files::write_if_changed(&path, text.as_bytes(), 0o644).map_err(SyncError::Conflist)?;
        if wrote {
            log::info!("wrote {} for {}", path.display(), list(&me.pod_cidrs));
            warn_about_earlier_configs(&self.cfg);
        }
        Ok(wrote)
    }
}

/// What one route sync did.
#[derive(Debug, Default)]
pub struct RouteOutcome {
    pub replaced: usize,
    pub deleted: usize,
    /// Routes of the agent's that are right after this sync.
    pub programmed: usize,
    pub warnings: Vec<String>,
    /// Requests that failed; the others were still made.
    pub errors: Vec<NetlinkError>,
}

/// Brings the routes to other nodes' pod CIDRs in line with `nodes`, seen
/// from the node `local`: deletes first (a stale route may block nothing,
/// but it must not outlive its node), then replaces. Only listing the
/// present routes failing is an error of the whole sync.
pub fn apply_routes(
    nl: &mut Netlink,
    local: &str,
    nodes: &[NodeInfo],
) -> Result<RouteOutcome, NetlinkError> {
    let desired = desired_routes(local, nodes);
    let present = nl.routes()?;
    let p = plan(&desired.routes, &present);
    let mut out = RouteOutcome {
        warnings: desired.warnings,
        ..Default::default()
    };
    for (dst, protocol) in &p.conflicts {
        out.warnings.push(format!(
            "{dst} is already routed with protocol {protocol}: left alone"
        ));
    }
    for r in &p.delete {
        match nl.route_delete(r) {
            Ok(()) => {
                out.deleted += 1;
                log::info!("removed route {} (proto {})", r.destination, r.protocol);
            }
            Err(e) => out.errors.push(e),
        }
    }
    out.programmed = p.unchanged;
    for (dst, gw) in &p.replace {
        match nl.route_replace(*dst, *gw) {
            Ok(()) => {
                out.replaced += 1;
                out.programmed += 1;
                log::info!("route {dst} via {gw} proto {RTPROT_FERRITE_NODES}");
            }
            Err(e) => out.errors.push(e),
        }
    }
    Ok(out)
}

/// `a, b, c` for log lines.
fn list<T: std::fmt::Display>(items: &[T]) -> String {
    let parts: Vec<String> = items.iter().map(ToString::to_string).collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

/// The runtime uses the first config file in name order: say so if another
/// one would win over ferrite's.
fn warn_about_earlier_configs(cfg: &Config) {
    let Ok(entries) = std::fs::read_dir(&cfg.cni_conf_dir) else {
        return;
    };
    let mut earlier: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| files::is_cni_config_name(n) && n.as_str() < conflist::FILE_NAME)
        .collect();
    earlier.sort();
    if !earlier.is_empty() {
        log::warn!(
            "{} sorts before {}: a runtime will use it instead of ferrite",
            earlier.join(", "),
            conflist::FILE_NAME
        );
    }
}

/// The link holding the first of `ips` found on the node (the InternalIPs
/// in API order, IPv4 before IPv6).
pub fn uplink_of(ips: &[IpAddr], addrs: &[LinkAddress]) -> Option<u32> {
    let mut ordered: Vec<IpAddr> = ips.iter().filter(|i| i.is_ipv4()).copied().collect();
    ordered.extend(ips.iter().filter(|i| i.is_ipv6()));
    ordered
        .iter()
        .find_map(|ip| addrs.iter().find(|a| a.address == *ip).map(|a| a.ifindex))
}

/// Runs syncs on the calling thread: after every new snapshot (the latest
/// of any that queued up meanwhile), every `resync` without one, and sooner
/// after a failure. Returns when the sender is gone.
pub fn sync_loop(mut agent: NodeAgent, updates: Receiver<Snapshot>, resync: Duration) {
    let mut latest: Option<Snapshot> = None;
    let mut relisted = false;
    let mut retry: Option<Duration> = None;
    let mut next_full = Instant::now();
    let mut last_waiting: Option<String> = None;
    let mut last_warnings: BTreeSet<String> = BTreeSet::new();
    loop {
        match updates.recv_timeout(retry.unwrap_or(resync)) {
            Ok(s) => {
                relisted |= s.relisted;
                latest = Some(s);
                while let Ok(s) = updates.try_recv() {
                    relisted |= s.relisted;
                    latest = Some(s);
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let Some(snap) = &latest else {
            continue;
        };
        let full = relisted || Instant::now() >= next_full;
        if full {
            next_full = Instant::now() + resync;
            relisted = false;
        }
        let report = agent.sync(snap, full);
        if report.waiting != last_waiting {
            if let Some(w) = &report.waiting {
                log::info!("waiting: {w}");
            }
            last_waiting = report.waiting.clone();
        }
        // A standing problem (a node without an address of some family)
        // is said once, not at every sync.
        let warnings: BTreeSet<String> = report.warnings.iter().cloned().collect();
        for w in warnings.difference(&last_warnings) {
            log::warn!("{w}");
        }
        last_warnings = warnings;
        for e in &report.errors {
            log::error!("{e}");
        }
        if report.errors.is_empty() {
            retry = None;
        } else {
            agent
                .state
                .sync_errors
                .fetch_add(report.errors.len() as u64, Ordering::Relaxed);
            let next = retry.map_or(Duration::from_secs(2), |d| d * 2).min(resync);
            log::info!("retrying in {}s", next.as_secs());
            retry = Some(next);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn la(ifindex: u32, ip: &str) -> LinkAddress {
        LinkAddress {
            ifindex,
            address: ip.parse().unwrap(),
            prefix_len: 24,
        }
    }

    #[test]
    fn uplink_is_the_link_with_the_internal_ip() {
        let addrs = [la(1, "127.0.0.1"), la(2, "192.0.2.1"), la(3, "2001:db8::1")];
        let ips: Vec<IpAddr> = vec!["2001:db8::1".parse().unwrap(), "192.0.2.1".parse().unwrap()];
        assert_eq!(uplink_of(&ips, &addrs), Some(2));
        assert_eq!(uplink_of(&ips[..1], &addrs), Some(3));
        assert_eq!(uplink_of(&["192.0.2.9".parse().unwrap()], &addrs), None);
    }

    #[test]
    fn waits_for_its_node_and_its_pod_cidrs() {
        let state = Arc::new(AgentState::default());
        let cfg = Config {
            node_name: Some("a".into()),
            ..Config::default()
        };
        let mut agent = NodeAgent::new(
            cfg,
            state.clone(),
            Box::<crate::fastpath::EbpfFastPath>::default(),
        );
        let r = agent.sync(&Snapshot::default(), true);
        assert!(r.waiting.unwrap().contains("not in the API"));
        let snap = Snapshot {
            nodes: vec![crate::node::tests::info("a", &[], &["192.0.2.1"])],
            relisted: true,
        };
        let r = agent.sync(&snap, true);
        assert!(r.waiting.unwrap().contains("no podCIDRs"));
        assert!(r.errors.is_empty());
        assert!(!state.ready());
    }
}
