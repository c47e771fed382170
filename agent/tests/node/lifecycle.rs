// SPDX-License-Identifier: Apache-2.0
//! The whole agent on a node namespace, fed Node lists instead of an API
//! server: bootstrap, a restart that changes nothing, node changes, and an
//! uninstall that removes exactly what the agent added.

use std::os::unix::fs::MetadataExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use ferrite_agent::config::Config;
use ferrite_agent::fastpath::{EbpfFastPath, FastPath, FastPathError, PinnedDatapath};
use ferrite_agent::metrics::AgentState;
use ferrite_agent::node::NodeInfo;
use ferrite_agent::routes::RTPROT_FERRITE_NODES;
use ferrite_agent::sync::{NodeAgent, Snapshot};
use ferrite_agent::uninstall;
use ferrite_datapath::{Datapath, DATAPATH_VERSION};
use ipnetwork::IpNetwork;

use crate::harness::{privileged, Netns, TempDir};

/// Records the fast path calls the agent makes.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<String>>>);

impl Recorder {
    fn calls(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

impl FastPath for Recorder {
    fn set_cluster_cidrs(
        &mut self,
        _: &Datapath,
        cidrs: &[IpNetwork],
    ) -> Result<(), FastPathError> {
        let list: Vec<String> = cidrs.iter().map(ToString::to_string).collect();
        self.0
            .lock()
            .unwrap()
            .push(format!("cidrs {}", list.join(",")));
        Ok(())
    }
    fn attach_uplink(&mut self, _: &Datapath, ifindex: u32) -> Result<(), FastPathError> {
        self.0.lock().unwrap().push(format!("attach {ifindex}"));
        Ok(())
    }
    fn detach_uplink(&mut self, ifindex: u32) -> Result<usize, FastPathError> {
        self.0.lock().unwrap().push(format!("detach {ifindex}"));
        Ok(0)
    }
}

fn node(name: &str, cidrs: &[&str], ips: &[&str]) -> NodeInfo {
    NodeInfo {
        name: name.into(),
        pod_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
        internal_ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
    }
}

struct Node {
    ns: Netns,
    bpffs: TempDir,
    dirs: TempDir,
}

impl Node {
    fn new() -> Self {
        let ns = Netns::new("lc").unwrap();
        ns.exec(
            "ip link add up0 type veth peer name up0p && ip link set up0p up && ip link set up0 up && \
             ip addr add 192.0.2.1/24 dev up0 && ip addr add 2001:db8::1/64 dev up0 nodad",
        )
        .unwrap();
        let dirs = TempDir::new("lcd").unwrap();
        std::fs::create_dir_all(dirs.join("src")).unwrap();
        std::fs::write(dirs.join("src/ferrite"), b"\x7fELF the plugin").unwrap();
        std::fs::write(dirs.join("src/portmap"), b"\x7fELF the image's portmap").unwrap();
        std::fs::write(dirs.join("src/loopback"), b"\x7fELF the image's loopback").unwrap();
        Node {
            ns,
            bpffs: TempDir::bpffs("lcb").unwrap(),
            dirs,
        }
    }

    fn config(&self) -> Config {
        Config {
            node_name: Some("a".into()),
            bpffs_root: self.bpffs.join("ferrite"),
            plugin_source: self.dirs.join("src/ferrite"),
            cni_bin_dir: self.dirs.join("bin"),
            cni_conf_dir: self.dirs.join("net.d"),
            state_dir: self.dirs.join("state"),
            cni_log_file: self.dirs.join("cni.log"),
            cluster_cidrs: vec![
                "10.244.0.0/16".parse().unwrap(),
                "fd00:244::/32".parse().unwrap(),
            ],
            ..Config::default()
        }
    }

    fn uplink(&self) -> u32 {
        self.ns
            .exec("cat /sys/class/net/up0/ifindex")
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }
}

fn cluster() -> Snapshot {
    Snapshot {
        nodes: vec![
            node(
                "a",
                &["10.244.1.0/24", "fd00:244:1::/64"],
                &["192.0.2.1", "2001:db8::1"],
            ),
            node(
                "b",
                &["10.244.2.0/24", "fd00:244:2::/64"],
                &["192.0.2.2", "2001:db8::2"],
            ),
        ],
        relisted: true,
    }
}

#[test]
fn bootstrap_restart_node_changes_and_uninstall() {
    if !privileged("bootstrap_restart_node_changes_and_uninstall") {
        return;
    }
    let n = Node::new();
    // The image's layout: a directory with ferrite, portmap and loopback.
    let cfg = Config {
        plugin_source: n.dirs.join("src"),
        ..n.config()
    };
    // What is not ferrite's: another config, the node's own portmap, someone's
    // route and nftables table. All of it must survive.
    std::fs::create_dir_all(&cfg.cni_conf_dir).unwrap();
    std::fs::write(cfg.cni_conf_dir.join("99-other.conflist"), b"{}").unwrap();
    std::fs::create_dir_all(&cfg.cni_bin_dir).unwrap();
    std::fs::write(cfg.cni_bin_dir.join("portmap"), b"other").unwrap();
    n.ns.exec(
        "ip route add 10.244.9.0/24 via 192.0.2.9 proto static && \
         ip route add 10.244.1.5/32 dev up0 proto 70 scope link && \
         nft add table inet other",
    )
    .unwrap();

    // Before its Node has pod CIDRs the agent does nothing at all.
    let state = Arc::new(AgentState::default());
    let fast = Recorder::default();
    let mut agent = NodeAgent::new(cfg.clone(), state.clone(), Box::new(fast.clone()));
    let early = Snapshot {
        nodes: vec![node("a", &[], &["192.0.2.1"])],
        relisted: true,
    };
    let r = n.ns.run(|| agent.sync(&early, true)).unwrap();
    assert!(r.waiting.is_some() && r.errors.is_empty());
    assert!(!cfg.conflist_path().exists());
    assert!(!cfg.bpffs_root.exists());
    assert!(fast.calls().is_empty());

    // Its Node gets pod CIDRs: everything appears, the conflist last.
    let r = n.ns.run(|| agent.sync(&cluster(), true)).unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert!(r.waiting.is_none());
    assert!(r.installed_plugin && r.wrote_conflist);
    assert_eq!((r.routes_replaced, r.routes_programmed), (2, 2));
    assert!(state.ready());
    assert!(state.last_sync_seconds.load(Ordering::Relaxed) > 0);
    let conflist: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cfg.conflist_path()).unwrap()).unwrap();
    assert_eq!(
        conflist["plugins"][0]["ipam"]["ranges"],
        serde_json::json!([[{"subnet": "10.244.1.0/24"}], [{"subnet": "fd00:244:1::/64"}]])
    );
    assert_eq!(
        conflist["plugins"][0]["bpffsRoot"],
        cfg.bpffs_root.to_str().unwrap()
    );
    // hostPorts in the datapath (the default): ferrite has the capability,
    // no portmap follows.
    assert_eq!(
        conflist["plugins"][0]["capabilities"]["portMappings"],
        serde_json::json!(true)
    );
    assert_eq!(conflist["plugins"].as_array().unwrap().len(), 1);
    assert_eq!(
        std::fs::read(cfg.plugin_path()).unwrap(),
        b"\x7fELF the plugin"
    );
    assert_eq!(
        std::fs::read(cfg.cni_bin_dir.join("loopback")).unwrap(),
        b"\x7fELF the image's loopback",
        "the loopback the node lacked"
    );
    assert_eq!(
        std::fs::read(cfg.cni_bin_dir.join("portmap")).unwrap(),
        b"other"
    );
    assert!(cfg
        .bpffs_root
        .join(DATAPATH_VERSION)
        .join("from_pod")
        .exists());
    let mut routes = n.ns.routes(RTPROT_FERRITE_NODES).unwrap();
    routes.sort();
    assert_eq!(
        routes,
        [
            "10.244.2.0/24 via 192.0.2.2 dev up0",
            "fd00:244:2::/64 via 2001:db8::2 dev up0 metric 1024 pref medium",
        ]
    );
    let table = n.ns.exec("nft list table inet ferrite").unwrap();
    assert!(
        table.contains("ip saddr 10.244.1.0/24 masquerade"),
        "{table}"
    );
    assert_eq!(n.ns.nft_set("node_ips4").unwrap().len(), 2);
    assert_eq!(n.ns.nft_set("node_ips6").unwrap().len(), 2);
    assert_eq!(
        fast.calls(),
        [
            format!("attach {}", n.uplink()),
            "cidrs 10.244.0.0/16,fd00:244::/32".to_string(),
        ]
    );
    let metrics = state.render();
    assert!(
        metrics.contains("\nferrite_agent_routes_programmed 2\n"),
        "{metrics}"
    );
    assert!(metrics.contains("\nferrite_endpoints 0\n"), "{metrics}");

    // The agent restarts: a new process finds everything in place and
    // rewrites nothing.
    let conflist_inode = std::fs::metadata(cfg.conflist_path()).unwrap().ino();
    let plugin_inode = std::fs::metadata(cfg.plugin_path()).unwrap().ino();
    let state2 = Arc::new(AgentState::default());
    let mut restarted = NodeAgent::new(cfg.clone(), state2.clone(), Box::new(Recorder::default()));
    let r = n.ns.run(|| restarted.sync(&cluster(), true)).unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert!(!r.installed_plugin && !r.wrote_conflist);
    assert_eq!(
        (r.routes_replaced, r.routes_deleted, r.routes_programmed),
        (0, 0, 2)
    );
    assert!(state2.ready());
    assert_eq!(
        std::fs::metadata(cfg.conflist_path()).unwrap().ino(),
        conflist_inode
    );
    assert_eq!(
        std::fs::metadata(cfg.plugin_path()).unwrap().ino(),
        plugin_inode
    );
    assert_eq!(n.ns.exec("nft list table inet ferrite").unwrap(), table);

    // Node b moves; node c joins; then b leaves.
    let mut nodes = cluster();
    nodes.nodes[1].internal_ips = vec!["192.0.2.22".parse().unwrap()];
    nodes
        .nodes
        .push(node("c", &["10.244.3.0/24"], &["192.0.2.3"]));
    let r = n.ns.run(|| restarted.sync(&nodes, false)).unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert!(
        r.warnings.iter().any(|w| w.contains("node b")),
        "{:?}",
        r.warnings
    );
    let mut routes = n.ns.routes(RTPROT_FERRITE_NODES).unwrap();
    routes.sort();
    assert_eq!(
        routes,
        [
            "10.244.2.0/24 via 192.0.2.22 dev up0",
            "10.244.3.0/24 via 192.0.2.3 dev up0",
        ]
    );
    let v4: Vec<String> = n.ns.nft_set("node_ips4").unwrap().into_iter().collect();
    assert_eq!(v4, ["192.0.2.1", "192.0.2.22", "192.0.2.3"]);
    nodes.nodes.remove(1);
    n.ns.run(|| restarted.sync(&nodes, false)).unwrap();
    assert_eq!(
        n.ns.routes(RTPROT_FERRITE_NODES).unwrap(),
        ["10.244.3.0/24 via 192.0.2.3 dev up0"]
    );

    // Someone deletes the table: the next full sync puts it back.
    n.ns.exec("nft delete table inet ferrite").unwrap();
    let r = n.ns.run(|| restarted.sync(&nodes, true)).unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert!(n.ns.exec("nft list table inet ferrite").is_ok());

    // Uninstall: ferrite's things go, nothing else.
    let mut fast = Recorder::default();
    let pins = PinnedDatapath {
        root: cfg.bpffs_root.clone(),
    };
    let report =
        n.ns.run(|| uninstall::uninstall(&cfg, &mut fast, &pins))
            .unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(report.conflist && report.plugin && report.masquerade_table);
    assert_eq!(report.routes, 1);
    assert_eq!(report.pin_versions, [DATAPATH_VERSION.to_string()]);
    assert_eq!(fast.calls(), [format!("detach {}", n.uplink())]);
    assert!(!cfg.conflist_path().exists());
    assert!(!cfg.plugin_path().exists());
    assert!(!cfg.bpffs_root.exists());
    assert!(n.ns.routes(RTPROT_FERRITE_NODES).unwrap().is_empty());
    assert!(n.ns.exec("nft list table inet ferrite").is_err());
    assert!(cfg.cni_conf_dir.join("99-other.conflist").exists());
    assert_eq!(
        std::fs::read(cfg.cni_bin_dir.join("portmap")).unwrap(),
        b"other",
        "the node's own portmap"
    );
    // Only the loopback the node lacked, which the agent installed.
    assert_eq!(report.companions, ["loopback"]);
    assert!(!cfg.cni_bin_dir.join("loopback").exists());
    assert!(n.ns.exec("nft list table inet other").is_ok());
    let all = n.ns.exec("ip route show table all").unwrap();
    assert!(
        all.contains("10.244.9.0/24 via 192.0.2.9 dev up0 proto static"),
        "{all}"
    );
    assert!(
        all.contains("10.244.1.5 dev up0 proto 70 scope link"),
        "{all}"
    );

    // Uninstalling again finds nothing and fails on nothing.
    let again =
        n.ns.run(|| uninstall::uninstall(&cfg, &mut fast, &pins))
            .unwrap();
    assert!(again.errors.is_empty(), "{:?}", again.errors);
    assert!(!again.conflist && !again.plugin && !again.masquerade_table);
    assert_eq!(again.routes, 0);
}

#[test]
fn masquerade_off_removes_the_table_and_fast_path_off_detaches() {
    if !privileged("masquerade_off_removes_the_table_and_fast_path_off_detaches") {
        return;
    }
    let n = Node::new();
    let cfg = n.config();
    let mut agent = NodeAgent::new(
        cfg.clone(),
        Arc::new(AgentState::default()),
        Box::new(Recorder::default()),
    );
    let r = n.ns.run(|| agent.sync(&cluster(), true)).unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert!(n.ns.exec("nft list table inet ferrite").is_ok());

    let off = Config {
        masquerade: false,
        fast_path: false,
        ..cfg.clone()
    };
    let fast = Recorder::default();
    let mut agent = NodeAgent::new(off, Arc::new(AgentState::default()), Box::new(fast.clone()));
    let r = n.ns.run(|| agent.sync(&cluster(), true)).unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert!(n.ns.exec("nft list table inet ferrite").is_err());
    assert_eq!(
        fast.calls(),
        ["cidrs ".to_string(), format!("detach {}", n.uplink())]
    );
    // The rest of the node's setup stands.
    assert!(cfg.conflist_path().exists());
    assert_eq!(n.ns.routes(RTPROT_FERRITE_NODES).unwrap().len(), 2);

    let pins = PinnedDatapath {
        root: cfg.bpffs_root.clone(),
    };
    let report =
        n.ns.run(|| uninstall::uninstall(&cfg, &mut Recorder::default(), &pins))
            .unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
}

#[test]
fn loading_the_datapath_under_a_running_node_asks_the_plugin_to_repair() {
    if !privileged("loading_the_datapath_under_a_running_node_asks_the_plugin_to_repair") {
        return;
    }
    let n = Node::new();
    let cfg = n.config();
    // A node that ran ferrite before (its conflist is there) but whose
    // datapath is not pinned: a new version, or a remounted bpffs.
    std::fs::create_dir_all(&cfg.cni_conf_dir).unwrap();
    std::fs::write(cfg.conflist_path(), b"{\"name\": \"ferrite\"}\n").unwrap();
    // A stand-in plugin that records how it was called.
    let marker = n.dirs.join("repair-args");
    std::fs::write(
        &cfg.plugin_source,
        format!("#!/bin/sh\necho \"$@\" > {}\n", marker.display()),
    )
    .unwrap();
    let mut agent = NodeAgent::new(
        cfg.clone(),
        Arc::new(AgentState::default()),
        Box::new(Recorder::default()),
    );
    let r = n.ns.run(|| agent.sync(&cluster(), true)).unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap().trim(),
        format!("repair --conf {}", cfg.conflist_path().display())
    );
    // Once only, and not by an agent that finds the datapath pinned.
    std::fs::remove_file(&marker).unwrap();
    n.ns.run(|| agent.sync(&cluster(), true)).unwrap();
    let mut restarted = NodeAgent::new(
        cfg.clone(),
        Arc::new(AgentState::default()),
        Box::new(Recorder::default()),
    );
    n.ns.run(|| restarted.sync(&cluster(), true)).unwrap();
    assert!(!marker.exists());

    let pins = PinnedDatapath {
        root: cfg.bpffs_root.clone(),
    };
    let report =
        n.ns.run(|| uninstall::uninstall(&cfg, &mut Recorder::default(), &pins))
            .unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
}

#[test]
fn the_ebpf_fast_path_goes_on_the_uplink_and_comes_off_again() {
    if !privileged("the_ebpf_fast_path_goes_on_the_uplink_and_comes_off_again") {
        return;
    }
    let n = Node::new();
    let cfg = n.config();
    let uplink = n.uplink();
    let mut agent = NodeAgent::new(
        cfg.clone(),
        Arc::new(AgentState::default()),
        Box::new(EbpfFastPath),
    );
    let r = n.ns.run(|| agent.sync(&cluster(), true)).unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let (attached, cidrs) =
        n.ns.run(|| {
            let dp = Datapath::open(&cfg.bpffs_root).unwrap().unwrap();
            (
                Datapath::attached_program_ids(uplink).unwrap(),
                dp.cluster_cidrs().unwrap(),
            )
        })
        .unwrap();
    assert_eq!(attached.len(), 2, "from_uplink and to_uplink");
    let mut cidrs: Vec<String> = cidrs
        .iter()
        .map(|(ip, len)| format!("{ip}/{len}"))
        .collect();
    cidrs.sort();
    assert_eq!(cidrs, ["10.244.0.0/16", "fd00:244::/32"]);

    // A restart attaches nothing twice.
    let mut again = NodeAgent::new(
        cfg.clone(),
        Arc::new(AgentState::default()),
        Box::new(EbpfFastPath),
    );
    n.ns.run(|| again.sync(&cluster(), true)).unwrap();
    let attached =
        n.ns.run(|| Datapath::attached_program_ids(uplink).unwrap())
            .unwrap();
    assert_eq!(attached.len(), 2);

    // --fast-path=false: off the uplink, and from_pod's CIDRs cleared.
    let off = Config {
        fast_path: false,
        ..cfg.clone()
    };
    let mut agent = NodeAgent::new(off, Arc::new(AgentState::default()), Box::new(EbpfFastPath));
    let r = n.ns.run(|| agent.sync(&cluster(), true)).unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let (attached, cidrs) =
        n.ns.run(|| {
            let dp = Datapath::open(&cfg.bpffs_root).unwrap().unwrap();
            (
                Datapath::attached_program_ids(uplink).unwrap(),
                dp.cluster_cidrs().unwrap(),
            )
        })
        .unwrap();
    assert!(attached.is_empty() && cidrs.is_empty());

    // On again, then uninstall takes it off.
    let mut agent = NodeAgent::new(
        cfg.clone(),
        Arc::new(AgentState::default()),
        Box::new(EbpfFastPath),
    );
    n.ns.run(|| agent.sync(&cluster(), true)).unwrap();
    let pins = PinnedDatapath {
        root: cfg.bpffs_root.clone(),
    };
    let report =
        n.ns.run(|| uninstall::uninstall(&cfg, &mut EbpfFastPath, &pins))
            .unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.detached_programs, 2);
    let attached =
        n.ns.run(|| Datapath::attached_program_ids(uplink).unwrap())
            .unwrap();
    assert!(attached.is_empty());
}
