// SPDX-License-Identifier: Apache-2.0
//! From the cluster's NetworkPolicies to one endpoint's rules, per
//! direction, in the form the datapath encodes (`ferrite_datapath::policy`).
//!
//! The semantics are networking.k8s.io/v1's: a pod selected by no policy
//! of a direction is not isolated in it; the policies that select it add
//! up; a rule admits one of its peers on one of its ports; named ports are
//! resolved per destination pod (ingress: the endpoint itself; egress:
//! each peer pod, so a rule splits by the number the name has there).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use ferrite_datapath::policy::{Cidr, Peers, PortRange, Ports, Rule};

use super::model::{
    Block, NamespaceInfo, PeerSpec, PodInfo, PolicyInfo, PortRef, PortSpec, RuleSpec,
};

/// What the engine knows of the cluster.
#[derive(Debug, Default)]
pub struct View {
    /// By (namespace, name).
    pub pods: BTreeMap<(String, String), PodInfo>,
    pub namespaces: BTreeMap<String, NamespaceInfo>,
    /// By (namespace, name).
    pub policies: BTreeMap<(String, String), PolicyInfo>,
    /// Within a batch ([`View::batch`]), the peers each rule names (by
    /// the rule's address), computed once: every endpoint a policy selects
    /// shares them. None outside a batch: computed every time.
    peers_of_rule: RefCell<Option<HashMap<usize, Peers>>>,
}

/// One endpoint's rules: None where it is not isolated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointRules {
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
    /// Policies that select it but cannot be expressed: their directions
    /// isolate it with nothing allowed from them ("namespace/name: why").
    pub failed: Vec<String>,
}

impl View {
    /// Runs `f` with each rule's peers computed once, for many endpoints
    /// of a view that does not change meanwhile (it cannot: `f` borrows it).
    pub fn batch<T>(&self, f: impl FnOnce(&Self) -> T) -> T {
        *self.peers_of_rule.borrow_mut() = Some(HashMap::new());
        let out = f(self);
        *self.peers_of_rule.borrow_mut() = None;
        out
    }

    /// Whether `namespace` has any NetworkPolicy.
    pub fn namespace_has_policies(&self, namespace: &str) -> bool {
        self.policies
            .range((namespace.to_owned(), String::new())..)
            .next()
            .is_some_and(|((ns, _), _)| ns == namespace)
    }

    fn namespace_labels(&self, ns: &str) -> Option<&super::model::Labels> {
        self.namespaces.get(ns).map(|n| &n.labels)
    }

    /// The pods a peer names, as seen from a policy in `policy_ns`.
    fn peer_pods<'a>(&'a self, peer: &'a PeerSpec, policy_ns: &'a str) -> Vec<&'a PodInfo> {
        let PeerSpec::Pods { pods, namespaces } = peer else {
            return Vec::new();
        };
        self.pods
            .values()
            .filter(|p| !p.host_network && !p.ips.is_empty())
            .filter(|p| match namespaces {
                None => p.namespace == policy_ns,
                Some(sel) => self
                    .namespace_labels(&p.namespace)
                    .is_some_and(|l| sel.matches(l)),
            })
            .filter(|p| pods.matches(&p.labels))
            .collect()
    }

    /// The rules for `pod`, which must be one of this view's pods.
    pub fn rules_for(&self, pod: &PodInfo) -> EndpointRules {
        let mut out = EndpointRules::default();
        for ((ns, name), policy) in self
            .policies
            .range((pod.namespace.clone(), String::new())..)
        {
            if ns != &pod.namespace {
                break;
            }
            if !policy.selects.matches(&pod.labels) {
                continue;
            }
            if let Some(why) = &policy.problem {
                out.failed.push(format!("{ns}/{name}: {why}"));
            }
            if let Some(rules) = &policy.ingress {
                let dir = out.ingress.get_or_insert_with(Vec::new);
                if policy.problem.is_none() {
                    for r in rules {
                        self.ingress_rule(pod, ns, r, dir);
                    }
                }
            }
            if let Some(rules) = &policy.egress {
                let dir = out.egress.get_or_insert_with(Vec::new);
                if policy.problem.is_none() {
                    for r in rules {
                        self.egress_rule(ns, r, dir);
                    }
                }
            }
        }
        if let Some(r) = out.ingress.as_mut() {
            normalise(r);
        }
        if let Some(r) = out.egress.as_mut() {
            normalise(r);
        }
        out
    }

    fn peers(&self, spec: &RuleSpec, policy_ns: &str) -> Peers {
        let key = spec as *const RuleSpec as usize;
        if let Some(p) = self
            .peers_of_rule
            .borrow()
            .as_ref()
            .and_then(|c| c.get(&key))
        {
            return p.clone();
        }
        let peers = self.compute_peers(spec, policy_ns);
        if let Some(cache) = self.peers_of_rule.borrow_mut().as_mut() {
            cache.insert(key, peers.clone());
        }
        peers
    }

    fn compute_peers(&self, spec: &RuleSpec, policy_ns: &str) -> Peers {
        let Some(list) = &spec.peers else {
            return Peers::All;
        };
        let mut cidrs = Vec::new();
        for peer in list {
            match peer {
                PeerSpec::Block(b) => cidrs.push(block(b)),
                PeerSpec::Pods { .. } => cidrs.extend(
                    self.peer_pods(peer, policy_ns)
                        .into_iter()
                        .flat_map(|p| p.ips.iter().copied().map(Cidr::host)),
                ),
            }
        }
        Peers::Some(cidrs)
    }

    fn ingress_rule(&self, pod: &PodInfo, policy_ns: &str, spec: &RuleSpec, out: &mut Vec<Rule>) {
        let ports = if spec.ports.is_empty() {
            Ports::All
        } else {
            let ranges: Vec<PortRange> = spec
                .ports
                .iter()
                .filter_map(|p| resolve(p, Some(pod)))
                .collect();
            if ranges.is_empty() {
                return; // only names this pod does not have
            }
            Ports::Some(ranges)
        };
        push(out, self.peers(spec, policy_ns), ports);
    }

    fn egress_rule(&self, policy_ns: &str, spec: &RuleSpec, out: &mut Vec<Rule>) {
        if spec.ports.is_empty() {
            push(out, self.peers(spec, policy_ns), Ports::All);
            return;
        }
        let (named, numbered): (Vec<&PortSpec>, Vec<&PortSpec>) = spec
            .ports
            .iter()
            .partition(|p| matches!(p.port, PortRef::Named(_)));
        let fixed: Vec<PortRange> = numbered.iter().filter_map(|p| resolve(p, None)).collect();
        if !fixed.is_empty() {
            push(out, self.peers(spec, policy_ns), Ports::Some(fixed));
        }
        if named.is_empty() {
            return;
        }
        // Named ports: the destination pods, grouped by what the names mean
        // in each. An ipBlock has no names: it matches none of them.
        let candidates: Vec<&PodInfo> = match &spec.peers {
            None => self
                .pods
                .values()
                .filter(|p| !p.host_network && !p.ips.is_empty())
                .collect(),
            Some(list) => list
                .iter()
                .flat_map(|peer| self.peer_pods(peer, policy_ns))
                .collect(),
        };
        let mut groups: BTreeMap<Vec<PortRange>, Vec<Cidr>> = BTreeMap::new();
        for pod in candidates {
            let mut ranges: Vec<PortRange> =
                named.iter().filter_map(|p| resolve(p, Some(pod))).collect();
            if ranges.is_empty() {
                continue;
            }
            ranges.sort();
            ranges.dedup();
            groups
                .entry(ranges)
                .or_default()
                .extend(pod.ips.iter().copied().map(Cidr::host));
        }
        for (ranges, cidrs) in groups {
            push(out, Peers::Some(cidrs), Ports::Some(ranges));
        }
    }
}

fn block(b: &Block) -> Cidr {
    Cidr {
        addr: b.addr,
        prefix: b.prefix,
        except: b.except.clone(),
    }
}

/// A port spec as a range, a name resolved in `pod`; None if unresolved.
fn resolve(p: &PortSpec, pod: Option<&PodInfo>) -> Option<PortRange> {
    let (first, last) = match &p.port {
        PortRef::Any => (0, u16::MAX),
        PortRef::Number { port, end } => (*port, *end),
        PortRef::Named(name) => {
            let n = pod?.named_port(name, p.proto)?;
            (n, n)
        }
    };
    Some(PortRange {
        proto: p.proto,
        first,
        last,
    })
}

/// Adds a rule unless it can match nothing.
fn push(out: &mut Vec<Rule>, peers: Peers, ports: Ports) {
    if matches!(&peers, Peers::Some(c) if c.is_empty()) {
        return;
    }
    out.push(Rule { peers, ports });
}

/// Sorted, duplicates gone, and rules with the same ports merged into one
/// (their peers joined): fewer rules, the same traffic.
fn normalise(rules: &mut Vec<Rule>) {
    let mut by_ports: BTreeMap<Ports, Option<Vec<Cidr>>> = BTreeMap::new();
    for mut r in rules.drain(..) {
        if let Ports::Some(ranges) = &mut r.ports {
            ranges.sort();
            ranges.dedup();
        }
        let slot = by_ports.entry(r.ports).or_insert_with(|| Some(Vec::new()));
        match (slot.as_mut(), r.peers) {
            (_, Peers::All) => *slot = None,
            (Some(cidrs), Peers::Some(more)) => cidrs.extend(more),
            (None, Peers::Some(_)) => {}
        }
    }
    for (ports, peers) in by_ports {
        let peers = match peers {
            None => Peers::All,
            Some(mut cidrs) => {
                cidrs.sort();
                cidrs.dedup();
                Peers::Some(cidrs)
            }
        };
        rules.push(Rule { peers, ports });
    }
}

/// Whether `rules` let `peer` talk on `port` of `proto`: the rules' meaning,
/// evaluated directly (tests check the compiler and the datapath with it).
pub fn admits(rules: &[Rule], peer: IpAddr, proto: u8, port: u16) -> bool {
    rules.iter().any(|r| {
        let port_ok = match &r.ports {
            Ports::All => true,
            Ports::Some(ranges) => ranges
                .iter()
                .any(|x| x.proto == proto && x.first <= port && port <= x.last),
        };
        let peer_ok = match &r.peers {
            Peers::All => true,
            Peers::Some(cidrs) => cidrs.iter().any(|c| {
                in_net(peer, c.addr, c.prefix) && !c.except.iter().any(|&(a, p)| in_net(peer, a, p))
            }),
        };
        port_ok && peer_ok
    })
}

fn in_net(ip: IpAddr, net: IpAddr, prefix: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let m = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(prefix))
            };
            u32::from(a) & m == u32::from(n) & m
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let m = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(prefix))
            };
            u128::from(a) & m == u128::from(n) & m
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::super::model::tests::labels;
    use super::super::model::{NamedPort, PROTO_TCP, PROTO_UDP};
    use super::*;
    use serde_json::json;

    fn pod(ns: &str, name: &str, ip: &str, l: &[(&str, &str)]) -> PodInfo {
        PodInfo {
            namespace: ns.into(),
            name: name.into(),
            node: Some("n1".into()),
            labels: labels(l),
            ips: vec![ip.parse().unwrap()],
            host_network: false,
            ports: vec![
                NamedPort {
                    name: "serve-80".into(),
                    proto: PROTO_TCP,
                    port: 80,
                },
                NamedPort {
                    name: "serve-81-udp".into(),
                    proto: PROTO_UDP,
                    port: 81,
                },
            ],
        }
    }

    fn view(policies: Vec<serde_json::Value>) -> View {
        let mut v = View::default();
        for (ns, l) in [("x", "ns-x"), ("y", "ns-y"), ("z", "ns-z")] {
            v.namespaces.insert(
                ns.into(),
                NamespaceInfo {
                    name: ns.into(),
                    labels: labels(&[("ns", l)]),
                },
            );
        }
        let mut n = 1;
        for ns in ["x", "y", "z"] {
            for p in ["a", "b", "c"] {
                let mut info = pod(ns, p, &format!("10.0.0.{n}"), &[("pod", p)]);
                if p == "c" {
                    // c serves its "serve-80" on 8080.
                    info.ports[0].port = 8080;
                }
                v.pods.insert((ns.into(), p.into()), info);
                n += 1;
            }
        }
        for p in policies {
            let info =
                super::super::model::PolicyInfo::from_api(&serde_json::from_value(p).unwrap());
            v.policies
                .insert((info.namespace.clone(), info.name.clone()), info);
        }
        v
    }

    fn ip(v: &View, ns: &str, p: &str) -> IpAddr {
        v.pods[&(ns.to_owned(), p.to_owned())].ips[0]
    }

    fn rules(v: &View, ns: &str, p: &str) -> EndpointRules {
        v.rules_for(&v.pods[&(ns.to_owned(), p.to_owned())])
    }

    #[test]
    fn unselected_pods_are_not_isolated_and_policies_add_up() {
        let v = view(vec![
            json!({"metadata": {"name": "deny", "namespace": "x"},
                   "spec": {"podSelector": {"matchLabels": {"pod": "a"}}}}),
            json!({"metadata": {"name": "allow-b", "namespace": "x"},
                   "spec": {"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}}),
        ]);
        let a = rules(&v, "x", "a");
        let ing = a.ingress.unwrap();
        assert!(admits(&ing, ip(&v, "x", "b"), PROTO_TCP, 80));
        assert!(!admits(&ing, ip(&v, "x", "c"), PROTO_TCP, 80));
        assert!(
            !admits(&ing, ip(&v, "y", "b"), PROTO_TCP, 80),
            "other namespace"
        );
        assert_eq!(a.egress, None);
        assert_eq!(rules(&v, "y", "a"), EndpointRules::default());
        assert!(v.namespace_has_policies("x") && !v.namespace_has_policies("y"));
    }

    #[test]
    fn namespace_and_pod_selectors_and_or() {
        let v = view(vec![json!({"metadata": {"name": "p", "namespace": "x"},
        "spec": {"podSelector": {}, "ingress": [{"from": [
            {"namespaceSelector": {"matchLabels": {"ns": "ns-y"}}, "podSelector": {"matchLabels": {"pod": "a"}}},
            {"namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "In", "values": ["ns-z"]}]}}
        ]}]}})]);
        let ing = rules(&v, "x", "b").ingress.unwrap();
        assert!(admits(&ing, ip(&v, "y", "a"), PROTO_TCP, 1));
        assert!(
            !admits(&ing, ip(&v, "y", "b"), PROTO_TCP, 1),
            "AND within a peer"
        );
        assert!(
            admits(&ing, ip(&v, "z", "c"), PROTO_TCP, 1),
            "OR across peers"
        );
        assert!(!admits(&ing, ip(&v, "x", "a"), PROTO_TCP, 1));
    }

    #[test]
    fn named_ports_resolve_per_destination() {
        let v = view(vec![
            json!({"metadata": {"name": "in", "namespace": "x"},
                   "spec": {"podSelector": {}, "ingress": [{"ports": [{"port": "serve-80"}]}]}}),
            json!({"metadata": {"name": "out", "namespace": "y"},
                   "spec": {"podSelector": {}, "policyTypes": ["Egress"],
                            "egress": [{"to": [{"namespaceSelector": {}}], "ports": [{"port": "serve-80"}]}]}}),
        ]);
        // Ingress: the name in the endpoint itself.
        let a = rules(&v, "x", "a").ingress.unwrap();
        assert!(admits(&a, ip(&v, "y", "b"), PROTO_TCP, 80));
        assert!(!admits(&a, ip(&v, "y", "b"), PROTO_TCP, 8080));
        let c = rules(&v, "x", "c").ingress.unwrap();
        assert!(admits(&c, ip(&v, "y", "b"), PROTO_TCP, 8080));
        assert!(!admits(&c, ip(&v, "y", "b"), PROTO_TCP, 80));
        // Egress: the name in each destination.
        let out = rules(&v, "y", "a").egress.unwrap();
        assert!(admits(&out, ip(&v, "x", "a"), PROTO_TCP, 80));
        assert!(!admits(&out, ip(&v, "x", "a"), PROTO_TCP, 8080));
        assert!(admits(&out, ip(&v, "z", "c"), PROTO_TCP, 8080));
        assert!(!admits(&out, ip(&v, "z", "c"), PROTO_TCP, 80));
    }

    #[test]
    fn ranges_blocks_and_merging() {
        let v = view(vec![json!({"metadata": {"name": "p", "namespace": "x"},
        "spec": {"podSelector": {}, "policyTypes": ["Egress"], "egress": [
            {"to": [{"ipBlock": {"cidr": "10.0.0.0/24", "except": ["10.0.0.4/30"]}}],
             "ports": [{"port": 80, "endPort": 90}]},
            {"to": [{"podSelector": {"matchLabels": {"pod": "b"}}}], "ports": [{"port": 80, "endPort": 90}]}
        ]}})]);
        let out = rules(&v, "x", "a").egress.unwrap();
        assert_eq!(out.len(), 1, "same ports: one rule");
        assert!(admits(&out, "10.0.0.9".parse().unwrap(), PROTO_TCP, 85));
        assert!(
            !admits(&out, "10.0.0.5".parse().unwrap(), PROTO_TCP, 85),
            "except"
        );
        assert!(!admits(&out, "10.0.0.9".parse().unwrap(), PROTO_TCP, 91));
        assert!(!admits(&out, "10.0.0.9".parse().unwrap(), PROTO_UDP, 85));
    }

    #[test]
    fn an_inexpressible_policy_fails_closed() {
        let v = view(vec![json!({"metadata": {"name": "bad", "namespace": "x"},
                   "spec": {"podSelector": {}, "ingress": [{"ports": [{"protocol": "ICMP"}]}]}})]);
        let a = rules(&v, "x", "a");
        assert_eq!(a.ingress, Some(vec![]));
        assert_eq!(a.failed.len(), 1);
        assert!(a.failed[0].starts_with("x/bad"));
    }
}
