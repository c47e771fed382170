// SPDX-License-Identifier: Apache-2.0
//! The masquerade table in a real kernel: the rules `nft` reads back, and
//! real traffic from a pod-like namespace.
//!
//! ```text
//!   pod (10.244.1.2, fd00:244:1::2)
//!    |  10.244.1.1, fd00:244:1::1
//!   node ---------------------------- outside (192.0.2.100 "the internet",
//!    |  192.0.2.1, 2001:db8::1          192.0.2.101 "another node", and v6)
//!    |  10.244.2.1, fd00:244:2::1
//!   cluster (10.244.2.2, fd00:244:2::2: a pod on another node)
//! ```
//! `nft` runs in the test only, to read back what the agent wrote.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ferrite_agent::masquerade::{self, MasqueradeSpec};
use ferrite_agent::nft::NfTables;

use crate::harness::{connect_from, link, privileged, Netns};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

struct Topology {
    node: Netns,
    pod: Netns,
    outside: Netns,
    cluster: Netns,
}

fn topology() -> Topology {
    let t = Topology {
        node: Netns::new("mn").unwrap(),
        pod: Netns::new("mp").unwrap(),
        outside: Netns::new("mo").unwrap(),
        cluster: Netns::new("mc").unwrap(),
    };
    link(
        &t.node,
        &t.pod,
        &["10.244.1.1/24", "fd00:244:1::1/64"],
        &["10.244.1.2/24", "fd00:244:1::2/64"],
    )
    .unwrap();
    link(
        &t.node,
        &t.outside,
        &["192.0.2.1/24", "2001:db8::1/64"],
        &[
            "192.0.2.100/24",
            "192.0.2.101/24",
            "2001:db8::100/64",
            "2001:db8::101/64",
        ],
    )
    .unwrap();
    link(
        &t.node,
        &t.cluster,
        &["10.244.2.1/24", "fd00:244:2::1/64"],
        &["10.244.2.2/24", "fd00:244:2::2/64"],
    )
    .unwrap();
    t.node
        .exec("sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1")
        .unwrap();
    t.pod
        .exec("ip route add default via 10.244.1.1 && ip -6 route add default via fd00:244:1::1")
        .unwrap();
    t.cluster
        .exec("ip route add default via 10.244.2.1 && ip -6 route add default via fd00:244:2::1")
        .unwrap();
    // The outside knows the way back to pods, as another node would: a
    // source address that was not masqueraded still gets its answer, so
    // the test sees which one arrived.
    t.outside
        .exec("ip route add 10.244.0.0/16 via 192.0.2.1 && ip -6 route add fd00:244::/32 via 2001:db8::1")
        .unwrap();
    t
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn spec() -> MasqueradeSpec {
    MasqueradeSpec {
        pod_cidrs: vec![
            "10.244.1.0/24".parse().unwrap(),
            "fd00:244:1::/64".parse().unwrap(),
        ],
        cluster_cidrs: vec![
            "10.244.0.0/16".parse().unwrap(),
            "fd00:244::/32".parse().unwrap(),
        ],
        node_ips: ["192.0.2.1", "192.0.2.101", "2001:db8::1", "2001:db8::101"]
            .iter()
            .map(|s| ip(s))
            .collect(),
    }
}

fn commit(ns: &Netns, build: impl FnOnce(&mut ferrite_agent::nft::Batch) + Send) {
    ns.run(|| {
        let mut nft = NfTables::new().unwrap();
        let mut batch = nft.batch();
        build(&mut batch);
        nft.commit(batch).unwrap();
    })
    .unwrap();
}

/// The source address `to` sees for a TCP connection from the pod.
fn source_seen(t: &Topology, at: &Netns, to: &str) -> IpAddr {
    let addr = SocketAddr::new(ip(to), 8080);
    let listener = at.first_peer(addr, Duration::from_secs(5)).unwrap();
    connect_from(&t.pod, addr).unwrap();
    listener.peer().expect("a connection")
}

#[test]
fn table_reads_back_and_masquerades_only_traffic_leaving_the_cluster() {
    if !privileged("table_reads_back_and_masquerades_only_traffic_leaving_the_cluster") {
        return;
    }
    let t = topology();
    // Someone else's table in the same namespace, which must survive.
    t.node
        .exec("nft add table ip other && nft 'add chain ip other post { type nat hook postrouting priority 200; }'")
        .unwrap();
    commit(&t.node, |b| masquerade::recreate(b, &spec()));
    let listed = t.node.exec("nft list table inet ferrite").unwrap();
    for line in [
        "set node_ips4 {",
        "type ipv4_addr",
        "type nat hook postrouting priority srcnat; policy accept;",
        "ip daddr 10.244.0.0/16 return",
        "ip daddr @node_ips4 return",
        "ip saddr 10.244.1.0/24 masquerade fully-random",
        "ip6 daddr fd00:244::/32 return",
        "ip6 daddr @node_ips6 return",
        "ip6 saddr fd00:244:1::/64 masquerade fully-random",
    ] {
        assert!(listed.contains(line), "missing {line:?} in\n{listed}");
    }

    assert_eq!(
        t.node.nft_set("node_ips4").unwrap(),
        set(&["192.0.2.1", "192.0.2.101"])
    );
    assert_eq!(
        t.node.nft_set("node_ips6").unwrap(),
        set(&["2001:db8::1", "2001:db8::101"])
    );

    // Leaving the cluster: the node's address.
    assert_eq!(source_seen(&t, &t.outside, "192.0.2.100"), ip("192.0.2.1"));
    assert_eq!(
        source_seen(&t, &t.outside, "2001:db8::100"),
        ip("2001:db8::1")
    );
    // Another node's InternalIP and a cluster address: the pod's.
    assert_eq!(source_seen(&t, &t.outside, "192.0.2.101"), ip("10.244.1.2"));
    assert_eq!(
        source_seen(&t, &t.outside, "2001:db8::101"),
        ip("fd00:244:1::2")
    );
    assert_eq!(source_seen(&t, &t.cluster, "10.244.2.2"), ip("10.244.1.2"));
    assert_eq!(
        source_seen(&t, &t.cluster, "fd00:244:2::2"),
        ip("fd00:244:1::2")
    );

    // Re-creating is atomic and idempotent: the same table again.
    commit(&t.node, |b| masquerade::recreate(b, &spec()));
    assert_eq!(t.node.exec("nft list table inet ferrite").unwrap(), listed);

    // 192.0.2.101 stops being a node: its traffic is masqueraded now.
    let mut fewer = spec();
    fewer.node_ips.remove(&ip("192.0.2.101"));
    commit(&t.node, |b| masquerade::set_node_ips(b, &fewer.node_ips));
    assert_eq!(t.node.nft_set("node_ips4").unwrap(), set(&["192.0.2.1"]));
    assert_eq!(t.node.nft_set("node_ips6").unwrap().len(), 2);
    assert_eq!(source_seen(&t, &t.outside, "192.0.2.101"), ip("192.0.2.1"));

    // An empty node list empties both sets.
    commit(&t.node, |b| masquerade::set_node_ips(b, &BTreeSet::new()));
    assert!(t.node.nft_set("node_ips4").unwrap().is_empty());
    assert!(t.node.nft_set("node_ips6").unwrap().is_empty());

    // Removed (what --masquerade=false does): the pod's address goes out.
    commit(&t.node, masquerade::remove);
    assert!(t.node.exec("nft list table inet ferrite").is_err());
    assert_eq!(source_seen(&t, &t.outside, "192.0.2.100"), ip("10.244.1.2"));
    // Removing twice is fine, and the other table is still there.
    commit(&t.node, masquerade::remove);
    assert!(t
        .node
        .exec("nft list table ip other")
        .unwrap()
        .contains("chain post"));
}

#[test]
fn a_rejected_batch_changes_nothing() {
    if !privileged("a_rejected_batch_changes_nothing") {
        return;
    }
    let ns = Netns::new("mx").unwrap();
    commit(&ns, |b| masquerade::recreate(b, &spec()));
    let before = ns.exec("nft list table inet ferrite").unwrap();
    let err = ns
        .run(|| {
            let mut nft = NfTables::new().unwrap();
            let mut batch = nft.batch();
            masquerade::recreate(&mut batch, &spec());
            // A rule in a chain that does not exist fails the whole batch.
            batch.new_rule(masquerade::TABLE, "nonexistent", &[]);
            nft.commit(batch).unwrap_err()
        })
        .unwrap();
    assert_eq!(err.errno(), Some(libc::ENOENT), "{err}");
    assert!(err.to_string().contains("nonexistent"), "{err}");
    assert_eq!(ns.exec("nft list table inet ferrite").unwrap(), before);
    let exists = ns
        .run(|| {
            NfTables::new()
                .unwrap()
                .table_exists(masquerade::TABLE)
                .unwrap()
        })
        .unwrap();
    assert!(exists);
}
