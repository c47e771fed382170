// SPDX-License-Identifier: Apache-2.0
//! `ferrite-agent`: ferrite's node agent, run by a DaemonSet on every node.
//!
//! ```text
//! ferrite-agent run [flags]         watch Nodes, keep this node's network set up
//! ferrite-agent uninstall [flags]   remove everything ferrite put on this node
//! ferrite-agent version | help [SUBCOMMAND]
//! ```
//!
//! Each setting is a flag or its environment variable (`config.rs`;
//! `ferrite-agent --help` lists them).

mod logging;

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use ferrite_agent::config::{self, Config, Invocation};
use ferrite_agent::fastpath::{EbpfFastPath, PinnedDatapath};
use ferrite_agent::metrics::AgentState;
use ferrite_agent::service::engine::ServiceTarget;
use ferrite_agent::service::run::OpenTarget;
use ferrite_agent::sync::{self, NodeAgent};
use ferrite_agent::{http, policy, service, watch};

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferrite-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<ExitCode> {
    let invocation = match config::parse(std::env::args_os()) {
        Ok(invocation) => invocation,
        // --help and --version too: clap prints them to stdout, mistakes to
        // stderr, and says how to exit (2 for a usage error).
        Err(e) => {
            e.print()?;
            return Ok(ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2)));
        }
    };
    match invocation {
        Invocation::Run(cfg) => {
            if let Err(e) = cfg.check_for_run() {
                eprintln!("ferrite-agent run: {e}\n\nFor more information, try 'ferrite-agent run --help'.");
                return Ok(ExitCode::from(2));
            }
            logging::init(cfg.log_level);
            agent(cfg)
        }
        Invocation::Uninstall(cfg) => {
            logging::init(cfg.log_level);
            uninstall(&cfg)
        }
        Invocation::Version => {
            writeln!(
                std::io::stdout().lock(),
                "ferrite-agent {}",
                config::version()
            )?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn agent(cfg: Config) -> Result<ExitCode> {
    log::info!(
        "ferrite-agent {} (datapath {}) on node {}",
        env!("CARGO_PKG_VERSION"),
        ferrite_datapath::DATAPATH_VERSION,
        cfg.node_name.as_deref().unwrap_or_default()
    );
    let state = Arc::new(AgentState::default());
    let (updates, snapshots) = std::sync::mpsc::channel();
    let node_agent = NodeAgent::new(cfg.clone(), state.clone(), Box::new(EbpfFastPath));
    let resync = cfg.resync;
    let policy_updates = if cfg.network_policy {
        Some(start_policy(&cfg, &state)?)
    } else {
        log::info!("NetworkPolicy not enforced (--network-policy=false)");
        None
    };
    let services_tx = start_services(&cfg, &state, service_target(&cfg, &state))?;
    // Kept while the agent runs: the thread stops when its sender goes.
    let (service_updates, _services_off) = if cfg.services {
        (Some(services_tx), None)
    } else {
        // Nothing is watched: the thread programs an empty table, which
        // takes out whatever an earlier run with Services on left.
        log::info!("Services left to kube-proxy (--services=off)");
        for empty in [
            service::watch::Update::Services(service::watch::Delta::Listed(Vec::new())),
            service::watch::Update::Endpoints(service::watch::Delta::Listed(Vec::new())),
        ] {
            services_tx.send(empty).context("the service thread")?;
        }
        (None, Some(services_tx))
    };
    let worker = std::thread::Builder::new()
        .name("ferrite-sync".into())
        .spawn(move || sync::sync_loop(node_agent, snapshots, resync))
        .context("starting the sync thread")?;

    // One thread runs the API watch and the HTTP server; the netlink work
    // happens on the sync thread.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(cfg.metrics_addr)
            .await
            .with_context(|| format!("listening on {}", cfg.metrics_addr))?;
        log::info!("serving /healthz, /readyz and /metrics on {}", cfg.metrics_addr);
        let server = tokio::spawn(http::serve(listener, state.clone()));

        let client = kube_client(&cfg).await?;
        if let Some(tx) = policy_updates {
            tokio::spawn(policy::watch::watch_policy_inputs(
                client.clone(),
                tx,
                state.clone(),
            ));
        }
        if let Some(tx) = service_updates {
            tokio::spawn(service::watch::watch_service_inputs(
                client.clone(),
                tx,
                state.clone(),
            ));
        }
        let watch = tokio::spawn(watch::watch_nodes(client, updates, state.clone()));

        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        tokio::select! {
            _ = term.recv() => log::info!("SIGTERM: exiting, leaving the node's network as it is"),
            _ = tokio::signal::ctrl_c() => log::info!("interrupted: exiting, leaving the node's network as it is"),
            r = server => bail!("the HTTP server stopped: {r:?}"),
            _ = watch => bail!("the Node watch stopped"),
        }
        Ok(())
    })?;
    // The sync thread may be in the middle of a netlink request; every step
    // is idempotent, so the next start finishes whatever this one began.
    drop(worker);
    Ok(ExitCode::SUCCESS)
}

/// Starts the policy thread and the listener for ADD's reports; returns
/// where the watches send their updates.
fn start_policy(
    cfg: &Config,
    state: &Arc<AgentState>,
) -> Result<std::sync::mpsc::Sender<policy::watch::Update>> {
    let settings = policy::run::PolicySettings {
        node_name: cfg.node_name.clone().unwrap_or_default(),
        bpffs_root: cfg.bpffs_root.clone(),
        service_cidrs: cfg
            .service_cidrs
            .iter()
            .map(|n| (n.network(), n.prefix()))
            .collect(),
        resync: cfg.resync,
    };
    if settings.service_cidrs.is_empty() {
        log::warn!("no --service-cidr: egress policy to a Service address is checked against that address, not its backend");
    }
    let (tx, rx) = std::sync::mpsc::channel();
    policy::run::listen_for_adds(&cfg.state_dir, tx.clone()).with_context(|| {
        format!(
            "listening on {}",
            cfg.state_dir.join(policy::run::AGENT_SOCKET).display()
        )
    })?;
    let pl = policy::run::PolicyLoop::new(settings, state.clone());
    std::thread::Builder::new()
        .name("ferrite-policy".into())
        .spawn(move || policy::run::policy_loop(pl, rx))
        .context("starting the policy thread")?;
    Ok(tx)
}

/// How the service thread opens the datapath's Service maps: `Ok(None)`
/// while the sync thread has not loaded the datapath yet (it is asked
/// again after a second, and after a failed sync, so an upgrade's new
/// version is picked up). It tells the programs which frontends of the
/// node's own addresses they serve (hostPorts, when the conflist gives
/// ferrite the portMappings capability; NodePorts without kube-proxy),
/// gives them the node's addresses, and attaches the host socket programs
/// (the node's own processes reaching hostPorts, and without kube-proxy
/// ClusterIPs); with neither, it detaches those.
fn service_target(
    cfg: &Config,
    state: &Arc<AgentState>,
) -> OpenTarget<ferrite_datapath::service::ServiceMaps> {
    let root = cfg.bpffs_root.clone();
    let cgroup_root = cfg.cgroup_root.clone();
    let node_ports = cfg.services && !cfg.kube_proxy;
    let host_ports = cfg.host_ports_in_datapath;
    let state = state.clone();
    Box::new(move || {
        let Some(dp) = ferrite_datapath::Datapath::open(&root)? else {
            return Ok(None);
        };
        let maps = dp.service_maps()?;
        // The programs look for NodePorts only where kube-proxy does not.
        maps.set_node_frontends(node_ports, host_ports)?;
        let hooks = if node_ports || host_ports {
            let addrs = ferrite_agent::netlink::Netlink::new()?.host_addresses()?;
            dp.policy_maps()?.set_host_addresses(&addrs)?;
            attach_host_sockets(&dp, &cgroup_root)
        } else {
            let n = ferrite_datapath::Datapath::detach_host_sockets(&root)?;
            if n > 0 {
                log::info!("services: {n} host socket hooks detached: kube-proxy serves the node's own traffic to Services");
            }
            0
        };
        let mut status = state.service_status();
        status.host_socket_hooks = hooks as u64;
        state.set_service_status(status);
        Ok(Some(maps))
    })
}

/// Attaches the host socket programs at the cgroup v2 root under
/// `cgroup_root`; how many hooks carry them. A node that cannot (no
/// cgroup v2) keeps every other Service path: warned, not fatal.
fn attach_host_sockets(dp: &ferrite_datapath::Datapath, cgroup_root: &std::path::Path) -> usize {
    use ferrite_datapath::host_sock::{cgroup2_root, PROGRAMS};
    let Some(cgroup) = cgroup2_root(cgroup_root) else {
        log::warn!(
            "services: no cgroup v2 hierarchy at {} or {}/unified: the node's own processes and hostNetwork pods cannot reach hostPorts, nor ClusterIPs without kube-proxy",
            cgroup_root.display(),
            cgroup_root.display()
        );
        return 0;
    };
    match dp.attach_host_sockets(&cgroup) {
        Ok(r) => {
            if r.created + r.updated > 0 {
                log::info!(
                    "services: host socket hooks at {}: {} attached, {} moved to this version, {} as they were",
                    cgroup.display(),
                    r.created,
                    r.updated,
                    r.unchanged
                );
            }
            PROGRAMS.len()
        }
        Err(e) => {
            log::warn!("services: attaching the host socket hooks at {}: {e}: the node's own processes and hostNetwork pods cannot reach hostPorts, nor ClusterIPs without kube-proxy", cgroup.display());
            0
        }
    }
}

/// Starts the service thread; returns where the watches send their updates.
fn start_services<T: ServiceTarget + 'static>(
    cfg: &Config,
    state: &Arc<AgentState>,
    open: OpenTarget<T>,
) -> Result<std::sync::mpsc::Sender<service::watch::Update>> {
    let settings = service::run::ServiceSettings {
        node_name: cfg.node_name.clone().unwrap_or_default(),
        limits: service::compile::Limits {
            max_frontends: cfg.service_max_frontends as usize,
            max_backends: cfg.service_max_backends as usize,
            ..Default::default()
        },
        resync: cfg.resync,
        node_ports: cfg.services && !cfg.kube_proxy,
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let state = state.clone();
    // The loop is made on its thread: the maps it opens need not be Send.
    std::thread::Builder::new()
        .name("ferrite-services".into())
        .spawn(move || {
            let sl = service::run::ServiceLoop::new(settings, state, open);
            service::run::service_loop(sl, rx)
        })
        .context("starting the service thread")?;
    Ok(tx)
}

async fn kube_client(cfg: &Config) -> Result<kube::Client> {
    let config = match &cfg.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .with_context(|| format!("using {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no in-cluster config and no kubeconfig")?,
    };
    log::info!("API server {}", config.cluster_url);
    kube::Client::try_from(config).context("building the Kubernetes client")
}

fn uninstall(cfg: &Config) -> Result<ExitCode> {
    let mut fast_path = EbpfFastPath;
    let pins = PinnedDatapath {
        root: cfg.bpffs_root.clone(),
    };
    let report = ferrite_agent::uninstall::uninstall(cfg, &mut fast_path, &pins);
    log::info!(
        "uninstall: conflist {}, plugin {}, {} routes, masquerade table {}, {} uplink programs, {} host socket hooks, datapath versions {:?}",
        if report.conflist { "removed" } else { "absent" },
        if report.plugin { "removed" } else { "absent" },
        report.routes,
        if report.masquerade_table { "removed" } else { "absent" },
        report.detached_programs,
        report.host_socket_hooks,
        report.pin_versions
    );
    for e in &report.errors {
        log::error!("{e}");
    }
    if report.errors.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        bail!(
            "uninstall left {} problems (logged above)",
            report.errors.len()
        )
    }
}

#[cfg(test)]
mod tests {
    /// The TLS stack is rustls with ring: building a client for an https
    /// server must not need a crypto provider installed by hand.
    #[test]
    fn https_client_builds_with_ring() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let config = kube::Config::new("https://127.0.0.1:6443".parse().unwrap());
            kube::Client::try_from(config).expect("client");
        });
    }
}
