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
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use ferrite_ipam::{Owner, Pool, RangeConfig, Store};

const CHILD_DIR: &str = "FERRITE_IPAM_TEST_CHILD_DIR";
const CHILD_ID: &str = "FERRITE_IPAM_TEST_CHILD_ID";
const CHILD_MODE: &str = "FERRITE_IPAM_TEST_CHILD_MODE";
const NETWORK: &str = "test-net";

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "ferrite-ipam-concurrency-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

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
    let dir = TempDir::new();
    let pool = dual_stack();
    let results: Vec<Vec<(Owner, Vec<IpAddr>)>> = thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (dir, pool) = (&dir.0, &pool);
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
    assert_exact(&dir.0, &pool, &owners, &ips);
    // Round robin with no releases hands out the first N of each set.
    let free = Store::open(&dir.0, NETWORK)
        .unwrap()
        .read()
        .unwrap()
        .free_per_set(&pool);
    assert_eq!(free, vec![510 - 240, (1u128 << 64) - 1 - 240]);
}

/// Child side of the multi-process tests; a no-op in a normal run.
#[test]
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
        other => panic!("unknown child mode {other}"),
    }
}

fn spawn_child(dir: &Path, id: usize, mode: &str) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_process", "--test-threads=1", "--quiet"])
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
    let dir = TempDir::new();
    let children: Vec<_> = (0..PROCS)
        .map(|id| spawn_child(&dir.0, id, "allocate"))
        .collect();
    for mut child in children {
        assert!(child.wait().unwrap().success());
    }
    let state = Store::open(&dir.0, NETWORK).unwrap().read().unwrap();
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
    assert_exact(&dir.0, &pool, &owners, &ips);
}

#[test]
fn sigkill_at_any_instant_leaves_a_consistent_file() {
    let dir = TempDir::new();
    let pool = dual_stack();
    for round in 0..15u64 {
        let mut children: Vec<_> = (0..3).map(|id| spawn_child(&dir.0, id, "churn")).collect();
        thread::sleep(Duration::from_millis(20 + (round * 7) % 40));
        for child in &mut children {
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
        }
        // Parses, and each set's addresses belong to distinct owners.
        let state = Store::open(&dir.0, NETWORK).unwrap().read().unwrap();
        let mut per_owner: BTreeMap<&Owner, Vec<IpAddr>> = BTreeMap::new();
        for (ip, owner) in state.records() {
            per_owner.entry(owner).or_default().push(*ip);
        }
        for (owner, ips) in &per_owner {
            assert_eq!(ips.len(), 2, "{owner} holds {ips:?}");
        }
        // A fresh ADD still works after the kills.
        let owner = Owner::new(format!("after-kill-{round}"), "eth0");
        assert_eq!(add(&dir.0, &pool, &owner).len(), 2);
        // Start the next round empty (GC with nothing valid).
        let store = Store::open(&dir.0, NETWORK).unwrap();
        let mut locked = store.lock().unwrap();
        locked.state().retain(|_| false);
        locked.commit().unwrap();
    }
}

#[test]
fn timing_of_one_add_with_1000_records() {
    let dir = TempDir::new();
    let store = Store::open(&dir.0, NETWORK).unwrap();
    let big = Pool::from_config(&[vec![cfg("10.0.0.0/16")], vec![cfg("fd00::/64")]]).unwrap();
    {
        let mut locked = store.lock().unwrap();
        for i in 0..500 {
            let owner = Owner::new(format!("{i:064x}"), "eth0");
            locked.state().allocate(&big, &owner, &[]).unwrap();
        }
        locked.commit().unwrap();
    }
    const CYCLES: u32 = 200;
    let start = Instant::now();
    for i in 0..CYCLES {
        let owner = Owner::new(format!("timed{i:059x}"), "eth0");
        let mut locked = store.lock().unwrap();
        locked.state().allocate(&big, &owner, &[]).unwrap();
        locked.commit().unwrap();
    }
    let per_add = start.elapsed() / CYCLES;
    let start = Instant::now();
    for _ in 0..CYCLES {
        store.read().unwrap();
    }
    let per_read = start.elapsed() / CYCLES;
    let size = fs::metadata(store.path()).unwrap().len();
    eprintln!(
        "ipam timing: lock+allocate+commit with >=1000 records: {per_add:?} per ADD; \
         read: {per_read:?}; state file {size} bytes"
    );
}
