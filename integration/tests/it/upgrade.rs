//! Running pods outlive their datapath: a new ferrite whose programs differ
//! takes over while they run, and a bpffs wiped under them is repaired.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ferrite_datapath::{Datapath, DATAPATH_VERSION};

use crate::harness::{privileged, sh, Netns, Node};

/// A ferrite built with different programs (FERRITE_BUILD_TAG), in its own
/// target directory; built once per test run.
fn upgraded_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let target = std::env::var("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| root.join("target"))
            .join("upgrade-test");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = std::process::Command::new(cargo)
            .current_dir(root)
            .args(["build", "--release", "-q", "-p", "ferrite-cni"])
            .env("CARGO_TARGET_DIR", &target)
            .env("FERRITE_BPF_CFLAGS", "-DFERRITE_BUILD_TAG=2")
            .status()
            .expect("running cargo");
        assert!(status.success(), "building the upgraded ferrite");
        target.join("release/ferrite")
    })
    .clone()
}

/// Echoes 1 KiB round trips from `client` to a server on `server_ip` in
/// `server` until `stop`; returns (round trips, longest gap between two).
fn stream(server: &Netns, server_ip: IpAddr, client: &Netns, stop: &AtomicBool) -> (u64, Duration) {
    let listener = server
        .run(|| TcpListener::bind(SocketAddr::new(server_ip, 0)))
        .unwrap()
        .unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::scope(|s| {
        s.spawn(move || {
            let (mut c, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            while let Ok(n) = c.read(&mut buf) {
                if n == 0 || c.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
        let mut c = client
            .run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(3)))
            .unwrap()
            .unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let (mut n, mut gap, mut last) = (0u64, Duration::ZERO, Instant::now());
        let mut buf = [0u8; 1024];
        while !stop.load(Ordering::Relaxed) {
            c.write_all(&[7u8; 1024]).unwrap();
            c.read_exact(&mut buf).expect("the stream broke");
            n += 1;
            gap = gap.max(last.elapsed());
            last = Instant::now();
        }
        (n, gap)
    })
}

/// Lost pings of `busybox ping -i 0.01` run alongside: (sent, received).
fn ping_loss(out: &str) -> (u64, u64) {
    let line = out
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or("");
    let nums: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    (
        nums.first().copied().unwrap_or(0),
        nums.get(1).copied().unwrap_or(0),
    )
}

#[test]
fn a_new_datapath_takes_over_running_pods() {
    if !privileged("a_new_datapath_takes_over_running_pods") {
        return;
    }
    let new_bin = upgraded_binary();
    let node = Node::new("10.85.0.0/24").unwrap();
    let a = node.add_pod("1.1.0").unwrap();
    let b = node.add_pod("1.1.0").unwrap();
    let root = node.bpffs.path().join("ferrite");
    assert_eq!(
        Datapath::pinned_versions(&root).unwrap(),
        vec![DATAPATH_VERSION.to_string()]
    );

    // Streams between the old pods across the upgrade.
    let stop = AtomicBool::new(false);
    let (pods, (trips, gap), ping) = std::thread::scope(|s| {
        let st = s.spawn(|| stream(&a.ns, a.ip(), &b.ns, &stop));
        let pinger = s.spawn(|| {
            b.ns.exec(&format!(
                "busybox ping -q -i 0.01 -c 300 -W 5 {} || true",
                a.ip()
            ))
            .unwrap()
        });
        std::thread::sleep(Duration::from_millis(700));
        *node.bin.lock().unwrap() = new_bin.clone();
        let c = node.add_pod("1.1.0").unwrap();
        // An old pod to the new one, from the moment it exists.
        let old_new =
            a.ns.exec(&format!(
                "busybox ping -q -i 0.01 -c 100 -W 3 {} || true",
                c.ip()
            ))
            .unwrap();
        let (sent, received) = ping_loss(&old_new);
        eprintln!("upgrade: old -> new pod ping {received}/{sent} answered (10 ms apart)");
        assert!(
            sent >= 90 && sent - received <= 2,
            "old -> new lost {} of {sent}",
            sent - received
        );
        stop.store(true, Ordering::Relaxed);
        let ping = pinger.join().unwrap();
        (c, st.join().unwrap(), ping)
    });
    let c = pods;
    let (sent, received) = ping_loss(&ping);
    eprintln!(
        "upgrade: TCP {trips} round trips, longest gap {:.1} ms; ping {received}/{sent} answered (10 ms apart)",
        gap.as_secs_f64() * 1e3
    );
    assert!(trips > 100, "the stream ran");
    assert!(
        gap < Duration::from_secs(1),
        "the stream stalled for {gap:?}"
    );
    assert!(
        sent >= 250 && sent - received <= 5,
        "ping lost {} of {sent}",
        sent - received
    );

    // The new version runs every pod; the old pins are gone.
    let versions = Datapath::pinned_versions(&root).unwrap();
    let log = std::fs::read_to_string(node.state.path().join("cni.log")).unwrap_or_default();
    let repair: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("repair") || l.contains("datapath"))
        .collect();
    assert_eq!(versions.len(), 1, "{versions:?} {repair:?}");
    assert_ne!(versions[0], DATAPATH_VERSION, "a new version was loaded");
    let new_ids = Datapath::version_program_ids(&root, &versions[0]).unwrap();
    for p in [&a, &b, &c] {
        let ifindex: u32 = node
            .ns
            .exec(&format!("cat /sys/class/net/{}/ifindex", p.host_veth()))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let ids = Datapath::attached_program_ids(ifindex).unwrap();
        assert!(
            ids.iter().all(|id| new_ids.contains(id)),
            "{} runs old programs",
            p.host_veth()
        );
    }
    // Old and new pods reach each other both ways, forwarding still off.
    assert!(a.ns.ping(c.ip()) && c.ns.ping(b.ip()) && b.ns.ping(a.ip()));
    let check = node.invoke(
        "CHECK",
        &a.id,
        Some(&a.ns.path()),
        "eth0",
        &a.conf_with_prev(),
        &[],
    );
    check.unwrap().expect_ok();
}

#[test]
fn a_wiped_bpffs_is_repaired() {
    if !privileged("a_wiped_bpffs_is_repaired") {
        return;
    }
    let node = Node::new("10.86.0.0/24").unwrap();
    let a = node.add_pod("1.1.0").unwrap();
    let b = node.add_pod("1.1.0").unwrap();
    let mnt = node.bpffs.path().display().to_string();
    sh(&format!("umount {mnt} && mount -t bpf bpf {mnt}")).unwrap();
    assert!(
        Datapath::pinned_versions(&node.bpffs.path().join("ferrite"))
            .unwrap()
            .is_empty()
    );
    // The attached programs still carry the old pods between themselves.
    assert!(a.ns.ping(b.ip()));

    let conf = node.state.path().join("repair.json");
    std::fs::write(&conf, serde_json::to_vec(&node.conf("1.1.0")).unwrap()).unwrap();
    let out = node
        .ferrite(&["repair", "--conf", conf.to_str().unwrap()])
        .unwrap();
    assert!(out.contains("2 pods restored"), "{out}");
    let stats = node.stats().unwrap();
    for p in [&a, &b] {
        assert!(stats.contains(&p.ip().to_string()), "{stats}");
        p.check().unwrap().expect_ok();
    }
    // A pod added now is known to the old pods' (restored) programs.
    let c = node.add_pod("1.1.0").unwrap();
    assert!(a.ns.ping(c.ip()) && c.ns.ping(b.ip()));
}

/// Program ids on a host veth in the node namespace (tc filters and TCX).
fn program_ids(node: &Node, veth: &str) -> Vec<u32> {
    let name = std::ffi::CString::new(veth).unwrap();
    node.ns
        .run(|| {
            // SAFETY: a valid C string; the call only reads it.
            let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
            assert_ne!(index, 0, "{veth} exists");
            Datapath::attached_program_ids(index).unwrap()
        })
        .unwrap()
}

/// The same repair for pods attached with TCX (`chainedBandwidth`): the new
/// programs take the old ones' places in one step each, so every hook still
/// runs exactly one ferrite program.
#[test]
fn a_wiped_bpffs_is_repaired_under_tcx() {
    if !privileged("a_wiped_bpffs_is_repaired_under_tcx") {
        return;
    }
    let mut node = Node::new("10.87.0.0/24").unwrap();
    node.extra = serde_json::json!({"chainedBandwidth": true});
    let a = node.add_pod("1.1.0").unwrap();
    let b = node.add_pod("1.1.0").unwrap();
    let old = program_ids(&node, &a.host_veth());
    assert_eq!(old.len(), 2, "from_pod and to_pod by TCX: {old:?}");
    let mnt = node.bpffs.path().display().to_string();
    sh(&format!("umount {mnt} && mount -t bpf bpf {mnt}")).unwrap();
    assert!(a.ns.ping(b.ip()));

    let conf = node.state.path().join("repair.json");
    std::fs::write(&conf, serde_json::to_vec(&node.conf("1.1.0")).unwrap()).unwrap();
    let out = node
        .ferrite(&["repair", "--conf", conf.to_str().unwrap()])
        .unwrap();
    assert!(out.contains("2 pods restored"), "{out}");
    for p in [&a, &b] {
        let now = program_ids(&node, &p.host_veth());
        assert_eq!(now.len(), 2, "one program per hook: {now:?}");
        assert!(now.iter().all(|id| !old.contains(id)), "{old:?} -> {now:?}");
        p.check().unwrap().expect_ok();
    }
    let c = node.add_pod("1.1.0").unwrap();
    assert!(a.ns.ping(c.ip()) && c.ns.ping(b.ip()));
}

#[test]
fn policies_and_flows_survive_an_upgrade() {
    if !privileged("policies_and_flows_survive_an_upgrade") {
        return;
    }
    use ferrite_datapath::policy::{encode, Cidr, EndpointPolicy, Peers, Ports, Rule, RuleSetRef};
    let new_bin = upgraded_binary();
    let node = Node::new("10.87.0.0/24").unwrap();
    let a = node.add_pod("1.1.0").unwrap();
    let b = node.add_pod("1.1.0").unwrap();
    let c = node.add_pod("1.1.0").unwrap();
    let root = node.bpffs.path().join("ferrite");
    // b admits a only; what b starts (a stream to c) comes back through
    // connection tracking.
    {
        let dp = Datapath::open(&root).unwrap().unwrap();
        let maps = dp.policy_maps().unwrap();
        let set = encode(&[Rule {
            peers: Peers::Some(vec![Cidr::host(a.ip())]),
            ports: Ports::All,
        }])
        .unwrap();
        maps.write_rule_set(3, &set).unwrap();
        let ifindex: u32 = node
            .ns
            .exec(&format!("cat /sys/class/net/{}/ifindex", b.host_veth()))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        maps.set_endpoint(
            ifindex,
            &EndpointPolicy {
                ingress: Some(RuleSetRef {
                    id: 3,
                    words: set.words,
                }),
                egress: None,
                pending: false,
            },
        )
        .unwrap();
    }
    assert!(a.ns.ping(b.ip()) && !c.ns.ping(b.ip()), "the policy holds");

    let stop = AtomicBool::new(false);
    let (trips, gap) = std::thread::scope(|s| {
        let st = s.spawn(|| stream(&c.ns, c.ip(), &b.ns, &stop));
        std::thread::sleep(Duration::from_millis(500));
        *node.bin.lock().unwrap() = new_bin.clone();
        let _d = node.add_pod("1.1.0").unwrap();
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        st.join().unwrap()
    });
    eprintln!(
        "upgrade under policy: {trips} round trips of b's stream, longest gap {:.1} ms",
        gap.as_secs_f64() * 1e3
    );
    let versions = Datapath::pinned_versions(&root).unwrap();
    assert_eq!(versions.len(), 1);
    assert_ne!(versions[0], DATAPATH_VERSION, "a new version runs the pods");
    assert!(
        trips > 100 && gap < Duration::from_secs(1),
        "b's flow survived"
    );
    assert!(a.ns.ping(b.ip()), "a still admitted");
    assert!(!c.ns.ping(b.ip()), "c still denied after the upgrade");
}
