// SPDX-License-Identifier: Apache-2.0
//! Log lines on stderr, where the container runtime collects them (it adds
//! the timestamps).

use log::{Level, LevelFilter, Log, Metadata, Record};

struct Stderr {
    level: LevelFilter,
}

impl Log for Stderr {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        // Libraries speak at debug about every request: keep their warnings.
        let ours = metadata.target().starts_with("ferrite");
        metadata.level() <= Level::Warn || (ours && metadata.level() <= self.level)
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let target = record.target();
        if target.starts_with("ferrite") {
            eprintln!("{:<5} {}", record.level(), record.args());
        } else {
            // A library's line says whose it is.
            eprintln!("{:<5} {target}: {}", record.level(), record.args());
        }
    }

    fn flush(&self) {}
}

pub fn init(level: LevelFilter) {
    let logger = Box::leak(Box::new(Stderr { level }));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level.max(LevelFilter::Warn));
    }
}
