// SPDX-License-Identifier: Apache-2.0
//! Route sync against the kernel: it adds, replaces and removes only routes
//! with ferrite's protocol, and leaves everyone else's alone.

use ferrite_agent::netlink::Netlink;
use ferrite_agent::node::NodeInfo;
use ferrite_agent::routes::RTPROT_FERRITE_NODES;
use ferrite_agent::sync::apply_routes;

use crate::harness::{privileged, Netns};

fn node(name: &str, cidrs: &[&str], ips: &[&str]) -> NodeInfo {
    NodeInfo {
        name: name.into(),
        pod_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
        internal_ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
    }
}

/// A node namespace with an uplink (one end of a veth pair; this kernel
/// has no dummy devices) on 192.0.2.0/24 and
/// 2001:db8::/64.
fn node_netns() -> Netns {
    let ns = Netns::new("rt").unwrap();
    ns.exec(
        "ip link add up0 type veth peer name up0p && ip link set up0p up && ip link set up0 up && \
         ip addr add 192.0.2.1/24 dev up0 && ip addr add 2001:db8::1/64 dev up0 nodad",
    )
    .unwrap();
    ns
}

#[test]
fn sync_adds_replaces_and_removes_only_its_own_routes() {
    if !privileged("sync_adds_replaces_and_removes_only_its_own_routes") {
        return;
    }
    let ns = node_netns();
    // Someone else's routes, one to a CIDR a node will claim; the plugin's
    // pod route (protocol 70); a stale route of the agent's.
    ns.exec(
        "ip route add 10.244.9.0/24 via 192.0.2.9 proto static && \
         ip route add 10.244.4.0/24 via 192.0.2.44 proto static && \
         ip route add 10.244.1.5/32 dev up0 proto 70 scope link && \
         ip route add 10.244.7.0/24 via 192.0.2.7 proto 71 && \
         ip -6 route add fd00:244:9::/64 via 2001:db8::9 proto boot",
    )
    .unwrap();
    let foreign_before = foreign_routes(&ns);

    let mut nodes = vec![
        node(
            "a",
            &["10.244.1.0/24", "fd00:244:1::/64"],
            &["192.0.2.1", "2001:db8::1"],
        ),
        node(
            "b",
            &["10.244.2.0/24", "fd00:244:2::/64"],
            &["192.0.2.2", "2001:db8::2"],
        ),
        // No IPv6 InternalIP: its IPv6 CIDR is skipped with a warning.
        node("c", &["10.244.3.0/24", "fd00:244:3::/64"], &["192.0.2.3"]),
        node("d", &["10.244.4.0/24"], &["192.0.2.4"]),
    ];
    let out = ns
        .run(|| apply_routes(&mut Netlink::new().unwrap(), "a", &nodes))
        .unwrap()
        .unwrap();
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    assert_eq!((out.replaced, out.deleted, out.programmed), (3, 1, 3));
    assert!(
        out.warnings.iter().any(|w| w.contains("node c")),
        "{:?}",
        out.warnings
    );
    assert!(
        out.warnings.iter().any(|w| w.contains("10.244.4.0/24")),
        "{:?}",
        out.warnings
    );
    let mut ours = ns.routes(RTPROT_FERRITE_NODES).unwrap();
    ours.sort();
    assert_eq!(
        ours,
        [
            "10.244.2.0/24 via 192.0.2.2 dev up0",
            "10.244.3.0/24 via 192.0.2.3 dev up0",
            "fd00:244:2::/64 via 2001:db8::2 dev up0 metric 1024 pref medium",
        ]
    );
    assert_eq!(foreign_routes(&ns), foreign_before);

    // Again, unchanged: nothing to do.
    let out = ns
        .run(|| apply_routes(&mut Netlink::new().unwrap(), "a", &nodes))
        .unwrap()
        .unwrap();
    assert_eq!((out.replaced, out.deleted, out.programmed), (0, 0, 3));

    // b moves to another address; c goes away.
    nodes[1].internal_ips = vec![
        "192.0.2.22".parse().unwrap(),
        "2001:db8::22".parse().unwrap(),
    ];
    nodes.remove(2);
    let out = ns
        .run(|| apply_routes(&mut Netlink::new().unwrap(), "a", &nodes))
        .unwrap()
        .unwrap();
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    assert_eq!((out.replaced, out.deleted), (2, 1));
    let mut ours = ns.routes(RTPROT_FERRITE_NODES).unwrap();
    ours.sort();
    assert_eq!(
        ours,
        [
            "10.244.2.0/24 via 192.0.2.22 dev up0",
            "fd00:244:2::/64 via 2001:db8::22 dev up0 metric 1024 pref medium",
        ]
    );
    assert_eq!(foreign_routes(&ns), foreign_before);

    // Every node gone: all of ferrite's routes go, nobody else's.
    let out = ns
        .run(|| apply_routes(&mut Netlink::new().unwrap(), "a", &nodes[..1]))
        .unwrap()
        .unwrap();
    assert_eq!(out.deleted, 2);
    assert!(ns.routes(RTPROT_FERRITE_NODES).unwrap().is_empty());
    assert_eq!(foreign_routes(&ns), foreign_before);
}

#[test]
fn an_unreachable_node_does_not_stop_the_others() {
    if !privileged("an_unreachable_node_does_not_stop_the_others") {
        return;
    }
    let ns = node_netns();
    let nodes = [
        node("a", &["10.244.1.0/24"], &["192.0.2.1"]),
        node("b", &["10.244.2.0/24"], &["192.0.2.2"]),
        // No route to 198.51.100.0/24 from this node.
        node("e", &["10.244.5.0/24"], &["198.51.100.5"]),
    ];
    let out = ns
        .run(|| apply_routes(&mut Netlink::new().unwrap(), "a", &nodes))
        .unwrap()
        .unwrap();
    assert_eq!(out.errors.len(), 1, "{:?}", out.errors);
    assert!(out.errors[0].to_string().contains("10.244.5.0/24"));
    assert_eq!(out.programmed, 1);
    assert_eq!(
        ns.routes(RTPROT_FERRITE_NODES).unwrap(),
        ["10.244.2.0/24 via 192.0.2.2 dev up0"]
    );
}

/// Every route whose protocol is not ferrite's, as `ip route` prints them.
fn foreign_routes(ns: &Netns) -> Vec<String> {
    let mut out = Vec::new();
    for family in ["-4", "-6"] {
        let all = ns
            .exec(&format!("ip {family} route show table all"))
            .unwrap();
        out.extend(
            all.lines()
                .filter(|l| !l.contains("proto 71"))
                .map(str::to_string),
        );
    }
    out.sort();
    out
}
