//! The network configuration ferrite reads from stdin, and the CNI_*
//! environment. Both are validated before anything on the host is touched.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::error::{CniError, CniResult, Code};
use crate::version;

pub const DEFAULT_BPFFS_ROOT: &str = "/sys/fs/bpf/ferrite";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/ferrite";
pub const DEFAULT_LOG_FILE: &str = "/var/log/ferrite/cni.log";
pub const DEFAULT_MTU: u32 = 1500;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
}

/// The IPAM section: built in (no type, or "ferrite"), or delegated.
#[derive(Clone, Debug, PartialEq)]
pub enum Ipam {
    Builtin {
        ranges: Vec<Vec<ferrite_ipam::RangeConfig>>,
    },
    Delegated {
        plugin: String,
    },
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Bandwidth {
    // containerd sends these capitalised (IngressRate), libcni's docs and
    // podman in camelCase: accept both.
    #[serde(default, alias = "IngressRate")]
    pub ingress_rate: Option<u64>,
    #[serde(default, alias = "IngressBurst")]
    pub ingress_burst: Option<u64>,
    #[serde(default, alias = "EgressRate")]
    pub egress_rate: Option<u64>,
    #[serde(default, alias = "EgressBurst")]
    pub egress_burst: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeConfig {
    /// The `ips` capability: addresses the runtime asks for, CIDR or plain.
    #[serde(default)]
    pub ips: Vec<String>,
    #[serde(default)]
    pub bandwidth: Option<Bandwidth>,
    /// The `portMappings` capability, checked only where ferrite has it
    /// (hostport.rs): a conflist chaining portmap may pass them on.
    #[serde(default)]
    pub port_mappings: Vec<Value>,
}

/// One `{"containerID": .., "ifname": ..}` of `cni.dev/valid-attachments`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// GSO and GRO maximum for IPv4 on a pod's veth pair with `bigTcp`:
/// three times the 64 KiB a packet may otherwise have, as Cilium uses.
pub const BIG_TCP_SIZE: u32 = 196_608;

/// The plugin's network configuration, validated.
#[derive(Clone, Debug)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub mtu: u32,
    pub ipam: Ipam,
    pub bpffs_root: PathBuf,
    pub state_dir: PathBuf,
    pub log_file: Option<PathBuf>,
    pub log_level: LogLevel,
    /// `chainedBandwidth`: the reference `bandwidth` plugin follows in the
    /// chain and shapes; ferrite installs no qdisc and attaches with TCX so
    /// that the plugin's `ingress` qdisc can coexist.
    pub chained_bandwidth: bool,
    /// `bigTcp`: IPv4 BIG TCP on the pod's veth pair (GSO and GRO up to
    /// [`BIG_TCP_SIZE`]), for nodes whose uplinks carry such packets.
    pub big_tcp: bool,
    /// `capabilities.portMappings`: ferrite, not a chained portmap, serves
    /// the pod's hostPorts.
    pub host_ports: bool,
    pub runtime_config: RuntimeConfig,
    /// Addresses from `args.cni.ips`.
    pub args_ips: Vec<String>,
    pub prev_result: Option<Value>,
    pub valid_attachments: Option<Vec<Attachment>>,
    /// The configuration exactly as received, for a delegated IPAM plugin.
    pub raw: Vec<u8>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConf {
    cni_version: Option<String>,
    #[serde(default)]
    cni_versions: Option<Vec<String>>,
    name: Option<String>,
    #[serde(rename = "type")]
    plugin_type: Option<String>,
    #[serde(default)]
    mtu: Option<u32>,
    #[serde(default)]
    ipam: Option<RawIpam>,
    #[serde(default)]
    bpffs_root: Option<String>,
    #[serde(default)]
    state_dir: Option<String>,
    #[serde(default)]
    log_file: Option<String>,
    #[serde(default)]
    log_level: Option<LogLevel>,
    #[serde(default)]
    chained_bandwidth: Option<bool>,
    #[serde(default)]
    big_tcp: Option<bool>,
    #[serde(default)]
    runtime_config: Option<RuntimeConfig>,
    #[serde(default)]
    capabilities: Option<Value>,
    #[serde(default)]
    args: Option<Value>,
    #[serde(default)]
    prev_result: Option<Value>,
    #[serde(default, rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<Attachment>>,
}

#[derive(Deserialize)]
struct RawIpam {
    #[serde(default, rename = "type")]
    ipam_type: Option<String>,
    #[serde(default)]
    ranges: Option<Vec<Vec<ferrite_ipam::RangeConfig>>>,
    #[serde(default)]
    subnet: Option<String>,
}

fn bad(msg: impl Into<String>) -> CniError {
    CniError::new(Code::InvalidConfig, msg)
}

/// The version to answer in when the configuration itself cannot be read.
pub fn sniff_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_string))
        .filter(|v| version::SUPPORTED.contains(&v.as_str()))
        .unwrap_or_else(|| version::LATEST.to_string())
}

impl NetConf {
    pub fn parse(stdin: &[u8]) -> CniResult<Self> {
        let value: Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(Code::Decode, "network configuration is not valid JSON").with_details(e)
        })?;
        if !value.is_object() {
            return Err(CniError::new(
                Code::Decode,
                "network configuration is not a JSON object",
            ));
        }
        let raw: RawConf = serde_json::from_value(value)
            .map_err(|e| bad("invalid network configuration").with_details(e))?;

        let cni_version = match (raw.cni_version, raw.cni_versions) {
            (Some(v), _) => v,
            (None, Some(list)) => version::negotiate(&list)
                .ok_or_else(|| {
                    CniError::new(
                        Code::IncompatibleVersion,
                        format!("none of cniVersions {list:?} is supported"),
                    )
                })?
                .to_string(),
            (None, None) => return Err(bad("cniVersion is missing")),
        };
        version::require_supported(&cni_version)?;

        let name = raw.name.ok_or_else(|| bad("name is missing"))?;
        validate_network_name(&name)?;
        if let Some(t) = &raw.plugin_type {
            if t.is_empty() {
                return Err(bad("type is empty"));
            }
        }
        let mtu = raw.mtu.unwrap_or(DEFAULT_MTU);
        if !(68..=65535).contains(&mtu) {
            return Err(bad(format!("mtu {mtu} is outside 68..=65535")));
        }

        let ipam = match raw.ipam {
            None => return Err(bad("ipam is missing")),
            Some(i) => match i.ipam_type.as_deref() {
                None | Some("ferrite") => {
                    let ranges = match (i.ranges, i.subnet) {
                        (Some(r), _) if !r.is_empty() => r,
                        (_, Some(subnet)) => vec![vec![ferrite_ipam::RangeConfig {
                            subnet,
                            range_start: None,
                            range_end: None,
                            gateway: None,
                        }]],
                        _ => return Err(bad("ipam.ranges is missing or empty")),
                    };
                    Ipam::Builtin { ranges }
                }
                Some(plugin) => {
                    validate_plugin_name(plugin)?;
                    Ipam::Delegated {
                        plugin: plugin.to_string(),
                    }
                }
            },
        };

        let bpffs_root = abs_path("bpffsRoot", raw.bpffs_root.as_deref(), DEFAULT_BPFFS_ROOT)?;
        let state_dir = abs_path("stateDir", raw.state_dir.as_deref(), DEFAULT_STATE_DIR)?;
        let log_file = match raw.log_file.as_deref() {
            Some("") => None,
            other => Some(abs_path("logFile", other, DEFAULT_LOG_FILE)?),
        };

        let args_ips = raw
            .args
            .as_ref()
            .and_then(|a| a.get("cni")?.get("ips"))
            .map(|ips| {
                serde_json::from_value::<Vec<String>>(ips.clone())
                    .map_err(|e| bad("args.cni.ips must be a list of strings").with_details(e))
            })
            .transpose()?
            .unwrap_or_default();

        Ok(Self {
            cni_version,
            name,
            mtu,
            ipam,
            bpffs_root,
            state_dir,
            log_file,
            log_level: raw.log_level.unwrap_or(LogLevel::Info),
            chained_bandwidth: raw.chained_bandwidth.unwrap_or(false),
            big_tcp: raw.big_tcp.unwrap_or(false),
            host_ports: raw
                .capabilities
                .as_ref()
                .and_then(|c| c.get("portMappings"))
                .and_then(Value::as_bool)
                .unwrap_or(false),
            runtime_config: raw.runtime_config.unwrap_or_default(),
            args_ips,
            prev_result: raw.prev_result,
            valid_attachments: raw.valid_attachments,
            raw: stdin.to_vec(),
        })
    }

    /// The built-in pool, validated (a subnet that does not parse is error 7).
    pub fn pool(&self) -> CniResult<Option<ferrite_ipam::Pool>> {
        match &self.ipam {
            Ipam::Builtin { ranges } => ferrite_ipam::Pool::from_config(ranges)
                .map(Some)
                .map_err(|e| bad(format!("ipam.ranges: {e}"))),
            Ipam::Delegated { .. } => Ok(None),
        }
    }
}

/// A network name becomes a directory name: no separators, no dot-dot.
pub fn validate_network_name(name: &str) -> CniResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(bad(format!(
            "network name {name:?} must be 1-128 characters of [A-Za-z0-9_.-], not starting with '.'"
        )))
    }
}

fn validate_plugin_name(name: &str) -> CniResult<()> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(bad(format!("ipam.type {name:?} is not a plugin name")))
    }
}

fn abs_path(key: &str, value: Option<&str>, default: &str) -> CniResult<PathBuf> {
    let p = Path::new(value.unwrap_or(default));
    if !p.is_absolute() || p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(bad(format!(
            "{key} {:?} must be an absolute path without '..'",
            p.display()
        )));
    }
    Ok(p.to_path_buf())
}

/// The CNI command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

/// The CNI_* environment, validated.
#[derive(Clone, Debug)]
pub struct CniEnv {
    pub command: Command,
    pub container_id: String,
    pub netns: Option<PathBuf>,
    pub ifname: String,
    pub args: CniArgs,
    pub path: Vec<PathBuf>,
}

/// CNI_ARGS: `K=V;K=V`. ferrite reads `IP` (static addresses, as podman
/// sends them) and keeps the K8S_POD_* pairs for its log.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CniArgs {
    pub ips: Vec<IpAddr>,
    pub pairs: Vec<(String, String)>,
}

impl CniArgs {
    /// (K8S_POD_NAMESPACE, K8S_POD_NAME) when the runtime sent both.
    pub fn pod(&self) -> Option<(&str, &str)> {
        let get = |k: &str| {
            self.pairs
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        Some((get("K8S_POD_NAMESPACE")?, get("K8S_POD_NAME")?))
    }
}

fn bad_env(msg: impl Into<String>) -> CniError {
    CniError::new(Code::InvalidEnvironment, msg)
}

pub fn parse_command(s: Option<&str>) -> CniResult<Command> {
    match s {
        Some("ADD") => Ok(Command::Add),
        Some("DEL") => Ok(Command::Del),
        Some("CHECK") => Ok(Command::Check),
        Some("STATUS") => Ok(Command::Status),
        Some("GC") => Ok(Command::Gc),
        Some("VERSION") => Ok(Command::Version),
        Some(other) => Err(bad_env(format!("unknown CNI_COMMAND {other:?}"))),
        None => Err(bad_env("CNI_COMMAND is not set")),
    }
}

impl CniEnv {
    pub fn from_map<S: BuildHasher>(env: &HashMap<String, String, S>) -> CniResult<Self> {
        let get = |k: &str| env.get(k).map(String::as_str);
        let command = parse_command(get("CNI_COMMAND"))?;
        let per_container = matches!(command, Command::Add | Command::Del | Command::Check);

        let container_id = get("CNI_CONTAINERID").unwrap_or("").to_string();
        let ifname = get("CNI_IFNAME").unwrap_or("").to_string();
        if per_container {
            validate_container_id(&container_id)?;
            validate_ifname(&ifname)?;
        }
        let netns = match get("CNI_NETNS") {
            Some(p) if !p.is_empty() => {
                let p = PathBuf::from(p);
                if !p.is_absolute() {
                    return Err(bad_env(format!(
                        "CNI_NETNS {:?} is not an absolute path",
                        p.display()
                    )));
                }
                Some(p)
            }
            _ => None,
        };
        if matches!(command, Command::Add | Command::Check) && netns.is_none() {
            return Err(bad_env("CNI_NETNS is required for ADD and CHECK"));
        }
        let args = parse_cni_args(get("CNI_ARGS").unwrap_or(""))?;
        let path = get("CNI_PATH")
            .unwrap_or("")
            .split(':')
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
            .collect();
        Ok(Self {
            command,
            container_id,
            netns,
            ifname,
            args,
            path,
        })
    }
}

/// The spec's rule: alphanumeric first, then alphanumerics, `_`, `.`, `-`.
pub fn validate_container_id(id: &str) -> CniResult<()> {
    let mut bytes = id.bytes();
    let ok = id.len() <= 256
        && bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
        && bytes.all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(bad_env(format!(
            "CNI_CONTAINERID {id:?} must be 1-256 characters: alphanumeric, then [A-Za-z0-9_.-]"
        )))
    }
}

/// The kernel's rules for a device name (dev_valid_name): 1-15 bytes, not
/// "." or "..", no '/', ':' or whitespace.
pub fn validate_ifname(name: &str) -> CniResult<()> {
    let ok = !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && !name.bytes().any(|b| {
            b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0 || !b.is_ascii_graphic()
        });
    if ok {
        Ok(())
    } else {
        Err(bad_env(format!(
            "CNI_IFNAME {name:?} is not a valid interface name (1-15 bytes, no '/', ':' or spaces)"
        )))
    }
}

pub fn parse_cni_args(s: &str) -> CniResult<CniArgs> {
    let mut args = CniArgs::default();
    for pair in s.split(';').filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| bad_env(format!("CNI_ARGS: {pair:?} is not KEY=VALUE")))?;
        if k.is_empty() {
            return Err(bad_env(format!("CNI_ARGS: {pair:?} has an empty key")));
        }
        if k == "IP" {
            for ip in v.split(',').filter(|s| !s.is_empty()) {
                let ip: IpAddr = ip
                    .parse()
                    .map_err(|_| bad_env(format!("CNI_ARGS: IP={ip:?} is not an IP address")))?;
                args.ips.push(ip);
            }
        }
        args.pairs.push((k.to_string(), v.to_string()));
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(extra: &str) -> Vec<u8> {
        format!(
            r#"{{"cniVersion":"1.1.0","name":"net1","type":"ferrite",
               "ipam":{{"ranges":[[{{"subnet":"10.244.1.0/24"}}]]}}{extra}}}"#
        )
        .into_bytes()
    }

    #[test]
    fn parses_minimal_with_defaults() {
        let c = NetConf::parse(&conf("")).unwrap();
        assert_eq!(c.name, "net1");
        assert_eq!(c.mtu, 1500);
        assert_eq!(c.bpffs_root, PathBuf::from(DEFAULT_BPFFS_ROOT));
        assert_eq!(c.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert!(matches!(c.ipam, Ipam::Builtin { .. }));
        assert_eq!(c.log_level, LogLevel::Info);
        assert!(!c.chained_bandwidth);
    }

    #[test]
    fn ignores_unknown_keys_rejects_wrong_types() {
        assert!(NetConf::parse(&conf(r#","somethingNew":{"a":1}"#)).is_ok());
        let e = NetConf::parse(&conf(r#","mtu":"big""#)).unwrap_err();
        assert_eq!(e.code, Code::InvalidConfig);
        let e = NetConf::parse(&conf(r#","mtu":20"#)).unwrap_err();
        assert_eq!(e.code, Code::InvalidConfig);
        let e = NetConf::parse(&conf(r#","chainedBandwidth":"yes""#)).unwrap_err();
        assert_eq!(e.code, Code::InvalidConfig);
        assert!(
            NetConf::parse(&conf(r#","chainedBandwidth":true"#))
                .unwrap()
                .chained_bandwidth
        );
    }

    #[test]
    fn malformed_json_is_decode_error() {
        assert_eq!(NetConf::parse(b"{not json").unwrap_err().code, Code::Decode);
        assert_eq!(NetConf::parse(b"[1,2]").unwrap_err().code, Code::Decode);
        assert_eq!(NetConf::parse(b"").unwrap_err().code, Code::Decode);
    }

    #[test]
    fn version_rules() {
        let e =
            NetConf::parse(br#"{"cniVersion":"0.2.0","name":"n","ipam":{"subnet":"10.0.0.0/24"}}"#)
                .unwrap_err();
        assert_eq!(e.code, Code::IncompatibleVersion);
        let c = NetConf::parse(
            br#"{"cniVersions":["0.4.0","1.0.0"],"name":"n","ipam":{"subnet":"10.0.0.0/24"}}"#,
        )
        .unwrap();
        assert_eq!(c.cni_version, "1.0.0");
        let e = NetConf::parse(br#"{"name":"n","ipam":{"subnet":"10.0.0.0/24"}}"#).unwrap_err();
        assert_eq!(e.code, Code::InvalidConfig);
    }

    #[test]
    fn names_and_paths_cannot_escape() {
        for name in ["../etc", "a/b", ".hidden", "", "x y"] {
            let c = format!(
                r#"{{"cniVersion":"1.1.0","name":{name:?},"ipam":{{"subnet":"10.0.0.0/24"}}}}"#
            );
            assert_eq!(
                NetConf::parse(c.as_bytes()).unwrap_err().code,
                Code::InvalidConfig,
                "{name}"
            );
        }
        let e = NetConf::parse(&conf(r#","stateDir":"/var/lib/../../etc""#)).unwrap_err();
        assert_eq!(e.code, Code::InvalidConfig);
        let e = NetConf::parse(&conf(r#","bpffsRoot":"relative""#)).unwrap_err();
        assert_eq!(e.code, Code::InvalidConfig);
    }

    #[test]
    fn delegated_ipam() {
        let c = NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"n","ipam":{"type":"host-local","subnet":"10.0.0.0/24"}}"#,
        )
        .unwrap();
        assert_eq!(
            c.ipam,
            Ipam::Delegated {
                plugin: "host-local".into()
            }
        );
        let e =
            NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","ipam":{"type":"../../bin/sh"}}"#)
                .unwrap_err();
        assert_eq!(e.code, Code::InvalidConfig);
    }

    #[test]
    fn bad_subnet_is_config_error() {
        let c = NetConf::parse(
            br#"{"cniVersion":"1.1.0","name":"n","ipam":{"ranges":[[{"subnet":"10.0.0/24"}]]}}"#,
        )
        .unwrap();
        assert_eq!(c.pool().unwrap_err().code, Code::InvalidConfig);
    }

    #[test]
    fn runtime_config_and_args() {
        let c = NetConf::parse(&conf(
            r#","runtimeConfig":{"ips":["10.244.1.9/24"],"portMappings":[{"hostPort":8080}]},"args":{"cni":{"ips":["10.244.1.10"]}}"#,
        ))
        .unwrap();
        assert_eq!(c.runtime_config.ips, vec!["10.244.1.9/24".to_string()]);
        assert_eq!(c.args_ips, vec!["10.244.1.10".to_string()]);
        // containerd's capitalised bandwidth keys.
        let c = NetConf::parse(&conf(
            r#","runtimeConfig":{"bandwidth":{"IngressRate":10000000,"IngressBurst":4294967295,"EgressRate":0,"EgressBurst":0}}"#,
        ))
        .unwrap();
        let bw = c.runtime_config.bandwidth.unwrap();
        assert_eq!(bw.ingress_rate, Some(10_000_000));
        assert_eq!(bw.egress_rate, Some(0));
    }

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn env_validation() {
        let ok = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc-123_x.y"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=p;IP=10.0.0.5"),
            ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
        ]);
        let e = CniEnv::from_map(&ok).unwrap();
        assert_eq!(e.command, Command::Add);
        assert_eq!(e.args.ips, vec!["10.0.0.5".parse::<IpAddr>().unwrap()]);
        assert_eq!(e.path.len(), 2);

        let with = |k: &str, v: &str| {
            let mut m = ok.clone();
            m.insert(k.into(), v.into());
            CniEnv::from_map(&m).map(|_| ()).unwrap_err().code
        };
        assert_eq!(with("CNI_COMMAND", "FROB"), Code::InvalidEnvironment);
        assert_eq!(
            with("CNI_CONTAINERID", "../../etc"),
            Code::InvalidEnvironment
        );
        assert_eq!(with("CNI_CONTAINERID", ""), Code::InvalidEnvironment);
        assert_eq!(
            with("CNI_IFNAME", "a-very-long-interface"),
            Code::InvalidEnvironment
        );
        assert_eq!(with("CNI_IFNAME", "eth/0"), Code::InvalidEnvironment);
        assert_eq!(with("CNI_IFNAME", ".."), Code::InvalidEnvironment);
        assert_eq!(with("CNI_NETNS", ""), Code::InvalidEnvironment);
        assert_eq!(with("CNI_NETNS", "relative/ns"), Code::InvalidEnvironment);
        assert_eq!(with("CNI_ARGS", "IP=notanip"), Code::InvalidEnvironment);
        assert_eq!(with("CNI_ARGS", "garbage"), Code::InvalidEnvironment);

        let mut del = ok.clone();
        del.insert("CNI_COMMAND".into(), "DEL".into());
        del.insert("CNI_NETNS".into(), "".into());
        assert!(CniEnv::from_map(&del).unwrap().netns.is_none());
    }

    /// Every example in conf/ parses, as a runtime would hand each plugin
    /// entry to ferrite (cniVersion and name copied from the list).
    #[test]
    fn every_example_in_conf_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            let list: Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let plugins = match list.get("plugins") {
                Some(p) => p.as_array().unwrap().clone(),
                None => vec![list.clone()],
            };
            for mut plugin in plugins {
                if plugin["type"] != "ferrite" {
                    continue;
                }
                plugin["cniVersion"] = list["cniVersion"].clone();
                plugin["name"] = list["name"].clone();
                let conf = NetConf::parse(&serde_json::to_vec(&plugin).unwrap())
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                conf.pool()
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                seen += 1;
            }
        }
        assert!(seen >= 1, "no ferrite configuration found in conf/");
    }
}
