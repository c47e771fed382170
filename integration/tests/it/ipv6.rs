//! IPv6-only and dual-stack pods on the same fast path, with IPv6 (and
//! IPv4) forwarding off on the node.

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use anyhow::Context;
use serde_json::json;

use crate::chaining::Chain;
use crate::harness::{endpoint_counters, privileged, tcp_echo, unique, Netns, Node};
use crate::node::{
    bandwidth_both_directions, connect, delta, enable_forwarding, exchange, serve_echo, Remote,
    UPLINK_NODE, UPLINK_REMOTE,
};

fn dual(node: &mut Node, v4: &str, v6: &str) {
    node.extra = json!({
        "ipam": { "ranges": [[{ "subnet": v4 }], [{ "subnet": v6 }]] }
    });
}

fn ips(result: &serde_json::Value) -> Vec<IpAddr> {
    result["ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            i["address"]
                .as_str()
                .unwrap()
                .split('/')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect()
}

fn ping6(ns: &Netns, ip: IpAddr) -> bool {
    ns.exec_status(&format!("busybox ping -6 -c 2 -W 2 {ip}"))
}

#[test]
fn ipv6_only_pods_talk_through_the_redirect() {
    if !privileged("ipv6_only_pods_talk_through_the_redirect") {
        return;
    }
    let node = Node::new("fd00:71::/64").unwrap();
    assert_eq!(
        node.ns
            .exec("cat /proc/sys/net/ipv6/conf/all/forwarding")
            .unwrap()
            .trim(),
        "0"
    );
    let a = node.add_pod("1.0.0").unwrap();
    let b = node.add_pod("1.0.0").unwrap();
    assert!(a.ip().is_ipv6());
    assert_eq!(a.result["ips"][0]["address"], format!("{}/128", a.ip()));
    assert_eq!(a.result["routes"][0]["dst"], "::/0");
    assert_eq!(a.result["routes"][0]["gw"], "fe80::1");
    // The node's own settings stay as they were; the pod's are set.
    let dad =
        a.ns.exec("cat /proc/sys/net/ipv6/conf/eth0/accept_dad")
            .unwrap();
    assert_eq!(dad.trim(), "0");
    let neigh = a.ns.exec("ip -6 neigh show dev eth0").unwrap();
    assert!(
        neigh.contains("fe80::1") && neigh.contains("PERMANENT"),
        "{neigh}"
    );

    assert!(ping6(&a.ns, b.ip()) && ping6(&b.ns, a.ip()));
    assert_eq!(tcp_echo(&a.ns, a.ip(), &b.ns, 4 << 20).unwrap(), 4 << 20);
    let stats = node.stats().unwrap();
    let row: Vec<&str> = stats
        .lines()
        .find(|l| l.starts_with(&b.ip().to_string()))
        .unwrap()
        .split_whitespace()
        .collect();
    let redirected: u64 = row[4].parse().unwrap();
    assert!(redirected > 100, "IPv6 took the redirect: {stats}");
}

#[test]
fn dual_stack_pods_get_both_families_and_release_both() {
    if !privileged("dual_stack_pods_get_both_families_and_release_both") {
        return;
    }
    let mut node = Node::new("unused").unwrap();
    dual(&mut node, "10.72.0.0/24", "fd00:72::/64");
    for v in ["0.3.1", "1.0.0", "1.1.0"] {
        let mut a = node.add_pod(v).unwrap();
        let b = node.add_pod(v).unwrap();
        let (ai, bi) = (ips(&a.result), ips(&b.result));
        assert!(
            ai[0].is_ipv4() && ai[1].is_ipv6(),
            "range-set order: {ai:?}"
        );
        assert_eq!(a.result["ips"][1]["interface"], 1);
        assert_eq!(
            a.result["ips"][1]
                .get("version")
                .map(|v| v.as_str().unwrap()),
            v.starts_with('0').then_some("6"),
            "{v}"
        );
        assert_eq!(a.result["routes"].as_array().unwrap().len(), 2);
        assert!(a.ns.ping(bi[0]) && ping6(&a.ns, bi[1]), "{v}");
        assert!(b.ns.ping(ai[0]) && ping6(&b.ns, ai[1]), "{v}");
        assert_eq!(tcp_echo(&b.ns, bi[1], &a.ns, 1 << 20).unwrap(), 1 << 20);
        if v != "0.3.1" {
            a.check().unwrap().expect_ok();
        }
        assert_eq!(node.allocations().len(), 4);
        a.del().unwrap().expect_ok();
        assert_eq!(node.allocations().len(), 2, "DEL frees both of a's");
        drop(b);
        assert!(node.allocations().is_empty());
    }
    // GC frees both families too.
    let a = node.add_pod("1.1.0").unwrap();
    assert_eq!(node.allocations().len(), 2);
    let mut c = node.conf("1.1.0");
    c["cni.dev/valid-attachments"] = json!([]);
    node.invoke("GC", "", None, "", &c, &[])
        .unwrap()
        .expect_ok();
    assert!(node.allocations().is_empty());
    let mut a = a;
    a.deleted = true;
}

#[test]
fn one_family_running_out_fails_the_add_and_frees_the_other() {
    if !privileged("one_family_running_out_fails_the_add_and_frees_the_other") {
        return;
    }
    let mut node = Node::new("unused").unwrap();
    // IPv4 has room for 2 pods, IPv6 for many.
    dual(&mut node, "10.73.0.0/30", "fd00:73::/120");
    let _a = node.add_pod("1.1.0").unwrap();
    let _b = node.add_pod("1.1.0").unwrap();
    let ns = Netns::new("p").unwrap();
    let inv = node
        .invoke(
            "ADD",
            &unique("c"),
            Some(&ns.path()),
            "eth0",
            &node.conf("1.1.0"),
            &[],
        )
        .unwrap();
    assert_eq!(inv.code(), 101, "{}", inv.stdout);
    assert!(
        inv.json()["msg"].as_str().unwrap().contains("IPv4"),
        "{}",
        inv.stdout
    );
    let allocs = node.allocations();
    assert_eq!(allocs.len(), 4, "the IPv6 address was not kept: {allocs:?}");
}

#[test]
fn spoofed_ipv6_source_is_dropped_and_counted() {
    if !privileged("spoofed_ipv6_source_is_dropped_and_counted") {
        return;
    }
    let node = Node::new("fd00:74::/64").unwrap();
    let a = node.add_pod("1.1.0").unwrap();
    let b = node.add_pod("1.1.0").unwrap();
    a.ns.exec("ip -6 addr add fd00:74::99/128 dev eth0 nodad")
        .unwrap();
    assert!(!a.ns.exec_status(&format!(
        "busybox ping -6 -c 2 -W 1 -I fd00:74::99 {}",
        b.ip()
    )));
    let stats = node.stats().unwrap();
    let row = stats
        .lines()
        .find(|l| l.starts_with(&a.ip().to_string()))
        .unwrap();
    assert!(row.contains("SPOOFED_IP="), "{stats}");
    assert!(ping6(&a.ns, b.ip()), "its own address still works");
}

/// A kube-proxy style ip6tables DNAT between two IPv6 pods: the flow the
/// host stack delivered stays on the host stack, so the answers come back
/// un-NATed, from the Service address.
#[test]
fn ipv6_service_dnat_between_pods() {
    if !privileged("ipv6_service_dnat_between_pods") {
        return;
    }
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::time::Duration;

    let node = Node::new("fd00:75::/64").unwrap();
    // Services need forwarding on the node, as every Kubernetes node has.
    node.ns
        .exec("sysctl -qw net.ipv6.conf.all.forwarding=1")
        .unwrap();
    let a = node.add_pod("1.1.0").unwrap();
    let b = node.add_pod("1.1.0").unwrap();
    let vip: IpAddr = "fd00:96::10".parse().unwrap();
    node.ns
        .exec(&format!(
            "ip6tables -t nat -A PREROUTING -d {vip} -p tcp --dport 80 -j DNAT --to-destination [{}]:8080",
            a.ip()
        ))
        .unwrap();
    let listener =
        a.ns.run(|| TcpListener::bind(SocketAddr::new(a.ip(), 8080)))
            .unwrap()
            .unwrap();
    std::thread::scope(|s| {
        let server = s.spawn(move || {
            let (mut c, peer) = listener.accept().unwrap();
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0;
            while total < 256 * 1024 {
                let n = c.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                c.write_all(&buf[..n]).unwrap();
                total += n;
            }
            peer
        });
        let mut conn = b
            .ns
            .run(|| TcpStream::connect_timeout(&SocketAddr::new(vip, 80), Duration::from_secs(5)))
            .unwrap()
            .expect("connect to the IPv6 Service");
        assert_eq!(conn.peer_addr().unwrap().ip(), vip);
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let data = vec![0x6au8; 256 * 1024];
        let writer = {
            let mut w = conn.try_clone().unwrap();
            s.spawn(move || w.write_all(&data))
        };
        let mut got = 0;
        let mut buf = vec![0u8; 64 * 1024];
        while got < 256 * 1024 {
            let n = conn.read(&mut buf).expect("answers through the Service");
            assert!(n > 0, "the Service connection closed early");
            got += n;
        }
        writer.join().unwrap().unwrap();
        drop(conn);
        // No masquerade between pods: the backend saw the client itself.
        assert_eq!(server.join().unwrap().ip(), b.ip());
    });
}

/// The node's IPv6 address on its uplink to the remote host, and the
/// remote's (documentation prefix, inside the test's namespaces only).
const UPLINK6_NODE: &str = "2001:db8:100::1";
const UPLINK6_REMOTE: &str = "2001:db8:100::2";

/// A counter of the namespace's IPv6 MIB (/proc/net/snmp6).
fn snmp6(ns: &Netns, key: &str) -> u64 {
    let table = ns.exec("cat /proc/net/snmp6").unwrap();
    table
        .lines()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some(key)).then(|| w.next().unwrap().parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no {key} in /proc/net/snmp6"))
}

/// hostPort over IPv6: the reference portmap chained after ferrite, for an
/// IPv6-only and for a dual-stack pod, reached at the node's IPv6 address
/// from another pod on the node, from a process in the node namespace and
/// from a host on the node's uplink; a dual-stack pod's port is reached
/// over IPv4 as well. `[::1]:hostPort` cannot work (see the end).
#[test]
fn ipv6_host_port_through_portmap() {
    if !privileged("ipv6_host_port_through_portmap") {
        return;
    }
    for v4 in [None, Some("10.78.0.0/24")] {
        let mut node = Node::new("fd00:78::/64").unwrap();
        if let Some(v4) = v4 {
            dual(&mut node, v4, "fd00:78::/64");
        }
        host_port_v6(&node, v4.is_some());
    }
}

fn host_port_v6(node: &Node, dual_stack: bool) {
    let kind = if dual_stack {
        "dual-stack"
    } else {
        "IPv6-only"
    };
    const HOST_PORT: u16 = 18080;
    // hostPorts need forwarding on the node, as every Kubernetes node has.
    node.ns
        .exec("sysctl -qw net.ipv6.conf.all.forwarding=1")
        .unwrap();
    if dual_stack {
        enable_forwarding(node);
    }
    let remote = Remote::new(node).unwrap();
    node.ns
        .exec(&format!(
            "ip -6 addr add {UPLINK6_NODE}/64 dev {} nodad",
            remote.uplink
        ))
        .unwrap();
    remote
        .ns
        .exec(&format!(
            "ip -6 addr add {UPLINK6_REMOTE}/64 dev eth0 nodad"
        ))
        .unwrap();
    let client = node.add_pod("1.0.0").unwrap();
    let mut web = Chain::new(
        node,
        json!({}),
        vec![json!({"type": "portmap", "capabilities": {"portMappings": true}, "snat": true})],
        json!({"portMappings": [{"hostPort": HOST_PORT, "containerPort": 8080, "protocol": "tcp"}]}),
    )
    .unwrap();
    let result = web.add().unwrap().clone();
    // (portmap 1.1.1's CHECK fails for IPv6-only and dual-stack pods before
    // it has compared the IPv6 rules: chaining.rs ignores that failure, and
    // this test reads ip6tables itself.)
    web.check().unwrap();
    let web_ips = ips(&result);
    let web6 = *web_ips.iter().find(|ip| ip.is_ipv6()).unwrap();
    assert_eq!(web_ips.iter().any(IpAddr::is_ipv4), dual_stack, "{kind}");
    let client_ips = ips(&client.result);
    let client6 = *client_ips.iter().find(|ip| ip.is_ipv6()).unwrap();
    // portmap found the pod's IPv6 address in ferrite's result.
    let nat6 = node.ns.exec("ip6tables-save -t nat").unwrap();
    assert!(
        nat6.contains(&format!("--to-destination [{web6}]:8080")),
        "{kind}: portmap wrote no IPv6 DNAT:\n{nat6}"
    );
    let nat4 = node.ns.exec("iptables-save -t nat").unwrap();
    assert_eq!(
        nat4.contains(&format!("--dport {HOST_PORT}")),
        dual_stack,
        "{kind}: IPv4 rules exactly when the pod has IPv4:\n{nat4}"
    );

    let node6: IpAddr = UPLINK6_NODE.parse().unwrap();
    let mut clients: Vec<(&str, &Netns, SocketAddr, IpAddr)> = vec![
        (
            "pod",
            &client.ns,
            SocketAddr::new(node6, HOST_PORT),
            client6,
        ),
        ("node", &node.ns, SocketAddr::new(node6, HOST_PORT), node6),
        (
            "remote",
            &remote.ns,
            SocketAddr::new(node6, HOST_PORT),
            UPLINK6_REMOTE.parse().unwrap(),
        ),
    ];
    if dual_stack {
        let node4: IpAddr = UPLINK_NODE.parse().unwrap();
        let client4 = *client_ips.iter().find(|ip| ip.is_ipv4()).unwrap();
        clients.extend([
            (
                "pod over IPv4",
                &client.ns,
                SocketAddr::new(node4, HOST_PORT),
                client4,
            ),
            (
                "node over IPv4",
                &node.ns,
                SocketAddr::new(node4, HOST_PORT),
                node4,
            ),
            (
                "remote over IPv4",
                &remote.ns,
                SocketAddr::new(node4, HOST_PORT),
                UPLINK_REMOTE.parse().unwrap(),
            ),
        ]);
    }

    let before = node.stats().unwrap();
    // One socket for both families ([::] takes IPv4 as v4-mapped).
    let listener = web
        .ns
        .run(|| TcpListener::bind("[::]:8080"))
        .unwrap()
        .unwrap();
    std::thread::scope(|s| {
        let n = clients.len();
        let server = s.spawn(move || serve_echo(listener, n, Duration::from_secs(20)));
        for (who, ns, to, _) in &clients {
            let mut conn = connect(ns, *to)
                .with_context(|| format!("{kind}: {who} -> hostPort {to}"))
                .unwrap();
            exchange(&mut conn, 256 << 10, 0x46)
                .with_context(|| format!("{kind}: {who} -> hostPort {to}"))
                .unwrap();
        }
        let peers = server.join().unwrap().unwrap();
        eprintln!("{kind} hostPort {HOST_PORT}: backend saw {peers:?}");
        // DNAT only: each client reached the pod under its own address
        // (portmap's snat masquerades hairpin traffic only).
        for ((who, _, _, want), peer) in clients.iter().zip(&peers) {
            assert_eq!(peer.ip().to_canonical(), *want, "{kind}: {who}");
        }
    });
    // Every answer went back through the host stack, which un-NATed it:
    // none took the redirect, not even those to the pod on the same node.
    let after = node.stats().unwrap();
    let wd = delta(
        endpoint_counters(&after, web6),
        endpoint_counters(&before, web6),
    );
    let cd = delta(
        endpoint_counters(&after, client6),
        endpoint_counters(&before, client6),
    );
    eprintln!("{kind}: web pod sent {} packets, {} redirected; client pod got {} redirected in, {} via the stack", wd[0], wd[2], cd[4], cd[5]);
    assert!(wd[0] > 50, "{kind}: the web pod answered: {wd:?}");
    assert_eq!(wd[2], 0, "{kind}: no hostPort answer takes the redirect");
    assert_eq!(cd[4], 0, "{kind}: the client got nothing redirected");

    if !dual_stack {
        loopback_host_port_is_unreachable(node, &web, HOST_PORT);
    }

    web.del().unwrap();
    let nat6 = node.ns.exec("ip6tables-save -t nat").unwrap();
    assert!(
        !nat6.contains(&format!("--dport {HOST_PORT}")),
        "{kind}: DEL left portmap's IPv6 rules:\n{nat6}"
    );
    assert_eq!(node.allocations().len(), client_ips.len(), "{kind}");
}

/// `[::1]:hostPort` from the node cannot reach the pod, and no NAT rule
/// can make it; IPv4's `127.0.0.1:hostPort` works only through
/// `route_localnet`, which IPv6 lacks. What happens, step by step (each
/// step asserted below):
///
/// 1. portmap's OUTPUT rule (`-m addrtype --dst-type LOCAL`) matches ::1
///    and DNATs the SYN to the pod. For IPv4 it also marks 127.0.0.1 for
///    masquerade and sets route_localnet on the host veth; for IPv6 (1.1.1,
///    `if !isV6`) it does neither. The SYN leaves with source ::1, and the
///    pod's kernel drops it on arrival: ip6_rcv_core refuses a loopback
///    source or destination on a non-loopback device (RFC 4291 2.5.3),
///    counted as Ip6InHdrErrors in the pod. The client times out.
/// 2. A MASQUERADE of source ::1 written by hand gets the SYN in (source
///    now a node address), and the pod answers; but conntrack un-NATs the
///    SYN-ACK in PREROUTING to destination ::1, and the route lookup for
///    ::1 arriving on the host veth (not a loopback device) fails: the node
///    counts Ip6InNoRoutes and sends ICMPv6 unreachable. IPv4 has
///    net.ipv4.conf.*.route_localnet for exactly this; IPv6 has no
///    counterpart, so the client times out again.
///
/// A process on the node reaches the hostPort at any of the node's other
/// IPv6 addresses (the node case above).
fn loopback_host_port_is_unreachable(node: &Node, web: &Chain<'_>, port: u16) {
    let to = SocketAddr::new("::1".parse().unwrap(), port);
    let try_loopback = || {
        node.ns
            .run(|| TcpStream::connect_timeout(&to, Duration::from_secs(2)))
            .unwrap()
    };
    // A listener, so that a SYN that got in would be answered.
    let _listener = web
        .ns
        .run(|| TcpListener::bind("[::]:8080"))
        .unwrap()
        .unwrap();

    let hdr_errors = snmp6(&web.ns, "Ip6InHdrErrors");
    let err = try_loopback().expect_err("[::1]:hostPort cannot reach an IPv6 pod");
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::TimedOut,
        "DNATed (not refused by the node), then lost: {err}"
    );
    assert!(
        snmp6(&web.ns, "Ip6InHdrErrors") > hdr_errors,
        "the pod dropped the SYN from ::1 as a header error"
    );

    let masq = format!(
        "POSTROUTING -s ::1/128 -o {} -j MASQUERADE",
        web.host_veth()
    );
    node.ns
        .exec(&format!("ip6tables -t nat -I {masq}"))
        .unwrap();
    let hdr_errors = snmp6(&web.ns, "Ip6InHdrErrors");
    let no_routes = snmp6(&node.ns, "Ip6InNoRoutes");
    let err = try_loopback().expect_err("masquerading ::1 does not help");
    node.ns
        .exec(&format!("ip6tables -t nat -D {masq}"))
        .unwrap();
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    assert_eq!(
        snmp6(&web.ns, "Ip6InHdrErrors"),
        hdr_errors,
        "masqueraded, the SYN got into the pod"
    );
    assert!(
        snmp6(&node.ns, "Ip6InNoRoutes") > no_routes,
        "the answer, un-NATed to ::1, found no route on the node"
    );
}

/// The bandwidth capability (ferrite's own TBFs) on an IPv6-only pod: the
/// same limits and measurements as the IPv4 test, to the pod and from it,
/// through the host stack (the node) and through the fast path (a pod on
/// the same node), each within 15 %.
#[test]
fn ipv6_bandwidth_limits_both_directions() {
    if !privileged("ipv6_bandwidth_limits_both_directions") {
        return;
    }
    bandwidth_both_directions("fd00:77::/64", "2001:db8:77::1".parse().unwrap());
}
