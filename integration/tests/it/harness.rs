//! A small DSL for privileged tests: a node namespace that stands in for the
//! host (its IP forwarding is off, as every new namespace's is), pod
//! namespaces, a private bpffs and state directory, and the real `ferrite`
//! binary invoked exactly as a runtime invokes it. Everything is removed on
//! drop, on every path.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

pub use ferrite_integration::ferrite_bin;
pub use ferrite_test_support::{privileged, sh, TempDir};

pub fn unique(tag: &str) -> String {
    ferrite_test_support::unique("fi", tag)
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
        ns.exec("ip link set lo up")?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// Runs a shell command inside the namespace.
    pub fn exec(&self, cmd: &str) -> Result<String> {
        sh(&format!("ip netns exec {} sh -c '{}'", self.name, cmd))
    }

    pub fn exec_status(&self, cmd: &str) -> bool {
        Command::new("ip")
            .args(["netns", "exec", &self.name, "sh", "-c", cmd])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Runs `f` on a thread that has entered this namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let file = File::open(self.path())?;
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

    pub fn ping(&self, ip: IpAddr) -> bool {
        self.exec_status(&format!("busybox ping -c 2 -W 2 {ip}"))
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

/// The result of one plugin invocation.
#[derive(Debug)]
pub struct Invocation {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Invocation {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {:?}", self.stdout))
    }

    /// The CNI error code, panicking if the call succeeded.
    pub fn code(&self) -> u64 {
        assert!(!self.ok, "expected failure, got {}", self.stdout);
        self.json()["code"].as_u64().expect("error has a code")
    }

    pub fn expect_ok(&self) -> &Self {
        assert!(self.ok, "plugin failed: {} {}", self.stdout, self.stderr);
        self
    }
}

/// One ferrite network on one simulated node.
pub struct Node {
    pub ns: Netns,
    pub bpffs: TempDir,
    pub state: TempDir,
    pub name: String,
    pub subnet: String,
    pub extra: Value,
    /// The plugin binary this node's invocations run (tests swap it to
    /// upgrade ferrite under running pods).
    pub bin: std::sync::Mutex<PathBuf>,
}

impl Node {
    pub fn new(subnet: &str) -> Result<Self> {
        let ns = Netns::new("n")?;
        Ok(Self {
            ns,
            bpffs: TempDir::bpffs("b")?,
            state: TempDir::new("s")?,
            name: unique("net"),
            subnet: subnet.to_string(),
            extra: json!({}),
            bin: std::sync::Mutex::new(ferrite_bin()),
        })
    }

    /// The plugin's configuration, for a given cniVersion.
    pub fn conf(&self, version: &str) -> Value {
        let mut c = json!({
            "cniVersion": version,
            "name": self.name,
            "type": "ferrite",
            "mtu": 1500,
            "ipam": { "ranges": [[{ "subnet": self.subnet }]] },
            "bpffsRoot": self.bpffs.path().join("ferrite"),
            "stateDir": self.state.path(),
            "logFile": self.state.path().join("cni.log"),
            "logLevel": "debug",
        });
        if let Value::Object(extra) = &self.extra {
            for (k, v) in extra {
                c[k] = v.clone();
            }
        }
        c
    }

    /// Invokes the binary inside the node namespace, exactly as a runtime would.
    pub fn invoke(
        &self,
        command: &str,
        container_id: &str,
        netns: Option<&Path>,
        ifname: &str,
        stdin: &Value,
        extra_env: &[(&str, &str)],
    ) -> Result<Invocation> {
        self.invoke_raw(
            command,
            container_id,
            netns,
            ifname,
            serde_json::to_vec(stdin)?.as_slice(),
            extra_env,
        )
    }

    pub fn invoke_raw(
        &self,
        command: &str,
        container_id: &str,
        netns: Option<&Path>,
        ifname: &str,
        stdin: &[u8],
        extra_env: &[(&str, &str)],
    ) -> Result<Invocation> {
        let node = File::open(self.ns.path())?;
        let fd = node.as_raw_fd();
        let mut cmd = Command::new(self.bin.lock().unwrap().clone());
        cmd.env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container_id)
            .env("CNI_IFNAME", ifname)
            .env(
                "CNI_NETNS",
                netns.map(|p| p.display().to_string()).unwrap_or_default(),
            )
            .env("CNI_PATH", "/usr/lib/cni:/opt/cni/bin")
            .envs(extra_env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: only async-signal-safe setns between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().context("spawning ferrite")?;
        child.stdin.take().unwrap().write_all(stdin)?;
        let out: Output = child.wait_with_output()?;
        Ok(Invocation {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// ADD a pod in a fresh namespace; returns the pod and its result.
    pub fn add_pod(&self, version: &str) -> Result<Pod<'_>> {
        self.add_pod_with(self.conf(version))
    }

    /// ADD a pod with `conf` (which DEL and CHECK send again).
    pub fn add_pod_with(&self, conf: Value) -> Result<Pod<'_>> {
        let ns = Netns::new("p")?;
        let id = unique("c");
        let inv = self.invoke("ADD", &id, Some(&ns.path()), "eth0", &conf, &[])?;
        if !inv.ok {
            bail!("ADD failed: {} {}", inv.stdout, inv.stderr);
        }
        let result = inv.json();
        Ok(Pod {
            node: self,
            ns,
            id,
            result,
            conf,
            deleted: false,
        })
    }

    /// Host-side links in the node namespace (name list).
    pub fn links(&self) -> Result<Vec<String>> {
        let out = self.ns.exec("ip -o link show")?;
        Ok(out
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .collect())
    }

    /// Host links once ferrite's teardowns have finished: DEL and GC take a
    /// veth down at once and leave its deletion (the kernel's RCU waits) to
    /// a detached reaper, so a retired veth may linger for some milliseconds.
    pub fn links_settled(&self) -> Result<Vec<String>> {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let out = self.ns.exec("ip -o link show")?;
            let dying = out.lines().any(|l| {
                let name = l.split(": ").nth(1).unwrap_or("");
                let flags = l
                    .split('<')
                    .nth(1)
                    .and_then(|f| f.split('>').next())
                    .unwrap_or("");
                name.starts_with("fer") && !flags.split(',').any(|f| f == "UP")
            });
            if !dying || std::time::Instant::now() > deadline {
                return self.links();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the IPAM store holds: "ip container ifname" lines.
    pub fn allocations(&self) -> Vec<String> {
        let out = Command::new(ferrite_bin())
            .args(["allocations", "--network", &self.name, "--state-dir"])
            .arg(self.state.path())
            .output()
            .expect("ferrite allocations");
        assert!(
            out.status.success(),
            "ferrite allocations: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Runs `ferrite <args>` (a person's subcommand) inside the node namespace.
    pub fn ferrite(&self, args: &[&str]) -> Result<String> {
        let node = File::open(self.ns.path())?;
        let fd = node.as_raw_fd();
        let mut cmd = Command::new(self.bin.lock().unwrap().clone());
        cmd.args(args);
        // SAFETY: only async-signal-safe setns between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = cmd.output()?;
        if !out.status.success() {
            bail!("ferrite {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `ferrite stats` for this node's bpffs.
    pub fn stats(&self) -> Result<String> {
        let out = Command::new(ferrite_bin())
            .args(["stats", "--bpffs-root"])
            .arg(self.bpffs.path().join("ferrite"))
            .output()?;
        if !out.status.success() {
            bail!("stats failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// A pod made by ADD; DEL on drop unless the test already did it.
pub struct Pod<'a> {
    pub node: &'a Node,
    pub ns: Netns,
    pub id: String,
    pub result: Value,
    /// The configuration ADD got.
    pub conf: Value,
    pub deleted: bool,
}

impl Pod<'_> {
    /// Every address ADD gave the pod, in the result's order.
    pub fn ips(&self) -> Vec<IpAddr> {
        self.result["ips"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                let a = i["address"].as_str().unwrap();
                a.split('/').next().unwrap().parse().unwrap()
            })
            .collect()
    }

    pub fn ip(&self) -> IpAddr {
        let a = self.result["ips"][0]["address"].as_str().unwrap();
        a.split('/').next().unwrap().parse().unwrap()
    }

    pub fn host_veth(&self) -> String {
        self.result["interfaces"][0]["name"]
            .as_str()
            .unwrap()
            .to_string()
    }

    pub fn conf_with_prev(&self) -> Value {
        let mut c = self.conf.clone();
        c["prevResult"] = self.result.clone();
        c
    }

    pub fn del(&mut self) -> Result<Invocation> {
        let c = self.conf_with_prev();
        let inv = self
            .node
            .invoke("DEL", &self.id, Some(&self.ns.path()), "eth0", &c, &[])?;
        if inv.ok {
            self.deleted = true;
        }
        Ok(inv)
    }

    pub fn check(&self) -> Result<Invocation> {
        self.node.invoke(
            "CHECK",
            &self.id,
            Some(&self.ns.path()),
            "eth0",
            &self.conf_with_prev(),
            &[],
        )
    }
}

impl Drop for Pod<'_> {
    fn drop(&mut self) {
        if !self.deleted {
            let _ = self.del();
        }
    }
}

/// Moves `bytes` over TCP from `client` to a server in `server`, and the
/// same amount back; returns the bytes echoed.
pub fn tcp_echo(server: &Netns, server_ip: IpAddr, client: &Netns, bytes: usize) -> Result<usize> {
    let listener = server.run(|| TcpListener::bind(SocketAddr::new(server_ip, 0)))??;
    let port = listener.local_addr()?.port();
    std::thread::scope(|s| {
        let srv = s.spawn(move || -> Result<()> {
            let (mut conn, _) = listener.accept()?;
            conn.set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0;
            while total < bytes {
                let n = conn.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                conn.write_all(&buf[..n])?;
                total += n;
            }
            Ok(())
        });
        let stream = client.run(|| {
            TcpStream::connect_timeout(&SocketAddr::new(server_ip, port), Duration::from_secs(5))
        })??;
        let mut reader = stream.try_clone()?;
        reader.set_read_timeout(Some(Duration::from_secs(10)))?;
        let writer = s.spawn(move || -> Result<()> {
            let mut stream = stream;
            let chunk = vec![0x5au8; 64 * 1024];
            let mut sent = 0;
            while sent < bytes {
                let n = chunk.len().min(bytes - sent);
                stream.write_all(&chunk[..n])?;
                sent += n;
            }
            Ok(())
        });
        let mut got = 0;
        let mut buf = vec![0u8; 64 * 1024];
        while got < bytes {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                break;
            }
            if buf[..n].iter().any(|b| *b != 0x5a) {
                bail!("corrupted echo");
            }
            got += n;
        }
        writer
            .join()
            .map_err(|_| anyhow::anyhow!("writer panicked"))??;
        srv.join()
            .map_err(|_| anyhow::anyhow!("server panicked"))??;
        Ok(got)
    })
}

/// Runs any CNI plugin binary inside `node`'s namespace, as libcni would:
/// CNI_* variables, the plugin's own configuration on stdin, and a PATH
/// (the reference plugins run `iptables`).
pub fn invoke_plugin(
    node: &Netns,
    plugin: &Path,
    command: &str,
    container_id: &str,
    netns: &Path,
    stdin: &Value,
) -> Result<Invocation> {
    let file = File::open(node.path())?;
    let fd = file.as_raw_fd();
    let mut cmd = Command::new(plugin);
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container_id)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_NETNS", netns)
        .env("CNI_PATH", "/usr/lib/cni:/opt/cni/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: only async-signal-safe setns between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("spawning {}", plugin.display()))?;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&serde_json::to_vec(stdin)?)?;
    let out = child.wait_with_output()?;
    Ok(Invocation {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// One endpoint's counters from `ferrite stats`: from_pod, from_bytes,
/// redirected, redir_bytes, redir_in, via_stack.
pub fn endpoint_counters(stats: &str, ip: IpAddr) -> [u64; 6] {
    let ip = ip.to_string();
    let row: Vec<&str> = stats
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|w| w.first() == Some(&ip.as_str()))
        .unwrap_or_else(|| panic!("no row for {ip} in\n{stats}"));
    let mut c = [0u64; 6];
    for (i, v) in c.iter_mut().enumerate() {
        *v = row[2 + i].parse().expect("counter is a number");
    }
    c
}
