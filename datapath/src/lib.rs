//! ferrite's eBPF datapath: the C programs in `bpf/` (compiled by build.rs and
//! embedded), loading and pinning them once per node, opening the pins on
//! every later call, attaching to host veths, and the endpoint and stats maps.
//!
//! Pins live under `<bpffs_root>/<DATAPATH_VERSION>/` (see [`pin`] for the
//! layout): a new binary brings its own programs and maps while pods attached
//! by an older one keep theirs.

mod drop_reason;
mod error;
pub mod host_sock;
mod load;
mod maps;
pub mod pin;
pub mod policy;
pub mod service;
mod sys;
mod tc;
mod tcx;
mod types;

use std::{
    net::IpAddr,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
};

pub use drop_reason::{DropReason, DROP_REASON_SLOTS};
pub use error::{DatapathError, LoadError, MapError, PinError, TcError};
pub use sys::{SysError, TestRun};
pub use tc::{Attachment, TC_HANDLE, TC_PRIORITY};
pub use tcx::TcxError;

/// How the programs sit on a host veth.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// A clsact qdisc with direct-action filters: about 0.2 ms, and the
    /// default. Excludes the `ingress` qdisc another plugin may want.
    Clsact,
    /// TCX (Linux 6.6): coexists with any qdisc, costs an RCU grace period.
    Tcx,
}
pub use types::{
    Endpoint, EndpointStats, ENDPOINT_F_HOSTPORT, ENDPOINT_F_SHAPED, ENDPOINT_F_VIA_STACK,
    MAX_ENDPOINTS,
};

use maps::Maps;

/// Hash of the embedded objects: names the pin directory of this build.
pub const DATAPATH_VERSION: &str = env!("FERRITE_DATAPATH_VERSION");

/// `TC_ACT_OK`: hand the packet to the stack.
pub const TC_ACT_OK: i32 = 0;
/// `TC_ACT_SHOT`: drop.
pub const TC_ACT_SHOT: i32 = 2;
/// `TC_ACT_REDIRECT`: `bpf_redirect_peer` took the packet.
pub const TC_ACT_REDIRECT: i32 = 7;

/// Sizes chosen when the datapath is loaded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Flows the connection-tracking table holds (None: 262,144).
    pub conntrack_entries: Option<u32>,
    /// Flows to Services whose backend is remembered (None: 65,536; two
    /// tables of that size, one for each direction).
    pub service_conntrack_entries: Option<u32>,
}

/// Whether [`Datapath::open_or_load`] found the pins or made them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadOutcome {
    /// Another process (or an earlier call) had loaded this version.
    Opened,
    /// This call loaded and pinned it.
    Loaded,
}

/// One of ferrite's programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Program {
    /// tc ingress of the host veth: packets leaving the pod.
    FromPod,
    /// tc egress of the host veth: packets the host stack delivers to the pod.
    ToPod,
    /// TCX ingress of the node's uplink: packets from other nodes.
    FromUplink,
    /// TCX egress of the node's uplink: packets leaving for other nodes.
    ToUplink,
}

impl Program {
    /// The pin's name, which is also the program's kernel name.
    pub fn name(self) -> &'static str {
        match self {
            Program::FromPod => pin::FROM_POD,
            Program::ToPod => pin::TO_POD,
            Program::FromUplink => pin::FROM_UPLINK,
            Program::ToUplink => pin::TO_UPLINK,
        }
    }
}

/// Handles to the pinned programs and maps of one datapath version.
#[derive(Debug)]
pub struct Datapath {
    version_dir: PathBuf,
    from_pod: OwnedFd,
    to_pod: OwnedFd,
    maps: Maps,
}

impl Datapath {
    /// Opens this version's pins, loading and pinning the embedded objects
    /// first if nobody has.
    ///
    /// The fast path only opens pins (no ELF, no vmlinux BTF). The slow path
    /// checks that `bpffs_root` is on a bpf filesystem (creating it 0700 if
    /// its parent is), takes an exclusive `flock` on the `bpffs_root`
    /// directory, checks again, removes work directories of dead loaders,
    /// loads into `<root>/tmp-<version>-<pid>` and renames that to
    /// `<root>/<version>`. Concurrent first callers load exactly once.
    pub fn open_or_load(bpffs_root: &Path) -> Result<(Datapath, LoadOutcome), DatapathError> {
        Self::open_or_load_with(bpffs_root, &LoadOptions::default())
    }

    /// [`Datapath::open_or_load`], with the sizes of the maps it creates
    /// when it loads. Maps that already exist (the state maps of an earlier
    /// version) keep their size.
    pub fn open_or_load_with(
        bpffs_root: &Path,
        options: &LoadOptions,
    ) -> Result<(Datapath, LoadOutcome), DatapathError> {
        if let Some(dp) = Self::open(bpffs_root)? {
            return Ok((dp, LoadOutcome::Opened));
        }
        pin::ensure_bpffs_dir(bpffs_root)?;
        let lock = pin::lock_root(bpffs_root)?;
        if let Some(dp) = Self::open(bpffs_root)? {
            return Ok((dp, LoadOutcome::Opened));
        }
        pin::remove_stale_tmp_dirs(bpffs_root)?;
        let tmp = pin::tmp_dir(bpffs_root, DATAPATH_VERSION, std::process::id());
        pin::create_private_dir(&tmp)?;
        // The maps every version shares are pinned there by the load.
        pin::ensure_state_dir(bpffs_root)?;
        let published = load::load_and_pin(&tmp, options)
            .map_err(DatapathError::from)
            .and_then(|()| Ok(pin::publish(&tmp, &bpffs_root.join(DATAPATH_VERSION))?));
        if let Err(error) = published {
            return Err(match pin::remove_dir_all(&tmp) {
                Ok(()) => error,
                Err(PinError::Io { source, .. }) => DatapathError::Rollback {
                    error: Box::new(error),
                    path: tmp,
                    rollback: source,
                },
                Err(other) => DatapathError::Rollback {
                    error: Box::new(error),
                    path: tmp,
                    rollback: std::io::Error::other(other.to_string()),
                },
            });
        }
        drop(lock);
        let dp = Self::open(bpffs_root)?.ok_or_else(|| {
            DatapathError::from(PinError::Io {
                call: "open",
                path: bpffs_root.join(DATAPATH_VERSION),
                source: std::io::ErrorKind::NotFound.into(),
            })
        })?;
        Ok((dp, LoadOutcome::Loaded))
    }

    /// Opens this version's pins; `None` if this version is not loaded.
    /// The datapath versions pinned under `bpffs_root` (this one included),
    /// leaving out loaders' work directories and the state maps' directory.
    pub fn pinned_versions(bpffs_root: &Path) -> Result<Vec<String>, DatapathError> {
        let entries = match std::fs::read_dir(bpffs_root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(PinError::Io {
                    call: "readdir",
                    path: bpffs_root.to_owned(),
                    source,
                }
                .into())
            }
        };
        Ok(entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| !n.starts_with("tmp-") && !n.starts_with("state-"))
            .collect())
    }

    /// The program ids pinned by `version` under `bpffs_root`.
    pub fn version_program_ids(
        bpffs_root: &Path,
        version: &str,
    ) -> Result<Vec<u32>, DatapathError> {
        let dir = bpffs_root.join(version);
        let mut ids = Vec::new();
        for name in [pin::FROM_POD, pin::TO_POD] {
            let path = dir.join(name);
            if let Some(fd) = pin::open_pin(&path)? {
                ids.push(
                    sys::prog_id(fd.as_fd()).map_err(|source| PinError::ObjGet { path, source })?,
                );
            }
        }
        Ok(ids)
    }

    /// Removes the pins of `version` (never this binary's own). Programs
    /// still attached somewhere stay loaded until they are detached.
    pub fn remove_version(bpffs_root: &Path, version: &str) -> Result<(), DatapathError> {
        if version == DATAPATH_VERSION || version.contains('/') || version.starts_with('.') {
            return Ok(());
        }
        Ok(pin::remove_dir_all(&bpffs_root.join(version))?)
    }

    /// The ids of the bpf programs attached to `ifindex` (ingress and
    /// egress, tc filters and TCX).
    pub fn attached_program_ids(ifindex: u32) -> Result<Vec<u32>, DatapathError> {
        let mut ids = tc::attached_ids(ifindex)?;
        let (ingress, egress) = tcx::attached_ids(ifindex)?;
        ids.extend(ingress);
        ids.extend(egress);
        Ok(ids)
    }

    /// How `ifindex` has ferrite's programs attached, if it has any.
    pub fn attach_mode_of(ifindex: u32) -> Result<Option<AttachMode>, DatapathError> {
        let (ingress, egress) = tcx::attached_ids(ifindex)?;
        if !ingress.is_empty() || !egress.is_empty() {
            return Ok(Some(AttachMode::Tcx));
        }
        Ok((!tc::attached_ids(ifindex)?.is_empty()).then_some(AttachMode::Clsact))
    }

    pub fn open(bpffs_root: &Path) -> Result<Option<Datapath>, DatapathError> {
        let version_dir = bpffs_root.join(DATAPATH_VERSION);
        // A version directory appears complete (rename), so the first pin
        // tells whether it exists.
        let Some(endpoints) = pin::open_pin(&version_dir.join(pin::ENDPOINTS_MAP))? else {
            return Ok(None);
        };
        let must = |name: &str| -> Result<OwnedFd, DatapathError> {
            let path = version_dir.join(name);
            pin::open_pin(&path)?.ok_or_else(|| {
                PinError::Io {
                    call: "BPF_OBJ_GET",
                    path,
                    source: std::io::ErrorKind::NotFound.into(),
                }
                .into()
            })
        };
        Ok(Some(Datapath {
            from_pod: must(pin::FROM_POD)?,
            to_pod: must(pin::TO_POD)?,
            maps: Maps {
                endpoints,
                ifaces: must(pin::IFACES_MAP)?,
                stats: must(pin::STATS_MAP)?,
            },
            version_dir,
        }))
    }

    /// `<bpffs_root>/<DATAPATH_VERSION>`.
    pub fn version_dir(&self) -> &Path {
        &self.version_dir
    }

    /// The `bpffs_root` this datapath was opened under.
    pub fn bpffs_root(&self) -> &Path {
        self.version_dir.parent().unwrap_or(Path::new("/"))
    }

    /// The program's fd: a duplicate of the one kept open for the pod
    /// programs (every ADD uses them), opened from its pin for the uplink's
    /// (only the agent uses those).
    fn program(&self, program: Program) -> Result<OwnedFd, DatapathError> {
        let dup = |fd: &OwnedFd| {
            fd.try_clone().map_err(|source| PinError::Io {
                call: "dup",
                path: self.version_dir.join(program.name()),
                source,
            })
        };
        match program {
            Program::FromPod => Ok(dup(&self.from_pod)?),
            Program::ToPod => Ok(dup(&self.to_pod)?),
            Program::FromUplink | Program::ToUplink => self.open_pin(program.name()),
        }
    }

    /// The kernel memory of each map shared across versions (`memlock` in
    /// the map fd's fdinfo), in bytes.
    pub fn state_map_memory(&self) -> Result<Vec<(String, u64)>, DatapathError> {
        let mut out = Vec::new();
        for (name, info) in self.state_map_fdinfo()? {
            let bytes = info
                .lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            out.push((name, bytes));
        }
        Ok(out)
    }

    fn state_map_fdinfo(&self) -> Result<Vec<(String, String)>, DatapathError> {
        let mut out = Vec::new();
        for name in pin::STATE_MAPS {
            let fd = self.open_pin(name)?;
            let path = format!("/proc/self/fdinfo/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
            let info = std::fs::read_to_string(&path).map_err(|source| PinError::Io {
                call: "read",
                path: path.into(),
                source,
            })?;
            out.push((name.to_string(), info));
        }
        Ok(out)
    }

    /// The definitions of the maps shared across versions, as the kernel
    /// reports them (`map_type`, `key_size`, `value_size`, `max_entries`,
    /// `map_flags` from the map fd's fdinfo): name, then those fields.
    pub fn state_map_layouts(&self) -> Result<Vec<(String, String)>, DatapathError> {
        Ok(self
            .state_map_fdinfo()?
            .into_iter()
            .map(|(name, info)| {
                let fields: Vec<&str> = [
                    "map_type",
                    "key_size",
                    "value_size",
                    "max_entries",
                    "map_flags",
                ]
                .iter()
                .filter_map(|k| {
                    info.lines()
                        .find_map(|l| l.strip_prefix(&format!("{k}:")))
                        .map(str::trim)
                })
                .collect();
                (name, fields.join(" "))
            })
            .collect())
    }

    pub(crate) fn open_pin(&self, name: &str) -> Result<OwnedFd, DatapathError> {
        let path = pin::map_path(&self.version_dir, name);
        Ok(pin::open_pin(&path)?.ok_or_else(|| PinError::Io {
            call: "BPF_OBJ_GET",
            path,
            source: std::io::ErrorKind::NotFound.into(),
        })?)
    }

    /// Loads and pins the uplink programs of this version, if they are not
    /// yet (only the agent needs them; `attach_uplink` calls this).
    pub fn load_uplink(&self) -> Result<(), DatapathError> {
        Ok(load::load_and_pin_uplink(&self.version_dir)?)
    }

    /// Attaches `from_uplink` at TCX ingress and `to_uplink` at TCX egress
    /// of the node's uplink `ifindex`, after whatever runs there (or in
    /// place of another version of them). Never replaces another program
    /// or touches a qdisc: the uplink is shared.
    pub fn attach_uplink(&self, ifindex: u32) -> Result<(), DatapathError> {
        self.load_uplink()?;
        let from = self.program(Program::FromUplink)?;
        let to = self.program(Program::ToUplink)?;
        Ok(tcx::attach(
            ifindex,
            (from.as_fd(), pin::FROM_UPLINK),
            (to.as_fd(), pin::TO_UPLINK),
        )?)
    }

    /// Detaches ferrite's uplink programs (any version) from `ifindex`;
    /// how many were attached.
    pub fn detach_uplink(ifindex: u32) -> Result<usize, DatapathError> {
        Ok(tcx::detach(ifindex, pin::FROM_UPLINK, pin::TO_UPLINK)?)
    }

    /// Makes `ferrite_podnets` hold exactly `cidrs` (address, prefix
    /// length): the cluster's pod CIDRs, whose destinations off this node
    /// take the cross-node fast path. Empty switches that path off.
    pub fn set_cluster_cidrs(&self, cidrs: &[(IpAddr, u8)]) -> Result<(), DatapathError> {
        let map = self.open_pin(pin::PODNETS_MAP)?;
        Ok(maps::set_lpm_set(map.as_fd(), pin::PODNETS_MAP, cidrs)?)
    }

    /// Handles to the NetworkPolicy maps (rule sets, endpoint policies,
    /// host addresses, Service CIDRs, connection tracking).
    pub fn policy_maps(&self) -> Result<policy::PolicyMaps, DatapathError> {
        Ok(policy::PolicyMaps {
            eppol: self.open_pin(policy::EPPOL_MAP)?,
            polport: self.open_pin(policy::POLPORT_MAP)?,
            polpeer: self.open_pin(policy::POLPEER_MAP)?,
            hostips: self.open_pin(policy::HOSTIPS_MAP)?,
            svcnets: self.open_pin(policy::SVCNETS_MAP)?,
            ct: self.open_pin(policy::CT_MAP)?,
            polns: self.open_pin(policy::POLNS_MAP)?,
            podids: self.open_pin(policy::PODIDS_MAP)?,
            podpol: self.open_pin(policy::PODPOL_MAP)?,
        })
    }

    /// What `ferrite_podnets` holds.
    pub fn cluster_cidrs(&self) -> Result<Vec<(IpAddr, u8)>, DatapathError> {
        let map = self.open_pin(pin::PODNETS_MAP)?;
        Ok(maps::lpm_set(map.as_fd(), pin::PODNETS_MAP)?)
    }

    /// Attaches `from_pod` at ingress and `to_pod` at egress of the host
    /// veth `ifindex`. Clsact: adds the qdisc (if absent) and ferrite's
    /// direct-action filters. TCX: appends the programs. Repeating it
    /// replaces only ferrite's programs (another version's included).
    pub fn attach(&self, ifindex: u32, mode: AttachMode) -> Result<(), DatapathError> {
        match mode {
            AttachMode::Clsact => Ok(tc::attach(
                &mut ferrite_netlink::route::open()?,
                ifindex,
                self.from_pod.as_fd(),
                self.to_pod.as_fd(),
            )?),
            AttachMode::Tcx => self.attach_tcx(ifindex),
        }
    }

    /// The clsact attach as requests for the caller's own datagram to the
    /// veth's namespace (ADD sends them with the host veth's
    /// configuration: one wait for the RTNL lock instead of two). In
    /// order: the qdisc, tolerated if it exists, then the two filters.
    pub fn attach_requests(
        &self,
        ifindex: u32,
    ) -> [ferrite_netlink::Request<netlink_packet_route::RouteNetlinkMessage>; 3] {
        tc::attach_requests(ifindex, self.from_pod.as_fd(), self.to_pod.as_fd())
    }

    fn attach_tcx(&self, ifindex: u32) -> Result<(), DatapathError> {
        Ok(tcx::attach(
            ifindex,
            (self.from_pod.as_fd(), pin::FROM_POD),
            (self.to_pod.as_fd(), pin::TO_POD),
        )?)
    }

    /// Whether the veth's ingress and egress run this version's programs.
    pub fn attachment(&self, ifindex: u32) -> Result<Attachment, DatapathError> {
        let id = |program: Program| -> Result<u32, DatapathError> {
            Ok(
                sys::prog_id(self.program(program)?.as_fd()).map_err(|source| {
                    PinError::ObjGet {
                        path: self.version_dir.join(program.name()),
                        source,
                    }
                })?,
            )
        };
        let (from_pod, to_pod) = (id(Program::FromPod)?, id(Program::ToPod)?);
        let filters = tc::attachment(ifindex, from_pod, to_pod)?;
        let (ingress, egress) = tcx::attached_ids(ifindex)?;
        Ok(Attachment {
            ingress: filters.ingress || ingress.contains(&from_pod),
            egress: filters.egress || egress.contains(&to_pod),
        })
    }

    /// Adds or updates the endpoint for `ip`, with its (zeroed, or kept if
    /// present) stats entry and its interface entry.
    pub fn upsert_endpoint(&self, ip: IpAddr, ep: &Endpoint) -> Result<(), DatapathError> {
        Ok(self.maps.upsert_endpoint(ip, ep)?)
    }

    /// Removes `ip` (if it still belongs to `ifindex`) and the veth's stats
    /// and interface entries. Idempotent.
    pub fn remove_endpoint(&self, ip: IpAddr, ifindex: u32) -> Result<(), DatapathError> {
        Ok(self.maps.remove_endpoint(ip, ifindex)?)
    }

    /// The ids of this version's programs (from_pod, to_pod).
    pub fn program_ids(&self) -> Result<[u32; 2], DatapathError> {
        let id = |fd: BorrowedFd<'_>, name: &str| {
            sys::prog_id(fd).map_err(|source| PinError::ObjGet {
                path: self.version_dir.join(name),
                source,
            })
        };
        Ok([
            id(self.from_pod.as_fd(), pin::FROM_POD)?,
            id(self.to_pod.as_fd(), pin::TO_POD)?,
        ])
    }

    /// Host ifindexes that have counters or an interface entry.
    pub fn interfaces(&self) -> Result<Vec<u32>, DatapathError> {
        Ok(self.maps.interfaces()?)
    }

    /// Removes every endpoint entry, counter and interface entry of `ifindex`.
    /// Forgets everything keyed by host veth `ifindex`: its interface and
    /// counter entries, its policy and its pod record (DEL, GC, a retried
    /// ADD's leftovers).
    pub fn forget_interface(&self, ifindex: u32) -> Result<(), DatapathError> {
        self.maps.forget_interface(ifindex)?;
        self.forget_endpoint_policy(ifindex)
    }

    pub fn endpoint(&self, ip: IpAddr) -> Result<Option<Endpoint>, DatapathError> {
        Ok(self.maps.endpoint(ip)?)
    }

    pub fn endpoints(&self) -> Result<Vec<(IpAddr, Endpoint)>, DatapathError> {
        Ok(self.maps.endpoints()?)
    }

    /// The counters of the host veth `ifindex`, summed over CPUs.
    pub fn stats(&self, ifindex: u32) -> Result<Option<EndpointStats>, DatapathError> {
        Ok(self.maps.stats(ifindex)?)
    }

    /// How many flows the host stack delivered are remembered (`ferrite_stkflow`).
    pub fn stack_flows(&self) -> Result<usize, DatapathError> {
        let map = self.open_pin(pin::STACKFLOW_MAP)?;
        Ok(maps::stack_flows(map.as_fd())?)
    }

    /// Runs `program` once on `packet` with `BPF_PROG_TEST_RUN`, as if it
    /// arrived on `ifindex` (1, the netns's loopback, or an existing device).
    /// For tests and self-checks; map effects are real.
    pub fn test_run(
        &self,
        program: Program,
        packet: &[u8],
        ifindex: u32,
    ) -> Result<TestRun, DatapathError> {
        sys::prog_test_run(self.program(program)?.as_fd(), packet, ifindex).map_err(|source| {
            DatapathError::from(MapError::Syscall {
                map: program.name(),
                source,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_is_a_hash() {
        assert_eq!(DATAPATH_VERSION.len(), 16);
        assert!(DATAPATH_VERSION.chars().all(|c| c.is_ascii_hexdigit()));
    }
}
