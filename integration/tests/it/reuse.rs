//! ADD of a new container into a network namespace that an earlier one
//! used, right after its DEL (podman's disconnect and connect, a kept
//! sandbox): DEL leaves the veth's deletion to a detached reaper, so the
//! old `eth0` may still be there. ADD removes it when it is ferrite's own
//! retired interface, and refuses (104, nothing changed) anything else.
//! FERRITE_REAPER_HOLD makes the reaper wait, so the race happens every
//! time.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ferrite_datapath::Datapath;
use serde_json::{json, Value};

use crate::harness::{endpoint_counters, privileged, tcp_echo, unique, Netns, Node, TempDir};

/// Holds DEL's reaper (FERRITE_REAPER_HOLD) until released or dropped.
struct ReaperHold {
    _dir: TempDir,
    file: PathBuf,
}

impl ReaperHold {
    fn new() -> Self {
        let dir = TempDir::new("rh").unwrap();
        let file = dir.path().join("hold");
        std::fs::write(&file, b"").unwrap();
        Self { _dir: dir, file }
    }

    fn env(&self) -> [(&str, &str); 1] {
        [("FERRITE_REAPER_HOLD", self.file.to_str().unwrap())]
    }

    /// How many reapers have reached the hold so far.
    fn count(&self) -> usize {
        std::fs::read_to_string(&self.file)
            .unwrap_or_default()
            .lines()
            .count()
    }

    /// The pids of the reapers waiting on this hold, once there are `n`.
    fn held(&self, n: usize) -> Vec<u32> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pids: Vec<u32> = std::fs::read_to_string(&self.file)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect();
            if pids.len() >= n {
                return pids;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {n} reapers reached the hold",
                pids.len()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Lets the reapers go and waits until every one has exited.
    fn release(&self) {
        let pids = self.held(0);
        std::fs::remove_file(&self.file).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        for pid in pids {
            while alive(pid) {
                assert!(Instant::now() < deadline, "reaper {pid} did not exit");
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

/// Running, not a zombie waiting for whoever inherited it.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().to_string())
        })
        .is_some_and(|rest| !rest.starts_with('Z') && !rest.starts_with('X'))
}

/// (ifindex, up) of `name` in `ns`, if it exists.
fn link(ns: &Netns, name: &str) -> Option<(u32, bool)> {
    let out = ns
        .exec(&format!(
            "cat /sys/class/net/{name}/ifindex /sys/class/net/{name}/flags 2>/dev/null || true"
        ))
        .unwrap();
    let mut lines = out.lines();
    let index = lines.next()?.trim().parse().ok()?;
    let flags = u32::from_str_radix(lines.next()?.trim().trim_start_matches("0x"), 16).ok()?;
    Some((index, flags & 1 == 1))
}

fn ip_of(result: &Value) -> IpAddr {
    result["ips"][0]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// One container's attachment in a namespace the test shares between
/// containers; DEL on drop unless done.
struct Attachment<'a> {
    node: &'a Node,
    ns: &'a Netns,
    id: String,
    result: Value,
    deleted: bool,
}

impl<'a> Attachment<'a> {
    fn add(node: &'a Node, ns: &'a Netns) -> Self {
        Self::add_as(node, ns, unique("r"))
    }

    fn add_as(node: &'a Node, ns: &'a Netns, id: String) -> Self {
        let inv = node
            .invoke(
                "ADD",
                &id,
                Some(&ns.path()),
                "eth0",
                &node.conf("1.1.0"),
                &[],
            )
            .unwrap();
        inv.expect_ok();
        Self {
            node,
            ns,
            id,
            result: inv.json(),
            deleted: false,
        }
    }

    fn host_veth(&self) -> String {
        self.result["interfaces"][0]["name"]
            .as_str()
            .unwrap()
            .to_string()
    }

    fn conf(&self) -> Value {
        let mut c = self.node.conf("1.1.0");
        c["prevResult"] = self.result.clone();
        c
    }

    fn del(&mut self, env: &[(&str, &str)]) {
        self.node
            .invoke(
                "DEL",
                &self.id,
                Some(&self.ns.path()),
                "eth0",
                &self.conf(),
                env,
            )
            .unwrap()
            .expect_ok();
        self.deleted = true;
    }

    fn check(&self) {
        self.node
            .invoke(
                "CHECK",
                &self.id,
                Some(&self.ns.path()),
                "eth0",
                &self.conf(),
                &[],
            )
            .unwrap()
            .expect_ok();
    }
}

impl Drop for Attachment<'_> {
    fn drop(&mut self) {
        if !self.deleted {
            let _ = self.node.invoke(
                "DEL",
                &self.id,
                Some(&self.ns.path()),
                "eth0",
                &self.conf(),
                &[],
            );
        }
    }
}

/// DELs `old` with its reaper held: returns the retired host veth's
/// ifindex and the pod interface's, both still there.
fn retire_held(node: &Node, old: &mut Attachment<'_>, hold: &ReaperHold) -> (u32, u32) {
    let veth = old.host_veth();
    let pod_if = link(old.ns, "eth0").expect("eth0 before DEL").0;
    let before = hold.count();
    old.del(&hold.env());
    hold.held(before + 1);
    let (index, up) = link(&node.ns, &veth).expect("the held reaper keeps the veth");
    assert!(!up, "DEL took {veth} down");
    assert_eq!(link(old.ns, "eth0").map(|l| l.0), Some(pod_if));
    (index, pod_if)
}

/// ADD into `ns` that must be refused with 104, leaving the pod's `eth0`
/// and everything on the node as they were.
fn refused(node: &Node, ns: &Netns, what: &str) {
    let links = node.links().unwrap();
    let eth0 = link(ns, "eth0");
    let allocs = node.allocations();
    let inv = node
        .invoke(
            "ADD",
            &unique("x"),
            Some(&ns.path()),
            "eth0",
            &node.conf("1.1.0"),
            &[],
        )
        .unwrap();
    assert_eq!(inv.code(), 104, "{what}: {}", inv.stdout);
    assert!(
        inv.stdout.contains("eth0 already exists"),
        "{what}: {}",
        inv.stdout
    );
    assert_eq!(link(ns, "eth0"), eth0, "{what}: eth0 changed");
    assert_eq!(node.links().unwrap(), links, "{what}: node links changed");
    assert_eq!(node.allocations(), allocs, "{what}: addresses changed");
}

#[test]
fn add_right_after_del_in_the_same_netns_replaces_the_retired_veth() {
    if !privileged("add_right_after_del_in_the_same_netns_replaces_the_retired_veth") {
        return;
    }
    let node = Node::new("10.91.0.0/24").unwrap();
    let peer = node.add_pod("1.1.0").unwrap();
    let shared = Netns::new("sh").unwrap();
    let hold = ReaperHold::new();
    let mut old = Attachment::add(&node, &shared);
    let old_veth = old.host_veth();
    let (old_index, old_pod_if) = retire_held(&node, &mut old, &hold);

    // A new container, the same namespace and interface name, while the
    // old veth waits for its reaper.
    let started = Instant::now();
    let new = Attachment::add(&node, &shared);
    let took = started.elapsed();
    eprintln!(
        "ADD over a retired eth0: {:.2} ms",
        took.as_secs_f64() * 1e3
    );
    assert!(
        link(&node.ns, &old_veth).is_none(),
        "ADD removed the retired {old_veth}"
    );
    let (pod_if, up) = link(&shared, "eth0").unwrap();
    assert!(up && pod_if != old_pod_if, "a new, up eth0");
    let (new_index, new_up) = link(&node.ns, &new.host_veth()).unwrap();
    assert!(new_up && new_index != old_index);
    let ip = ip_of(&new.result);
    let addr = shared.exec("ip -o -4 addr show dev eth0").unwrap();
    assert!(addr.contains(&format!("{ip}/32")), "{addr}");
    new.check();

    // The address works, through the fast path both ways.
    assert!(peer.ns.ping(ip), "peer -> new");
    assert!(shared.ping(peer.ip()), "new -> peer");
    assert_eq!(
        tcp_echo(&peer.ns, peer.ip(), &shared, 8 << 20).unwrap(),
        8 << 20
    );
    let stats = node.stats().unwrap();
    let c = endpoint_counters(&stats, ip);
    assert!(c[2] > 100, "new pod's packets redirected: {c:?}\n{stats}");
    assert!(
        c[4] > 100,
        "new pod reached through the redirect: {c:?}\n{stats}"
    );

    // The old reaper, let go, deletes nothing of the new pod's.
    hold.release();
    new.check();
    assert_eq!(link(&node.ns, &new.host_veth()), Some((new_index, true)));
    assert!(peer.ns.ping(ip), "peer -> new after the old reaper ran");
    assert_eq!(node.allocations().len(), 2);
    let log = std::fs::read_to_string(node.state.path().join("cni.log")).unwrap();
    assert!(
        log.contains(&format!("is the retired {old_veth}")),
        "the log says what ADD removed"
    );
}

/// podman's disconnect and connect: DEL, then ADD of the same container
/// (so the same host veth name) while the old veth waits for its reaper.
#[test]
fn add_of_the_same_container_right_after_its_del() {
    if !privileged("add_of_the_same_container_right_after_its_del") {
        return;
    }
    let node = Node::new("10.96.0.0/24").unwrap();
    let shared = Netns::new("sh").unwrap();
    let hold = ReaperHold::new();
    let mut old = Attachment::add(&node, &shared);
    let veth = old.host_veth();
    let (old_index, _) = retire_held(&node, &mut old, &hold);
    let again = Attachment::add_as(&node, &shared, old.id.clone());
    assert_eq!(again.host_veth(), veth, "the same name");
    let (index, up) = link(&node.ns, &veth).unwrap();
    assert!(up && index != old_index, "a new veth under the old name");
    again.check();
    hold.release();
    again.check();
    assert_eq!(link(&node.ns, &veth), Some((index, true)));
}

/// Many quick ADD/DEL pairs into one namespace, every reaper held until the
/// end: each ADD finds its predecessor's eth0 and replaces it.
#[test]
fn many_add_del_pairs_into_one_netns() {
    if !privileged("many_add_del_pairs_into_one_netns") {
        return;
    }
    let node = Node::new("10.92.0.0/24").unwrap();
    let shared = Netns::new("sh").unwrap();
    let hold = ReaperHold::new();
    let pairs = 30;
    let mut took = Vec::new();
    let mut prev: Option<Attachment<'_>> = None;
    for i in 0..pairs {
        if let Some(mut p) = prev.take() {
            p.del(&hold.env());
            hold.held(i);
        }
        let started = Instant::now();
        let a = Attachment::add(&node, &shared);
        took.push(started.elapsed().as_secs_f64() * 1e3);
        assert!(
            shared.exec_status(&format!(
                "ip -o addr show dev eth0 | grep -q {}/32",
                ip_of(&a.result)
            )),
            "pair {i}: the new address is on eth0"
        );
        prev = Some(a);
    }
    let last = prev.take().unwrap();
    last.check();
    // Only the last container's veth is left on the node.
    let veths: Vec<String> = node
        .links()
        .unwrap()
        .into_iter()
        .filter(|l| l.starts_with("fer"))
        .collect();
    assert_eq!(veths, [last.host_veth()]);
    hold.release();
    last.check();
    assert_eq!(node.allocations().len(), 1);
    took.sort_by(f64::total_cmp);
    eprintln!(
        "{pairs} ADDs into a reused netns: p50 {:.2} ms, max {:.2} ms",
        took[took.len() / 2],
        took[took.len() - 1]
    );
}

/// A killed ADD of another container leaves a down veth pair of ours with
/// no endpoint entry: the next container's ADD replaces it too, and GC
/// releases the killed one's address.
#[test]
fn add_replaces_what_a_killed_add_of_another_container_left() {
    if !privileged("add_replaces_what_a_killed_add_of_another_container_left") {
        return;
    }
    let node = Node::new("10.93.0.0/24").unwrap();
    let shared = Netns::new("sh").unwrap();
    let killed = unique("k");
    let inv = node
        .invoke(
            "ADD",
            &killed,
            Some(&shared.path()),
            "eth0",
            &node.conf("1.1.0"),
            &[("FERRITE_FAILPOINT", "add-veth-created")],
        )
        .unwrap();
    assert!(!inv.ok, "the ADD was killed");
    assert!(link(&shared, "eth0").is_some(), "it left eth0");
    let new = Attachment::add(&node, &shared);
    new.check();
    let mut c = node.conf("1.1.0");
    c["cni.dev/valid-attachments"] = json!([{"containerID": new.id, "ifname": "eth0"}]);
    node.invoke("GC", "", None, "", &c, &[])
        .unwrap()
        .expect_ok();
    assert_eq!(node.allocations().len(), 1, "{:?}", node.allocations());
    let veths: Vec<String> = node
        .links_settled()
        .unwrap()
        .into_iter()
        .filter(|l| l.starts_with("fer"))
        .collect();
    assert_eq!(veths, [new.host_veth()]);
}

#[test]
fn an_eth0_that_is_not_a_retired_ferrite_veth_is_refused_and_kept() {
    if !privileged("an_eth0_that_is_not_a_retired_ferrite_veth_is_refused_and_kept") {
        return;
    }
    let node = Node::new("10.94.0.0/24").unwrap();

    // Not a veth at all.
    let bridge = Netns::new("d").unwrap();
    bridge.exec("ip link add eth0 type bridge").unwrap();
    refused(&node, &bridge, "a bridge named eth0");

    // A veth whose peer is not ferrite's: on the node, named like ferrite's
    // veths and down, but in no ferrite group.
    let plain = Netns::new("v").unwrap();
    node.ns
        .exec(&format!(
            "ip link add fer0123456789ab type veth peer name eth0 netns {}",
            plain.name
        ))
        .unwrap();
    refused(&node, &plain, "a veth of someone else's");
    assert!(link(&node.ns, "fer0123456789ab").is_some());

    // A live pod whose host veth someone took down: its endpoint entry
    // says it is not retired.
    let live_ns = Netns::new("l").unwrap();
    let live = Attachment::add(&node, &live_ns);
    node.ns
        .exec(&format!("ip link set {} down", live.host_veth()))
        .unwrap();
    refused(&node, &live_ns, "a live pod's eth0 with its veth down");
    let dp = Datapath::open(&node.bpffs.path().join("ferrite"))
        .unwrap()
        .unwrap();
    assert!(dp.endpoint(ip_of(&live.result)).unwrap().is_some());

    // A retired veth of ours with one mark changed is not ours any more.
    let hold = ReaperHold::new();
    // Kept to the end: a namespace going away takes its veth pair along,
    // which would change the node's links under a later check.
    let mut namespaces = Vec::new();
    for (what, change) in [
        ("up again", "ip link set {v} up"),
        ("out of the group", "ip link set {v} group default"),
        (
            "another network's alias",
            "ip link set {v} alias ferrite/another",
        ),
        ("renamed", "ip link set {v} name notferrite{n}"),
    ] {
        let ns = Netns::new("m").unwrap();
        let mut old = Attachment::add(&node, &ns);
        let veth = old.host_veth();
        retire_held(&node, &mut old, &hold);
        let n = namespaces.len().to_string();
        node.ns
            .exec(&change.replace("{v}", &veth).replace("{n}", &n))
            .unwrap();
        refused(&node, &ns, what);
        drop(old);
        namespaces.push(ns);
    }
    hold.release();
}

/// An interface index names a link only within one namespace: a pod's
/// veth whose peer lives elsewhere, under the very index of a retired
/// ferrite veth (whose own peer has the pod interface's index), is refused,
/// and the retired veth is left to its reaper.
#[test]
fn a_peer_index_from_another_namespace_is_not_mistaken_for_ours() {
    if !privileged("a_peer_index_from_another_namespace_is_not_mistaken_for_ours") {
        return;
    }
    let node = Node::new("10.95.0.0/24").unwrap();
    let first = Netns::new("f").unwrap();
    let hold = ReaperHold::new();
    let mut old = Attachment::add(&node, &first);
    let veth = old.host_veth();
    let (host_index, pod_index) = retire_held(&node, &mut old, &hold);

    let elsewhere = Netns::new("e").unwrap();
    let target = Netns::new("t").unwrap();
    elsewhere
        .exec(&format!(
            "ip link add fer0123456789ab index {host_index} type veth peer name eth0 index {pod_index} netns {}",
            target.name
        ))
        .unwrap();
    assert_eq!(link(&target, "eth0").map(|l| l.0), Some(pod_index));
    assert_eq!(
        link(&elsewhere, "fer0123456789ab").map(|l| l.0),
        Some(host_index)
    );
    refused(&node, &target, "a peer index of another namespace");
    // Also when the node's namespace has an id for the pod's, as it has
    // for every namespace one of its veths leads into.
    node.ns
        .exec(&format!("ip netns set {} 4242", target.name))
        .unwrap();
    refused(
        &node,
        &target,
        "a peer index of another namespace, with an id",
    );
    assert_eq!(link(&node.ns, &veth), Some((host_index, false)));
    hold.release();
    assert!(link(&node.ns, &veth).is_none(), "its reaper removed it");
}
