//! The binary driven through the CNI protocol in network namespaces.

use std::collections::HashSet;
use std::net::IpAddr;

use serde_json::{json, Value};

use crate::harness::{privileged, unique, Netns, Node, TempDir};

const VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

#[test]
fn add_check_del_every_version() {
    if !privileged("add_check_del_every_version") {
        return;
    }
    let node = Node::new("10.50.0.0/24").unwrap();
    for v in VERSIONS {
        let before = node.links().unwrap();
        let mut pod = node.add_pod(v).unwrap();
        let r = &pod.result;
        assert_eq!(r["cniVersion"], *v);
        let ifaces = r["interfaces"].as_array().unwrap();
        assert_eq!(ifaces.len(), 2, "{r}");
        assert!(
            ifaces[0].get("sandbox").is_none(),
            "host veth has no sandbox"
        );
        assert_eq!(ifaces[1]["name"], "eth0");
        assert_eq!(ifaces[1]["sandbox"], pod.ns.path().display().to_string());
        let ip = &r["ips"][0];
        assert_eq!(ip["interface"], 1);
        assert_eq!(ip.get("version").is_some(), v.starts_with('0'), "{v}: {ip}");
        assert!(ip["address"].as_str().unwrap().ends_with("/32"));
        assert_eq!(r["routes"][0]["dst"], "0.0.0.0/0");

        // The pod looks as the design says.
        let addr = pod.ns.exec("ip -o -4 addr show dev eth0").unwrap();
        assert!(addr.contains(&format!("{}/32", pod.ip())), "{addr}");
        let routes = pod.ns.exec("ip route show").unwrap();
        assert!(
            routes.contains("default via 169.254.1.1 dev eth0") && routes.contains("onlink"),
            "{routes}"
        );
        let neigh = pod.ns.exec("ip neigh show dev eth0").unwrap();
        assert!(
            neigh.contains("169.254.1.1") && neigh.contains("PERMANENT"),
            "{neigh}"
        );
        let host = node
            .ns
            .exec(&format!("ip route show {}", pod.ip()))
            .unwrap();
        assert!(host.contains(&pod.host_veth()), "{host}");
        let filters = node
            .ns
            .exec(&format!("tc filter show dev {} ingress", pod.host_veth()))
            .unwrap();
        assert!(filters.contains("direct-action"), "{filters}");
        assert!(node.links().unwrap().contains(&pod.host_veth()));

        if *v != "0.3.0" && *v != "0.3.1" {
            pod.check().unwrap().expect_ok();
        }
        pod.del().unwrap().expect_ok();
        // DEL again succeeds and changes nothing.
        pod.del().unwrap().expect_ok();
        assert_eq!(
            node.links_settled().unwrap(),
            before,
            "{v}: links left behind"
        );
        assert!(
            node.allocations().is_empty(),
            "{v}: {:?}",
            node.allocations()
        );
    }
}

#[test]
fn stdout_carries_only_the_result() {
    if !privileged("stdout_carries_only_the_result") {
        return;
    }
    let node = Node::new("10.51.0.0/24").unwrap();
    let ns = Netns::new("p").unwrap();
    let id = unique("c");
    let inv = node
        .invoke(
            "ADD",
            &id,
            Some(&ns.path()),
            "eth0",
            &node.conf("1.1.0"),
            &[],
        )
        .unwrap();
    inv.expect_ok();
    // Exactly one JSON document, nothing before or after it.
    let mut de = serde_json::Deserializer::from_str(&inv.stdout).into_iter::<Value>();
    assert!(de.next().unwrap().is_ok());
    assert!(de.next().is_none(), "extra output: {:?}", inv.stdout);
    let log = std::fs::read_to_string(node.state.path().join("cni.log")).unwrap();
    assert!(log.contains("ADD") && log.contains(&id), "{log}");
    let del = node
        .invoke(
            "DEL",
            &id,
            Some(&ns.path()),
            "eth0",
            &node.conf("1.1.0"),
            &[],
        )
        .unwrap();
    del.expect_ok();
    assert!(
        del.stdout.trim().is_empty(),
        "DEL prints nothing: {:?}",
        del.stdout
    );
}

#[test]
fn del_without_netns_or_prev_result() {
    if !privileged("del_without_netns_or_prev_result") {
        return;
    }
    let node = Node::new("10.52.0.0/24").unwrap();
    let before = node.links().unwrap();
    let ns = Netns::new("p").unwrap();
    let id = unique("c");
    node.invoke(
        "ADD",
        &id,
        Some(&ns.path()),
        "eth0",
        &node.conf("1.0.0"),
        &[],
    )
    .unwrap()
    .expect_ok();
    let gone = ns.path();
    drop(ns);
    assert!(!gone.exists());
    // containerd's second DEL: empty CNI_NETNS, no prevResult.
    node.invoke("DEL", &id, Some(&gone), "eth0", &node.conf("1.0.0"), &[])
        .unwrap()
        .expect_ok();
    node.invoke("DEL", &id, None, "eth0", &node.conf("1.0.0"), &[])
        .unwrap()
        .expect_ok();
    assert_eq!(node.links_settled().unwrap(), before);
    assert!(node.allocations().is_empty());
    // DEL of something never added is fine too.
    node.invoke("DEL", "never-added", None, "eth0", &node.conf("1.1.0"), &[])
        .unwrap()
        .expect_ok();
}

#[test]
fn check_reports_drift() {
    if !privileged("check_reports_drift") {
        return;
    }
    let node = Node::new("10.53.0.0/24").unwrap();
    type Tamper<'a> = &'a dyn Fn(&crate::harness::Pod) -> String;
    let tamper: &[(&str, Tamper)] = &[
        ("pod address", &|p| {
            p.ns.exec(&format!("ip addr del {}/32 dev eth0", p.ip()))
                .unwrap();
            "address".into()
        }),
        ("pod default route", &|p| {
            p.ns.exec("ip route del default").unwrap();
            "default route".into()
        }),
        ("host route", &|p| {
            p.node
                .ns
                .exec(&format!("ip route del {}/32", p.ip()))
                .unwrap();
            "host route".into()
        }),
        ("tc filter", &|p| {
            p.node
                .ns
                .exec(&format!("tc filter del dev {} ingress", p.host_veth()))
                .unwrap();
            "attached".into()
        }),
        ("pod link down", &|p| {
            p.ns.exec("ip link set eth0 down").unwrap();
            "down".into()
        }),
    ];
    for (what, f) in tamper {
        let pod = node.add_pod("1.1.0").unwrap();
        pod.check().unwrap().expect_ok();
        let needle = f(&pod);
        let inv = pod.check().unwrap();
        assert_eq!(inv.code(), 105, "{what}: {}", inv.stdout);
        let msg = inv.json()["msg"].as_str().unwrap().to_string();
        assert!(
            msg.contains(&needle),
            "{what}: message {msg:?} should mention {needle:?}"
        );
    }
}

#[test]
fn gc_releases_unlisted_attachments() {
    if !privileged("gc_releases_unlisted_attachments") {
        return;
    }
    let node = Node::new("10.54.0.0/24").unwrap();
    let keep = node.add_pod("1.1.0").unwrap();
    let mut gone1 = node.add_pod("1.1.0").unwrap();
    let mut gone2 = node.add_pod("1.1.0").unwrap();
    assert_eq!(node.allocations().len(), 3);
    let mut c = node.conf("1.1.0");
    c["cni.dev/valid-attachments"] = json!([{ "containerID": keep.id, "ifname": "eth0" }]);
    node.invoke("GC", "", None, "", &c, &[])
        .unwrap()
        .expect_ok();
    let links = node.links_settled().unwrap();
    assert!(links.contains(&keep.host_veth()));
    assert!(!links.contains(&gone1.host_veth()));
    assert!(!links.contains(&gone2.host_veth()));
    let allocs = node.allocations();
    assert_eq!(allocs.len(), 1, "{allocs:?}");
    assert!(allocs[0].contains(&keep.id));
    keep.check().unwrap().expect_ok();
    // GC without the list refuses rather than removing everything.
    let inv = node
        .invoke("GC", "", None, "", &node.conf("1.1.0"), &[])
        .unwrap();
    assert_eq!(inv.code(), 7);
    gone1.deleted = true;
    gone2.deleted = true;
}

#[test]
fn concurrent_adds_never_share_an_address() {
    if !privileged("concurrent_adds_never_share_an_address") {
        return;
    }
    let node = Node::new("10.55.0.0/24").unwrap();
    let pods: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..24).map(|_| s.spawn(|| node.add_pod("1.1.0"))).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect()
    });
    let ips: HashSet<IpAddr> = pods.iter().map(|p| p.ip()).collect();
    assert_eq!(ips.len(), pods.len(), "duplicate address handed out");
    assert_eq!(node.allocations().len(), pods.len());
    drop(pods);
    assert!(node.allocations().is_empty());
}

#[test]
fn second_add_for_the_same_interface_fails_and_keeps_the_first() {
    if !privileged("second_add_for_the_same_interface_fails_and_keeps_the_first") {
        return;
    }
    let node = Node::new("10.56.0.0/24").unwrap();
    let pod = node.add_pod("1.1.0").unwrap();
    let inv = node
        .invoke(
            "ADD",
            &pod.id,
            Some(&pod.ns.path()),
            "eth0",
            &node.conf("1.1.0"),
            &[],
        )
        .unwrap();
    assert_eq!(inv.code(), 104, "{}", inv.stdout);
    pod.check().unwrap().expect_ok();
    assert_eq!(node.allocations().len(), 1);
}

#[test]
fn exhausted_range_fails_cleanly_and_status_says_so() {
    if !privileged("exhausted_range_fails_cleanly_and_status_says_so") {
        return;
    }
    let node = Node::new("10.57.0.0/30").unwrap();
    node.invoke("STATUS", "", None, "", &node.conf("1.1.0"), &[])
        .unwrap()
        .expect_ok();
    let a = node.add_pod("1.1.0").unwrap();
    let b = node.add_pod("1.1.0").unwrap();
    assert_ne!(a.ip(), b.ip());
    let before = node.links().unwrap();
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
    assert!(inv.json()["msg"].as_str().unwrap().contains("exhausted"));
    assert_eq!(node.links().unwrap(), before, "a failed ADD left links");
    assert!(!ns.exec("ip link show").unwrap().contains("eth0"));
    assert_eq!(node.allocations().len(), 2);
    let st = node
        .invoke("STATUS", "", None, "", &node.conf("1.1.0"), &[])
        .unwrap();
    assert_eq!(st.code(), 50);
}

#[test]
fn status_reports_missing_bpffs() {
    if !privileged("status_reports_missing_bpffs") {
        return;
    }
    let node = Node::new("10.58.0.0/24").unwrap();
    let plain = TempDir::new("nobpf").unwrap();
    let mut c = node.conf("1.1.0");
    c["bpffsRoot"] = json!(plain.path().join("ferrite"));
    let st = node.invoke("STATUS", "", None, "", &c, &[]).unwrap();
    assert_eq!(st.code(), 50);
    // And ADD refuses with the datapath error, leaving nothing behind.
    let before = node.links().unwrap();
    let ns = Netns::new("p").unwrap();
    let inv = node
        .invoke("ADD", &unique("c"), Some(&ns.path()), "eth0", &c, &[])
        .unwrap();
    assert_eq!(inv.code(), 103, "{}", inv.stdout);
    assert_eq!(node.links().unwrap(), before);
    assert!(node.allocations().is_empty());
}

#[test]
fn bad_inputs_get_clear_errors_and_change_nothing() {
    if !privileged("bad_inputs_get_clear_errors_and_change_nothing") {
        return;
    }
    let node = Node::new("10.59.0.0/24").unwrap();
    let ns = Netns::new("p").unwrap();
    let good = node.conf("1.1.0");
    let with = |k: &str, v: Value| {
        let mut c = good.clone();
        c[k] = v;
        serde_json::to_vec(&c).unwrap()
    };
    let netns = ns.path().display().to_string();
    let long_id = "a".repeat(300);
    // (what, stdin, extra environment, expected code)
    type Case<'a> = (&'a str, Vec<u8>, Vec<(&'a str, &'a str)>, u64);
    let cases: Vec<Case> = vec![
        ("malformed json", b"{\"cniVersion\":".to_vec(), vec![], 6),
        (
            "unsupported version",
            with("cniVersion", json!("0.1.0")),
            vec![],
            1,
        ),
        (
            "network name escapes",
            with("name", json!("../../etc")),
            vec![],
            7,
        ),
        (
            "bad subnet",
            with("ipam", json!({"ranges": [[{"subnet": "10.0.0/24"}]]})),
            vec![],
            7,
        ),
        ("mtu wrong type", with("mtu", json!("big")), vec![], 7),
        ("bigTcp wrong type", with("bigTcp", json!("yes")), vec![], 7),
        (
            "container id escapes",
            serde_json::to_vec(&good).unwrap(),
            vec![("CNI_CONTAINERID", "../../x")],
            4,
        ),
        (
            "container id too long",
            serde_json::to_vec(&good).unwrap(),
            vec![("CNI_CONTAINERID", long_id.as_str())],
            4,
        ),
        (
            "ifname too long",
            serde_json::to_vec(&good).unwrap(),
            vec![("CNI_IFNAME", "eth0123456789abc")],
            4,
        ),
        (
            "ifname with slash",
            serde_json::to_vec(&good).unwrap(),
            vec![("CNI_IFNAME", "a/b")],
            4,
        ),
        (
            "missing netns",
            serde_json::to_vec(&good).unwrap(),
            vec![("CNI_NETNS", "")],
            4,
        ),
        (
            "netns not a namespace",
            serde_json::to_vec(&good).unwrap(),
            vec![("CNI_NETNS", "/etc/hostname")],
            4,
        ),
        (
            "bad CNI_ARGS",
            serde_json::to_vec(&good).unwrap(),
            vec![("CNI_ARGS", "IP=300.1.1.1")],
            4,
        ),
        (
            "static IP outside range",
            serde_json::to_vec(&good).unwrap(),
            vec![("CNI_ARGS", "IgnoreUnknown=1;IP=10.99.0.5")],
            102,
        ),
        (
            "bad command",
            serde_json::to_vec(&good).unwrap(),
            vec![("CNI_COMMAND", "EXPLODE")],
            4,
        ),
    ];
    let links_before = node.links().unwrap();
    for (what, stdin, env, code) in cases {
        let mut envs: Vec<(&str, &str)> = vec![("CNI_NETNS", netns.as_str())];
        envs.extend(env.iter().copied());
        let id = unique("c");
        let inv = node
            .invoke_raw("ADD", &id, Some(&ns.path()), "eth0", &stdin, &envs)
            .unwrap();
        assert!(!inv.ok, "{what}: accepted");
        assert_eq!(inv.json()["code"], code, "{what}: {}", inv.stdout);
        assert_eq!(node.links().unwrap(), links_before, "{what}: links changed");
        assert!(node.allocations().is_empty(), "{what}: address held");
        assert!(
            !ns.exec("ip -o link show").unwrap().contains("eth0"),
            "{what}: pod interface left"
        );
    }
    // Nothing escaped the state directory.
    assert!(!std::path::Path::new("/etc/ipam").exists());
}

#[test]
fn static_address_from_cni_args() {
    if !privileged("static_address_from_cni_args") {
        return;
    }
    let node = Node::new("10.60.0.0/24").unwrap();
    let ns = Netns::new("p").unwrap();
    let id = unique("c");
    let inv = node
        .invoke(
            "ADD",
            &id,
            Some(&ns.path()),
            "eth0",
            &node.conf("1.0.0"),
            &[("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=x;IP=10.60.0.77")],
        )
        .unwrap();
    inv.expect_ok();
    assert_eq!(inv.json()["ips"][0]["address"], "10.60.0.77/32");
    // Taken now: another container asking for it is refused.
    let ns2 = Netns::new("p").unwrap();
    let inv2 = node
        .invoke(
            "ADD",
            &unique("c"),
            Some(&ns2.path()),
            "eth0",
            &node.conf("1.0.0"),
            &[("CNI_ARGS", "IP=10.60.0.77")],
        )
        .unwrap();
    assert_eq!(inv2.code(), 102);
    node.invoke("DEL", &id, None, "eth0", &node.conf("1.0.0"), &[])
        .unwrap()
        .expect_ok();
    assert!(node.allocations().is_empty());
}

#[test]
fn delegated_ipam_host_local() {
    if !privileged("delegated_ipam_host_local") {
        return;
    }
    let mut node = Node::new("unused").unwrap();
    let data = TempDir::new("hl").unwrap();
    node.extra = json!({
        "ipam": {
            "type": "host-local",
            "ranges": [[{ "subnet": "10.61.0.0/24" }]],
            "dataDir": data.path(),
        }
    });
    let mut a = node.add_pod("1.0.0").unwrap();
    let b = node.add_pod("1.0.0").unwrap();
    assert!(a.ip().to_string().starts_with("10.61.0."));
    assert!(crate::harness::tcp_echo(&a.ns, a.ip(), &b.ns, 1 << 16).unwrap() == 1 << 16);
    a.check().unwrap().expect_ok();
    a.del().unwrap().expect_ok();
    let held = std::fs::read_dir(data.path().join(&node.name))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("10.61."))
        .count();
    assert_eq!(held, 1, "host-local should hold only b's address");
}
