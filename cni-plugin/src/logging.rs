//! Logs go to the configured file; warnings and errors also to stderr.
//! Never to stdout, which belongs to the result.

use std::fs::{DirBuilder, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use log::{Level, LevelFilter, Log, Metadata, Record};

use crate::config::LogLevel;

struct Logger {
    file: Option<Mutex<std::fs::File>>,
    level: LevelFilter,
    context: String,
}

/// The pid in every line, asked once (glibc does not cache getpid) and
/// again in a forked child ([`forked`]).
static PID: AtomicU32 = AtomicU32::new(0);

/// Call in a child after fork, so that its lines carry its own pid.
pub fn forked() {
    PID.store(std::process::id(), Ordering::Relaxed);
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        // Libraries (aya) speak at debug about every relocation: keep only
        // their warnings.
        let ours = metadata.target().starts_with("ferrite");
        metadata.level() <= Level::Warn || (ours && metadata.level() <= self.level)
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        if record.level() <= Level::Warn {
            eprintln!("ferrite: {}: {}", record.level(), record.args());
        }
        if record.level() > self.level && record.level() > Level::Warn {
            return;
        }
        if let Some(file) = &self.file {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            let line = format!(
                "{}.{:06} {} [{}] {} {}\n",
                now.as_secs(),
                now.subsec_micros(),
                record.level(),
                PID.load(Ordering::Relaxed),
                self.context,
                record.args()
            );
            if let Ok(mut f) = file.lock() {
                // One write per line, so lines of concurrent plugins never interleave.
                let _ = f.write_all(line.as_bytes());
            }
        }
    }

    fn flush(&self) {}
}

/// Installs the logger. A log file that cannot be opened is a warning, not a
/// failure: the network matters more than the log.
pub fn init(file: Option<&Path>, level: LogLevel, context: String) {
    let level = match level {
        LogLevel::Error => LevelFilter::Error,
        LogLevel::Warn => LevelFilter::Warn,
        LogLevel::Info => LevelFilter::Info,
        LogLevel::Debug => LevelFilter::Debug,
    };
    let mut open_error = None;
    let file = file.and_then(|p| {
        open_log(p)
            .map_err(|e| open_error = Some(format!("cannot open log file {}: {e}", p.display())))
            .ok()
            .map(Mutex::new)
    });
    let logger = Logger {
        file,
        level,
        context,
    };
    PID.store(std::process::id(), Ordering::Relaxed);
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(LevelFilter::Debug.max(level));
    }
    if let Some(e) = open_error {
        log::warn!("{e}");
    }
}

/// Opens the log file for appending; its directory is made (0700) only
/// when the file cannot be opened for want of it, so that the usual case,
/// every ADD after the first, costs one open.
fn open_log(path: &Path) -> std::io::Result<std::fs::File> {
    let open = || {
        OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
    };
    match open() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
            }
            open()
        }
        other => other,
    }
}
