//! The agent's NetworkPolicy state at scale, measured in this process:
//! ENDPOINTS local pods (default 1,000) in 10 namespaces, each selected by
//! 10 policies of 10 ingress rules (100 rules an endpoint; a rule admits
//! the pods of one label on one port), compiled and programmed into maps
//! kept in memory. Prints resident memory (VmRSS, VmHWM) before and after,
//! the sync's time, and the rule sets and entries it wrote.
//!
//!     cargo run --release -p ferrite-agent --example policy_scale [-- ENDPOINTS]

// A tool run by hand: its report is its stdout.
#![allow(clippy::print_stdout)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use ferrite_agent::policy::compile::View;
use ferrite_agent::policy::engine::{Engine, PolicyTarget};
use ferrite_agent::policy::model::{NamespaceInfo, PodInfo, PolicyInfo};
use ferrite_datapath::policy::{Encoded, EndpointPolicy};
use ferrite_datapath::DatapathError;

#[derive(Default)]
struct Maps {
    endpoints: Vec<(IpAddr, u32)>,
    pod_ids: Vec<(u32, String, String)>,
    eppol: BTreeMap<u32, EndpointPolicy>,
    podpol: BTreeMap<(String, String), EndpointPolicy>,
    sets: BTreeMap<u32, Encoded>,
}

impl PolicyTarget for Maps {
    fn endpoints(&self) -> Result<Vec<(IpAddr, u32)>, DatapathError> {
        Ok(self.endpoints.clone())
    }
    fn pod_ids(&self) -> Result<Vec<(u32, String, String)>, DatapathError> {
        Ok(self.pod_ids.clone())
    }
    fn endpoint_policies(&self) -> Result<Vec<(u32, EndpointPolicy)>, DatapathError> {
        Ok(self.eppol.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn write_rule_set(&mut self, id: u32, set: &Encoded) -> Result<(), DatapathError> {
        self.sets.insert(id, set.clone());
        Ok(())
    }
    fn remove_rule_set(&mut self, id: u32, _: &Encoded) -> Result<(), DatapathError> {
        self.sets.remove(&id);
        Ok(())
    }
    fn remove_rule_sets_except(&mut self, keep: &BTreeSet<u32>) -> Result<usize, DatapathError> {
        let before = self.sets.len();
        self.sets.retain(|id, _| keep.contains(id));
        Ok(before - self.sets.len())
    }
    fn set_endpoint(&mut self, ifindex: u32, p: &EndpointPolicy) -> Result<(), DatapathError> {
        self.eppol.insert(ifindex, *p);
        Ok(())
    }
    fn remove_endpoint(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        self.eppol.remove(&ifindex);
        Ok(())
    }
    fn set_policy_namespaces(&mut self, _: &BTreeSet<String>) -> Result<(), DatapathError> {
        Ok(())
    }
    fn pod_policies(&self) -> Result<Vec<(String, String, EndpointPolicy)>, DatapathError> {
        Ok(self
            .podpol
            .iter()
            .map(|((n, p), v)| (n.clone(), p.clone(), *v))
            .collect())
    }
    fn set_pod_policy(
        &mut self,
        ns: &str,
        name: &str,
        p: &EndpointPolicy,
    ) -> Result<(), DatapathError> {
        self.podpol.insert((ns.into(), name.into()), *p);
        Ok(())
    }
    fn remove_pod_policy(&mut self, ns: &str, name: &str) -> Result<(), DatapathError> {
        self.podpol.remove(&(ns.into(), name.into()));
        Ok(())
    }
}

fn status(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let endpoints: u32 = std::env::args()
        .nth(1)
        .map_or(1000, |a| a.parse().expect("ENDPOINTS"));
    let rss0 = status("VmRSS");
    let mut view = View::default();
    let mut maps = Maps::default();
    for n in 0..10 {
        let ns = format!("ns{n}");
        view.namespaces.insert(
            ns.clone(),
            NamespaceInfo {
                name: ns.clone(),
                labels: [("team".to_string(), format!("t{n}"))].into(),
            },
        );
        for p in 0..10 {
            let rules: Vec<serde_json::Value> = (0..10)
                .map(|r| {
                    serde_json::json!({
                        "from": [{"podSelector": {"matchLabels": {"app": format!("a{}", (p * 10 + r) % 50)}}}],
                        "ports": [{"protocol": "TCP", "port": 8000 + p * 10 + r}]
                    })
                })
                .collect();
            let np = serde_json::json!({
                "metadata": {"namespace": ns, "name": format!("p{p}")},
                "spec": {"podSelector": {}, "ingress": rules}
            });
            let info = PolicyInfo::from_api(&serde_json::from_value(np).expect("policy"));
            view.policies.insert((ns.clone(), format!("p{p}")), info);
        }
    }
    for i in 0..endpoints {
        let ns = format!("ns{}", i % 10);
        let name = format!("pod-{i}");
        let ip = IpAddr::V4(Ipv4Addr::from(0x0af4_0000 + i + 2));
        view.pods.insert(
            (ns.clone(), name.clone()),
            PodInfo {
                namespace: ns.clone(),
                name: name.clone(),
                node: Some("n1".into()),
                labels: [("app".to_string(), format!("a{}", i % 50))].into(),
                ips: vec![ip],
                host_network: false,
                ports: vec![],
            },
        );
        maps.endpoints.push((ip, 100 + i));
        maps.pod_ids.push((100 + i, ns, name));
    }
    let rss1 = status("VmRSS");
    let t0 = Instant::now();
    let mut engine = Engine::new("n1");
    let report = engine.sync(&mut view, &mut maps).expect("sync");
    let took = t0.elapsed();
    let t1 = Instant::now();
    engine.sync(&mut view, &mut maps).expect("sync");
    let again = t1.elapsed();
    let rss2 = status("VmRSS");
    let entries: usize = maps
        .sets
        .values()
        .map(|s| s.ports.len() + s.peers.len())
        .sum();
    println!(
        "{endpoints} endpoints x 100 rules: {} programmed, {} rule sets, {entries} trie entries",
        report.programmed, report.rule_sets
    );
    println!(
        "first sync {:.1} ms, a sync with nothing to change {:.1} ms",
        took.as_secs_f64() * 1e3,
        again.as_secs_f64() * 1e3
    );
    println!(
        "VmRSS: {rss0} KiB at start, {rss1} KiB with the view, {rss2} KiB after the syncs (VmHWM {} KiB)",
        status("VmHWM")
    );
}
