// SPDX-License-Identifier: Apache-2.0
//! The service thread: it owns the view and the engine, applies what the
//! watches tell it, and programs the Service maps through a
//! [`ServiceTarget`].
//!
//! Nothing is programmed before Services and Endpoints were each listed
//! once. After that every batch of updates (everything queued when the
//! thread wakes) that changed the view is one sync; a periodic resync
//! recomputes the table anyway (and writes nothing when nothing changed).
//! The thread does not know which maps it writes: it is handed a function
//! that opens them ([`OpenTarget`]), called until it returns a target and
//! again after a failed sync (the maps may have been replaced).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::compile::{Limits, ServiceKey, ServiceView, Table};
use super::engine::{Engine, Frontend, ServiceTarget, SyncReport};
use super::watch::{Delta, Update};
use crate::deltas::apply_delta;
use crate::metrics::AgentState;

/// Opens the Service maps: `Ok(None)` while there are none yet (the
/// datapath not loaded), an error to be retried.
pub type OpenTarget<T> = Box<dyn FnMut() -> anyhow::Result<Option<T>> + Send>;

/// Any target, boxed: what main.rs's hook hands the thread.
pub type DynTarget<E> = Box<dyn ServiceTarget<Error = E>>;

/// What the service thread is configured with.
#[derive(Clone, Debug)]
pub struct ServiceSettings {
    pub node_name: String,
    pub limits: Limits,
    pub resync: Duration,
    /// Program NodePorts too: kube-proxy does not run.
    pub node_ports: bool,
}

/// The service thread's state.
pub struct ServiceLoop<T> {
    settings: ServiceSettings,
    state: Arc<AgentState>,
    view: ServiceView,
    /// Services, Endpoints listed once.
    listed: [bool; 2],
    /// The view changed since the last sync.
    dirty: bool,
    /// When the oldest change not yet in the maps reached the thread.
    changed_since: Option<Instant>,
    engine: Engine,
    open: OpenTarget<T>,
    target: Option<T>,
    /// Services left out at the last sync (each warned about once).
    left_out: BTreeMap<ServiceKey, String>,
    /// Services with frontends ferrite does not serve, at the last sync.
    unserved: BTreeMap<ServiceKey, usize>,
    /// The table the maps hold (after the last sync that succeeded).
    table: Option<Table>,
    /// Services whose Service or Endpoints changed since the last sync.
    touched: BTreeSet<ServiceKey>,
    /// A whole list arrived since the last sync: compile everything.
    relisted: bool,
    /// Syncs that compiled only the Services that changed.
    incremental_syncs: u64,
}

impl<T: ServiceTarget> ServiceLoop<T> {
    pub fn new(settings: ServiceSettings, state: Arc<AgentState>, open: OpenTarget<T>) -> Self {
        let view = ServiceView {
            node_ports: settings.node_ports,
            ..ServiceView::default()
        };
        ServiceLoop {
            settings,
            state,
            view,
            listed: [false; 2],
            dirty: false,
            changed_since: None,
            engine: Engine::new(),
            open,
            target: None,
            left_out: BTreeMap::new(),
            unserved: BTreeMap::new(),
            table: None,
            touched: BTreeSet::new(),
            relisted: false,
            incremental_syncs: 0,
        }
    }

    /// Takes one update, which reached the thread at `arrived`, into the
    /// view.
    pub fn apply(&mut self, update: Update, arrived: Instant) {
        let key = |ns: String, name: String| (ns, name);
        let touched = match &update {
            Update::Services(Delta::Applied(s)) => Some((s.namespace.clone(), s.name.clone())),
            Update::Endpoints(Delta::Applied(e)) => Some((e.namespace.clone(), e.name.clone())),
            Update::Services(Delta::Deleted(ns, name))
            | Update::Endpoints(Delta::Deleted(ns, name)) => Some((ns.clone(), name.clone())),
            Update::Services(Delta::Listed(_)) | Update::Endpoints(Delta::Listed(_)) => None,
        };
        let changed = match update {
            Update::Services(d) => {
                self.listed[0] |= matches!(d, Delta::Listed(_));
                apply_delta(
                    &mut self.view.services,
                    d,
                    |s| (s.namespace.clone(), s.name.clone()),
                    key,
                )
            }
            Update::Endpoints(d) => {
                self.listed[1] |= matches!(d, Delta::Listed(_));
                apply_delta(
                    &mut self.view.endpoints,
                    d,
                    |e| (e.namespace.clone(), e.name.clone()),
                    key,
                )
            }
        };
        if changed {
            self.dirty = true;
            self.changed_since.get_or_insert(arrived);
            match touched {
                Some(k) => {
                    self.touched.insert(k);
                }
                None => self.relisted = true,
            }
        }
    }

    fn listed(&self) -> bool {
        self.listed.iter().all(|l| *l)
    }

    /// Services with a frontend in the maps: they keep their room when the
    /// table is over the limits.
    fn programmed(&self) -> BTreeSet<ServiceKey> {
        self.view
            .services
            .iter()
            .filter(|(_, s)| {
                s.cluster_ips.iter().any(|ip| {
                    s.ports.iter().any(|p| {
                        self.engine.holds(&Frontend {
                            addr: *ip,
                            port: p.port,
                            proto: p.proto,
                        })
                    })
                })
            })
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// One sync, if both kinds were listed, the maps can be opened, and
    /// the view changed (or `force`). Returns whether it ran.
    pub fn sync(&mut self, force: bool) -> anyhow::Result<bool> {
        if !self.listed() {
            return Ok(false);
        }
        let mut force = force;
        if self.target.is_none() {
            let Some(target) = (self.open)()? else {
                return Ok(false);
            };
            self.target = Some(target);
            self.engine.reset();
            force = true;
        }
        if !self.dirty && !force {
            return Ok(false);
        }
        let started = Instant::now();
        let target = self.target.as_mut().expect("opened above");
        self.engine.prepare(target)?;
        // A change to a few Services touches only their frontends; a
        // forced sync, a new list or a table with Services waiting for
        // room is compiled whole.
        let mut incremental = None;
        if !force && !self.relisted {
            if let Some(mut table) = self.table.take() {
                let (node, limits) = (&self.settings.node_name, &self.settings.limits);
                let mut frontends = BTreeSet::new();
                let all = self.touched.iter().all(|key| {
                    table
                        .update_service(&self.view, key, node, limits)
                        .map(|t| frontends.extend(t))
                        .is_some()
                });
                if all {
                    incremental = Some((table, frontends));
                }
            }
        }
        let target = self.target.as_mut().expect("opened above");
        let (table, report) = match incremental {
            Some((table, frontends)) => {
                let report = self.engine.sync_some(&table, &frontends, target)?;
                self.incremental_syncs += 1;
                (table, report)
            }
            None => {
                let first = self.programmed();
                let table =
                    self.view
                        .table(&self.settings.node_name, &self.settings.limits, &first);
                let target = self.target.as_mut().expect("opened above");
                let report = self.engine.sync(&table, target)?;
                (table, report)
            }
        };
        let took = started.elapsed();
        self.dirty = false;
        self.touched.clear();
        self.relisted = false;

        // Without kube-proxy nothing else serves what ferrite leaves.
        let fate = if self.settings.node_ports {
            "not served: no kube-proxy runs"
        } else {
            "left to kube-proxy"
        };
        for (key, why) in &table.left_out {
            if !self.left_out.contains_key(key) {
                log::warn!("Service {}/{} left out ({fate}): {why}", key.0, key.1);
            }
        }
        if self.settings.node_ports {
            for (key, n) in &table.unserved {
                if !self.unserved.contains_key(key) {
                    log::warn!(
                        "Service {}/{}: {n} frontends of a protocol ferrite does not serve (SCTP) {fate}",
                        key.0,
                        key.1
                    );
                }
            }
        }
        self.left_out = table.left_out.clone();
        self.unserved = table.unserved.clone();
        self.table = Some(table);
        self.report(&report, took);
        Ok(true)
    }

    fn report(&mut self, report: &SyncReport, took: Duration) {
        if report.writes > 0 {
            log::info!(
                "services: {} frontends changed ({} map writes) in {:.3} ms; {} frontends, {} active and {} terminating backends, {} left to kube-proxy, {} Services left out",
                report.changed,
                report.writes,
                took.as_secs_f64() * 1e3,
                report.frontends,
                report.active_backends,
                report.terminating_backends,
                report.left_to_kube_proxy,
                report.left_out
            );
        }
        let mut status = self.state.service_status();
        // The first sync programs everything listed: not an event's
        // latency, so it is not observed.
        if let Some(since) = self.changed_since.take() {
            if status.synced && report.writes > 0 {
                status
                    .event_to_datapath
                    .observe(since.elapsed().as_secs_f64());
            }
        }
        status.synced = true;
        status.syncs += 1;
        status.frontends = report.frontends as u64;
        status.active_backends = report.active_backends as u64;
        status.terminating_backends = report.terminating_backends as u64;
        status.left_to_kube_proxy = report.left_to_kube_proxy as u64;
        status.left_out = report.left_out as u64;
        status.last_sync_micros = took.as_micros() as u64;
        self.state.set_service_status(status);
    }
}

/// Runs the service thread until the watches go away.
pub fn service_loop<T: ServiceTarget>(mut sl: ServiceLoop<T>, updates: Receiver<Update>) {
    let resync = sl.settings.resync;
    let mut next_full = Instant::now();
    let mut retry: Option<Duration> = None;
    loop {
        // Until the maps can be opened, look again every second.
        let wait = if sl.target.is_none() {
            retry.unwrap_or(Duration::from_secs(1))
        } else {
            retry.unwrap_or_else(|| next_full.saturating_duration_since(Instant::now()))
        };
        match updates.recv_timeout(wait) {
            Ok(u) => {
                sl.apply(u, Instant::now());
                while let Ok(u) = updates.try_recv() {
                    sl.apply(u, Instant::now());
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let full = Instant::now() >= next_full;
        match sl.sync(full || retry.is_some()) {
            Ok(ran) => {
                retry = None;
                if ran && full {
                    next_full = Instant::now() + resync;
                }
            }
            Err(e) => {
                log::error!("service sync: {e:#}");
                sl.state.service_sync_failed();
                // Maps replaced under us (an upgrade) are opened again.
                sl.target = None;
                let next = retry.map_or(Duration::from_millis(200), |d| d * 2);
                retry = Some(next.min(Duration::from_secs(10)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake::{Call, Fake};
    use super::*;
    use crate::service::model::{
        EndpointAddr, EndpointPort, EndpointsInfo, ServiceInfo, ServicePort, Subset, PROTO_TCP,
    };
    use std::net::IpAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn svc(name: &str, cluster_ip: &str) -> ServiceInfo {
        ServiceInfo {
            namespace: "x".into(),
            name: name.into(),
            external_name: false,
            cluster_ips: vec![ip(cluster_ip)],
            ports: vec![ServicePort {
                name: "http".into(),
                proto: PROTO_TCP,
                port: 80,
                node_port: None,
            }],
            affinity: None,
            internal_local: false,
            external_local: false,
        }
    }

    fn eps(name: &str, ready: &[&str]) -> EndpointsInfo {
        EndpointsInfo {
            namespace: "x".into(),
            name: name.into(),
            subsets: vec![Subset {
                ready: ready
                    .iter()
                    .map(|a| EndpointAddr {
                        ip: ip(a),
                        node: Some("n1".into()),
                    })
                    .collect(),
                not_ready: vec![],
                ports: vec![EndpointPort {
                    name: "http".into(),
                    proto: PROTO_TCP,
                    port: 8080,
                }],
            }],
        }
    }

    fn settings() -> ServiceSettings {
        ServiceSettings {
            node_name: "n1".into(),
            limits: Limits::default(),
            resync: Duration::from_secs(60),
            node_ports: false,
        }
    }

    fn looping(fake: &Fake) -> ServiceLoop<Fake> {
        let f = fake.clone();
        ServiceLoop::new(
            settings(),
            Arc::new(AgentState::default()),
            Box::new(move || Ok(Some(f.clone()))),
        )
    }

    fn web() -> Frontend {
        Frontend {
            addr: ip("10.96.0.10"),
            port: 80,
            proto: PROTO_TCP,
        }
    }

    /// The backends' addresses of `fe`, in slot order.
    fn slots(fake: &Fake, fe: &Frontend) -> Vec<IpAddr> {
        let m = fake.maps();
        m.frontends[fe]
            .backends
            .iter()
            .map(|id| m.backends[id].addr)
            .collect()
    }

    #[test]
    fn nothing_is_programmed_before_both_kinds_are_listed() {
        let fake = Fake::default();
        let mut sl = looping(&fake);
        let now = Instant::now();
        sl.apply(
            Update::Services(Delta::Listed(vec![svc("web", "10.96.0.10")])),
            now,
        );
        sl.apply(
            Update::Endpoints(Delta::Applied(eps("web", &["10.0.1.2"]))),
            now,
        );
        assert!(!sl.sync(true).unwrap(), "Endpoints changed, never listed");
        assert!(fake.take_calls().is_empty());
        sl.apply(Update::Endpoints(Delta::Listed(vec![])), now);
        assert!(sl.sync(false).unwrap());
        // The list replaced the Endpoint applied before it.
        assert!(slots(&fake, &web()).is_empty());
        assert_eq!(sl.state.service_status().syncs, 1);
    }

    #[test]
    fn endpoints_before_their_service_and_after() {
        let fake = Fake::default();
        let mut sl = looping(&fake);
        let now = Instant::now();
        sl.apply(Update::Services(Delta::Listed(vec![])), now);
        sl.apply(
            Update::Endpoints(Delta::Listed(vec![eps("web", &["10.0.1.2"])])),
            now,
        );
        assert!(sl.sync(false).unwrap());
        assert!(fake.maps().frontends.is_empty(), "no Service yet");
        sl.apply(
            Update::Services(Delta::Applied(svc("web", "10.96.0.10"))),
            now,
        );
        assert!(sl.sync(false).unwrap());
        assert_eq!(slots(&fake, &web()), [ip("10.0.1.2")]);

        // A Service first: programmed with no backends, then they come.
        let other = Frontend {
            addr: ip("10.96.0.11"),
            port: 80,
            proto: PROTO_TCP,
        };
        sl.apply(
            Update::Services(Delta::Applied(svc("api", "10.96.0.11"))),
            now,
        );
        sl.sync(false).unwrap();
        assert!(slots(&fake, &other).is_empty());
        sl.apply(
            Update::Endpoints(Delta::Applied(eps("api", &["10.0.1.5", "10.0.1.4"]))),
            now,
        );
        sl.sync(false).unwrap();
        assert_eq!(slots(&fake, &other), [ip("10.0.1.4"), ip("10.0.1.5")]);

        // The Service goes: its frontend, then its backends.
        fake.take_calls();
        sl.apply(
            Update::Services(Delta::Deleted("x".into(), "api".into())),
            now,
        );
        sl.sync(false).unwrap();
        let calls = fake.take_calls();
        assert_eq!(calls[0], Call::RemoveFrontend(other));
        assert_eq!(calls.len(), 3);
        assert!(calls[1..]
            .iter()
            .all(|c| matches!(c, Call::RemoveBackend(_))));
        fake.assert_consistent();
    }

    #[test]
    fn an_unchanged_update_or_resync_writes_nothing() {
        let fake = Fake::default();
        let mut sl = looping(&fake);
        let now = Instant::now();
        sl.apply(
            Update::Services(Delta::Listed(vec![svc("web", "10.96.0.10")])),
            now,
        );
        sl.apply(
            Update::Endpoints(Delta::Listed(vec![eps("web", &["10.0.1.2"])])),
            now,
        );
        assert!(sl.sync(false).unwrap());
        fake.take_calls();
        // The same Endpoints again (a leader-election renewal looks so).
        sl.apply(
            Update::Endpoints(Delta::Applied(eps("web", &["10.0.1.2"]))),
            now,
        );
        assert!(!sl.sync(false).unwrap(), "no change, no sync");
        assert!(sl.sync(true).unwrap(), "a resync runs");
        assert!(fake.take_calls().is_empty(), "and writes nothing");
    }

    #[test]
    fn a_failed_open_is_retried_and_a_failed_sync_reopens() {
        let fake = Fake::default();
        let opened = Arc::new(AtomicUsize::new(0));
        let (f, n) = (fake.clone(), opened.clone());
        let mut sl = ServiceLoop::new(
            settings(),
            Arc::new(AgentState::default()),
            Box::new(move || match n.fetch_add(1, Ordering::Relaxed) {
                0 => Ok(None),
                1 => anyhow::bail!("not yet"),
                _ => Ok(Some(f.clone())),
            }),
        );
        let now = Instant::now();
        sl.apply(
            Update::Services(Delta::Listed(vec![svc("web", "10.96.0.10")])),
            now,
        );
        sl.apply(
            Update::Endpoints(Delta::Listed(vec![eps("web", &["10.0.1.2", "10.0.1.3"])])),
            now,
        );
        assert!(!sl.sync(false).unwrap(), "no maps yet");
        assert!(sl.sync(false).is_err());
        fake.fail_at(1);
        assert!(sl.sync(false).is_err(), "the second write fails");
        sl.target = None; // as the loop does
        assert!(sl.sync(false).unwrap());
        assert_eq!(opened.load(Ordering::Relaxed), 4);
        assert_eq!(slots(&fake, &web()).len(), 2);
        fake.assert_consistent();
    }

    #[test]
    fn a_service_left_out_is_remembered_until_it_fits() {
        let fake = Fake::default();
        let mut sl = looping(&fake);
        sl.settings.limits.max_backends_per_frontend = 1;
        let now = Instant::now();
        sl.apply(
            Update::Services(Delta::Listed(vec![svc("web", "10.96.0.10")])),
            now,
        );
        sl.apply(
            Update::Endpoints(Delta::Listed(vec![eps("web", &["10.0.1.2", "10.0.1.3"])])),
            now,
        );
        sl.sync(false).unwrap();
        assert_eq!(sl.left_out.len(), 1);
        assert_eq!(sl.state.service_status().left_out, 1);
        assert!(fake.maps().frontends.is_empty());
        sl.apply(
            Update::Endpoints(Delta::Applied(eps("web", &["10.0.1.2"]))),
            now,
        );
        sl.sync(false).unwrap();
        assert!(sl.left_out.is_empty());
        assert_eq!(slots(&fake, &web()), [ip("10.0.1.2")]);
    }

    #[test]
    fn the_thread_programs_batches_and_measures_them() {
        let fake = Fake::default();
        let state = Arc::new(AgentState::default());
        let f = fake.clone();
        let sl = ServiceLoop::new(
            settings(),
            state.clone(),
            Box::new(move || Ok(Some(f.clone()))),
        );
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || service_loop(sl, rx));
        let wait_for = |syncs: u64| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while state.service_status().syncs < syncs {
                assert!(Instant::now() < deadline, "no sync {syncs}");
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        tx.send(Update::Services(Delta::Listed(vec![svc(
            "web",
            "10.96.0.10",
        )])))
        .unwrap();
        tx.send(Update::Endpoints(Delta::Listed(vec![eps(
            "web",
            &["10.0.1.2"],
        )])))
        .unwrap();
        wait_for(1);
        tx.send(Update::Endpoints(Delta::Applied(eps(
            "web",
            &["10.0.1.2", "10.0.1.3"],
        ))))
        .unwrap();
        wait_for(2);
        drop(tx);
        thread.join().unwrap();
        let s = state.service_status();
        assert_eq!((s.frontends, s.active_backends), (1, 2));
        assert_eq!(
            s.event_to_datapath.count, 1,
            "the change measured, the first programming not"
        );
        assert_eq!(slots(&fake, &web()), [ip("10.0.1.2"), ip("10.0.1.3")]);
        fake.assert_consistent();
    }

    /// Random changes to 12 Services (cluster IPs from a pool, so two
    /// Services sometimes claim one frontend; backends from a pool of six;
    /// deletions of either kind), synced after every batch of one to
    /// three: the table the loop keeps, and the maps, are always what a
    /// whole compile gives, with limits that bind (Services left out, so
    /// mostly whole compiles) and with none (mostly incremental).
    #[test]
    fn incremental_syncs_end_where_a_whole_compile_does() {
        // (limits, cluster IPs to pick from, incremental syncs at least)
        for (limits, ips, at_least) in [
            (Limits::default(), 250, 200),
            (
                Limits {
                    max_frontends: 8,
                    max_backends: 20,
                    max_backends_per_frontend: 4,
                },
                16,
                0,
            ),
        ] {
            let fake = Fake::default();
            let mut sl = looping(&fake);
            sl.settings.limits = limits;
            let mut seed = 0x2545_f491_4f6c_dd1du64;
            let mut rand = |n: u64| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed % n
            };
            let addrs = [
                "10.0.1.1", "10.0.1.2", "10.0.1.3", "10.0.1.4", "10.0.1.5", "10.0.1.6",
            ];
            sl.apply(Update::Services(Delta::Listed(vec![])), Instant::now());
            sl.apply(Update::Endpoints(Delta::Listed(vec![])), Instant::now());
            sl.sync(false).unwrap();
            for round in 0..400 {
                for _ in 0..=rand(3) {
                    let name = format!("s{}", rand(12));
                    let u = match rand(5) {
                        0 | 1 => Update::Services(Delta::Applied(svc(
                            &name,
                            &format!("10.96.0.{}", 1 + rand(ips)),
                        ))),
                        2 | 3 => {
                            let ready: Vec<&str> =
                                addrs.iter().copied().filter(|_| rand(2) == 0).collect();
                            Update::Endpoints(Delta::Applied(eps(&name, &ready)))
                        }
                        _ if rand(2) == 0 => Update::Services(Delta::Deleted("x".into(), name)),
                        _ => Update::Endpoints(Delta::Deleted("x".into(), name)),
                    };
                    sl.apply(u, Instant::now());
                }
                // Who keeps its room when Services compete: those the maps
                // held before this sync.
                let first = sl.programmed();
                sl.sync(false).unwrap();
                let whole = sl.view.table("n1", &sl.settings.limits, &first);
                assert_eq!(sl.table.as_ref(), Some(&whole), "round {round}");
                fake.assert_consistent();
                let m = fake.maps();
                let held: BTreeMap<Frontend, Vec<IpAddr>> = m
                    .frontends
                    .iter()
                    .map(|(fe, st)| {
                        (
                            *fe,
                            st.backends.iter().map(|id| m.backends[id].addr).collect(),
                        )
                    })
                    .collect();
                let want: BTreeMap<Frontend, Vec<IpAddr>> = whole
                    .frontends
                    .iter()
                    .map(|(fe, w)| (*fe, w.active.iter().map(|(a, _)| *a).collect()))
                    .collect();
                assert_eq!(held, want, "round {round}: the maps");
                assert_eq!(
                    m.backends.len(),
                    whole.active_backends() + whole.terminating_backends(),
                    "round {round}: no backend left behind"
                );
            }
            let n = sl.incremental_syncs;
            assert!(n >= at_least, "{limits:?}: {n} incremental syncs of 400");
        }
    }
}
