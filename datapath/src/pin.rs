//! Where the pins live and how they are published.
//!
//! ```text
//! <bpffs_root>/                      flock(LOCK_EX) on this directory's fd serialises loaders
//! <bpffs_root>/<version>/from_pod    program pins
//! <bpffs_root>/<version>/to_pod, from_uplink, to_uplink
//! <bpffs_root>/<version>/ferrite_endpts, ferrite_ifaces, ferrite_stats, ferrite_stkflow,
//!                        ferrite_podnets, ferrite_eppol, ferrite_polport,
//!                        ferrite_polpeer, ferrite_hostips, ferrite_svcnets,
//!                        ferrite_ct                                        map pins
//! <bpffs_root>/state-1/ferrite_ct, ferrite_svc, ...   maps every version shares (STATE_MAPS)
//! <bpffs_root>/tmp-<version>-<pid>/  a loader's work in progress, renamed to <version> when complete
//! ```
//! A version directory is complete once it exists: it appears by `rename(2)`.
//! (bpffs refuses names containing a dot, so work directories cannot be
//! hidden dot-files.)

use std::{
    ffi::CString,
    fs, io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::{ffi::OsStrExt, fs::DirBuilderExt},
    },
    path::{Path, PathBuf},
};

use thiserror::Error;

use crate::{sys::SysError, DatapathError};

/// `BPF_FS_MAGIC` from linux/magic.h.
pub const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The program and map pins inside a version directory.
pub(crate) const FROM_POD: &str = "from_pod";
pub(crate) const TO_POD: &str = "to_pod";
pub(crate) const FROM_UPLINK: &str = "from_uplink";
pub(crate) const TO_UPLINK: &str = "to_uplink";
pub(crate) const PODNETS_MAP: &str = "ferrite_podnets";
pub(crate) const ENDPOINTS_MAP: &str = "ferrite_endpts";
pub(crate) const IFACES_MAP: &str = "ferrite_ifaces";
pub(crate) const STATS_MAP: &str = "ferrite_stats";
pub(crate) const STACKFLOW_MAP: &str = "ferrite_stkflow";

/// The maps that carry state across datapath versions (NetworkPolicy,
/// Services and connection tracking): pinned once under `<bpffs_root>/STATE_DIR/`, and
/// every version's programs use the same ones, so an upgrade keeps the
/// policies and the flows. Their definitions (type, key, value, size) are
/// the layout `STATE_DIR` names: change one and the name must change
/// (datapath/tests/datapath/load.rs holds them and says so).
pub(crate) const STATE_DIR: &str = "state-1";
pub(crate) const STATE_MAPS: [&str; 17] = [
    "ferrite_ct",
    "ferrite_eppol",
    "ferrite_polport",
    "ferrite_polpeer",
    "ferrite_hostips",
    "ferrite_svcnets",
    "ferrite_polns",
    "ferrite_podids",
    "ferrite_podpol",
    "ferrite_svc",
    "ferrite_svcslot",
    "ferrite_backend",
    "ferrite_svcct",
    "ferrite_svcrev",
    "ferrite_svcaff",
    "ferrite_svcstat",
    "ferrite_svccfg",
];

/// Where map `name` is pinned for the version directory `version_dir`.
pub(crate) fn map_path(version_dir: &Path, name: &str) -> PathBuf {
    match (STATE_MAPS.contains(&name), version_dir.parent()) {
        (true, Some(root)) => root.join(STATE_DIR).join(name),
        _ => version_dir.join(name),
    }
}

/// Creates the state directory under `root` if it is not there.
pub(crate) fn ensure_state_dir(root: &Path) -> Result<(), PinError> {
    let dir = root.join(STATE_DIR);
    match fs::DirBuilder::new().mode(0o700).create(&dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(io_err("mkdir", &dir)(e)),
        _ => Ok(()),
    }
}

#[derive(Debug, Error)]
pub enum PinError {
    #[error("{call}({path}): {source}")]
    Io {
        call: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("opening pin {path}: {source}")]
    ObjGet {
        path: PathBuf,
        #[source]
        source: SysError,
    },
    #[error("{path}: path contains a NUL byte")]
    Nul { path: PathBuf },
}

pub(crate) fn io_err<'a>(
    call: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> PinError + 'a {
    move |source| PinError::Io {
        call,
        path: path.to_owned(),
        source,
    }
}

pub(crate) fn c_path(path: &Path) -> Result<CString, PinError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| PinError::Nul {
        path: path.to_owned(),
    })
}

/// Opens a pin; `Ok(None)` if it does not exist.
pub(crate) fn open_pin(path: &Path) -> Result<Option<OwnedFd>, PinError> {
    match crate::sys::obj_get(&c_path(path)?) {
        Ok(fd) => Ok(Some(fd)),
        Err(e) if e.errno() == Some(libc::ENOENT) => Ok(None),
        Err(source) => Err(PinError::ObjGet {
            path: path.to_owned(),
            source,
        }),
    }
}

/// The filesystem type (`f_type` of statfs(2)) `path` is on.
pub(crate) fn statfs_type(path: &Path) -> io::Result<i64> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: zeroed statfs is a valid out-parameter; c is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // f_type's type differs between libcs
    Ok(st.f_type as i64)
}

/// Makes sure `dir` exists on a bpf filesystem, creating it (and missing
/// parents, 0700) when its nearest existing ancestor is on one.
pub(crate) fn ensure_bpffs_dir(dir: &Path) -> Result<(), DatapathError> {
    match statfs_type(dir) {
        Ok(BPF_FS_MAGIC) => Ok(()),
        Ok(f_type) => Err(DatapathError::NotBpffs {
            path: dir.to_owned(),
            f_type,
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let parent = match dir.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => {
                    return Err(PinError::Io {
                        call: "statfs",
                        path: dir.to_owned(),
                        source: e,
                    }
                    .into())
                }
            };
            ensure_bpffs_dir(parent)?;
            match fs::DirBuilder::new().mode(0o700).create(dir) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                    Err(io_err("mkdir", dir)(e).into())
                }
                _ => Ok(()),
            }
        }
        Err(e) => Err(io_err("statfs", dir)(e).into()),
    }
}

/// An exclusive `flock` on the bpffs root directory, released on drop.
pub(crate) struct RootLock {
    _fd: OwnedFd,
}

pub(crate) fn lock_root(root: &Path) -> Result<RootLock, PinError> {
    let c = c_path(root)?;
    // SAFETY: c is NUL-terminated.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io_err("open", root)(io::Error::last_os_error()));
    }
    // SAFETY: a new descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    loop {
        // SAFETY: fd is open.
        if unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX) } == 0 {
            return Ok(RootLock { _fd: fd });
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(io_err("flock", root)(e));
        }
    }
}

const TMP_PREFIX: &str = "tmp-";

/// The work directory of a loader with this pid.
pub(crate) fn tmp_dir(root: &Path, version: &str, pid: u32) -> PathBuf {
    root.join(format!("{TMP_PREFIX}{version}-{pid}"))
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    let alive = unsafe { libc::kill(pid, 0) } == 0;
    alive || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Removes work directories of loaders that died mid-load. Called with the
/// root lock held, so no live loader of this root can own one; the pid check
/// is a second guard.
pub(crate) fn remove_stale_tmp_dirs(root: &Path) -> Result<(), PinError> {
    let own = std::process::id();
    for entry in fs::read_dir(root).map_err(io_err("opendir", root))? {
        let entry = entry.map_err(io_err("readdir", root))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(pid) = name
            .strip_prefix(TMP_PREFIX)
            .and_then(|n| n.rsplit_once('-'))
            .and_then(|(_, pid)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == own || !pid_alive(pid as i32) {
            remove_dir_all(&entry.path())?;
        }
    }
    Ok(())
}

/// `rm -r` for a directory of pins (bpffs has no nested trees of ours, but be general).
pub(crate) fn remove_dir_all(dir: &Path) -> Result<(), PinError> {
    fs::remove_dir_all(dir).or_else(|e| match e.kind() {
        io::ErrorKind::NotFound => Ok(()),
        _ => Err(io_err("remove_dir_all", dir)(e)),
    })
}

pub(crate) fn create_private_dir(dir: &Path) -> Result<(), PinError> {
    fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(io_err("mkdir", dir))
}

/// Publishes a complete work directory as the version directory.
pub(crate) fn publish(tmp: &Path, version_dir: &Path) -> Result<(), PinError> {
    fs::rename(tmp, version_dir).map_err(io_err("rename", tmp))
}
