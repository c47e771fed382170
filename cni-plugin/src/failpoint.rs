//! Failure points for crash tests: when FERRITE_FAILPOINT names the point
//! the plugin reaches, the process kills itself with SIGKILL there, exactly
//! as `kill -9` would, leaving whatever it had done half done. Runtimes
//! never set the variable; reading it costs one environment lookup.
//!
//! FERRITE_REAPER_HOLD=<file> holds the reaper instead (see `reaper_hold`).

use std::sync::OnceLock;

static ARMED: OnceLock<Option<String>> = OnceLock::new();

/// Every point, in the order ADD and DEL reach them (tests iterate these).
pub const POINTS: &[&str] = &[
    "add-allocated",
    "add-veth-created",
    "add-configured",
    "add-attached",
    "add-mapped",
    "del-retired",
    "del-unmapped",
    "del-released",
];

pub fn hit(point: &str) {
    debug_assert!(POINTS.contains(&point), "unknown failpoint {point}");
    let armed = ARMED.get_or_init(|| std::env::var("FERRITE_FAILPOINT").ok());
    if armed.as_deref() == Some(point) {
        log::warn!("failpoint {point}: killing myself");
        // SAFETY: signals this very process.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

/// FERRITE_REAPER_HOLD=<file>: the reaper (the detached child that deletes
/// the veths DEL and GC retired) appends its pid to `<file>` and, before
/// deleting anything, waits until `<file>` is gone (at most a minute). A
/// test can then see DEL return while the veth still exists, as it does on
/// a busy node, and tell when the reaper is done. Read only in the reaper
/// child; runtimes never set it.
pub fn reaper_hold() {
    let Some(path) = std::env::var_os("FERRITE_REAPER_HOLD") else {
        return;
    };
    let path = std::path::PathBuf::from(path);
    let noted = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .and_then(|mut f| {
            std::io::Write::write_all(&mut f, format!("{}\n", std::process::id()).as_bytes())
        });
    if noted.is_err() {
        return;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while path.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}
