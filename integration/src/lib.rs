//! What ferrite's privileged test targets (`tests/it`, `tests/runtimes`)
//! share beyond `ferrite-test-support`: the binary under test. The tests
//! themselves live in tests/.

use std::path::{Path, PathBuf};

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
