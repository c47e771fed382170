//! The node's own sockets reaching Services when kube-proxy does not run:
//! the programs of `bpf/host_sock.c`, attached by the agent at a cgroup
//! (the root of the node's hierarchy) through links pinned in the state
//! directory, so one attachment per hook outlives the agent and any
//! upgrade (a new version swaps its program into the same link).
//!
//! ```text
//! <bpffs_root>/<version>/sock_connect4 ... sock_getpeer6   program pins
//! <bpffs_root>/<version>/ferrite_hostns, ferrite_sockrev  its maps
//! <bpffs_root>/state-1/link_sock_connect4 ...             the links
//! ```

use std::{
    io,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use thiserror::Error;

use crate::{pin, sys, DatapathError, PinError};

/// One program of host_sock.c and the cgroup hook it serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostSockProgram {
    /// The program's (and its pin's) name.
    pub name: &'static str,
    /// `enum bpf_attach_type`.
    pub attach_type: u32,
}

const fn program(name: &'static str, attach_type: u32) -> HostSockProgram {
    HostSockProgram { name, attach_type }
}

/// Every program, with its hook (BPF_CGROUP_INET4_CONNECT = 10, ...).
pub const PROGRAMS: [HostSockProgram; 8] = [
    program("sock_connect4", 10),
    program("sock_connect6", 11),
    program("sock_sendmsg4", 14),
    program("sock_sendmsg6", 15),
    program("sock_recvmsg4", 19),
    program("sock_recvmsg6", 20),
    program("sock_getpeer4", 29),
    program("sock_getpeer6", 30),
];

/// The map holding the host network namespace's cookie.
pub(crate) const HOSTNS_MAP: &str = "ferrite_hostns";

/// `CGROUP2_SUPER_MAGIC` from linux/magic.h.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
/// `SO_NETNS_COOKIE` (Linux 5.14).
const SO_NETNS_COOKIE: libc::c_int = 71;

#[derive(Debug, Error)]
pub enum HostSockError {
    #[error("{path} is not a cgroup v2 directory (statfs f_type {f_type:#x}): the node's own sockets need cgroup v2 to reach Services without kube-proxy")]
    NotCgroup2 { path: PathBuf, f_type: i64 },
    #[error("the network namespace's cookie (getsockopt SO_NETNS_COOKIE): {0}")]
    NetnsCookie(#[source] io::Error),
    #[error("{what} {program}: {source}")]
    Link {
        what: &'static str,
        program: &'static str,
        #[source]
        source: sys::SysError,
    },
}

impl From<HostSockError> for DatapathError {
    fn from(e: HostSockError) -> Self {
        DatapathError::HostSock(e)
    }
}

/// Where the link of `program` is pinned under `bpffs_root`.
fn link_path(bpffs_root: &Path, program: &str) -> PathBuf {
    bpffs_root
        .join(pin::STATE_DIR)
        .join(format!("link_{program}"))
}

/// The cookie of the calling thread's network namespace.
pub fn netns_cookie() -> Result<u64, HostSockError> {
    // SAFETY: plain socket(2); the result is checked and owned at once.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(HostSockError::NetnsCookie(io::Error::last_os_error()));
    }
    // SAFETY: fd is a new descriptor nothing else owns.
    let sock = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: cookie and len are valid for the kernel to write 8 bytes.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            &mut cookie as *mut u64 as *mut libc::c_void,
            &mut len,
        )
    };
    if r < 0 {
        return Err(HostSockError::NetnsCookie(io::Error::last_os_error()));
    }
    Ok(cookie)
}

/// The root of the cgroup v2 hierarchy mounted at `mount` (a unified
/// host) or at `mount/unified` (a hybrid one, cgroup v1 controllers with
/// v2 beside them); `None` if neither is cgroup v2.
pub fn cgroup2_root(mount: &Path) -> Option<PathBuf> {
    [mount.to_owned(), mount.join("unified")]
        .into_iter()
        .find(|p| pin::statfs_type(p).is_ok_and(|t| t == CGROUP2_SUPER_MAGIC))
}

fn open_cgroup(cgroup: &Path) -> Result<OwnedFd, DatapathError> {
    let f_type = pin::statfs_type(cgroup).map_err(pin::io_err("statfs", cgroup))?;
    if f_type != CGROUP2_SUPER_MAGIC {
        return Err(HostSockError::NotCgroup2 {
            path: cgroup.to_owned(),
            f_type,
        }
        .into());
    }
    Ok(std::fs::File::open(cgroup)
        .map_err(pin::io_err("open", cgroup))?
        .into())
}

/// What [`crate::Datapath::attach_host_sockets`] did to each hook.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostSockReport {
    /// Links made (the hook had none of ferrite's).
    pub created: usize,
    /// Links that ran another version's program and now run this one's.
    pub updated: usize,
    /// Links that already ran this version's program.
    pub unchanged: usize,
}

impl crate::Datapath {
    /// Makes the node's own sockets (those of the calling thread's network
    /// namespace: the host's, for the agent) reach Services through the
    /// Service maps: loads this version's host socket programs if needed,
    /// records the namespace's cookie, and attaches each program to
    /// `cgroup` (a cgroup v2 directory: the node's root) through a pinned
    /// link, or swaps it into the link an earlier run or version made.
    pub fn attach_host_sockets(&self, cgroup: &Path) -> Result<HostSockReport, DatapathError> {
        crate::load::load_and_pin_host_sock(self.version_dir())?;
        let cookie = netns_cookie()?;
        let hostns = self.open_pin(HOSTNS_MAP)?;
        sys::map_update(
            hostns.as_fd(),
            &0u32.to_ne_bytes(),
            &cookie.to_ne_bytes(),
            sys::BPF_ANY,
        )
        .map_err(crate::maps::on(HOSTNS_MAP))?;
        let root = self.bpffs_root();
        let mut report = HostSockReport::default();
        let mut cgroup_fd = None;
        for p in PROGRAMS {
            let prog = self.open_pin(p.name)?;
            let path = link_path(root, p.name);
            let link_err = |what| {
                move |source| HostSockError::Link {
                    what,
                    program: p.name,
                    source,
                }
            };
            if let Some(link) = pin::open_pin(&path)? {
                let want = sys::prog_id(prog.as_fd()).map_err(link_err("reading the id of"))?;
                let has =
                    sys::link_prog_id(link.as_fd()).map_err(link_err("reading the link of"))?;
                if want == has {
                    report.unchanged += 1;
                } else {
                    sys::link_update(link.as_fd(), prog.as_fd())
                        .map_err(link_err("swapping into its link"))?;
                    report.updated += 1;
                }
                continue;
            }
            if cgroup_fd.is_none() {
                cgroup_fd = Some(open_cgroup(cgroup)?);
            }
            let cg = cgroup_fd.as_ref().expect("opened above");
            let link = sys::cgroup_link_create(prog.as_fd(), cg.as_fd(), p.attach_type)
                .map_err(link_err("attaching"))?;
            let c = pin::c_path(&path)?;
            sys::obj_pin(link.as_fd(), &c).map_err(link_err("pinning the link of"))?;
            report.created += 1;
        }
        Ok(report)
    }

    /// Whether every host socket hook has ferrite's link (any version's).
    pub fn host_sockets_attached(bpffs_root: &Path) -> bool {
        PROGRAMS
            .iter()
            .all(|p| link_path(bpffs_root, p.name).exists())
    }

    /// Detaches the host socket programs (any version's): removes their
    /// links' pins, which ends the links unless a process holds one.
    /// Returns how many there were.
    pub fn detach_host_sockets(bpffs_root: &Path) -> Result<usize, DatapathError> {
        let mut removed = 0;
        for p in PROGRAMS {
            let path = link_path(bpffs_root, p.name);
            match std::fs::remove_file(&path) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(PinError::Io {
                        call: "unlink",
                        path,
                        source,
                    }
                    .into())
                }
            }
        }
        Ok(removed)
    }
}
