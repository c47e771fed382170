//! What every runtime test needs: the root gate, one-at-a-time execution, a
//! node namespace that stands in for the host (the runtime and the plugin run
//! there, so the machine's own interfaces, routes and firewall are never
//! touched), a ferrite network with a private bpffs, state, CNI bin and conf
//! directory, and locally built images. Everything is removed on drop, on
//! every path. The root gate, names, the binary and `sh` come from the
//! integration crate's library, shared with tests/it.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

static SERIAL: Mutex<()> = Mutex::new(());

pub use ferrite_integration::ferrite_bin;
pub use ferrite_test_support::{privileged, sh, unmount_under, wait_for, TempDir};

/// The runtimes share host paths they hard-code (/run/containerd/s for shim
/// sockets, the libcni cache in /var/lib/cni) and the machine has two cores:
/// one runtime at a time.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn unique(tag: &str) -> String {
    ferrite_test_support::unique("fr", tag)
}

/// The conflist users copy, as shipped (or the one FERRITE_CONFLIST names).
pub fn shipped_conflist() -> Value {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let path = std::env::var("FERRITE_CONFLIST")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("conf/10-ferrite.conflist"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Result<Self> {
        let name = unique(tag);
        sh(&format!("ip netns add {name}"))?;
        let ns = Self { name };
        sh(&format!("ip -n {} link set lo up", ns.name))?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// Runs a shell command inside the namespace.
    pub fn exec(&self, cmd: &str) -> Result<String> {
        in_netns(&self.path(), cmd)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// Runs a shell command in the network namespace bound at `netns` (a pod's,
/// made by the runtime), the mount namespace staying the host's.
pub fn in_netns(netns: &Path, cmd: &str) -> Result<String> {
    sh(&format!(
        "nsenter --net={} sh -c '{}'",
        netns.display(),
        cmd
    ))
}

/// Whether `from` (a namespace path) can ping `to`.
pub fn ping(from: &Path, to: IpAddr) -> bool {
    in_netns(from, &format!("busybox ping -c 2 -W 2 {to}")).is_ok()
}

/// Runs `f` on a thread that has entered the namespace bound at `netns`.
pub fn run_in<T: Send>(netns: &Path, f: impl FnOnce() -> T + Send) -> Result<T> {
    let file = File::open(netns).with_context(|| format!("open {}", netns.display()))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on this thread only.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns: {}", std::io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("namespace thread panicked"))?
    })
}

/// Processes whose command line mentions `needle` (a private path of ours,
/// so only processes this test started match).
pub fn pids_mentioning(needle: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .collect()
}

pub fn kill(pid: i32, signal: i32) {
    // SAFETY: kill has no memory preconditions.
    unsafe { libc::kill(pid, signal) };
}

pub fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim().starts_with('Z'))
        })
}

/// Host directories a runtime creates at paths it hard-codes; those that did
/// not exist when the guard was made are removed when it drops.
pub struct HostDirs {
    created: Vec<PathBuf>,
}

impl HostDirs {
    pub fn guard() -> Self {
        let created = [
            "/run/containerd",
            "/var/lib/cni",
            "/var/lib/containers",
            "/run/containers",
            "/run/libpod",
        ]
        .iter()
        .map(PathBuf::from)
        .filter(|p| !p.exists())
        .collect();
        Self { created }
    }
}

impl Drop for HostDirs {
    fn drop(&mut self) {
        for p in &self.created {
            unmount_under(p);
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// One CNI invocation as the runtime made it, recorded by the wrapper.
#[derive(Debug, Clone)]
pub struct Call {
    pub env: BTreeMap<String, String>,
    pub stdin: Value,
    pub stdout: String,
    pub rc: i32,
}

impl Call {
    pub fn command(&self) -> &str {
        self.env.get("CNI_COMMAND").map_or("", String::as_str)
    }

    pub fn var(&self, k: &str) -> &str {
        self.env.get(k).map_or("", String::as_str)
    }

    /// A compact description: CNI_* variables and the stdin's keys.
    pub fn describe(&self) -> String {
        let vars: Vec<String> = self
            .env
            .iter()
            .filter(|(k, _)| k.starts_with("CNI_"))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let keys: Vec<String> = self
            .stdin
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        let rc = &self.stdin["runtimeConfig"];
        format!(
            "{} (exit {})\n    env: {}\n    stdin keys: {}\n    runtimeConfig: {}",
            self.command(),
            self.rc,
            vars.join(" "),
            keys.join(", "),
            if rc.is_null() {
                "-".to_string()
            } else {
                rc.to_string()
            },
        )
    }
}

/// A ferrite network on a node namespace: private bpffs, state directory,
/// CNI bin directory (ferrite behind a recording wrapper, plus the reference
/// plugins the runtimes need) and CNI conf directory.
pub struct Network {
    pub node: Netns,
    pub dir: TempDir,
    pub name: String,
    pub subnet: String,
}

impl Network {
    pub fn new(subnet: &str) -> Result<Self> {
        let node = Netns::new("node")?;
        let dir = TempDir::new("net")?;
        for d in ["bin", "net.d", "state", "bpffs"] {
            std::fs::create_dir_all(dir.path().join(d))?;
        }
        sh(&format!(
            "mount -t bpf bpf {}",
            dir.path().join("bpffs").display()
        ))?;
        let net = Self {
            node,
            name: unique("net"),
            subnet: subnet.to_string(),
            dir,
        };
        // Test-only: a wrapper that records env and stdin of every call,
        // then runs the real plugin with the same stdin, env and exit code.
        let wrapper = format!(
            "#!/bin/sh\n\
             in=$(cat)\n\
             out=$(printf '%s' \"$in\" | {bin})\n\
             rc=$?\n\
             [ -z \"$out\" ] || printf '%s\\n' \"$out\"\n\
             rec=$(printf '=== CALL\\n%s\\n--- STDIN\\n%s\\n--- STDOUT\\n%s\\n--- RC %s\\n=== END\\n' \"$(env)\" \"$in\" \"$out\" \"$rc\")\n\
             printf '%s\\n' \"$rec\" >> {log}\n\
             exit $rc\n",
            log = net.calls_log().display(),
            bin = ferrite_bin().display(),
        );
        let w = net.bin_dir().join("ferrite");
        std::fs::write(&w, wrapper)?;
        sh(&format!("chmod 755 {}", w.display()))?;
        for p in ["loopback", "portmap"] {
            std::os::unix::fs::symlink(Path::new("/usr/lib/cni").join(p), net.bin_dir().join(p))?;
        }
        Ok(net)
    }

    pub fn bin_dir(&self) -> PathBuf {
        self.dir.path().join("bin")
    }

    pub fn conf_dir(&self) -> PathBuf {
        self.dir.path().join("net.d")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn bpffs_root(&self) -> PathBuf {
        self.dir.path().join("bpffs").join("ferrite")
    }

    fn calls_log(&self) -> PathBuf {
        self.dir.path().join("calls.log")
    }

    /// The shipped conflist, pointed at this network's private paths. Its
    /// `cniVersion` is used as shipped: containerd 1.6 and podman 4.3 carry
    /// libcni 1.1 (results up to 1.0.0) and Debian's portmap 1.1.1 refuses
    /// configs newer than 1.0.0.
    pub fn conflist(&self) -> Value {
        let mut c = shipped_conflist();
        c["name"] = json!(self.name);
        let p = &mut c["plugins"][0];
        assert_eq!(
            p["type"], "ferrite",
            "the shipped conflist starts with ferrite"
        );
        p["ipam"]["ranges"] = json!([[{ "subnet": self.subnet }]]);
        p["bpffsRoot"] = json!(self.bpffs_root());
        p["stateDir"] = json!(self.state_dir());
        p["logFile"] = json!(self.state_dir().join("cni.log"));
        p["logLevel"] = json!("debug");
        c
    }

    pub fn write_conf(&self, file: &str, conflist: &Value) -> Result<()> {
        std::fs::write(
            self.conf_dir().join(file),
            serde_json::to_vec_pretty(conflist)?,
        )?;
        Ok(())
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let (base, len) = self.subnet.split_once('/').expect("subnet is a CIDR");
        let base: Ipv4Addr = base.parse().expect("IPv4 subnet");
        let len: u32 = len.parse().expect("prefix length");
        let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
        matches!(ip, IpAddr::V4(v4) if u32::from(v4) & mask == u32::from(base) & mask)
    }

    /// Host-side ferrite veths in the node namespace.
    pub fn host_veths(&self) -> Result<Vec<String>> {
        let out = sh(&format!("ip -n {} -o link show", self.node.name))?;
        Ok(out
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .filter(|n| n.starts_with("fer"))
            .collect())
    }

    /// The addresses ferrite's IPAM holds on this network, one
    /// `ip container ifname` line each (`ferrite allocations`).
    pub fn allocations(&self) -> Vec<String> {
        let out = Command::new(ferrite_bin())
            .args(["allocations", "--network", &self.name, "--state-dir"])
            .arg(self.state_dir())
            .output()
            .expect("running ferrite allocations");
        assert!(
            out.status.success(),
            "ferrite allocations: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| {
                l.split_whitespace()
                    .next()
                    .is_some_and(|w| w.parse::<IpAddr>().is_ok())
            })
            .map(str::to_string)
            .collect()
    }

    /// `ferrite stats` rows by endpoint address: the columns after the name.
    pub fn stats(&self) -> Result<HashMap<IpAddr, Vec<String>>> {
        let out = Command::new(ferrite_bin())
            .args(["stats", "--bpffs-root"])
            .arg(self.bpffs_root())
            .output()?;
        if !out.status.success() {
            bail!("stats failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let mut cols = l.split_whitespace();
                let ip = cols.next()?.parse().ok()?;
                Some((ip, cols.map(str::to_string).collect()))
            })
            .collect())
    }

    /// Packets of `ip` that took the fast path (column 5 of `ferrite stats`).
    pub fn redirected(&self, ip: IpAddr) -> Result<u64> {
        let stats = self.stats()?;
        let row = stats
            .get(&ip)
            .with_context(|| format!("{ip} has no endpoint in ferrite stats"))?;
        Ok(row.get(3).and_then(|v| v.parse().ok()).unwrap_or(0))
    }

    /// ferrite's own log lines at warn level and above.
    pub fn log_warnings(&self) -> Vec<String> {
        std::fs::read_to_string(self.state_dir().join("cni.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .map(str::to_string)
            .collect()
    }

    /// Everything the runtime sent ferrite so far.
    pub fn calls(&self) -> Vec<Call> {
        let text = std::fs::read_to_string(self.calls_log()).unwrap_or_default();
        let mut calls = vec![];
        for rec in text.split("=== CALL\n").skip(1) {
            let rec = rec.split("\n=== END").next().unwrap_or(rec);
            let (env, rest) = rec.split_once("\n--- STDIN\n").unwrap_or((rec, ""));
            let (stdin, rest) = rest.split_once("\n--- STDOUT\n").unwrap_or((rest, ""));
            let (stdout, rc) = rest.split_once("\n--- RC ").unwrap_or((rest, "-1"));
            let env = env
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            calls.push(Call {
                env,
                stdin: serde_json::from_str(stdin).unwrap_or(Value::Null),
                stdout: stdout.to_string(),
                rc: rc.trim().parse().unwrap_or(-1),
            });
        }
        calls
    }
}

/// Asserts nothing of any pod is left on the network: no veth, no endpoint
/// in the datapath's map, no address in the store.
pub fn assert_clean(net: &Network) -> Result<()> {
    // DEL takes a veth down at once and a detached reaper deletes it (the
    // kernel's RCU waits): give the reaper its few milliseconds.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut veths = net.host_veths()?;
    while !veths.is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
        veths = net.host_veths()?;
    }
    assert!(veths.is_empty(), "veths left: {veths:?}");
    let stats = net.stats()?;
    assert!(stats.is_empty(), "endpoints left: {stats:?}");
    let alloc = net.allocations();
    assert!(alloc.is_empty(), "addresses left: {alloc:?}");
    Ok(())
}

/// A busybox-static root filesystem as a tarball (a layer).
pub fn busybox_rootfs(dir: &Path) -> Result<PathBuf> {
    let root = dir.join("rootfs");
    std::fs::create_dir_all(root.join("bin"))?;
    std::fs::create_dir_all(root.join("www"))?;
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))?;
    for applet in ["sh", "sleep", "httpd", "ping", "nc", "cat", "echo", "ip"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
    }
    std::fs::write(root.join("www/index.html"), "ferrite\n")?;
    let tar = dir.join("layer.tar");
    sh(&format!(
        "tar --numeric-owner --owner=0 --group=0 -C {} -cf {} .",
        root.display(),
        tar.display()
    ))?;
    Ok(tar)
}

/// A docker-archive image (what `ctr images import` and `podman load` read)
/// whose one layer is busybox and whose entrypoint is `entrypoint`.
pub fn docker_archive(dir: &Path, tag: &str, entrypoint: &[&str]) -> Result<PathBuf> {
    let layer = busybox_rootfs(dir)?;
    let digest = sh(&format!("sha256sum {}", layer.display()))?;
    let digest = digest.split_whitespace().next().context("sha256sum")?;
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Entrypoint": entrypoint, "WorkingDir": "/" },
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{digest}")] },
    });
    std::fs::write(dir.join("config.json"), serde_json::to_vec(&config)?)?;
    let manifest = json!([{ "Config": "config.json", "RepoTags": [tag], "Layers": ["layer.tar"] }]);
    std::fs::write(dir.join("manifest.json"), serde_json::to_vec(&manifest)?)?;
    let out = dir.join("image.tar");
    sh(&format!(
        "tar -C {} -cf {} manifest.json config.json layer.tar",
        dir.display(),
        out.display()
    ))?;
    Ok(out)
}

/// A cgroup parent of our own for the runtimes' containers (as kubelet
/// passes one per pod): runc removes each container's cgroup, and this
/// removes the parent from every hierarchy when it drops.
pub struct CgroupParent {
    pub path: String,
}

impl CgroupParent {
    pub fn new() -> Self {
        Self {
            path: format!("/{}", unique("cg")),
        }
    }
}

impl Drop for CgroupParent {
    fn drop(&mut self) {
        let rel = self.path.trim_start_matches('/');
        let mut roots = vec![PathBuf::from("/sys/fs/cgroup")];
        if let Ok(d) = std::fs::read_dir("/sys/fs/cgroup") {
            roots.extend(d.filter_map(|e| e.ok()).map(|e| e.path()));
        }
        for root in roots {
            let dir = root.join(rel);
            if dir.is_dir() {
                let _ = wait_for(Duration::from_secs(5), || rmdir_tree(&dir).ok());
            }
        }
    }
}

/// Removes a cgroup directory and its children, deepest first.
fn rmdir_tree(dir: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            rmdir_tree(&e.path())?;
        }
    }
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}
