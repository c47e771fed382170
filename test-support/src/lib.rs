// SPDX-License-Identifier: Apache-2.0
//! What every test target of the workspace shares: the gate for tests that
//! need root, unique names, temporary directories (optionally a private
//! bpffs) removed on every path, a shell helper, and waiting for a condition
//! instead of sleeping. A dev-dependency only: nothing here ships.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// Whether a test that needs root can run here: false (with the reason
/// printed) when not root, and a panic instead under CI=true, where a skip
/// would hide a test that never ran.
pub fn privileged(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: needs root, and CI=true forbids skipping");
    }
    eprintln!("SKIP {test}: needs root");
    false
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name no other test of this run (or a concurrent run) uses: `prefix`,
/// the pid, `tag` and a counter. Short, since it may name a device.
pub fn unique(prefix: &str, tag: &str) -> String {
    format!(
        "{prefix}{}{tag}{}",
        std::process::id() % 100_000,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs `cmd` with sh; its stdout, or an error with both outputs.
pub fn sh(cmd: &str) -> Result<String> {
    let out = Command::new("sh").arg("-c").arg(cmd).output()?;
    if !out.status.success() {
        bail!(
            "`{cmd}` failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Polls `f` every 20 ms until it returns Some, or None once `timeout` has
/// passed: what a test waits on instead of a fixed sleep.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A fresh directory under the system's temporary directory, removed on
/// drop after detaching every mount at or below it (a private bpffs, or
/// what a container runtime under test left mounted).
pub struct TempDir {
    dir: tempfile::TempDir,
}

impl TempDir {
    /// A new empty directory whose name starts with `ferrite-<tag>-`.
    pub fn new(tag: &str) -> std::io::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("ferrite-{tag}-"))
            .tempdir()?;
        Ok(Self { dir })
    }

    /// A new directory with a private bpf filesystem mounted on it.
    pub fn bpffs(tag: &str) -> std::io::Result<Self> {
        let d = Self::new(tag)?;
        let target = c_path(d.path())?;
        // SAFETY: NUL-terminated strings, no data.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                target.as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            return Err(std::io::Error::new(
                e.kind(),
                format!("mount -t bpf bpf {}: {e}", d.path().display()),
            ));
        }
        Ok(d)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.dir.path().join(p)
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        self.path()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // tempfile removes the directory once the mounts are gone.
        unmount_under(self.path());
    }
}

fn c_path(p: &Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
}

/// Detaches every mount at or below `dir`, deepest first.
pub fn unmount_under(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    for p in points {
        if let Ok(c) = c_path(&p) {
            // SAFETY: a valid C string; MNT_DETACH cannot block.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// Bytes from hex text, whitespace ignored ("0800 0100"): captures of
/// what the kernel or a tool sends, pasted into tests.
pub fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex digits"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_dir_is_removed_on_drop() {
        let d = TempDir::new("self").unwrap();
        let p = d.path().to_owned();
        std::fs::write(d.join("f"), b"x").unwrap();
        assert!(p
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("ferrite-self-"));
        drop(d);
        assert!(!p.exists());
    }

    #[test]
    fn unique_names_differ() {
        assert_ne!(unique("t", "a"), unique("t", "a"));
    }

    #[test]
    fn wait_for_returns_the_value_or_gives_up() {
        let mut n = 0;
        assert_eq!(
            wait_for(Duration::from_secs(5), || {
                n += 1;
                (n == 3).then_some(n)
            }),
            Some(3)
        );
        assert_eq!(wait_for(Duration::from_millis(30), || None::<()>), None);
    }

    #[test]
    fn bpffs_is_mounted_and_unmounted() {
        if !privileged("bpffs_is_mounted_and_unmounted") {
            return;
        }
        let d = TempDir::bpffs("selfbpf").unwrap();
        let p = d.path().to_owned();
        let mounted = || {
            std::fs::read_to_string("/proc/self/mountinfo")
                .unwrap()
                .lines()
                .any(|l| l.split(' ').nth(4) == Some(p.to_str().unwrap()))
        };
        assert!(mounted());
        drop(d);
        assert!(!mounted());
        assert!(!p.exists());
    }
}
