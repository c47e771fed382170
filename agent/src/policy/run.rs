// SPDX-License-Identifier: Apache-2.0
//! The policy thread: it owns the view and the engine, applies what the
//! watches and ADD tell it, and programs the pinned maps.
//!
//! Nothing is programmed before Pods, Namespaces and NetworkPolicies were
//! each listed once. After that every batch of updates (everything queued
//! when the thread wakes) is one sync. ADD reports an endpoint that waits
//! for its policy over a datagram socket in the plugin's state directory
//! (`agent.sock`), so the sync that programs it runs at once rather than at
//! the next watch event; the time from ADD to programmed is measured here
//! and exported.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrite_datapath::policy::{Encoded, EndpointPolicy, PolicyMaps};
use ferrite_datapath::{Datapath, DatapathError};

use super::compile::View;
use super::engine::{Engine, PolicyTarget};
use super::watch::{Delta, Update};
use crate::deltas::apply_delta as apply;
use crate::metrics::AgentState;

/// The socket ADD writes to, in the plugin's state directory (the plugin
/// has the same name in `commands/add.rs`).
pub const AGENT_SOCKET: &str = "agent.sock";

/// The maps of one loaded datapath, as the engine uses them.
pub struct MapsTarget<'a> {
    pub datapath: &'a Datapath,
    pub maps: &'a PolicyMaps,
}

impl PolicyTarget for MapsTarget<'_> {
    fn endpoints(&self) -> Result<Vec<(IpAddr, u32)>, DatapathError> {
        Ok(self
            .datapath
            .endpoints()?
            .into_iter()
            .map(|(ip, ep)| (ip, ep.ifindex))
            .collect())
    }
    fn pod_ids(&self) -> Result<Vec<(u32, String, String)>, DatapathError> {
        Ok(self.maps.pod_ids()?)
    }
    fn endpoint_policies(&self) -> Result<Vec<(u32, EndpointPolicy)>, DatapathError> {
        Ok(self.maps.endpoints()?)
    }
    fn write_rule_set(&mut self, id: u32, set: &Encoded) -> Result<(), DatapathError> {
        self.maps.write_rule_set(id, set)
    }
    fn remove_rule_set(&mut self, id: u32, set: &Encoded) -> Result<(), DatapathError> {
        self.maps.remove_rule_set(id, set)
    }
    fn remove_rule_sets_except(
        &mut self,
        keep: &std::collections::BTreeSet<u32>,
    ) -> Result<usize, DatapathError> {
        Ok(self.maps.remove_rule_sets(|id| !keep.contains(&id))?)
    }
    fn set_endpoint(&mut self, ifindex: u32, policy: &EndpointPolicy) -> Result<(), DatapathError> {
        Ok(self.maps.set_endpoint(ifindex, policy)?)
    }
    fn remove_endpoint(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        self.maps.remove_endpoint(ifindex)?;
        Ok(())
    }
    fn set_policy_namespaces(
        &mut self,
        namespaces: &std::collections::BTreeSet<String>,
    ) -> Result<(), DatapathError> {
        Ok(self.maps.set_policy_namespaces(namespaces)?)
    }
    fn pod_policies(&self) -> Result<Vec<(String, String, EndpointPolicy)>, DatapathError> {
        Ok(self.maps.pod_policies()?)
    }
    fn set_pod_policy(
        &mut self,
        namespace: &str,
        name: &str,
        policy: &EndpointPolicy,
    ) -> Result<(), DatapathError> {
        if !self.maps.set_pod_policy(namespace, name, policy)? {
            log::debug!("{namespace}/{name}: names too long to compute ahead; ADD will wait");
        }
        Ok(())
    }
    fn remove_pod_policy(&mut self, namespace: &str, name: &str) -> Result<(), DatapathError> {
        self.maps.remove_pod_policy(namespace, name)?;
        Ok(())
    }
}

/// What the policy thread is configured with.
#[derive(Clone, Debug)]
pub struct PolicySettings {
    pub node_name: String,
    pub bpffs_root: PathBuf,
    /// The cluster's Service CIDRs: egress to them is checked after
    /// kube-proxy's translation, against the backend.
    pub service_cidrs: Vec<(IpAddr, u8)>,
    pub resync: Duration,
}

/// CLOCK_MONOTONIC in nanoseconds, the clock ADD stamps its report with.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// Reads ADD's report: the host veth's ifindex, then (if present) the
/// CLOCK_MONOTONIC nanoseconds when ADD set its policy and whether it
/// waits (pending) or started with the policy computed ahead.
pub fn parse_report(b: &[u8]) -> Option<Update> {
    let ifindex = u32::from_ne_bytes(b.get(..4)?.try_into().ok()?);
    let since_ns = match b.get(4..12) {
        Some(t) => u64::from_ne_bytes(t.try_into().ok()?),
        None => 0,
    };
    let pending = match b.get(12..16) {
        Some(f) => u32::from_ne_bytes(f.try_into().ok()?) & 1 != 0,
        None => true,
    };
    Some(Update::Reported {
        ifindex,
        since_ns,
        pending,
    })
}

/// Binds `<state_dir>/agent.sock` (replacing a stale one) and forwards
/// every report to the policy thread, on a thread of its own.
pub fn listen_for_adds(state_dir: &Path, updates: Sender<Update>) -> std::io::Result<()> {
    let path = state_dir.join(AGENT_SOCKET);
    std::fs::create_dir_all(state_dir)?;
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let sock = UnixDatagram::bind(&path)?;
    std::thread::Builder::new()
        .name("ferrite-adds".into())
        .spawn(move || {
            let mut buf = [0u8; 64];
            loop {
                let n = match sock.recv(&mut buf) {
                    Ok(n) => n,
                    Err(e) => {
                        log::warn!("reading ADD reports: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                if let Some(u) = parse_report(&buf[..n]) {
                    if updates.send(u).is_err() {
                        return;
                    }
                }
            }
        })?;
    log::info!("ADD reports on {}", path.display());
    Ok(())
}

/// The policy thread's state.
pub struct PolicyLoop {
    settings: PolicySettings,
    state: Arc<AgentState>,
    view: View,
    /// Pods, Namespaces, NetworkPolicies listed once.
    listed: [bool; 3],
    engine: Engine,
    datapath: Option<(Datapath, PolicyMaps)>,
    /// Endpoints ADD reported as pending, with when they started.
    waiting: BTreeMap<u32, u64>,
    host_addresses: Vec<IpAddr>,
    /// ADDs that found their policy computed ahead, not yet counted.
    started_programmed: u64,
}

impl PolicyLoop {
    pub fn new(settings: PolicySettings, state: Arc<AgentState>) -> Self {
        let engine = Engine::new(&settings.node_name);
        PolicyLoop {
            settings,
            state,
            view: View::default(),
            listed: [false; 3],
            engine,
            datapath: None,
            waiting: BTreeMap::new(),
            host_addresses: Vec::new(),
            started_programmed: 0,
        }
    }

    /// Takes one update into the view.
    pub fn apply(&mut self, update: Update) {
        match update {
            Update::Pods(d) => {
                self.listed[0] |= matches!(d, Delta::Listed(_));
                apply(
                    &mut self.view.pods,
                    d,
                    |p| (p.namespace.clone(), p.name.clone()),
                    |ns, n| (ns, n),
                );
            }
            Update::Namespaces(d) => {
                self.listed[1] |= matches!(d, Delta::Listed(_));
                apply(&mut self.view.namespaces, d, |n| n.name.clone(), |_, n| n);
            }
            Update::Policies(d) => {
                self.listed[2] |= matches!(d, Delta::Listed(_));
                apply(
                    &mut self.view.policies,
                    d,
                    |p| (p.namespace.clone(), p.name.clone()),
                    |ns, n| (ns, n),
                );
            }
            Update::Reported {
                ifindex,
                pending: true,
                since_ns,
            } => {
                self.waiting.insert(ifindex, since_ns);
            }
            Update::Reported { ifindex, .. } => {
                log::info!("policy: endpoint {ifindex} programmed 0 ms after ADD (computed ahead)");
                self.started_programmed += 1;
            }
        }
    }

    fn listed(&self) -> bool {
        self.listed.iter().all(|l| *l)
    }

    /// Opens the datapath this agent's version loaded, once it exists.
    fn datapath(&mut self) -> Result<Option<&(Datapath, PolicyMaps)>, DatapathError> {
        if self.datapath.is_none() {
            let Some(dp) = Datapath::open(&self.settings.bpffs_root)? else {
                return Ok(None);
            };
            let maps = dp.policy_maps()?;
            maps.set_service_cidrs(&self.settings.service_cidrs)?;
            self.host_addresses.clear();
            self.datapath = Some((dp, maps));
        }
        Ok(self.datapath.as_ref())
    }

    /// The node's own addresses: its traffic to local pods (kubelet's
    /// probes) is always allowed.
    fn sync_host_addresses(&mut self) -> anyhow::Result<()> {
        let addrs = crate::netlink::Netlink::new()?.host_addresses()?;
        if addrs != self.host_addresses {
            if let Some((_, maps)) = &self.datapath {
                maps.set_host_addresses(&addrs)?;
                log::info!("policy: the node's addresses {addrs:?} reach its pods");
                self.host_addresses = addrs;
            }
        }
        Ok(())
    }

    /// One sync, if everything was listed and the datapath is loaded.
    /// Returns whether it ran.
    pub fn sync(&mut self, check_host: bool) -> anyhow::Result<bool> {
        if !self.listed() {
            return Ok(false);
        }
        if self.datapath()?.is_none() {
            return Ok(false);
        }
        if check_host || self.host_addresses.is_empty() {
            self.sync_host_addresses()?;
        }
        let started = Instant::now();
        let (datapath, maps) = self.datapath.as_ref().expect("opened above");
        let mut target = MapsTarget { datapath, maps };
        let report = self.engine.sync(&mut self.view, &mut target)?;
        let took = started.elapsed();
        let now = monotonic_ns();
        let mut programmed_after_add = Vec::new();
        self.waiting.retain(|ifindex, since| {
            match maps.endpoint(*ifindex) {
                Ok(Some(p)) if p.pending => now.saturating_sub(*since) < 60_000_000_000,
                // Programmed, or not isolated after all (no policy
                // selects it): either way it now passes what it may.
                _ => {
                    if *since != 0 {
                        programmed_after_add.push((*ifindex, now.saturating_sub(*since)));
                    }
                    false
                }
            }
        });
        for (ifindex, ns) in &programmed_after_add {
            log::info!(
                "policy: endpoint {ifindex} programmed {:.3} ms after ADD",
                *ns as f64 / 1e6
            );
        }
        if report.changed > 0 {
            log::info!(
                "policy: {} endpoints changed in {:.3} ms ({} programmed, {} pending, {} rule sets)",
                report.changed,
                took.as_secs_f64() * 1e3,
                report.programmed,
                report.pending,
                report.rule_sets
            );
        }
        let conntrack = maps.conntrack_len().unwrap_or(0);
        let mut status = self.state.policy_status();
        let newly_failed: Vec<&String> = report.failed.difference(&status.failed).collect();
        for f in newly_failed {
            log::warn!("policy fails closed: {f}");
        }
        status.synced = true;
        status.syncs += 1;
        status.programmed = report.programmed as u64;
        status.pending = report.pending as u64;
        status.rule_sets = report.rule_sets as u64;
        status.failed = report.failed.clone();
        status.conntrack_entries = conntrack as u64;
        status.last_sync_micros = took.as_micros() as u64;
        for (_, ns) in programmed_after_add {
            status.add_to_programmed.observe(ns as f64 / 1e9);
        }
        for _ in 0..std::mem::take(&mut self.started_programmed) {
            status.add_to_programmed.observe(0.0);
        }
        status.precomputed = report.precomputed as u64;
        self.state.set_policy_status(status);
        Ok(true)
    }
}

/// Runs the policy thread until the watches go away.
pub fn policy_loop(mut pl: PolicyLoop, updates: Receiver<Update>) {
    let resync = pl.settings.resync;
    let mut next_full = Instant::now();
    let mut retry: Option<Duration> = None;
    loop {
        // Until the datapath is loaded (the sync thread loads it), look
        // again every second.
        let wait = if pl.datapath.is_none() {
            Duration::from_secs(1)
        } else {
            retry.unwrap_or_else(|| next_full.saturating_duration_since(Instant::now()))
        };
        match updates.recv_timeout(wait) {
            Ok(u) => {
                pl.apply(u);
                while let Ok(u) = updates.try_recv() {
                    pl.apply(u);
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let full = Instant::now() >= next_full;
        match pl.sync(full) {
            Ok(ran) => {
                retry = None;
                if ran && full {
                    next_full = Instant::now() + resync;
                }
            }
            Err(e) => {
                log::error!("policy sync: {e:#}");
                pl.state.policy_sync_failed();
                // A datapath replaced under us (an upgrade) is opened again.
                pl.datapath = None;
                let next = retry.map_or(Duration::from_millis(200), |d| d * 2);
                retry = Some(next.min(Duration::from_secs(10)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::model::{NamespaceInfo, PodInfo};

    #[test]
    fn reports_with_and_without_a_time() {
        let mut b = 7u32.to_ne_bytes().to_vec();
        assert_eq!(
            parse_report(&b),
            Some(Update::Reported {
                ifindex: 7,
                since_ns: 0,
                pending: true
            })
        );
        b.extend_from_slice(&123u64.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        assert_eq!(
            parse_report(&b),
            Some(Update::Reported {
                ifindex: 7,
                since_ns: 123,
                pending: false
            })
        );
        assert_eq!(parse_report(&[1, 2]), None);
    }

    fn pod(name: &str) -> PodInfo {
        PodInfo {
            namespace: "x".into(),
            name: name.into(),
            node: None,
            labels: Default::default(),
            ips: vec![],
            host_network: false,
            ports: vec![],
        }
    }

    #[test]
    fn nothing_syncs_before_all_three_kinds_are_listed() {
        let settings = PolicySettings {
            node_name: "n".into(),
            // Never opened: the sync stops at the listing check first.
            bpffs_root: "/nonexistent/ferrite-test".into(),
            service_cidrs: vec![],
            resync: Duration::from_secs(60),
        };
        let mut pl = PolicyLoop::new(settings, Arc::new(AgentState::default()));
        pl.apply(Update::Pods(Delta::Listed(vec![pod("a"), pod("b")])));
        pl.apply(Update::Namespaces(Delta::Applied(NamespaceInfo {
            name: "x".into(),
            labels: Default::default(),
        })));
        assert!(
            !pl.sync(true).unwrap(),
            "namespaces only changed, never listed"
        );
        pl.apply(Update::Namespaces(Delta::Listed(vec![])));
        pl.apply(Update::Pods(Delta::Deleted("x".into(), "a".into())));
        assert_eq!(pl.view.pods.len(), 1);
        assert!(pl.view.namespaces.is_empty(), "a list replaces the kind");
        assert!(!pl.sync(true).unwrap(), "no policy list yet");
        pl.apply(Update::Policies(Delta::Listed(vec![])));
        assert!(pl.listed());
        // Listed, but no datapath at that root: still nothing.
        assert!(!pl.sync(true).unwrap());
    }
}
