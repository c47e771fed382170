// SPDX-License-Identifier: Apache-2.0
//! Programs the Service maps from the desired table, incrementally, in an
//! order that is safe for packets in flight.
//!
//! A backend is written before the frontend whose slots name it, and goes
//! only after every frontend that named it was rewritten or removed; a
//! backend that stops being ready stays (terminating, with no slot) so its
//! connections can finish. Ids stay with what they name: a frontend keeps
//! its id as long as it exists, a backend as long as the same (frontend,
//! address, port) does, so connections keep their backends across syncs
//! and agent restarts (the first sync reads the ids the maps hold). An id
//! is handed out again only after its entry was removed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use super::compile::{Table, Wanted};

/// Frontends, backends and what a frontend holds: the datapath's own
/// types (`ferrite_datapath::service`), which its maps take as they are.
pub use ferrite_datapath::service::{Backend, Frontend, FrontendState};

/// The Service maps, as the engine uses them (the datapath's pinned maps,
/// or a fake in tests).
pub trait ServiceTarget {
    type Error: std::error::Error + Send + Sync + 'static;
    /// What the maps hold now (read once at start, so a restarted agent
    /// keeps ids and live connections).
    fn frontends(&self) -> Result<Vec<(Frontend, FrontendState)>, Self::Error>;
    fn backends(&self) -> Result<Vec<(u32, Backend)>, Self::Error>;
    fn set_backend(&mut self, id: u32, b: &Backend) -> Result<(), Self::Error>;
    fn remove_backend(&mut self, id: u32) -> Result<(), Self::Error>;
    /// Writes a frontend's slots and entry (the implementation orders the
    /// writes so a packet never sees a half-written list).
    fn set_frontend(&mut self, fe: &Frontend, st: &FrontendState) -> Result<(), Self::Error>;
    fn remove_frontend(&mut self, fe: &Frontend, st: &FrontendState) -> Result<(), Self::Error>;
}

/// The datapath's pinned maps (bpf/lib/service.h), which order their own
/// writes (`set_frontend`: slots before the count that shows them).
impl ServiceTarget for ferrite_datapath::service::ServiceMaps {
    type Error = ferrite_datapath::service::ServiceError;
    fn frontends(&self) -> Result<Vec<(Frontend, FrontendState)>, Self::Error> {
        Ok(ferrite_datapath::service::ServiceMaps::frontends(self)?)
    }
    fn backends(&self) -> Result<Vec<(u32, Backend)>, Self::Error> {
        Ok(ferrite_datapath::service::ServiceMaps::backends(self)?)
    }
    fn set_backend(&mut self, id: u32, b: &Backend) -> Result<(), Self::Error> {
        Ok(ferrite_datapath::service::ServiceMaps::set_backend(
            self, id, b,
        )?)
    }
    fn remove_backend(&mut self, id: u32) -> Result<(), Self::Error> {
        Ok(ferrite_datapath::service::ServiceMaps::remove_backend(
            self, id,
        )?)
    }
    fn set_frontend(&mut self, fe: &Frontend, st: &FrontendState) -> Result<(), Self::Error> {
        ferrite_datapath::service::ServiceMaps::set_frontend(self, fe, st)
    }
    fn remove_frontend(&mut self, fe: &Frontend, st: &FrontendState) -> Result<(), Self::Error> {
        Ok(ferrite_datapath::service::ServiceMaps::remove_frontend(
            self, fe, st,
        )?)
    }
}

/// A boxed target is a target: main.rs may hand the thread a
/// `Box<dyn ServiceTarget<Error = E>>`.
impl<T: ServiceTarget + ?Sized> ServiceTarget for Box<T> {
    type Error = T::Error;
    fn frontends(&self) -> Result<Vec<(Frontend, FrontendState)>, Self::Error> {
        (**self).frontends()
    }
    fn backends(&self) -> Result<Vec<(u32, Backend)>, Self::Error> {
        (**self).backends()
    }
    fn set_backend(&mut self, id: u32, b: &Backend) -> Result<(), Self::Error> {
        (**self).set_backend(id, b)
    }
    fn remove_backend(&mut self, id: u32) -> Result<(), Self::Error> {
        (**self).remove_backend(id)
    }
    fn set_frontend(&mut self, fe: &Frontend, st: &FrontendState) -> Result<(), Self::Error> {
        (**self).set_frontend(fe, st)
    }
    fn remove_frontend(&mut self, fe: &Frontend, st: &FrontendState) -> Result<(), Self::Error> {
        (**self).remove_frontend(fe, st)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError<E: std::error::Error + 'static> {
    #[error("the Service maps")]
    Target(#[source] E),
    #[error("no {0} id left")]
    NoId(&'static str),
}

/// What one sync left behind, for logs and /metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub frontends: usize,
    pub active_backends: usize,
    pub terminating_backends: usize,
    /// Frontends written or removed.
    pub changed: usize,
    /// Calls that wrote the maps (backends and frontends).
    pub writes: usize,
    /// Frontends (cluster IP x port) of protocols ferrite does not serve.
    pub left_to_kube_proxy: usize,
    /// Services over the limits, left out whole.
    pub left_out: usize,
}

/// Ids handed out lowest first, so they stay dense (a map indexed by id
/// stays small); a freed id comes back only once its entry is removed.
#[derive(Debug)]
struct IdPool {
    /// The lowest id never handed out (past u32::MAX: none left).
    next: u64,
    free: BTreeSet<u32>,
}

impl Default for IdPool {
    fn default() -> Self {
        IdPool {
            next: 1,
            free: BTreeSet::new(),
        }
    }
}

/// Gaps below the highest id in use are remembered up to this many (a
/// stray huge id in the maps must not make the pool huge).
const MAX_GAPS: u64 = 1 << 20;

impl IdPool {
    fn seeded(used: impl IntoIterator<Item = u32>) -> IdPool {
        let used: BTreeSet<u32> = used.into_iter().filter(|id| *id != 0).collect();
        let top = used.last().copied().unwrap_or(0);
        let free = if u64::from(top) - used.len() as u64 <= MAX_GAPS {
            (1..top).filter(|id| !used.contains(id)).collect()
        } else {
            BTreeSet::new()
        };
        IdPool {
            next: u64::from(top) + 1,
            free,
        }
    }

    fn alloc(&mut self) -> Option<u32> {
        if let Some(id) = self.free.pop_first() {
            return Some(id);
        }
        let id = u32::try_from(self.next).ok()?;
        self.next += 1;
        Some(id)
    }

    fn release(&mut self, id: u32) {
        if id != 0 && u64::from(id) < self.next {
            self.free.insert(id);
        }
    }
}

/// A frontend's map value and its backends' (id, value).
type FrontendWrites = (FrontendState, Vec<(u32, Backend)>);

/// The engine: what it believes the maps hold, and the ids it handed out.
#[derive(Debug, Default)]
pub struct Engine {
    /// The maps were read (at the first sync, and after an error).
    loaded: bool,
    frontends: BTreeMap<Frontend, FrontendState>,
    backends: BTreeMap<u32, Backend>,
    /// (frontend id, address, port) -> backend id.
    by_key: HashMap<(u32, IpAddr, u16), u32>,
    frontend_ids: IdPool,
    backend_ids: IdPool,
}

impl Engine {
    pub fn new() -> Engine {
        Engine::default()
    }

    /// Forgets what it believes: the next sync reads the maps again.
    pub fn reset(&mut self) {
        self.loaded = false;
    }

    fn load<T: ServiceTarget + ?Sized>(&mut self, target: &T) -> Result<(), T::Error> {
        self.frontends = target.frontends()?.into_iter().collect();
        self.backends = target.backends()?.into_iter().collect();
        self.by_key.clear();
        // Two ids for one key (a crash between writes): the lowest is
        // kept, the other goes as unused.
        for (id, b) in &self.backends {
            self.by_key
                .entry((b.frontend, b.addr, b.port))
                .or_insert(*id);
        }
        self.frontend_ids = IdPool::seeded(self.frontends.values().map(|s| s.id));
        self.backend_ids = IdPool::seeded(self.backends.keys().copied());
        self.loaded = true;
        Ok(())
    }

    /// Reads the maps, unless read since the last error.
    pub fn prepare<T: ServiceTarget + ?Sized>(
        &mut self,
        target: &T,
    ) -> Result<(), SyncError<T::Error>> {
        if !self.loaded {
            self.load(target).map_err(SyncError::Target)?;
        }
        Ok(())
    }

    /// Whether the maps hold `fe` (as far as the engine knows).
    pub fn holds(&self, fe: &Frontend) -> bool {
        self.frontends.contains_key(fe)
    }

    /// Makes the maps hold `table`. After an error the maps are read again
    /// at the next sync (some writes may have happened).
    pub fn sync<T: ServiceTarget + ?Sized>(
        &mut self,
        table: &Table,
        target: &mut T,
    ) -> Result<SyncReport, SyncError<T::Error>> {
        let result = self.apply(table, target);
        if result.is_err() {
            self.loaded = false;
        }
        result
    }

    /// Makes the maps hold `table` for the frontends in `touched` only
    /// (those a change could have altered; [`Table::update_service`]
    /// says which): the same writes, in the same order, as [`Engine::sync`]
    /// makes for them, without looking at every other frontend.
    pub fn sync_some<T: ServiceTarget + ?Sized>(
        &mut self,
        table: &Table,
        touched: &BTreeSet<Frontend>,
        target: &mut T,
    ) -> Result<SyncReport, SyncError<T::Error>> {
        let result = self.apply_some(table, touched, target);
        if result.is_err() {
            self.loaded = false;
        }
        result
    }

    fn report_of(table: &Table) -> SyncReport {
        SyncReport {
            frontends: table.frontends.len(),
            active_backends: table.active_backends(),
            terminating_backends: table.terminating_backends(),
            left_to_kube_proxy: table.left_to_kube_proxy,
            left_out: table.left_out.len(),
            ..SyncReport::default()
        }
    }

    /// The ids and map values `wanted` needs at `fe`: ids it has keep,
    /// new ones are allocated.
    fn want<E: std::error::Error + 'static>(
        &mut self,
        fe: &Frontend,
        wanted: &Wanted,
    ) -> Result<FrontendWrites, SyncError<E>> {
        let fid = match self.frontends.get(fe) {
            Some(st) => st.id,
            None => self
                .frontend_ids
                .alloc()
                .ok_or(SyncError::NoId("frontend"))?,
        };
        let mut slots = Vec::with_capacity(wanted.active.len());
        let mut backends = Vec::with_capacity(wanted.active.len() + wanted.terminating.len());
        let all = wanted
            .active
            .iter()
            .map(|b| (b, false))
            .chain(wanted.terminating.iter().map(|b| (b, true)));
        for ((addr, port), terminating) in all {
            let key = (fid, *addr, *port);
            let id = match self.by_key.get(&key) {
                Some(id) => *id,
                None => {
                    let id = self.backend_ids.alloc().ok_or(SyncError::NoId("backend"))?;
                    self.by_key.insert(key, id);
                    id
                }
            };
            backends.push((
                id,
                Backend {
                    frontend: fid,
                    addr: *addr,
                    port: *port,
                    terminating,
                },
            ));
            if !terminating {
                slots.push(id);
            }
        }
        let st = FrontendState {
            id: fid,
            backends: slots,
            affinity_timeout: wanted.affinity,
            source_nat: wanted.source_nat,
        };
        Ok((st, backends))
    }

    /// Removes backend `id` from the maps and the engine's books.
    fn drop_backend<T: ServiceTarget + ?Sized>(
        &mut self,
        id: u32,
        target: &mut T,
    ) -> Result<(), SyncError<T::Error>> {
        target.remove_backend(id).map_err(SyncError::Target)?;
        if let Some(b) = self.backends.remove(&id) {
            let key = (b.frontend, b.addr, b.port);
            if self.by_key.get(&key) == Some(&id) {
                self.by_key.remove(&key);
            }
        }
        self.backend_ids.release(id);
        Ok(())
    }

    fn apply_some<T: ServiceTarget + ?Sized>(
        &mut self,
        table: &Table,
        touched: &BTreeSet<Frontend>,
        target: &mut T,
    ) -> Result<SyncReport, SyncError<T::Error>> {
        self.prepare(target)?;
        let mut report = Self::report_of(table);
        for fe in touched {
            let had = self.frontends.get(fe).map(|st| st.id);
            let mut keep = BTreeSet::new();
            match table.frontends.get(fe) {
                Some(wanted) => {
                    let (st, backends) = self.want(fe, wanted)?;
                    for (id, b) in backends {
                        keep.insert(id);
                        if self.backends.get(&id) != Some(&b) {
                            target.set_backend(id, &b).map_err(SyncError::Target)?;
                            self.backends.insert(id, b);
                            report.writes += 1;
                        }
                    }
                    if self.frontends.get(fe) != Some(&st) {
                        target.set_frontend(fe, &st).map_err(SyncError::Target)?;
                        self.frontends.insert(*fe, st);
                        report.writes += 1;
                        report.changed += 1;
                    }
                }
                None => {
                    if let Some(st) = self.frontends.remove(fe) {
                        if let Err(e) = target.remove_frontend(fe, &st) {
                            self.frontends.insert(*fe, st);
                            return Err(SyncError::Target(e));
                        }
                        self.frontend_ids.release(st.id);
                        report.writes += 1;
                        report.changed += 1;
                    }
                }
            }
            // The frontend's backends it no longer has.
            if let Some(fid) = had {
                let unused: Vec<u32> = self
                    .backends
                    .iter()
                    .filter(|(id, b)| b.frontend == fid && !keep.contains(*id))
                    .map(|(id, _)| *id)
                    .collect();
                for id in unused {
                    self.drop_backend(id, target)?;
                    report.writes += 1;
                }
            }
        }
        Ok(report)
    }

    fn apply<T: ServiceTarget + ?Sized>(
        &mut self,
        table: &Table,
        target: &mut T,
    ) -> Result<SyncReport, SyncError<T::Error>> {
        self.prepare(target)?;
        let mut report = Self::report_of(table);

        // Every id the table needs, allocated while everything the maps
        // hold still holds its id.
        let mut want_frontends: Vec<(Frontend, FrontendState)> = Vec::new();
        let mut want_backends: BTreeMap<u32, Backend> = BTreeMap::new();
        for (fe, wanted) in &table.frontends {
            let (st, backends) = self.want(fe, wanted)?;
            want_backends.extend(backends);
            want_frontends.push((*fe, st));
        }

        // 1. Backends new or changed, before a frontend names them.
        for (id, b) in &want_backends {
            if self.backends.get(id) != Some(b) {
                target.set_backend(*id, b).map_err(SyncError::Target)?;
                self.backends.insert(*id, *b);
                report.writes += 1;
            }
        }
        // 2. Frontends new or changed.
        for (fe, st) in want_frontends {
            if self.frontends.get(&fe) != Some(&st) {
                target.set_frontend(&fe, &st).map_err(SyncError::Target)?;
                self.frontends.insert(fe, st);
                report.writes += 1;
                report.changed += 1;
            }
        }
        // 3. Frontends gone.
        let gone: Vec<Frontend> = self
            .frontends
            .keys()
            .filter(|fe| !table.frontends.contains_key(fe))
            .copied()
            .collect();
        for fe in gone {
            let st = &self.frontends[&fe];
            target.remove_frontend(&fe, st).map_err(SyncError::Target)?;
            let id = st.id;
            self.frontends.remove(&fe);
            self.frontend_ids.release(id);
            report.writes += 1;
            report.changed += 1;
        }
        // 4. Backends no frontend has any more.
        let unused: Vec<u32> = self
            .backends
            .keys()
            .filter(|id| !want_backends.contains_key(id))
            .copied()
            .collect();
        for id in unused {
            self.drop_backend(id, target)?;
            report.writes += 1;
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::super::compile::{Limits, ServiceView, Wanted};
    use super::super::fake::{Call, Fake};
    use super::*;
    use crate::service::model::{PROTO_TCP, PROTO_UDP};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn fe(a: &str, port: u16) -> Frontend {
        Frontend {
            addr: ip(a),
            port,
            proto: PROTO_TCP,
        }
    }

    /// A table from (frontend, ready, not ready) by hand.
    fn table(rows: &[(Frontend, &[&str], &[&str])]) -> Table {
        let mut t = Table::default();
        for (f, active, term) in rows {
            let b = |l: &[&str]| l.iter().map(|a| (ip(a), 8080)).collect();
            t.frontends.insert(
                *f,
                Wanted {
                    service: ("x".into(), format!("s{}", f.port)),
                    active: b(active),
                    terminating: b(term),
                    affinity: None,
                    source_nat: false,
                },
            );
        }
        t
    }

    fn sync(e: &mut Engine, t: &Table, f: &mut Fake) -> SyncReport {
        f.take_calls();
        let r = e.sync(t, f).unwrap();
        f.assert_consistent();
        r
    }

    #[test]
    fn a_new_frontend_is_written_after_its_backends() {
        let mut f = Fake::default();
        let mut e = Engine::new();
        let t = table(&[(
            fe("10.96.0.1", 80),
            &["10.0.1.2", "10.0.1.3"],
            &["10.0.1.4"],
        )]);
        let r = sync(&mut e, &t, &mut f);
        assert_eq!(
            (r.frontends, r.active_backends, r.terminating_backends),
            (1, 2, 1)
        );
        assert_eq!((r.changed, r.writes), (1, 4));
        let calls = f.take_calls();
        assert_eq!(calls.len(), 4);
        assert!(matches!(calls[3], Call::SetFrontend(_)), "{calls:?}");
        let maps = f.maps();
        let st = &maps.frontends[&fe("10.96.0.1", 80)];
        assert_ne!(st.id, 0);
        assert_eq!(st.backends.len(), 2, "the terminating one has no slot");
        let b = st.backends.iter().map(|id| maps.backends[id].addr);
        assert_eq!(b.collect::<Vec<_>>(), [ip("10.0.1.2"), ip("10.0.1.3")]);
        assert!(maps.backends.values().any(|b| b.terminating));
    }

    #[test]
    fn an_unchanged_resync_writes_nothing() {
        let mut f = Fake::default();
        let mut e = Engine::new();
        let t = table(&[
            (fe("10.96.0.1", 80), &["10.0.1.2"], &[]),
            (fe("10.96.0.2", 80), &[], &[]),
        ]);
        sync(&mut e, &t, &mut f);
        let r = sync(&mut e, &t, &mut f);
        assert_eq!((r.changed, r.writes), (0, 0));
        assert!(f.take_calls().is_empty());
    }

    #[test]
    fn ids_stay_with_what_they_name_across_syncs_and_restarts() {
        let mut f = Fake::default();
        let mut e = Engine::new();
        let a = fe("10.96.0.1", 80);
        let b = fe("10.96.0.2", 53);
        sync(
            &mut e,
            &table(&[(a, &["10.0.1.2", "10.0.1.3"], &[]), (b, &["10.0.1.2"], &[])]),
            &mut f,
        );
        let before = f.maps();
        let id_of = |m: &super::super::fake::FakeMaps, addr: &str, fid: u32| {
            m.backends
                .iter()
                .find(|(_, b)| b.addr == ip(addr) && b.frontend == fid)
                .map(|(id, _)| *id)
                .unwrap()
        };
        let (fa, fb) = (before.frontends[&a].id, before.frontends[&b].id);
        assert_ne!(fa, fb);
        let kept = id_of(&before, "10.0.1.3", fa);
        assert_ne!(
            id_of(&before, "10.0.1.2", fa),
            id_of(&before, "10.0.1.2", fb),
            "one backend id per frontend"
        );

        // 10.0.1.2 goes from a, 10.0.1.4 arrives: 10.0.1.3 keeps its id.
        let t = table(&[(a, &["10.0.1.3", "10.0.1.4"], &[]), (b, &["10.0.1.2"], &[])]);
        sync(&mut e, &t, &mut f);
        let after = f.maps();
        assert_eq!(after.frontends[&a].id, fa);
        assert_eq!(id_of(&after, "10.0.1.3", fa), kept);

        // A new engine over the same maps (an agent restart) takes the ids
        // the maps hold and writes nothing.
        let mut restarted = Engine::new();
        let r = sync(&mut restarted, &t, &mut f);
        assert_eq!(r.writes, 0);
        assert!(f.take_calls().is_empty());
        // And what it allocates next does not collide with them.
        let c = fe("10.96.0.3", 80);
        let t2 = table(&[
            (a, &["10.0.1.3", "10.0.1.4"], &[]),
            (b, &["10.0.1.2"], &[]),
            (c, &["10.0.1.9"], &[]),
        ]);
        sync(&mut restarted, &t2, &mut f);
        let m = f.maps();
        assert_eq!(m.frontends[&a].id, fa);
        assert_eq!(id_of(&m, "10.0.1.3", fa), kept);
        assert_eq!(m.frontends.len(), 3);
    }

    #[test]
    fn ready_to_terminating_rewrites_the_backend_first_and_keeps_it() {
        let mut f = Fake::default();
        let mut e = Engine::new();
        let a = fe("10.96.0.1", 80);
        sync(
            &mut e,
            &table(&[(a, &["10.0.1.2", "10.0.1.3"], &[])]),
            &mut f,
        );
        let id3 = f
            .maps()
            .backends
            .iter()
            .find(|(_, b)| b.addr == ip("10.0.1.3"))
            .map(|(id, _)| *id)
            .unwrap();
        let r = sync(&mut e, &table(&[(a, &["10.0.1.2"], &["10.0.1.3"])]), &mut f);
        assert_eq!((r.active_backends, r.terminating_backends), (1, 1));
        let calls = f.take_calls();
        assert_eq!(calls, vec![Call::SetBackend(id3), Call::SetFrontend(a)]);
        assert!(f.maps().backends[&id3].terminating);

        // Gone from the Endpoints: the frontend drops nothing (no slot),
        // the backend goes.
        sync(&mut e, &table(&[(a, &["10.0.1.2"], &[])]), &mut f);
        assert_eq!(f.take_calls(), vec![Call::RemoveBackend(id3)]);
    }

    #[test]
    fn a_frontend_goes_before_its_backends_and_ids_come_back_only_after() {
        let mut f = Fake::default();
        let mut e = Engine::new();
        let a = fe("10.96.0.1", 80);
        let b = fe("10.96.0.2", 80);
        sync(&mut e, &table(&[(a, &["10.0.1.2"], &["10.0.1.5"])]), &mut f);
        let old = f.maps();
        let old_fid = old.frontends[&a].id;
        let old_bids: BTreeSet<u32> = old.backends.keys().copied().collect();

        // a goes, b arrives in the same sync: b must not take a's ids
        // while a's entries are still in the maps.
        sync(&mut e, &table(&[(b, &["10.0.1.7"], &[])]), &mut f);
        let calls = f.take_calls();
        let pos = |c: &Call| calls.iter().position(|x| x == c).unwrap();
        assert!(pos(&Call::SetFrontend(b)) < pos(&Call::RemoveFrontend(a)));
        for id in &old_bids {
            assert!(pos(&Call::RemoveFrontend(a)) < pos(&Call::RemoveBackend(*id)));
        }
        let m = f.maps();
        assert_ne!(m.frontends[&b].id, old_fid);
        assert!(m.backends.keys().all(|id| !old_bids.contains(id)));

        // Now removed, they may be handed out again (lowest first).
        let c = fe("10.96.0.3", 80);
        sync(
            &mut e,
            &table(&[(b, &["10.0.1.7"], &[]), (c, &[], &[])]),
            &mut f,
        );
        assert_eq!(f.maps().frontends[&c].id, old_fid);
    }

    #[test]
    fn after_an_error_the_maps_are_read_again() {
        let mut f = Fake::default();
        let mut e = Engine::new();
        let a = fe("10.96.0.1", 80);
        let t = table(&[(a, &["10.0.1.2", "10.0.1.3"], &[])]);
        f.fail_at(1); // the second write fails
        assert!(matches!(e.sync(&t, &mut f), Err(SyncError::Target(_))));
        assert_eq!(f.maps().backends.len(), 1, "one backend got written");
        let r = sync(&mut e, &t, &mut f);
        assert_eq!(
            r.writes, 2,
            "only what is missing: one backend, the frontend"
        );
        assert_eq!(f.maps().backends.len(), 2);
    }

    #[test]
    fn affinity_changes_rewrite_the_frontend_only() {
        let mut f = Fake::default();
        let mut e = Engine::new();
        let a = Frontend {
            addr: ip("10.96.0.1"),
            port: 53,
            proto: PROTO_UDP,
        };
        let mut t = table(&[(a, &["10.0.1.2"], &[])]);
        sync(&mut e, &t, &mut f);
        t.frontends.get_mut(&a).unwrap().affinity = Some(10_800);
        sync(&mut e, &t, &mut f);
        assert_eq!(f.take_calls(), vec![Call::SetFrontend(a)]);
        assert_eq!(f.maps().frontends[&a].affinity_timeout, Some(10_800));
    }

    #[test]
    fn a_service_over_the_limits_does_not_disturb_another() {
        use crate::service::model::{
            EndpointAddr, EndpointPort, EndpointsInfo, ServiceInfo, ServicePort, Subset,
        };
        let svc = |name: &str, ip_: &str| ServiceInfo {
            namespace: "x".into(),
            name: name.into(),
            external_name: false,
            cluster_ips: vec![ip(ip_)],
            ports: vec![ServicePort {
                name: String::new(),
                proto: PROTO_TCP,
                port: 80,
                node_port: None,
            }],
            affinity: None,
            internal_local: false,
            external_local: false,
        };
        let eps = |name: &str, n: usize| EndpointsInfo {
            namespace: "x".into(),
            name: name.into(),
            subsets: vec![Subset {
                ready: (0..n)
                    .map(|i| EndpointAddr {
                        ip: ip(&format!("10.1.{}.{}", i / 200, i % 200 + 1)),
                        node: None,
                    })
                    .collect(),
                not_ready: vec![],
                ports: vec![EndpointPort {
                    name: String::new(),
                    proto: PROTO_TCP,
                    port: 8080,
                }],
            }],
        };
        let mut v = ServiceView::default();
        let key = |n: &str| ("x".to_string(), n.to_string());
        v.services.insert(key("a"), svc("a", "10.96.0.1"));
        v.endpoints.insert(key("a"), eps("a", 2));
        v.services.insert(key("big"), svc("big", "10.96.0.2"));
        v.endpoints.insert(key("big"), eps("big", 10));
        let mut f = Fake::default();
        let mut e = Engine::new();
        sync(
            &mut e,
            &v.table("n1", &Limits::default(), &BTreeSet::new()),
            &mut f,
        );
        let before = f.maps();
        assert_eq!(before.frontends.len(), 2);

        // big grows past a frontend's slots: it goes whole, a stays as it was.
        v.endpoints.insert(key("big"), eps("big", 300));
        let t = v.table("n1", &Limits::default(), &BTreeSet::new());
        let r = sync(&mut e, &t, &mut f);
        assert_eq!((r.left_out, r.frontends), (1, 1));
        let calls = f.take_calls();
        assert!(
            !calls.iter().any(|c| matches!(c, Call::SetFrontend(_))),
            "{calls:?}"
        );
        let after = f.maps();
        let a = fe("10.96.0.1", 80);
        assert_eq!(after.frontends[&a], before.frontends[&a]);
        assert_eq!(after.backends.len(), 2);
    }

    #[test]
    fn id_pool_fills_gaps_and_reuses_only_released_ids() {
        let mut p = IdPool::seeded([1, 4, 5]);
        assert_eq!(
            [p.alloc(), p.alloc(), p.alloc()],
            [Some(2), Some(3), Some(6)]
        );
        p.release(4);
        assert_eq!(p.alloc(), Some(4));
        let mut p = IdPool::seeded([]);
        assert_eq!(p.alloc(), Some(1), "never 0");
        let mut p = IdPool::seeded([u32::MAX]);
        assert_eq!(p.alloc(), None, "a stray id at the top: no room, no panic");
    }
}
