// SPDX-License-Identifier: Apache-2.0
//! The built `ferrite-agent` binary end to end, inside a node namespace,
//! against a stand-in API server: a few lines of HTTP that answer the Node
//! list and stream watch events, as kube-apiserver does for
//! `GET /api/v1/nodes` and `GET /api/v1/nodes?watch=true`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferrite_agent::routes::RTPROT_FERRITE_NODES;
use serde_json::{json, Value};

use crate::harness::{privileged, Netns, TempDir};

fn node_json(name: &str, cidrs: &[&str], ips: &[&str]) -> Value {
    json!({
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": { "name": name, "resourceVersion": "10" },
        "spec": { "podCIDR": cidrs.first(), "podCIDRs": cidrs },
        "status": {
            "addresses": ips.iter().map(|ip| json!({"type": "InternalIP", "address": ip}))
                .chain(std::iter::once(json!({"type": "Hostname", "address": name})))
                .collect::<Vec<_>>()
        }
    })
}

/// The stand-in API server: a Node list, and watch events the test adds.
struct FakeApi {
    addr: SocketAddr,
    events: Arc<Mutex<Vec<Value>>>,
    stop: Arc<AtomicBool>,
    requests: Arc<Mutex<Vec<String>>>,
}

impl FakeApi {
    fn start(ns: &Netns, nodes: Vec<Value>) -> Self {
        let listener = ns
            .run(|| TcpListener::bind("127.0.0.1:0"))
            .unwrap()
            .unwrap();
        listener.set_nonblocking(true).unwrap();
        let api = FakeApi {
            addr: listener.local_addr().unwrap(),
            events: Arc::default(),
            stop: Arc::default(),
            requests: Arc::default(),
        };
        let (events, stop, requests) = (api.events.clone(), api.stop.clone(), api.requests.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (events, stop, requests, nodes) = (
                            events.clone(),
                            stop.clone(),
                            requests.clone(),
                            nodes.clone(),
                        );
                        std::thread::spawn(move || serve(conn, nodes, events, stop, requests));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        api
    }

    fn push(&self, kind: &str, node: Value) {
        self.events
            .lock()
            .unwrap()
            .push(json!({"type": kind, "object": node}));
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(
    mut conn: TcpStream,
    nodes: Vec<Value>,
    events: Arc<Mutex<Vec<Value>>>,
    stop: Arc<AtomicBool>,
    requests: Arc<Mutex<Vec<String>>>,
) {
    conn.set_nonblocking(false).unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let target = head.split(' ').nth(1).unwrap_or_default().to_string();
    requests.lock().unwrap().push(target.clone());
    if !target.starts_with("/api/v1/nodes") {
        let _ = conn
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
    }
    if !target.contains("watch=true") {
        let body = json!({
            "kind": "NodeList",
            "apiVersion": "v1",
            "metadata": { "resourceVersion": "10" },
            "items": nodes,
        })
        .to_string();
        let _ = write!(
            conn,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        return;
    }
    let _ = conn.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
    );
    let mut sent = 0;
    while !stop.load(Ordering::Relaxed) {
        let pending: Vec<Value> = events.lock().unwrap()[sent..].to_vec();
        for e in pending {
            let line = format!("{e}\n");
            if write!(conn, "{:x}\r\n{line}\r\n", line.len()).is_err() {
                return;
            }
            sent += 1;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The agent process, killed on drop if the test did not stop it.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn http_get(ns: &Netns, addr: SocketAddr, path: &str) -> Option<String> {
    ns.run(|| {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: agent\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    })
    .ok()
    .flatten()
}

fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_binary_bootstraps_from_the_api_follows_the_watch_and_uninstalls() {
    if !privileged("the_binary_bootstraps_from_the_api_follows_the_watch_and_uninstalls") {
        return;
    }
    let ns = Netns::new("bin").unwrap();
    ns.exec(
        "ip link add up0 type veth peer name up0p && ip link set up0p up && ip link set up0 up && \
         ip addr add 192.0.2.1/24 dev up0",
    )
    .unwrap();
    let bpffs = TempDir::bpffs("binb").unwrap();
    let dirs = TempDir::new("bind").unwrap();
    std::fs::create_dir_all(dirs.join("src")).unwrap();
    std::fs::write(dirs.join("src/ferrite"), b"plugin").unwrap();
    std::fs::write(dirs.join("src/portmap"), b"portmap").unwrap();
    std::fs::write(dirs.join("src/loopback"), b"loopback").unwrap();

    // The Node exists but has no pod CIDR yet.
    let api = FakeApi::start(
        &ns,
        vec![
            node_json("a", &[], &["192.0.2.1"]),
            node_json("b", &["10.244.2.0/24"], &["192.0.2.2"]),
        ],
    );
    let kubeconfig = dirs.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://{}\nusers:\n- name: u\n  user:\n    token: t\ncontexts:\n- name: x\n  context:\n    cluster: c\n    user: u\ncurrent-context: x\n",
            api.addr
        ),
    )
    .unwrap();
    let metrics: SocketAddr = "127.0.0.1:9965".parse().unwrap();
    let flags = |cmd: &str| -> Vec<String> {
        [
            cmd,
            "--node-name",
            "a",
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--cluster-cidr",
            "10.244.0.0/16",
            "--metrics-addr",
            "127.0.0.1:9965",
            "--bpffs-root",
            bpffs.join("ferrite").to_str().unwrap(),
            // The image's layout: a directory with ferrite, portmap and loopback.
            "--plugin-source",
            dirs.join("src").to_str().unwrap(),
            "--state-dir",
            dirs.join("state").to_str().unwrap(),
            "--cni-bin-dir",
            dirs.join("bin").to_str().unwrap(),
            "--cni-conf-dir",
            dirs.join("net.d").to_str().unwrap(),
            "--resync-seconds",
            "2",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    // The agent's log (stderr), appended to by every start.
    let log = dirs.join("agent.log");
    let log_file = || {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap()
    };
    let start = || {
        Agent(
            Command::new("nsenter")
                .arg(format!("--net=/run/netns/{}", ns.name))
                .arg("--")
                .arg(env!("CARGO_BIN_EXE_ferrite-agent"))
                .args(flags("run"))
                .env_remove("KUBECONFIG")
                .env_remove("NODE_NAME")
                .stdout(Stdio::null())
                .stderr(log_file())
                .spawn()
                .unwrap(),
        )
    };
    let mut agent = start();
    wait_for("/healthz", Duration::from_secs(10), || {
        http_get(&ns, metrics, "/healthz").is_some_and(|r| r.starts_with("HTTP/1.1 200"))
    });
    // Listed, but its Node has no pod CIDR: not ready, no conflist.
    wait_for("the Node list", Duration::from_secs(10), || {
        api.requests
            .lock()
            .unwrap()
            .iter()
            .any(|r| r.contains("watch=true"))
    });
    wait_for(
        "the agent to wait for its pod CIDR",
        Duration::from_secs(10),
        || {
            std::fs::read_to_string(&log)
                .unwrap()
                .contains("waiting: Node a has no podCIDRs yet")
        },
    );
    let readyz = http_get(&ns, metrics, "/readyz").unwrap();
    assert!(readyz.starts_with("HTTP/1.1 503"), "{readyz}");
    assert!(!dirs.join("net.d/10-ferrite.conflist").exists());

    // The controller manager allocates its pod CIDR.
    api.push(
        "MODIFIED",
        node_json("a", &["10.244.1.0/24"], &["192.0.2.1"]),
    );
    wait_for("/readyz", Duration::from_secs(10), || {
        http_get(&ns, metrics, "/readyz").is_some_and(|r| r.starts_with("HTTP/1.1 200"))
    });
    assert!(dirs.join("net.d/10-ferrite.conflist").exists());
    assert_eq!(std::fs::read(dirs.join("bin/ferrite")).unwrap(), b"plugin");
    assert_eq!(std::fs::read(dirs.join("bin/portmap")).unwrap(), b"portmap");
    // A node with no CNI plugins of its own gets the loopback containerd's
    // CRI runs for every sandbox.
    assert_eq!(
        std::fs::read(dirs.join("bin/loopback")).unwrap(),
        b"loopback"
    );
    assert_eq!(
        ns.routes(RTPROT_FERRITE_NODES).unwrap(),
        ["10.244.2.0/24 via 192.0.2.2 dev up0"]
    );
    let m = http_get(&ns, metrics, "/metrics").unwrap();
    assert!(m.contains("\nferrite_agent_routes_programmed 1\n"), "{m}");
    assert!(m.contains("\nferrite_endpoints 0\n"), "{m}");

    // Nodes join and leave through the watch.
    api.push("ADDED", node_json("c", &["10.244.3.0/24"], &["192.0.2.3"]));
    api.push(
        "DELETED",
        node_json("b", &["10.244.2.0/24"], &["192.0.2.2"]),
    );
    wait_for("the watch's routes", Duration::from_secs(10), || {
        ns.routes(RTPROT_FERRITE_NODES).unwrap() == ["10.244.3.0/24 via 192.0.2.3 dev up0"]
    });

    // SIGTERM: the agent exits 0 and leaves the node's network in place.
    let conflist_before = std::fs::read(dirs.join("net.d/10-ferrite.conflist")).unwrap();
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(agent.0.id() as i32, libc::SIGTERM) };
    let status = agent.0.wait().unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(
        std::fs::read(dirs.join("net.d/10-ferrite.conflist")).unwrap(),
        conflist_before
    );
    assert_eq!(ns.routes(RTPROT_FERRITE_NODES).unwrap().len(), 1);
    assert!(ns.exec("nft list table inet ferrite").is_ok());

    // `uninstall` with the same flags removes it all.
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", ns.name))
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_ferrite-agent"))
        .args(flags("uninstall"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!dirs.join("net.d/10-ferrite.conflist").exists());
    assert!(!dirs.join("bin/ferrite").exists());
    assert!(!dirs.join("bin/portmap").exists());
    assert!(!dirs.join("bin/loopback").exists());
    assert!(ns.routes(RTPROT_FERRITE_NODES).unwrap().is_empty());
    assert!(ns.exec("nft list table inet ferrite").is_err());
    assert!(!bpffs.join("ferrite").exists());
}

#[test]
fn without_an_api_server_it_stays_alive_unready_and_counts_errors() {
    if !privileged("without_an_api_server_it_stays_alive_unready_and_counts_errors") {
        return;
    }
    let ns = Netns::new("noapi").unwrap();
    let dirs = TempDir::new("noapid").unwrap();
    let kubeconfig = dirs.join("kubeconfig");
    // Nothing listens on port 1 in a fresh namespace.
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://127.0.0.1:1\nusers:\n- name: u\n  user: {}\ncontexts:\n- name: x\n  context:\n    cluster: c\n    user: u\ncurrent-context: x\n",
    )
    .unwrap();
    let _agent = Agent(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", ns.name))
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_ferrite-agent"))
            .args([
                "run",
                "--node-name",
                "a",
                "--masquerade=false",
                "--metrics-addr",
                "127.0.0.1:9965",
            ])
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let metrics: SocketAddr = "127.0.0.1:9965".parse().unwrap();
    wait_for("API errors in /metrics", Duration::from_secs(15), || {
        http_get(&ns, metrics, "/metrics").is_some_and(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("ferrite_agent_api_errors_total "))
                .is_some_and(|n| n.parse::<u64>().unwrap() >= 2)
        })
    });
    assert!(http_get(&ns, metrics, "/healthz")
        .unwrap()
        .starts_with("HTTP/1.1 200"));
    assert!(http_get(&ns, metrics, "/readyz")
        .unwrap()
        .starts_with("HTTP/1.1 503"));
}
