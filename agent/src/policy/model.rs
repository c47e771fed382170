// SPDX-License-Identifier: Apache-2.0
//! What the policy engine keeps of Pods, Namespaces and NetworkPolicies:
//! only the fields that decide who may talk to whom, read once from the API
//! objects. A policy the datapath cannot express is kept with its problem,
//! so the pods it selects fail closed.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

pub type Labels = BTreeMap<String, String>;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_SCTP: u8 = 132;

/// One requirement of a label selector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Requirement {
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A label selector: every requirement must hold; none selects everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    pub requirements: Vec<Requirement>,
}

impl Selector {
    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }

    fn from_api(s: &LabelSelector) -> Result<Selector, String> {
        let mut requirements: Vec<Requirement> = s
            .match_labels
            .iter()
            .flatten()
            .map(|(k, v)| Requirement::In(k.clone(), vec![v.clone()]))
            .collect();
        for e in s.match_expressions.iter().flatten() {
            let values = e.values.clone().unwrap_or_default();
            requirements.push(match e.operator.as_str() {
                "In" => Requirement::In(e.key.clone(), values),
                "NotIn" => Requirement::NotIn(e.key.clone(), values),
                "Exists" => Requirement::Exists(e.key.clone()),
                "DoesNotExist" => Requirement::DoesNotExist(e.key.clone()),
                other => return Err(format!("label selector operator {other:?}")),
            });
        }
        Ok(Selector { requirements })
    }
}

/// A port as a policy names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortRef {
    /// Every port of the protocol.
    Any,
    /// `port` through `end` (the same for one port).
    Number { port: u16, end: u16 },
    /// A containerPort's name, resolved per destination pod.
    Named(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSpec {
    pub proto: u8,
    pub port: PortRef,
}

/// A CIDR with its excepts, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    pub addr: IpAddr,
    pub prefix: u8,
    pub except: Vec<(IpAddr, u8)>,
}

/// One entry of a rule's `from` or `to`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerSpec {
    /// Pods: those matching `pods` in the namespaces matching `namespaces`
    /// (None: the policy's own namespace).
    Pods {
        pods: Selector,
        namespaces: Option<Selector>,
    },
    Block(Block),
}

/// One ingress or egress rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleSpec {
    /// None: every peer (the field absent or empty).
    pub peers: Option<Vec<PeerSpec>>,
    /// Empty: every port of every protocol.
    pub ports: Vec<PortSpec>,
}

/// A NetworkPolicy, as far as the datapath is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyInfo {
    pub namespace: String,
    pub name: String,
    pub selects: Selector,
    /// None: the policy does not isolate for ingress.
    pub ingress: Option<Vec<RuleSpec>>,
    pub egress: Option<Vec<RuleSpec>>,
    /// Why the datapath cannot express it: the pods it selects fail closed
    /// in the directions it isolates.
    pub problem: Option<String>,
}

/// A containerPort with a name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct NamedPort {
    pub name: String,
    pub proto: u8,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub node: Option<String>,
    pub labels: Labels,
    pub ips: Vec<IpAddr>,
    pub host_network: bool,
    pub ports: Vec<NamedPort>,
}

impl PodInfo {
    pub fn from_api(pod: &Pod) -> PodInfo {
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let mut ips: Vec<IpAddr> = status
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|p| p.ip.parse().ok())
            .collect();
        if ips.is_empty() {
            ips.extend(
                status
                    .and_then(|s| s.pod_ip.as_ref())
                    .and_then(|ip| ip.parse::<IpAddr>().ok()),
            );
        }
        let mut ports: Vec<NamedPort> = spec
            .into_iter()
            .flat_map(|s| s.containers.iter())
            .flat_map(|c| c.ports.iter().flatten())
            .filter_map(|p| {
                Some(NamedPort {
                    name: p.name.clone()?,
                    proto: protocol(p.protocol.as_deref()).ok()?,
                    port: u16::try_from(p.container_port).ok()?,
                })
            })
            .collect();
        ports.sort();
        // A pod that has finished keeps no address worth allowing.
        let done = status
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|p| p == "Succeeded" || p == "Failed");
        PodInfo {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            node: spec.and_then(|s| s.node_name.clone()),
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            ips: if done { Vec::new() } else { ips },
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            ports,
        }
    }

    /// The number a named port has in this pod, for `proto`.
    pub fn named_port(&self, name: &str, proto: u8) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.name == name && p.proto == proto)
            .map(|p| p.port)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceInfo {
    pub name: String,
    pub labels: Labels,
}

impl NamespaceInfo {
    pub fn from_api(ns: &Namespace) -> NamespaceInfo {
        let name = ns.metadata.name.clone().unwrap_or_default();
        let mut labels = ns.metadata.labels.clone().unwrap_or_default();
        // Kubernetes 1.21+ sets it; older servers do not: selectors on it
        // must work the same everywhere.
        labels
            .entry("kubernetes.io/metadata.name".into())
            .or_insert_with(|| name.clone());
        NamespaceInfo { name, labels }
    }
}

fn protocol(p: Option<&str>) -> Result<u8, String> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(PROTO_TCP),
        "UDP" => Ok(PROTO_UDP),
        "SCTP" => Ok(PROTO_SCTP),
        other => Err(format!("protocol {other:?}")),
    }
}

fn port_spec(p: &NetworkPolicyPort) -> Result<PortSpec, String> {
    let proto = protocol(p.protocol.as_deref())?;
    let port = match (&p.port, p.end_port) {
        (None, None) => PortRef::Any,
        (None, Some(_)) => return Err("endPort without port".into()),
        (Some(IntOrString::String(name)), None) => PortRef::Named(name.clone()),
        (Some(IntOrString::String(_)), Some(_)) => return Err("endPort with a named port".into()),
        (Some(IntOrString::Int(n)), end) => {
            let port = u16::try_from(*n)
                .ok()
                .filter(|&p| p > 0)
                .ok_or_else(|| format!("port {n}"))?;
            let end = match end {
                None => port,
                Some(e) => u16::try_from(e)
                    .ok()
                    .filter(|&e| e >= port)
                    .ok_or_else(|| format!("endPort {e} below port {port}"))?,
            };
            PortRef::Number { port, end }
        }
    };
    Ok(PortSpec { proto, port })
}

fn cidr(text: &str) -> Result<(IpAddr, u8), String> {
    let net: ipnetwork::IpNetwork = text.parse().map_err(|e| format!("CIDR {text:?}: {e}"))?;
    Ok((net.network(), net.prefix()))
}

fn peer_spec(p: &NetworkPolicyPeer) -> Result<PeerSpec, String> {
    if let Some(b) = &p.ip_block {
        if p.pod_selector.is_some() || p.namespace_selector.is_some() {
            return Err("ipBlock with a selector in the same peer".into());
        }
        let (addr, prefix) = cidr(&b.cidr)?;
        let except = b
            .except
            .iter()
            .flatten()
            .map(|e| cidr(e))
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(PeerSpec::Block(Block {
            addr,
            prefix,
            except,
        }));
    }
    let namespaces = p
        .namespace_selector
        .as_ref()
        .map(Selector::from_api)
        .transpose()?;
    let pods = match &p.pod_selector {
        Some(s) => Selector::from_api(s)?,
        None if namespaces.is_some() => Selector::default(),
        None => return Err("a peer with neither selector nor ipBlock".into()),
    };
    Ok(PeerSpec::Pods { pods, namespaces })
}

fn rule_spec(
    peers: Option<&Vec<NetworkPolicyPeer>>,
    ports: Option<&Vec<NetworkPolicyPort>>,
) -> Result<RuleSpec, String> {
    let peers = match peers {
        Some(list) if !list.is_empty() => {
            Some(list.iter().map(peer_spec).collect::<Result<Vec<_>, _>>()?)
        }
        _ => None,
    };
    let ports = ports
        .into_iter()
        .flatten()
        .map(port_spec)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(RuleSpec { peers, ports })
}

impl PolicyInfo {
    pub fn from_api(np: &NetworkPolicy) -> PolicyInfo {
        let namespace = np.metadata.namespace.clone().unwrap_or_default();
        let name = np.metadata.name.clone().unwrap_or_default();
        let spec = np.spec.clone().unwrap_or_default();
        let types: Vec<String> = spec.policy_types.clone().unwrap_or_default();
        // Absent policyTypes: Ingress always, Egress when egress rules exist.
        let (isolates_in, isolates_out) = if types.is_empty() {
            (true, spec.egress.is_some())
        } else {
            (
                types.iter().any(|t| t == "Ingress"),
                types.iter().any(|t| t == "Egress"),
            )
        };
        let mut problem = None;
        let selects = spec
            .pod_selector
            .as_ref()
            .map(Selector::from_api)
            .transpose()
            .unwrap_or_else(|e| {
                problem = Some(e);
                None
            })
            .unwrap_or_default();
        let mut rules = |isolates: bool, list: Option<Vec<(Option<&Vec<_>>, Option<&Vec<_>>)>>| {
            if !isolates {
                return None;
            }
            let mut out = Vec::new();
            for (peers, ports) in list.unwrap_or_default() {
                match rule_spec(peers, ports) {
                    Ok(r) => out.push(r),
                    Err(e) => problem = Some(e),
                }
            }
            Some(out)
        };
        let ingress = rules(
            isolates_in,
            spec.ingress.as_ref().map(|v| {
                v.iter()
                    .map(|r| (r.from.as_ref(), r.ports.as_ref()))
                    .collect()
            }),
        );
        let egress = rules(
            isolates_out,
            spec.egress.as_ref().map(|v| {
                v.iter()
                    .map(|r| (r.to.as_ref(), r.ports.as_ref()))
                    .collect()
            }),
        );
        PolicyInfo {
            namespace,
            name,
            selects,
            ingress,
            egress,
            problem,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn selectors_follow_the_api_operators() {
        let s = Selector {
            requirements: vec![
                Requirement::In("app".into(), vec!["a".into(), "b".into()]),
                Requirement::NotIn("tier".into(), vec!["db".into()]),
                Requirement::Exists("team".into()),
                Requirement::DoesNotExist("legacy".into()),
            ],
        };
        assert!(s.matches(&labels(&[("app", "a"), ("team", "x")])));
        assert!(s.matches(&labels(&[("app", "b"), ("team", "x"), ("tier", "web")])));
        assert!(!s.matches(&labels(&[("app", "c"), ("team", "x")])));
        assert!(!s.matches(&labels(&[("app", "a"), ("team", "x"), ("tier", "db")])));
        assert!(!s.matches(&labels(&[("app", "a")])));
        assert!(!s.matches(&labels(&[("app", "a"), ("team", "x"), ("legacy", "")])));
        assert!(Selector::default().matches(&labels(&[])));
    }

    fn policy(json: serde_json::Value) -> PolicyInfo {
        PolicyInfo::from_api(&serde_json::from_value(json).unwrap())
    }

    #[test]
    fn policy_types_default_as_the_api_says() {
        let p = policy(serde_json::json!({
            "metadata": {"name": "p", "namespace": "x"},
            "spec": {"podSelector": {}}
        }));
        assert_eq!(p.ingress, Some(vec![]), "ingress isolated, nothing allowed");
        assert_eq!(p.egress, None);
        let p = policy(serde_json::json!({
            "metadata": {"name": "p", "namespace": "x"},
            "spec": {"podSelector": {}, "egress": [{}]}
        }));
        assert!(p.ingress.is_some() && p.egress.is_some());
        let p = policy(serde_json::json!({
            "metadata": {"name": "p", "namespace": "x"},
            "spec": {"podSelector": {}, "policyTypes": ["Egress"]}
        }));
        assert_eq!((p.ingress, p.egress), (None, Some(vec![])));
    }

    #[test]
    fn peers_and_ports_are_read_with_their_problems() {
        let p = policy(serde_json::json!({
            "metadata": {"name": "p", "namespace": "x"},
            "spec": {"podSelector": {"matchLabels": {"app": "a"}},
                "ingress": [{
                    "from": [
                        {"namespaceSelector": {"matchLabels": {"ns": "y"}}, "podSelector": {"matchLabels": {"pod": "b"}}},
                        {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}
                    ],
                    "ports": [{"port": 80}, {"protocol": "UDP", "port": "dns"}, {"port": 8000, "endPort": 8080}]
                }]}
        }));
        assert_eq!(p.problem, None);
        let rule = &p.ingress.as_ref().unwrap()[0];
        assert_eq!(rule.peers.as_ref().unwrap().len(), 2);
        assert_eq!(
            rule.ports,
            vec![
                PortSpec {
                    proto: PROTO_TCP,
                    port: PortRef::Number { port: 80, end: 80 }
                },
                PortSpec {
                    proto: PROTO_UDP,
                    port: PortRef::Named("dns".into())
                },
                PortSpec {
                    proto: PROTO_TCP,
                    port: PortRef::Number {
                        port: 8000,
                        end: 8080
                    }
                },
            ]
        );
        let bad = policy(serde_json::json!({
            "metadata": {"name": "p", "namespace": "x"},
            "spec": {"podSelector": {}, "ingress": [{"ports": [{"protocol": "ICMP"}]}]}
        }));
        assert!(bad.problem.unwrap().contains("ICMP"));
    }
}
