// SPDX-License-Identifier: Apache-2.0
//! The admin command line: `ferrite` run by a person (no CNI_COMMAND):
//! `version`, `datapath load|uplink|uplink-off`, `stats`, `repair`,
//! `allocations`, `failpoints`, `help`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};

use crate::{config, failpoint, netlink, repair, version};

const USAGE: &str = "\
ferrite: a Kubernetes CNI plugin with an eBPF datapath

Invoked by a container runtime with CNI_COMMAND set, it speaks CNI
(versions 0.3.0 to 1.1.0). By hand:

  ferrite version                          versions of the plugin and its datapath
  ferrite datapath load [--bpffs-root D]   load and pin the datapath now
  ferrite datapath uplink DEV [--cluster-cidr CIDR]... [--bpffs-root D]
                                           cross-node fast path: attach the uplink programs
                                           to DEV (TCX) and set the cluster's pod CIDRs
                                           (what ferrite-agent does; no CIDR switches it off)
  ferrite datapath uplink-off DEV [--bpffs-root D]
                                           detach them and clear the pod CIDRs
  ferrite stats [--bpffs-root D]           per-endpoint counters from the pinned maps
  ferrite repair --conf FILE               load the datapath if needed and move every running pod
                                           of the network in FILE (a conflist or plugin config) onto it
  ferrite failpoints                       crash-test points (FERRITE_FAILPOINT=<point>);
                                           FERRITE_REAPER_HOLD=<file> holds DEL's reaper
  ferrite allocations --network N [--state-dir D]
                                           addresses the built-in IPAM holds: ip, container, ifname
";

fn bpffs_root(args: &[String]) -> anyhow::Result<PathBuf> {
    match args.iter().position(|a| a == "--bpffs-root") {
        Some(i) => Ok(PathBuf::from(
            args.get(i + 1).context("--bpffs-root needs a directory")?,
        )),
        None => Ok(PathBuf::from(config::DEFAULT_BPFFS_ROOT)),
    }
}

/// A network configuration from a file: a conflist (its ferrite entry,
/// with the list's name and version) or a single plugin configuration.
fn conf_from_file(path: &std::path::Path) -> anyhow::Result<config::NetConf> {
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let list: serde_json::Value = serde_json::from_slice(&text)?;
    let mut entry = match list.get("plugins").and_then(|p| p.as_array()) {
        Some(plugins) => plugins
            .iter()
            .find(|p| p["type"] == "ferrite")
            .cloned()
            .context("no ferrite plugin in the list")?,
        None => list.clone(),
    };
    for key in ["cniVersion", "name"] {
        if entry.get(key).is_none() {
            entry[key] = list[key].clone();
        }
    }
    config::NetConf::parse(&serde_json::to_vec(&entry)?).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Runs the subcommand in `args` (the command line without the program name).
pub fn run(args: Vec<String>) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    match args.first().map(String::as_str) {
        Some("version") | Some("--version") => {
            writeln!(
                out,
                "ferrite {} (datapath {}), CNI {}",
                env!("CARGO_PKG_VERSION"),
                ferrite_datapath::DATAPATH_VERSION,
                version::SUPPORTED.join(", ")
            )?;
        }
        Some("datapath") if args.get(1).map(String::as_str) == Some("load") => {
            let root = bpffs_root(&args)?;
            let (dp, outcome) = ferrite_datapath::Datapath::open_or_load(&root)
                .with_context(|| format!("loading the datapath under {}", root.display()))?;
            writeln!(out, "{outcome:?} {}", dp.version_dir().display())?;
        }
        Some("datapath")
            if matches!(
                args.get(1).map(String::as_str),
                Some("uplink" | "uplink-off")
            ) =>
        {
            let on = args[1] == "uplink";
            let dev = args.get(2).context("which device is the uplink?")?;
            let index = nix::net::if_::if_nametoindex(dev.as_str())
                .with_context(|| format!("no device {dev}"))?;
            let mut cidrs = Vec::new();
            for (i, a) in args.iter().enumerate() {
                if a == "--cluster-cidr" {
                    let text = args.get(i + 1).context("--cluster-cidr needs a CIDR")?;
                    let net: ipnetwork::IpNetwork = text
                        .parse()
                        .with_context(|| format!("{text} is not a CIDR"))?;
                    cidrs.push((net.network(), net.prefix()));
                }
            }
            let root = bpffs_root(&args)?;
            let (dp, _) = ferrite_datapath::Datapath::open_or_load(&root)
                .with_context(|| format!("loading the datapath under {}", root.display()))?;
            if on {
                dp.attach_uplink(index)
                    .with_context(|| format!("attaching the uplink programs to {dev}"))?;
                dp.set_cluster_cidrs(&cidrs)?;
                writeln!(out, "uplink {dev}: attached; pod CIDRs {cidrs:?}")?;
            } else {
                let n = ferrite_datapath::Datapath::detach_uplink(index)?;
                dp.set_cluster_cidrs(&[])?;
                writeln!(
                    out,
                    "uplink {dev}: {n} programs detached; pod CIDRs cleared"
                )?;
            }
        }
        Some("stats") => {
            let root = bpffs_root(&args)?;
            let Some(dp) = ferrite_datapath::Datapath::open(&root)
                .with_context(|| format!("opening the datapath under {}", root.display()))?
            else {
                bail!("no datapath pinned under {}", root.display());
            };
            let mut endpoints = dp.endpoints()?;
            endpoints.sort_by_key(|(ip, _)| *ip);
            writeln!(
                out,
                "{:<40} {:>8} {:>10} {:>12} {:>10} {:>12} {:>10} {:>10}  drops",
                "endpoint",
                "ifindex",
                "from_pod",
                "from_bytes",
                "redirected",
                "redir_bytes",
                "redir_in",
                "via_stack"
            )?;
            for (ip, ep) in endpoints {
                let s = dp.stats(ep.ifindex)?;
                let Some(s) = s else {
                    writeln!(out, "{ip:<40} {:>8} (no counters)", ep.ifindex)?;
                    continue;
                };
                let drops: Vec<String> = s
                    .drops
                    .iter()
                    .filter(|(_, n)| *n > 0)
                    .map(|(r, n)| format!("{r}={n}"))
                    .collect();
                writeln!(
                    out,
                    "{ip:<40} {:>8} {:>10} {:>12} {:>10} {:>12} {:>10} {:>10}  {}",
                    ep.ifindex,
                    s.from_pod_packets,
                    s.from_pod_bytes,
                    s.redirected_packets,
                    s.redirected_bytes,
                    s.redirected_in_packets,
                    s.to_pod_packets,
                    if drops.is_empty() {
                        "-".to_string()
                    } else {
                        drops.join(",")
                    }
                )?;
            }
        }
        Some("allocations") => {
            let flag = |name: &str| {
                args.iter()
                    .position(|a| a == name)
                    .and_then(|i| args.get(i + 1))
                    .cloned()
            };
            let network = flag("--network").context("--network is required")?;
            let dir = flag("--state-dir").unwrap_or_else(|| config::DEFAULT_STATE_DIR.into());
            let store = ferrite_ipam::Store::open(std::path::Path::new(&dir), &network)?;
            for (ip, owner) in store.read()?.records() {
                writeln!(out, "{ip} {} {}", owner.container_id, owner.ifname)?;
            }
        }
        Some("repair") => {
            let path = args
                .iter()
                .position(|a| a == "--conf")
                .and_then(|i| args.get(i + 1))
                .context("--conf FILE is required")?;
            let conf = conf_from_file(std::path::Path::new(path))?;
            let (dp, outcome) = ferrite_datapath::Datapath::open_or_load(&conf.bpffs_root)
                .with_context(|| {
                    format!("loading the datapath under {}", conf.bpffs_root.display())
                })?;
            let mut nl = netlink::Netlink::new()?;
            let report = repair::run(&conf, &dp, &mut nl).map_err(|e| anyhow::anyhow!("{e}"))?;
            writeln!(
                out,
                "datapath {outcome:?} at {}: {} pods restored, {} addresses without a live veth, removed versions {:?}",
                dp.version_dir().display(),
                report.restored,
                report.skipped,
                report.pruned
            )?;
        }
        Some("failpoints") => {
            for p in failpoint::POINTS {
                writeln!(out, "{p}")?;
            }
        }
        Some("help") | Some("--help") | Some("-h") => write!(out, "{USAGE}")?,
        _ => {
            eprint!("{USAGE}");
            eprintln!(
                "\nCNI protocol versions supported: {}",
                version::SUPPORTED.join(", ")
            );
            return Ok(ExitCode::from(1));
        }
    }
    Ok(ExitCode::SUCCESS)
}
