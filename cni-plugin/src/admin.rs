// SPDX-License-Identifier: Apache-2.0
//! The admin command line: `ferrite` run by a person (no CNI_COMMAND):
//! `version`, `datapath load|uplink|uplink-off`, `stats`, `repair`,
//! `allocations`, `failpoints`, `help`.
//!
//! `parse` turns the arguments into one `Command` (lexopt splits them; a
//! flag or argument a command does not take is refused with its name), then
//! `execute` runs it. The CNI path never comes here.

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};
use ipnetwork::IpNetwork;
use lexopt::Arg::{Long, Short, Value};

use crate::{config, failpoint, netlink, repair, version};

/// What one subcommand is for: its words, its synopsis, what it does and
/// its flags. `ferrite help` lists them all, `ferrite WORDS --help` one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topic {
    Version,
    DatapathLoad,
    DatapathUplink,
    DatapathUplinkOff,
    Stats,
    Policy,
    Services,
    Repair,
    Failpoints,
    Allocations,
}

/// `ferrite datapath --help` shows these three.
const DATAPATH: [Topic; 3] = [
    Topic::DatapathLoad,
    Topic::DatapathUplink,
    Topic::DatapathUplinkOff,
];

struct Help {
    words: &'static str,
    synopsis: &'static str,
    about: &'static str,
    flags: &'static [(&'static str, &'static str)],
}

const BPFFS_ROOT: (&str, &str) = (
    "--bpffs-root DIR",
    "where the datapath is pinned [/sys/fs/bpf/ferrite]",
);

impl Topic {
    const ALL: [Topic; 10] = [
        Topic::Version,
        Topic::DatapathLoad,
        Topic::DatapathUplink,
        Topic::DatapathUplinkOff,
        Topic::Stats,
        Topic::Policy,
        Topic::Services,
        Topic::Repair,
        Topic::Failpoints,
        Topic::Allocations,
    ];

    fn help(self) -> Help {
        match self {
            Topic::Version => Help {
                words: "version",
                synopsis: "",
                about: "versions of the plugin, its datapath and the CNI protocol",
                flags: &[],
            },
            Topic::DatapathLoad => Help {
                words: "datapath load",
                synopsis: "[--bpffs-root DIR]",
                about: "load and pin the datapath now",
                flags: &[BPFFS_ROOT],
            },
            Topic::DatapathUplink => Help {
                words: "datapath uplink",
                synopsis: "DEV [--cluster-cidr CIDR]... [--bpffs-root DIR]",
                about: "cross-node fast path: attach the uplink programs to DEV (TCX) and set\n\
                        the cluster's pod CIDRs (what ferrite-agent does; no CIDR switches it off)",
                flags: &[
                    (
                        "--cluster-cidr CIDR",
                        "a pod CIDR of the cluster; once per CIDR",
                    ),
                    BPFFS_ROOT,
                ],
            },
            Topic::DatapathUplinkOff => Help {
                words: "datapath uplink-off",
                synopsis: "DEV [--bpffs-root DIR]",
                about: "detach the uplink programs from DEV and clear the pod CIDRs",
                flags: &[BPFFS_ROOT],
            },
            Topic::Stats => Help {
                words: "stats",
                synopsis: "[--bpffs-root DIR]",
                about: "per-endpoint counters from the pinned maps",
                flags: &[BPFFS_ROOT],
            },
            Topic::Policy => Help {
                words: "policy",
                synopsis: "[--bpffs-root DIR]",
                about: "each endpoint's NetworkPolicy rules as the pinned maps hold them",
                flags: &[BPFFS_ROOT],
            },
            Topic::Services => Help {
                words: "services",
                synopsis: "[--bpffs-root DIR]",
                about:
                    "each Service frontend as the datapath holds it: backends, affinity, counters",
                flags: &[BPFFS_ROOT],
            },
            Topic::Repair => Help {
                words: "repair",
                synopsis: "--conf FILE",
                about: "load the datapath if needed and move every running pod of the network\n\
                        in FILE (a conflist or plugin config) onto it",
                flags: &[(
                    "--conf FILE",
                    "the network's conflist or plugin configuration",
                )],
            },
            Topic::Failpoints => Help {
                words: "failpoints",
                synopsis: "",
                about: "crash-test points (FERRITE_FAILPOINT=<point>);\n\
                        FERRITE_REAPER_HOLD=<file> holds DEL's reaper",
                flags: &[],
            },
            Topic::Allocations => Help {
                words: "allocations",
                synopsis: "--network NAME [--state-dir DIR]",
                about: "addresses the built-in IPAM holds: ip, container, ifname",
                flags: &[
                    (
                        "--network NAME",
                        "the network's name (the conflist's \"name\")",
                    ),
                    (
                        "--state-dir DIR",
                        "the plugin's stateDir [/var/lib/ferrite]",
                    ),
                ],
            },
        }
    }

    /// The subcommand whose words are `words` ("stats", "datapath load").
    fn find(words: &str) -> Option<Topic> {
        Topic::ALL.into_iter().find(|t| t.help().words == words)
    }

    /// `ferrite stats [--bpffs-root DIR]`
    fn usage(self) -> String {
        let h = self.help();
        format!("ferrite {} {}", h.words, h.synopsis)
            .trim_end()
            .to_string()
    }

    /// `ferrite WORDS --help`: the usage, what it does, the flags.
    fn text(self) -> String {
        let h = self.help();
        let mut out = format!("usage: {}\n\n{}\n", self.usage(), h.about);
        if !h.flags.is_empty() {
            out.push('\n');
            for (flag, what) in h.flags {
                out.push_str(&format!("  {flag:<20} {what}\n"));
            }
        }
        out.push_str("  -h, --help           this text\n");
        out
    }
}

/// `ferrite help`: every subcommand.
fn overview() -> String {
    let mut out = format!(
        "ferrite: a Kubernetes CNI plugin with an eBPF datapath\n\n\
         Invoked by a container runtime with CNI_COMMAND set, it speaks CNI\n\
         (versions {}). By hand:\n\n",
        version::SUPPORTED.join(", ")
    );
    for topic in Topic::ALL {
        out.push_str(&format!("  {}\n", topic.usage()));
        for line in topic.help().about.lines() {
            out.push_str(&format!("      {line}\n"));
        }
    }
    out.push_str(
        "  ferrite help [COMMAND], ferrite COMMAND --help\n      this text, or one command's\n",
    );
    out
}

/// One subcommand, as its command line asked for it.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    /// The pages of these subcommands; none: the overview.
    Help(Vec<Topic>),
    Version,
    DatapathLoad {
        bpffs_root: PathBuf,
    },
    DatapathUplink {
        dev: String,
        cidrs: Vec<IpNetwork>,
        bpffs_root: PathBuf,
    },
    DatapathUplinkOff {
        dev: String,
        bpffs_root: PathBuf,
    },
    Stats {
        bpffs_root: PathBuf,
    },
    Policy {
        bpffs_root: PathBuf,
    },
    Services {
        bpffs_root: PathBuf,
    },
    Repair {
        conf: PathBuf,
    },
    Failpoints,
    Allocations {
        network: String,
        state_dir: PathBuf,
    },
}

/// A command line that asks for nothing `ferrite` does: what is wrong
/// (`None`: nothing was asked) and, where known, the subcommand meant.
#[derive(Debug, PartialEq, Eq)]
pub struct UsageError {
    pub topic: Option<Topic>,
    pub problem: Option<String>,
}

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.problem, self.topic) {
            (None, _) => write!(f, "{}", overview()),
            (Some(problem), Some(topic)) => writeln!(
                f,
                "ferrite {}: {problem}\nusage: {}\nMore: ferrite {} --help",
                topic.help().words,
                topic.usage(),
                topic.help().words
            ),
            (Some(problem), None) => writeln!(f, "ferrite: {problem}\nMore: ferrite --help"),
        }
    }
}

/// Why parsing stopped early: help was asked for, or the line is wrong.
enum Stop {
    Help(Vec<Topic>),
    Usage(UsageError),
}

fn usage(topic: Option<Topic>, problem: impl Into<String>) -> Stop {
    Stop::Usage(UsageError {
        topic,
        problem: Some(problem.into()),
    })
}

/// lexopt's complaint, in the words the rest of this file uses.
fn lexopt_usage(topic: Option<Topic>, e: lexopt::Error) -> Stop {
    let problem = match e {
        lexopt::Error::UnexpectedOption(flag) => format!("unknown flag {flag}"),
        lexopt::Error::UnexpectedArgument(arg) => {
            format!("unexpected argument {:?}", arg.to_string_lossy())
        }
        lexopt::Error::MissingValue { option: Some(flag) } => format!("{flag} needs a value"),
        lexopt::Error::UnexpectedValue { option, .. } => format!("{option} takes no value"),
        other => other.to_string(),
    };
    usage(topic, problem)
}

/// The arguments after a subcommand's words.
struct Args {
    parser: lexopt::Parser,
    topic: Topic,
}

impl Args {
    /// The next flag or argument; `--help` anywhere stops with the help.
    fn next(&mut self) -> Result<Option<lexopt::Arg<'_>>, Stop> {
        let topic = self.topic;
        match self.parser.next() {
            Ok(Some(Long("help") | Short('h'))) => Err(Stop::Help(vec![topic])),
            Ok(arg) => Ok(arg),
            Err(e) => Err(lexopt_usage(Some(topic), e)),
        }
    }

    /// The value of `flag`, which must not be empty.
    fn value(&mut self, flag: &str) -> Result<OsString, Stop> {
        let v = self
            .parser
            .value()
            .map_err(|e| lexopt_usage(Some(self.topic), e))?;
        if v.is_empty() {
            return Err(usage(Some(self.topic), format!("{flag} needs a value")));
        }
        Ok(v)
    }

    fn text(&mut self, flag: &str) -> Result<String, Stop> {
        let v = self.value(flag)?;
        v.into_string().map_err(|v| {
            usage(
                Some(self.topic),
                format!("{flag}: {:?} is not UTF-8", v.to_string_lossy()),
            )
        })
    }

    fn unexpected(&self, e: lexopt::Error) -> Stop {
        lexopt_usage(Some(self.topic), e)
    }

    fn usage(&self, problem: impl Into<String>) -> Stop {
        usage(Some(self.topic), problem)
    }
}

/// Parses the command line (without the program's name).
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Command, UsageError> {
    match parse_inner(lexopt::Parser::from_args(args)) {
        Ok(command) => Ok(command),
        Err(Stop::Help(topics)) => Ok(Command::Help(topics)),
        Err(Stop::Usage(e)) => Err(e),
    }
}

fn parse_inner(mut parser: lexopt::Parser) -> Result<Command, Stop> {
    let word = match parser.next().map_err(|e| lexopt_usage(None, e))? {
        None => {
            return Err(Stop::Usage(UsageError {
                topic: None,
                problem: None,
            }))
        }
        Some(Long("help") | Short('h')) => return help(parser),
        Some(Long("version")) => "version".to_string(),
        Some(Value(word)) => word.to_string_lossy().into_owned(),
        Some(other) => return Err(lexopt_usage(None, other.unexpected())),
    };
    let topic = match word.as_str() {
        "help" => return help(parser),
        "datapath" => match datapath_word(&mut parser)? {
            Some(topic) => topic,
            None => return Err(Stop::Help(DATAPATH.to_vec())),
        },
        other => match Topic::find(other) {
            Some(topic) => topic,
            None => return Err(usage(None, format!("unknown command {other:?}"))),
        },
    };
    let mut args = Args { parser, topic };
    match topic {
        Topic::Version => no_flags(&mut args, Command::Version),
        Topic::Failpoints => no_flags(&mut args, Command::Failpoints),
        Topic::DatapathLoad => Ok(Command::DatapathLoad {
            bpffs_root: bpffs_root_only(&mut args)?,
        }),
        Topic::Stats => Ok(Command::Stats {
            bpffs_root: bpffs_root_only(&mut args)?,
        }),
        Topic::Policy => Ok(Command::Policy {
            bpffs_root: bpffs_root_only(&mut args)?,
        }),
        Topic::Services => Ok(Command::Services {
            bpffs_root: bpffs_root_only(&mut args)?,
        }),
        Topic::DatapathUplink | Topic::DatapathUplinkOff => uplink(&mut args),
        Topic::Repair => {
            let mut conf = None;
            while let Some(arg) = args.next()? {
                match arg {
                    Long("conf") => conf = Some(PathBuf::from(args.value("--conf")?)),
                    other => {
                        let e = other.unexpected();
                        return Err(args.unexpected(e));
                    }
                }
            }
            let conf = conf.ok_or_else(|| args.usage("--conf FILE is required"))?;
            Ok(Command::Repair { conf })
        }
        Topic::Allocations => {
            let mut network = None;
            let mut state_dir = PathBuf::from(config::DEFAULT_STATE_DIR);
            while let Some(arg) = args.next()? {
                match arg {
                    Long("network") => network = Some(args.text("--network")?),
                    Long("state-dir") => state_dir = PathBuf::from(args.value("--state-dir")?),
                    other => {
                        let e = other.unexpected();
                        return Err(args.unexpected(e));
                    }
                }
            }
            let network = network.ok_or_else(|| args.usage("--network is required"))?;
            Ok(Command::Allocations { network, state_dir })
        }
    }
}

/// `ferrite datapath WORD`: which of the three (`None`: `--help`).
fn datapath_word(parser: &mut lexopt::Parser) -> Result<Option<Topic>, Stop> {
    let word = match parser.next() {
        Ok(Some(Value(word))) => word.to_string_lossy().into_owned(),
        Ok(Some(Long("help") | Short('h'))) => return Ok(None),
        Ok(None) => {
            return Err(usage(
                None,
                "datapath needs one of load, uplink, uplink-off",
            ))
        }
        Ok(Some(other)) => return Err(lexopt_usage(None, other.unexpected())),
        Err(e) => return Err(lexopt_usage(None, e)),
    };
    match Topic::find(&format!("datapath {word}")) {
        Some(topic) => Ok(Some(topic)),
        None => Err(usage(
            None,
            format!("unknown command \"datapath {word}\" (load, uplink or uplink-off)"),
        )),
    }
}

/// `ferrite help [WORDS]`, `ferrite --help [WORDS]`.
fn help(mut parser: lexopt::Parser) -> Result<Command, Stop> {
    let mut words = Vec::new();
    while let Some(arg) = parser.next().map_err(|e| lexopt_usage(None, e))? {
        match arg {
            Value(w) => words.push(w.to_string_lossy().into_owned()),
            Long("help") | Short('h') => {}
            other => return Err(lexopt_usage(None, other.unexpected())),
        }
    }
    let asked = words.join(" ");
    if words.is_empty() {
        return Ok(Command::Help(Vec::new()));
    }
    if asked == "datapath" {
        return Ok(Command::Help(DATAPATH.to_vec()));
    }
    match Topic::find(&asked) {
        Some(topic) => Ok(Command::Help(vec![topic])),
        None => Err(usage(
            None,
            format!("no help for {asked:?}: no such command"),
        )),
    }
}

fn no_flags(args: &mut Args, command: Command) -> Result<Command, Stop> {
    if let Some(arg) = args.next()? {
        let e = arg.unexpected();
        return Err(args.unexpected(e));
    }
    Ok(command)
}

fn bpffs_root_only(args: &mut Args) -> Result<PathBuf, Stop> {
    let mut root = PathBuf::from(config::DEFAULT_BPFFS_ROOT);
    while let Some(arg) = args.next()? {
        match arg {
            Long("bpffs-root") => root = PathBuf::from(args.value("--bpffs-root")?),
            other => {
                let e = other.unexpected();
                return Err(args.unexpected(e));
            }
        }
    }
    Ok(root)
}

/// `datapath uplink DEV [--cluster-cidr CIDR]... [--bpffs-root DIR]` and
/// `datapath uplink-off DEV [--bpffs-root DIR]`.
fn uplink(args: &mut Args) -> Result<Command, Stop> {
    let on = args.topic == Topic::DatapathUplink;
    let mut dev = None;
    let mut cidrs = Vec::new();
    let mut bpffs_root = PathBuf::from(config::DEFAULT_BPFFS_ROOT);
    while let Some(arg) = args.next()? {
        match arg {
            Long("bpffs-root") => bpffs_root = PathBuf::from(args.value("--bpffs-root")?),
            Long("cluster-cidr") if on => {
                let text = args.text("--cluster-cidr")?;
                let net: IpNetwork = text
                    .parse()
                    .map_err(|_| args.usage(format!("--cluster-cidr: {text:?} is not a CIDR")))?;
                cidrs.push(net);
            }
            Value(v) if dev.is_none() => {
                dev = Some(v.into_string().map_err(|v| {
                    args.usage(format!("{:?} is not a device name", v.to_string_lossy()))
                })?)
            }
            other => {
                let e = other.unexpected();
                return Err(args.unexpected(e));
            }
        }
    }
    let dev = dev.ok_or_else(|| args.usage("which device is the uplink? (DEV)"))?;
    Ok(if on {
        Command::DatapathUplink {
            dev,
            cidrs,
            bpffs_root,
        }
    } else {
        Command::DatapathUplinkOff { dev, bpffs_root }
    })
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

/// Runs the command line `args` (without the program name). A usage error
/// is printed here, to stderr, and exits 2; help goes to stdout. The
/// result is the process's exit code.
pub fn run(args: impl IntoIterator<Item = OsString>) -> anyhow::Result<u8> {
    match parse(args) {
        Ok(command) => execute(command),
        Err(e) => {
            eprint!("{e}");
            Ok(2)
        }
    }
}

fn execute(command: Command) -> anyhow::Result<u8> {
    let mut out = std::io::stdout().lock();
    match command {
        Command::Help(topics) if topics.is_empty() => write!(out, "{}", overview())?,
        Command::Help(topics) => {
            let pages: Vec<String> = topics.into_iter().map(Topic::text).collect();
            write!(out, "{}", pages.join("\n"))?;
        }
        Command::Version => {
            writeln!(
                out,
                "ferrite {} (datapath {}), CNI {}",
                env!("CARGO_PKG_VERSION"),
                ferrite_datapath::DATAPATH_VERSION,
                version::SUPPORTED.join(", ")
            )?;
        }
        Command::DatapathLoad { bpffs_root: root } => {
            let (dp, outcome) = ferrite_datapath::Datapath::open_or_load(&root)
                .with_context(|| format!("loading the datapath under {}", root.display()))?;
            writeln!(out, "{outcome:?} {}", dp.version_dir().display())?;
        }
        Command::DatapathUplink {
            dev,
            cidrs,
            bpffs_root: root,
        } => {
            let index = if_index(&dev)?;
            let cidrs: Vec<_> = cidrs.iter().map(|n| (n.network(), n.prefix())).collect();
            let (dp, _) = ferrite_datapath::Datapath::open_or_load(&root)
                .with_context(|| format!("loading the datapath under {}", root.display()))?;
            dp.attach_uplink(index)
                .with_context(|| format!("attaching the uplink programs to {dev}"))?;
            dp.set_cluster_cidrs(&cidrs)?;
            writeln!(out, "uplink {dev}: attached; pod CIDRs {cidrs:?}")?;
        }
        Command::DatapathUplinkOff {
            dev,
            bpffs_root: root,
        } => {
            let index = if_index(&dev)?;
            let (dp, _) = ferrite_datapath::Datapath::open_or_load(&root)
                .with_context(|| format!("loading the datapath under {}", root.display()))?;
            let n = ferrite_datapath::Datapath::detach_uplink(index)?;
            dp.set_cluster_cidrs(&[])?;
            writeln!(
                out,
                "uplink {dev}: {n} programs detached; pod CIDRs cleared"
            )?;
        }
        Command::Stats { bpffs_root: root } => {
            let dp = pinned(&root)?;
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
        Command::Policy { bpffs_root: root } => {
            crate::policy_view::write(&pinned(&root)?, &mut out)?;
        }
        Command::Services { bpffs_root: root } => {
            crate::service_view::write(&pinned(&root)?, &mut out)?;
        }
        Command::Allocations { network, state_dir } => {
            let store = ferrite_ipam::Store::open(&state_dir, &network)?;
            for (ip, owner) in store.read()?.records() {
                writeln!(out, "{ip} {} {}", owner.container_id, owner.ifname)?;
            }
        }
        Command::Repair { conf: path } => {
            let conf = conf_from_file(&path)?;
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
        Command::Failpoints => {
            for p in failpoint::POINTS {
                writeln!(out, "{p}")?;
            }
        }
    }
    Ok(0)
}

/// The datapath pinned under `root`, or an error that says where none is.
fn pinned(root: &std::path::Path) -> anyhow::Result<ferrite_datapath::Datapath> {
    match ferrite_datapath::Datapath::open(root)
        .with_context(|| format!("opening the datapath under {}", root.display()))?
    {
        Some(dp) => Ok(dp),
        None => bail!("no datapath pinned under {}", root.display()),
    }
}

fn if_index(dev: &str) -> anyhow::Result<u32> {
    nix::net::if_::if_nametoindex(dev).with_context(|| format!("no device {dev}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_words(line: &str) -> Result<Command, UsageError> {
        parse(line.split_whitespace().map(OsString::from))
    }

    /// The usage error's subcommand and problem.
    fn refused(line: &str) -> (Option<Topic>, String) {
        let e = parse_words(line).expect_err(line);
        (e.topic, e.problem.unwrap_or_default())
    }

    const ROOT: &str = config::DEFAULT_BPFFS_ROOT;

    #[test]
    fn every_subcommand_with_its_flags() {
        assert_eq!(parse_words("version").unwrap(), Command::Version);
        assert_eq!(parse_words("--version").unwrap(), Command::Version);
        assert_eq!(parse_words("failpoints").unwrap(), Command::Failpoints);
        assert_eq!(
            parse_words("stats").unwrap(),
            Command::Stats {
                bpffs_root: ROOT.into()
            }
        );
        assert_eq!(
            parse_words("stats --bpffs-root /b").unwrap(),
            Command::Stats {
                bpffs_root: "/b".into()
            }
        );
        assert_eq!(
            parse_words("policy --bpffs-root /b").unwrap(),
            Command::Policy {
                bpffs_root: "/b".into()
            }
        );
        assert_eq!(
            parse_words("services --bpffs-root /b").unwrap(),
            Command::Services {
                bpffs_root: "/b".into()
            }
        );
        assert_eq!(
            parse_words("datapath load --bpffs-root=/b").unwrap(),
            Command::DatapathLoad {
                bpffs_root: "/b".into()
            }
        );
        // What integration/tests/it/crossnode.rs and scripts/bench run.
        assert_eq!(
            parse_words(
                "datapath uplink up1 --cluster-cidr 10.244.0.0/16 --cluster-cidr fd00:10:244::/56 --bpffs-root /b"
            )
            .unwrap(),
            Command::DatapathUplink {
                dev: "up1".into(),
                cidrs: vec![
                    "10.244.0.0/16".parse().unwrap(),
                    "fd00:10:244::/56".parse().unwrap()
                ],
                bpffs_root: "/b".into()
            }
        );
        // The device may stand after the flags.
        assert_eq!(
            parse_words("datapath uplink-off --bpffs-root /b up1").unwrap(),
            Command::DatapathUplinkOff {
                dev: "up1".into(),
                bpffs_root: "/b".into()
            }
        );
        assert_eq!(
            parse_words("datapath uplink eth0").unwrap(),
            Command::DatapathUplink {
                dev: "eth0".into(),
                cidrs: vec![],
                bpffs_root: ROOT.into()
            }
        );
        assert_eq!(
            parse_words("repair --conf /etc/cni/net.d/10-ferrite.conflist").unwrap(),
            Command::Repair {
                conf: "/etc/cni/net.d/10-ferrite.conflist".into()
            }
        );
        assert_eq!(
            parse_words("allocations --network n1").unwrap(),
            Command::Allocations {
                network: "n1".into(),
                state_dir: config::DEFAULT_STATE_DIR.into()
            }
        );
        assert_eq!(
            parse_words("allocations --state-dir /s --network=n1").unwrap(),
            Command::Allocations {
                network: "n1".into(),
                state_dir: "/s".into()
            }
        );
    }

    #[test]
    fn a_misspelt_flag_is_refused_with_its_name() {
        assert_eq!(
            refused("stats --bpffs-rot X"),
            (Some(Topic::Stats), "unknown flag --bpffs-rot".into())
        );
        assert_eq!(
            refused("allocations --network n --state X"),
            (Some(Topic::Allocations), "unknown flag --state".into())
        );
        assert_eq!(
            refused("repair --config f"),
            (Some(Topic::Repair), "unknown flag --config".into())
        );
        // A flag another subcommand takes is still unknown here.
        assert_eq!(
            refused("datapath uplink-off eth0 --cluster-cidr 10.0.0.0/8"),
            (
                Some(Topic::DatapathUplinkOff),
                "unknown flag --cluster-cidr".into()
            )
        );
        assert_eq!(
            refused("datapath load -b /x"),
            (Some(Topic::DatapathLoad), "unknown flag -b".into())
        );
        assert_eq!(refused("--bogus"), (None, "unknown flag --bogus".into()));
    }

    #[test]
    fn stray_arguments_are_refused() {
        assert_eq!(
            refused("stats /sys/fs/bpf/ferrite"),
            (
                Some(Topic::Stats),
                "unexpected argument \"/sys/fs/bpf/ferrite\"".into()
            )
        );
        assert_eq!(
            refused("version now"),
            (Some(Topic::Version), "unexpected argument \"now\"".into())
        );
        assert_eq!(
            refused("datapath uplink eth0 eth1"),
            (
                Some(Topic::DatapathUplink),
                "unexpected argument \"eth1\"".into()
            )
        );
        assert_eq!(refused("stat"), (None, "unknown command \"stat\"".into()));
        assert_eq!(
            refused("datapath unload").1,
            "unknown command \"datapath unload\" (load, uplink or uplink-off)"
        );
        // `load` is a word of `datapath`, not a command of its own.
        assert_eq!(refused("load"), (None, "unknown command \"load\"".into()));
    }

    #[test]
    fn missing_and_bad_values() {
        assert_eq!(
            refused("stats --bpffs-root"),
            (Some(Topic::Stats), "--bpffs-root needs a value".into())
        );
        assert_eq!(
            refused("stats --bpffs-root="),
            (Some(Topic::Stats), "--bpffs-root needs a value".into())
        );
        assert_eq!(
            refused("allocations"),
            (Some(Topic::Allocations), "--network is required".into())
        );
        assert_eq!(
            refused("repair"),
            (Some(Topic::Repair), "--conf FILE is required".into())
        );
        assert_eq!(
            refused("datapath uplink --bpffs-root /b").0,
            Some(Topic::DatapathUplink)
        );
        assert_eq!(
            refused("datapath uplink eth0 --cluster-cidr 10.0.0.300/8").1,
            "--cluster-cidr: \"10.0.0.300/8\" is not a CIDR"
        );
        assert_eq!(
            refused("datapath"),
            (
                None,
                "datapath needs one of load, uplink, uplink-off".into()
            )
        );
        // Nothing at all: the overview, as a usage error.
        assert_eq!(
            parse_words(""),
            Err(UsageError {
                topic: None,
                problem: None
            })
        );
    }

    #[test]
    fn help_everywhere() {
        for line in ["help", "--help", "-h"] {
            assert_eq!(parse_words(line).unwrap(), Command::Help(vec![]), "{line}");
        }
        for topic in Topic::ALL {
            let words = topic.help().words;
            for line in [
                format!("{words} --help"),
                format!("{words} -h"),
                format!("help {words}"),
                format!("--help {words}"),
            ] {
                assert_eq!(
                    parse_words(&line).unwrap(),
                    Command::Help(vec![topic]),
                    "{line}"
                );
            }
        }
        // Help wins over the flags around it, even those still missing.
        assert_eq!(
            parse_words("allocations --state-dir /s --help").unwrap(),
            Command::Help(vec![Topic::Allocations])
        );
        assert_eq!(
            parse_words("datapath --help").unwrap(),
            Command::Help(DATAPATH.to_vec())
        );
        assert_eq!(
            parse_words("help datapath").unwrap(),
            Command::Help(DATAPATH.to_vec())
        );
        assert!(parse_words("help nothing").is_err());
    }

    #[test]
    fn every_page_names_its_flags_and_the_overview_every_command() {
        let overview = overview();
        for topic in Topic::ALL {
            assert!(overview.contains(&topic.usage()), "{topic:?}");
            let page = topic.text();
            assert!(page.starts_with(&format!("usage: {}\n", topic.usage())));
            for (flag, _) in topic.help().flags {
                let name = flag.split(' ').next().unwrap();
                assert!(topic.usage().contains(name), "{topic:?}: {name}");
            }
        }
        // The defaults the pages show are the ones used.
        assert!(Topic::Stats.text().contains(config::DEFAULT_BPFFS_ROOT));
        assert!(Topic::Allocations
            .text()
            .contains(config::DEFAULT_STATE_DIR));
        for v in version::SUPPORTED {
            assert!(overview.contains(v));
        }
    }

    #[test]
    fn a_usage_error_names_the_problem_and_the_usage() {
        let e = parse_words("stats --bpffs-rot X").unwrap_err();
        assert_eq!(
            e.to_string(),
            "ferrite stats: unknown flag --bpffs-rot\n\
             usage: ferrite stats [--bpffs-root DIR]\n\
             More: ferrite stats --help\n"
        );
        let e = parse_words("bogus").unwrap_err();
        assert_eq!(
            e.to_string(),
            "ferrite: unknown command \"bogus\"\nMore: ferrite --help\n"
        );
        assert_eq!(parse_words("").unwrap_err().to_string(), overview());
    }

    #[test]
    fn arguments_need_not_be_utf8() {
        use std::os::unix::ffi::OsStringExt;
        let root = OsString::from_vec(b"/b\xff".to_vec());
        let args = ["stats".into(), "--bpffs-root".into(), root.clone()];
        assert_eq!(
            parse(args).unwrap(),
            Command::Stats {
                bpffs_root: root.into()
            }
        );
    }
}
