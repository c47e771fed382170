// SPDX-License-Identifier: Apache-2.0
//! The agent's command line against the real process environment (clap
//! reads each setting's variable itself), and the built binary's help,
//! version and usage errors. Unprivileged.
//!
//! Tests that set variables hold `ENV` for as long as they parse: this test
//! binary is the only thing in its process that reads them.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Mutex;

use ferrite_agent::config::{self, Config, Invocation};

static ENV: Mutex<()> = Mutex::new(());

/// Every variable the agent reads. `config::command()` drops the name of a
/// variable that is set but empty (another test may be setting one right
/// now): read under the environment's lock.
fn variables() -> Vec<String> {
    let _held = ENV.lock().unwrap_or_else(|e| e.into_inner());
    variables_unlocked()
}

/// [`variables`] for a caller that holds the environment's lock.
fn variables_unlocked() -> Vec<String> {
    config::command()
        .get_arguments()
        .filter_map(|a| a.get_env())
        .map(|n| n.to_string_lossy().into_owned())
        .collect()
}

/// `ferrite-agent run args` with exactly `vars` of the agent's variables
/// set; the environment is put back afterwards.
fn run_with(vars: &[(&str, &str)], args: &[&str]) -> Result<Config, clap::Error> {
    let _held = ENV.lock().unwrap_or_else(|e| e.into_inner());
    let saved: Vec<(String, Option<std::ffi::OsString>)> = variables_unlocked()
        .into_iter()
        .map(|n| {
            let v = std::env::var_os(&n);
            (n, v)
        })
        .collect();
    for (name, _) in &saved {
        std::env::remove_var(name);
    }
    for (name, value) in vars {
        assert!(saved.iter().any(|(n, _)| n == name), "{name} is not read");
        std::env::set_var(name, value);
    }
    let argv = ["ferrite-agent", "run"].iter().chain(args);
    let parsed = config::parse(argv);
    for (name, value) in saved {
        match value {
            Some(v) => std::env::set_var(&name, v),
            None => std::env::remove_var(&name),
        }
    }
    match parsed? {
        Invocation::Run(c) => Ok(c),
        other => panic!("{other:?}"),
    }
}

#[test]
fn every_setting_has_its_variable() {
    let c = run_with(
        &[
            ("NODE_NAME", "n1"),
            ("KUBECONFIG", "/k"),
            ("FERRITE_BPFFS_ROOT", "/b"),
            ("FERRITE_PLUGIN_SOURCE", "/p"),
            ("FERRITE_CNI_BIN_DIR", "/cb"),
            ("FERRITE_CNI_CONF_DIR", "/cc"),
            ("FERRITE_STATE_DIR", "/s"),
            ("FERRITE_CNI_LOG_FILE", "/l"),
            ("FERRITE_CNI_LOG_LEVEL", "debug"),
            ("FERRITE_BIG_TCP", "true"),
            ("FERRITE_MTU", "1450"),
            ("FERRITE_CLUSTER_CIDR", "10.244.0.0/16, fd00:244::/48"),
            ("FERRITE_SERVICE_CIDR", "10.96.0.0/16,fd00:96::/108"),
            ("FERRITE_NETWORK_POLICY", "false"),
            ("FERRITE_CONNTRACK_ENTRIES", "65536"),
            ("FERRITE_SERVICES", "off"),
            ("FERRITE_KUBE_PROXY", "on"),
            ("FERRITE_HOST_PORTS", "portmap"),
            ("FERRITE_CGROUP_ROOT", "/cg"),
            ("FERRITE_SERVICE_MAX_FRONTENDS", "1024"),
            ("FERRITE_SERVICE_MAX_BACKENDS", "4096"),
            ("FERRITE_SERVICE_CONNTRACK_ENTRIES", "8192"),
            ("FERRITE_MASQUERADE", "no"),
            ("FERRITE_FAST_PATH", "false"),
            ("FERRITE_METRICS_ADDR", "127.0.0.1:1"),
            ("FERRITE_METRICS_PORT", "9100"),
            ("FERRITE_LOG_LEVEL", "warn"),
            ("FERRITE_RESYNC_SECONDS", "5"),
        ],
        &[],
    )
    .unwrap();
    assert_eq!(
        c,
        Config {
            node_name: Some("n1".into()),
            kubeconfig: Some("/k".into()),
            bpffs_root: "/b".into(),
            plugin_source: "/p".into(),
            cni_bin_dir: "/cb".into(),
            cni_conf_dir: "/cc".into(),
            state_dir: "/s".into(),
            cni_log_file: "/l".into(),
            cni_log_level: "debug",
            big_tcp: true,
            mtu: 1450,
            cluster_cidrs: vec![
                "10.244.0.0/16".parse().unwrap(),
                "fd00:244::/48".parse().unwrap()
            ],
            service_cidrs: vec![
                "10.96.0.0/16".parse().unwrap(),
                "fd00:96::/108".parse().unwrap()
            ],
            network_policy: false,
            conntrack_entries: 65536,
            services: false,
            kube_proxy: true,
            host_ports_in_datapath: false,
            cgroup_root: "/cg".into(),
            service_max_frontends: 1024,
            service_max_backends: 4096,
            service_conntrack_entries: 8192,
            masquerade: false,
            fast_path: false,
            metrics_addr: "127.0.0.1:9100".parse().unwrap(),
            log_level: log::LevelFilter::Warn,
            resync: std::time::Duration::from_secs(5),
        }
    );
    assert_eq!(variables().len(), 28);
}

#[test]
fn flags_win_over_variables() {
    let c = run_with(
        &[
            ("FERRITE_MTU", "9000"),
            ("NODE_NAME", "env"),
            ("FERRITE_CNI_BIN_DIR", "/x"),
            ("FERRITE_CLUSTER_CIDR", "10.1.0.0/16"),
            ("FERRITE_MASQUERADE", "false"),
        ],
        &[
            "--mtu",
            "1450",
            "--node-name=n1",
            "--cluster-cidr",
            "10.2.0.0/16",
            "--masquerade",
        ],
    )
    .unwrap();
    assert_eq!(c.mtu, 1450);
    assert_eq!(c.node_name.as_deref(), Some("n1"));
    assert_eq!(c.cni_bin_dir, PathBuf::from("/x"));
    assert_eq!(c.cluster_cidrs, vec!["10.2.0.0/16".parse().unwrap()]);
    assert!(c.masquerade);
    // The port variable changes the address the flag gave.
    let c = run_with(
        &[("FERRITE_METRICS_PORT", "9101")],
        &["--metrics-addr", "127.0.0.1:1"],
    )
    .unwrap();
    assert_eq!(c.metrics_addr, "127.0.0.1:9101".parse().unwrap());
}

/// A ConfigMap key left blank sets its variable to the empty string: that
/// is the default, not a bad value.
#[test]
fn an_empty_variable_is_unset() {
    let blank: Vec<(String, &str)> = variables()
        .into_iter()
        .filter(|n| n != "FERRITE_PLUGIN_SOURCE")
        .map(|n| (n, ""))
        .collect();
    let blank: Vec<(&str, &str)> = blank.iter().map(|(n, v)| (n.as_str(), *v)).collect();
    assert_eq!(run_with(&blank, &[]).unwrap(), Config::default());
    // But the flag given empty is still read: a bad value.
    assert!(run_with(&blank, &["--mtu="]).is_err());
}

#[test]
fn an_empty_plugin_source_installs_nothing() {
    let c = run_with(&[("FERRITE_PLUGIN_SOURCE", "")], &[]).unwrap();
    assert_eq!(c.plugin_source, PathBuf::new());
    let c = run_with(&[], &[]).unwrap();
    assert_eq!(c.plugin_source, PathBuf::from("/opt/ferrite/bin/ferrite"));
}

#[test]
fn a_bad_variable_is_named() {
    let e = run_with(&[("FERRITE_MTU", "9")], &[]).unwrap_err();
    let text = e.to_string();
    assert!(text.contains("'9'") && text.contains("--mtu"), "{text}");
    assert!(text.contains("FERRITE_MTU"), "{text}");
    let e = run_with(&[("FERRITE_MASQUERADE", "maybe")], &[]).unwrap_err();
    assert!(e.to_string().contains("FERRITE_MASQUERADE"), "{e}");
    // A bad flag is the flag's, whatever the variable says.
    let e = run_with(&[("FERRITE_MTU", "1500")], &["--mtu=9"]).unwrap_err();
    assert!(!e.to_string().contains("FERRITE_MTU"), "{e}");
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
    // The API server's address, which the Kubernetes client reads itself.
    let in_cluster = ["KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"];
    let env_names: Vec<&str> = manifest
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- name: "))
        .filter(|n| n.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        .filter(|n| !in_cluster.contains(n))
        .collect();
    assert!(env_names.contains(&"NODE_NAME"));
    let known = variables();
    for name in &env_names {
        assert!(
            known.iter().any(|k| k == name),
            "the DaemonSet sets {name}, which the agent does not read"
        );
    }
    // deploy/config.yaml's values.
    let values: HashMap<&str, &str> = [
        ("NODE_NAME", "node-1"),
        ("FERRITE_CLUSTER_CIDR", "10.244.0.0/16,fd00:10:244::/56"),
        ("FERRITE_SERVICE_CIDR", "10.96.0.0/16"),
        ("FERRITE_NETWORK_POLICY", "true"),
        ("FERRITE_CONNTRACK_ENTRIES", "262144"),
        ("FERRITE_SERVICES", "on"),
        ("FERRITE_KUBE_PROXY", "on"),
        ("FERRITE_CGROUP_ROOT", "/host/sys/fs/cgroup"),
        ("FERRITE_SERVICE_CONNTRACK_ENTRIES", "65536"),
        ("FERRITE_MTU", "1500"),
        ("FERRITE_MASQUERADE", "true"),
        ("FERRITE_FAST_PATH", "true"),
        ("FERRITE_METRICS_PORT", "9965"),
        ("FERRITE_CNI_LOG_LEVEL", "info"),
        ("FERRITE_BIG_TCP", "false"),
        ("FERRITE_HOST_PORTS", "datapath"),
    ]
    .into();
    let vars: Vec<(&str, &str)> = env_names.iter().map(|n| (*n, values[n])).collect();
    let args: Vec<&str> = args[1..].iter().map(String::as_str).collect();
    let c = run_with(&vars, &args).unwrap();
    c.check_for_run().unwrap();
    assert_eq!(c.cluster_cidrs.len(), 2);
    assert_eq!(c.service_cidrs.len(), 1);
    assert!(c.network_policy);
    assert!(c.services);
    assert_eq!(c.plugin_source, PathBuf::from("/opt/ferrite/bin"));
    assert_eq!(c.cni_log_level, "info");
    assert!(!c.big_tcp);
    assert!(c.host_ports_in_datapath);
}

fn agent(args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferrite-agent"));
    for name in variables() {
        cmd.env_remove(name);
    }
    cmd.args(args).output().expect("running ferrite-agent")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn help_goes_to_stdout_and_lists_every_flag_with_its_variable() {
    for args in [
        &["--help"][..],
        &["-h"],
        &["help"],
        &["run", "--help"],
        &["help", "uninstall"],
    ] {
        let out = agent(args);
        assert!(out.status.success(), "{args:?}: {out:?}");
        let help = text(&out.stdout);
        for var in variables() {
            assert!(help.contains(&format!("[env: {var}]")), "{args:?}: {var}");
        }
        for flag in ["--node-name", "--cluster-cidr", "--plugin-source"] {
            assert!(help.contains(flag), "{args:?}: {flag}");
        }
        assert!(out.stderr.is_empty(), "{args:?}: {}", text(&out.stderr));
    }
}

#[test]
fn version_goes_to_stdout() {
    for args in [&["version"][..], &["--version"]] {
        let out = agent(args);
        assert!(out.status.success(), "{args:?}: {out:?}");
        assert_eq!(
            text(&out.stdout),
            format!("ferrite-agent {}\n", config::version())
        );
    }
}

/// Usage errors exit 2 with the reason on stderr and nothing on stdout.
#[test]
fn usage_errors_name_what_is_wrong() {
    for (args, named) in [
        (&["run", "--bpffs-rot", "/x"][..], "'--bpffs-rot'"),
        (&["uninstall", "--nope"], "'--nope'"),
        (&["run", "--node-name", "a", "extra"], "'extra'"),
        (&["start"], "'start'"),
        (&[], "Usage:"),
        (&["run", "--mtu", "9"], "'9'"),
        (&["run"], "--node-name or NODE_NAME"),
        (&["run", "--node-name=a"], "--cluster-cidr"),
    ] {
        let out = agent(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert!(text(&out.stderr).contains(named), "{args:?}: {out:?}");
        assert!(out.stdout.is_empty(), "{args:?}: {out:?}");
    }
}
