// SPDX-License-Identifier: Apache-2.0
//! The binaries the agent puts into the CNI bin directory.
//!
//! `--plugin-source` is the ferrite binary itself, or a directory holding it
//! (the image's /opt/ferrite/bin). ferrite is always installed (and replaced
//! when it differs). A directory may also hold reference plugins the node
//! needs beside ferrite (`portmap`, `loopback`): those are installed only
//! where the node has none, since a node's own plugins are not ferrite's to
//! replace, and every one installed is recorded in
//! `<state-dir>/agent-installed` first, so uninstall removes exactly those.

use std::fs;
use std::io;
use std::path::PathBuf;

use crate::config::Config;
use crate::files::{self, FileError};

/// Plugins a node needs beside ferrite: `portmap`, which the conflist
/// chains after ferrite for hostPorts, and `loopback`, which containerd
/// 1.6's CRI runs from the CNI bin directory to bring up every sandbox's
/// `lo` (without it, on a node with an empty /opt/cni/bin, no pod starts:
/// "failed to find plugin loopback").
pub const COMPANIONS: &[&str] = &["portmap", "loopback"];

/// The record of companions the agent installed.
pub fn record_path(cfg: &Config) -> PathBuf {
    cfg.state_dir.join("agent-installed")
}

/// Names in the record (one per line; anything that is not a plain file
/// name is ignored).
pub fn recorded(cfg: &Config) -> Result<Vec<String>, FileError> {
    let path = record_path(cfg);
    match fs::read_to_string(&path) {
        Ok(text) => Ok(text
            .lines()
            .map(str::trim)
            .filter(|n| !n.is_empty() && !n.contains('/') && *n != "." && *n != "..")
            .map(str::to_string)
            .collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(FileError {
            call: "read",
            path,
            source,
        }),
    }
}

/// What one installation pass changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Installed {
    pub plugin: bool,
    pub companions: Vec<String>,
}

/// Installs ferrite and any missing companion from `--plugin-source`.
pub fn install(cfg: &Config) -> Result<Installed, FileError> {
    let mut out = Installed::default();
    let source = &cfg.plugin_source;
    if source.as_os_str().is_empty() {
        return Ok(out);
    }
    let dir = source.is_dir().then_some(source.as_path());
    let plugin_source = dir.map_or_else(|| source.clone(), |d| d.join("ferrite"));
    out.plugin = files::install_binary(&plugin_source, &cfg.plugin_path())?;
    let Some(dir) = dir else {
        return Ok(out);
    };
    let mut record = recorded(cfg)?;
    for name in COMPANIONS {
        let from = dir.join(name);
        if !from.is_file() {
            continue;
        }
        let dest = cfg.cni_bin_dir.join(name);
        let ours = record.iter().any(|r| r == name);
        if dest.exists() && !ours {
            continue;
        }
        if !ours {
            // Recorded before it exists: a crash in between leaves a name
            // uninstall finds nothing under, never a file it does not know.
            record.push(name.to_string());
            let text: String = record.iter().map(|r| format!("{r}\n")).collect();
            files::write_if_changed(&record_path(cfg), text.as_bytes(), 0o644)?;
        }
        if files::install_binary(&from, &dest)? {
            out.companions.push(name.to_string());
        }
    }
    Ok(out)
}

/// Removes the companions the record names, then the record. Returns the
/// names removed.
pub fn remove_companions(cfg: &Config) -> Result<Vec<String>, FileError> {
    let mut removed = Vec::new();
    for name in recorded(cfg)? {
        let dest = cfg.cni_bin_dir.join(&name);
        if files::remove_if_present(&dest)? {
            removed.push(name);
        }
        files::remove_temp_files(&dest)?;
    }
    files::remove_if_present(&record_path(cfg))?;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    use ferrite_test_support::TempDir as Dir;

    fn config(d: &Dir, source: PathBuf) -> Config {
        Config {
            plugin_source: source,
            cni_bin_dir: d.join("bin"),
            state_dir: d.join("state"),
            ..Config::default()
        }
    }

    fn image(d: &Dir) -> PathBuf {
        let src = d.join("image");
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join("ferrite"), b"ferrite").unwrap();
        fs::write(src.join("portmap"), b"portmap of the image").unwrap();
        fs::write(src.join("loopback"), b"loopback of the image").unwrap();
        src
    }

    #[test]
    fn a_file_source_installs_only_ferrite() {
        let d = Dir::new("file").unwrap();
        let src = d.join("ferrite-bin");
        fs::write(&src, b"ferrite").unwrap();
        let cfg = config(&d, src);
        assert_eq!(
            install(&cfg).unwrap(),
            Installed {
                plugin: true,
                companions: vec![]
            }
        );
        assert_eq!(fs::read(cfg.plugin_path()).unwrap(), b"ferrite");
        assert!(!record_path(&cfg).exists());
    }

    #[test]
    fn a_directory_source_adds_missing_companions_and_records_them() {
        let d = Dir::new("dir").unwrap();
        let cfg = config(&d, image(&d));
        let done = install(&cfg).unwrap();
        assert!(done.plugin);
        assert_eq!(done.companions, ["portmap", "loopback"]);
        assert_eq!(
            fs::read(cfg.cni_bin_dir.join("portmap")).unwrap(),
            b"portmap of the image"
        );
        assert_eq!(
            fs::read(cfg.cni_bin_dir.join("loopback")).unwrap(),
            b"loopback of the image"
        );
        assert_eq!(recorded(&cfg).unwrap(), ["portmap", "loopback"]);
        // Again: nothing to do.
        assert_eq!(install(&cfg).unwrap(), Installed::default());
        // A new image brings a new portmap: it is ours, so it is updated.
        fs::write(cfg.plugin_source.join("portmap"), b"portmap v2").unwrap();
        assert_eq!(install(&cfg).unwrap().companions, ["portmap"]);
        assert_eq!(remove_companions(&cfg).unwrap(), ["portmap", "loopback"]);
        assert!(!cfg.cni_bin_dir.join("portmap").exists());
        assert!(!cfg.cni_bin_dir.join("loopback").exists());
        assert!(cfg.plugin_path().exists(), "uninstall of companions only");
        assert!(!record_path(&cfg).exists());
    }

    #[test]
    fn the_nodes_own_portmap_is_left_alone() {
        let d = Dir::new("own").unwrap();
        let cfg = config(&d, image(&d));
        fs::create_dir_all(&cfg.cni_bin_dir).unwrap();
        fs::write(cfg.cni_bin_dir.join("portmap"), b"the node's portmap").unwrap();
        let done = install(&cfg).unwrap();
        assert!(done.plugin);
        assert_eq!(done.companions, ["loopback"]);
        assert_eq!(
            fs::read(cfg.cni_bin_dir.join("portmap")).unwrap(),
            b"the node's portmap"
        );
        assert_eq!(recorded(&cfg).unwrap(), ["loopback"]);
        assert_eq!(remove_companions(&cfg).unwrap(), ["loopback"]);
        assert!(cfg.cni_bin_dir.join("portmap").exists());
        assert!(!cfg.cni_bin_dir.join("loopback").exists());
    }

    /// A node with CNI plugins of its own (containerd's CRI runs its
    /// `loopback` for every sandbox) keeps them, byte for byte, through
    /// install, a new image and uninstall.
    #[test]
    fn the_nodes_own_loopback_is_left_alone() {
        let d = Dir::new("ownlo").unwrap();
        let cfg = config(&d, image(&d));
        fs::create_dir_all(&cfg.cni_bin_dir).unwrap();
        fs::write(cfg.cni_bin_dir.join("loopback"), b"the node's loopback").unwrap();
        let done = install(&cfg).unwrap();
        assert!(done.plugin);
        assert_eq!(done.companions, ["portmap"]);
        assert_eq!(recorded(&cfg).unwrap(), ["portmap"]);
        fs::write(cfg.plugin_source.join("loopback"), b"loopback v2").unwrap();
        assert_eq!(install(&cfg).unwrap(), Installed::default());
        assert_eq!(remove_companions(&cfg).unwrap(), ["portmap"]);
        assert_eq!(
            fs::read(cfg.cni_bin_dir.join("loopback")).unwrap(),
            b"the node's loopback"
        );
    }

    /// An image without loopback (an older one) still installs portmap.
    #[test]
    fn a_companion_missing_from_the_image_is_skipped() {
        let d = Dir::new("nolo").unwrap();
        let src = image(&d);
        fs::remove_file(src.join("loopback")).unwrap();
        let cfg = config(&d, src);
        assert_eq!(install(&cfg).unwrap().companions, ["portmap"]);
        assert!(!cfg.cni_bin_dir.join("loopback").exists());
        assert_eq!(recorded(&cfg).unwrap(), ["portmap"]);
    }

    #[test]
    fn the_record_names_only_plain_files() {
        let d = Dir::new("rec").unwrap();
        let cfg = config(&d, PathBuf::new());
        fs::create_dir_all(&cfg.state_dir).unwrap();
        fs::write(record_path(&cfg), "portmap\n../../etc/passwd\n..\n\n").unwrap();
        assert_eq!(recorded(&cfg).unwrap(), ["portmap"]);
        assert_eq!(install(&cfg).unwrap(), Installed::default());
    }
}
