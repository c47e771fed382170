// SPDX-License-Identifier: Apache-2.0
//! The store's tests: format, parser, slot writer, migration, locking.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;

use super::format::*;
use super::*;
use crate::range::{Pool, RangeConfig};
use crate::records::{FIXED, UNIT};
use crate::state::Owner;

use ferrite_test_support::TempDir;

fn pool() -> Pool {
    let cfg = |s: &str| RangeConfig {
        subnet: s.into(),
        range_start: None,
        range_end: None,
        gateway: None,
    };
    Pool::from_config(&[vec![cfg("10.244.1.0/24")], vec![cfg("fd00::/64")]]).unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn pod(n: usize) -> Owner {
    Owner::new(format!("{n:064x}"), "eth0")
}

/// Recomputes the checksum of the record at `slot`, so a test can make
/// a record that is well sealed but wrong inside.
fn reseal(bytes: &mut [u8], slot: usize) {
    let units = usize::from(bytes[slot * UNIT + 2]).max(1);
    let end = ((slot + units) * UNIT).min(bytes.len());
    let rec = &mut bytes[slot * UNIT..end];
    let sum = checksum(rec);
    rec[4..8].copy_from_slice(&sum.to_le_bytes());
}

/// The slots whose bytes differ between two versions of a file.
fn changed_slots(before: &[u8], after: &[u8]) -> Vec<usize> {
    let slots = before.len().max(after.len()) / UNIT;
    let unit = |b: &[u8], s: usize| b.get(s * UNIT..(s + 1) * UNIT).map(<[u8]>::to_vec);
    (0..slots)
        .filter(|&s| {
            unit(before, s).unwrap_or(vec![0; UNIT]) != unit(after, s).unwrap_or(vec![0; UNIT])
        })
        .collect()
}

#[test]
fn format_round_trip_and_layout() {
    let pool = pool();
    let mut state = State::new();
    for n in 0..3 {
        state.allocate(&pool, &pod(n), &[]).unwrap();
    }
    state.release(&pod(1));
    let bytes = encode(&state);
    // Header, 4 addresses in address order, 2 round-robin positions.
    assert_eq!(bytes.len(), 7 * UNIT);
    assert!(bytes.starts_with(b"ferrite-ipam allocations v2\n"));
    assert!(bytes[28..UNIT].iter().all(|&b| b == 0));
    let rec = &bytes[UNIT..2 * UNIT];
    assert_eq!(&rec[..4], &[MAGIC, KIND_ADDRESS, 1, 4]);
    assert_eq!(&rec[16..20], &[10, 244, 1, 1]);
    assert_eq!(&rec[32..36], &[64, 0, 4, 0]);
    assert_eq!(
        &rec[FIXED..FIXED + 68],
        format!("{:064x}eth0", 0).as_bytes()
    );
    assert!(rec[FIXED + 68..].iter().all(|&b| b == 0));
    assert_eq!(record_address(&bytes[3 * UNIT..]), ip("fd00::1"));
    let last = &bytes[5 * UNIT..6 * UNIT];
    assert_eq!(&last[..4], &[MAGIC, KIND_LAST, 1, 4]);
    assert_eq!(record_address(last), ip("10.244.1.3"));
    assert_eq!(&bytes[6 * UNIT + 8..6 * UNIT + 16], &1u64.to_le_bytes());

    assert_eq!(decode(&bytes, Path::new("x")).unwrap(), state);
    assert_eq!(encode(&State::new()).len(), UNIT);
    assert_eq!(
        decode(&encode(&State::new()), Path::new("x")).unwrap(),
        State::new()
    );

    // Long owners take several slots and never cross a page.
    let mut state = State::new();
    for n in 0..40 {
        let id = format!("{n:0>width$}", width = 64 + 100 * (n % 4));
        state.allocate(&pool, &Owner::new(id, "eth0"), &[]).unwrap();
    }
    let bytes = encode(&state);
    let (got, disk) = parse(bytes.clone(), Path::new("x")).unwrap();
    assert_eq!(got, state);
    for &(_, slot) in &disk.addresses {
        let units = usize::from(bytes[slot * UNIT + 2]);
        assert_eq!(slot / UNITS_PER_PAGE, (slot + units - 1) / UNITS_PER_PAGE);
    }
}

#[test]
fn corrupt_files_are_reported_with_file_and_offset() {
    let pool = pool();
    let mut state = State::new();
    for n in 0..2 {
        state.allocate(&pool, &pod(n), &[]).unwrap();
    }
    // Slots: 1, 2 IPv4; 3, 4 IPv6; 5, 6 last.
    let good = encode(&state);
    let edit = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = good.clone();
        f(&mut b);
        b
    };
    let sealed = |slot: usize, f: &dyn Fn(&mut [u8])| {
        edit(&|b| {
            f(&mut b[slot * UNIT..]);
            reseal(b, slot);
        })
    };
    let cases: Vec<(Vec<u8>, u64, &str)> = vec![
        (Vec::new(), 0, "truncated"),
        (b"garbage\n".to_vec(), 0, "expected header"),
        (
            b"ferrite-ipam allocations v9\n".to_vec(),
            0,
            "unsupported format",
        ),
        (edit(&|b| b.truncate(good.len() - 1)), 6 * 128, "truncated"),
        (edit(&|b| b.push(0)), 7 * 128, "truncated"),
        (edit(&|b| b[100] = 1), 0, "header slot"),
        (edit(&|b| b[2 * UNIT] = 0x42), 2 * 128, "bad magic"),
        (
            edit(&|b| b.extend_from_slice(&[[0; 5].as_slice(), &[1], &[0; 122]].concat())),
            7 * 128,
            "free slot",
        ),
        (edit(&|b| b[UNIT + 50] ^= 1), 128, "checksum"),
        (edit(&|b| b[3 * UNIT + 20] ^= 0x80), 3 * 128, "checksum"),
        (sealed(1, &|r| r[1] = 9), 128, "unknown record kind"),
        (sealed(1, &|r| r[3] = 5), 128, "family"),
        (sealed(1, &|r| r[25] = 1), 128, "trailing bytes"),
        (
            sealed(1, &|r| r[FIXED + 3] = b' '),
            128,
            "invalid container id",
        ),
        (sealed(1, &|r| r[FIXED + 3] = 0xff), 128, "not UTF-8"),
        (sealed(1, &|r| r[FIXED + 65] = 0x7f), 128, "invalid ifname"),
        (sealed(1, &|r| r[32] = 0), 128, "invalid container id"),
        (sealed(1, &|r| r[32] = 200), 128, "longer than the record"),
        (sealed(1, &|r| r[8] = 1), 128, "with a set index"),
        (sealed(5, &|r| r[32] = 1), 5 * 128, "with an owner"),
        // The second IPv4 record names the first's address.
        (sealed(2, &|r| r[19] = 1), 2 * 128, "recorded twice"),
        (sealed(6, &|r| r[8] = 0), 6 * 128, "two last-reserved"),
        (sealed(6, &|r| r[2] = 2), 6 * 128, "truncated record"),
        (
            edit(&|b| {
                b.resize(PAGE + UNIT, 0);
                b.copy_within(UNIT..2 * UNIT, PAGE - UNIT);
                b.copy_within(UNIT..2 * UNIT, PAGE);
                b[PAGE - UNIT + 2] = 2;
                b[UNIT..PAGE - UNIT].fill(0);
                reseal(b, UNITS_PER_PAGE - 1);
            }),
            (PAGE - UNIT) as u64,
            "cannot start here",
        ),
        (sealed(1, &|r| r[2] = 0), 128, "cannot start here"),
        // Format v1: offsets of lines, with their numbers.
        (
            b"ferrite-ipam allocations v1".to_vec(),
            0,
            "line 1: truncated",
        ),
        (
            b"ferrite-ipam allocations v1x\n".to_vec(),
            0,
            "line 1: expected header",
        ),
        (
            b"ferrite-ipam allocations v1\n10.0.0.1 abc eth0".to_vec(),
            28,
            "line 2: truncated",
        ),
        (
            b"ferrite-ipam allocations v1\n10.0.0.1 abc\n".to_vec(),
            28,
            "line 2: expected",
        ),
        (
            b"ferrite-ipam allocations v1\nlast 0 10.0.0.1\n10.0.0.300 abc eth0\n".to_vec(),
            44,
            "line 3: \"10.0.0.300\" is not an IP",
        ),
        (
            b"ferrite-ipam allocations v1\n10.0.0.1 a eth0\n10.0.0.1 b eth0\n".to_vec(),
            44,
            "line 3: address 10.0.0.1 recorded twice",
        ),
        (
            b"ferrite-ipam allocations v1\nlast 0 10.0.0.1\nlast 0 10.0.0.2\n".to_vec(),
            44,
            "two last",
        ),
        (
            b"ferrite-ipam allocations v1\nlast x 10.0.0.1\n".to_vec(),
            28,
            "set index",
        ),
        (
            b"ferrite-ipam allocations v1\n10.0.0.1 a\r eth0\n".to_vec(),
            28,
            "invalid container id",
        ),
        (
            b"ferrite-ipam allocations v1\n\xff\n".to_vec(),
            28,
            "line 2: not UTF-8",
        ),
    ];
    for (bytes, offset, reason) in &cases {
        let err = decode(bytes, Path::new("/s/allocations")).unwrap_err();
        let StoreError::Corrupt { offset: got, .. } = &err else {
            panic!("{reason}: {err}");
        };
        let msg = err.to_string();
        assert_eq!(got, offset, "{reason}: {msg}");
        assert!(
            msg.contains("/s/allocations") && msg.contains(reason),
            "{reason}: {msg}"
        );
    }
    assert_eq!(decode(&good, Path::new("x")).unwrap(), state);
}

#[test]
fn network_names_cannot_escape() {
    let dir = TempDir::new("store").unwrap();
    for bad in [
        "",
        ".",
        "..",
        ".hidden",
        "a/b",
        "../x",
        "a b",
        &"x".repeat(65),
        "é",
    ] {
        assert!(
            matches!(
                Store::open(dir.path(), bad),
                Err(StoreError::InvalidName { .. })
            ),
            "{bad:?}"
        );
    }
    for good in ["k8s-pod-network", "net_1.v2", &"x".repeat(64)] {
        Store::open(dir.path(), good).unwrap();
    }
}

#[test]
fn open_creates_private_directory_and_missing_file_is_empty() {
    let dir = TempDir::new("store").unwrap();
    let store = Store::open(dir.path(), "net").unwrap();
    assert_eq!(store.dir(), dir.join("ipam/net"));
    let mode = fs::metadata(store.dir()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    assert_eq!(store.read().unwrap(), State::new());
    // An empty commit writes nothing.
    store.lock().unwrap().commit().unwrap();
    assert!(!store.path().exists());
}

#[test]
fn commit_persists_and_drop_discards() {
    let dir = TempDir::new("store").unwrap();
    let store = Store::open(dir.path(), "net").unwrap();
    let pool = pool();
    let a = Owner::new("aaa", "eth0");
    {
        let mut locked = store.lock().unwrap();
        locked.state().allocate(&pool, &a, &[]).unwrap();
        locked.commit().unwrap();
    }
    let mode = fs::metadata(store.path()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(!store.dir().join("allocations.tmp").exists());
    {
        let mut locked = store.lock().unwrap();
        locked
            .state()
            .allocate(&pool, &Owner::new("bbb", "eth0"), &[])
            .unwrap();
        // dropped without commit
    }
    let state = Store::open(dir.path(), "net").unwrap().read().unwrap();
    assert_eq!(state.owned_by(&a), vec![ip("10.244.1.1"), ip("fd00::1")]);
    assert_eq!(state.records().count(), 2);
    assert_eq!(state.last_reserved(0), Some(ip("10.244.1.1")));

    let mut locked = store.lock().unwrap();
    assert_eq!(locked.state().release(&a).len(), 2);
    locked.commit().unwrap();
    drop(locked);
    assert_eq!(store.read().unwrap().records().count(), 0);
    // The round robin position survives the release.
    assert_eq!(store.read().unwrap().last_reserved(1), Some(ip("fd00::1")));
    let mode = fs::metadata(store.path()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn commit_writes_only_what_changed_and_reuses_slots() {
    let dir = TempDir::new("store").unwrap();
    let store = Store::open(dir.path(), "net").unwrap();
    let pool = pool();
    for n in 0..100 {
        let mut locked = store.lock().unwrap();
        locked.state().allocate(&pool, &pod(n), &[]).unwrap();
        locked.commit().unwrap();
    }
    // Header, 200 addresses, 2 round-robin positions.
    assert_eq!(fs::metadata(store.path()).unwrap().len(), 203 * 128);

    // Several commits under one lock, each against the last.
    let mut locked = store.lock().unwrap();
    let before = fs::read(store.path()).unwrap();
    locked.state().release(&pod(10));
    locked.commit().unwrap();
    let released = fs::read(store.path()).unwrap();
    let freed = changed_slots(&before, &released);
    assert_eq!(freed.len(), 2, "{freed:?}");
    assert!(freed
        .iter()
        .all(|&s| released[s * UNIT..(s + 1) * UNIT] == ZERO_UNIT));
    locked.commit().unwrap(); // nothing changed: nothing written
    assert_eq!(fs::read(store.path()).unwrap(), released);

    locked.state().allocate(&pool, &pod(100), &[]).unwrap();
    locked.commit().unwrap();
    let added = fs::read(store.path()).unwrap();
    assert_eq!(added.len(), released.len(), "the freed slots are reused");
    let changed = changed_slots(&released, &added);
    // Two addresses into the freed slots, two positions in place.
    assert_eq!(changed.len(), 4, "{changed:?}");
    assert!(freed.iter().all(|s| changed.contains(s)));
    drop(locked);

    // A change of owner (GC frees an address, a static request takes it
    // in the same commit) rewrites its record in place.
    let mut locked = store.lock().unwrap();
    let taken = locked.state().owned_by(&pod(20))[0];
    locked.state().release(&pod(20));
    locked.state().allocate(&pool, &pod(200), &[taken]).unwrap();
    locked.commit().unwrap();
    drop(locked);
    let moved = fs::read(store.path()).unwrap();
    let changed = changed_slots(&added, &moved);
    assert_eq!(changed.len(), 4, "{changed:?}");
    assert_eq!(moved.len(), added.len());

    let state = store.read().unwrap();
    assert_eq!(state.owner_of(taken), Some(&pod(200)));
    assert_eq!(state.records().count(), 200);
    let (_, disk) = parse(moved, Path::new("x")).unwrap();
    assert_eq!(disk.addresses.len(), 200);
}

#[test]
fn long_owners_take_several_slots_within_a_page() {
    let dir = TempDir::new("store").unwrap();
    let store = Store::open(dir.path(), "net").unwrap();
    let pool = pool();
    let owner = |n: usize| {
        let id = format!("{n:0>width$}", width = 40 + 150 * (n % 7));
        Owner::new(id, "eth0")
    };
    for n in 0..60 {
        let mut locked = store.lock().unwrap();
        locked.state().allocate(&pool, &owner(n), &[]).unwrap();
        if n % 3 == 0 && n > 0 {
            locked.state().release(&owner(n - 1));
        }
        locked.commit().unwrap();
    }
    let bytes = fs::read(store.path()).unwrap();
    let (state, disk) = parse(bytes.clone(), Path::new("x")).unwrap();
    for &(_, slot) in &disk.addresses {
        let units = usize::from(bytes[slot * UNIT + 2]);
        assert_eq!(slot / UNITS_PER_PAGE, (slot + units - 1) / UNITS_PER_PAGE);
    }
    for n in 0..60 {
        let want = if n % 3 == 2 && n < 59 { 0 } else { 2 };
        assert_eq!(state.owned_by(&owner(n)).len(), want, "{n}");
    }
    assert_eq!(store.read().unwrap(), state);
}

/// Every place a writer can die between two `pwrite`s of a commit,
/// replayed deterministically: the file stays valid, no address has two
/// owners, and a retried ADD (or DEL) converges. The SIGKILL tests in
/// tests/concurrency.rs do the same with real kills at random instants.
#[test]
fn a_commit_cut_after_any_write_leaves_a_state_that_retries_repair() {
    let pool = pool();
    // (writes to allow, what the commit does)
    for budget in 0..8 {
        for churn in [false, true] {
            let dir = TempDir::new("store").unwrap();
            let store = Store::open(dir.path(), "net").unwrap();
            for n in 0..5 {
                let mut locked = store.lock().unwrap();
                locked.state().allocate(&pool, &pod(n), &[]).unwrap();
                locked.commit().unwrap();
            }
            let before = store.read().unwrap();
            let mut locked = store.lock().unwrap();
            locked.disk.as_mut().unwrap().write_budget = Some(budget);
            locked.state().allocate(&pool, &pod(9), &[]).unwrap();
            if churn {
                locked.state().release(&pod(2));
            }
            let result = locked.commit();
            let wanted = if churn { 6 } else { 4 };
            assert_eq!(result.is_ok(), budget >= wanted, "budget {budget}");
            drop(locked); // the "killed" writer's lock goes away

            let cut = store.read().unwrap();
            let mut seen = BTreeSet::new();
            for (ip, owner) in cut.records() {
                assert!(seen.insert(*ip));
                let held = cut.owned_by(owner).len();
                let in_flight = *owner == pod(9) || (churn && *owner == pod(2));
                assert!(
                    held == 2 || in_flight,
                    "budget {budget}: {owner} holds {held}"
                );
            }
            for n in [0, 1, 3, 4] {
                assert_eq!(cut.owned_by(&pod(n)), before.owned_by(&pod(n)));
            }

            // The runtime retries: ADD again for pod 9, DEL for pod 2.
            let mut locked = store.lock().unwrap();
            let got = locked.state().allocate(&pool, &pod(9), &[]).unwrap();
            let kept = cut.owned_by(&pod(9));
            for ip in &kept {
                assert!(
                    got.iter().any(|a| a.address.ip() == *ip),
                    "retried ADD keeps {ip}"
                );
            }
            if churn {
                locked.state().release(&pod(2));
            }
            locked.commit().unwrap();
            drop(locked);
            let after = store.read().unwrap();
            assert_eq!(after.owned_by(&pod(9)).len(), 2);
            assert_eq!(after.records().count(), if churn { 10 } else { 12 });
        }
    }
}

#[test]
fn a_failed_commit_is_retried_from_what_the_file_holds() {
    let dir = TempDir::new("store").unwrap();
    let store = Store::open(dir.path(), "net").unwrap();
    let pool = pool();
    let mut locked = store.lock().unwrap();
    locked.state().allocate(&pool, &pod(0), &[]).unwrap();
    locked.commit().unwrap();
    locked.disk.as_mut().unwrap().write_budget = Some(1);
    locked.state().allocate(&pool, &pod(1), &[]).unwrap();
    assert!(matches!(
        locked.commit(),
        Err(StoreError::Io { op: "write", .. })
    ));
    // The next commit reloads and writes the rest.
    locked.commit().unwrap();
    let want = locked.state().clone();
    drop(locked);
    assert_eq!(store.read().unwrap(), want);
}

/// A commit skips records the state still points at in the loaded
/// file; a state put back from a clone after other commits under the
/// same lock must still be written as it is.
#[test]
fn a_state_restored_from_a_clone_is_committed_as_it_is() {
    let dir = TempDir::new("store").unwrap();
    let store = Store::open(dir.path(), "net").unwrap();
    let pool = pool();
    for n in 0..4 {
        let mut locked = store.lock().unwrap();
        locked.state().allocate(&pool, &pod(n), &[]).unwrap();
        locked.commit().unwrap();
    }
    let mut locked = store.lock().unwrap();
    let snapshot = locked.state().clone();
    let taken = locked.state().owned_by(&pod(1))[0];
    locked.state().release(&pod(1));
    locked.state().allocate(&pool, &pod(9), &[taken]).unwrap();
    locked.commit().unwrap();
    locked.state().release(&pod(2));
    locked.commit().unwrap();
    *locked.state() = snapshot.clone();
    locked.commit().unwrap();
    drop(locked);
    assert_eq!(store.read().unwrap(), snapshot);
    assert_eq!(store.read().unwrap().owner_of(taken), Some(&pod(1)));
}

#[test]
fn stale_temporary_file_is_replaced() {
    let dir = TempDir::new("store").unwrap();
    let store = Store::open(dir.path(), "net").unwrap();
    let tmp = store.dir().join("allocations.tmp");
    fs::write(&tmp, "half a file from a killed writer").unwrap();
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)).unwrap();
    let mut locked = store.lock().unwrap();
    locked
        .state()
        .allocate(&pool(), &Owner::new("a", "eth0"), &[])
        .unwrap();
    locked.commit().unwrap();
    drop(locked);
    assert!(!tmp.exists());
    assert_eq!(store.read().unwrap().records().count(), 2);
    let mode = fs::metadata(store.path()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn v1_file_is_read_as_is_and_converted_under_the_lock() {
    let dir = TempDir::new("store").unwrap();
    let store = Store::open(dir.path(), "net").unwrap();
    let v1 = format!(
        "ferrite-ipam allocations v1\nlast 0 10.244.1.7\nlast 1 fd00::7\n\
         10.244.1.5 {a} eth0\n10.244.1.7 {b} eth0\nfd00::7 {b} eth0\n",
        a = "0f3c".repeat(16),
        b = "9a1b".repeat(16)
    );
    fs::write(store.path(), &v1).unwrap();
    fs::set_permissions(store.path(), fs::Permissions::from_mode(0o644)).unwrap();
    let state = store.read().unwrap();
    assert_eq!(state.records().count(), 3);
    assert_eq!(state.last_reserved(1), Some(ip("fd00::7")));
    assert_eq!(
        fs::read_to_string(store.path()).unwrap(),
        v1,
        "read converts nothing"
    );

    let mut locked = store.lock().unwrap();
    assert_eq!(locked.state(), &state);
    let got = locked
        .state()
        .allocate(&pool(), &Owner::new("new", "eth0"), &[])
        .unwrap();
    assert_eq!(got[0].address.ip(), ip("10.244.1.8"));
    locked.commit().unwrap();
    drop(locked);
    let bytes = fs::read(store.path()).unwrap();
    assert!(bytes.starts_with(b"ferrite-ipam allocations v2\n"));
    let mode = fs::metadata(store.path()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let after = store.read().unwrap();
    assert_eq!(after.records().count(), 5);
    assert_eq!(
        after.owned_by(&Owner::new("9a1b".repeat(16), "eth0")).len(),
        2
    );

    // A corrupt v1 file is reported, not converted.
    fs::write(store.path(), "ferrite-ipam allocations v1\n10.0.0.1 abc\n").unwrap();
    assert!(matches!(
        store.lock(),
        Err(StoreError::Corrupt { offset: 28, .. })
    ));
    assert_eq!(
        fs::read_to_string(store.path()).unwrap(),
        "ferrite-ipam allocations v1\n10.0.0.1 abc\n"
    );
}

#[test]
fn corrupt_file_fails_lock_and_read() {
    let dir = TempDir::new("store").unwrap();
    let store = Store::open(dir.path(), "net").unwrap();
    let mut state = State::new();
    state.allocate(&pool(), &pod(1), &[]).unwrap();
    let mut bytes = encode(&state);
    bytes[2 * UNIT + 40] ^= 0x20;
    fs::write(store.path(), &bytes).unwrap();
    let msg = store.read().unwrap_err().to_string();
    assert!(msg.contains(&store.path().display().to_string()), "{msg}");
    assert!(msg.contains("at byte 256: checksum mismatch"), "{msg}");
    assert!(matches!(
        store.lock(),
        Err(StoreError::Corrupt { offset: 256, .. })
    ));
    // Not reset.
    assert_eq!(fs::read(store.path()).unwrap(), bytes);
    // Nor is an empty file taken for an empty state.
    fs::write(store.path(), "").unwrap();
    assert!(matches!(
        store.read(),
        Err(StoreError::Corrupt { offset: 0, .. })
    ));
}

#[test]
fn unusable_state_dir_is_a_clear_error() {
    // A path under a regular file: fails for root too, unlike chmod.
    let dir = TempDir::new("store").unwrap();
    let file = dir.join("not-a-dir");
    fs::write(&file, "").unwrap();
    let err = Store::open(&file, "net").unwrap_err();
    assert!(matches!(
        err,
        StoreError::Io {
            op: "create directory",
            ..
        }
    ));
    assert!(err.to_string().contains("not-a-dir/ipam/net"), "{err}");

    // The directory vanishing under an open store.
    let store = Store::open(dir.path(), "gone").unwrap();
    fs::remove_dir_all(store.dir()).unwrap();
    let err = store.lock().unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Io {
                op: "open lock file",
                ..
            }
        ),
        "{err}"
    );
}
