//! ferrite never leaks and never double-assigns: kill -9 at every step of
//! ADD and DEL and at random moments, then converge through a retried ADD,
//! a DEL or a GC; many invocations in flight at once.
//! FERRITE_SOAK_TRIALS and FERRITE_SOAK_OPS make the runs longer.

use std::collections::HashMap;
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use ferrite_datapath::Datapath;
use serde_json::json;

use crate::harness::{ferrite_bin, privileged, unique, Netns, Node};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Everything ferrite holds for this network, as (veths, addresses,
/// endpoint entries, interfaces with counters).
fn holdings(node: &Node) -> (Vec<String>, Vec<String>, usize, usize) {
    let veths: Vec<String> = node
        .links_settled()
        .unwrap()
        .into_iter()
        .filter(|l| l.starts_with("fer"))
        .collect();
    let allocs = node.allocations();
    let (eps, ifs) = match Datapath::open(&node.bpffs.path().join("ferrite")).unwrap() {
        Some(dp) => (
            dp.endpoints().unwrap().len(),
            dp.interfaces().unwrap().len(),
        ),
        None => (0, 0),
    };
    (veths, allocs, eps, ifs)
}

fn assert_clean(node: &Node, what: &str) {
    let (veths, allocs, eps, ifs) = holdings(node);
    assert!(veths.is_empty(), "{what}: veths left: {veths:?}");
    assert!(allocs.is_empty(), "{what}: addresses left: {allocs:?}");
    assert_eq!(eps, 0, "{what}: endpoint entries left");
    assert_eq!(ifs, 0, "{what}: counter/interface entries left");
}

fn failpoints() -> Vec<String> {
    let out = Command::new(ferrite_bin())
        .arg("failpoints")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

fn gc(node: &Node, valid: &[&str]) {
    let mut c = node.conf("1.1.0");
    c["cni.dev/valid-attachments"] = json!(valid
        .iter()
        .map(|id| json!({"containerID": id, "ifname": "eth0"}))
        .collect::<Vec<_>>());
    node.invoke("GC", "", None, "", &c, &[])
        .unwrap()
        .expect_ok();
}

#[test]
fn killed_at_every_step_converges() {
    if !privileged("killed_at_every_step_converges") {
        return;
    }
    let node = Node::new("10.80.0.0/24").unwrap();
    // A bystander pod that must keep working through all of it.
    let bystander = node.add_pod("1.1.0").unwrap();
    let points = failpoints();
    assert!(points.len() >= 8, "{points:?}");
    let conf = node.conf("1.1.0");
    let mut tried = 0;
    for point in &points {
        for recovery in ["retry-add", "del", "gc"] {
            let ns = Netns::new("p").unwrap();
            let id = unique("k");
            let path = ns.path();
            let fp = [("FERRITE_FAILPOINT", point.as_str())];
            if point.starts_with("add") {
                let inv = node
                    .invoke("ADD", &id, Some(&path), "eth0", &conf, &fp)
                    .unwrap();
                assert!(!inv.ok, "{point}: ADD should have been killed");
            } else {
                node.invoke("ADD", &id, Some(&path), "eth0", &conf, &[])
                    .unwrap()
                    .expect_ok();
                let inv = node
                    .invoke("DEL", &id, Some(&path), "eth0", &conf, &fp)
                    .unwrap();
                assert!(!inv.ok, "{point}: DEL should have been killed");
            }
            let what = format!("{point} then {recovery}");
            match recovery {
                "retry-add" if point.starts_with("add") => {
                    let mut inv = node
                        .invoke("ADD", &id, Some(&path), "eth0", &conf, &[])
                        .unwrap();
                    if !inv.ok && point == "add-mapped" {
                        // Killed after its last step: the pod is complete and
                        // a second ADD is refused; the runtime DELs first.
                        assert_eq!(inv.code(), 104, "{what}");
                        node.invoke("DEL", &id, Some(&path), "eth0", &conf, &[])
                            .unwrap()
                            .expect_ok();
                        inv = node
                            .invoke("ADD", &id, Some(&path), "eth0", &conf, &[])
                            .unwrap();
                    }
                    assert!(inv.ok, "{what}: {} {}", inv.stdout, inv.stderr);
                    let ip: IpAddr = inv.json()["ips"][0]["address"]
                        .as_str()
                        .unwrap()
                        .split('/')
                        .next()
                        .unwrap()
                        .parse()
                        .unwrap();
                    assert!(
                        bystander.ns.ping(ip),
                        "{what}: the retried pod is unreachable"
                    );
                    node.invoke("DEL", &id, Some(&path), "eth0", &conf, &[])
                        .unwrap()
                        .expect_ok();
                }
                "retry-add" | "del" => {
                    node.invoke("DEL", &id, Some(&path), "eth0", &conf, &[])
                        .unwrap()
                        .expect_ok();
                }
                _ => gc(&node, &[bystander.id.as_str()]),
            }
            drop(ns);
            // Only the bystander remains.
            let (veths, allocs, eps, _) = holdings(&node);
            assert_eq!(veths, vec![bystander.host_veth()], "{what}");
            assert_eq!(allocs.len(), 1, "{what}: {allocs:?}");
            assert_eq!(eps, 1, "{what}");
            bystander.check().unwrap().expect_ok();
            tried += 1;
        }
    }
    eprintln!("failpoints: {tried} kill-and-recover cases converged");
    drop(bystander);
    assert_clean(&node, "after all failpoints");
}

/// Starts the plugin in the node namespace with its whole stdin written and
/// closed, without waiting for it.
fn spawn_plugin(
    node: &Node,
    command: &str,
    id: &str,
    ns: &Netns,
    conf: &[u8],
) -> std::process::Child {
    let node_ns = std::fs::File::open(node.ns.path()).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&node_ns);
    let mut cmd = Command::new(ferrite_bin());
    cmd.env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", id)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_NETNS", ns.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: only setns between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    // Close stdin: the plugin reads it to the end before it starts.
    let mut stdin = child.stdin.take().unwrap();
    std::io::Write::write_all(&mut stdin, conf).unwrap();
    drop(stdin);
    child
}

/// Kill the first ADD on a node while it loads and pins the datapath: the
/// next ADD loads (or finds) complete pins, and no work directory is left.
#[test]
fn killed_while_loading_the_datapath_recovers() {
    if !privileged("killed_while_loading_the_datapath_recovers") {
        return;
    }
    let node = Node::new("10.79.0.0/24").unwrap();
    let conf = serde_json::to_vec(&node.conf("1.1.0")).unwrap();
    let root = node.bpffs.path().join("ferrite");
    let mnt = node.bpffs.path().display().to_string();
    let mut killed_loading = 0;
    for delay_ms in [2u64, 5, 10, 20, 30, 40] {
        // A fresh bpffs: the next ADD is a first one.
        crate::harness::sh(&format!("umount {mnt} && mount -t bpf bpf {mnt}")).unwrap();
        let ns = Netns::new("l").unwrap();
        let id = unique("l");
        let mut child = spawn_plugin(&node, "ADD", &id, &ns, &conf);
        std::thread::sleep(Duration::from_millis(delay_ms));
        if child.try_wait().unwrap().is_none() {
            let _ = child.kill();
            if Datapath::open(&root).map(|d| d.is_none()).unwrap_or(true) {
                killed_loading += 1;
            }
        }
        let _ = child.wait();
        let inv = node
            .invoke_raw("ADD", &id, Some(&ns.path()), "eth0", &conf, &[])
            .unwrap();
        assert!(inv.ok || inv.code() == 104, "{delay_ms} ms: {}", inv.stdout);
        assert!(
            Datapath::open(&root).unwrap().is_some(),
            "{delay_ms} ms: pins complete"
        );
        let leftovers: Vec<String> = std::fs::read_dir(&root)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "{delay_ms} ms: {leftovers:?}");
        node.invoke_raw("DEL", &id, Some(&ns.path()), "eth0", &conf, &[])
            .unwrap()
            .expect_ok();
        drop(ns);
        assert_clean(&node, &format!("after a kill at {delay_ms} ms"));
    }
    eprintln!("first-load kills: {killed_loading} of 6 landed while the datapath was loading");
    assert!(killed_loading > 0, "no kill landed during the load");
}

#[test]
fn random_kills_converge() {
    if !privileged("random_kills_converge") {
        return;
    }
    let node = Node::new("10.81.0.0/24").unwrap();
    let conf = serde_json::to_vec(&node.conf("1.1.0")).unwrap();
    let trials = env_usize("FERRITE_SOAK_TRIALS", 60);
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let (mut killed, mut finished) = (0, 0);
    for t in 0..trials {
        let ns = Netns::new("r").unwrap();
        let id = unique("r");
        let command = if rnd(4) == 0 { "DEL" } else { "ADD" };
        if command == "DEL" {
            node.invoke_raw("ADD", &id, Some(&ns.path()), "eth0", &conf, &[])
                .unwrap()
                .expect_ok();
        }
        let mut child = spawn_plugin(&node, command, &id, &ns, &conf);
        std::thread::sleep(Duration::from_micros(rnd(5_000)));
        if child.try_wait().unwrap().is_none() {
            let _ = child.kill();
            killed += 1;
        } else {
            finished += 1;
        }
        let _ = child.wait();
        match rnd(3) {
            0 => {
                let inv = node
                    .invoke_raw("ADD", &id, Some(&ns.path()), "eth0", &conf, &[])
                    .unwrap();
                // A completed first ADD makes the retry a duplicate.
                assert!(inv.ok || inv.code() == 104, "trial {t}: {}", inv.stdout);
                node.invoke_raw("DEL", &id, Some(&ns.path()), "eth0", &conf, &[])
                    .unwrap()
                    .expect_ok();
            }
            1 => {
                node.invoke_raw("DEL", &id, Some(&ns.path()), "eth0", &conf, &[])
                    .unwrap()
                    .expect_ok();
            }
            _ => gc(&node, &[]),
        }
        drop(ns);
        assert_clean(&node, &format!("trial {t} ({command})"));
    }
    eprintln!(
        "random kills: {trials} trials, {killed} killed mid-flight, {finished} finished first, 0 leaks"
    );
    assert!(
        killed > 0,
        "the timings should catch some invocations mid-flight"
    );
}

/// Many invocations in flight at once over a set of containers: ADD, DEL,
/// CHECK and GC mixed. One operation at a time per container, as runtimes
/// do; a GC runs while no ADD or DEL is in flight (its list of valid
/// attachments must be the truth), between any number of them.
#[test]
fn concurrent_mixed_operations_agree_with_the_live_set() {
    if !privileged("concurrent_mixed_operations_agree_with_the_live_set") {
        return;
    }
    let containers = env_usize("FERRITE_SOAK_CONTAINERS", 60);
    let ops = env_usize("FERRITE_SOAK_OPS", 300);
    let inflight = env_usize("FERRITE_SOAK_INFLIGHT", 16);
    let node = Node::new("10.82.0.0/22").unwrap();
    let conf = node.conf("1.1.0");
    let namespaces: Vec<Netns> = (0..containers).map(|_| Netns::new("m").unwrap()).collect();
    let ids: Vec<String> = (0..containers).map(|_| unique("m")).collect();
    // Per container: its lock (one operation at a time) and its result.
    let slots: Vec<Mutex<Option<serde_json::Value>>> =
        (0..containers).map(|_| Mutex::new(None)).collect();
    let owners: Mutex<HashMap<IpAddr, usize>> = Mutex::new(HashMap::new());
    let gate: RwLock<()> = RwLock::new(());
    let counts: Mutex<HashMap<&str, usize>> = Mutex::new(HashMap::new());
    let next = Mutex::new(0u64);

    std::thread::scope(|s| {
        for w in 0..inflight {
            let (node, conf, namespaces, ids, slots, owners, gate, counts, next) = (
                &node,
                &conf,
                &namespaces,
                &ids,
                &slots,
                &owners,
                &gate,
                &counts,
                &next,
            );
            s.spawn(move || {
                let mut seed = 0xdead_beef_u64 ^ (w as u64) << 32;
                loop {
                    {
                        let mut n = next.lock().unwrap();
                        if *n as usize >= ops {
                            return;
                        }
                        *n += 1;
                    }
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let c = (seed % containers as u64) as usize;
                    let op = match (seed >> 20) % 10 {
                        0 => "GC",
                        1 | 2 => "CHECK",
                        _ => "ADD/DEL",
                    };
                    if op == "GC" {
                        let _all = gate.write().unwrap();
                        let live: Vec<&str> = (0..containers)
                            .filter(|i| slots[*i].lock().unwrap().is_some())
                            .map(|i| ids[i].as_str())
                            .collect();
                        gc(node, &live);
                        *counts.lock().unwrap().entry("GC").or_default() += 1;
                        continue;
                    }
                    let _shared = gate.read().unwrap();
                    let Ok(mut slot) = slots[c].try_lock() else {
                        continue;
                    };
                    let path = namespaces[c].path();
                    let op = match op {
                        "CHECK" => "CHECK",
                        _ if slot.is_some() => "DEL",
                        _ => "ADD",
                    };
                    match op {
                        "ADD" => {
                            let inv = node
                                .invoke("ADD", &ids[c], Some(&path), "eth0", conf, &[])
                                .unwrap();
                            let r = inv.expect_ok().json();
                            let ip: IpAddr = r["ips"][0]["address"]
                                .as_str()
                                .unwrap()
                                .split('/')
                                .next()
                                .unwrap()
                                .parse()
                                .unwrap();
                            let prev = owners.lock().unwrap().insert(ip, c);
                            assert!(prev.is_none(), "{ip} handed to {c} while {prev:?} holds it");
                            *slot = Some(r);
                        }
                        "DEL" => {
                            let r = slot.take().unwrap();
                            let ip: IpAddr = r["ips"][0]["address"]
                                .as_str()
                                .unwrap()
                                .split('/')
                                .next()
                                .unwrap()
                                .parse()
                                .unwrap();
                            // Forget the owner first: the address may be
                            // handed out again as soon as DEL releases it.
                            owners.lock().unwrap().remove(&ip);
                            let mut c2 = conf.clone();
                            c2["prevResult"] = r;
                            node.invoke("DEL", &ids[c], Some(&path), "eth0", &c2, &[])
                                .unwrap()
                                .expect_ok();
                        }
                        "CHECK" => {
                            if let Some(r) = slot.as_ref() {
                                let mut c2 = conf.clone();
                                c2["prevResult"] = r.clone();
                                node.invoke("CHECK", &ids[c], Some(&path), "eth0", &c2, &[])
                                    .unwrap()
                                    .expect_ok();
                            }
                        }
                        _ => unreachable!(),
                    }
                    *counts.lock().unwrap().entry(op).or_default() += 1;
                }
            });
        }
    });

    // The store, the endpoint map and the veths agree with the live set.
    let live: Vec<usize> = (0..containers)
        .filter(|c| slots[*c].lock().unwrap().is_some())
        .collect();
    let (veths, allocs, eps, ifs) = holdings(&node);
    assert_eq!(veths.len(), live.len(), "veths vs live containers");
    assert_eq!(
        allocs.len(),
        live.len(),
        "addresses vs live containers: {allocs:?}"
    );
    assert_eq!(eps, live.len(), "endpoint entries vs live containers");
    assert_eq!(ifs, live.len(), "counter entries vs live containers");
    for c in &live {
        assert!(
            allocs.iter().any(|a| a.contains(&ids[*c])),
            "{} has no address on record",
            ids[*c]
        );
    }
    eprintln!(
        "concurrency: {ops} operations, {inflight} in flight, {containers} containers: {:?}; {} live at the end, 0 duplicates",
        counts.lock().unwrap(),
        live.len()
    );
    // Tear down what is left.
    for c in live {
        let r = slots[c].lock().unwrap().take().unwrap();
        let mut c2 = conf.clone();
        c2["prevResult"] = r;
        node.invoke(
            "DEL",
            &ids[c],
            Some(&namespaces[c].path()),
            "eth0",
            &c2,
            &[],
        )
        .unwrap()
        .expect_ok();
    }
    assert_clean(&node, "after the concurrent run");
}
