// SPDX-License-Identifier: Apache-2.0
//! The `portMappings` capability: Kubernetes hostPorts served by the
//! datapath instead of the reference `portmap` plugin's iptables rules.
//!
//! Only when ferrite's own entry in the conflist declares the capability
//! (`"capabilities": {"portMappings": true}`, as the agent writes it) does
//! ADD read runtimeConfig.portMappings: a conflist that chains `portmap`
//! keeps it. Each mapping becomes, per pod address of the mapping's family,
//! a frontend of the node (the hostIP, or the family's unspecified address
//! for every address of the node; hostPort; protocol) whose one backend is
//! the pod's address and containerPort (see `bpf/lib/service.h`). The
//! programs look for them only on a node whose agent says it serves them
//! (`ferrite_svccfg`). DEL removes the mappings the runtime names again,
//! each only while it still points at this pod's address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ferrite_datapath::service::{Frontend, HostPort, ServiceMaps};
use ferrite_datapath::Datapath;
use serde_json::Value;

use crate::config::NetConf;
use crate::error::{CniError, CniResult, Code};
use crate::service_view::{proto, socket};

const TCP: u8 = 6;
const UDP: u8 = 17;

/// One runtimeConfig.portMappings entry, checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub host_port: u16,
    pub container_port: u16,
    pub proto: u8,
    /// None: every address of the node.
    pub host_ip: Option<IpAddr>,
}

fn bad(i: usize, msg: impl std::fmt::Display) -> CniError {
    CniError::new(
        Code::InvalidConfig,
        format!("runtimeConfig.portMappings[{i}]: {msg}"),
    )
}

/// `m`'s `field`, its case ignored: containerd sends `HostPort`,
/// `ContainerPort`, `Protocol` and `HostIP` (Go's field names, as for
/// bandwidth), podman and libcni's documentation `hostPort` and so on;
/// the portmap plugin reads both, as Go's JSON decoding does.
fn field<'a>(m: &'a Value, field: &str) -> Option<&'a Value> {
    m.as_object()?
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(field))
        .map(|(_, v)| v)
}

fn port(i: usize, m: &Value, name: &str) -> CniResult<u16> {
    match field(m, name) {
        Some(v) => v
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
            .ok_or_else(|| bad(i, format!("{name} must be a port, 1-65535 (got {v})"))),
        None => Err(bad(i, format!("{name} is missing"))),
    }
}

/// The mappings ADD and DEL act on: none unless ferrite has the
/// capability. A mapping that cannot be served is refused whole (error 7),
/// before anything is touched.
pub fn mappings(conf: &NetConf) -> CniResult<Vec<Mapping>> {
    if !conf.host_ports {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for (i, m) in conf.runtime_config.port_mappings.iter().enumerate() {
        out.extend(mapping(i, m).map_err(|e| e.with_details(m))?);
    }
    Ok(out)
}

/// Entry `i`, `m`: None for a port without a hostPort.
fn mapping(i: usize, m: &Value) -> CniResult<Option<Mapping>> {
    if !m.is_object() {
        return Err(bad(i, "must be an object"));
    }
    // containerd sends every port of the pod's containers, those
    // without a hostPort with none (or 0): they map nothing.
    let host_port = field(m, "hostPort");
    if matches!(host_port, None | Some(Value::Null)) || host_port.and_then(Value::as_u64) == Some(0)
    {
        return Ok(None);
    }
    let host_port = port(i, m, "hostPort")?;
    let container_port = port(i, m, "containerPort")?;
    let proto = match field(m, "protocol") {
        None | Some(Value::Null) => TCP,
        Some(Value::String(p)) => match p.to_ascii_lowercase().as_str() {
            "" | "tcp" => TCP,
            "udp" => UDP,
            other => {
                return Err(bad(
                    i,
                    format!(
                        "protocol {other:?}: ferrite serves TCP and UDP hostPorts (chain the portmap plugin for others)"
                    ),
                ))
            }
        },
        Some(v) => return Err(bad(i, format!("protocol must be a string (got {v})"))),
    };
    let host_ip = match field(m, "hostIP") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => {
            let ip: IpAddr = s
                .parse()
                .map_err(|_| bad(i, format!("hostIP {s:?} is not an IP address")))?;
            // 0.0.0.0 and :: mean every address, as for portmap.
            (!ip.is_unspecified()).then_some(ip)
        }
        Some(v) => return Err(bad(i, format!("hostIP must be a string (got {v})"))),
    };
    Ok(Some(Mapping {
        host_port,
        container_port,
        proto,
        host_ip,
    }))
}

fn unspecified_like(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}

/// The datapath's hostPorts for `mappings` to a pod with addresses `ips`:
/// one per address of the mapping's family (a hostIP of a family the pod
/// has no address of maps nothing, as with portmap).
pub fn host_ports(mappings: &[Mapping], ips: &[IpAddr]) -> Vec<HostPort> {
    let mut out = Vec::new();
    for m in mappings {
        for ip in ips {
            let addr = match m.host_ip {
                Some(h) if h.is_ipv4() != ip.is_ipv4() => continue,
                Some(h) => h,
                None => unspecified_like(*ip),
            };
            out.push(HostPort {
                frontend: Frontend {
                    addr,
                    port: m.host_port,
                    proto: m.proto,
                },
                backend: *ip,
                backend_port: m.container_port,
            });
        }
    }
    out
}

fn maps(dp: &Datapath) -> CniResult<ServiceMaps> {
    dp.service_maps().map_err(|e| {
        CniError::from_error(
            Code::Datapath,
            "cannot open the datapath's Service maps",
            &e,
        )
    })
}

/// Writes `hps`; on a failure removes those it wrote.
pub fn add(dp: &Datapath, hps: &[HostPort]) -> CniResult<()> {
    if hps.is_empty() {
        return Ok(());
    }
    let maps = maps(dp)?;
    for (n, hp) in hps.iter().enumerate() {
        if let Err(e) = maps.add_hostport(hp) {
            remove_with(&maps, &hps[..n]);
            return Err(CniError::from_error(
                Code::Datapath,
                format!("cannot write hostPort {}", describe(hp)),
                &e,
            ));
        }
        log::debug!("hostPort {}", describe(hp));
    }
    Ok(())
}

fn remove_with(maps: &ServiceMaps, hps: &[HostPort]) {
    for hp in hps {
        if let Err(e) = maps.remove_hostport(hp) {
            log::warn!("cannot remove hostPort {}: {e}", describe(hp));
        }
    }
}

/// Removes `hps` where they still point at this pod.
pub fn remove(dp: &Datapath, hps: &[HostPort]) -> CniResult<()> {
    if hps.is_empty() {
        return Ok(());
    }
    let maps = maps(dp)?;
    for hp in hps {
        maps.remove_hostport(hp).map_err(|e| {
            CniError::from_error(
                Code::Datapath,
                format!("cannot remove hostPort {}", describe(hp)),
                &e,
            )
        })?;
    }
    Ok(())
}

/// `0.0.0.0:8080/tcp -> 10.244.1.5:80`, as `ferrite services` shows it.
pub fn describe(hp: &HostPort) -> String {
    format!(
        "{}/{} -> {}",
        socket(hp.frontend.addr, hp.frontend.port),
        proto(hp.frontend.proto),
        socket(hp.backend, hp.backend_port)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn conf(capability: bool, mappings: Value) -> NetConf {
        let caps = if capability {
            r#","capabilities":{"portMappings":true}"#
        } else {
            ""
        };
        let text = format!(
            r#"{{"cniVersion":"1.0.0","name":"n","type":"ferrite","ipam":{{"ranges":[[{{"subnet":"10.1.0.0/24"}}]]}}{caps},"runtimeConfig":{{"portMappings":{mappings}}}}}"#
        );
        NetConf::parse(text.as_bytes()).unwrap()
    }

    #[test]
    fn read_only_with_the_capability() {
        let m = json!([{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]);
        assert!(mappings(&conf(false, m.clone())).unwrap().is_empty());
        assert_eq!(
            mappings(&conf(true, m)).unwrap(),
            vec![Mapping {
                host_port: 8080,
                container_port: 80,
                proto: TCP,
                host_ip: None
            }]
        );
    }

    #[test]
    fn ports_without_a_host_port_map_nothing() {
        // As containerd sends a pod's ports that have no hostPort.
        let m = json!([
            {"containerPort": 8080, "protocol": "tcp"},
            {"hostPort": 0, "containerPort": 9000, "protocol": "udp"},
            {"hostPort": 8081, "containerPort": 81},
        ]);
        let got = mappings(&conf(true, m)).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].host_port, got[0].container_port), (8081, 81));
    }

    #[test]
    fn containerds_capitalised_keys() {
        let m = json!([
            {"HostPort": 0, "ContainerPort": 8080, "Protocol": "tcp", "HostIP": ""},
            {"HostPort": 54321, "ContainerPort": 8080, "Protocol": "udp", "HostIP": "127.0.0.1"},
        ]);
        assert_eq!(
            mappings(&conf(true, m)).unwrap(),
            vec![Mapping {
                host_port: 54321,
                container_port: 8080,
                proto: UDP,
                host_ip: Some("127.0.0.1".parse().unwrap())
            }]
        );
    }

    #[test]
    fn protocols_and_host_ips() {
        let m = json!([
            {"hostPort": 1, "containerPort": 2, "protocol": "UDP", "hostIP": "127.0.0.1"},
            {"hostPort": 3, "containerPort": 4, "hostIP": "0.0.0.0"},
            {"hostPort": 5, "containerPort": 6, "protocol": "", "hostIP": ""},
        ]);
        let got = mappings(&conf(true, m)).unwrap();
        assert_eq!(got[0].proto, UDP);
        assert_eq!(got[0].host_ip, Some("127.0.0.1".parse().unwrap()));
        assert_eq!((got[1].proto, got[1].host_ip), (TCP, None));
        assert_eq!((got[2].proto, got[2].host_ip), (TCP, None));
    }

    #[test]
    fn bad_mappings_are_refused_with_their_index() {
        for (m, says) in [
            (
                json!([{"hostPort": 1, "containerPort": 2}, {"hostPort": -1, "containerPort": 80}]),
                "[1]: hostPort must be a port",
            ),
            (
                json!([{"hostPort": 70000, "containerPort": 80}]),
                "hostPort must be a port",
            ),
            (
                json!([{"hostPort": 80, "containerPort": "x"}]),
                "containerPort must be a port",
            ),
            (
                json!([{"hostPort": 80, "containerPort": 80, "protocol": "sctp"}]),
                "\"sctp\": ferrite serves TCP and UDP",
            ),
            (
                json!([{"hostPort": 80, "containerPort": 80, "hostIP": "node"}]),
                "hostIP \"node\" is not an IP address",
            ),
            (json!([7]), "[0]: must be an object"),
        ] {
            let e = mappings(&conf(true, m)).unwrap_err();
            assert_eq!(e.code, Code::InvalidConfig);
            assert!(e.msg.contains(says), "{} does not say {says}", e.msg);
        }
    }

    #[test]
    fn one_frontend_per_address_of_the_family() {
        let ips: Vec<IpAddr> = vec!["10.1.0.5".parse().unwrap(), "fd00::5".parse().unwrap()];
        let every = Mapping {
            host_port: 8080,
            container_port: 80,
            proto: TCP,
            host_ip: None,
        };
        let v6_only = Mapping {
            host_ip: Some("fd00::1".parse().unwrap()),
            proto: UDP,
            ..every
        };
        let got: Vec<String> = host_ports(&[every, v6_only], &ips)
            .iter()
            .map(describe)
            .collect();
        assert_eq!(
            got,
            [
                "0.0.0.0:8080/tcp -> 10.1.0.5:80",
                "[::]:8080/tcp -> [fd00::5]:80",
                "[fd00::1]:8080/udp -> [fd00::5]:80",
            ]
        );
        // A hostIP of a family the pod has no address of maps nothing.
        assert!(host_ports(&[v6_only], &ips[..1]).is_empty());
    }
}
