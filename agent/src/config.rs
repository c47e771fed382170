// SPDX-License-Identifier: Apache-2.0
//! The agent's command line: `run`, `uninstall` and `version`, and the
//! settings the first two take. Each setting is a flag with an environment
//! variable as fallback (so a DaemonSet can set them from a ConfigMap), then
//! a default. clap parses (and refuses what it does not know); this module
//! says what each setting means.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::{OsStringValueParser, PossibleValuesParser, TypedValueParser};
use clap::{ArgAction, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use ipnetwork::IpNetwork;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
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
    /// The plugin's `logLevel` in the conflist (debug adds each ADD's
    /// steps with their times).
    pub cni_log_level: &'static str,
    /// IPv4 BIG TCP on pods' veth pairs (the plugin's `bigTcp`).
    pub big_tcp: bool,
    pub mtu: u32,
    pub cluster_cidrs: Vec<IpNetwork>,
    /// The cluster's Service CIDRs (kube-apiserver's
    /// --service-cluster-ip-range).
    pub service_cidrs: Vec<IpNetwork>,
    /// Enforce NetworkPolicy (watch Pods, Namespaces, NetworkPolicies).
    pub network_policy: bool,
    /// Flows the connection-tracking table holds, when the agent loads it.
    pub conntrack_entries: u32,
    /// Load-balance Services (watch Services and Endpoints, program the
    /// datapath's Service maps).
    pub services: bool,
    /// Whether kube-proxy runs beside ferrite (off: ferrite serves
    /// NodePorts too).
    pub kube_proxy: bool,
    /// Pods' hostPorts served by the datapath (the plugin has the
    /// portMappings capability) rather than by the portmap plugin chained
    /// after it.
    pub host_ports_in_datapath: bool,
    /// Where the node's cgroup hierarchies are mounted (the v2 root is
    /// this or its `unified`): ferrite's host socket programs attach there
    /// (hostPorts; without kube-proxy, Services).
    pub cgroup_root: PathBuf,
    /// Service frontends (cluster IP x port) the maps hold at most.
    pub service_max_frontends: u32,
    /// Service backends (all frontends' together) the maps hold at most.
    pub service_max_backends: u32,
    /// Flows to Services whose backend is remembered, when the agent loads
    /// the datapath.
    pub service_conntrack_entries: u32,
    pub masquerade: bool,
    pub fast_path: bool,
    pub metrics_addr: SocketAddr,
    pub log_level: log::LevelFilter,
    /// How often everything is re-checked even when no Node changed.
    pub resync: Duration,
}

const DEFAULT_BPFFS_ROOT: &str = "/sys/fs/bpf/ferrite";
const DEFAULT_CGROUP_ROOT: &str = "/sys/fs/cgroup";
const DEFAULT_PLUGIN_SOURCE: &str = "/opt/ferrite/bin/ferrite";
const DEFAULT_CNI_BIN_DIR: &str = "/opt/cni/bin";
const DEFAULT_CNI_CONF_DIR: &str = "/etc/cni/net.d";
const DEFAULT_STATE_DIR: &str = "/var/lib/ferrite";
const DEFAULT_CNI_LOG_FILE: &str = "/var/log/ferrite/cni.log";
const DEFAULT_MTU: u32 = 1500;
const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:9965";
const DEFAULT_RESYNC_SECONDS: u64 = 60;
const DEFAULT_CONNTRACK_ENTRIES: u32 = 262_144;
const DEFAULT_SERVICE_MAX_FRONTENDS: u32 = crate::service::compile::DEFAULT_MAX_FRONTENDS;
const DEFAULT_SERVICE_MAX_BACKENDS: u32 = crate::service::compile::DEFAULT_MAX_BACKENDS;
const DEFAULT_SERVICE_CONNTRACK_ENTRIES: u32 = 65_536;

/// The one variable whose empty value means something: install nothing.
/// Every other variable set to the empty string (a ConfigMap key left
/// blank) counts as unset.
const PLUGIN_SOURCE_ENV: &str = "FERRITE_PLUGIN_SOURCE";

impl Default for Config {
    fn default() -> Self {
        Self {
            node_name: None,
            kubeconfig: None,
            bpffs_root: DEFAULT_BPFFS_ROOT.into(),
            plugin_source: DEFAULT_PLUGIN_SOURCE.into(),
            cni_bin_dir: DEFAULT_CNI_BIN_DIR.into(),
            cni_conf_dir: DEFAULT_CNI_CONF_DIR.into(),
            state_dir: DEFAULT_STATE_DIR.into(),
            cni_log_file: DEFAULT_CNI_LOG_FILE.into(),
            cni_log_level: "info",
            big_tcp: false,
            mtu: DEFAULT_MTU,
            cluster_cidrs: Vec::new(),
            service_cidrs: Vec::new(),
            network_policy: true,
            conntrack_entries: DEFAULT_CONNTRACK_ENTRIES,
            services: true,
            kube_proxy: true,
            host_ports_in_datapath: true,
            cgroup_root: DEFAULT_CGROUP_ROOT.into(),
            service_max_frontends: DEFAULT_SERVICE_MAX_FRONTENDS,
            service_max_backends: DEFAULT_SERVICE_MAX_BACKENDS,
            service_conntrack_entries: DEFAULT_SERVICE_CONNTRACK_ENTRIES,
            masquerade: true,
            fast_path: true,
            metrics_addr: DEFAULT_METRICS_ADDR.parse().expect("a socket address"),
            log_level: log::LevelFilter::Info,
            resync: Duration::from_secs(DEFAULT_RESYNC_SECONDS),
        }
    }
}

/// `ferrite-agent`'s command line.
#[derive(Debug, Parser)]
#[command(
    name = "ferrite-agent",
    about = "ferrite's node agent, run by a DaemonSet on every node",
    subcommand_required = true,
    arg_required_else_help = true,
    // A flag given twice: the last one wins.
    args_override_self = true
)]
pub struct Cli {
    #[command(flatten)]
    pub settings: Settings,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Watch Nodes and keep this node's network set up
    Run,
    /// Remove everything ferrite put on this node
    Uninstall,
    /// Print the versions of the agent and of its datapath
    Version,
}

/// The settings of `run` and `uninstall` (global, so they may stand before
/// or after the subcommand, and `--help` lists them everywhere).
#[derive(Debug, Args)]
#[command(next_help_heading = "Settings (a flag, else its environment variable, else the default)")]
pub struct Settings {
    /// This node's name (the downward API's spec.nodeName); `run` needs it
    #[arg(long, global = true, env = "NODE_NAME", value_name = "NAME")]
    node_name: Option<String>,

    /// A kubeconfig file; without one, the in-cluster config
    #[arg(long, global = true, env = "KUBECONFIG", value_name = "FILE")]
    kubeconfig: Option<PathBuf>,

    /// Where the datapath is pinned
    #[arg(long, global = true, env = "FERRITE_BPFFS_ROOT", value_name = "DIR",
          default_value = DEFAULT_BPFFS_ROOT)]
    bpffs_root: PathBuf,

    /// The CNI binary to install, or a directory with it (and portmap,
    /// loopback); empty: install nothing
    #[arg(long, global = true, env = "FERRITE_PLUGIN_SOURCE", value_name = "PATH",
          default_value = DEFAULT_PLUGIN_SOURCE,
          value_parser = OsStringValueParser::new().map(PathBuf::from))]
    plugin_source: PathBuf,

    /// Where the CNI binaries go
    #[arg(long, global = true, env = "FERRITE_CNI_BIN_DIR", value_name = "DIR",
          default_value = DEFAULT_CNI_BIN_DIR)]
    cni_bin_dir: PathBuf,

    /// Where the conflist goes
    #[arg(long, global = true, env = "FERRITE_CNI_CONF_DIR", value_name = "DIR",
          default_value = DEFAULT_CNI_CONF_DIR)]
    cni_conf_dir: PathBuf,

    /// The plugin's state directory (its stateDir)
    #[arg(long, global = true, env = "FERRITE_STATE_DIR", value_name = "DIR",
          default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,

    /// The plugin's log (its logFile)
    #[arg(long, global = true, env = "FERRITE_CNI_LOG_FILE", value_name = "FILE",
          default_value = DEFAULT_CNI_LOG_FILE)]
    cni_log_file: PathBuf,

    /// How much the plugin logs (its logLevel): debug adds each ADD's
    /// steps with their times
    #[arg(long, global = true, env = "FERRITE_CNI_LOG_LEVEL", value_name = "LEVEL",
          default_value = "info",
          value_parser = PossibleValuesParser::new(["error", "warn", "info", "debug"]).map(cni_level))]
    cni_log_level: &'static str,

    /// IPv4 BIG TCP on pods' veth pairs: packets of up to 192 KiB between
    /// pods (the plugin's bigTcp). Only where every uplink carries them
    /// (the flag alone: true)
    #[arg(long, global = true, env = "FERRITE_BIG_TCP", value_name = "BOOL",
          num_args = 0..=1, default_missing_value = "true", default_value = "false",
          action = ArgAction::Set, value_parser = parse_bool)]
    big_tcp: bool,

    /// Pod MTU
    #[arg(long, global = true, env = "FERRITE_MTU", value_name = "BYTES",
          default_value_t = DEFAULT_MTU,
          value_parser = clap::value_parser!(u32).range(576..=65535))]
    mtu: u32,

    /// The cluster's pod CIDR; twice for dual stack (the variable:
    /// comma-separated)
    #[arg(long, global = true, env = "FERRITE_CLUSTER_CIDR", value_name = "CIDR",
          value_delimiter = ',', value_parser = parse_cidr)]
    cluster_cidr: Vec<Option<IpNetwork>>,

    /// The cluster's Service CIDR (kube-apiserver's
    /// --service-cluster-ip-range); twice for dual stack (the variable:
    /// comma-separated). Egress policy to a Service is checked against the
    /// backend it is translated to
    #[arg(long, global = true, env = "FERRITE_SERVICE_CIDR", value_name = "CIDR",
          value_delimiter = ',', value_parser = parse_cidr)]
    service_cidr: Vec<Option<IpNetwork>>,

    /// Enforce NetworkPolicy (the flag alone: true)
    #[arg(long, global = true, env = "FERRITE_NETWORK_POLICY", value_name = "BOOL",
          num_args = 0..=1, default_missing_value = "true", default_value = "true",
          action = ArgAction::Set, value_parser = parse_bool)]
    network_policy: bool,

    /// Flows the connection-tracking table holds (LRU; set when the
    /// datapath's state maps are first created on the node)
    #[arg(long, global = true, env = "FERRITE_CONNTRACK_ENTRIES", value_name = "FLOWS",
          default_value_t = DEFAULT_CONNTRACK_ENTRIES,
          value_parser = clap::value_parser!(u32).range(1024..=16_777_216))]
    conntrack_entries: u32,

    /// Load-balance Services' cluster IPs in the datapath (off: leave them
    /// to kube-proxy)
    #[arg(long, global = true, env = "FERRITE_SERVICES", value_name = "on|off",
          default_value = "on", action = ArgAction::Set,
          value_parser = PossibleValuesParser::new(["on", "off"]).map(|v| v == "on"))]
    services: bool,

    /// Whether kube-proxy runs on the node (off: ferrite serves NodePorts
    /// from outside too; needs --services=on)
    #[arg(long, global = true, env = "FERRITE_KUBE_PROXY", value_name = "on|off",
          default_value = "on", action = ArgAction::Set,
          value_parser = PossibleValuesParser::new(["on", "off"]).map(|v| v == "on"))]
    kube_proxy: bool,

    /// Who serves pods' hostPorts: the datapath (from outside, from pods
    /// and from the node's own sockets, 127.0.0.1 included) or the portmap
    /// plugin chained after ferrite (iptables)
    #[arg(long, global = true, env = "FERRITE_HOST_PORTS", value_name = "datapath|portmap",
          default_value = "datapath", action = ArgAction::Set,
          value_parser = PossibleValuesParser::new(["datapath", "portmap"]).map(|v| v == "datapath"))]
    host_ports: bool,

    /// Where the node's cgroup hierarchies are mounted: without
    /// kube-proxy, the node's own sockets reach Services through programs
    /// attached at the cgroup v2 root found here (DIR or DIR/unified)
    #[arg(long, global = true, env = "FERRITE_CGROUP_ROOT", value_name = "DIR",
          default_value = DEFAULT_CGROUP_ROOT)]
    cgroup_root: PathBuf,

    /// Service frontends (cluster IP x port) programmed at most; a Service
    /// that does not fit is left to kube-proxy whole
    #[arg(long, global = true, env = "FERRITE_SERVICE_MAX_FRONTENDS", value_name = "FRONTENDS",
          default_value_t = DEFAULT_SERVICE_MAX_FRONTENDS,
          value_parser = clap::value_parser!(u32).range(1..=65_536))]
    service_max_frontends: u32,

    /// Service backends (of all frontends) programmed at most
    #[arg(long, global = true, env = "FERRITE_SERVICE_MAX_BACKENDS", value_name = "BACKENDS",
          default_value_t = DEFAULT_SERVICE_MAX_BACKENDS,
          value_parser = clap::value_parser!(u32).range(1..=65_536))]
    service_max_backends: u32,

    /// Flows to Services whose backend is remembered (two LRU tables of
    /// this size, one per direction; set when the datapath's state maps
    /// are first created on the node)
    #[arg(long, global = true, env = "FERRITE_SERVICE_CONNTRACK_ENTRIES", value_name = "FLOWS",
          default_value_t = DEFAULT_SERVICE_CONNTRACK_ENTRIES,
          value_parser = clap::value_parser!(u32).range(1024..=16_777_216))]
    service_conntrack_entries: u32,

    /// Masquerade traffic leaving the cluster (the flag alone: true)
    #[arg(long, global = true, env = "FERRITE_MASQUERADE", value_name = "BOOL",
          num_args = 0..=1, default_missing_value = "true", default_value = "true",
          action = ArgAction::Set, value_parser = parse_bool)]
    masquerade: bool,

    /// The cross-node eBPF fast path (the flag alone: true)
    #[arg(long, global = true, env = "FERRITE_FAST_PATH", value_name = "BOOL",
          num_args = 0..=1, default_missing_value = "true", default_value = "true",
          action = ArgAction::Set, value_parser = parse_bool)]
    fast_path: bool,

    /// Where /healthz, /readyz and /metrics are served
    #[arg(long, global = true, env = "FERRITE_METRICS_ADDR", value_name = "ADDR:PORT",
          default_value = DEFAULT_METRICS_ADDR)]
    metrics_addr: SocketAddr,

    /// The port alone (of the address above)
    #[arg(long, global = true, env = "FERRITE_METRICS_PORT", value_name = "PORT")]
    metrics_port: Option<u16>,

    /// How much the agent logs
    #[arg(long, global = true, env = "FERRITE_LOG_LEVEL", value_name = "LEVEL",
          default_value = "info",
          value_parser = PossibleValuesParser::new(["error", "warn", "info", "debug"]).map(level))]
    log_level: log::LevelFilter,

    /// Re-check everything this often, even when no Node changed
    #[arg(long, global = true, env = "FERRITE_RESYNC_SECONDS", value_name = "SECONDS",
          default_value_t = DEFAULT_RESYNC_SECONDS)]
    resync_seconds: u64,
}

fn parse_bool(value: &str) -> Result<bool, String> {
    match value {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err("expected true or false (or 1, 0, yes, no)".into()),
    }
}

/// A CIDR, normalised to its network; an empty piece of a comma-separated
/// list is none.
fn parse_cidr(value: &str) -> Result<Option<IpNetwork>, String> {
    let value = value.trim();
    if value.is_empty() {
        return Ok(None);
    }
    let net: IpNetwork = value.parse().map_err(|_| "expected a CIDR".to_string())?;
    Ok(Some(
        IpNetwork::new(net.network(), net.prefix()).unwrap_or(net),
    ))
}

/// One of the values `PossibleValuesParser` allowed.
fn level(value: String) -> log::LevelFilter {
    match value.as_str() {
        "error" => log::LevelFilter::Error,
        "warn" => log::LevelFilter::Warn,
        "debug" => log::LevelFilter::Debug,
        _ => log::LevelFilter::Info,
    }
}

/// The plugin's level as its conflist spells it (one of the values the
/// parser allows).
fn cni_level(value: String) -> &'static str {
    match value.as_str() {
        "error" => "error",
        "warn" => "warn",
        "debug" => "debug",
        _ => "info",
    }
}

impl From<Settings> for Config {
    fn from(s: Settings) -> Self {
        let mut metrics_addr = s.metrics_addr;
        if let Some(port) = s.metrics_port {
            metrics_addr.set_port(port);
        }
        Config {
            node_name: s.node_name,
            kubeconfig: s.kubeconfig,
            bpffs_root: s.bpffs_root,
            plugin_source: s.plugin_source,
            cni_bin_dir: s.cni_bin_dir,
            cni_conf_dir: s.cni_conf_dir,
            state_dir: s.state_dir,
            cni_log_file: s.cni_log_file,
            cni_log_level: s.cni_log_level,
            big_tcp: s.big_tcp,
            mtu: s.mtu,
            cluster_cidrs: s.cluster_cidr.into_iter().flatten().collect(),
            service_cidrs: s.service_cidr.into_iter().flatten().collect(),
            network_policy: s.network_policy,
            conntrack_entries: s.conntrack_entries,
            services: s.services,
            kube_proxy: s.kube_proxy,
            host_ports_in_datapath: s.host_ports,
            cgroup_root: s.cgroup_root,
            service_max_frontends: s.service_max_frontends,
            service_max_backends: s.service_max_backends,
            service_conntrack_entries: s.service_conntrack_entries,
            masquerade: s.masquerade,
            fast_path: s.fast_path,
            metrics_addr,
            log_level: s.log_level,
            resync: Duration::from_secs(s.resync_seconds.max(1)),
        }
    }
}

/// The agent's and its datapath's versions.
pub fn version() -> String {
    format!(
        "{} (datapath {})",
        env!("CARGO_PKG_VERSION"),
        ferrite_datapath::DATAPATH_VERSION
    )
}

/// The command line as `ferrite-agent` parses it. clap reads each setting's
/// environment variable here, when the command is built; one set to the
/// empty string is dropped then (but for FERRITE_PLUGIN_SOURCE). Help shows
/// the variables' names, not their values, so it reads the same everywhere.
pub fn command() -> clap::Command {
    Cli::command().version(version()).mut_args(|arg| {
        let arg = arg.hide_env_values(true);
        let Some(name) = arg.get_env().map(|n| n.to_os_string()) else {
            return arg;
        };
        if name == PLUGIN_SOURCE_ENV || !std::env::var_os(&name).is_some_and(|v| v.is_empty()) {
            return arg;
        }
        let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
        // Without the variable clap no longer names it: keep it in the help.
        arg.env(None)
            .help(format!("{help} [env: {}]", name.to_string_lossy()))
    })
}

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Invocation {
    Run(Config),
    Uninstall(Config),
    Version,
}

/// Parses `args` (the program's name first) with `command()`. `--help`,
/// `--version` and every mistake come back as a `clap::Error`, whose
/// `print()` and `exit_code()` say what to show and how to exit.
pub fn parse<I, T>(args: I) -> Result<Invocation, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    parse_with(command(), args)
}

fn parse_with<I, T>(mut command: clap::Command, args: I) -> Result<Invocation, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let matches = command
        .try_get_matches_from_mut(&args)
        .map_err(|e| name_the_variable(e, &command, &args))?;
    let cli = Cli::from_arg_matches(&matches).map_err(|e| e.format(&mut command))?;
    let config = Config::from(cli.settings);
    Ok(match cli.command {
        Command::Run => Invocation::Run(config),
        Command::Uninstall => Invocation::Uninstall(config),
        Command::Version => Invocation::Version,
    })
}

/// A bad value that came from a setting's environment variable (its flag
/// was not given) gets a tip naming the variable: clap names only the flag.
fn name_the_variable(
    mut e: clap::Error,
    command: &clap::Command,
    args: &[OsString],
) -> clap::Error {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if !matches!(
        e.kind(),
        ErrorKind::ValueValidation | ErrorKind::InvalidValue
    ) {
        return e;
    }
    let Some(ContextValue::String(invalid)) = e.get(ContextKind::InvalidArg) else {
        return e;
    };
    // "--mtu <BYTES>"
    let flag = invalid.split(' ').next().unwrap_or_default().to_string();
    let given = args.iter().any(|a| {
        let a = a.to_string_lossy();
        a == flag || a.starts_with(&format!("{flag}="))
    });
    let env = command
        .get_arguments()
        .find(|a| a.get_long().is_some_and(|l| format!("--{l}") == flag))
        .and_then(|a| a.get_env());
    if let (false, Some(env)) = (given, env) {
        let tip = format!("the value comes from {}", env.to_string_lossy());
        e.insert(
            ContextKind::Suggested,
            ContextValue::StyledStrs(vec![tip.into()]),
        );
    }
    e
}

impl Config {
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
        if !self.kube_proxy && !self.services {
            return Err(ConfigError::Invalid(
                "--kube-proxy=off needs --services=on: without either, nothing serves Services"
                    .into(),
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
    use clap::error::ErrorKind;

    /// `run` with `args`, as if no setting's variable were set (the
    /// variables themselves are tested against the process environment in
    /// tests/cli.rs).
    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        let command = command().mut_args(|a| a.env(None));
        let args = ["ferrite-agent", "run"].iter().chain(args);
        match parse_with(command, args)? {
            Invocation::Run(c) => Ok(c),
            other => panic!("{other:?}"),
        }
    }

    /// The error's kind and its first line.
    fn refused(args: &[&str]) -> (ErrorKind, String) {
        let e = parse(args).expect_err("refused");
        let text = e.to_string();
        (
            e.kind(),
            text.lines().next().unwrap_or_default().to_string(),
        )
    }

    #[test]
    fn the_command_is_well_formed() {
        command().debug_assert();
    }

    #[test]
    fn defaults() {
        let c = parse(&[]).unwrap();
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
    fn every_flag_spelling() {
        let c = parse(&[
            "--node-name=n1",
            "--kubeconfig",
            "/k",
            "--bpffs-root=/b",
            "--plugin-source",
            "/p",
            "--cni-bin-dir=/cb",
            "--cni-conf-dir",
            "/cc",
            "--state-dir=/s",
            "--cni-log-file",
            "/l",
            "--cni-log-level=debug",
            "--big-tcp",
            "--mtu=1450",
            "--metrics-addr",
            "127.0.0.1:1",
            "--log-level=debug",
            "--resync-seconds",
            "0",
        ])
        .unwrap();
        assert_eq!(c.node_name.as_deref(), Some("n1"));
        assert_eq!(c.kubeconfig, Some(PathBuf::from("/k")));
        assert_eq!(c.bpffs_root, PathBuf::from("/b"));
        assert_eq!(c.plugin_source, PathBuf::from("/p"));
        assert_eq!(c.cni_bin_dir, PathBuf::from("/cb"));
        assert_eq!(c.cni_conf_dir, PathBuf::from("/cc"));
        assert_eq!(c.state_dir, PathBuf::from("/s"));
        assert_eq!(c.cni_log_file, PathBuf::from("/l"));
        assert_eq!(c.cni_log_level, "debug");
        assert!(c.big_tcp);
        assert_eq!(c.mtu, 1450);
        assert_eq!(c.metrics_addr, "127.0.0.1:1".parse().unwrap());
        assert_eq!(c.log_level, log::LevelFilter::Debug);
        // Never a busy loop.
        assert_eq!(c.resync, Duration::from_secs(1));
    }

    #[test]
    fn settings_stand_before_or_after_the_subcommand_and_the_last_wins() {
        let command = command().mut_args(|a| a.env(None));
        let args = [
            "ferrite-agent",
            "--mtu",
            "1400",
            "uninstall",
            "--state-dir=/a",
        ];
        let Invocation::Uninstall(c) = parse_with(command, args).unwrap() else {
            panic!("not uninstall")
        };
        assert_eq!((c.mtu, c.state_dir), (1400, PathBuf::from("/a")));
        let c = parse(&["--mtu", "1400", "--mtu=1450"]).unwrap();
        assert_eq!(c.mtu, 1450);
    }

    #[test]
    fn cluster_cidr_twice_or_comma_separated() {
        let c = parse(&[
            "--cluster-cidr",
            "10.244.0.0/16",
            "--cluster-cidr=fd00:244::/48",
        ])
        .unwrap();
        assert_eq!(c.cluster_cidrs.len(), 2);
        let c = parse(&["--cluster-cidr", "10.244.0.0/16, fd00:244::/48,"]).unwrap();
        assert_eq!(
            c.cluster_cidrs,
            vec![
                "10.244.0.0/16".parse().unwrap(),
                "fd00:244::/48".parse().unwrap()
            ]
        );
        // A host address is normalised to its network.
        let c = parse(&["--cluster-cidr", "10.244.3.4/16"]).unwrap();
        assert_eq!(c.cluster_cidrs, vec!["10.244.0.0/16".parse().unwrap()]);
        assert!(parse(&["--cluster-cidr="])
            .unwrap()
            .cluster_cidrs
            .is_empty());
        let (kind, line) = refused(&["--cluster-cidr", "nonsense"]);
        assert_eq!(kind, ErrorKind::ValueValidation);
        assert!(
            line.contains("'nonsense'") && line.contains("--cluster-cidr"),
            "{line}"
        );
    }

    #[test]
    fn booleans() {
        assert!(!parse(&["--masquerade=false"]).unwrap().masquerade);
        assert!(!parse(&["--masquerade", "false"]).unwrap().masquerade);
        assert!(!parse(&["--fast-path", "no"]).unwrap().fast_path);
        assert!(!parse(&["--fast-path=0"]).unwrap().fast_path);
        // Alone, a boolean flag means true, and does not take the next flag.
        let c = parse(&["--fast-path", "--mtu", "1400"]).unwrap();
        assert!(c.fast_path);
        assert_eq!(c.mtu, 1400);
        assert!(
            parse(&["--masquerade=false", "--masquerade"])
                .unwrap()
                .masquerade
        );
        let (_, line) = refused(&["--masquerade=maybe"]);
        assert!(
            line.contains("'maybe'") && line.contains("--masquerade"),
            "{line}"
        );
    }

    #[test]
    fn the_plugins_log_level_is_one_it_knows() {
        assert_eq!(parse(&[]).unwrap().cni_log_level, "info");
        assert!(!parse(&[]).unwrap().big_tcp);
        assert_eq!(
            parse(&["--cni-log-level=warn"]).unwrap().cni_log_level,
            "warn"
        );
        let (_, line) = refused(&["--cni-log-level=verbose"]);
        assert!(
            line.contains("'verbose'") && line.contains("--cni-log-level"),
            "{line}"
        );
    }

    #[test]
    fn errors_name_the_flag() {
        let (kind, line) = refused(&["--nope"]);
        assert_eq!(kind, ErrorKind::UnknownArgument);
        assert!(line.contains("'--nope'"), "{line}");
        // A misspelt flag is refused with its name, never ignored.
        let (kind, line) = refused(&["--bpffs-rot", "/x"]);
        assert_eq!(kind, ErrorKind::UnknownArgument);
        assert!(line.contains("'--bpffs-rot'"), "{line}");
        // So is a stray argument.
        let (kind, line) = refused(&["stray"]);
        assert_eq!(kind, ErrorKind::UnknownArgument);
        assert!(line.contains("'stray'"), "{line}");
        let (kind, line) = refused(&["--mtu"]);
        assert_eq!(kind, ErrorKind::InvalidValue);
        assert!(line.contains("--mtu"), "{line}");
        let (_, line) = refused(&["--mtu", "70000"]);
        assert!(
            line.contains("'70000'") && line.contains("576..=65535"),
            "{line}"
        );
        let (_, line) = refused(&["--mtu", "many"]);
        assert!(line.contains("'many'") && line.contains("--mtu"), "{line}");
        let (_, line) = refused(&["--metrics-addr", "nowhere"]);
        assert!(line.contains("--metrics-addr"), "{line}");
        let (_, line) = refused(&["--log-level", "loud"]);
        assert!(line.contains("--log-level"), "{line}");
        let (_, line) = refused(&["--resync-seconds", "soon"]);
        assert!(line.contains("--resync-seconds"), "{line}");
    }

    #[test]
    fn no_subcommand_or_an_unknown_one_is_a_usage_error() {
        let command = || command().mut_args(|a| a.env(None));
        let e = parse_with(command(), ["ferrite-agent"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let e = parse_with(command(), ["ferrite-agent", "start"]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidSubcommand);
        assert_eq!(e.exit_code(), 2);
        assert_eq!(
            parse_with(command(), ["ferrite-agent", "version"]).unwrap(),
            Invocation::Version
        );
        let e = parse_with(command(), ["ferrite-agent", "--version"]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::DisplayVersion);
        assert!(e.to_string().contains(&version()));
    }

    #[test]
    fn help_lists_every_flag_with_its_variable() {
        let help = command().render_help().to_string();
        let mut n = 0;
        for arg in command().get_arguments() {
            let Some(env) = arg.get_env() else { continue };
            let flag = format!("--{}", arg.get_long().unwrap());
            let line = help
                .lines()
                .find(|l| l.trim_start().starts_with(&format!("{flag} ")))
                .unwrap_or_else(|| panic!("{flag} is not in\n{help}"));
            // Help text may wrap: the variable is on the flag's line or
            // the next few.
            let from = help.find(line).unwrap();
            let tail: String = help[from..].lines().take(4).collect();
            assert!(
                tail.contains(&format!("[env: {}]", env.to_string_lossy())),
                "{flag}: {tail}"
            );
            n += 1;
        }
        assert_eq!(n, 28, "every setting has a variable");
    }

    #[test]
    fn run_needs_a_node_name_and_cluster_cidr_for_masquerade() {
        let c = parse(&[]).unwrap();
        assert!(c.check_for_run().is_err());
        let c = parse(&["--node-name="]).unwrap();
        assert!(c.check_for_run().is_err());
        let c = parse(&["--node-name", "n1"]).unwrap();
        assert!(c
            .check_for_run()
            .unwrap_err()
            .to_string()
            .contains("--cluster-cidr"));
        let c = parse(&["--node-name", "n1", "--masquerade=false"]).unwrap();
        assert!(c.check_for_run().is_ok());
        let c = parse(&["--node-name", "n1", "--cluster-cidr", "10.244.0.0/16"]).unwrap();
        assert!(c.check_for_run().is_ok());
    }

    #[test]
    fn services_on_or_off_and_their_limits() {
        let c = parse(&[]).unwrap();
        assert!(c.services);
        assert_eq!(
            (c.service_max_frontends, c.service_max_backends),
            (65_536, 65_536)
        );
        assert!(!parse(&["--services=off"]).unwrap().services);
        assert!(parse(&["--services", "on"]).unwrap().services);
        let (_, line) = refused(&["--services=true"]);
        assert!(
            line.contains("'true'") && line.contains("--services"),
            "{line}"
        );
        let c = parse(&[
            "--service-max-frontends=100",
            "--service-max-backends",
            "1000",
        ])
        .unwrap();
        assert_eq!(
            (c.service_max_frontends, c.service_max_backends),
            (100, 1000)
        );
        assert!(parse(&["--service-max-backends=0"]).is_err());
    }

    #[test]
    fn metrics_port_alone_or_with_an_address() {
        let c = parse(&["--metrics-port", "9100"]).unwrap();
        assert_eq!(c.metrics_addr, "0.0.0.0:9100".parse().unwrap());
        let c = parse(&["--metrics-port", "9101", "--metrics-addr", "127.0.0.1:1"]).unwrap();
        assert_eq!(c.metrics_addr, "127.0.0.1:9101".parse().unwrap());
        assert!(parse(&["--metrics-port", "http"]).is_err());
        assert!(parse(&["--metrics-port", "70000"]).is_err());
    }

    #[test]
    fn an_empty_plugin_source_installs_nothing() {
        let c = parse(&["--plugin-source="]).unwrap();
        assert_eq!(c.plugin_source, PathBuf::new());
        let c = parse(&["--plugin-source", ""]).unwrap();
        assert_eq!(c.plugin_source, PathBuf::new());
    }
}
