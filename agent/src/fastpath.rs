// SPDX-License-Identifier: Apache-2.0
//! The agent's side of the cross-node eBPF fast path, and of removing the
//! datapath's pins, behind small traits: the datapath crate does not offer
//! all of it yet.

use std::path::{Path, PathBuf};

use ferrite_datapath::{Datapath, DatapathError, DATAPATH_VERSION};
use ipnetwork::IpNetwork;

#[derive(Debug, thiserror::Error)]
pub enum FastPathError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
}

/// The cross-node fast path: the datapath learns the cluster CIDRs (so
/// `from_pod` knows what it may send straight to the uplink) and puts a
/// program on the uplink's tc ingress (TCX, since the uplink is shared) that
/// hands packets for local pods straight to them.
///
/// Every method must be idempotent and touch only ferrite's own programs:
/// the agent calls them at every start, and `detach_uplink` on links that
/// may carry nothing of ferrite's.
pub trait FastPath: Send {
    fn set_cluster_cidrs(&mut self, cidrs: &[IpNetwork]) -> Result<(), FastPathError>;
    fn attach_uplink(&mut self, ifindex: u32) -> Result<(), FastPathError>;
    fn detach_uplink(&mut self, ifindex: u32) -> Result<(), FastPathError>;
}

/// Does nothing yet.
///
/// TODO(datapath): call `Datapath::set_cluster_cidrs(&[IpNetwork])`,
/// `Datapath::attach_uplink(ifindex)` and `Datapath::detach_uplink(ifindex)`
/// once the datapath crate has them (TCX on the node's uplink).
#[derive(Debug, Default)]
pub struct PendingFastPath;

impl FastPath for PendingFastPath {
    fn set_cluster_cidrs(&mut self, cidrs: &[IpNetwork]) -> Result<(), FastPathError> {
        log::debug!("fast path: cluster CIDRs {cidrs:?} (not in the datapath yet)");
        Ok(())
    }

    fn attach_uplink(&mut self, ifindex: u32) -> Result<(), FastPathError> {
        log::info!(
            "uplink is link {ifindex}; the cross-node fast path is not in this datapath yet: kernel routes carry traffic between nodes"
        );
        Ok(())
    }

    fn detach_uplink(&mut self, ifindex: u32) -> Result<(), FastPathError> {
        log::debug!("fast path: detach from link {ifindex} (not in the datapath yet)");
        Ok(())
    }
}

/// The datapath's pins under one bpffs root, as uninstall removes them.
pub trait DatapathPins {
    /// Versions pinned under the root.
    fn versions(&self) -> Result<Vec<String>, DatapathError>;
    /// Removes one version's pins.
    fn remove(&self, version: &str) -> Result<(), DatapathError>;
}

/// The pins under `root`, through the datapath crate.
pub struct PinnedDatapath {
    pub root: PathBuf,
}

impl DatapathPins for PinnedDatapath {
    fn versions(&self) -> Result<Vec<String>, DatapathError> {
        Datapath::pinned_versions(&self.root)
    }

    /// `Datapath::remove_version` refuses the running binary's own version
    /// (a CNI ADD must never remove what it runs on). Uninstall must remove
    /// it too, so this one directory goes with std::fs.
    ///
    /// TODO(datapath): a `Datapath::remove_all_pins(root)` (or a
    /// `remove_version` that may remove its own) would make this go through
    /// the crate.
    fn remove(&self, version: &str) -> Result<(), DatapathError> {
        if version != DATAPATH_VERSION {
            return Datapath::remove_version(&self.root, version);
        }
        let dir = self.root.join(version);
        remove_dir_all(&dir)
    }
}

fn remove_dir_all(dir: &Path) -> Result<(), DatapathError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ferrite_datapath::PinError::Io {
            call: "remove_dir_all",
            path: dir.to_owned(),
            source,
        }
        .into()),
    }
}

/// Removes every datapath version under `root`, then the root itself if it
/// is left empty (the datapath created it). Returns the versions removed.
pub fn remove_all_pins(pins: &dyn DatapathPins, root: &Path) -> Result<Vec<String>, DatapathError> {
    let versions = pins.versions()?;
    for v in &versions {
        pins.remove(v)?;
    }
    // Loaders' work directories (`tmp-<version>-<pid>`) are the datapath's
    // too; `pinned_versions` leaves them out.
    if let Ok(entries) = std::fs::read_dir(root) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with("tmp-") {
                remove_dir_all(&e.path())?;
            }
        }
    }
    match std::fs::remove_dir(root) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        // Not empty (someone else's pins) or a mount point: leave it.
        Err(e) => log::info!("leaving {}: {e}", root.display()),
    }
    Ok(versions)
}
