// SPDX-License-Identifier: Apache-2.0
//! The agent's settings: flags, each with an environment variable as
//! fallback (so a DaemonSet can set them from a ConfigMap), then defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnetwork::IpNetwork;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("unknown flag {0}")]
    UnknownFlag(String),
    #[error("{flag} needs a value")]
    MissingValue { flag: String },
    #[error("{flag}: {value:?} is not {expected}")]
    BadValue {
        flag: String,
        value: String,
        expected: &'static str,
    },
    #[error("{0}")]
    Invalid(String),
}

/// Everything `ferrite-agent run` and `uninstall` are told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// This node's name (NODE_NAME, from the downward API).
    pub node_name: Option<String>,
    /// A kubeconfig; without one the in-cluster config (or KUBECONFIG).
    pub kubeconfig: Option<PathBuf>,
    pub bpffs_root: PathBuf,
    /// The ferrite CNI binary to install, or a directory holding it and the
    /// reference plugins the conflist chains (empty: install nothing).
    pub plugin_source: PathBuf,
    pub cni_bin_dir: PathBuf,
    pub cni_conf_dir: PathBuf,
    /// The plugin's `stateDir` in the conflist.
    pub state_dir: PathBuf,
    /// The plugin's `logFile` in the conflist.
    pub cni_log_file: PathBuf,
    pub mtu: u32,
    pub cluster_cidrs: Vec<IpNetwork>,
    pub masquerade: bool,
    pub fast_path: bool,
    pub metrics_addr: SocketAddr,
    pub log_level: log::LevelFilter,
    /// How often everything is re-checked even when no Node changed.
    pub resync: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            node_name: None,
            kubeconfig: None,
            bpffs_root: "/sys/fs/bpf/ferrite".into(),
            plugin_source: "/opt/ferrite/bin/ferrite".into(),
            cni_bin_dir: "/opt/cni/bin".into(),
            cni_conf_dir: "/etc/cni/net.d".into(),
            state_dir: "/var/lib/ferrite".into(),
            cni_log_file: "/var/log/ferrite/cni.log".into(),
            mtu: 1500,
            cluster_cidrs: Vec::new(),
            masquerade: true,
            fast_path: true,
            metrics_addr: "0.0.0.0:9965".parse().expect("a socket address"),
            log_level: log::LevelFilter::Info,
            resync: Duration::from_secs(60),
        }
    }
}

/// One setting: its flag, its environment variable and what it holds.
struct Setting {
    flag: &'static str,
    env: &'static str,
    help: &'static str,
}

const SETTINGS: &[Setting] = &[
    Setting {
        flag: "--node-name",
        env: "NODE_NAME",
        help: "this node's name (the downward API's spec.nodeName)",
    },
    Setting {
        flag: "--kubeconfig",
        env: "KUBECONFIG",
        help: "a kubeconfig file; default: in-cluster",
    },
    Setting {
        flag: "--bpffs-root",
        env: "FERRITE_BPFFS_ROOT",
        help: "where the datapath is pinned [/sys/fs/bpf/ferrite]",
    },
    Setting {
        flag: "--plugin-source",
        env: "FERRITE_PLUGIN_SOURCE",
        help: "the CNI binary, or a directory with it (and portmap, loopback); empty: none [/opt/ferrite/bin/ferrite]",
    },
    Setting {
        flag: "--cni-bin-dir",
        env: "FERRITE_CNI_BIN_DIR",
        help: "[/opt/cni/bin]",
    },
    Setting {
        flag: "--cni-conf-dir",
        env: "FERRITE_CNI_CONF_DIR",
        help: "[/etc/cni/net.d]",
    },
    Setting {
        flag: "--state-dir",
        env: "FERRITE_STATE_DIR",
        help: "the plugin's state directory [/var/lib/ferrite]",
    },
    Setting {
        flag: "--cni-log-file",
        env: "FERRITE_CNI_LOG_FILE",
        help: "the plugin's log [/var/log/ferrite/cni.log]",
    },
    Setting {
        flag: "--mtu",
        env: "FERRITE_MTU",
        help: "pod MTU [1500]",
    },
    Setting {
        flag: "--cluster-cidr",
        env: "FERRITE_CLUSTER_CIDR",
        help: "the cluster's pod CIDR; twice for dual stack (env: comma-separated)",
    },
    Setting {
        flag: "--masquerade",
        env: "FERRITE_MASQUERADE",
        help: "masquerade traffic leaving the cluster [true]",
    },
    Setting {
        flag: "--fast-path",
        env: "FERRITE_FAST_PATH",
        help: "the cross-node eBPF fast path [true]",
    },
    Setting {
        flag: "--metrics-addr",
        env: "FERRITE_METRICS_ADDR",
        help: "/healthz, /readyz, /metrics [0.0.0.0:9965]",
    },
    Setting {
        flag: "--metrics-port",
        env: "FERRITE_METRICS_PORT",
        help: "the port alone (with the address above)",
    },
    Setting {
        flag: "--log-level",
        env: "FERRITE_LOG_LEVEL",
        help: "error, warn, info or debug [info]",
    },
    Setting {
        flag: "--resync-seconds",
        env: "FERRITE_RESYNC_SECONDS",
        help: "re-check everything this often [60]",
    },
];

/// The flags, for `ferrite-agent help`.
pub fn usage() -> String {
    let mut out = String::new();
    for s in SETTINGS {
        out.push_str(&format!("  {:<18} {:<24} {}\n", s.flag, s.env, s.help));
    }
    out
}

fn parse_bool(flag: &str, value: &str) -> Result<bool, ConfigError> {
    match value {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(ConfigError::BadValue {
            flag: flag.into(),
            value: value.into(),
            expected: "true or false",
        }),
    }
}

fn parse_cidr(flag: &str, value: &str) -> Result<IpNetwork, ConfigError> {
    let net: IpNetwork = value.trim().parse().map_err(|_| ConfigError::BadValue {
        flag: flag.into(),
        value: value.into(),
        expected: "a CIDR",
    })?;
    Ok(IpNetwork::new(net.network(), net.prefix()).unwrap_or(net))
}

impl Config {
    /// Reads `args` (after the subcommand), falling back to `env` for every
    /// setting no flag gave. `--flag value` and `--flag=value` both work; a
    /// boolean flag alone means true.
    pub fn parse(
        args: &[String],
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut given: Vec<(&'static str, String)> = Vec::new();
        let mut i = 0;
        while i < args.len() {
            let arg = &args[i];
            let (name, inline) = match arg.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (arg.as_str(), None),
            };
            let setting = SETTINGS
                .iter()
                .find(|s| s.flag == name)
                .ok_or_else(|| ConfigError::UnknownFlag(arg.clone()))?;
            let is_bool = matches!(setting.flag, "--masquerade" | "--fast-path");
            let value = match inline {
                Some(v) => v,
                None if is_bool => match args.get(i + 1) {
                    Some(next) if parse_bool(name, next).is_ok() => {
                        i += 1;
                        next.clone()
                    }
                    _ => "true".into(),
                },
                None => {
                    i += 1;
                    args.get(i)
                        .cloned()
                        .ok_or_else(|| ConfigError::MissingValue { flag: name.into() })?
                }
            };
            given.push((setting.flag, value));
            i += 1;
        }

        let mut c = Config::default();
        for s in SETTINGS {
            let from_flags: Vec<String> = given
                .iter()
                .filter(|(f, _)| *f == s.flag)
                .map(|(_, v)| v.clone())
                .collect();
            let values = if !from_flags.is_empty() {
                from_flags
            } else {
                match env(s.env) {
                    Some(v) if !v.is_empty() || s.flag == "--plugin-source" => vec![v],
                    _ => continue,
                }
            };
            let last = values.last().cloned().unwrap_or_default();
            let bad = |expected| ConfigError::BadValue {
                flag: s.flag.into(),
                value: last.clone(),
                expected,
            };
            match s.flag {
                "--node-name" => c.node_name = Some(last.clone()),
                "--kubeconfig" => c.kubeconfig = Some(last.clone().into()),
                "--bpffs-root" => c.bpffs_root = last.clone().into(),
                "--plugin-source" => c.plugin_source = last.clone().into(),
                "--cni-bin-dir" => c.cni_bin_dir = last.clone().into(),
                "--cni-conf-dir" => c.cni_conf_dir = last.clone().into(),
                "--state-dir" => c.state_dir = last.clone().into(),
                "--cni-log-file" => c.cni_log_file = last.clone().into(),
                "--mtu" => c.mtu = last.parse().map_err(|_| bad("a number"))?,
                "--cluster-cidr" => {
                    c.cluster_cidrs = values
                        .iter()
                        .flat_map(|v| v.split(','))
                        .filter(|v| !v.trim().is_empty())
                        .map(|v| parse_cidr(s.flag, v))
                        .collect::<Result<_, _>>()?;
                }
                "--masquerade" => c.masquerade = parse_bool(s.flag, &last)?,
                "--fast-path" => c.fast_path = parse_bool(s.flag, &last)?,
                "--metrics-addr" => {
                    c.metrics_addr = last.parse().map_err(|_| bad("an address:port"))?
                }
                // After --metrics-addr in SETTINGS: it changes that address's port.
                "--metrics-port" => c
                    .metrics_addr
                    .set_port(last.parse().map_err(|_| bad("a port number"))?),
                "--log-level" => {
                    c.log_level = match last.as_str() {
                        "error" => log::LevelFilter::Error,
                        "warn" => log::LevelFilter::Warn,
                        "info" => log::LevelFilter::Info,
                        "debug" => log::LevelFilter::Debug,
                        _ => return Err(bad("error, warn, info or debug")),
                    }
                }
                "--resync-seconds" => {
                    let secs: u64 = last.parse().map_err(|_| bad("a number of seconds"))?;
                    c.resync = Duration::from_secs(secs.max(1));
                }
                _ => unreachable!("every setting is handled"),
            }
        }
        if !(576..=65535).contains(&c.mtu) {
            return Err(ConfigError::Invalid(format!(
                "--mtu {} is outside 576..65535",
                c.mtu
            )));
        }
        Ok(c)
    }

    /// What `run` needs beyond `uninstall`.
    pub fn check_for_run(&self) -> Result<(), ConfigError> {
        match &self.node_name {
            Some(n) if !n.is_empty() => {}
            _ => {
                return Err(ConfigError::Invalid(
                    "the node's name is required: --node-name or NODE_NAME".into(),
                ))
            }
        }
        if self.masquerade && self.cluster_cidrs.is_empty() {
            return Err(ConfigError::Invalid(
                "--masquerade needs the cluster's CIDR(s): --cluster-cidr or FERRITE_CLUSTER_CIDR (or --masquerade=false)".into(),
            ));
        }
        Ok(())
    }

    /// Where the conflist goes.
    pub fn conflist_path(&self) -> PathBuf {
        self.cni_conf_dir.join(crate::conflist::FILE_NAME)
    }

    /// Where the plugin binary goes.
    pub fn plugin_path(&self) -> PathBuf {
        self.cni_bin_dir.join("ferrite")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(args: &[&str], env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        Config::parse(&args, &|k| env.get(k).cloned())
    }

    #[test]
    fn defaults() {
        let c = parse(&[], &[]).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.metrics_addr.port(), 9965);
        assert!(c.masquerade && c.fast_path);
        assert_eq!(
            c.conflist_path(),
            PathBuf::from("/etc/cni/net.d/10-ferrite.conflist")
        );
        assert_eq!(c.plugin_path(), PathBuf::from("/opt/cni/bin/ferrite"));
    }

    #[test]
    fn flags_win_over_env() {
        let c = parse(
            &["--mtu", "1450", "--node-name=n1"],
            &[
                ("FERRITE_MTU", "9000"),
                ("NODE_NAME", "env"),
                ("FERRITE_CNI_BIN_DIR", "/x"),
            ],
        )
        .unwrap();
        assert_eq!(c.mtu, 1450);
        assert_eq!(c.node_name.as_deref(), Some("n1"));
        assert_eq!(c.cni_bin_dir, PathBuf::from("/x"));
    }

    #[test]
    fn cluster_cidr_twice_or_comma_separated() {
        let c = parse(
            &[
                "--cluster-cidr",
                "10.244.0.0/16",
                "--cluster-cidr=fd00:244::/48",
            ],
            &[],
        )
        .unwrap();
        assert_eq!(c.cluster_cidrs.len(), 2);
        let c = parse(
            &[],
            &[("FERRITE_CLUSTER_CIDR", "10.244.0.0/16, fd00:244::/48")],
        )
        .unwrap();
        assert_eq!(
            c.cluster_cidrs,
            vec![
                "10.244.0.0/16".parse().unwrap(),
                "fd00:244::/48".parse().unwrap()
            ]
        );
        // A host address is normalised to its network.
        let c = parse(&["--cluster-cidr", "10.244.3.4/16"], &[]).unwrap();
        assert_eq!(c.cluster_cidrs, vec!["10.244.0.0/16".parse().unwrap()]);
        assert!(parse(&["--cluster-cidr", "nonsense"], &[]).is_err());
    }

    #[test]
    fn booleans() {
        assert!(!parse(&["--masquerade=false"], &[]).unwrap().masquerade);
        assert!(!parse(&["--masquerade", "false"], &[]).unwrap().masquerade);
        let c = parse(&["--fast-path", "--mtu", "1400"], &[]).unwrap();
        assert!(c.fast_path);
        assert_eq!(c.mtu, 1400);
        assert!(
            !parse(&[], &[("FERRITE_FAST_PATH", "false")])
                .unwrap()
                .fast_path
        );
        assert!(parse(&["--masquerade=maybe"], &[]).is_err());
    }

    #[test]
    fn errors_name_the_flag() {
        assert_eq!(
            parse(&["--nope"], &[]),
            Err(ConfigError::UnknownFlag("--nope".into()))
        );
        assert_eq!(
            parse(&["--mtu"], &[]),
            Err(ConfigError::MissingValue {
                flag: "--mtu".into()
            })
        );
        assert!(parse(&["--mtu", "70000"], &[]).is_err());
        assert!(parse(&["--metrics-addr", "nowhere"], &[]).is_err());
    }

    #[test]
    fn run_needs_a_node_name_and_cluster_cidr_for_masquerade() {
        let c = parse(&[], &[]).unwrap();
        assert!(c.check_for_run().is_err());
        let c = parse(&["--node-name", "n1"], &[]).unwrap();
        assert!(c
            .check_for_run()
            .unwrap_err()
            .to_string()
            .contains("--cluster-cidr"));
        let c = parse(&["--node-name", "n1", "--masquerade=false"], &[]).unwrap();
        assert!(c.check_for_run().is_ok());
        let c = parse(
            &["--node-name", "n1", "--cluster-cidr", "10.244.0.0/16"],
            &[],
        )
        .unwrap();
        assert!(c.check_for_run().is_ok());
    }

    #[test]
    fn metrics_port_alone_or_with_an_address() {
        let c = parse(&[], &[("FERRITE_METRICS_PORT", "9100")]).unwrap();
        assert_eq!(c.metrics_addr, "0.0.0.0:9100".parse().unwrap());
        let c = parse(
            &["--metrics-addr", "127.0.0.1:1", "--metrics-port", "9101"],
            &[],
        )
        .unwrap();
        assert_eq!(c.metrics_addr, "127.0.0.1:9101".parse().unwrap());
        assert!(parse(&["--metrics-port", "http"], &[]).is_err());
    }

    /// deploy/daemonset.yaml runs the agent: every argument it passes must
    /// parse, and every environment variable it sets must be one the agent
    /// reads (a typo there would silently fall back to a default).
    #[test]
    fn the_daemonset_speaks_the_agents_flags() {
        let manifest = include_str!("../../deploy/daemonset.yaml");
        let mut args = Vec::new();
        let mut in_args = false;
        for line in manifest.lines() {
            let t = line.trim();
            if t == "args:" {
                in_args = true;
                continue;
            }
            if in_args {
                match t.strip_prefix("- ") {
                    Some(a) => args.push(a.trim_matches('"').to_string()),
                    None => in_args = false,
                }
            }
        }
        assert_eq!(args.first().map(String::as_str), Some("run"));
        let env_names: Vec<&str> = manifest
            .lines()
            .filter_map(|l| l.trim().strip_prefix("- name: "))
            .filter(|n| n.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
            .collect();
        assert!(env_names.contains(&"NODE_NAME"));
        for name in &env_names {
            assert!(
                SETTINGS.iter().any(|s| s.env == *name),
                "the DaemonSet sets {name}, which the agent does not read"
            );
        }
        let values: HashMap<&str, &str> = [
            ("NODE_NAME", "node-1"),
            ("FERRITE_CLUSTER_CIDR", "10.244.0.0/16,fd00:10:244::/56"),
            ("FERRITE_MTU", "1500"),
            ("FERRITE_MASQUERADE", "true"),
            ("FERRITE_FAST_PATH", "true"),
            ("FERRITE_METRICS_PORT", "9965"),
        ]
        .into();
        let args: Vec<String> = args[1..].to_vec();
        let c = Config::parse(&args, &|k| {
            env_names
                .contains(&k)
                .then(|| values.get(k).map(|v| v.to_string()))
                .flatten()
        })
        .unwrap();
        c.check_for_run().unwrap();
        assert_eq!(c.cluster_cidrs.len(), 2);
    }

    #[test]
    fn an_empty_plugin_source_installs_nothing() {
        let c = parse(&["--plugin-source="], &[]).unwrap();
        assert_eq!(c.plugin_source, PathBuf::new());
        let c = parse(&[], &[("FERRITE_PLUGIN_SOURCE", "")]).unwrap();
        assert_eq!(c.plugin_source, PathBuf::new());
    }
}
