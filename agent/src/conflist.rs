// SPDX-License-Identifier: Apache-2.0
//! The network configuration the agent writes for the runtime: ferrite with
//! the node's pod CIDRs as its ranges, serving Kubernetes hostPorts itself
//! (the portMappings capability), or with the reference `portmap` plugin
//! chained after it for them.

use std::path::PathBuf;

use ipnetwork::IpNetwork;
use serde_json::{json, Value};

use crate::node::ordered_cidrs;

/// The file name in the CNI configuration directory. containerd loads the
/// first file in sort order, so a name starting "10-" wins over most.
pub const FILE_NAME: &str = "10-ferrite.conflist";

/// The network's name, which also names its IPAM store.
pub const NETWORK_NAME: &str = "ferrite";

/// What the conflist is made of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConflistParams {
    pub pod_cidrs: Vec<IpNetwork>,
    pub mtu: u32,
    pub bpffs_root: PathBuf,
    pub state_dir: PathBuf,
    pub log_file: PathBuf,
    pub log_level: &'static str,
    pub big_tcp: bool,
    /// ferrite has the portMappings capability; else portmap follows it.
    pub host_ports: bool,
}

/// The conflist, pretty-printed with a final newline. One range set per
/// pod CIDR, IPv4 first, so a dual-stack pod gets one address of each.
///
/// `cniVersion` 1.0.0 with `cniVersions` [1.0.0, 1.1.0], like
/// conf/10-ferrite.conflist: containerd 1.6 reads results up to 1.0.0, and
/// a runtime that knows `cniVersions` gets STATUS and GC.
pub fn render(p: &ConflistParams) -> String {
    let ranges: Vec<Value> = ordered_cidrs(&p.pod_cidrs)
        .iter()
        .map(|c| json!([{ "subnet": c.to_string() }]))
        .collect();
    let mut conf = json!({
        "cniVersion": "1.0.0",
        "cniVersions": ["1.0.0", "1.1.0"],
        "name": NETWORK_NAME,
        "plugins": [
            {
                "type": "ferrite",
                "mtu": p.mtu,
                "ipam": { "ranges": ranges },
                "bpffsRoot": p.bpffs_root,
                "stateDir": p.state_dir,
                "logFile": p.log_file,
                "logLevel": p.log_level,
                "capabilities": { "bandwidth": true }
            }
        ]
    });
    if p.host_ports {
        conf["plugins"][0]["capabilities"]["portMappings"] = json!(true);
    } else {
        conf["plugins"]
            .as_array_mut()
            .expect("plugins is a list")
            .push(json!({ "type": "portmap", "capabilities": { "portMappings": true } }));
    }
    // Only when on: a conflist written before the setting existed stays
    // byte for byte what it was.
    if p.big_tcp {
        conf["plugins"][0]["bigTcp"] = json!(true);
    }
    let mut text = serde_json::to_string_pretty(&conf).expect("a JSON value serialises");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(cidrs: &[&str]) -> ConflistParams {
        ConflistParams {
            pod_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            mtu: 1450,
            bpffs_root: "/sys/fs/bpf/ferrite".into(),
            state_dir: "/var/lib/ferrite".into(),
            log_file: "/var/log/ferrite/cni.log".into(),
            log_level: "info",
            big_tcp: false,
            host_ports: false,
        }
    }

    fn parsed(p: &ConflistParams) -> Value {
        serde_json::from_str(&render(p)).unwrap()
    }

    #[test]
    fn single_stack() {
        let v = parsed(&params(&["10.244.1.0/24"]));
        assert_eq!(v["name"], "ferrite");
        assert_eq!(v["cniVersion"], "1.0.0");
        let ferrite = &v["plugins"][0];
        assert_eq!(ferrite["type"], "ferrite");
        assert_eq!(ferrite["mtu"], 1450);
        assert_eq!(
            ferrite["ipam"]["ranges"],
            json!([[{ "subnet": "10.244.1.0/24" }]])
        );
        assert_eq!(ferrite["bpffsRoot"], "/sys/fs/bpf/ferrite");
        assert_eq!(ferrite["stateDir"], "/var/lib/ferrite");
        assert_eq!(ferrite["logLevel"], "info");
        let debug = ConflistParams {
            log_level: "debug",
            ..params(&["10.244.1.0/24"])
        };
        assert_eq!(parsed(&debug)["plugins"][0]["logLevel"], "debug");
        assert!(ferrite.get("bigTcp").is_none());
        let big = ConflistParams {
            big_tcp: true,
            ..params(&["10.244.1.0/24"])
        };
        assert_eq!(parsed(&big)["plugins"][0]["bigTcp"], true);
    }

    #[test]
    fn dual_stack_puts_ipv4_first() {
        let v = parsed(&params(&["fd00:244:1::/64", "10.244.1.0/24"]));
        assert_eq!(
            v["plugins"][0]["ipam"]["ranges"],
            json!([[{ "subnet": "10.244.1.0/24" }], [{ "subnet": "fd00:244:1::/64" }]])
        );
    }

    #[test]
    fn portmap_is_chained_after_ferrite_with_its_capability() {
        let v = parsed(&params(&["10.244.1.0/24"]));
        let plugins = v["plugins"].as_array().unwrap();
        assert_eq!(plugins.len(), 2);
        assert_eq!(plugins[1]["type"], "portmap");
        assert_eq!(plugins[1]["capabilities"], json!({ "portMappings": true }));
        assert_eq!(plugins[0]["capabilities"], json!({ "bandwidth": true }));
    }

    #[test]
    fn host_ports_in_the_datapath_take_portmap_out_of_the_chain() {
        let v = parsed(&ConflistParams {
            host_ports: true,
            ..params(&["10.244.1.0/24"])
        });
        let plugins = v["plugins"].as_array().unwrap();
        assert_eq!(plugins.len(), 1);
        assert_eq!(
            plugins[0]["capabilities"],
            json!({ "bandwidth": true, "portMappings": true })
        );
    }

    #[test]
    fn rendering_is_stable() {
        let p = params(&["10.244.1.0/24", "fd00:244:1::/64"]);
        assert_eq!(render(&p), render(&p.clone()));
        assert!(render(&p).ends_with("}\n"));
    }

    #[test]
    fn keeps_the_shape_of_the_example_conflist() {
        // Every key of conf/10-ferrite.conflist's ferrite entry is written,
        // with the example's values where the agent has no reason to differ.
        let example: Value =
            serde_json::from_str(include_str!("../../conf/10-ferrite.conflist")).unwrap();
        let ours = parsed(&params(&["10.244.1.0/24"]));
        assert_eq!(ours["cniVersion"], example["cniVersion"]);
        assert_eq!(ours["cniVersions"], example["cniVersions"]);
        let (e, o) = (&example["plugins"][0], &ours["plugins"][0]);
        for (key, value) in e.as_object().unwrap() {
            assert!(o.get(key).is_some(), "missing {key}");
            if !matches!(key.as_str(), "mtu" | "ipam") {
                assert_eq!(&o[key], value, "{key}");
            }
        }
    }
}
