//! IPv6-only and dual-stack pods on the same fast path, with IPv6 (and
//! IPv4) forwarding off on the node.

use std::net::IpAddr;

use serde_json::json;

use crate::harness::{privileged, tcp_echo, unique, Netns, Node};

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
