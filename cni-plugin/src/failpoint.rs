//! Failure points for crash tests: when FERRITE_FAILPOINT names the point
//! the plugin reaches, the process kills itself with SIGKILL there, exactly
//! as `kill -9` would, leaving whatever it had done half done. Runtimes
//! never set the variable; reading it costs one environment lookup.

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
