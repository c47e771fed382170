//! The Service maps (`bpf/lib/service.h`) as the node agent writes them
//! and `ferrite services` reads them.
//!
//! A frontend (Service address, port, protocol) has an id, a count of
//! active backends and their ids in slots `1..=count`. [`ServiceMaps::set_frontend`]
//! writes the slots before the count that makes them visible, and drops
//! surplus slots only after the count shrank, so a packet never picks a
//! slot that is not written. Backends are written before the frontends
//! that name them and removed after (the engine in the agent keeps that
//! order).

use std::{
    net::IpAddr,
    os::fd::{AsFd, OwnedFd},
};

use crate::{
    maps::{keys, on, possible_cpus, MapError},
    sys::{self, BPF_ANY},
    types::{ip_from_key, ip_key},
};

pub(crate) const SVC_MAP: &str = "ferrite_svc";
pub(crate) const SLOT_MAP: &str = "ferrite_svcslot";
pub(crate) const BACKEND_MAP: &str = "ferrite_backend";
pub(crate) const SVCCT_MAP: &str = "ferrite_svcct";
pub(crate) const SVCREV_MAP: &str = "ferrite_svcrev";
pub(crate) const SVCAFF_MAP: &str = "ferrite_svcaff";
pub(crate) const SVCSTAT_MAP: &str = "ferrite_svcstat";
pub(crate) const SVCCFG_MAP: &str = "ferrite_svccfg";

/// `SVC_F_AFFINITY`: sessionAffinity ClientIP.
const SVC_F_AFFINITY: u32 = 1;
/// `SVC_F_SNAT`: a NodePort whose flows to other nodes' backends take the
/// node's address (externalTrafficPolicy Cluster).
const SVC_F_SNAT: u32 = 2;
/// `SVCCFG_NODEPORTS` in `ferrite_svccfg`.
const SVCCFG_NODEPORTS: u32 = 1;
/// `SVCCFG_HOSTPORTS` in `ferrite_svccfg`.
const SVCCFG_HOSTPORTS: u32 = 2;
/// `SVC_SCOPE_HOSTPORT`: the key byte that sets ADD's hostPorts apart from
/// the agent's frontends.
const SVC_SCOPE_HOSTPORT: u8 = 1;

/// The lowest id of a hostPort's frontend and backend. ADD takes them at
/// random from the top half of the id space (a hostPort's frontend and its
/// one backend share one id); the agent hands out its own from 1 up, and
/// never sees these.
pub const HOSTPORT_ID_MIN: u32 = 0x8000_0000;
/// `BACKEND_F_TERMINATING`.
const BACKEND_F_TERMINATING: u32 = 1;

/// The most active backends one frontend may have (slots are a hash map;
/// this bounds what one Service takes of `ferrite_svcslot`).
pub const MAX_BACKENDS_PER_FRONTEND: usize = 4096;

/// A Service address, port and protocol (6 TCP, 17 UDP). A NodePort's
/// address is the unspecified one of its family (0.0.0.0 or ::): every
/// address of the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: u8,
}

/// A backend of one frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend {
    /// The id of the frontend it serves.
    pub frontend: u32,
    pub addr: IpAddr,
    pub port: u16,
    /// No new flows go there; TCP connections to it may finish.
    pub terminating: bool,
}

/// A hostPort as a pod's runtimeConfig.portMappings asks for it: its
/// frontend (the hostIP, or the family's unspecified address for every
/// address of the node; hostPort; protocol) and the pod's address and
/// containerPort.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostPort {
    pub frontend: Frontend,
    pub backend: IpAddr,
    pub backend_port: u16,
}

fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: getrandom writes at most b.len() bytes into b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // No entropy source: the clock's low bits still spread the ids.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() ^ std::process::id().rotate_left(16))
            .unwrap_or(0);
        return t;
    }
    u32::from_ne_bytes(b)
}

/// What a frontend holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendState {
    /// Never 0.
    pub id: u32,
    /// The active backends' ids, in slot order.
    pub backends: Vec<u32>,
    /// sessionAffinity ClientIP, with its timeout in seconds.
    pub affinity_timeout: Option<u32>,
    /// A NodePort whose flows from outside to another node's backend take
    /// this node's address as their source (externalTrafficPolicy Cluster).
    pub source_nat: bool,
}

/// A frontend's counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// Packets translated towards a backend.
    pub packets: u64,
    pub bytes: u64,
    /// Backends chosen: new flows, and flows whose backend went away.
    pub flows: u64,
    /// Packets answered "port unreachable": no backend.
    pub rejected: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Map(#[from] MapError),
    #[error("frontend {0:?}: id 0 is reserved")]
    ZeroId(Frontend),
    #[error("frontend {fe:?}: {n} backends (at most {MAX_BACKENDS_PER_FRONTEND})")]
    TooManyBackends { fe: Frontend, n: usize },
}

/// Handles to the Service maps.
#[derive(Debug)]
pub struct ServiceMaps {
    pub(crate) svc: OwnedFd,
    pub(crate) slots: OwnedFd,
    pub(crate) backends: OwnedFd,
    pub(crate) ct: OwnedFd,
    pub(crate) rev: OwnedFd,
    pub(crate) aff: OwnedFd,
    pub(crate) stats: OwnedFd,
    pub(crate) cfg: OwnedFd,
}

fn svc_key(fe: &Frontend) -> [u8; 20] {
    let mut k = [0u8; 20];
    k[..16].copy_from_slice(&ip_key(fe.addr));
    k[16..18].copy_from_slice(&fe.port.to_be_bytes());
    k[18] = fe.proto;
    k
}

fn hostport_key(fe: &Frontend) -> [u8; 20] {
    let mut k = svc_key(fe);
    k[19] = SVC_SCOPE_HOSTPORT;
    k
}

fn frontend_of(k: &[u8; 20]) -> Frontend {
    Frontend {
        addr: ip_from_key(k[..16].try_into().expect("16 bytes")),
        port: u16::from_be_bytes([k[16], k[17]]),
        proto: k[18],
    }
}

fn slot_key(id: u32, slot: u32) -> [u8; 8] {
    let mut k = [0u8; 8];
    k[..4].copy_from_slice(&id.to_ne_bytes());
    k[4..].copy_from_slice(&slot.to_ne_bytes());
    k
}

/// A `struct svc_value`.
fn svc_value(st: &FrontendState) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..4].copy_from_slice(&st.id.to_ne_bytes());
    v[4..8].copy_from_slice(&(st.backends.len() as u32).to_ne_bytes());
    let mut flags = 0;
    if st.affinity_timeout.is_some() {
        flags |= SVC_F_AFFINITY;
    }
    if st.source_nat {
        flags |= SVC_F_SNAT;
    }
    v[8..12].copy_from_slice(&flags.to_ne_bytes());
    v[12..].copy_from_slice(&st.affinity_timeout.unwrap_or(0).to_ne_bytes());
    v
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// A `struct backend`.
fn backend_value(b: &Backend) -> [u8; 32] {
    let mut v = [0u8; 32];
    v[..16].copy_from_slice(&ip_key(b.addr));
    v[16..18].copy_from_slice(&b.port.to_be_bytes());
    v[20..24].copy_from_slice(&b.frontend.to_ne_bytes());
    let flags = if b.terminating {
        BACKEND_F_TERMINATING
    } else {
        0
    };
    v[24..28].copy_from_slice(&flags.to_ne_bytes());
    v
}

fn backend_of(v: &[u8; 32]) -> Backend {
    Backend {
        addr: ip_from_key(v[..16].try_into().expect("16 bytes")),
        port: u16::from_be_bytes([v[16], v[17]]),
        frontend: u32_at(v, 20),
        terminating: u32_at(v, 24) & BACKEND_F_TERMINATING != 0,
    }
}

impl crate::Datapath {
    /// Every hostPort of the node with its id ([`ServiceMaps::host_ports`]).
    pub fn host_ports(&self) -> Result<Vec<(HostPort, u32)>, crate::DatapathError> {
        Ok(self.service_maps()?.host_ports()?)
    }

    /// Handles to the Service maps.
    pub fn service_maps(&self) -> Result<ServiceMaps, crate::DatapathError> {
        Ok(ServiceMaps {
            svc: self.open_pin(SVC_MAP)?,
            slots: self.open_pin(SLOT_MAP)?,
            backends: self.open_pin(BACKEND_MAP)?,
            ct: self.open_pin(SVCCT_MAP)?,
            rev: self.open_pin(SVCREV_MAP)?,
            aff: self.open_pin(SVCAFF_MAP)?,
            stats: self.open_pin(SVCSTAT_MAP)?,
            cfg: self.open_pin(SVCCFG_MAP)?,
        })
    }
}

impl ServiceMaps {
    fn entry_at(&self, key: &[u8; 20]) -> Result<Option<[u8; 16]>, MapError> {
        let mut v = [0u8; 16];
        Ok(sys::map_lookup(self.svc.as_fd(), key, &mut v)
            .map_err(on(SVC_MAP))?
            .then_some(v))
    }

    fn entry(&self, fe: &Frontend) -> Result<Option<[u8; 16]>, MapError> {
        self.entry_at(&svc_key(fe))
    }

    /// Every frontend with what it holds.
    pub fn frontends(&self) -> Result<Vec<(Frontend, FrontendState)>, MapError> {
        let mut out = Vec::new();
        for k in keys::<20>(&self.svc, SVC_MAP)? {
            // ADD's hostPorts are not the agent's to see.
            if k[19] != 0 {
                continue;
            }
            let fe = frontend_of(&k);
            // Gone between the walk and the read: skip it.
            let Some(v) = self.entry(&fe)? else { continue };
            let (id, count, flags) = (u32_at(&v, 0), u32_at(&v, 4), u32_at(&v, 8));
            let mut backends = Vec::with_capacity(count as usize);
            for slot in 1..=count {
                let mut b = [0u8; 4];
                if sys::map_lookup(self.slots.as_fd(), &slot_key(id, slot), &mut b)
                    .map_err(on(SLOT_MAP))?
                {
                    backends.push(u32::from_ne_bytes(b));
                }
            }
            let affinity_timeout = (flags & SVC_F_AFFINITY != 0).then(|| u32_at(&v, 12));
            out.push((
                fe,
                FrontendState {
                    id,
                    backends,
                    affinity_timeout,
                    source_nat: flags & SVC_F_SNAT != 0,
                },
            ));
        }
        out.sort_by_key(|(fe, _)| *fe);
        Ok(out)
    }

    /// Every backend of the agent's frontends, by id.
    pub fn backends(&self) -> Result<Vec<(u32, Backend)>, MapError> {
        let mut out = Vec::new();
        for k in keys::<4>(&self.backends, BACKEND_MAP)? {
            let id = u32::from_ne_bytes(k);
            if id >= HOSTPORT_ID_MIN {
                continue;
            }
            if let Some(b) = self.backend(id)? {
                out.push((id, b));
            }
        }
        out.sort_by_key(|(id, _)| *id);
        Ok(out)
    }

    pub fn set_backend(&self, id: u32, b: &Backend) -> Result<(), MapError> {
        sys::map_update(
            self.backends.as_fd(),
            &id.to_ne_bytes(),
            &backend_value(b),
            BPF_ANY,
        )
        .map_err(on(BACKEND_MAP))
    }

    pub fn remove_backend(&self, id: u32) -> Result<(), MapError> {
        sys::map_delete(self.backends.as_fd(), &id.to_ne_bytes()).map_err(on(BACKEND_MAP))?;
        Ok(())
    }

    /// Writes frontend `fe`: its slots, then its entry (which makes them
    /// visible), then removes the slots past its new count. Its counters
    /// start at zero the first time.
    pub fn set_frontend(&self, fe: &Frontend, st: &FrontendState) -> Result<(), ServiceError> {
        if st.id == 0 {
            return Err(ServiceError::ZeroId(*fe));
        }
        if st.backends.len() > MAX_BACKENDS_PER_FRONTEND {
            return Err(ServiceError::TooManyBackends {
                fe: *fe,
                n: st.backends.len(),
            });
        }
        let old = self.entry(fe)?;
        let old_count = match old {
            Some(v) if u32_at(&v, 0) == st.id => u32_at(&v, 4),
            _ => 0,
        };
        let count = st.backends.len() as u32;
        // Slots the current entry shows are rewritten in place: a packet
        // reading one meanwhile gets the old backend or the new, both live
        // (backends are removed after the frontends that name them).
        for (i, b) in st.backends.iter().enumerate() {
            sys::map_update(
                self.slots.as_fd(),
                &slot_key(st.id, i as u32 + 1),
                &b.to_ne_bytes(),
                BPF_ANY,
            )
            .map_err(on(SLOT_MAP))?;
        }
        self.ensure_stats(st.id)?;
        sys::map_update(self.svc.as_fd(), &svc_key(fe), &svc_value(st), BPF_ANY)
            .map_err(on(SVC_MAP))?;
        for slot in count + 1..=old_count {
            sys::map_delete(self.slots.as_fd(), &slot_key(st.id, slot)).map_err(on(SLOT_MAP))?;
        }
        Ok(())
    }

    /// Removes frontend `fe`: its entry first, then its slots and counters.
    pub fn remove_frontend(&self, fe: &Frontend, st: &FrontendState) -> Result<(), MapError> {
        let count = match self.entry(fe)? {
            Some(v) if u32_at(&v, 0) == st.id => u32_at(&v, 4),
            _ => 0,
        };
        sys::map_delete(self.svc.as_fd(), &svc_key(fe)).map_err(on(SVC_MAP))?;
        for slot in 1..=count.max(st.backends.len() as u32) {
            sys::map_delete(self.slots.as_fd(), &slot_key(st.id, slot)).map_err(on(SLOT_MAP))?;
        }
        sys::map_delete(self.stats.as_fd(), &st.id.to_ne_bytes()).map_err(on(SVCSTAT_MAP))?;
        Ok(())
    }

    fn ensure_stats(&self, id: u32) -> Result<(), MapError> {
        let zero = vec![0u8; 32 * possible_cpus()?];
        match sys::map_update(
            self.stats.as_fd(),
            &id.to_ne_bytes(),
            &zero,
            sys::BPF_NOEXIST,
        ) {
            Err(e) if e.errno() == Some(libc::EEXIST) => Ok(()),
            r => r.map_err(on(SVCSTAT_MAP)),
        }
    }

    /// Frontend `id`'s counters, summed over CPUs.
    pub fn stats(&self, id: u32) -> Result<Option<ServiceStats>, MapError> {
        let cpus = possible_cpus()?;
        let mut buf = vec![0u8; 32 * cpus];
        if !sys::map_lookup(self.stats.as_fd(), &id.to_ne_bytes(), &mut buf)
            .map_err(on(SVCSTAT_MAP))?
        {
            return Ok(None);
        }
        let mut s = ServiceStats::default();
        let at = |c: &[u8], i: usize| u64::from_ne_bytes(c[i * 8..i * 8 + 8].try_into().unwrap());
        for c in buf.chunks_exact(32) {
            s.packets += at(c, 0);
            s.bytes += at(c, 1);
            s.flows += at(c, 2);
            s.rejected += at(c, 3);
        }
        Ok(Some(s))
    }

    /// Which frontends of the node's own addresses the programs serve:
    /// NodePorts (frontends with the unspecified address) only where
    /// kube-proxy does not run; hostPorts where ferrite, not portmap, has
    /// the portMappings capability. The agent is the only writer.
    pub fn set_node_frontends(&self, nodeports: bool, hostports: bool) -> Result<(), MapError> {
        let mut v = 0;
        if nodeports {
            v |= SVCCFG_NODEPORTS;
        }
        if hostports {
            v |= SVCCFG_HOSTPORTS;
        }
        sys::map_update(
            self.cfg.as_fd(),
            &0u32.to_ne_bytes(),
            &v.to_ne_bytes(),
            BPF_ANY,
        )
        .map_err(on(SVCCFG_MAP))
    }

    fn config(&self) -> Result<u32, MapError> {
        let mut v = [0u8; 4];
        sys::map_lookup(self.cfg.as_fd(), &0u32.to_ne_bytes(), &mut v).map_err(on(SVCCFG_MAP))?;
        Ok(u32::from_ne_bytes(v))
    }

    pub fn nodeports(&self) -> Result<bool, MapError> {
        Ok(self.config()? & SVCCFG_NODEPORTS != 0)
    }

    pub fn hostports(&self) -> Result<bool, MapError> {
        Ok(self.config()? & SVCCFG_HOSTPORTS != 0)
    }

    /// The id of hostPort `fe`'s entry.
    fn hostport_entry(&self, fe: &Frontend) -> Result<Option<u32>, MapError> {
        Ok(self.entry_at(&hostport_key(fe))?.map(|v| u32_at(&v, 0)))
    }

    fn backend(&self, id: u32) -> Result<Option<Backend>, MapError> {
        let mut v = [0u8; 32];
        Ok(
            sys::map_lookup(self.backends.as_fd(), &id.to_ne_bytes(), &mut v)
                .map_err(on(BACKEND_MAP))?
                .then(|| backend_of(&v)),
        )
    }

    /// Removes hostPort id `id`'s slot, backend and counters.
    fn forget_hostport_id(&self, id: u32) -> Result<(), MapError> {
        sys::map_delete(self.slots.as_fd(), &slot_key(id, 1)).map_err(on(SLOT_MAP))?;
        sys::map_delete(self.backends.as_fd(), &id.to_ne_bytes()).map_err(on(BACKEND_MAP))?;
        sys::map_delete(self.stats.as_fd(), &id.to_ne_bytes()).map_err(on(SVCSTAT_MAP))?;
        Ok(())
    }

    /// Writes hostPort `hp`: its backend under an id of its own (taken at
    /// random above [`HOSTPORT_ID_MIN`], claimed by creating the backend),
    /// its slot, then its frontend entry, which makes it visible. An entry
    /// already there (a pod whose DEL never came) is replaced, and its
    /// backend goes. Returns the id.
    pub fn add_hostport(&self, hp: &HostPort) -> Result<u32, MapError> {
        let mut id = 0;
        for _ in 0..64 {
            let candidate = HOSTPORT_ID_MIN | (random_u32() & !HOSTPORT_ID_MIN);
            let b = Backend {
                frontend: candidate,
                addr: hp.backend,
                port: hp.backend_port,
                terminating: false,
            };
            match sys::map_update(
                self.backends.as_fd(),
                &candidate.to_ne_bytes(),
                &backend_value(&b),
                sys::BPF_NOEXIST,
            ) {
                Ok(()) => {
                    id = candidate;
                    break;
                }
                Err(e) if e.errno() == Some(libc::EEXIST) => continue,
                Err(e) => return Err(on(BACKEND_MAP)(e)),
            }
        }
        if id == 0 {
            return Err(on(BACKEND_MAP)(crate::sys::SysError {
                call: "BPF_MAP_UPDATE_ELEM",
                source: std::io::Error::from_raw_os_error(libc::EEXIST),
            }));
        }
        let written = (|| {
            sys::map_update(
                self.slots.as_fd(),
                &slot_key(id, 1),
                &id.to_ne_bytes(),
                BPF_ANY,
            )
            .map_err(on(SLOT_MAP))?;
            self.ensure_stats(id)?;
            let old = self.hostport_entry(&hp.frontend)?;
            let st = FrontendState {
                id,
                backends: vec![id],
                affinity_timeout: None,
                source_nat: false,
            };
            sys::map_update(
                self.svc.as_fd(),
                &hostport_key(&hp.frontend),
                &svc_value(&st),
                BPF_ANY,
            )
            .map_err(on(SVC_MAP))?;
            Ok(old)
        })();
        match written {
            Ok(old) => {
                if let Some(old) = old.filter(|o| *o != id && *o >= HOSTPORT_ID_MIN) {
                    self.forget_hostport_id(old)?;
                }
                Ok(id)
            }
            Err(e) => {
                let _ = self.forget_hostport_id(id);
                Err(e)
            }
        }
    }

    /// Removes hostPort `hp` if its entry still sends it to `hp`'s backend
    /// (another pod's later entry under the same key stays). Whether it
    /// removed one.
    pub fn remove_hostport(&self, hp: &HostPort) -> Result<bool, MapError> {
        let Some(id) = self.hostport_entry(&hp.frontend)? else {
            return Ok(false);
        };
        let ours = self
            .backend(id)?
            .is_some_and(|b| b.addr == hp.backend && b.port == hp.backend_port);
        if !ours {
            return Ok(false);
        }
        sys::map_delete(self.svc.as_fd(), &hostport_key(&hp.frontend)).map_err(on(SVC_MAP))?;
        self.forget_hostport_id(id)?;
        Ok(true)
    }

    /// Every hostPort with its id, in frontend order. An entry whose
    /// backend is missing (being written or removed) is left out.
    pub fn host_ports(&self) -> Result<Vec<(HostPort, u32)>, MapError> {
        let mut out = Vec::new();
        for k in keys::<20>(&self.svc, SVC_MAP)? {
            if k[19] != SVC_SCOPE_HOSTPORT {
                continue;
            }
            let fe = frontend_of(&k);
            let Some(id) = self.hostport_entry(&fe)? else {
                continue;
            };
            if let Some(b) = self.backend(id)? {
                out.push((
                    HostPort {
                        frontend: fe,
                        backend: b.addr,
                        backend_port: b.port,
                    },
                    id,
                ));
            }
        }
        out.sort_by_key(|(hp, _)| hp.frontend);
        Ok(out)
    }

    /// Flows whose backend is remembered (`ferrite_svcct`).
    pub fn flows(&self) -> Result<usize, MapError> {
        Ok(keys::<40>(&self.ct, SVCCT_MAP)?.len())
    }

    /// Forgets every remembered flow, both directions, and every client's
    /// affinity: their next packets choose again.
    pub fn flush_flows(&self) -> Result<usize, MapError> {
        let mut n = 0;
        for (map, name) in [(&self.ct, SVCCT_MAP), (&self.rev, SVCREV_MAP)] {
            for k in keys::<40>(map, name)? {
                n += usize::from(sys::map_delete(map.as_fd(), &k).map_err(on(name))?);
            }
        }
        for k in keys::<24>(&self.aff, SVCAFF_MAP)? {
            sys::map_delete(self.aff.as_fd(), &k).map_err(on(SVCAFF_MAP))?;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip() {
        let b = Backend {
            frontend: 7,
            addr: "10.244.1.5".parse().unwrap(),
            port: 8080,
            terminating: true,
        };
        assert_eq!(backend_of(&backend_value(&b)), b);
        let b6 = Backend {
            addr: "fd00::5".parse().unwrap(),
            terminating: false,
            ..b
        };
        assert_eq!(backend_of(&backend_value(&b6)), b6);
        let fe = Frontend {
            addr: "10.96.0.10".parse().unwrap(),
            port: 53,
            proto: 17,
        };
        let k = svc_key(&fe);
        assert_eq!(&k[16..18], &[0, 53], "port in network order");
        assert_eq!(frontend_of(&k), fe);
        let mut st = FrontendState {
            id: 3,
            backends: vec![1, 2],
            affinity_timeout: Some(10800),
            source_nat: false,
        };
        let v = svc_value(&st);
        assert_eq!((u32_at(&v, 0), u32_at(&v, 4), u32_at(&v, 8)), (3, 2, 1));
        st.affinity_timeout = None;
        st.source_nat = true;
        assert_eq!(u32_at(&svc_value(&st), 8), 2);
    }
}
