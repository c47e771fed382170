// SPDX-License-Identifier: Apache-2.0
//! The desired Service table of this node, computed from the view: one
//! frontend per cluster IP, port and protocol, each with its backends from
//! the Service's Endpoints.
//!
//! What ferrite cannot serve is left to kube-proxy rather than half
//! served: SCTP and other protocols port by port, and a Service over the
//! limits whole (a Service with some of its frontends would answer on one
//! address and not the other). Services already in the table keep their
//! place first, so a new Service never pushes an old one out.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use super::engine::Frontend;
use super::model::{EndpointsInfo, ServiceInfo, ServicePort, PROTO_TCP, PROTO_UDP};

/// (namespace, name) of a Service and of its Endpoints.
pub type ServiceKey = (String, String);

/// What the maps hold at most.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_frontends: usize,
    /// Active and terminating backends of all frontends together.
    pub max_backends: usize,
    /// Active backends (slots) of one frontend.
    pub max_backends_per_frontend: usize,
}

pub const DEFAULT_MAX_FRONTENDS: u32 = 65_536;
pub const DEFAULT_MAX_BACKENDS: u32 = 65_536;
pub const DEFAULT_MAX_BACKENDS_PER_FRONTEND: usize = 256;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frontends: DEFAULT_MAX_FRONTENDS as usize,
            max_backends: DEFAULT_MAX_BACKENDS as usize,
            max_backends_per_frontend: DEFAULT_MAX_BACKENDS_PER_FRONTEND,
        }
    }
}

/// A backend's address and port.
pub type BackendAddr = (IpAddr, u16);

/// One frontend as it should be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    pub service: ServiceKey,
    /// Ready backends, sorted: new flows go to them.
    pub active: Vec<BackendAddr>,
    /// Not-ready backends, sorted: only flows already there.
    pub terminating: Vec<BackendAddr>,
    pub affinity: Option<u32>,
    /// A NodePort with externalTrafficPolicy Cluster: flows from outside to
    /// another node's backend take this node's address.
    pub source_nat: bool,
}

/// This node's desired Service table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Table {
    pub frontends: BTreeMap<Frontend, Wanted>,
    /// Services with their frontends in the table.
    pub services: BTreeSet<ServiceKey>,
    /// Frontends (cluster IP x port) of a protocol ferrite does not serve.
    pub left_to_kube_proxy: usize,
    /// Services left out whole, and why.
    pub left_out: BTreeMap<ServiceKey, String>,
    /// Services with frontends of a protocol ferrite does not serve: how many.
    pub unserved: BTreeMap<ServiceKey, usize>,
}

impl Table {
    pub fn active_backends(&self) -> usize {
        self.frontends.values().map(|w| w.active.len()).sum()
    }

    pub fn terminating_backends(&self) -> usize {
        self.frontends.values().map(|w| w.terminating.len()).sum()
    }

    /// Brings Service `key`'s frontends up to date with `view`, when the
    /// result is the table [`ServiceView::table`] would compute: nothing
    /// is left out (no Service waits for room), and the Service's new
    /// frontends fit the limits and are no other Service's. Returns the
    /// frontends added, changed or removed; `None` (the table untouched)
    /// when only a whole compile can tell.
    pub fn update_service(
        &mut self,
        view: &ServiceView,
        key: &ServiceKey,
        node: &str,
        limits: &Limits,
    ) -> Option<BTreeSet<Frontend>> {
        if !self.left_out.is_empty() {
            return None;
        }
        let (new, left) = match view.services.get(key) {
            Some(svc) => frontends_of(svc, view.endpoints.get(key), node, view.node_ports),
            None => (Vec::new(), 0),
        };
        let old: BTreeSet<Frontend> = self
            .frontends
            .iter()
            .filter(|(_, w)| &w.service == key)
            .map(|(fe, _)| *fe)
            .collect();
        let count = |w: &Wanted| w.active.len() + w.terminating.len();
        let old_backends: usize = old.iter().map(|fe| count(&self.frontends[fe])).sum();
        let new_backends: usize = new.iter().map(|(_, w)| count(w)).sum();
        let backends = self.active_backends() + self.terminating_backends();
        let fits = new
            .iter()
            .all(|(_, w)| w.active.len() <= limits.max_backends_per_frontend)
            && self.frontends.len() - old.len() + new.len() <= limits.max_frontends
            && backends - old_backends + new_backends <= limits.max_backends
            && new
                .iter()
                .all(|(fe, _)| self.frontends.get(fe).is_none_or(|w| &w.service == key));
        if !fits {
            return None;
        }
        let mut touched = old;
        for fe in &touched {
            self.frontends.remove(fe);
        }
        if new.is_empty() {
            self.services.remove(key);
        } else {
            self.services.insert(key.clone());
        }
        for (fe, w) in new {
            touched.insert(fe);
            self.frontends.insert(fe, w);
        }
        self.left_to_kube_proxy -= self.unserved.remove(key).unwrap_or(0);
        self.left_to_kube_proxy += left;
        if left > 0 {
            self.unserved.insert(key.clone(), left);
        }
        Some(touched)
    }
}

/// The Services and Endpoints the watches reported.
#[derive(Clone, Debug, Default)]
pub struct ServiceView {
    pub services: BTreeMap<ServiceKey, ServiceInfo>,
    pub endpoints: BTreeMap<ServiceKey, EndpointsInfo>,
    /// Program NodePorts too (kube-proxy does not run).
    pub node_ports: bool,
}

/// A service port's backends: from every subset with a port of the same
/// name and protocol, that port's number; only `family`'s addresses.
fn backends_of(
    port: &ServicePort,
    eps: Option<&EndpointsInfo>,
    v6: bool,
    only_node: Option<&str>,
) -> (Vec<BackendAddr>, Vec<BackendAddr>) {
    let mut active = Vec::new();
    let mut terminating = Vec::new();
    for subset in eps.iter().flat_map(|e| &e.subsets) {
        let Some(sp) = subset
            .ports
            .iter()
            .find(|p| p.name == port.name && p.proto == port.proto)
        else {
            continue;
        };
        let wanted = |a: &&super::model::EndpointAddr| {
            a.ip.is_ipv6() == v6 && only_node.is_none_or(|n| a.node.as_deref() == Some(n))
        };
        active.extend(subset.ready.iter().filter(wanted).map(|a| (a.ip, sp.port)));
        terminating.extend(
            subset
                .not_ready
                .iter()
                .filter(wanted)
                .map(|a| (a.ip, sp.port)),
        );
    }
    active.sort();
    active.dedup();
    terminating.sort();
    terminating.dedup();
    // Ready in one subset and not in another: it takes new flows.
    terminating.retain(|b| active.binary_search(b).is_err());
    (active, terminating)
}

/// One Service's frontends, and how many of its ports are left to
/// kube-proxy.
fn frontends_of(
    svc: &ServiceInfo,
    eps: Option<&EndpointsInfo>,
    node: &str,
    node_ports: bool,
) -> (Vec<(Frontend, Wanted)>, usize) {
    let mut out = Vec::new();
    let mut left = 0;
    if svc.external_name {
        return (out, 0);
    }
    let only_node = svc.internal_local.then_some(node);
    for ip in &svc.cluster_ips {
        for port in &svc.ports {
            if port.proto != PROTO_TCP && port.proto != PROTO_UDP {
                left += 1;
                continue;
            }
            let (active, terminating) = backends_of(port, eps, ip.is_ipv6(), only_node);
            out.push((
                Frontend {
                    addr: *ip,
                    port: port.port,
                    proto: port.proto,
                },
                Wanted {
                    service: (svc.namespace.clone(), svc.name.clone()),
                    active,
                    terminating,
                    affinity: svc.affinity,
                    source_nat: false,
                },
            ));
        }
    }
    if node_ports {
        // Every address of the node, per family the Service has:
        // externalTrafficPolicy Local keeps this node's backends (and the
        // client's address), Cluster takes every backend.
        let mut families: Vec<bool> = svc.cluster_ips.iter().map(IpAddr::is_ipv6).collect();
        families.dedup();
        let only_node = svc.external_local.then_some(node);
        for v6 in families {
            let any: IpAddr = if v6 {
                std::net::Ipv6Addr::UNSPECIFIED.into()
            } else {
                std::net::Ipv4Addr::UNSPECIFIED.into()
            };
            for port in &svc.ports {
                let Some(np) = port.node_port else { continue };
                if port.proto != PROTO_TCP && port.proto != PROTO_UDP {
                    continue;
                }
                let (active, terminating) = backends_of(port, eps, v6, only_node);
                out.push((
                    Frontend {
                        addr: any,
                        port: np,
                        proto: port.proto,
                    },
                    Wanted {
                        service: (svc.namespace.clone(), svc.name.clone()),
                        active,
                        terminating,
                        affinity: svc.affinity,
                        source_nat: !svc.external_local,
                    },
                ));
            }
        }
    }
    (out, left)
}

impl ServiceView {
    /// The table for `node`. Services in `first` (those the maps hold)
    /// claim their room before the others.
    pub fn table(&self, node: &str, limits: &Limits, first: &BTreeSet<ServiceKey>) -> Table {
        let mut table = Table::default();
        let mut backends = 0usize;
        let old = self.services.iter().filter(|(k, _)| first.contains(*k));
        let new = self.services.iter().filter(|(k, _)| !first.contains(*k));
        for (key, svc) in old.chain(new) {
            let (frontends, left) =
                frontends_of(svc, self.endpoints.get(key), node, self.node_ports);
            table.left_to_kube_proxy += left;
            if left > 0 {
                table.unserved.insert(key.clone(), left);
            }
            if frontends.is_empty() {
                continue;
            }
            let count: usize = frontends
                .iter()
                .map(|(_, w)| w.active.len() + w.terminating.len())
                .sum();
            let why = if let Some((fe, w)) = frontends
                .iter()
                .find(|(_, w)| w.active.len() > limits.max_backends_per_frontend)
            {
                Some(format!(
                    "{} ready backends for {}:{}, more than {} a frontend holds",
                    w.active.len(),
                    fe.addr,
                    fe.port,
                    limits.max_backends_per_frontend
                ))
            } else if table.frontends.len() + frontends.len() > limits.max_frontends {
                Some(format!(
                    "{} frontends would pass the limit of {}",
                    frontends.len(),
                    limits.max_frontends
                ))
            } else if backends + count > limits.max_backends {
                Some(format!(
                    "{count} backends would pass the limit of {}",
                    limits.max_backends
                ))
            } else {
                frontends.iter().find_map(|(fe, _)| {
                    let other = &table.frontends.get(fe)?.service;
                    Some(format!(
                        "{}:{} is {}/{}'s too",
                        fe.addr, fe.port, other.0, other.1
                    ))
                })
            };
            if let Some(why) = why {
                table.left_out.insert(key.clone(), why);
                continue;
            }
            backends += count;
            table.services.insert(key.clone());
            table.frontends.extend(frontends);
        }
        table
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::model::{EndpointAddr, EndpointPort, Subset, PROTO_SCTP};

    pub(crate) fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn port(name: &str, proto: u8, port: u16) -> ServicePort {
        ServicePort {
            name: name.into(),
            proto,
            port,
            node_port: None,
        }
    }

    fn service(name: &str, ips: &[&str], ports: Vec<ServicePort>) -> ServiceInfo {
        ServiceInfo {
            namespace: "x".into(),
            name: name.into(),
            external_name: false,
            cluster_ips: ips.iter().map(|s| ip(s)).collect(),
            ports,
            affinity: None,
            internal_local: false,
            external_local: false,
        }
    }

    fn addr(s: &str, node: &str) -> EndpointAddr {
        EndpointAddr {
            ip: ip(s),
            node: Some(node.into()),
        }
    }

    fn eport(name: &str, proto: u8, port: u16) -> EndpointPort {
        EndpointPort {
            name: name.into(),
            proto,
            port,
        }
    }

    fn view(svcs: Vec<ServiceInfo>, eps: Vec<(&str, Vec<Subset>)>) -> ServiceView {
        let mut v = ServiceView::default();
        for s in svcs {
            v.services.insert((s.namespace.clone(), s.name.clone()), s);
        }
        for (name, subsets) in eps {
            v.endpoints.insert(
                ("x".into(), name.into()),
                EndpointsInfo {
                    namespace: "x".into(),
                    name: name.into(),
                    subsets,
                },
            );
        }
        v
    }

    fn fe(a: &str, port: u16, proto: u8) -> Frontend {
        Frontend {
            addr: ip(a),
            port,
            proto,
        }
    }

    fn table(v: &ServiceView) -> Table {
        v.table("n1", &Limits::default(), &BTreeSet::new())
    }

    #[test]
    fn ports_match_by_name_and_protocol_across_subsets() {
        let v = view(
            vec![service(
                "web",
                &["10.96.0.10"],
                vec![port("http", PROTO_TCP, 80), port("dns", PROTO_UDP, 53)],
            )],
            vec![(
                "web",
                vec![
                    Subset {
                        ready: vec![addr("10.0.1.3", "n1"), addr("10.0.1.2", "n1")],
                        not_ready: vec![],
                        ports: vec![
                            eport("http", PROTO_TCP, 8080),
                            eport("dns", PROTO_UDP, 5353),
                        ],
                    },
                    // Another port number for http: another subset.
                    Subset {
                        ready: vec![addr("10.0.2.2", "n2")],
                        not_ready: vec![],
                        ports: vec![eport("http", PROTO_TCP, 8081)],
                    },
                    // The name matches, the protocol does not.
                    Subset {
                        ready: vec![addr("10.0.3.3", "n3")],
                        not_ready: vec![],
                        ports: vec![eport("dns", PROTO_TCP, 53)],
                    },
                ],
            )],
        );
        let t = table(&v);
        assert_eq!(t.frontends.len(), 2);
        assert_eq!(
            t.frontends[&fe("10.96.0.10", 80, PROTO_TCP)].active,
            vec![
                (ip("10.0.1.2"), 8080),
                (ip("10.0.1.3"), 8080),
                (ip("10.0.2.2"), 8081)
            ],
            "sorted by address and port"
        );
        assert_eq!(
            t.frontends[&fe("10.96.0.10", 53, PROTO_UDP)].active,
            vec![(ip("10.0.1.2"), 5353), (ip("10.0.1.3"), 5353)]
        );
    }

    #[test]
    fn an_unnamed_port_matches_the_unnamed_subset_port() {
        let v = view(
            vec![service(
                "one",
                &["10.96.0.11"],
                vec![port("", PROTO_TCP, 80)],
            )],
            vec![(
                "one",
                vec![
                    Subset {
                        ready: vec![addr("10.0.1.2", "n1")],
                        not_ready: vec![],
                        ports: vec![eport("", PROTO_TCP, 8080)],
                    },
                    Subset {
                        ready: vec![addr("10.0.1.9", "n1")],
                        not_ready: vec![],
                        ports: vec![eport("named", PROTO_TCP, 9090)],
                    },
                ],
            )],
        );
        let t = table(&v);
        assert_eq!(
            t.frontends[&fe("10.96.0.11", 80, PROTO_TCP)].active,
            vec![(ip("10.0.1.2"), 8080)]
        );
    }

    #[test]
    fn dual_stack_cluster_ips_take_their_own_family() {
        let v = view(
            vec![service(
                "ds",
                &["10.96.0.12", "fd00:96::c"],
                vec![port("", PROTO_TCP, 80)],
            )],
            vec![(
                "ds",
                vec![Subset {
                    ready: vec![addr("10.0.1.2", "n1"), addr("fd00:244::2", "n1")],
                    not_ready: vec![addr("fd00:244::3", "n2")],
                    ports: vec![eport("", PROTO_TCP, 8080)],
                }],
            )],
        );
        let t = table(&v);
        let v4 = &t.frontends[&fe("10.96.0.12", 80, PROTO_TCP)];
        let v6 = &t.frontends[&fe("fd00:96::c", 80, PROTO_TCP)];
        assert_eq!(v4.active, vec![(ip("10.0.1.2"), 8080)]);
        assert!(v4.terminating.is_empty());
        assert_eq!(v6.active, vec![(ip("fd00:244::2"), 8080)]);
        assert_eq!(v6.terminating, vec![(ip("fd00:244::3"), 8080)]);
    }

    #[test]
    fn not_ready_is_terminating_unless_ready_elsewhere() {
        let v = view(
            vec![service(
                "web",
                &["10.96.0.10"],
                vec![port("", PROTO_TCP, 80)],
            )],
            vec![(
                "web",
                vec![
                    Subset {
                        ready: vec![addr("10.0.1.2", "n1")],
                        not_ready: vec![addr("10.0.1.3", "n1"), addr("10.0.1.4", "n1")],
                        ports: vec![eport("", PROTO_TCP, 8080)],
                    },
                    Subset {
                        ready: vec![addr("10.0.1.4", "n1")],
                        not_ready: vec![],
                        ports: vec![eport("", PROTO_TCP, 8080)],
                    },
                ],
            )],
        );
        let w = &table(&v).frontends[&fe("10.96.0.10", 80, PROTO_TCP)];
        assert_eq!(
            w.active,
            vec![(ip("10.0.1.2"), 8080), (ip("10.0.1.4"), 8080)]
        );
        assert_eq!(w.terminating, vec![(ip("10.0.1.3"), 8080)]);
    }

    #[test]
    fn node_ports_only_without_kube_proxy_and_by_traffic_policy() {
        let mut p = port("web", PROTO_TCP, 80);
        p.node_port = Some(30080);
        let mut sctp = port("s", PROTO_SCTP, 90);
        sctp.node_port = Some(30090);
        let cluster = service("c", &["10.96.0.20", "fd00:96::20"], vec![p.clone(), sctp]);
        let mut local = service(
            "l",
            &["10.96.0.21"],
            vec![ServicePort {
                node_port: Some(30081),
                ..p.clone()
            }],
        );
        local.external_local = true;
        let subsets = vec![Subset {
            ready: vec![
                addr("10.0.1.2", "n1"),
                addr("10.0.2.2", "n2"),
                addr("fd00::1:2", "n1"),
            ],
            not_ready: vec![],
            ports: vec![eport("web", PROTO_TCP, 8080)],
        }];
        let mut v = view(
            vec![cluster, local],
            vec![("c", subsets.clone()), ("l", subsets)],
        );
        let any4 = fe("0.0.0.0", 30080, PROTO_TCP);
        assert!(
            !table(&v).frontends.contains_key(&any4),
            "kube-proxy serves NodePorts"
        );
        v.node_ports = true;
        let t = table(&v);
        let w = &t.frontends[&any4];
        assert_eq!(
            w.active,
            vec![(ip("10.0.1.2"), 8080), (ip("10.0.2.2"), 8080)]
        );
        assert!(
            w.source_nat,
            "Cluster: another node's backend sees this node"
        );
        assert_eq!(
            t.frontends[&fe("::", 30080, PROTO_TCP)].active,
            vec![(ip("fd00::1:2"), 8080)]
        );
        let l = &t.frontends[&fe("0.0.0.0", 30081, PROTO_TCP)];
        assert_eq!(
            l.active,
            vec![(ip("10.0.1.2"), 8080)],
            "Local: this node's backends"
        );
        assert!(!l.source_nat);
        assert!(!t.frontends.contains_key(&fe("0.0.0.0", 30090, PROTO_SCTP)));
        assert!(!t.frontends[&fe("10.96.0.20", 80, PROTO_TCP)].source_nat);
    }

    #[test]
    fn internal_traffic_policy_local_keeps_this_nodes_backends() {
        let mut s = service("loc", &["10.96.0.13"], vec![port("", PROTO_TCP, 80)]);
        s.internal_local = true;
        let subsets = vec![Subset {
            ready: vec![
                addr("10.0.1.2", "n1"),
                addr("10.0.2.2", "n2"),
                EndpointAddr {
                    ip: ip("10.0.9.9"),
                    node: None,
                },
            ],
            not_ready: vec![addr("10.0.1.3", "n1"), addr("10.0.2.3", "n2")],
            ports: vec![eport("", PROTO_TCP, 8080)],
        }];
        let v = view(vec![s], vec![("loc", subsets.clone())]);
        let w = &table(&v).frontends[&fe("10.96.0.13", 80, PROTO_TCP)];
        assert_eq!(w.active, vec![(ip("10.0.1.2"), 8080)]);
        assert_eq!(w.terminating, vec![(ip("10.0.1.3"), 8080)]);
        // Cluster (the default): every node's.
        let v = view(
            vec![service(
                "loc",
                &["10.96.0.13"],
                vec![port("", PROTO_TCP, 80)],
            )],
            vec![("loc", subsets)],
        );
        assert_eq!(
            table(&v).frontends[&fe("10.96.0.13", 80, PROTO_TCP)]
                .active
                .len(),
            3
        );
    }

    #[test]
    fn sctp_is_left_to_kube_proxy_per_address_and_port() {
        let v = view(
            vec![service(
                "mixed",
                &["10.96.0.14", "fd00:96::e"],
                vec![
                    port("s", PROTO_SCTP, 9),
                    port("t", PROTO_TCP, 80),
                    port("o", 0, 7),
                ],
            )],
            vec![],
        );
        let t = table(&v);
        assert_eq!(t.left_to_kube_proxy, 4);
        assert_eq!(t.unserved.values().copied().collect::<Vec<_>>(), vec![4]);
        assert_eq!(
            t.frontends.keys().copied().collect::<Vec<_>>(),
            vec![
                fe("10.96.0.14", 80, PROTO_TCP),
                fe("fd00:96::e", 80, PROTO_TCP)
            ]
        );
        // No Endpoints: programmed with no backends (the datapath rejects).
        assert!(t.frontends.values().all(|w| w.active.is_empty()));
    }

    #[test]
    fn headless_and_external_name_services_have_no_frontends() {
        let mut ext = service("ext", &[], vec![port("", PROTO_TCP, 80)]);
        ext.external_name = true;
        let headless = service("headless", &[], vec![port("", PROTO_SCTP, 80)]);
        let v = view(vec![ext, headless], vec![]);
        let t = table(&v);
        assert!(t.frontends.is_empty() && t.services.is_empty());
        assert_eq!(t.left_to_kube_proxy, 0);
        assert!(t.unserved.is_empty());
    }

    #[test]
    fn affinity_is_carried_to_every_frontend() {
        let mut s = service(
            "sticky",
            &["10.96.0.15"],
            vec![port("a", PROTO_TCP, 80), port("b", PROTO_UDP, 81)],
        );
        s.affinity = Some(600);
        let t = table(&view(vec![s], vec![]));
        assert!(t.frontends.values().all(|w| w.affinity == Some(600)));
    }

    fn many(name: &str, ip_: &str, n: usize) -> (ServiceInfo, (String, Vec<Subset>)) {
        let s = service(name, &[ip_], vec![port("", PROTO_TCP, 80)]);
        let ready = (0..n)
            .map(|i| addr(&format!("10.1.{}.{}", i / 250, i % 250 + 1), "n1"))
            .collect();
        let sub = Subset {
            ready,
            not_ready: vec![],
            ports: vec![eport("", PROTO_TCP, 8080)],
        };
        (s, (name.to_string(), vec![sub]))
    }

    fn view_of(items: Vec<(ServiceInfo, (String, Vec<Subset>))>) -> ServiceView {
        let (svcs, eps): (Vec<_>, Vec<_>) = items.into_iter().unzip();
        let eps: Vec<(String, Vec<Subset>)> = eps;
        let mut v = view(svcs, vec![]);
        for (name, subsets) in eps {
            v.endpoints.insert(
                ("x".into(), name.clone()),
                EndpointsInfo {
                    namespace: "x".into(),
                    name,
                    subsets,
                },
            );
        }
        v
    }

    #[test]
    fn a_service_over_a_limit_is_left_out_whole_and_others_stay() {
        let v = view_of(vec![
            many("a", "10.96.0.1", 3),
            many("big", "10.96.0.2", 300),
        ]);
        let t = table(&v);
        assert_eq!(
            t.services.iter().map(|k| k.1.as_str()).collect::<Vec<_>>(),
            ["a"]
        );
        assert!(t.left_out[&("x".to_string(), "big".to_string())].contains("300 ready"));
        assert_eq!(t.active_backends(), 3);

        // Totals: a (3 backends) fits, b (3 more) does not, c (1) does.
        let limits = Limits {
            max_backends: 5,
            ..Limits::default()
        };
        let v = view_of(vec![
            many("a", "10.96.0.1", 3),
            many("b", "10.96.0.2", 3),
            many("c", "10.96.0.3", 1),
        ]);
        let t = v.table("n1", &limits, &BTreeSet::new());
        assert_eq!(
            t.services.iter().map(|k| k.1.as_str()).collect::<Vec<_>>(),
            ["a", "c"]
        );
        // b was programmed before: it keeps its room, a is left out now.
        let first = [("x".to_string(), "b".to_string())].into();
        let t = v.table("n1", &limits, &first);
        assert_eq!(
            t.services.iter().map(|k| k.1.as_str()).collect::<Vec<_>>(),
            ["b", "c"]
        );

        let limits = Limits {
            max_frontends: 2,
            ..Limits::default()
        };
        let mut wide = service(
            "wide",
            &["10.96.0.9"],
            vec![port("a", PROTO_TCP, 1), port("b", PROTO_TCP, 2)],
        );
        wide.namespace = "a-first".into();
        let mut v = view_of(vec![many("a", "10.96.0.1", 1)]);
        v.services.insert(("a-first".into(), "wide".into()), wide);
        let t = v.table("n1", &limits, &BTreeSet::new());
        assert_eq!(t.frontends.len(), 2, "wide's two, never one of them");
        assert!(t.left_out.contains_key(&("x".to_string(), "a".to_string())));
    }

    #[test]
    fn a_frontend_claimed_twice_goes_to_the_first() {
        let v = view(
            vec![
                service("a", &["10.96.0.1"], vec![port("", PROTO_TCP, 80)]),
                service("b", &["10.96.0.1"], vec![port("", PROTO_TCP, 80)]),
            ],
            vec![],
        );
        let t = table(&v);
        assert_eq!(t.frontends.len(), 1);
        assert!(t.left_out[&("x".to_string(), "b".to_string())].contains("x/a"));
    }
}
