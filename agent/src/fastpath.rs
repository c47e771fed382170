// SPDX-License-Identifier: Apache-2.0
//! The agent's side of the cross-node eBPF fast path, and of removing the
//! datapath's pins, behind small traits: the tests record the calls, and
//! pin removal needs one thing the datapath crate does not offer.

use std::path::{Path, PathBuf};

use ferrite_datapath::{Datapath, DatapathError, DATAPATH_VERSION};
use ipnetwork::IpNetwork;

#[derive(Debug, thiserror::Error)]
pub enum FastPathError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
}

/// The cross-node fast path: a program on the uplink's TCX ingress hands
/// packets for local pods straight to them, one at TCX egress records the
/// flows the stack carries out, and `from_pod` sends traffic for the
/// cluster CIDRs (off this node) straight to the uplink.
///
/// Every method must be idempotent and touch only ferrite's own programs:
/// the agent calls them at every start, and `detach_uplink` on links that
/// may carry nothing of ferrite's.
pub trait FastPath: Send {
    /// The cluster's pod CIDRs; empty switches `from_pod`'s side off.
    fn set_cluster_cidrs(
        &mut self,
        dp: &Datapath,
        cidrs: &[IpNetwork],
    ) -> Result<(), FastPathError>;
    fn attach_uplink(&mut self, dp: &Datapath, ifindex: u32) -> Result<(), FastPathError>;
    /// Removes ferrite's uplink programs (any version); how many there were.
    fn detach_uplink(&mut self, ifindex: u32) -> Result<usize, FastPathError>;
}

/// The fast path through the datapath crate.
#[derive(Debug, Default)]
pub struct EbpfFastPath;

impl FastPath for EbpfFastPath {
    fn set_cluster_cidrs(
        &mut self,
        dp: &Datapath,
        cidrs: &[IpNetwork],
    ) -> Result<(), FastPathError> {
        let nets: Vec<(std::net::IpAddr, u8)> =
            cidrs.iter().map(|c| (c.network(), c.prefix())).collect();
        Ok(dp.set_cluster_cidrs(&nets)?)
    }

    fn attach_uplink(&mut self, dp: &Datapath, ifindex: u32) -> Result<(), FastPathError> {
        Ok(dp.attach_uplink(ifindex)?)
    }

    fn detach_uplink(&mut self, ifindex: u32) -> Result<usize, FastPathError> {
        Ok(Datapath::detach_uplink(ifindex)?)
    }
}

/// The datapath's pins under one bpffs root, as uninstall removes them.
pub trait DatapathPins {
    /// Versions pinned under the root.
    fn versions(&self) -> Result<Vec<String>, DatapathError>;
    /// Removes one version's pins.
    fn remove(&self, version: &str) -> Result<(), DatapathError>;
    /// Detaches the host socket programs; how many hooks had them.
    fn detach_host_sockets(&self) -> Result<usize, DatapathError>;
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

    fn detach_host_sockets(&self) -> Result<usize, DatapathError> {
        Datapath::detach_host_sockets(&self.root)
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
    // Loaders' work directories (`tmp-<version>-<pid>`) and the state maps
    // every version shares (`state-<layout>`) are the datapath's too;
    // `pinned_versions` leaves them out.
    if let Ok(entries) = std::fs::read_dir(root) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("tmp-") || name.starts_with("state-") {
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
