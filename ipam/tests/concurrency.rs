// SPDX-License-Identifier: Apache-2.0
//! The store under contention: threads that each open their own store (flock
//! is per open file description, so they contend like processes), real
//! processes (this test binary re-executed), and writers killed with
//! SIGKILL mid-flight.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use ferrite_ipam::{Owner, Pool, RangeConfig, Store};

const CHILD_DIR: &str = "FERRITE_IPAM_TEST_CHILD_DIR";
const CHILD_ID: &str = "FERRITE_IPAM_TEST_CHILD_ID";
const CHILD_MODE: &str = "FERRITE_IPAM_TEST_CHILD_MODE";
const NETWORK: &str = "test-net";

use ferrite_test_support::TempDir;

fn cfg(subnet: &str) -> RangeConfig {
    RangeConfig {
        subnet: subnet.into(),
        range_start: None,
        range_end: None,
        gateway: None,
    }
}

fn dual_stack() -> Pool {
    Pool::from_config(&[vec![cfg("10.244.0.0/23")], vec![cfg("fd00::/64")]]).unwrap()
}

fn big_dual_stack() -> Pool {
    Pool::from_config(&[vec![cfg("10.0.0.0/16")], vec![cfg("fd00::/64")]]).unwrap()
}

/// One ADD as the plugin does it: open, lock, allocate, commit, unlock.
fn add(state_dir: &Path, pool: &Pool, owner: &Owner) -> Vec<IpAddr> {
    let store = Store::open(state_dir, NETWORK).unwrap();
    let mut locked = store.lock().unwrap();
    let got = locked.state().allocate(pool, owner, &[]).unwrap();
    locked.commit().unwrap();
    got.iter().map(|a| a.address.ip()).collect()
}

/// Checks the final file: every owner holds exactly one address per set and
/// no address appears twice.
fn assert_exact(state_dir: &Path, pool: &Pool, owners: &[Owner], handed_out: &[Vec<IpAddr>]) {
    let all: Vec<IpAddr> = handed_out.iter().flatten().copied().collect();
    let unique: HashSet<IpAddr> = all.iter().copied().collect();
    assert_eq!(unique.len(), all.len(), "an address was handed out twice");

    let state = Store::open(state_dir, NETWORK).unwrap().read().unwrap();
    let recorded: BTreeMap<IpAddr, Owner> =
        state.records().map(|(ip, o)| (*ip, o.clone())).collect();
    assert_eq!(recorded.len(), owners.len() * pool.sets.len());
    for (owner, ips) in owners.iter().zip(handed_out) {
        assert_eq!(&state.owned_by(owner), ips, "{owner}");
    }
}

#[test]
fn threads_with_their_own_store_never_share_an_address() {
    const THREADS: usize = 8;
    const EACH: usize = 30;
    let dir = TempDir::new("concurrency").unwrap();
    let pool = dual_stack();
    let results: Vec<Vec<(Owner, Vec<IpAddr>)>> = thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (dir, pool) = (dir.path(), &pool);
                s.spawn(move || {
                    (0..EACH)
                        .map(|i| {
                            let owner = Owner::new(format!("thread{t}-pod{i}"), "eth0");
                            let ips = add(dir, pool, &owner);
                            (owner, ips)
                        })
                        .collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let (owners, ips): (Vec<Owner>, Vec<Vec<IpAddr>>) = results.into_iter().flatten().unzip();
    assert_eq!(owners.len(), THREADS * EACH);
    assert_exact(dir.path(), &pool, &owners, &ips);
    // Round robin with no releases hands out the first N of each set.
    let free = Store::open(dir.path(), NETWORK)
        .unwrap()
        .read()
        .unwrap()
        .free_per_set(&pool);
    assert_eq!(free, vec![510 - 240, (1u128 << 64) - 1 - 240]);
}

/// Child side of the multi-process tests, which run it in a re-executed
/// test binary (`--ignored --exact child_process`). Ignored in a normal
/// run, so it never counts as a passing test.
#[test]
#[ignore = "not a test: the child process of the multi-process tests"]
fn child_process() {
    let (Ok(dir), Ok(id), Ok(mode)) = (
        std::env::var(CHILD_DIR),
        std::env::var(CHILD_ID),
        std::env::var(CHILD_MODE),
    ) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let pool = dual_stack();
    match mode.as_str() {
        "allocate" => {
            for i in 0..25 {
                let owner = Owner::new(format!("proc{id}-pod{i}"), "eth0");
                add(&dir, &pool, &owner);
            }
        }
        "churn" => {
            // Allocate and release forever, until killed.
            let store = Store::open(&dir, NETWORK).unwrap();
            for i in 0.. {
                let mut locked = store.lock().unwrap();
                let owner = Owner::new(format!("churn{id}-{i}"), "eth0");
                locked.state().allocate(&pool, &owner, &[]).unwrap();
                if i >= 20 {
                    let old = Owner::new(format!("churn{id}-{}", i - 20), "eth0");
                    locked.state().release(&old);
                }
                locked.commit().unwrap();
            }
        }
        "add-forever" => {
            // One dual-stack ADD per lock, new pods forever, until killed.
            let pool = big_dual_stack();
            let store = Store::open(&dir, NETWORK).unwrap();
            for i in 0.. {
                let owner = Owner::new(format!("kill{id}-{i}"), "eth0");
                let mut locked = store.lock().unwrap();
                locked.state().allocate(&pool, &owner, &[]).unwrap();
                locked.commit().unwrap();
            }
        }
        other => panic!("unknown child mode {other}"),
    }
}

fn spawn_child(dir: &Path, id: usize, mode: &str) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "child_process",
            "--test-threads=1",
            "--quiet",
        ])
        .env(CHILD_DIR, dir)
        .env(CHILD_ID, id.to_string())
        .env(CHILD_MODE, mode)
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn processes_never_share_an_address() {
    const PROCS: usize = 6;
    let dir = TempDir::new("concurrency").unwrap();
    let children: Vec<_> = (0..PROCS)
        .map(|id| spawn_child(dir.path(), id, "allocate"))
        .collect();
    for mut child in children {
        assert!(child.wait().unwrap().success());
    }
    let state = Store::open(dir.path(), NETWORK).unwrap().read().unwrap();
    let pool = dual_stack();
    let mut owners = Vec::new();
    let mut ips = Vec::new();
    for id in 0..PROCS {
        for i in 0..25 {
            let owner = Owner::new(format!("proc{id}-pod{i}"), "eth0");
            ips.push(state.owned_by(&owner));
            owners.push(owner);
        }
    }
    assert!(ips.iter().all(|v| v.len() == 2));
    assert_exact(dir.path(), &pool, &owners, &ips);
}

/// After writers were killed: the file parses, no address has two owners
/// (the store refuses to load a file where one has), and every owner holds
/// one address per set except those `in_flight` says a killed writer was
/// working on, which hold fewer. Those are retried as the runtime would (ADD
/// again, which is idempotent), and must then hold exactly one per set,
/// keeping what they had. Returns how many owners needed the retry.
fn assert_converges(
    dir: &Path,
    pool: &Pool,
    in_flight: impl Fn(&Owner, &BTreeMap<&Owner, Vec<IpAddr>>) -> bool,
) -> usize {
    let store = Store::open(dir, NETWORK).unwrap();
    let state = store.read().unwrap();
    let mut per_owner: BTreeMap<&Owner, Vec<IpAddr>> = BTreeMap::new();
    for (ip, owner) in state.records() {
        per_owner.entry(owner).or_default().push(*ip);
    }
    let mut partial = Vec::new();
    for (owner, ips) in &per_owner {
        assert!(ips.len() <= 2, "{owner} holds {ips:?}");
        if ips.len() < 2 {
            assert!(in_flight(owner, &per_owner), "{owner} holds only {ips:?}");
            partial.push(((*owner).clone(), ips.clone()));
        }
    }
    for (owner, held) in &partial {
        let mut locked = store.lock().unwrap();
        let got: Vec<IpAddr> = locked
            .state()
            .allocate(pool, owner, &[])
            .unwrap()
            .iter()
            .map(|a| a.address.ip())
            .collect();
        locked.commit().unwrap();
        assert_eq!(got.len(), 2);
        assert!(
            held.iter().all(|ip| got.contains(ip)),
            "{owner}: {held:?} -> {got:?}"
        );
    }
    let state = store.read().unwrap();
    let mut seen = HashSet::new();
    for (ip, owner) in state.records() {
        assert!(seen.insert(*ip));
        assert_eq!(state.owned_by(owner).len(), 2, "{owner}");
    }
    partial.len()
}

/// The id and sequence number of a child's owner, `<prefix><id>-<i>`.
fn child_and_index(owner: &Owner, prefix: &str) -> (usize, usize) {
    let rest = owner.container_id.strip_prefix(prefix).unwrap();
    let (id, i) = rest.split_once('-').unwrap();
    (id.parse().unwrap(), i.parse().unwrap())
}

#[test]
fn sigkill_at_any_instant_leaves_a_consistent_file() {
    let dir = TempDir::new("concurrency").unwrap();
    let pool = dual_stack();
    let mut repaired = 0;
    for round in 0..15u64 {
        let mut children: Vec<_> = (0..3)
            .map(|id| spawn_child(dir.path(), id, "churn"))
            .collect();
        thread::sleep(Duration::from_millis(20 + (round * 7) % 40));
        for child in &mut children {
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
        }
        // A churn child's commit reserves pod i and releases pod i - 20:
        // killed half way, those two may hold one address each.
        repaired += assert_converges(dir.path(), &pool, |owner, all| {
            let (id, i) = child_and_index(owner, "churn");
            let newest = all
                .keys()
                .filter(|o| child_and_index(o, "churn").0 == id)
                .map(|o| child_and_index(o, "churn").1)
                .max()
                .unwrap();
            i == newest || i + 20 >= newest
        });
        // A fresh ADD still works after the kills.
        let owner = Owner::new(format!("after-kill-{round}"), "eth0");
        assert_eq!(add(dir.path(), &pool, &owner).len(), 2);
        // Start the next round empty (GC with nothing valid).
        let store = Store::open(dir.path(), NETWORK).unwrap();
        let mut locked = store.lock().unwrap();
        locked.state().retain(|_| false);
        locked.commit().unwrap();
    }
    eprintln!("sigkill churn: {repaired} half-done commits repaired by a retried ADD");
}

/// Writers killed during dual-stack ADDs (an address of one family written,
/// the other not yet): the file stays valid, only the pod each writer was
/// adding can be incomplete, and the runtime's retried ADD completes it with
/// the address it already had.
#[test]
fn sigkill_during_dual_stack_allocation_converges_after_retry() {
    let dir = TempDir::new("concurrency").unwrap();
    let pool = big_dual_stack();
    let mut repaired = 0;
    for round in 0..25u64 {
        let mut children: Vec<_> = (0..2)
            .map(|id| spawn_child(dir.path(), id, "add-forever"))
            .collect();
        thread::sleep(Duration::from_millis(15 + (round * 11) % 50));
        for child in &mut children {
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
        }
        repaired += assert_converges(dir.path(), &pool, |owner, all| {
            // Only the newest pod of its child.
            let (id, i) = child_and_index(owner, "kill");
            all.keys()
                .filter(|o| child_and_index(o, "kill").0 == id)
                .all(|o| child_and_index(o, "kill").1 <= i)
        });
        let store = Store::open(dir.path(), NETWORK).unwrap();
        let mut locked = store.lock().unwrap();
        locked.state().retain(|_| false);
        locked.commit().unwrap();
    }
    eprintln!("sigkill dual-stack: {repaired} half-done ADDs completed by a retry");
}

/// Median and 95th percentile of `samples`.
fn median_p95(samples: &mut [Duration]) -> (Duration, Duration) {
    samples.sort_unstable();
    let p95 = (samples.len() * 95).div_ceil(100).saturating_sub(1);
    (samples[samples.len() / 2], samples[p95])
}

/// One ADD (lock + allocate + commit) and one DEL (lock + release +
/// commit) of a dual-stack pod, timed one by one, with 0, 50, 500 and 1000
/// pods (0, 100, 1000 and 2000 records) already in the store. Run in release
/// mode to mean anything:
/// `cargo test --release -p ferrite-ipam -- --nocapture timing`.
#[test]
fn timing_of_add_and_del_by_records_held() {
    let big = Pool::from_config(&[vec![cfg("10.0.0.0/16")], vec![cfg("fd00::/64")]]).unwrap();
    for pods in [0usize, 50, 500, 1000] {
        let dir = TempDir::new("concurrency").unwrap();
        let store = Store::open(dir.path(), NETWORK).unwrap();
        // Fill one pod per commit, as the plugin would, so the file looks
        // like one grown by real ADDs.
        for i in 0..pods {
            let owner = Owner::new(format!("{i:064x}"), "eth0");
            let mut locked = store.lock().unwrap();
            locked.state().allocate(&big, &owner, &[]).unwrap();
            locked.commit().unwrap();
        }
        const CYCLES: usize = 300;
        let mut adds = Vec::with_capacity(CYCLES);
        let mut dels = Vec::with_capacity(CYCLES);
        let mut reads = Vec::with_capacity(CYCLES);
        for i in 0..CYCLES {
            let owner = Owner::new(format!("timed{i:059x}"), "eth0");
            let start = Instant::now();
            let mut locked = store.lock().unwrap();
            assert_eq!(locked.state().allocate(&big, &owner, &[]).unwrap().len(), 2);
            locked.commit().unwrap();
            drop(locked);
            adds.push(start.elapsed());

            let start = Instant::now();
            let state = store.read().unwrap();
            reads.push(start.elapsed());
            assert_eq!(state.records().count(), 2 * pods + 2);

            let start = Instant::now();
            let mut locked = store.lock().unwrap();
            assert_eq!(locked.state().release(&owner).len(), 2);
            locked.commit().unwrap();
            drop(locked);
            dels.push(start.elapsed());
        }
        let (add, add95) = median_p95(&mut adds);
        let (del, del95) = median_p95(&mut dels);
        let (read, read95) = median_p95(&mut reads);
        let size = fs::metadata(store.path()).map(|m| m.len()).unwrap_or(0);
        eprintln!(
            "ipam timing: {pods:4} pods ({:4} records): ADD median {add:?} p95 {add95:?}; \
             DEL median {del:?} p95 {del95:?}; read median {read:?} p95 {read95:?}; \
             state file {size} bytes",
            2 * pods
        );
    }
}
