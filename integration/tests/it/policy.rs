//! NetworkPolicy on real pods: ADD starts an endpoint in a namespace with
//! policies closed ("policy pending") and tells the agent; rules the agent
//! would write (written here straight into the maps) hold for IPv4 and
//! IPv6 alike, replies of allowed flows pass, and DEL forgets it all.

use std::net::IpAddr;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use ferrite_datapath::policy::{encode, Cidr, EndpointPolicy, Peers, Ports, Rule, RuleSetRef};
use ferrite_datapath::Datapath;
use serde_json::json;

use crate::harness::{privileged, unique, Netns, Node, Pod};

/// ADD with the pod's namespace and name in CNI_ARGS, as kubelet's runtime
/// passes them.
fn add_k8s_pod<'a>(node: &'a Node, namespace: &str, name: &str) -> Pod<'a> {
    let ns = Netns::new("p").unwrap();
    let id = unique("c");
    let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name}");
    let inv = node
        .invoke(
            "ADD",
            &id,
            Some(&ns.path()),
            "eth0",
            &node.conf("1.1.0"),
            &[("CNI_ARGS", &args)],
        )
        .unwrap();
    assert!(
        inv.ok,
        "ADD {namespace}/{name}: {} {}",
        inv.stdout, inv.stderr
    );
    Pod {
        node,
        ns,
        id,
        result: inv.json(),
        conf: node.conf("1.1.0"),
        deleted: false,
    }
}

fn ifindex(node: &Node, dev: &str) -> u32 {
    let out = node
        .ns
        .exec(&format!("cat /sys/class/net/{dev}/ifindex"))
        .unwrap();
    out.trim().parse().unwrap()
}

fn ping(from: &Netns, to: IpAddr) -> bool {
    let six = if to.is_ipv6() { "-6 " } else { "" };
    from.exec_status(&format!("busybox ping {six}-c 1 -W 1 {to}"))
}

/// The drops of reason `reason` on the endpoint `ip`, from `ferrite stats`.
fn drops(node: &Node, ip: IpAddr, reason: &str) -> u64 {
    let stats = node.stats().unwrap();
    let row = stats
        .lines()
        .find(|l| l.split_whitespace().next() == Some(&ip.to_string()))
        .unwrap_or_else(|| panic!("no row for {ip} in\n{stats}"));
    row.split_whitespace()
        .last()
        .unwrap()
        .split(',')
        .find_map(|d| d.strip_prefix(&format!("{reason}=")))
        .map_or(0, |n| n.parse().unwrap())
}

#[test]
fn pending_from_add_then_rules_for_both_families() {
    if !privileged("pending_from_add_then_rules_for_both_families") {
        return;
    }
    let mut node = Node::new("10.73.0.0/24").unwrap();
    node.extra = json!({
        "ipam": { "ranges": [[{ "subnet": "10.73.0.0/24" }], [{ "subnet": "fd00:73::/64" }]] }
    });
    // The first pod loads the datapath; its namespace has no policy.
    let a = add_k8s_pod(&node, "open", "a");
    let root = node.bpffs.path().join("ferrite");
    let dp = Datapath::open(&root).unwrap().expect("loaded by ADD");
    let maps = dp.policy_maps().unwrap();
    let a_if = ifindex(&node, &a.host_veth());
    assert_eq!(maps.endpoint(a_if).unwrap(), None, "no policy in 'open'");
    assert!(maps
        .pod_ids()
        .unwrap()
        .contains(&(a_if, "open".into(), "a".into())));

    // The agent says "team" has policies, and listens for ADD's reports.
    maps.set_policy_namespaces(&["team".to_string()].into())
        .unwrap();
    let sock = UnixDatagram::bind(node.state.path().join("agent.sock")).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();

    let mut b = add_k8s_pod(&node, "team", "b");
    let c = add_k8s_pod(&node, "open", "c");
    let b_if = ifindex(&node, &b.host_veth());
    let mut report = [0u8; 64];
    let n = sock.recv(&mut report).unwrap();
    assert_eq!(n, 16, "ifindex, a time, flags");
    assert_eq!(u32::from_ne_bytes(report[..4].try_into().unwrap()), b_if);
    assert!(u64::from_ne_bytes(report[4..12].try_into().unwrap()) > 0);
    assert_eq!(report[12..16], 1u32.to_ne_bytes(), "pending");
    assert_eq!(
        maps.endpoint(b_if).unwrap(),
        Some(EndpointPolicy::PENDING),
        "b starts closed"
    );
    assert_eq!(maps.endpoint(ifindex(&node, &c.host_veth())).unwrap(), None);

    let (a_ips, b_ips, c_ips) = (a.ips(), b.ips(), c.ips());
    assert_eq!(b_ips.len(), 2, "dual stack: {b_ips:?}");
    for ip in &b_ips {
        assert!(!ping(&a.ns, *ip), "a reached pending b at {ip}");
    }
    assert!(!ping(&b.ns, a_ips[0]), "pending b sent to a");
    assert!(drops(&node, b_ips[0], "POLICY_PENDING") >= 3);

    // Programmed: ingress from a only, on every port; egress open.
    let rules = vec![Rule {
        peers: Peers::Some(a_ips.iter().map(|ip| Cidr::host(*ip)).collect()),
        ports: Ports::All,
    }];
    let set = encode(&rules).unwrap();
    maps.write_rule_set(7, &set).unwrap();
    maps.set_endpoint(
        b_if,
        &EndpointPolicy {
            ingress: Some(RuleSetRef {
                id: 7,
                words: set.words,
            }),
            egress: None,
            pending: false,
        },
    )
    .unwrap();
    for (i, ip) in b_ips.iter().enumerate() {
        assert!(ping(&a.ns, *ip), "a -> b {ip}");
        let before = drops(&node, *ip, "POLICY_INGRESS");
        assert!(!ping(&c.ns, *ip), "c -> b {ip} is not allowed");
        assert!(drops(&node, *ip, "POLICY_INGRESS") > before);
        // b's own flows are tracked: c's replies come back in.
        assert!(ping(&b.ns, c_ips[i]), "b -> c {} and its reply", c_ips[i]);
    }
    assert!(maps.conntrack_len().unwrap() >= 4);

    // The operator's view: b's rules as the maps hold them.
    let view = node
        .ferrite(&["policy", "--bpffs-root", root.to_str().unwrap()])
        .unwrap();
    let b_block: Vec<&str> = view
        .lines()
        .skip_while(|l| !l.starts_with(&format!("endpoint {b_if} team/b ")))
        .take(4)
        .collect();
    assert_eq!(b_block.len(), 4, "{view}");
    assert_eq!(b_block[1], "  ingress: rule set 7, 1 rules", "{view}");
    assert!(
        b_block[2].starts_with(&format!(
            "    0: from {}/32, {}/128; ports any",
            a_ips[0], a_ips[1]
        )),
        "{view}"
    );
    assert_eq!(b_block[3], "  egress: not isolated (everything allowed)");
    assert!(view.contains("namespaces with policies (new pods there start pending): team"));

    // A pod whose policy the agent computed ahead starts with it.
    let computed = EndpointPolicy {
        ingress: Some(RuleSetRef {
            id: 7,
            words: set.words,
        }),
        egress: None,
        pending: false,
    };
    assert!(maps.set_pod_policy("team", "d", &computed).unwrap());
    let d = add_k8s_pod(&node, "team", "d");
    let d_if = ifindex(&node, &d.host_veth());
    let n = sock.recv(&mut report).unwrap();
    assert_eq!(n, 16);
    assert_eq!(u32::from_ne_bytes(report[..4].try_into().unwrap()), d_if);
    assert_eq!(report[12..16], 0u32.to_ne_bytes(), "not pending");
    assert_eq!(maps.endpoint(d_if).unwrap(), Some(computed));
    assert!(ping(&a.ns, d.ips()[0]), "a -> d from its first packet");
    assert!(!ping(&c.ns, d.ips()[0]), "c -> d is not allowed");

    // DEL forgets the endpoint's policy and its pod.
    assert!(b.del().unwrap().ok);
    assert_eq!(maps.endpoint(b_if).unwrap(), None);
    assert!(!maps.pod_ids().unwrap().iter().any(|(i, _, _)| *i == b_if));
}
