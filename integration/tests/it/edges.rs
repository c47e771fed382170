//! Where the fast path must deliver what the kernel would (issue 15), on
//! namespaced nodes with real traffic: a node reaching another node's pods
//! past kube-proxy's INVALID drop, fragmented datagrams with conntrack's
//! defragmentation active, ICMP errors about Service flows, a smaller
//! uplink MTU, TTL, and whom the uplink trusts.

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::crossnode::Cluster;
use crate::harness::{endpoint_counters, privileged, tcp_echo, Netns, Node, Pod};
use crate::node::{connect, delta, enable_forwarding, exchange, kube_proxy_rules, serve_echo, VIP};

const NODE1: &str = "172.31.0.1";
const NODE2: &str = "172.31.0.2";

/// What kube-proxy leaves on every node that matters here: conntrack and
/// its defragmentation active in both families (a nat rule), and the
/// FORWARD rule that drops what conntrack finds INVALID.
fn kube_proxy_basics(node: &Node) {
    for tool in ["iptables", "ip6tables"] {
        node.ns
            .exec(&format!(
                "{tool} -w -t nat -A POSTROUTING -m mark --mark 0x7e57 -j RETURN && \
                 {tool} -w -A FORWARD -m conntrack --ctstate INVALID -j DROP"
            ))
            .unwrap();
    }
}

/// The pod's IPv6 address (the second of a dual-stack result).
fn ipv6_of(pod: &Pod) -> IpAddr {
    pod.result["ips"][1]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// An echo of `bytes` over TCP from `client` to `server_ip:8080`, the
/// server's view of the peer returned.
fn tcp_echo_from(
    server: &Netns,
    server_ip: IpAddr,
    client: &Netns,
    to: SocketAddr,
) -> Result<SocketAddr> {
    let listener = server.run(|| TcpListener::bind(SocketAddr::new(server_ip, 8080)))??;
    std::thread::scope(|s| {
        let srv = s.spawn(|| serve_echo(listener, 1, Duration::from_secs(15)));
        let mut conn = connect(client, to)?;
        exchange(&mut conn, 1 << 20, 0x42)?;
        drop(conn);
        let peers = srv
            .join()
            .map_err(|_| anyhow::anyhow!("server panicked"))??;
        Ok(peers[0])
    })
}

/// Issue 15 item 0: a node's own address reaches pods on the other node
/// over TCP and ping, directly and through a NodePort whose backend runs
/// on the other node, with kube-proxy's INVALID drop in place (conntrack
/// must see the SYN that the pod answers).
#[test]
fn nodes_reach_pods_on_other_nodes() {
    if !privileged("nodes_reach_pods_on_other_nodes") {
        return;
    }
    let c = Cluster::new();
    let a = c.n1.add_pod("1.1.0").unwrap();
    let b = c.n2.add_pod("1.1.0").unwrap();
    c.fast_path(true);
    kube_proxy_basics(&c.n1);
    kube_proxy_basics(&c.n2);
    assert!(a.ns.ping(b.ip()), "pod to pod");

    for (node, node_ip, pod) in [(&c.n1, NODE1, &b), (&c.n2, NODE2, &a)] {
        assert!(node.ns.ping(pod.ip()), "{node_ip} pings {}", pod.ip());
        let peer = tcp_echo_from(&pod.ns, pod.ip(), &node.ns, SocketAddr::new(pod.ip(), 8080))
            .unwrap_or_else(|e| panic!("{node_ip} to {} over TCP: {e:#}", pod.ip()));
        assert_eq!(peer.ip().to_string(), node_ip);
    }

    // A NodePort on node 1 with its only backend on node 2, as kube-proxy
    // writes it (DNAT, then masquerade to node 1's address), reached from
    // node 1 itself and from a pod on node 1.
    c.n1.ns
        .exec(&format!(
            "iptables -w -t nat -A PREROUTING -d {NODE1} -p tcp --dport 30080 -j DNAT --to-destination {b}:8080 && \
             iptables -w -t nat -A OUTPUT -d {NODE1} -p tcp --dport 30080 -j DNAT --to-destination {b}:8080 && \
             iptables -w -t nat -A POSTROUTING -d {b} -p tcp --dport 8080 -j MASQUERADE",
            b = b.ip()
        ))
        .unwrap();
    let node_port = SocketAddr::new(NODE1.parse().unwrap(), 30080);
    for client in [&c.n1.ns, &a.ns] {
        let peer = tcp_echo_from(&b.ns, b.ip(), client, node_port)
            .unwrap_or_else(|e| panic!("NodePort from {}: {e:#}", client.name));
        assert_eq!(peer.ip().to_string(), NODE1, "masqueraded to node 1");
    }
}

/// Sends `count` datagrams of `size` bytes from `client` to `to` (a server
/// bound there in `server`); returns how many arrived whole.
fn datagrams(
    server: &Netns,
    client: &Netns,
    to: SocketAddr,
    size: usize,
    count: usize,
) -> Result<usize> {
    let srv = server.run(|| UdpSocket::bind(to))??;
    srv.set_read_timeout(Some(Duration::from_millis(1500)))?;
    let any: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse()?;
    let cli = client.run(|| UdpSocket::bind(any))??;
    let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let mut whole = 0;
    let mut buf = vec![0u8; size + 1];
    for _ in 0..count {
        cli.send_to(&payload, to)?;
        match srv.recv_from(&mut buf) {
            Ok((n, _)) if buf[..n] == payload[..] => whole += 1,
            Ok((n, _)) => bail!("a datagram of {n} bytes arrived, not the {size} sent"),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(whole)
}

/// Issue 15 item 1: 4,000-byte UDP datagrams at MTU 1500 (three fragments
/// each), with conntrack's defragmentation active on both nodes: across
/// nodes and on one node, both directions, IPv4 and IPv6, every datagram
/// arrives whole.
#[test]
fn fragmented_datagrams_arrive_whole() {
    if !privileged("fragmented_datagrams_arrive_whole") {
        return;
    }
    let c = Cluster::dual_stack();
    let a = c.n1.add_pod("1.1.0").unwrap();
    let a2 = c.n1.add_pod("1.1.0").unwrap();
    let b = c.n2.add_pod("1.1.0").unwrap();
    c.fast_path(true);
    kube_proxy_basics(&c.n1);
    kube_proxy_basics(&c.n2);
    assert!(a.ns.ping(b.ip()) && b.ns.ping(a.ip()));
    assert!(a
        .ns
        .exec_status(&format!("busybox ping -6 -c 2 -W 2 {}", ipv6_of(&b))));

    let mut port = 7000;
    for (from, to) in [(&a, &b), (&b, &a), (&a, &a2), (&a2, &a)] {
        for dst in [to.ip(), ipv6_of(to)] {
            port += 1;
            let got = datagrams(&to.ns, &from.ns, SocketAddr::new(dst, port), 4000, 20).unwrap();
            assert_eq!(got, 20, "{} -> {dst}: 4000-byte datagrams", from.ip());
        }
    }
}

/// A connected UDP socket in `client` sends to `to`, where nothing listens
/// behind the Service: the backend's port unreachable, un-NATed by the
/// stack, must reach the socket as "connection refused".
fn refused(client: &Netns, to: SocketAddr) -> Result<()> {
    let sock = client.run(|| UdpSocket::bind("0.0.0.0:0"))??;
    sock.connect(to)?;
    sock.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = [0u8; 64];
    for attempt in 0..3 {
        sock.send(b"anyone?")?;
        match sock.recv(&mut buf) {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => return Ok(()),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                eprintln!("attempt {attempt}: no answer from {to}");
            }
            other => bail!("expected connection refused from {to}, got {other:?}"),
        }
    }
    bail!("no connection refused from {to} after 3 datagrams")
}

/// Issue 15 item 2: a UDP client of a ClusterIP whose backend has no
/// listener gets "connection refused" on its connected socket, with the
/// backend on the same node and on another node.
#[test]
fn icmp_errors_of_service_flows_reach_the_client() {
    if !privileged("icmp_errors_of_service_flows_reach_the_client") {
        return;
    }
    let vip = SocketAddr::new(VIP.parse().unwrap(), 53);
    {
        let n = Node::new("10.92.1.0/24").unwrap();
        enable_forwarding(&n);
        let a = n.add_pod("1.1.0").unwrap();
        let b = n.add_pod("1.1.0").unwrap();
        kube_proxy_rules(&n, b.ip());
        assert!(a.ns.ping(b.ip()));
        refused(&a.ns, vip).expect("same node");
    }
    let c = Cluster::new();
    let a = c.n1.add_pod("1.1.0").unwrap();
    let b = c.n2.add_pod("1.1.0").unwrap();
    c.fast_path(true);
    kube_proxy_rules(&c.n1, b.ip());
    assert!(a.ns.ping(b.ip()));
    refused(&a.ns, vip).expect("backend on another node");
}

/// The path MTU towards `dst` that `ns` has learned, if any.
fn learned_mtu(ns: &Netns, dst: IpAddr) -> Option<u32> {
    let out = ns.exec(&format!("ip route get {dst}")).ok()?;
    let words: Vec<&str> = out.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[0] == "mtu")
        .and_then(|w| w[1].parse().ok())
}

const IP_MTU_DISCOVER: libc::c_int = 10;
const IP_PMTUDISC_DONT: libc::c_int = 0;
const IP_PMTUDISC_DO: libc::c_int = 2;

fn set_pmtu_discovery(sock: &UdpSocket, mode: libc::c_int) {
    // SAFETY: a valid socket and a c_int option value.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            IP_MTU_DISCOVER,
            (&mode as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt IP_MTU_DISCOVER");
}

/// Issue 15 item 3: the uplink's MTU (1400) is below the pods' (1500).
/// What does not fit is handed to the stack, which answers as a router:
/// TCP learns the path MTU and moves its data (directly and through a
/// Service, where the backend learns it), an IPv4 datagram without DF is
/// fragmented, one with DF is refused (EMSGSIZE once the error arrived),
/// and IPv6 learns "packet too big".
#[test]
fn a_smaller_uplink_mtu_is_learned_not_a_black_hole() {
    if !privileged("a_smaller_uplink_mtu_is_learned_not_a_black_hole") {
        return;
    }
    let c = Cluster::dual_stack();
    c.n1.ns
        .exec(&format!("ip link set {} mtu 1400", c.up1))
        .unwrap();
    c.n2.ns
        .exec(&format!("ip link set {} mtu 1400", c.up2))
        .unwrap();
    let a = c.n1.add_pod("1.1.0").unwrap();
    let b = c.n2.add_pod("1.1.0").unwrap();
    let b2 = c.n2.add_pod("1.1.0").unwrap();
    c.fast_path(true);
    kube_proxy_rules(&c.n1, b.ip());
    assert!(a.ns.ping(b.ip()) && a.ns.ping(b2.ip()));

    // Through the Service first: the backend's answers are too big.
    let listener =
        b.ns.run(|| TcpListener::bind(SocketAddr::new(b.ip(), 8080)))
            .unwrap()
            .unwrap();
    std::thread::scope(|s| {
        let srv = s.spawn(|| serve_echo(listener, 1, Duration::from_secs(30)));
        let mut conn = connect(&a.ns, SocketAddr::new(VIP.parse().unwrap(), 80)).unwrap();
        exchange(&mut conn, 2 << 20, 0x17).unwrap();
        drop(conn);
        srv.join().unwrap().unwrap();
    });
    assert_eq!(
        learned_mtu(&b.ns, a.ip()),
        Some(1400),
        "the backend learned the path MTU"
    );
    // The client's error was un-NATed: it knows the Service's path.
    assert_eq!(
        learned_mtu(&a.ns, VIP.parse().unwrap()),
        Some(1400),
        "so did the client"
    );

    // IPv4 UDP to another pod: without DF the node fragments, with DF the
    // sender is told.
    let to = SocketAddr::new(b2.ip(), 9000);
    let srv = b2.ns.run(|| UdpSocket::bind(to)).unwrap().unwrap();
    srv.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let cli = a.ns.run(|| UdpSocket::bind("0.0.0.0:0")).unwrap().unwrap();
    set_pmtu_discovery(&cli, IP_PMTUDISC_DONT);
    let big = vec![0x33u8; 1472];
    cli.send_to(&big, to).unwrap();
    let mut buf = vec![0u8; 2000];
    let (n, _) = srv
        .recv_from(&mut buf)
        .expect("a 1500-byte datagram without DF");
    assert_eq!(n, 1472);
    let df = a.ns.run(|| UdpSocket::bind("0.0.0.0:0")).unwrap().unwrap();
    set_pmtu_discovery(&df, IP_PMTUDISC_DO);
    df.connect(SocketAddr::new(b2.ip(), 9001)).unwrap();
    let end = Instant::now() + Duration::from_secs(3);
    let refused = loop {
        match df.send(&big) {
            Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => break true,
            _ if Instant::now() > end => break false,
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    assert!(refused, "a DF datagram bigger than the path is refused");

    // TCP directly between the pods, IPv4 and IPv6.
    for (server, dst) in [(&b2, b2.ip()), (&b, ipv6_of(&b))] {
        let moved = tcp_echo(&server.ns, dst, &a.ns, 4 << 20).unwrap();
        assert_eq!(moved, 4 << 20, "TCP to {dst}");
        assert_eq!(learned_mtu(&a.ns, dst), Some(1400), "path MTU to {dst}");
    }
}

/// Issue 15 item 4: the fast path is a router: traceroute from a pod to a
/// pod on the other node shows node 1, node 2, then the pod.
#[test]
fn traceroute_shows_both_nodes() {
    if !privileged("traceroute_shows_both_nodes") {
        return;
    }
    let c = Cluster::new();
    let a = c.n1.add_pod("1.1.0").unwrap();
    let b = c.n2.add_pod("1.1.0").unwrap();
    c.fast_path(true);
    assert!(a.ns.ping(b.ip()));
    let out =
        a.ns.exec(&format!(
            "busybox traceroute -n -q 1 -w 2 -m 5 {} 2>&1",
            b.ip()
        ))
        .unwrap();
    let hops: Vec<String> = out
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.len() >= 2 && w[0].parse::<u32>().is_ok()).then(|| w[1].to_string())
        })
        .collect();
    assert_eq!(
        hops,
        [NODE1.to_string(), NODE2.to_string(), b.ip().to_string()],
        "{out}"
    );
}

/// Issue 15 item 5: only what the cluster's pods send skips the node's
/// firewall. A DROP rule in node 2's FORWARD chain for node 1's address
/// stops node 1 reaching node 2's pod, while node 1's pod still goes
/// straight in; a packet claiming node 2's own pod as its source is dropped
/// and counted.
#[test]
fn the_uplink_trusts_only_the_clusters_pods() {
    if !privileged("the_uplink_trusts_only_the_clusters_pods") {
        return;
    }
    let c = Cluster::new();
    let a = c.n1.add_pod("1.1.0").unwrap();
    let b = c.n2.add_pod("1.1.0").unwrap();
    let b2 = c.n2.add_pod("1.1.0").unwrap();
    c.fast_path(true);
    assert!(a.ns.ping(b.ip()));
    c.n2.ns
        .exec(&format!(
            "iptables -w -A FORWARD -s {NODE1} -d {} -j DROP",
            b.ip()
        ))
        .unwrap();

    assert!(
        !c.n1.ns.ping(b.ip()),
        "node 1's ping is dropped by node 2's firewall"
    );
    let listener =
        b.ns.run(|| TcpListener::bind(SocketAddr::new(b.ip(), 8080)))
            .unwrap()
            .unwrap();
    let blocked = connect(&c.n1.ns, SocketAddr::new(b.ip(), 8080));
    assert!(blocked.is_err(), "node 1's TCP is dropped too: {blocked:?}");
    drop(listener);

    let s2 = c.n2.stats().unwrap();
    assert_eq!(tcp_echo(&b.ns, b.ip(), &a.ns, 1 << 20).unwrap(), 1 << 20);
    let bd = delta(
        endpoint_counters(&c.n2.stats().unwrap(), b.ip()),
        endpoint_counters(&s2, b.ip()),
    );
    // Columns: from_pod, from_bytes, redirected, redir_bytes, redir_in, via_stack.
    assert!(
        bd[4] >= 10 && bd[5] * 10 <= bd[4],
        "the pod's traffic came in by redirect, not through the stack: {bd:?}"
    );

    // Node 1 sends from node 2's pod b2's address.
    c.n1.ns
        .exec(&format!("ip addr add {}/32 dev lo", b2.ip()))
        .unwrap();
    let spoof =
        c.n1.ns
            .run(|| UdpSocket::bind(SocketAddr::new(b2.ip(), 0)))
            .unwrap()
            .unwrap();
    let to = SocketAddr::new(b.ip(), 9999);
    let srv = b.ns.run(|| UdpSocket::bind(to)).unwrap().unwrap();
    srv.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    for _ in 0..3 {
        spoof.send_to(b"from b2, honestly", to).unwrap();
    }
    let mut buf = [0u8; 64];
    assert!(
        srv.recv_from(&mut buf).is_err(),
        "the spoofed datagrams never arrive"
    );
    let stats = c.n2.stats().unwrap();
    let row = stats
        .lines()
        .find(|l| l.split_whitespace().next() == Some(&b.ip().to_string()))
        .context("b's row")
        .unwrap();
    assert!(row.contains("UPLINK_SPOOF=3"), "counted at b: {row}");
}
