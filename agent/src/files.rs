// SPDX-License-Identifier: Apache-2.0
//! Files the agent puts on the node (the plugin binary, the conflist),
//! written so that a reader sees the old content or the new, never a part:
//! a temporary file in the same directory, fsync, rename, fsync of the
//! directory. Nothing is written when the content is already right, so a
//! restart of the agent changes nothing.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("{call} {path}: {source}")]
pub struct FileError {
    pub call: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

fn on<'a>(call: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> FileError + 'a {
    move |source| FileError {
        call,
        path: path.to_owned(),
        source,
    }
}

/// Whether the file has a name the runtime would load as a CNI config:
/// temporary files must not (libcni reads `.conf`, `.conflist`, `.json`).
pub fn is_cni_config_name(name: &str) -> bool {
    [".conf", ".conflist", ".json"]
        .iter()
        .any(|ext| name.ends_with(ext))
}

/// The temporary name next to `path`: hidden, and ending in neither
/// `.conf`, `.conflist` nor `.json`.
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.ferrite-tmp-{}", std::process::id()))
}

/// Writes `contents` to `path` with `mode`, atomically, unless the file
/// already holds exactly that with that mode. Returns whether it wrote.
pub fn write_if_changed(path: &Path, contents: &[u8], mode: u32) -> Result<bool, FileError> {
    match fs::read(path) {
        Ok(existing) if existing == contents => {
            let current = fs::metadata(path).map_err(on("stat", path))?;
            if current.permissions().mode() & 0o7777 == mode {
                return Ok(false);
            }
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(on("read", path)(e)),
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(on("mkdir", dir))?;
    let tmp = temp_path(path);
    let written = write_new(&tmp, contents, mode)
        .and_then(|()| fs::rename(&tmp, path).map_err(on("rename", path)));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(on("fsync", dir))?;
    Ok(true)
}

fn write_new(tmp: &Path, contents: &[u8], mode: u32) -> Result<(), FileError> {
    // A leftover from a killed agent with this pid would make O_EXCL fail.
    let _ = fs::remove_file(tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(tmp)
        .map_err(on("create", tmp))?;
    file.write_all(contents).map_err(on("write", tmp))?;
    // The umask may have narrowed the mode given to open.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(on("chmod", tmp))?;
    file.sync_all().map_err(on("fsync", tmp))
}

/// Copies `source` to `dest` (mode 0755) the same way; skipped when `dest`
/// already has the same bytes. Returns whether it wrote.
pub fn install_binary(source: &Path, dest: &Path) -> Result<bool, FileError> {
    let bytes = fs::read(source).map_err(on("read", source))?;
    write_if_changed(dest, &bytes, 0o755)
}

/// Removes `path`; returns whether it was there.
pub fn remove_if_present(path: &Path) -> Result<bool, FileError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(on("unlink", path)(e)),
    }
}

/// Removes temporary files the agent may have left next to `path` (a kill
/// between create and rename).
pub fn remove_temp_files(path: &Path) -> Result<usize, FileError> {
    let Some(dir) = path.parent() else {
        return Ok(0);
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let prefix = format!(".{name}.ferrite-tmp-");
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(on("readdir", dir)(e)),
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix)
            && remove_if_present(&entry.path())?
        {
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    use ferrite_test_support::TempDir as Dir;

    #[test]
    fn writes_once_then_only_on_change() {
        let d = Dir::new("once").unwrap();
        let p = d.join("net.d/10-ferrite.conflist");
        assert!(write_if_changed(&p, b"one\n", 0o644).unwrap());
        let ino = fs::metadata(&p).unwrap().ino();
        assert!(!write_if_changed(&p, b"one\n", 0o644).unwrap());
        assert_eq!(fs::metadata(&p).unwrap().ino(), ino, "untouched");
        assert!(write_if_changed(&p, b"two\n", 0o644).unwrap());
        assert_eq!(fs::read(&p).unwrap(), b"two\n");
        assert_ne!(
            fs::metadata(&p).unwrap().ino(),
            ino,
            "a new file renamed in"
        );
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o7777, 0o644);
    }

    #[test]
    fn a_wrong_mode_is_rewritten() {
        let d = Dir::new("mode").unwrap();
        let p = d.join("ferrite");
        fs::write(&p, b"bin").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(write_if_changed(&p, b"bin", 0o755).unwrap());
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o7777, 0o755);
    }

    #[test]
    fn leaves_no_temporary_file_and_none_a_runtime_would_load() {
        let d = Dir::new("tmp").unwrap();
        let p = d.join("10-ferrite.conflist");
        write_if_changed(&p, b"{}", 0o644).unwrap();
        let names: Vec<String> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["10-ferrite.conflist".to_string()]);
        let tmp = temp_path(&p);
        assert!(!is_cni_config_name(
            &tmp.file_name().unwrap().to_string_lossy()
        ));
        fs::write(&tmp, b"half").unwrap();
        assert_eq!(remove_temp_files(&p).unwrap(), 1);
        assert!(!tmp.exists());
    }

    #[test]
    fn a_failed_write_leaves_the_old_file() {
        let d = Dir::new("fail").unwrap();
        let p = d.join("f");
        write_if_changed(&p, b"old", 0o644).unwrap();
        // A directory where the temporary file would go makes create fail.
        fs::create_dir(temp_path(&p)).unwrap();
        fs::write(temp_path(&p).join("x"), b"").unwrap();
        assert!(write_if_changed(&p, b"new", 0o644).is_err());
        assert_eq!(fs::read(&p).unwrap(), b"old");
    }

    #[test]
    fn installs_a_binary_only_when_it_differs() {
        let d = Dir::new("bin").unwrap();
        let src = d.join("src");
        fs::write(&src, b"\x7fELF v1").unwrap();
        let dest = d.join("bin/ferrite");
        assert!(install_binary(&src, &dest).unwrap());
        assert!(!install_binary(&src, &dest).unwrap());
        assert_eq!(fs::metadata(&dest).unwrap().mode() & 0o7777, 0o755);
        fs::write(&src, b"\x7fELF v2").unwrap();
        assert!(install_binary(&src, &dest).unwrap());
        assert!(install_binary(&d.join("missing"), &dest).is_err());
        assert!(remove_if_present(&dest).unwrap());
        assert!(!remove_if_present(&dest).unwrap());
    }
}
