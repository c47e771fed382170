// SPDX-License-Identifier: Apache-2.0
//! What the agent needs to know about a Node, and the decisions it makes
//! from the list of Nodes. Pure functions: the watch feeds them, the tests
//! feed them Node objects built by hand.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::Node;

use crate::masquerade::{covers, Family};

/// The parts of a Node the agent acts on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    /// `spec.podCIDRs` (or `spec.podCIDR`), normalised to network addresses.
    pub pod_cidrs: Vec<IpNetwork>,
    /// `status.addresses` of type InternalIP, in the API's order.
    pub internal_ips: Vec<IpAddr>,
}

impl NodeInfo {
    /// Reads a Node; values that do not parse are left out and described
    /// in the returned warnings.
    pub fn from_node(node: &Node) -> (NodeInfo, Vec<String>) {
        let name = node.metadata.name.clone().unwrap_or_default();
        let mut warnings = Vec::new();
        let spec = node.spec.as_ref();
        let raw_cidrs: Vec<String> = match spec.and_then(|s| s.pod_cidrs.clone()) {
            Some(list) if !list.is_empty() => list,
            _ => spec.and_then(|s| s.pod_cidr.clone()).into_iter().collect(),
        };
        let mut pod_cidrs = Vec::new();
        for raw in raw_cidrs {
            match raw.parse::<IpNetwork>() {
                Ok(net) => {
                    let net = IpNetwork::new(net.network(), net.prefix()).unwrap_or(net);
                    if !pod_cidrs.contains(&net) {
                        pod_cidrs.push(net);
                    }
                }
                Err(e) => warnings.push(format!("node {name}: podCIDR {raw:?}: {e}")),
            }
        }
        let mut internal_ips = Vec::new();
        let addresses = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .map(Vec::as_slice)
            .unwrap_or_default();
        for a in addresses.iter().filter(|a| a.type_ == "InternalIP") {
            match a.address.parse::<IpAddr>() {
                Ok(ip) => {
                    if !internal_ips.contains(&ip) {
                        internal_ips.push(ip)
                    }
                }
                Err(e) => warnings.push(format!("node {name}: InternalIP {:?}: {e}", a.address)),
            }
        }
        (
            NodeInfo {
                name,
                pod_cidrs,
                internal_ips,
            },
            warnings,
        )
    }

    /// The first InternalIP of `family`.
    pub fn internal_ip(&self, family: Family) -> Option<IpAddr> {
        self.internal_ips
            .iter()
            .copied()
            .find(|ip| Family::of(*ip) == family)
    }
}

/// Routes to program: each other node's pod CIDRs via its InternalIP of
/// the same family, and why any were left out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredRoutes {
    pub routes: BTreeMap<IpNetwork, IpAddr>,
    pub warnings: Vec<String>,
}

/// What the routes to other nodes should be, seen from `local`.
///
/// A CIDR that overlaps one of this node's own pod CIDRs is never routed
/// away (it would cut off local pods); a CIDR two nodes claim goes to the
/// first by name, with a warning.
pub fn desired_routes(local: &str, nodes: &[NodeInfo]) -> DesiredRoutes {
    let mut out = DesiredRoutes::default();
    let own: Vec<IpNetwork> = nodes
        .iter()
        .filter(|n| n.name == local)
        .flat_map(|n| n.pod_cidrs.iter().copied())
        .collect();
    let mut sorted: Vec<&NodeInfo> = nodes.iter().filter(|n| n.name != local).collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut owner: BTreeMap<IpNetwork, &str> = BTreeMap::new();
    for node in sorted {
        for cidr in &node.pod_cidrs {
            if own.iter().any(|o| covers(o, cidr) || covers(cidr, o)) {
                out.warnings.push(format!(
                    "node {}: podCIDR {cidr} overlaps this node's own; not routed",
                    node.name
                ));
                continue;
            }
            let Some(gw) = node.internal_ip(Family::of_net(cidr)) else {
                out.warnings.push(format!(
                    "node {}: no InternalIP of the family of podCIDR {cidr}; not routed",
                    node.name
                ));
                continue;
            };
            if let Some(first) = owner.get(cidr) {
                out.warnings.push(format!(
                    "node {}: podCIDR {cidr} is also node {first}'s; routed to {first}",
                    node.name
                ));
                continue;
            }
            owner.insert(*cidr, &node.name);
            out.routes.insert(*cidr, gw);
        }
    }
    out
}

/// Every node's InternalIPs (this one's too): destinations masquerade
/// leaves alone.
pub fn node_ips(nodes: &[NodeInfo]) -> BTreeSet<IpAddr> {
    nodes
        .iter()
        .flat_map(|n| n.internal_ips.iter().copied())
        .collect()
}

/// Pod CIDRs in conflist order: IPv4 first, then IPv6, each family in the
/// API's order.
pub fn ordered_cidrs(cidrs: &[IpNetwork]) -> Vec<IpNetwork> {
    let mut out: Vec<IpNetwork> = cidrs.iter().filter(|c| c.is_ipv4()).copied().collect();
    out.extend(cidrs.iter().filter(|c| c.is_ipv6()).copied());
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeAddress, NodeSpec, NodeStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    /// A Node as the API server returns it.
    pub(crate) fn node(name: &str, cidrs: &[&str], ips: &[&str]) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                pod_cidr: cidrs.first().map(|c| c.to_string()),
                pod_cidrs: Some(cidrs.iter().map(|c| c.to_string()).collect()),
                ..Default::default()
            }),
            status: Some(NodeStatus {
                addresses: Some(
                    ips.iter()
                        .map(|ip| NodeAddress {
                            address: ip.to_string(),
                            type_: "InternalIP".into(),
                        })
                        .chain(std::iter::once(NodeAddress {
                            address: format!("{name}.example"),
                            type_: "Hostname".into(),
                        }))
                        .collect(),
                ),
                ..Default::default()
            }),
        }
    }

    pub(crate) fn info(name: &str, cidrs: &[&str], ips: &[&str]) -> NodeInfo {
        let (info, warnings) = NodeInfo::from_node(&node(name, cidrs, ips));
        assert!(warnings.is_empty(), "{warnings:?}");
        info
    }

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn reads_pod_cidrs_and_internal_ips() {
        let n = info(
            "a",
            &["10.244.1.0/24", "fd00:244:1::/64"],
            &["192.0.2.1", "2001:db8::1"],
        );
        assert_eq!(
            n.pod_cidrs,
            vec![net("10.244.1.0/24"), net("fd00:244:1::/64")]
        );
        assert_eq!(n.internal_ips, vec![ip("192.0.2.1"), ip("2001:db8::1")]);
        assert_eq!(n.internal_ip(Family::V6), Some(ip("2001:db8::1")));
    }

    #[test]
    fn falls_back_to_pod_cidr_and_normalises() {
        let mut n = node("a", &[], &[]);
        n.spec.as_mut().unwrap().pod_cidrs = None;
        n.spec.as_mut().unwrap().pod_cidr = Some("10.244.1.7/24".into());
        let (i, w) = NodeInfo::from_node(&n);
        assert!(w.is_empty());
        assert_eq!(i.pod_cidrs, vec![net("10.244.1.0/24")]);
    }

    #[test]
    fn a_node_without_spec_has_nothing_yet() {
        let n = Node {
            metadata: ObjectMeta {
                name: Some("new".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let (i, w) = NodeInfo::from_node(&n);
        assert!(w.is_empty());
        assert!(i.pod_cidrs.is_empty() && i.internal_ips.is_empty());
    }

    #[test]
    fn bad_values_are_warnings() {
        let (i, w) = NodeInfo::from_node(&node("a", &["nonsense"], &["also-nonsense"]));
        assert!(i.pod_cidrs.is_empty() && i.internal_ips.is_empty());
        assert_eq!(w.len(), 2);
    }

    #[test]
    fn routes_every_other_node_per_family() {
        let nodes = [
            info(
                "a",
                &["10.244.1.0/24", "fd00:244:1::/64"],
                &["192.0.2.1", "2001:db8::1"],
            ),
            info(
                "b",
                &["10.244.2.0/24", "fd00:244:2::/64"],
                &["192.0.2.2", "2001:db8::2"],
            ),
            info("c", &["10.244.3.0/24", "fd00:244:3::/64"], &["192.0.2.3"]),
            info("d", &[], &["192.0.2.4"]),
        ];
        let d = desired_routes("a", &nodes);
        let want: BTreeMap<IpNetwork, IpAddr> = [
            (net("10.244.2.0/24"), ip("192.0.2.2")),
            (net("fd00:244:2::/64"), ip("2001:db8::2")),
            (net("10.244.3.0/24"), ip("192.0.2.3")),
        ]
        .into();
        assert_eq!(d.routes, want);
        assert_eq!(d.warnings.len(), 1, "{:?}", d.warnings);
        assert!(d.warnings[0].contains("node c"));
    }

    #[test]
    fn never_routes_away_its_own_cidr_and_one_owner_per_cidr() {
        let nodes = [
            info("a", &["10.244.1.0/24"], &["192.0.2.1"]),
            info("b", &["10.244.1.0/24"], &["192.0.2.2"]),
            info("c", &["10.244.0.0/16"], &["192.0.2.3"]),
            info("e", &["10.244.5.0/24"], &["192.0.2.5"]),
            info("d", &["10.244.5.0/24"], &["192.0.2.4"]),
        ];
        let d = desired_routes("a", &nodes);
        assert_eq!(
            d.routes,
            [(net("10.244.5.0/24"), ip("192.0.2.4"))].into(),
            "{:?}",
            d.warnings
        );
        assert_eq!(d.warnings.len(), 3);
    }

    #[test]
    fn node_ips_of_every_node() {
        let nodes = [
            info("a", &[], &["192.0.2.1", "2001:db8::1"]),
            info("b", &[], &["192.0.2.2"]),
        ];
        assert_eq!(node_ips(&nodes).len(), 3);
    }

    #[test]
    fn ipv4_comes_first() {
        let c = [net("fd00::/64"), net("10.0.0.0/24"), net("fd01::/64")];
        assert_eq!(
            ordered_cidrs(&c),
            vec![net("10.0.0.0/24"), net("fd00::/64"), net("fd01::/64")]
        );
    }
}
