//! The CNI result: what ADD hands back, shaped for the requested version,
//! and the prevResult that CHECK and chained plugins read.

use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{CniError, CniResult, Code};
use crate::version::Version;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpConfig {
    pub address: IpNetwork,
    pub gateway: Option<IpAddr>,
    pub interface: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteEntry {
    pub dst: IpNetwork,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub domain: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

/// A version-neutral result.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CniOutput {
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<RouteEntry>,
    pub dns: Dns,
}

impl CniOutput {
    /// Renders the result JSON for `cni_version`.
    pub fn to_json(&self, cni_version: &str) -> Value {
        let v = Version::parse(cni_version).unwrap_or(Version(1, 1, 0));
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|ip| {
                let mut o = json!({ "address": ip.address.to_string() });
                if v.ip_version_field() {
                    o["version"] = json!(if ip.address.is_ipv4() { "4" } else { "6" });
                }
                if let Some(gw) = ip.gateway {
                    o["gateway"] = json!(gw.to_string());
                }
                if let Some(i) = ip.interface {
                    o["interface"] = json!(i);
                }
                o
            })
            .collect();
        let interfaces: Vec<Value> = self
            .interfaces
            .iter()
            .map(|i| {
                let mut o = serde_json::to_value(i).unwrap_or_else(|_| json!({}));
                // `mtu` in interfaces arrived with 1.1.0.
                if v < Version(1, 1, 0) {
                    if let Some(m) = o.as_object_mut() {
                        m.remove("mtu");
                    }
                }
                o
            })
            .collect();
        let mut out = json!({
            "cniVersion": cni_version,
            "interfaces": interfaces,
            "ips": ips,
        });
        if !self.routes.is_empty() {
            out["routes"] = serde_json::to_value(&self.routes).unwrap_or(Value::Null);
        }
        out["dns"] = serde_json::to_value(&self.dns).unwrap_or_else(|_| json!({}));
        out
    }

    /// Parses a result of any supported version (prevResult, or a delegated
    /// IPAM plugin's answer).
    pub fn from_json(v: &Value) -> CniResult<Self> {
        #[derive(Deserialize)]
        struct RawIp {
            address: String,
            #[serde(default)]
            gateway: Option<String>,
            #[serde(default)]
            interface: Option<usize>,
        }
        #[derive(Deserialize)]
        struct Raw {
            #[serde(default)]
            interfaces: Vec<Interface>,
            #[serde(default)]
            ips: Vec<RawIp>,
            #[serde(default)]
            routes: Vec<RouteEntry>,
            #[serde(default)]
            dns: Dns,
        }
        let bad =
            |what: String| CniError::new(Code::InvalidConfig, format!("invalid result: {what}"));
        let raw: Raw = serde_json::from_value(v.clone()).map_err(|e| bad(e.to_string()))?;
        let mut ips = Vec::with_capacity(raw.ips.len());
        for ip in raw.ips {
            let address: IpNetwork = ip
                .address
                .contains('/')
                .then(|| ip.address.parse().ok())
                .flatten()
                .ok_or_else(|| bad(format!("address {:?} is not CIDR notation", ip.address)))?;
            let gateway = match ip.gateway {
                Some(g) if !g.is_empty() => Some(
                    g.parse()
                        .map_err(|_| bad(format!("gateway {g:?} is not an IP address")))?,
                ),
                _ => None,
            };
            if let Some(i) = ip.interface {
                if i >= raw.interfaces.len() {
                    return Err(bad(format!("ips[].interface {i} names no interface")));
                }
            }
            ips.push(IpConfig {
                address,
                gateway,
                interface: ip.interface,
            });
        }
        Ok(Self {
            interfaces: raw.interfaces,
            ips,
            routes: raw.routes,
            dns: raw.dns,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CniOutput {
        CniOutput {
            interfaces: vec![
                Interface {
                    name: "fer0123456789ab".into(),
                    mac: "02:00:00:00:00:01".into(),
                    mtu: Some(1500),
                    sandbox: None,
                },
                Interface {
                    name: "eth0".into(),
                    mac: "02:00:00:00:00:02".into(),
                    mtu: Some(1500),
                    sandbox: Some("/var/run/netns/x".into()),
                },
            ],
            ips: vec![IpConfig {
                address: "10.244.1.5/32".parse().unwrap(),
                gateway: Some("169.254.1.1".parse().unwrap()),
                interface: Some(1),
            }],
            routes: vec![RouteEntry {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: Some("169.254.1.1".parse().unwrap()),
            }],
            dns: Dns::default(),
        }
    }

    #[test]
    fn shapes_pre_1_0_with_version_field() {
        for v in ["0.3.0", "0.3.1", "0.4.0"] {
            let j = sample().to_json(v);
            assert_eq!(j["cniVersion"], v);
            assert_eq!(j["ips"][0]["version"], "4");
            assert_eq!(j["ips"][0]["interface"], 1);
            assert!(j["interfaces"][0].get("mtu").is_none());
        }
    }

    #[test]
    fn shapes_1_x_without_version_field() {
        let j = sample().to_json("1.0.0");
        assert!(j["ips"][0].get("version").is_none());
        assert!(j["interfaces"][1].get("mtu").is_none());
        let j = sample().to_json("1.1.0");
        assert_eq!(j["interfaces"][1]["mtu"], 1500);
        assert_eq!(j["interfaces"][1]["sandbox"], "/var/run/netns/x");
        assert!(j["interfaces"][0].get("sandbox").is_none());
        assert_eq!(j["routes"][0]["dst"], "0.0.0.0/0");
    }

    #[test]
    fn round_trips_every_version() {
        for v in crate::version::SUPPORTED {
            let back = CniOutput::from_json(&sample().to_json(v)).unwrap();
            assert_eq!(back.ips, sample().ips);
            assert_eq!(back.routes, sample().routes);
        }
    }

    #[test]
    fn rejects_bad_prev_result() {
        let bad = json!({"ips": [{"address": "10.0.0.1"}]});
        assert_eq!(
            CniOutput::from_json(&bad).unwrap_err().code,
            Code::InvalidConfig
        );
        let bad = json!({"interfaces": [], "ips": [{"address": "10.0.0.1/32", "interface": 3}]});
        assert_eq!(
            CniOutput::from_json(&bad).unwrap_err().code,
            Code::InvalidConfig
        );
        let bad = json!({"ips": "nope"});
        assert!(CniOutput::from_json(&bad).is_err());
    }
}
