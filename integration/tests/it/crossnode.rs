//! Two nodes joined by a link, each with its own ferrite: the cross-node
//! fast path (`from_pod` through the FIB to the uplink, `from_uplink`
//! straight into the pod), switched on and off as the node agent does with
//! `ferrite datapath uplink`, and a Service on one node whose backend runs
//! on the other.

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::time::Duration;

use crate::harness::{endpoint_counters, privileged, tcp_echo, unique, Node};
use crate::node::{
    connect, delta, enable_forwarding, exchange, kube_proxy_rules, serve_echo, udp_round_trips, VIP,
};

const CLUSTER_CIDR: &str = "10.91.0.0/16";
const CLUSTER_CIDR6: &str = "fd00:91::/48";

/// Node 1 (pods 10.91.1.0/24, uplink 172.31.0.1) and node 2 (10.91.2.0/24,
/// 172.31.0.2) on one link, each routing the other's pod CIDR via it (the
/// routes the agent programs), both forwarding. Dual stack adds
/// fd00:91:0:1::/64 and fd00:91:0:2::/64 behind fd00:31::1 and fd00:31::2.
pub(crate) struct Cluster {
    pub(crate) n1: Node,
    pub(crate) n2: Node,
    pub(crate) up1: String,
    pub(crate) up2: String,
}

impl Cluster {
    pub(crate) fn new() -> Self {
        Self::with(false)
    }

    pub(crate) fn dual_stack() -> Self {
        Self::with(true)
    }

    fn with(dual: bool) -> Self {
        let mut n1 = Node::new("10.91.1.0/24").unwrap();
        let mut n2 = Node::new("10.91.2.0/24").unwrap();
        if dual {
            for (n, v4, v6) in [
                (&mut n1, "10.91.1.0/24", "fd00:91:0:1::/64"),
                (&mut n2, "10.91.2.0/24", "fd00:91:0:2::/64"),
            ] {
                n.extra = serde_json::json!({
                    "ipam": { "ranges": [[{ "subnet": v4 }], [{ "subnet": v6 }]] }
                });
            }
        }
        let (up1, up2) = (unique("u"), unique("u"));
        n1.ns
            .exec(&format!(
                "ip link add {up1} type veth peer name {up2} netns {} && \
                 ip addr add 172.31.0.1/24 dev {up1} && ip link set {up1} up && \
                 ip route add 10.91.2.0/24 via 172.31.0.2",
                n2.ns.name
            ))
            .unwrap();
        n2.ns
            .exec(&format!(
                "ip addr add 172.31.0.2/24 dev {up2} && ip link set {up2} up && \
                 ip route add 10.91.1.0/24 via 172.31.0.1"
            ))
            .unwrap();
        enable_forwarding(&n1);
        enable_forwarding(&n2);
        if dual {
            for (n, up, me, other, far) in [
                (&n1, &up1, "fd00:31::1", "fd00:31::2", "fd00:91:0:2::/64"),
                (&n2, &up2, "fd00:31::2", "fd00:31::1", "fd00:91:0:1::/64"),
            ] {
                n.ns.exec(&format!(
                    "echo 1 > /proc/sys/net/ipv6/conf/all/forwarding && \
                     ip addr add {me}/64 dev {up} nodad && ip route add {far} via {other}"
                ))
                .unwrap();
            }
        }
        Self { n1, n2, up1, up2 }
    }

    pub(crate) fn fast_path(&self, on: bool) {
        for (node, up) in [(&self.n1, &self.up1), (&self.n2, &self.up2)] {
            let root = node.bpffs.path().join("ferrite");
            let root = root.to_str().unwrap();
            let out = if on {
                node.ferrite(&[
                    "datapath",
                    "uplink",
                    up,
                    "--cluster-cidr",
                    CLUSTER_CIDR,
                    "--cluster-cidr",
                    CLUSTER_CIDR6,
                    "--bpffs-root",
                    root,
                ])
            } else {
                node.ferrite(&["datapath", "uplink-off", up, "--bpffs-root", root])
            };
            out.unwrap();
        }
    }
}

/// Pod to pod across the link: with the fast path, every packet of a TCP
/// stream leaves through `from_pod`'s redirect and enters through
/// `from_uplink`'s, both ways, and the server sees the client's own address;
/// with it off, the same stream takes kernel routing, and still works.
#[test]
fn pods_on_two_nodes_talk_through_the_fast_path() {
    if !privileged("pods_on_two_nodes_talk_through_the_fast_path") {
        return;
    }
    let c = Cluster::new();
    let a = c.n1.add_pod("1.1.0").unwrap();
    let b = c.n2.add_pod("1.1.0").unwrap();
    c.fast_path(true);
    // The first packets may wait for the kernel to resolve the next hop.
    assert!(a.ns.ping(b.ip()) && b.ns.ping(a.ip()));

    let (s1, s2) = (c.n1.stats().unwrap(), c.n2.stats().unwrap());
    let listener =
        b.ns.run(|| TcpListener::bind(SocketAddr::new(b.ip(), 8080)))
            .unwrap()
            .unwrap();
    std::thread::scope(|s| {
        let server = s.spawn(|| serve_echo(listener, 1, Duration::from_secs(30)));
        let mut conn = connect(&a.ns, SocketAddr::new(b.ip(), 8080)).unwrap();
        exchange(&mut conn, 8 << 20, 0x5a).unwrap();
        drop(conn);
        let peers = server.join().unwrap().unwrap();
        assert_eq!(peers[0].ip(), a.ip(), "the pod's address is preserved");
    });
    let ad = delta(
        endpoint_counters(&c.n1.stats().unwrap(), a.ip()),
        endpoint_counters(&s1, a.ip()),
    );
    let bd = delta(
        endpoint_counters(&c.n2.stats().unwrap(), b.ip()),
        endpoint_counters(&s2, b.ip()),
    );
    // Columns: from_pod, from_bytes, redirected, redir_bytes, redir_in, via_stack.
    eprintln!("fast path: a {ad:?}, b {bd:?}");
    assert!(ad[0] > 100, "a sent its stream: {ad:?}");
    assert!(
        ad[2] * 100 >= ad[0] * 99,
        "a's packets left by redirect: {ad:?}"
    );
    assert!(
        bd[2] * 100 >= bd[0] * 99,
        "b's answers left by redirect: {bd:?}"
    );
    assert!(
        bd[4] >= ad[2] / 2,
        "b's packets entered by redirect: {bd:?}"
    );
    assert_eq!(bd[5], 0, "nothing reached b through the stack: {bd:?}");
    assert!(
        ad[4] > 0 && ad[5] == 0,
        "a's answers entered by redirect: {ad:?}"
    );

    // Off: kernel routing carries the same traffic, no redirect.
    c.fast_path(false);
    let s1 = c.n1.stats().unwrap();
    assert_eq!(tcp_echo(&b.ns, b.ip(), &a.ns, 4 << 20).unwrap(), 4 << 20);
    let ad = delta(
        endpoint_counters(&c.n1.stats().unwrap(), a.ip()),
        endpoint_counters(&s1, a.ip()),
    );
    eprintln!("kernel routing: a {ad:?}");
    assert!(ad[0] > 100 && ad[2] == 0 && ad[4] == 0, "{ad:?}");
    assert!(ad[5] > 100, "answers came through the stack: {ad:?}");
}

/// A ClusterIP on node 1 whose backend runs on node 2 (kube-proxy's DNAT on
/// the client's node): the request leaves node 1 through the stack, so
/// `to_uplink` records the flow and the backend's answers, which reach node
/// 1 by the fast path, are handed to the stack there to be un-NATed. TCP
/// and UDP both ways; direct traffic between the same pods stays fast.
#[test]
fn service_with_a_backend_on_another_node() {
    if !privileged("service_with_a_backend_on_another_node") {
        return;
    }
    let c = Cluster::new();
    let a = c.n1.add_pod("1.1.0").unwrap();
    let b = c.n2.add_pod("1.1.0").unwrap();
    c.fast_path(true);
    kube_proxy_rules(&c.n1, b.ip());
    let vip: IpAddr = VIP.parse().unwrap();
    assert!(a.ns.ping(b.ip()));

    let s1 = c.n1.stats().unwrap();
    let listener =
        b.ns.run(|| TcpListener::bind(SocketAddr::new(b.ip(), 8080)))
            .unwrap()
            .unwrap();
    std::thread::scope(|s| {
        let server = s.spawn(|| serve_echo(listener, 1, Duration::from_secs(30)));
        let mut conn = connect(&a.ns, SocketAddr::new(vip, 80)).unwrap();
        assert_eq!(conn.peer_addr().unwrap(), SocketAddr::new(vip, 80));
        exchange(&mut conn, 2 << 20, 0x33).unwrap();
        drop(conn);
        let peers = server.join().unwrap().unwrap();
        assert_eq!(peers[0].ip(), a.ip(), "no masquerade between pods");
    });
    udp_round_trips(
        &b.ns,
        SocketAddr::new(b.ip(), 5353),
        &a.ns,
        SocketAddr::new(vip, 53),
        50,
    )
    .unwrap();
    let ad = delta(
        endpoint_counters(&c.n1.stats().unwrap(), a.ip()),
        endpoint_counters(&s1, a.ip()),
    );
    eprintln!("service across nodes: client {ad:?}");
    assert_eq!(ad[4], 0, "no answer entered the client by redirect: {ad:?}");
    assert!(ad[5] > 50, "answers came through the stack: {ad:?}");

    // 16 MB: enough packets that a stray one (a retransmission, the
    // pod's own IPv6 housekeeping) cannot move the share past 1 % (4 MB
    // once gave 158 of 160).
    let s1 = c.n1.stats().unwrap();
    assert_eq!(tcp_echo(&b.ns, b.ip(), &a.ns, 16 << 20).unwrap(), 16 << 20);
    let ad = delta(
        endpoint_counters(&c.n1.stats().unwrap(), a.ip()),
        endpoint_counters(&s1, a.ip()),
    );
    eprintln!("direct: client {ad:?}");
    assert!(
        ad[2] * 100 >= ad[0] * 99,
        "direct traffic stays fast: {ad:?}"
    );
}

/// The same fast path for IPv6, between dual-stack pods: a TCP stream over
/// their IPv6 addresses leaves and enters by redirect both ways.
#[test]
fn dual_stack_pods_on_two_nodes_talk_over_ipv6_through_the_fast_path() {
    if !privileged("dual_stack_pods_on_two_nodes_talk_over_ipv6_through_the_fast_path") {
        return;
    }
    let c = Cluster::dual_stack();
    let a = c.n1.add_pod("1.1.0").unwrap();
    let b = c.n2.add_pod("1.1.0").unwrap();
    let v6 = |r: &serde_json::Value| -> IpAddr {
        r["ips"][1]["address"]
            .as_str()
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (a6, b6) = (v6(&a.result), v6(&b.result));
    assert!(a6.is_ipv6() && b6.is_ipv6());
    c.fast_path(true);
    assert!(a.ns.exec_status(&format!("busybox ping -6 -c 2 -W 2 {b6}")));

    let (s1, s2) = (c.n1.stats().unwrap(), c.n2.stats().unwrap());
    let listener =
        b.ns.run(|| TcpListener::bind(SocketAddr::new(b6, 8080)))
            .unwrap()
            .unwrap();
    std::thread::scope(|s| {
        let server = s.spawn(|| serve_echo(listener, 1, Duration::from_secs(30)));
        let mut conn = connect(&a.ns, SocketAddr::new(b6, 8080)).unwrap();
        exchange(&mut conn, 8 << 20, 0x6a).unwrap();
        drop(conn);
        let peers = server.join().unwrap().unwrap();
        assert_eq!(peers[0].ip(), a6, "the pod's address is preserved");
    });
    let ad = delta(
        endpoint_counters(&c.n1.stats().unwrap(), a6),
        endpoint_counters(&s1, a6),
    );
    let bd = delta(
        endpoint_counters(&c.n2.stats().unwrap(), b6),
        endpoint_counters(&s2, b6),
    );
    eprintln!("IPv6 fast path: a {ad:?}, b {bd:?}");
    assert!(ad[0] > 100, "a sent its stream: {ad:?}");
    assert!(
        ad[2] * 100 >= ad[0] * 99,
        "a's packets left by redirect: {ad:?}"
    );
    assert!(
        bd[2] * 100 >= bd[0] * 99,
        "b's answers left by redirect: {bd:?}"
    );
    assert!(
        bd[4] >= ad[2] / 2 && ad[4] > 0,
        "both entered by redirect: {ad:?} {bd:?}"
    );
}
