//! Pods reach each other through the eBPF path alone.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};

use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::RouteNetlinkMessage;
use serde_json::json;

use crate::harness::{endpoint_counters, privileged, tcp_echo, Netns, Node};

#[test]
fn pods_talk_with_forwarding_off() {
    if !privileged("pods_talk_with_forwarding_off") {
        return;
    }
    let node = Node::new("10.70.0.0/24").unwrap();
    // The node namespace stands in for the host; forwarding is off there,
    // so only the redirect can carry pod-to-pod packets.
    let fwd = node.ns.exec("cat /proc/sys/net/ipv4/ip_forward").unwrap();
    assert_eq!(fwd.trim(), "0");
    let a = node.add_pod("1.1.0").unwrap();
    let b = node.add_pod("1.1.0").unwrap();
    let c = node.add_pod("0.4.0").unwrap();
    assert!(a.ns.ping(b.ip()), "a -> b");
    assert!(b.ns.ping(a.ip()), "b -> a");
    assert!(c.ns.ping(a.ip()), "c -> a");
    let moved = tcp_echo(&a.ns, a.ip(), &b.ns, 8 << 20).unwrap();
    assert_eq!(moved, 8 << 20);

    let stats = node.stats().unwrap();
    let row = |ip: std::net::IpAddr| {
        stats
            .lines()
            .find(|l| l.starts_with(&ip.to_string()) && l[ip.to_string().len()..].starts_with(' '))
            .unwrap_or_else(|| panic!("no row for {ip} in\n{stats}"))
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    // Columns: ip ifindex from_pod from_bytes redirected redir_bytes redir_in via_stack drops
    let rb = row(b.ip());
    let redirected: u64 = rb[4].parse().unwrap();
    assert!(
        redirected > 100,
        "b's stream should have been redirected: {rb:?}\n{stats}"
    );
    let ra = row(a.ip());
    let redirected_in: u64 = ra[6].parse().unwrap();
    assert!(
        redirected_in > 100,
        "a should have received through the fast path: {ra:?}"
    );
}

#[test]
fn node_reaches_its_pods_and_back() {
    if !privileged("node_reaches_its_pods_and_back") {
        return;
    }
    let node = Node::new("10.71.0.0/24").unwrap();
    let a = node.add_pod("1.1.0").unwrap();
    // The node has an address of its own, as every node does.
    node.ns.exec("ip addr add 192.0.2.1/32 dev lo").unwrap();
    // The node (kubelet probes, hostNetwork pods) to the pod and back.
    assert!(node.ns.ping(a.ip()), "node -> pod");
    assert!(
        a.ns.ping("192.0.2.1".parse().unwrap()),
        "pod -> node address"
    );
    assert_eq!(tcp_echo(&a.ns, a.ip(), &node.ns, 1 << 20).unwrap(), 1 << 20);
}

/// A link's IPv4 GSO and GRO maximum sizes, as the kernel reports them
/// (read in the calling thread's namespace).
fn gso_gro_ipv4(name: &str) -> (u32, u32) {
    let mut nl = ferrite_netlink::route::open().unwrap();
    let mut msg = LinkMessage::default();
    msg.attributes.push(LinkAttribute::IfName(name.to_string()));
    let Some(RouteNetlinkMessage::NewLink(link)) = nl
        .get("link show", RouteNetlinkMessage::GetLink(msg), 0)
        .unwrap()
    else {
        panic!("no link {name}");
    };
    let (mut gso, mut gro) = (0, 0);
    for a in &link.attributes {
        match a {
            LinkAttribute::GsoIpv4MaxSize(v) => gso = *v,
            LinkAttribute::GroIpv4MaxSize(v) => gro = *v,
            _ => {}
        }
    }
    (gso, gro)
}

/// `bytes` from `client` to a server at `ip` in `server`, one way; returns
/// what the server read.
fn tcp_send(server: &Netns, ip: IpAddr, client: &Netns, bytes: usize) -> usize {
    let listener = server
        .run(|| TcpListener::bind(SocketAddr::new(ip, 0)))
        .unwrap()
        .unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::scope(|s| {
        let reader = s.spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = vec![0u8; 256 << 10];
            let mut got = 0;
            loop {
                match conn.read(&mut buf).unwrap() {
                    0 => return got,
                    n => got += n,
                }
            }
        });
        let mut conn = client.run(|| TcpStream::connect(addr)).unwrap().unwrap();
        let chunk = vec![0x42u8; 1 << 20];
        for _ in 0..bytes / chunk.len() {
            conn.write_all(&chunk).unwrap();
        }
        drop(conn);
        reader.join().unwrap()
    })
}

/// `bigTcp`: both ends of each pod's veth pair take IPv4 packets of up to
/// 192 KiB (the kernel's IFLA_GSO/GRO_IPV4_MAX_SIZE, set in the create
/// message), and a stream between two such pods crosses the fast path
/// whole. Without it, the kernel's 64 KiB.
#[test]
fn big_tcp_pods_take_large_packets_through_the_fast_path() {
    if !privileged("big_tcp_pods_take_large_packets_through_the_fast_path") {
        return;
    }
    const BIG: u32 = 196_608;
    let mut node = Node::new("10.90.0.0/24").unwrap();
    let plain = node.add_pod("1.0.0").unwrap();
    let plain_host = plain.host_veth();
    assert_eq!(
        plain.ns.run(|| gso_gro_ipv4("eth0")).unwrap(),
        (65_536, 65_536)
    );
    assert_eq!(
        node.ns.run(|| gso_gro_ipv4(&plain_host)).unwrap(),
        (65_536, 65_536)
    );
    drop(plain);

    node.extra = json!({"bigTcp": true});
    let a = node.add_pod("1.0.0").unwrap();
    let b = node.add_pod("1.0.0").unwrap();
    for pod in [&a, &b] {
        assert_eq!(pod.ns.run(|| gso_gro_ipv4("eth0")).unwrap(), (BIG, BIG));
        let host = pod.host_veth();
        assert_eq!(node.ns.run(|| gso_gro_ipv4(&host)).unwrap(), (BIG, BIG));
    }
    // CHECK passes on such a pod.
    assert!(a.check().unwrap().ok);

    let before = endpoint_counters(&node.stats().unwrap(), b.ip());
    let bytes = 64 << 20;
    assert_eq!(tcp_send(&a.ns, a.ip(), &b.ns, bytes), bytes);
    let after = endpoint_counters(&node.stats().unwrap(), b.ip());
    let (packets, sent) = (after[2] - before[2], after[3] - before[3]);
    // Every byte of b's stream was redirected, none went through the stack.
    assert!(sent >= bytes as u64, "{sent} bytes redirected of {bytes}");
    assert_eq!(
        after[5], before[5],
        "via the stack: {before:?} -> {after:?}"
    );
    // Packets above the default 64 KiB went through whole: on average,
    // more than the default allows (175 KB here; TCP sizes them to about a
    // millisecond of sending, so only a stream under 0.5 Gbit/s would not).
    let average = sent / packets.max(1);
    assert!(
        average > 65_536,
        "{packets} packets of {average} bytes on average: none larger than 64 KiB"
    );
}
