//! A pod cannot pretend to be another: forged source addresses, MACs and
//! ARP reach nobody and are counted; ferrite's pins and state are root's.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::harness::{privileged, Node};

/// The drop counter `reason` of the endpoint `ip` in `ferrite stats`.
fn drops(node: &Node, ip: std::net::IpAddr, reason: &str) -> u64 {
    let stats = node.stats().unwrap();
    let row = stats
        .lines()
        .find(|l| l.split_whitespace().next() == Some(ip.to_string().as_str()))
        .unwrap_or_else(|| panic!("no row for {ip}:\n{stats}"));
    row.split_whitespace()
        .last()
        .unwrap()
        .split(',')
        .find_map(|d| d.strip_prefix(&format!("{reason}=")))
        .map(|n| n.parse().unwrap())
        .unwrap_or(0)
}

#[test]
fn forged_sources_reach_nobody_and_are_counted() {
    if !privileged("forged_sources_reach_nobody_and_are_counted") {
        return;
    }
    let node = Node::new("10.83.0.0/24").unwrap();
    let a = node.add_pod("1.1.0").unwrap();
    let b = node.add_pod("1.1.0").unwrap();
    let c = node.add_pod("1.1.0").unwrap();
    assert!(a.ns.ping(b.ip()));

    // A source address nobody was given.
    a.ns.exec("ip addr add 10.83.0.250/32 dev eth0").unwrap();
    assert!(!a
        .ns
        .exec_status(&format!("busybox ping -c 2 -W 1 -I 10.83.0.250 {}", b.ip())));
    assert!(
        drops(&node, a.ip(), "SPOOFED_IP") >= 2,
        "{}",
        node.stats().unwrap()
    );

    // Another pod's address, towards a third pod.
    a.ns.exec(&format!("ip addr add {}/32 dev eth0", b.ip()))
        .unwrap();
    let before = drops(&node, a.ip(), "SPOOFED_IP");
    assert!(!a
        .ns
        .exec_status(&format!("busybox ping -c 2 -W 1 -I {} {}", b.ip(), c.ip())));
    assert!(drops(&node, a.ip(), "SPOOFED_IP") >= before + 2);
    // ARP claiming another pod's address.
    let before = drops(&node, a.ip(), "ARP_SPOOF");
    let _ = a.ns.exec_status(&format!(
        "busybox arping -U -c 2 -w 1 -I eth0 -s {} {}",
        b.ip(),
        b.ip()
    ));
    assert!(
        drops(&node, a.ip(), "ARP_SPOOF") > before,
        "{}",
        node.stats().unwrap()
    );

    a.ns.exec(&format!("ip addr del {}/32 dev eth0", b.ip()))
        .unwrap();

    // A forged MAC: nothing passes until the pod's own MAC is back.
    let mac = a.result["interfaces"][1]["mac"]
        .as_str()
        .unwrap()
        .to_string();
    a.ns.exec("ip link set eth0 address 02:de:ad:be:ef:01")
        .unwrap();
    // Changing the MAC flushed the gateway entry; put it back, as a pod
    // with CAP_NET_ADMIN could, so the forged frames are IP.
    let host_mac = a.result["interfaces"][0]["mac"].as_str().unwrap();
    a.ns.exec(&format!(
        "ip neigh replace 169.254.1.1 lladdr {host_mac} dev eth0 nud permanent"
    ))
    .unwrap();
    let before = drops(&node, a.ip(), "SPOOFED_MAC") + drops(&node, a.ip(), "ARP_SPOOF");
    assert!(!a
        .ns
        .exec_status(&format!("busybox ping -c 2 -W 1 {}", b.ip())));
    let after = drops(&node, a.ip(), "SPOOFED_MAC") + drops(&node, a.ip(), "ARP_SPOOF");
    assert!(after > before, "{}", node.stats().unwrap());
    a.ns.exec(&format!("ip link set eth0 address {mac}"))
        .unwrap();
    assert!(a.ns.ping(b.ip()), "the pod works again with its own MAC");
    // The victims never saw a forged packet from a: b and c only dropped nothing.
    assert_eq!(drops(&node, b.ip(), "SPOOFED_IP"), 0);
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn pins_and_state_are_root_only() {
    if !privileged("pins_and_state_are_root_only") {
        return;
    }
    let node = Node::new("10.84.0.0/24").unwrap();
    let _a = node.add_pod("1.1.0").unwrap();
    let root = node.bpffs.path().join("ferrite");
    assert_eq!(mode(&root), 0o700, "{}", root.display());
    let mut pins = 0;
    for dir in std::fs::read_dir(&root).unwrap() {
        let dir = dir.unwrap().path();
        assert_eq!(mode(&dir), 0o700, "{}", dir.display());
        for pin in std::fs::read_dir(&dir).unwrap() {
            let pin = pin.unwrap().path();
            assert_eq!(mode(&pin) & 0o077, 0, "{} is open to others", pin.display());
            pins += 1;
        }
    }
    assert!(pins >= 6, "programs and maps are pinned");
    let ipam = node.state.path().join("ipam");
    assert_eq!(mode(&ipam), 0o700);
    let net = ipam.join(&node.name);
    assert_eq!(mode(&net), 0o700);
    for f in std::fs::read_dir(&net).unwrap() {
        let f = f.unwrap().path();
        assert_eq!(mode(&f) & 0o077, 0, "{} is open to others", f.display());
    }
    assert_eq!(mode(&node.state.path().join("cni.log")), 0o600);
}

#[test]
fn devices_and_qdiscs_ferrite_did_not_make_are_left_alone() {
    if !privileged("devices_and_qdiscs_ferrite_did_not_make_are_left_alone") {
        return;
    }
    let node = Node::new("10.87.0.0/24").unwrap();
    // Named like ferrite's veths, but not made by it (no ferrite group),
    // with someone else's clsact qdisc and filter on its peer.
    node.ns
        .exec("ip link add fer000000000001 type veth peer name other0 && ip link set fer000000000001 up && tc qdisc add dev other0 clsact && tc filter add dev other0 ingress protocol all u32 match u32 0 0")
        .unwrap();
    let pod = node.add_pod("1.1.0").unwrap();
    let mut c = node.conf("1.1.0");
    c["cni.dev/valid-attachments"] = serde_json::json!([]);
    node.invoke("GC", "", None, "", &c, &[])
        .unwrap()
        .expect_ok();
    let links = node.links_settled().unwrap();
    assert!(links.contains(&"fer000000000001".to_string()), "{links:?}");
    assert!(
        !links.contains(&pod.host_veth()),
        "GC removed ferrite's own veth"
    );
    let qdisc = node.ns.exec("tc qdisc show dev other0").unwrap();
    assert!(qdisc.contains("clsact"), "{qdisc}");
    let filter = node.ns.exec("tc filter show dev other0 ingress").unwrap();
    assert!(filter.contains("u32"), "{filter}");
    let mut pod = pod;
    pod.deleted = true;
}

#[test]
fn a_read_only_state_dir_fails_cleanly_and_status_says_so() {
    if !privileged("a_read_only_state_dir_fails_cleanly_and_status_says_so") {
        return;
    }
    let node = Node::new("10.88.0.0/24").unwrap();
    let ro = crate::harness::TempDir::new("ro").unwrap();
    crate::harness::sh(&format!(
        "mount -t tmpfs -o ro tmpfs {}",
        ro.path().display()
    ))
    .unwrap();
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(ro.path().to_owned());
    let mut c = node.conf("1.1.0");
    c["stateDir"] = serde_json::json!(ro.path().join("state"));
    let before = node.links().unwrap();
    let ns = crate::harness::Netns::new("p").unwrap();
    let inv = node
        .invoke(
            "ADD",
            &crate::harness::unique("c"),
            Some(&ns.path()),
            "eth0",
            &c,
            &[],
        )
        .unwrap();
    assert_eq!(inv.code(), 5, "{}", inv.stdout);
    assert_eq!(node.links().unwrap(), before, "a failed ADD left links");
    let st = node.invoke("STATUS", "", None, "", &c, &[]).unwrap();
    assert_eq!(st.code(), 50, "{}", st.stdout);
}

#[test]
fn a_full_endpoint_map_fails_cleanly_and_status_says_so() {
    if !privileged("a_full_endpoint_map_fails_cleanly_and_status_says_so") {
        return;
    }
    use ferrite_datapath::{Datapath, Endpoint, MAX_ENDPOINTS};
    let node = Node::new("10.89.0.0/24").unwrap();
    let a = node.add_pod("1.1.0").unwrap();
    let dp = Datapath::open(&node.bpffs.path().join("ferrite"))
        .unwrap()
        .unwrap();
    let filler = Endpoint {
        ifindex: 999_999,
        flags: 0,
        pod_mac: [2, 0, 0, 0, 0, 1],
        host_mac: [2, 0, 0, 0, 0, 2],
    };
    let used = dp.endpoints().unwrap().len();
    for i in 0..(MAX_ENDPOINTS - used) as u32 {
        let ip = std::net::Ipv4Addr::from(0xac10_0000 + i);
        dp.upsert_endpoint(ip.into(), &filler).unwrap();
    }
    let st = node
        .invoke("STATUS", "", None, "", &node.conf("1.1.0"), &[])
        .unwrap();
    assert_eq!(st.code(), 50, "{}", st.stdout);
    assert!(st.json()["msg"].as_str().unwrap().contains("full"));
    let before = node.links().unwrap();
    let ns = crate::harness::Netns::new("p").unwrap();
    let inv = node
        .invoke(
            "ADD",
            &crate::harness::unique("c"),
            Some(&ns.path()),
            "eth0",
            &node.conf("1.1.0"),
            &[],
        )
        .unwrap();
    assert_eq!(inv.code(), 103, "{}", inv.stdout);
    assert!(
        inv.json()["msg"].as_str().unwrap().contains("full"),
        "{}",
        inv.stdout
    );
    assert_eq!(
        node.links_settled().unwrap(),
        before,
        "a failed ADD left links"
    );
    assert_eq!(
        node.allocations().len(),
        1,
        "only the first pod holds an address"
    );
    a.check().unwrap().expect_ok();
    dp.forget_interface(999_999).unwrap();
}
