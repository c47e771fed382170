//! What ferrite's privileged test targets share (`tests/it`, `tests/runtimes`):
//! the root gate, unique names, the binary under test, and shell helpers.
//! The tests themselves live in tests/.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Result};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Returns false (and says why) when the test cannot run here; under CI a
/// skip is a failure.
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

/// A name no other test of this run (or a concurrent run) uses: `prefix`,
/// the pid, `tag` and a counter. Short, since it may name a device.
pub fn unique_with(prefix: &str, tag: &str) -> String {
    format!(
        "{prefix}{}{tag}{}",
        std::process::id() % 100_000,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// The ferrite binary built by cargo for this workspace (FERRITE_BIN wins).
pub fn ferrite_bin() -> PathBuf {
    if let Ok(p) = std::env::var("FERRITE_BIN") {
        return PathBuf::from(p);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));
    for profile in ["release", "debug"] {
        let p = target.join(profile).join("ferrite");
        if p.exists() {
            return p;
        }
    }
    panic!("ferrite binary not built: run `cargo build --release` first");
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
