// SPDX-License-Identifier: Apache-2.0
//! Namespaces, temporary directories and a private bpffs, each removed on
//! drop, on every path.

use std::collections::BTreeSet;
use std::fs::File;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub use ferrite_test_support::{privileged, sh, TempDir};

/// A short name no other test of this or a concurrent run uses.
pub fn unique(tag: &str) -> String {
    ferrite_test_support::unique("fa", tag)
}

/// A named network namespace, deleted on drop.
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

    /// Runs a shell command inside the namespace.
    pub fn exec(&self, cmd: &str) -> Result<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "sh", "-c", cmd])
            .output()?;
        if !out.status.success() {
            bail!(
                "in {}: `{cmd}` failed: {}{}",
                self.name,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `f` on a thread that has entered this namespace: the test
    /// runner's own threads never change namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let file = File::open(format!("/run/netns/{}", self.name))?;
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on this thread only; the fd outlives it.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    bail!("setns: {}", std::io::Error::last_os_error());
                }
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("namespace thread panicked"))?
        })
    }

    /// The routes of protocol `proto` (`ip route show proto P`), both
    /// families, one line each.
    pub fn routes(&self, proto: u8) -> Result<Vec<String>> {
        let mut lines = Vec::new();
        for family in ["-4", "-6"] {
            let out = self.exec(&format!("ip {family} route show proto {proto}"))?;
            lines.extend(out.lines().map(|l| l.trim().to_string()));
        }
        Ok(lines)
    }

    /// The elements of one of ferrite's nftables sets (`nft` reads them back;
    /// a hash set lists them in no particular order).
    pub fn nft_set(&self, set: &str) -> Result<BTreeSet<String>> {
        let listed = self.exec(&format!("nft list set inet ferrite {set}"))?;
        let Some(start) = listed.find("elements = {") else {
            return Ok(BTreeSet::new());
        };
        let rest = &listed[start + "elements = {".len()..];
        let end = rest.find('}').context("unterminated element list")?;
        Ok(rest[..end]
            .split(',')
            .map(|e| e.trim().to_string())
            .filter(|e| !e.is_empty())
            .collect())
    }

    /// Listens on `addr` inside the namespace and returns the address the
    /// first connection came from (or None after `wait`).
    pub fn first_peer(&self, addr: SocketAddr, wait: Duration) -> Result<Listener> {
        let listener = self.run(|| TcpListener::bind(addr))??;
        listener.set_nonblocking(true)?;
        Ok(Listener { listener, wait })
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

/// A listening socket made inside a namespace (it stays there).
pub struct Listener {
    listener: TcpListener,
    wait: Duration,
}

impl Listener {
    /// The source address of the first connection.
    pub fn peer(&self) -> Option<IpAddr> {
        let deadline = Instant::now() + self.wait;
        while Instant::now() < deadline {
            match self.listener.accept() {
                Ok((_, peer)) => return Some(peer.ip()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(_) => return None,
            }
        }
        None
    }
}

/// Connects from inside `ns` to `addr`.
pub fn connect_from(ns: &Netns, addr: SocketAddr) -> Result<()> {
    ns.run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map(drop))?
        .with_context(|| format!("connecting from {} to {addr}", ns.name))
}

/// A veth pair between two namespaces with the given addresses
/// (`a_addrs` on the `a` end). IPv6 addresses skip DAD.
pub fn link(a: &Netns, b: &Netns, a_addrs: &[&str], b_addrs: &[&str]) -> Result<(String, String)> {
    let (an, bn) = (unique("a"), unique("b"));
    sh(&format!(
        "ip link add {an} netns {} type veth peer name {bn} netns {}",
        a.name, b.name
    ))?;
    for (ns, dev, addrs) in [(a, &an, a_addrs), (b, &bn, b_addrs)] {
        for addr in addrs {
            let nodad = if addr.contains(':') { " nodad" } else { "" };
            ns.exec(&format!("ip addr add {addr} dev {dev}{nodad}"))?;
        }
        ns.exec(&format!("ip link set {dev} up"))?;
    }
    Ok((an, bn))
}
