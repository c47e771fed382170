//! ferrite beside what else runs on a node: kube-proxy's Service DNAT,
//! portmap's hostPorts, the node's own masquerade for egress, and the
//! node talking to its pods. Every rule lives in the test's node namespace.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::chaining::Chain;
use crate::harness::{endpoint_counters, privileged, tcp_echo, unique, Netns, Node};

pub(crate) const VIP: &str = "10.96.0.10";
/// The node's own address (kube-proxy masquerades hairpin traffic to it).
const NODE_IP: &str = "192.0.2.1";

/// A real node forwards (kubelet and kube-proxy require it); the fast path
/// does not need it, but Service and hostPort traffic between pods and
/// anything leaving the node takes the stack.
pub(crate) fn enable_forwarding(node: &Node) {
    node.ns
        .exec("echo 1 > /proc/sys/net/ipv4/ip_forward")
        .unwrap();
}

/// A "remote host": a namespace joined to the node by a veth pair, node side
/// 198.51.100.1/24, remote side 198.51.100.2/24.
pub(crate) struct Remote {
    pub(crate) ns: Netns,
    pub(crate) uplink: String,
}

pub(crate) const UPLINK_NODE: &str = "198.51.100.1";
pub(crate) const UPLINK_REMOTE: &str = "198.51.100.2";

impl Remote {
    pub(crate) fn new(node: &Node) -> Result<Self> {
        let ns = Netns::new("r")?;
        let uplink = unique("u");
        let peer = unique("d");
        node.ns.exec(&format!(
            "ip link add {uplink} type veth peer name {peer} netns {} && \
             ip addr add {UPLINK_NODE}/24 dev {uplink} && ip link set {uplink} up",
            ns.name
        ))?;
        ns.exec(&format!(
            "ip link set {peer} name eth0 && ip addr add {UPLINK_REMOTE}/24 dev eth0 && \
             ip link set eth0 up"
        ))?;
        Ok(Self { ns, uplink })
    }
}

/// Accepts `conns` connections on `listener` one after another and echoes
/// each until EOF; returns the peers as the server saw them.
pub(crate) fn serve_echo(
    listener: TcpListener,
    conns: usize,
    deadline: Duration,
) -> Result<Vec<SocketAddr>> {
    listener.set_nonblocking(true)?;
    let end = Instant::now() + deadline;
    let mut peers = Vec::new();
    while peers.len() < conns {
        let (mut conn, peer) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > end {
                    bail!("no connection after {deadline:?} (got {peers:?})");
                }
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        peers.push(peer);
        conn.set_nonblocking(false)?;
        conn.set_read_timeout(Some(deadline))?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = conn.read(&mut buf)?;
            if n == 0 {
                break;
            }
            conn.write_all(&buf[..n])?;
        }
    }
    Ok(peers)
}

/// Sends `bytes` in lock-step chunks and checks each comes back intact.
pub(crate) fn exchange(stream: &mut TcpStream, bytes: usize, fill: u8) -> Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let chunk = vec![fill; 16 * 1024];
    let mut back = vec![0u8; chunk.len()];
    let mut done = 0;
    while done < bytes {
        let n = chunk.len().min(bytes - done);
        stream.write_all(&chunk[..n])?;
        stream
            .read_exact(&mut back[..n])
            .with_context(|| format!("echo after {done} bytes"))?;
        if back[..n].iter().any(|b| *b != fill) {
            bail!("corrupted echo");
        }
        done += n;
    }
    Ok(())
}

pub(crate) fn connect(ns: &Netns, to: SocketAddr) -> Result<TcpStream> {
    ns.run(|| TcpStream::connect_timeout(&to, Duration::from_secs(5)))?
        .with_context(|| format!("connect to {to} from {}", ns.name))
}

/// A UDP echo in `server` for `datagrams` datagrams; the client in `client`
/// sends to `to` and checks that every answer comes from `to` itself (for a
/// Service: conntrack undid the DNAT, so the reply took the stack).
pub(crate) fn udp_round_trips(
    server: &Netns,
    bind: SocketAddr,
    client: &Netns,
    to: SocketAddr,
    datagrams: usize,
) -> Result<()> {
    let srv = server.run(|| UdpSocket::bind(bind))??;
    srv.set_read_timeout(Some(Duration::from_secs(5)))?;
    let cli = client.run(|| UdpSocket::bind("0.0.0.0:0"))??;
    cli.set_read_timeout(Some(Duration::from_secs(5)))?;
    std::thread::scope(|s| {
        let echo = s.spawn(|| -> Result<()> {
            let mut buf = [0u8; 2048];
            for _ in 0..datagrams {
                let (n, peer) = srv.recv_from(&mut buf)?;
                srv.send_to(&buf[..n], peer)?;
            }
            Ok(())
        });
        let mut buf = [0u8; 2048];
        for i in 0..datagrams {
            let msg = format!("query {i}");
            cli.send_to(msg.as_bytes(), to)?;
            let (n, from) = cli
                .recv_from(&mut buf)
                .with_context(|| format!("answer {i}"))?;
            if from != to {
                bail!("answer {i} came from {from}, not {to}");
            }
            if &buf[..n] != msg.as_bytes() {
                bail!("answer {i} is corrupted");
            }
        }
        echo.join()
            .map_err(|_| anyhow::anyhow!("udp echo panicked"))?
    })
}

/// kube-proxy's iptables rules for one ClusterIP Service with one endpoint:
/// DNAT in KUBE-SEP, the hairpin mark when the endpoint is the client, and
/// the masquerade of marked packets in KUBE-POSTROUTING.
pub(crate) fn kube_proxy_rules(node: &Node, backend: IpAddr) {
    let rules = format!(
        "*nat
:KUBE-SERVICES - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-SVC-TCP - [0:0]
:KUBE-SVC-UDP - [0:0]
:KUBE-SEP-TCP - [0:0]
:KUBE-SEP-UDP - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0
-A KUBE-POSTROUTING -j MASQUERADE --random-fully
-A KUBE-SERVICES -d {VIP}/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-TCP
-A KUBE-SERVICES -d {VIP}/32 -p udp -m udp --dport 53 -j KUBE-SVC-UDP
-A KUBE-SVC-TCP -j KUBE-SEP-TCP
-A KUBE-SVC-UDP -j KUBE-SEP-UDP
-A KUBE-SEP-TCP -s {backend}/32 -j KUBE-MARK-MASQ
-A KUBE-SEP-TCP -p tcp -m tcp -j DNAT --to-destination {backend}:8080
-A KUBE-SEP-UDP -s {backend}/32 -j KUBE-MARK-MASQ
-A KUBE-SEP-UDP -p udp -m udp -j DNAT --to-destination {backend}:5353
COMMIT
"
    );
    let path = node.state.path().join("kube-proxy.rules");
    std::fs::write(&path, rules).unwrap();
    node.ns
        .exec(&format!("iptables-restore -w < {}", path.display()))
        .unwrap();
}

/// How long the long-lived Service connection sits idle
/// (FERRITE_IDLE_SECS, default 20 s; set minutes for a soak run).
fn idle() -> Duration {
    Duration::from_secs(
        std::env::var("FERRITE_IDLE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20),
    )
}

pub(crate) fn delta(after: [u64; 6], before: [u64; 6]) -> [u64; 6] {
    let mut d = [0; 6];
    for i in 0..6 {
        d[i] = after[i] - before[i];
    }
    d
}

#[test]
fn service_dnat_between_pods() {
    if !privileged("service_dnat_between_pods") {
        return;
    }
    let node = Node::new("10.72.0.0/24").unwrap();
    enable_forwarding(&node);
    node.ns
        .exec(&format!("ip addr add {NODE_IP}/32 dev lo"))
        .unwrap();
    let a = node.add_pod("1.1.0").unwrap();
    let b = node.add_pod("1.1.0").unwrap();
    kube_proxy_rules(&node, a.ip());
    let vip: IpAddr = VIP.parse().unwrap();

    let before = node.stats().unwrap();
    let (a0, b0) = (
        endpoint_counters(&before, a.ip()),
        endpoint_counters(&before, b.ip()),
    );

    // TCP through the Service, with an idle period in the middle.
    let listener =
        a.ns.run(|| TcpListener::bind(SocketAddr::new(a.ip(), 8080)))
            .unwrap()
            .unwrap();
    let idle = idle();
    std::thread::scope(|s| {
        let server = s.spawn(|| serve_echo(listener, 1, idle + Duration::from_secs(30)));
        let mut conn = connect(&b.ns, SocketAddr::new(vip, 80)).unwrap();
        assert_eq!(conn.peer_addr().unwrap(), SocketAddr::new(vip, 80));
        exchange(&mut conn, 1 << 20, 0x11).unwrap();
        std::thread::sleep(idle);
        exchange(&mut conn, 1 << 20, 0x22).expect("the connection survives idle");
        drop(conn);
        let peers = server.join().unwrap().unwrap();
        // No masquerade between two pods: the backend sees the client.
        assert_eq!(peers[0].ip(), b.ip());
    });

    // UDP (DNS-style) through the Service: answers come from the VIP.
    udp_round_trips(
        &a.ns,
        SocketAddr::new(a.ip(), 5353),
        &b.ns,
        SocketAddr::new(vip, 53),
        50,
    )
    .unwrap();

    let mid = node.stats().unwrap();
    let (a1, b1) = (
        endpoint_counters(&mid, a.ip()),
        endpoint_counters(&mid, b.ip()),
    );
    let (ad, bd) = (delta(a1, a0), delta(b1, b0));
    // Columns: from_pod, from_bytes, redirected, redir_bytes, redir_in, via_stack.
    eprintln!(
        "service flow: backend sent {} packets, {} redirected; client received {} via the stack, {} redirected in",
        ad[0], ad[2], bd[5], bd[4]
    );
    assert!(ad[0] > 50, "backend sent replies: {ad:?}");
    assert_eq!(ad[2], 0, "no Service reply may take the redirect: {ad:?}");
    assert_eq!(bd[4], 0, "the client got no redirected packet: {bd:?}");
    // The backend's own IPv6 chatter (duplicate address detection, MLD
    // reports, router solicitations) also counts as sent, and goes to the
    // node, not the client: a pod sends 8 such packets in its first 22 s
    // here. How many fall inside this window depends on how soon after
    // its link came up ADD returned (one more since ADD got faster).
    assert!(
        bd[5] + 12 >= ad[0],
        "every reply reached the client through the stack: {ad:?} {bd:?}"
    );

    // Direct pod-to-pod traffic still takes the fast path.
    let moved = tcp_echo(&a.ns, a.ip(), &b.ns, 4 << 20).unwrap();
    assert_eq!(moved, 4 << 20);
    let after = node.stats().unwrap();
    let (a2, b2) = (
        endpoint_counters(&after, a.ip()),
        endpoint_counters(&after, b.ip()),
    );
    let (ad, bd) = (delta(a2, a1), delta(b2, b1));
    eprintln!(
        "direct flow: client sent {} packets, {} redirected ({:.1} %); backend sent {}, {} redirected ({:.1} %)",
        bd[0],
        bd[2],
        100.0 * bd[2] as f64 / bd[0].max(1) as f64,
        ad[0],
        ad[2],
        100.0 * ad[2] as f64 / ad[0].max(1) as f64
    );
    assert!(
        bd[2] * 100 >= bd[0] * 99,
        "direct packets take the redirect: {bd:?}"
    );
    assert!(
        ad[2] * 100 >= ad[0] * 99,
        "direct replies take the redirect: {ad:?}"
    );
}

#[test]
fn service_hairpin() {
    if !privileged("service_hairpin") {
        return;
    }
    let node = Node::new("10.73.0.0/24").unwrap();
    enable_forwarding(&node);
    node.ns
        .exec(&format!("ip addr add {NODE_IP}/32 dev lo"))
        .unwrap();
    let a = node.add_pod("1.1.0").unwrap();
    kube_proxy_rules(&node, a.ip());
    let vip: IpAddr = VIP.parse().unwrap();

    let listener =
        a.ns.run(|| TcpListener::bind(SocketAddr::new(a.ip(), 8080)))
            .unwrap()
            .unwrap();
    std::thread::scope(|s| {
        let server = s.spawn(|| serve_echo(listener, 1, Duration::from_secs(20)));
        let mut conn = connect(&a.ns, SocketAddr::new(vip, 80)).unwrap();
        exchange(&mut conn, 1 << 20, 0x33).unwrap();
        drop(conn);
        let peers = server.join().unwrap().unwrap();
        // kube-proxy masqueraded the hairpin to the node's address.
        assert_eq!(peers[0].ip().to_string(), NODE_IP);
    });
    udp_round_trips(
        &a.ns,
        SocketAddr::new(a.ip(), 5353),
        &a.ns,
        SocketAddr::new(vip, 53),
        20,
    )
    .unwrap();
}

/// hostPort through portmap chained after ferrite, with both spellings of
/// portMappings keys: containerd's (`HostPort`) and podman's (`hostPort`).
#[test]
fn host_port_through_portmap() {
    if !privileged("host_port_through_portmap") {
        return;
    }
    let node = Node::new("10.74.0.0/24").unwrap();
    enable_forwarding(&node);
    let remote = Remote::new(&node).unwrap();
    let client = node.add_pod("1.0.0").unwrap();
    let portmap = json!({"type": "portmap", "capabilities": {"portMappings": true}, "snat": true});
    let mappings = [
        (
            18080,
            json!([{"HostPort": 18080, "ContainerPort": 8080, "Protocol": "tcp"}]),
        ),
        (
            18081,
            json!([{"hostPort": 18081, "containerPort": 8080, "protocol": "tcp"}]),
        ),
    ];
    for (host_port, pm) in mappings {
        let mut web = Chain::new(
            &node,
            json!({}),
            vec![portmap.clone()],
            json!({ "portMappings": pm }),
        )
        .unwrap();
        web.add().unwrap();
        web.check().unwrap();
        let nat = node.ns.exec("iptables-save -t nat").unwrap();
        assert!(
            nat.contains(&format!("--dport {host_port}")),
            "portmap wrote no DNAT for {pm}:\n{nat}"
        );
        let published = SocketAddr::new(UPLINK_NODE.parse().unwrap(), host_port);
        let listener = web
            .ns
            .run(|| TcpListener::bind(SocketAddr::new(web.ip(), 8080)))
            .unwrap()
            .unwrap();
        std::thread::scope(|s| {
            let server = s.spawn(|| serve_echo(listener, 3, Duration::from_secs(20)));
            for (who, ns) in [
                ("pod", &client.ns),
                ("node", &node.ns),
                ("remote", &remote.ns),
            ] {
                let mut conn = connect(ns, published)
                    .with_context(|| format!("{who} -> hostPort {host_port}"))
                    .unwrap();
                exchange(&mut conn, 256 << 10, 0x44)
                    .with_context(|| format!("{who} -> hostPort {host_port}"))
                    .unwrap();
            }
            let peers = server.join().unwrap().unwrap();
            eprintln!("hostPort {host_port}: backend saw {peers:?}");
        });
        web.del().unwrap();
        let nat = node.ns.exec("iptables-save -t nat").unwrap();
        assert!(
            !nat.contains(&format!("--dport {host_port}")),
            "DEL left portmap's rules:\n{nat}"
        );
    }
    assert_eq!(node.allocations().len(), 1, "only the client pod is left");
}

/// Kubelet-style probes (node -> pod) and a pod reaching a node address,
/// over TCP both ways.
#[test]
fn node_and_pod_over_tcp() {
    if !privileged("node_and_pod_over_tcp") {
        return;
    }
    let node = Node::new("10.75.0.0/24").unwrap();
    node.ns
        .exec(&format!("ip addr add {NODE_IP}/32 dev lo"))
        .unwrap();
    let a = node.add_pod("1.1.0").unwrap();
    // A probe: connect, short exchange, close, repeated.
    let listener =
        a.ns.run(|| TcpListener::bind(SocketAddr::new(a.ip(), 8080)))
            .unwrap()
            .unwrap();
    std::thread::scope(|s| {
        let server = s.spawn(|| serve_echo(listener, 5, Duration::from_secs(10)));
        for _ in 0..5 {
            let mut conn = connect(&node.ns, SocketAddr::new(a.ip(), 8080)).unwrap();
            exchange(&mut conn, 64, 0x55).unwrap();
        }
        server.join().unwrap().unwrap();
    });
    // The pod to a process on the node (an API server on hostNetwork, say).
    let moved = tcp_echo(&node.ns, NODE_IP.parse().unwrap(), &a.ns, 1 << 20).unwrap();
    assert_eq!(moved, 1 << 20);
}

/// A pod reaches a host outside the node through the node's masquerade.
#[test]
fn pod_egress_through_node_masquerade() {
    if !privileged("pod_egress_through_node_masquerade") {
        return;
    }
    let node = Node::new("10.76.0.0/24").unwrap();
    enable_forwarding(&node);
    let remote = Remote::new(&node).unwrap();
    node.ns
        .exec(&format!(
            "nft add table ip node_nat && \
             nft \"add chain ip node_nat post {{ type nat hook postrouting priority 100; }}\" && \
             nft add rule ip node_nat post ip saddr 10.76.0.0/24 oifname {} masquerade",
            remote.uplink
        ))
        .unwrap();
    let a = node.add_pod("1.1.0").unwrap();
    let remote_ip: IpAddr = UPLINK_REMOTE.parse().unwrap();
    assert!(a.ns.ping(remote_ip), "pod -> remote (ICMP)");
    let listener = remote
        .ns
        .run(|| TcpListener::bind(SocketAddr::new(remote_ip, 8080)))
        .unwrap()
        .unwrap();
    std::thread::scope(|s| {
        let server = s.spawn(|| serve_echo(listener, 1, Duration::from_secs(10)));
        let mut conn = connect(&a.ns, SocketAddr::new(remote_ip, 8080)).unwrap();
        exchange(&mut conn, 1 << 20, 0x66).unwrap();
        drop(conn);
        let peers = server.join().unwrap().unwrap();
        assert_eq!(
            peers[0].ip().to_string(),
            UPLINK_NODE,
            "the remote sees the node's address"
        );
    });
}

/// iperf3 from `client` to a one-shot server in `server` at `ip` for
/// `secs` seconds; returns the rate the receiver measured, in bits/s.
pub(crate) fn iperf3(server: &Netns, ip: IpAddr, client: &Netns, secs: u32) -> Result<f64> {
    let mut srv = std::process::Command::new("ip")
        .args(["netns", "exec", &server.name, "iperf3", "-s", "-1", "-B"])
        .arg(ip.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let mut out = String::new();
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(100));
        match client.exec(&format!("iperf3 -c {ip} -t {secs} -J")) {
            Ok(o) => {
                out = o;
                break;
            }
            Err(e) if e.to_string().contains("Connection refused") => continue,
            Err(e) => {
                let _ = srv.kill();
                let _ = srv.wait();
                return Err(e);
            }
        }
    }
    let _ = srv.kill();
    let _ = srv.wait();
    let v: serde_json::Value = serde_json::from_str(&out).context("iperf3 -J output")?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("no received rate in {out}"))
}

pub(crate) fn within(measured: f64, wanted: u64, tolerance: f64) -> bool {
    (measured - wanted as f64).abs() <= wanted as f64 * tolerance
}

/// The bandwidth capability, as libcni passes it to ferrite (containerd's
/// CRI sends bursts of u32::MAX bits, meaning "unset"): the pod receives at
/// most ingressRate and sends at most egressRate, whether the traffic takes
/// the host stack (the node) or the fast path (a pod on the same node).
#[test]
fn bandwidth_limits_both_directions() {
    if !privileged("bandwidth_limits_both_directions") {
        return;
    }
    bandwidth_both_directions("10.77.0.0/24", NODE_IP.parse().unwrap());
}

/// The body of the bandwidth tests, for pods of `subnet`'s family, with
/// `node_ip` (same family) as the node's own address on its loopback.
pub(crate) fn bandwidth_both_directions(subnet: &str, node_ip: IpAddr) {
    const INGRESS: u64 = 40_000_000;
    const EGRESS: u64 = 20_000_000;
    let family = if node_ip.is_ipv4() { "IPv4" } else { "IPv6" };
    let node = Node::new(subnet).unwrap();
    let host_len = if node_ip.is_ipv4() { 32 } else { 128 };
    node.ns
        .exec(&format!("ip addr add {node_ip}/{host_len} dev lo"))
        .unwrap();
    let peer = node.add_pod("1.0.0").unwrap();
    let mut shaped = Chain::new(
        &node,
        json!({"capabilities": {"bandwidth": true}}),
        vec![],
        json!({"bandwidth": {
            "ingressRate": INGRESS, "ingressBurst": u32::MAX,
            "egressRate": EGRESS, "egressBurst": u32::MAX,
        }}),
    )
    .unwrap();
    shaped.add().unwrap();
    shaped.check().unwrap();
    let host_qdisc = node
        .ns
        .exec(&format!("tc qdisc show dev {}", shaped.host_veth()))
        .unwrap();
    assert!(host_qdisc.contains("tbf"), "{host_qdisc}");
    let pod_qdisc = shaped.ns.exec("tc qdisc show dev eth0").unwrap();
    assert!(pod_qdisc.contains("tbf"), "{pod_qdisc}");

    let before = node.stats().unwrap();
    let to_pod_same_node = iperf3(&shaped.ns, shaped.ip(), &peer.ns, 3).unwrap();
    let mid = node.stats().unwrap();
    let from_pod_same_node = iperf3(&peer.ns, peer.ip(), &shaped.ns, 3).unwrap();
    let mid2 = node.stats().unwrap();
    let to_pod_from_node = iperf3(&shaped.ns, shaped.ip(), &node.ns, 3).unwrap();
    let from_pod_to_node = iperf3(&node.ns, node_ip, &shaped.ns, 3).unwrap();
    let unshaped = iperf3(&peer.ns, peer.ip(), &node.ns, 2).unwrap();
    let mbit = |v: f64| v / 1e6;
    eprintln!(
        "{family} bandwidth (Mbit/s): ingress limit {} -> same-node {:.1}, from node {:.1}; \
         egress limit {} -> same-node {:.1}, to node {:.1}; unshaped pod from node {:.0}",
        INGRESS / 1_000_000,
        mbit(to_pod_same_node),
        mbit(to_pod_from_node),
        EGRESS / 1_000_000,
        mbit(from_pod_same_node),
        mbit(from_pod_to_node),
        mbit(unshaped),
    );
    // The same-node stream took the fast path (through the shaped veth's
    // qdisc), and the shaped pod's answers were not mistaken for stack flows.
    let (p0, s0) = (
        endpoint_counters(&before, peer.ip()),
        endpoint_counters(&before, shaped.ip()),
    );
    let (p1, s1) = (
        endpoint_counters(&mid, peer.ip()),
        endpoint_counters(&mid, shaped.ip()),
    );
    let (pd, sd) = (delta(p1, p0), delta(s1, s0));
    eprintln!("{family} same-node to shaped pod: peer sent {} packets, {} redirected; shaped pod got {} redirected in, {} via the stack; sent {}, {} redirected", pd[0], pd[2], sd[4], sd[5], sd[0], sd[2]);
    // (A few packets are IPv6 neighbour discovery, which always takes the stack.)
    assert!(
        pd[2] * 100 >= pd[0] * 95,
        "{family}: peer -> shaped pod takes the fast path: {pd:?}"
    );
    assert!(
        sd[2] * 100 >= sd[0] * 95,
        "{family}: and so do the answers: {sd:?}"
    );
    // Neighbour discovery (a handful of packets) always takes the stack.
    assert!(
        sd[5] <= 10 + sd[4] / 20,
        "{family}: the shaped pod's stream did not go through the stack: {sd:?}"
    );
    // The other way (the shaped pod sends, through its eth0's TBF), both
    // directions of the stream take the fast path too.
    let (p2, s2) = (
        endpoint_counters(&mid2, peer.ip()),
        endpoint_counters(&mid2, shaped.ip()),
    );
    let (pd, sd) = (delta(p2, p1), delta(s2, s1));
    eprintln!("{family} shaped pod to same-node peer: shaped pod sent {} packets, {} redirected; peer got {} redirected in, {} via the stack; sent {}, {} redirected", sd[0], sd[2], pd[4], pd[5], pd[0], pd[2]);
    assert!(
        sd[2] * 100 >= sd[0] * 95,
        "{family}: shaped pod -> peer takes the fast path: {sd:?}"
    );
    assert!(
        pd[2] * 100 >= pd[0] * 95,
        "{family}: and so do the answers: {pd:?}"
    );

    for (what, got, want) in [
        ("to the pod, same node", to_pod_same_node, INGRESS),
        ("to the pod, from the node", to_pod_from_node, INGRESS),
        ("from the pod, same node", from_pod_same_node, EGRESS),
        ("from the pod, to the node", from_pod_to_node, EGRESS),
    ] {
        assert!(
            within(got, want, 0.15),
            "{family}, {what}: {:.1} Mbit/s, limit {} Mbit/s",
            mbit(got),
            want / 1_000_000
        );
    }
    shaped.del().unwrap();
}

/// `chainedBandwidth`: the reference bandwidth plugin, chained after ferrite
/// with the capability (both declare it, as the README says), shapes both
/// directions with its own qdiscs (a root TBF, and an `ingress` qdisc that
/// sends what the pod emits through an ifb). ferrite attaches with TCX so
/// that qdisc can coexist, installs none of its own, and keeps the fast
/// path from skipping them: a pod whose sending is limited has its packets
/// passed on to the plugin's filter, never redirected.
#[test]
fn chained_bandwidth_plugin_shapes_beside_the_fast_path() {
    if !privileged("chained_bandwidth_plugin_shapes_beside_the_fast_path") {
        return;
    }
    const INGRESS: u64 = 40_000_000;
    const EGRESS: u64 = 20_000_000;
    let node = Node::new("10.78.0.0/24").unwrap();
    // What the shaped pod sends leaves the plugin's ifb into the stack.
    enable_forwarding(&node);
    node.ns
        .exec(&format!("ip addr add {NODE_IP}/32 dev lo"))
        .unwrap();
    let peer = node.add_pod("1.0.0").unwrap();
    let mut shaped = Chain::new(
        &node,
        json!({"chainedBandwidth": true, "capabilities": {"bandwidth": true}}),
        vec![json!({"type": "bandwidth", "capabilities": {"bandwidth": true}})],
        // Bursts in bits: the reference plugin takes containerd's "unset"
        // (u32::MAX) literally, a 512 MB bucket that would not shape a
        // short test at all.
        json!({"bandwidth": {
            "ingressRate": INGRESS, "ingressBurst": 1_000_000u64,
            "egressRate": EGRESS, "egressBurst": 1_000_000u64,
        }}),
    )
    .unwrap();
    let result = shaped.add().unwrap().clone();
    // CHECK of both: ferrite finds its programs attached (by TCX), the
    // plugin finds its qdiscs.
    shaped.check().unwrap();
    let ifb = result["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["name"].as_str())
        .find(|n| n.starts_with("bwp"))
        .unwrap_or_else(|| panic!("the plugin's ifb in {result}"))
        .to_string();
    let host_qdisc = node
        .ns
        .exec(&format!("tc qdisc show dev {}", shaped.host_veth()))
        .unwrap();
    assert!(host_qdisc.contains("qdisc tbf 1: root"), "{host_qdisc}");
    assert!(host_qdisc.contains("qdisc ingress ffff:"), "{host_qdisc}");
    assert!(!host_qdisc.contains("clsact"), "{host_qdisc}");
    let pod_qdisc = shaped.ns.exec("tc qdisc show dev eth0").unwrap();
    assert!(
        !pod_qdisc.contains("tbf"),
        "ferrite shaped too: {pod_qdisc}"
    );

    let node_ip: IpAddr = NODE_IP.parse().unwrap();
    let before = node.stats().unwrap();
    let to_pod_same_node = iperf3(&shaped.ns, shaped.ip(), &peer.ns, 3).unwrap();
    let mid = node.stats().unwrap();
    let from_pod_same_node = iperf3(&peer.ns, peer.ip(), &shaped.ns, 3).unwrap();
    let after = node.stats().unwrap();
    let to_pod_from_node = iperf3(&shaped.ns, shaped.ip(), &node.ns, 3).unwrap();
    let from_pod_to_node = iperf3(&node.ns, node_ip, &shaped.ns, 3).unwrap();
    let mbit = |v: f64| v / 1e6;
    eprintln!(
        "chained bandwidth (Mbit/s): ingress limit {} -> same-node {:.1}, from node {:.1}; \
         egress limit {} -> same-node {:.1}, to node {:.1}",
        INGRESS / 1_000_000,
        mbit(to_pod_same_node),
        mbit(to_pod_from_node),
        EGRESS / 1_000_000,
        mbit(from_pod_same_node),
        mbit(from_pod_to_node),
    );
    // The shaped pod's packets are never redirected, so the plugin's ifb
    // sees every one; its answers reach the peer through the stack, which
    // makes the whole flow a stack flow (the peer's packets follow, past
    // the first SYN), as for any flow the stack delivered.
    let pd = delta(
        endpoint_counters(&mid, peer.ip()),
        endpoint_counters(&before, peer.ip()),
    );
    let sd = delta(
        endpoint_counters(&after, shaped.ip()),
        endpoint_counters(&mid, shaped.ip()),
    );
    eprintln!("peer to shaped pod: {pd:?}; shaped pod to peer: {sd:?}");
    assert!(sd[1] > 1_000_000, "the shaped pod sent its stream: {sd:?}");
    assert_eq!(sd[2], 0, "the shaped pod's packets skipped the ifb: {sd:?}");
    assert!(
        pd[1] > 1_000_000 && pd[2] <= 3,
        "peer -> shaped pod: {pd:?}"
    );
    for (what, got, want) in [
        ("to the pod, same node", to_pod_same_node, INGRESS),
        ("to the pod, from the node", to_pod_from_node, INGRESS),
        ("from the pod, same node", from_pod_same_node, EGRESS),
        ("from the pod, to the node", from_pod_to_node, EGRESS),
    ] {
        assert!(
            within(got, want, 0.15),
            "{what}: {:.1} Mbit/s, limit {} Mbit/s",
            mbit(got),
            want / 1_000_000
        );
    }
    let shaped_ip = shaped.ip().to_string();
    shaped.del().unwrap();
    let links = node.ns.exec("ip -o link show").unwrap();
    assert!(
        !links.contains(&ifb),
        "the plugin's DEL left {ifb}:\n{links}"
    );
    let left = node.allocations();
    assert!(
        !left.iter().any(|a| a.contains(&shaped_ip)),
        "{shaped_ip} still allocated: {left:?}"
    );
}
