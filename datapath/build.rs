//! Compiles the programs in `bpf/` (one object per program) into `OUT_DIR`,
//! derives the datapath version from the object bytes, and generates the
//! Rust `DropReason` enum from `bpf/lib/drop_reasons.h`.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

/// Objects, one C file each (one program each, but host_sock's eight), in
/// a fixed order (the version hash covers them in this order).
const PROGRAMS: &[&str] = &[
    "from_pod",
    "to_pod",
    "from_uplink",
    "to_uplink",
    "host_sock",
];

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

    let drop_reasons = bpf_dir.join("lib").join("drop_reasons.h");
    let rust = drop_reasons::generate(&drop_reasons);
    let generated = out_dir.join("drop_reason.rs");
    fs::write(&generated, rust).unwrap_or_else(|e| panic!("writing {}: {e}", generated.display()));

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

/// The Rust side of `bpf/lib/drop_reasons.h`, generated so the two cannot
/// disagree: each `#define DROP_<NAME> <code>` after a comment becomes a
/// variant documented by that comment.
mod drop_reasons {
    use std::{fs, path::Path};

    struct Reason {
        name: String,
        code: i32,
        doc: Vec<String>,
    }

    pub fn generate(header: &Path) -> String {
        let text = fs::read_to_string(header)
            .unwrap_or_else(|e| panic!("reading {}: {e}", header.display()));
        let fail =
            |line: usize, why: &str| -> ! { panic!("{}:{}: {why}", header.display(), line + 1) };
        let mut reasons: Vec<Reason> = Vec::new();
        let mut first = None;
        let mut slots = None;
        let mut comment: Option<Vec<String>> = None;
        let mut in_comment = false;
        for (n, line) in text.lines().enumerate() {
            let trimmed = line.trim();
            if in_comment || trimmed.starts_with("/*") {
                let open = !in_comment;
                in_comment = !trimmed.ends_with("*/");
                let body = trimmed.trim_start_matches("/*").trim_end_matches("*/");
                let body = body.trim();
                let body = body.strip_prefix('*').map_or(body, str::trim);
                let lines = if open {
                    comment.insert(Vec::new())
                } else {
                    comment.get_or_insert_with(Vec::new)
                };
                if !body.is_empty() {
                    lines.push(body.to_owned());
                }
                continue;
            }
            let words: Vec<&str> = trimmed.split_whitespace().collect();
            let doc = comment.take();
            let ["#define", name, value] = words[..] else {
                continue;
            };
            let Some(name) = name.strip_prefix("DROP_") else {
                continue;
            };
            match name {
                "REASON_FIRST" => {
                    first =
                        Some(value.strip_prefix("DROP_").unwrap_or_else(|| {
                            fail(n, "DROP_REASON_FIRST must name a DROP_<NAME>")
                        }))
                }
                "REASON_SLOTS" => {
                    slots = Some(
                        value
                            .parse::<usize>()
                            .unwrap_or_else(|_| fail(n, "DROP_REASON_SLOTS must be a number")),
                    )
                }
                _ => {
                    let code = value
                        .parse::<i32>()
                        .unwrap_or_else(|_| fail(n, "a drop reason's code must be a number"));
                    let doc = doc
                        .filter(|d| !d.is_empty())
                        .unwrap_or_else(|| fail(n, "a drop reason needs a comment above it"));
                    if !name
                        .bytes()
                        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
                    {
                        fail(n, "a drop reason's name is DROP_ and upper case, digits, _");
                    }
                    if let Some(last) = reasons.last() {
                        if code != last.code - 1 {
                            fail(n, "codes must be consecutive, each one below the last");
                        }
                    } else if code > -130 {
                        fail(n, "codes start at -130 or below, clear of every TC_ACT_*");
                    }
                    reasons.push(Reason {
                        name: name.to_owned(),
                        code,
                        doc,
                    });
                }
            }
        }
        let first = first.unwrap_or_else(|| panic!("{}: no DROP_REASON_FIRST", header.display()));
        let slots = slots.unwrap_or_else(|| panic!("{}: no DROP_REASON_SLOTS", header.display()));
        assert!(
            reasons.first().is_some_and(|r| r.name == first),
            "{}: DROP_REASON_FIRST must be the first reason",
            header.display()
        );
        assert!(
            reasons.len() <= slots,
            "{}: {} reasons do not fit DROP_REASON_SLOTS ({slots})",
            header.display(),
            reasons.len()
        );
        render(&reasons, slots)
    }

    /// `SPOOFED_IP` -> `SpoofedIp`.
    fn variant(name: &str) -> String {
        name.split('_')
            .flat_map(|word| {
                let mut chars = word.chars();
                chars
                    .next()
                    .into_iter()
                    .chain(chars.flat_map(char::to_lowercase))
            })
            .collect()
    }

    fn render(reasons: &[Reason], slots: usize) -> String {
        let mut variants = String::new();
        let mut all = String::new();
        let mut names = String::new();
        for r in reasons {
            let v = variant(&r.name);
            for line in &r.doc {
                variants += &format!("    #[doc = {:?}]\n", format!(" {line}"));
            }
            variants += &format!("    {v} = {},\n", r.code);
            all += &format!("        Self::{v},\n");
            names += &format!("            Self::{v} => {:?},\n", r.name);
        }
        let count = reasons.len();
        let first = reasons[0].code;
        format!(
            "// Generated by build.rs from bpf/lib/drop_reasons.h: edit the header.

/// Counter slots reserved for drops in each stats entry (`DROP_REASON_SLOTS`).
pub const DROP_REASON_SLOTS: usize = {slots};

/// A drop reason, with the code the C side uses (`DROP_*` in
/// `bpf/lib/drop_reasons.h`). Codes are below every `TC_ACT_*` verdict.
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {{
{variants}}}

impl DropReason {{
    /// Every reason, in code order.
    pub const ALL: [DropReason; {count}] = [
{all}    ];

    /// The first code (`DROP_REASON_FIRST`).
    pub const FIRST_CODE: i32 = {first};

    /// The name used in the C header, without `DROP_` (e.g. `SPOOFED_IP`).
    pub const fn name(self) -> &'static str {{
        match self {{
{names}        }}
    }}
}}
"
        )
    }
}
