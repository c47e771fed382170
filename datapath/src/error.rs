//! The crate's error: one variant per concern, each module's own error
//! gathered with `#[from]`.

use std::{io, path::PathBuf};

use thiserror::Error;

pub use crate::{load::LoadError, maps::MapError, pin::PinError, tc::TcError};

#[derive(Debug, Error)]
pub enum DatapathError {
    /// `bpffs_root` (or its nearest existing ancestor) is not on a bpf filesystem.
    #[error("{path} is not on a bpf filesystem (statfs f_type {f_type:#x}, want 0xcafe4a11): mount one with `mount -t bpf bpf /sys/fs/bpf`")]
    NotBpffs { path: PathBuf, f_type: i64 },
    #[error(transparent)]
    Pin(#[from] PinError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Map(#[from] MapError),
    #[error(transparent)]
    Tc(#[from] TcError),
    #[error(transparent)]
    Tcx(#[from] crate::tcx::TcxError),
    #[error(transparent)]
    Policy(crate::policy::PolicyError),
    #[error(transparent)]
    HostSock(crate::host_sock::HostSockError),
    /// An operation failed, and so did undoing what it had done.
    #[error("{error}; cleaning up {path} also failed: {rollback}")]
    Rollback {
        error: Box<DatapathError>,
        path: PathBuf,
        rollback: io::Error,
    },
}
