//! containerd's CRI plugin drives ferrite the way a kubelet-managed node does.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use anyhow::Result;
use k8s_cri::v1::PortMapping;
use serde_json::json;

use crate::cri::{Containerd, PodSpec, Sandbox};
use crate::harness::{assert_clean, ping, privileged, serial, Network};

/// The shipped conflist's subnet; each test has its own node namespace.
const SUBNET: &str = "10.244.1.0/24";

/// A ferrite network with the shipped conflist under the name containerd
/// picks (the first in sort order).
fn network() -> Result<Network> {
    let net = Network::new(SUBNET)?;
    net.write_conf("10-ferrite.conflist", &net.conflist())?;
    Ok(net)
}

fn run_pods(ctd: &Containerd, n: usize) -> Result<Vec<Sandbox>> {
    (0..n)
        .map(|i| ctd.run_pod(&format!("pod{i}"), &PodSpec::default()))
        .collect()
}

#[test]
fn containerd_pods_get_ferrite_addresses() -> Result<()> {
    if !privileged("containerd_pods_get_ferrite_addresses") {
        return Ok(());
    }
    let _serial = serial();
    let net = network()?;
    let ctd = Containerd::start(&net)?;
    let t = Instant::now();
    let pods = run_pods(&ctd, 3)?;
    eprintln!("3 pods in {:?}", t.elapsed());
    let ips: HashSet<_> = pods.iter().map(|p| p.ip).collect();
    assert_eq!(ips.len(), 3, "distinct addresses: {pods:?}");
    for p in &pods {
        assert!(net.contains(p.ip), "{} outside {SUBNET}", p.ip);
        // The CNI result containerd kept is ferrite's.
        let cni = &p.info["cniResult"];
        assert!(
            cni.to_string().contains(&p.ip.to_string()),
            "containerd's cniResult lacks {}: {cni}",
            p.ip
        );
    }
    assert_eq!(net.host_veths()?.len(), 3);
    assert_eq!(net.allocations().len(), 3, "{:?}", net.allocations());
    for p in &pods {
        ctd.remove_pod(&p.id)?;
    }
    assert_clean(&net)
}

#[test]
fn containerd_pods_reach_each_other_through_the_fast_path() -> Result<()> {
    if !privileged("containerd_pods_reach_each_other_through_the_fast_path") {
        return Ok(());
    }
    let _serial = serial();
    let net = network()?;
    let ctd = Containerd::start(&net)?;
    let pods = run_pods(&ctd, 3)?;
    for (i, a) in pods.iter().enumerate() {
        let b = &pods[(i + 1) % pods.len()];
        assert!(ping(&a.netns, b.ip), "{} cannot reach {}", a.ip, b.ip);
    }
    for p in &pods {
        let redirected = net.redirected(p.ip)?;
        assert!(
            redirected >= 2,
            "{}: {redirected} packets took the fast path: {:?}",
            p.ip,
            net.stats()?
        );
    }
    let ids: Vec<String> = pods.iter().map(|p| p.id.clone()).collect();
    ctd.remove_pods(&ids)?;
    assert_clean(&net)
}

#[test]
fn containerd_stop_and_remove_leave_nothing() -> Result<()> {
    if !privileged("containerd_stop_and_remove_leave_nothing") {
        return Ok(());
    }
    let _serial = serial();
    let net = network()?;
    let ctd = Containerd::start(&net)?;
    let pods = run_pods(&ctd, 2)?;
    let veths = net.host_veths()?;
    assert_eq!(veths.len(), 2);
    for p in &pods {
        ctd.remove_pod(&p.id)?;
        assert!(!p.netns.exists(), "{} still there", p.netns.display());
    }
    assert_clean(&net)?;
    // No pin names a pod: what remains in the bpffs is the node's datapath.
    let pins = crate::harness::sh(&format!("find {}", net.bpffs_root().display()))?;
    for p in &pods {
        assert!(!pins.contains(&p.id[..12]), "pin of {} left: {pins}", p.id);
        assert!(
            !pins.contains(&p.ip.to_string()),
            "pin of {} left: {pins}",
            p.ip
        );
    }
    for v in &veths {
        assert!(!pins.contains(v.as_str()), "pin of {v} left: {pins}");
    }
    assert!(ctd.list_pods()?.is_empty());
    Ok(())
}

#[test]
fn containerd_churn_of_50_pods_leaves_the_address_store_empty() -> Result<()> {
    if !privileged("containerd_churn_of_50_pods_leaves_the_address_store_empty") {
        return Ok(());
    }
    let _serial = serial();
    let net = network()?;
    let ctd = Containerd::start(&net)?;
    let t = Instant::now();
    for round in 0..10 {
        let ids = ctd.run_pods(&format!("churn{round}"), 5)?;
        assert_eq!(net.allocations().len(), 5, "round {round}");
        ctd.remove_pods(&ids)?;
    }
    eprintln!("50 pods created and removed in {:?}", t.elapsed());
    assert_clean(&net)?;
    let adds = net.calls().iter().filter(|c| c.command() == "ADD").count();
    assert_eq!(adds, 50);
    let failed: Vec<String> = net
        .calls()
        .iter()
        .filter(|c| c.rc != 0)
        .map(|c| c.describe())
        .collect();
    assert!(failed.is_empty(), "failed calls: {failed:?}");
    Ok(())
}

#[test]
fn containerd_pods_survive_a_containerd_restart() -> Result<()> {
    if !privileged("containerd_pods_survive_a_containerd_restart") {
        return Ok(());
    }
    let _serial = serial();
    let net = network()?;
    let mut ctd = Containerd::start(&net)?;
    let pods = run_pods(&ctd, 2)?;
    assert!(ping(&pods[0].netns, pods[1].ip));
    ctd.restart()?;
    for p in &pods {
        let now = ctd.status(&p.id)?;
        assert_eq!(now.ip, p.ip, "address changed across the restart");
    }
    assert!(
        ping(&pods[0].netns, pods[1].ip),
        "no connectivity after restart"
    );
    assert!(ping(&pods[1].netns, pods[0].ip));
    let before = net.calls().len();
    // A pod started after the restart joins the same network.
    let third = ctd.run_pod("after", &PodSpec::default())?;
    assert!(ping(&third.netns, pods[0].ip));
    assert!(net.calls().len() > before);
    for p in pods.iter().chain([&third]) {
        ctd.remove_pod(&p.id)?;
    }
    assert_clean(&net)
}

/// What containerd sends ferrite, kept for the record (run with
/// `--nocapture`): env, CNI_ARGS, stdin keys and runtimeConfig when ferrite
/// declares capabilities.
#[test]
fn containerd_calls_as_recorded() -> Result<()> {
    if !privileged("containerd_calls_as_recorded") {
        return Ok(());
    }
    let _serial = serial();
    let net = Network::new(SUBNET)?;
    let mut conf = net.conflist();
    conf["plugins"][0]["capabilities"] =
        json!({ "portMappings": true, "bandwidth": true, "ipRanges": true });
    net.write_conf("10-ferrite.conflist", &conf)?;
    let ctd = Containerd::start(&net)?;
    let spec = PodSpec {
        port_mappings: vec![PortMapping {
            protocol: 0,
            container_port: 8080,
            host_port: 18080,
            host_ip: String::new(),
        }],
        annotations: HashMap::from([(
            "kubernetes.io/ingress-bandwidth".to_string(),
            "10M".to_string(),
        )]),
    };
    let pod = ctd.run_pod("recorded", &spec)?;
    ctd.remove_pod(&pod.id)?;
    assert_clean(&net)?;
    let calls = net.calls();
    for c in &calls {
        eprintln!("containerd -> ferrite: {}", c.describe());
    }
    for w in net.log_warnings() {
        eprintln!("ferrite warned: {w}");
    }
    let adds: Vec<_> = calls.iter().filter(|c| c.command() == "ADD").collect();
    let dels: Vec<_> = calls.iter().filter(|c| c.command() == "DEL").collect();
    assert_eq!(adds.len(), 1);
    let add = adds[0];
    assert_eq!(add.rc, 0);
    assert_eq!(add.var("CNI_CONTAINERID"), pod.id);
    assert_eq!(add.var("CNI_IFNAME"), "eth0");
    assert_eq!(add.var("CNI_NETNS"), pod.netns.display().to_string());
    assert!(add.var("CNI_ARGS").contains("K8S_POD_NAME=recorded"));
    assert!(add.stdin["prevResult"].is_null());
    // ferrite's result, in the version the conflist asked for.
    let result: serde_json::Value = serde_json::from_str(&add.stdout)?;
    assert_eq!(result["cniVersion"], add.stdin["cniVersion"]);
    eprintln!(
        "conflist cniVersion {}, sent {}, ferrite answered {}",
        conf["cniVersion"], add.stdin["cniVersion"], result["cniVersion"]
    );
    assert!(add.stdout.contains(&pod.ip.to_string()));
    let rc = &add.stdin["runtimeConfig"];
    // libcni passes containerd's Go structs: capitalised keys.
    assert_eq!(rc["portMappings"][0]["HostPort"], 18080, "{rc}");
    assert_eq!(rc["bandwidth"]["IngressRate"], 10_000_000, "{rc}");
    // StopPodSandbox tears the network down with the netns and prevResult;
    // RemovePodSandbox does it again with neither. Both must succeed.
    assert_eq!(dels.len(), 2);
    assert_eq!(dels[0].var("CNI_NETNS"), pod.netns.display().to_string());
    assert!(!dels[0].stdin["prevResult"].is_null());
    assert_eq!(dels[1].var("CNI_NETNS"), "");
    assert!(dels[1].stdin["prevResult"].is_null());
    assert!(dels.iter().all(|d| d.rc == 0), "a DEL failed");
    Ok(())
}
