// SPDX-License-Identifier: Apache-2.0
//! What the service engine keeps of Services and Endpoints: only the fields
//! that decide where a packet to a Service address goes, read once from
//! the API objects.
//!
//! Endpoints, not EndpointSlices: the oldest API server ferrite supports
//! (v1.20) serves no discovery.k8s.io/v1.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{EndpointAddress, Endpoints, Service};

pub use crate::policy::model::{PROTO_SCTP, PROTO_TCP, PROTO_UDP};

/// sessionAffinityConfig.clientIP.timeoutSeconds when absent (3 hours, the
/// API server's default).
pub const DEFAULT_AFFINITY_SECONDS: u32 = 10_800;

/// A protocol name as the API spells it; absent is TCP. 0 for one ferrite
/// does not know (such a port is left to kube-proxy).
pub fn protocol(name: Option<&str>) -> u8 {
    match name {
        None | Some("TCP") => PROTO_TCP,
        Some("UDP") => PROTO_UDP,
        Some("SCTP") => PROTO_SCTP,
        Some(_) => 0,
    }
}

/// A port number from the API's i32; None when out of range.
fn port(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|p| *p != 0)
}

/// One of a Service's ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// Empty when unnamed (a Service with one port may leave it out).
    pub name: String,
    pub proto: u8,
    pub port: u16,
    /// Read for NodePort Services; the table programs ClusterIPs only.
    pub node_port: Option<u16>,
}

/// A Service, as far as load balancing is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    pub namespace: String,
    pub name: String,
    /// type ExternalName: a DNS alias, nothing to translate.
    pub external_name: bool,
    /// spec.clusterIPs (or spec.clusterIP); empty when headless.
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// The ClientIP affinity timeout in seconds; None without affinity.
    pub affinity: Option<u32>,
    /// internalTrafficPolicy Local: only this node's backends.
    pub internal_local: bool,
    /// externalTrafficPolicy Local (read for NodePorts, not used yet).
    pub external_local: bool,
}

impl ServiceInfo {
    pub fn from_api(svc: &Service) -> ServiceInfo {
        let meta = &svc.metadata;
        let spec = svc.spec.clone().unwrap_or_default();
        let ips: Vec<String> = match spec.cluster_ips {
            Some(ips) if !ips.is_empty() => ips,
            _ => spec.cluster_ip.into_iter().collect(),
        };
        // "None" (headless) and "" (not yet allocated) do not parse.
        let mut cluster_ips: Vec<IpAddr> = Vec::new();
        for ip in ips.iter().filter_map(|s| s.parse::<IpAddr>().ok()) {
            if !cluster_ips.contains(&ip) {
                cluster_ips.push(ip);
            }
        }
        let ports = spec
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                Some(ServicePort {
                    name: p.name.clone().unwrap_or_default(),
                    proto: protocol(p.protocol.as_deref()),
                    port: port(p.port)?,
                    node_port: p.node_port.and_then(port),
                })
            })
            .collect();
        let affinity = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
            spec.session_affinity_config
                .and_then(|c| c.client_ip)
                .and_then(|c| c.timeout_seconds)
                .and_then(|t| u32::try_from(t).ok())
                .filter(|t| *t > 0)
                .unwrap_or(DEFAULT_AFFINITY_SECONDS)
        });
        ServiceInfo {
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
            external_name: spec.type_.as_deref() == Some("ExternalName"),
            cluster_ips,
            ports,
            affinity,
            internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
            external_local: spec.external_traffic_policy.as_deref() == Some("Local"),
        }
    }
}

/// One address of an Endpoints subset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointAddr {
    pub ip: IpAddr,
    pub node: Option<String>,
}

/// A subset's port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointPort {
    /// Empty when unnamed.
    pub name: String,
    pub proto: u8,
    pub port: u16,
}

/// Addresses that share their ports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Subset {
    /// Ready: new flows may go there.
    pub ready: Vec<EndpointAddr>,
    /// Not ready (starting, or terminating): only flows already there.
    pub not_ready: Vec<EndpointAddr>,
    pub ports: Vec<EndpointPort>,
}

/// The Endpoints of one Service (same namespace and name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointsInfo {
    pub namespace: String,
    pub name: String,
    pub subsets: Vec<Subset>,
}

fn addresses(list: Option<&Vec<EndpointAddress>>) -> Vec<EndpointAddr> {
    list.into_iter()
        .flatten()
        .filter_map(|a| {
            Some(EndpointAddr {
                ip: a.ip.parse().ok()?,
                node: a.node_name.clone(),
            })
        })
        .collect()
}

impl EndpointsInfo {
    pub fn from_api(ep: &Endpoints) -> EndpointsInfo {
        let subsets = ep
            .subsets
            .iter()
            .flatten()
            .map(|s| Subset {
                ready: addresses(s.addresses.as_ref()),
                not_ready: addresses(s.not_ready_addresses.as_ref()),
                ports: s
                    .ports
                    .iter()
                    .flatten()
                    .filter_map(|p| {
                        Some(EndpointPort {
                            name: p.name.clone().unwrap_or_default(),
                            proto: protocol(p.protocol.as_deref()),
                            port: port(p.port)?,
                        })
                    })
                    .collect(),
            })
            .collect();
        EndpointsInfo {
            namespace: ep.metadata.namespace.clone().unwrap_or_default(),
            name: ep.metadata.name.clone().unwrap_or_default(),
            subsets,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(v: serde_json::Value) -> ServiceInfo {
        ServiceInfo::from_api(&serde_json::from_value(v).unwrap())
    }

    #[test]
    fn a_service_is_reduced_to_what_balancing_needs() {
        let s = svc(json!({
            "metadata": {"namespace": "x", "name": "web"},
            "spec": {"type": "NodePort", "clusterIP": "10.96.0.10",
                     "clusterIPs": ["10.96.0.10", "fd00:96::a"],
                     "ports": [{"name": "http", "port": 80, "nodePort": 30080},
                               {"name": "dns", "port": 53, "protocol": "UDP"},
                               {"name": "s", "port": 9, "protocol": "SCTP"}],
                     "internalTrafficPolicy": "Local", "externalTrafficPolicy": "Local"}}));
        assert_eq!((s.namespace.as_str(), s.name.as_str()), ("x", "web"));
        assert_eq!(
            s.cluster_ips,
            vec![
                "10.96.0.10".parse::<IpAddr>().unwrap(),
                "fd00:96::a".parse().unwrap()
            ]
        );
        let ports: Vec<_> = s
            .ports
            .iter()
            .map(|p| (p.name.as_str(), p.proto, p.port, p.node_port))
            .collect();
        assert_eq!(
            ports,
            [
                ("http", PROTO_TCP, 80, Some(30080)),
                ("dns", PROTO_UDP, 53, None),
                ("s", PROTO_SCTP, 9, None)
            ]
        );
        assert!(s.internal_local && s.external_local && !s.external_name);
        assert_eq!(s.affinity, None);
    }

    #[test]
    fn cluster_ip_alone_headless_and_external_name() {
        let s = svc(json!({"metadata": {"name": "a"}, "spec": {"clusterIP": "10.96.0.1"}}));
        assert_eq!(s.cluster_ips, vec!["10.96.0.1".parse::<IpAddr>().unwrap()]);
        assert!(!s.internal_local, "absent: Cluster");
        let s = svc(json!({"metadata": {"name": "h"},
                           "spec": {"clusterIP": "None", "clusterIPs": ["None"]}}));
        assert!(s.cluster_ips.is_empty());
        let s = svc(json!({"metadata": {"name": "e"},
                           "spec": {"type": "ExternalName", "externalName": "example.com"}}));
        assert!(s.external_name && s.cluster_ips.is_empty());
    }

    #[test]
    fn client_ip_affinity_with_default_and_given_timeout() {
        let s = svc(json!({"metadata": {"name": "a"},
                           "spec": {"sessionAffinity": "ClientIP"}}));
        assert_eq!(s.affinity, Some(10_800));
        let s = svc(json!({"metadata": {"name": "a"},
                           "spec": {"sessionAffinity": "ClientIP",
                                    "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}}));
        assert_eq!(s.affinity, Some(60));
        let s = svc(json!({"metadata": {"name": "a"},
                           "spec": {"sessionAffinity": "None",
                                    "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}}));
        assert_eq!(s.affinity, None);
    }

    #[test]
    fn endpoints_keep_ready_and_not_ready_apart() {
        let ep: Endpoints = serde_json::from_value(json!({
            "metadata": {"namespace": "x", "name": "web"},
            "subsets": [{
                "addresses": [{"ip": "10.0.1.2", "nodeName": "n1"}, {"ip": "bogus"}],
                "notReadyAddresses": [{"ip": "10.0.2.2", "nodeName": "n2"}],
                "ports": [{"name": "http", "port": 8080}, {"port": 53, "protocol": "UDP"}]
            }]
        }))
        .unwrap();
        let e = EndpointsInfo::from_api(&ep);
        assert_eq!(e.subsets.len(), 1);
        let s = &e.subsets[0];
        assert_eq!(
            s.ready,
            vec![EndpointAddr {
                ip: "10.0.1.2".parse().unwrap(),
                node: Some("n1".into())
            }]
        );
        assert_eq!(s.not_ready[0].node.as_deref(), Some("n2"));
        assert_eq!(
            s.ports,
            vec![
                EndpointPort {
                    name: "http".into(),
                    proto: PROTO_TCP,
                    port: 8080
                },
                EndpointPort {
                    name: String::new(),
                    proto: PROTO_UDP,
                    port: 53
                }
            ]
        );
    }

    #[test]
    fn protocols() {
        assert_eq!(protocol(None), PROTO_TCP);
        assert_eq!(protocol(Some("UDP")), PROTO_UDP);
        assert_eq!(protocol(Some("SCTP")), PROTO_SCTP);
        assert_eq!(protocol(Some("ICMP")), 0);
    }
}
