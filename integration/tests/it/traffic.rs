//! Pods reach each other through the eBPF path alone.

use crate::harness::{privileged, tcp_echo, Node};

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
