//! Compiles the programs in `bpf/` (one object per program) into `OUT_DIR`
//! and derives the datapath version from the object bytes.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

/// Programs, one C file and one object each, in a fixed order (the version
/// hash covers them in this order).
const PROGRAMS: &[&str] = &["from_pod", "to_pod", "from_uplink", "to_uplink"];

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let bpf_dir = manifest_dir.join("bpf");
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_owned());

    cargo("rerun-if-env-changed=CLANG");
    // Extra clang flags; tests build a binary whose programs differ with
    // FERRITE_BPF_CFLAGS=-DFERRITE_BUILD_TAG=<n> to exercise an upgrade.
    cargo("rerun-if-env-changed=FERRITE_BPF_CFLAGS");
    cargo(&format!("rerun-if-changed={}", bpf_dir.display()));
    for header in headers(&bpf_dir.join("lib")) {
        cargo(&format!("rerun-if-changed={}", header.display()));
    }

    let mut hash = Fnv1a64::new();
    for program in PROGRAMS {
        let source = bpf_dir.join(format!("{program}.c"));
        let object = out_dir.join(format!("{program}.o"));
        cargo(&format!("rerun-if-changed={}", source.display()));
        compile(&clang, &manifest_dir, &bpf_dir, &source, &object);
        let bytes =
            fs::read(&object).unwrap_or_else(|e| panic!("reading {}: {e}", object.display()));
        hash.write(program.as_bytes());
        hash.write(&(bytes.len() as u64).to_le_bytes());
        hash.write(&bytes);
    }
    cargo(&format!(
        "rustc-env=FERRITE_DATAPATH_VERSION={:016x}",
        hash.finish()
    ));
}

fn headers(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "h"))
        .collect();
    found.sort();
    found
}

/// Tells cargo something: build scripts speak to cargo on stdout.
fn cargo(directive: &str) {
    println!("cargo:{directive}"); // stdout-ok: a cargo directive
}

fn compile(clang: &str, manifest_dir: &Path, bpf_dir: &Path, source: &Path, object: &Path) {
    let output = Command::new(clang)
        .current_dir(manifest_dir)
        .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
        .args([
            "-Wno-unused-function",
            "-Wno-compare-distinct-pointer-types",
        ])
        .arg("-I/usr/include/x86_64-linux-gnu")
        .arg(format!("-I{}", bpf_dir.display()))
        .args(
            env::var("FERRITE_BPF_CFLAGS")
                .unwrap_or_default()
                .split_whitespace(),
        )
        // Keep the checkout path out of the debug info, so the object (and
        // with it the datapath version) does not depend on where it is built.
        .arg(format!("-fdebug-prefix-map={}=.", manifest_dir.display()))
        .arg("-c")
        .arg(source)
        .arg("-o")
        .arg(object)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `{clang}` to build the eBPF datapath (install clang or set CLANG): {e}"
            )
        });
    if !output.status.success() {
        panic!(
            "`{clang}` failed on {} ({}):\n{}",
            source.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// FNV-1a, 64 bits: small, stable across Rust releases, good enough to name
/// a build (not a security boundary).
struct Fnv1a64(u64);

impl Fnv1a64 {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}
