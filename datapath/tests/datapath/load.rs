//! Load once, open many: pins, atomic publish, the loader lock.

use std::{
    os::unix::fs::PermissionsExt,
    sync::{Arc, Barrier},
    time::Instant,
};

use ferrite_datapath::{AttachMode, Datapath, DatapathError, LoadOutcome, DATAPATH_VERSION};

use crate::harness::{in_netns, privileged, Bpffs, Pod, TempDir};

#[test]
fn second_open_or_load_opens_the_pins() {
    if !privileged("second_open_or_load_opens_the_pins") {
        return;
    }
    let bpffs = Bpffs::mount("twice");
    let root = bpffs.root();
    assert!(
        Datapath::open(&root).unwrap().is_none(),
        "nothing pinned yet"
    );

    let (first, outcome) = Datapath::open_or_load(&root).unwrap();
    assert_eq!(outcome, LoadOutcome::Loaded);
    let (second, outcome) = Datapath::open_or_load(&root).unwrap();
    assert_eq!(outcome, LoadOutcome::Opened);
    assert_eq!(first.version_dir(), second.version_dir());
    assert_eq!(first.version_dir(), root.join(DATAPATH_VERSION));

    let mut pins: Vec<String> = std::fs::read_dir(first.version_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    pins.sort();
    assert_eq!(
        pins,
        [
            "ferrite_endpts",
            "ferrite_ifaces",
            "ferrite_podnets",
            "ferrite_stats",
            "ferrite_stkflow",
            "from_pod",
            "to_pod"
        ]
    );
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&root), 0o700);
    assert_eq!(mode(first.version_dir()), 0o700);
    let entries: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let mut entries: Vec<_> = entries
        .into_iter()
        .map(|e| e.into_string().unwrap())
        .collect();
    entries.sort();
    assert_eq!(
        entries,
        [DATAPATH_VERSION, "state-1"],
        "no work directory left behind"
    );
    // The maps every version shares, and their layout: a change to any of
    // these lines must rename the state directory (datapath/src/pin.rs
    // STATE_DIR), or a new version would reuse maps it cannot read.
    let layouts = first.state_map_layouts().unwrap();
    let want = [
        ("ferrite_ct", "9 40 16 262144 0x0"),
        ("ferrite_eppol", "1 4 24 16384 0x0"),
        ("ferrite_polport", "11 16 8 65536 0x1"),
        ("ferrite_polpeer", "11 28 8 262144 0x1"),
        ("ferrite_hostips", "1 16 4 256 0x0"),
        ("ferrite_svcnets", "11 20 4 16 0x1"),
        ("ferrite_polns", "1 64 4 4096 0x1"),
        ("ferrite_podids", "1 4 320 16384 0x1"),
        ("ferrite_podpol", "1 320 24 16384 0x1"),
        ("ferrite_svc", "1 20 16 65536 0x1"),
        ("ferrite_svcslot", "1 8 4 262144 0x1"),
        ("ferrite_backend", "1 4 32 65536 0x1"),
        ("ferrite_svcct", "9 40 24 65536 0x0"),
        ("ferrite_svcrev", "9 40 40 65536 0x0"),
        ("ferrite_svcaff", "9 24 16 65536 0x0"),
        ("ferrite_svcstat", "5 4 32 65536 0x1"),
        ("ferrite_svccfg", "2 4 4 1 0x0"),
    ];
    let got: Vec<(&str, &str)> = layouts
        .iter()
        .map(|(n, l)| (n.as_str(), l.as_str()))
        .collect();
    assert_eq!(got, want);

    // Both handles see the same maps.
    let pod = Pod::new("10.244.1.2", 7, 1).add_to(&first);
    assert_eq!(second.endpoint(pod.ip).unwrap(), Some(pod.endpoint()));
}

#[test]
fn concurrent_first_callers_load_exactly_once() {
    if !privileged("concurrent_first_callers_load_exactly_once") {
        return;
    }
    let bpffs = Bpffs::mount("concurrent");
    let root = bpffs.root();
    let barrier = Arc::new(Barrier::new(4));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (root, barrier) = (root.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                Datapath::open_or_load(&root).map(|(_, outcome)| outcome)
            })
        })
        .collect();
    let outcomes: Vec<LoadOutcome> = threads
        .into_iter()
        .map(|t| t.join().unwrap().unwrap())
        .collect();
    let loaded = outcomes
        .iter()
        .filter(|o| **o == LoadOutcome::Loaded)
        .count();
    assert_eq!(loaded, 1, "{outcomes:?}");
}

#[test]
fn stale_work_directories_are_removed() {
    if !privileged("stale_work_directories_are_removed") {
        return;
    }
    let bpffs = Bpffs::mount("stale");
    let root = bpffs.root();
    std::fs::create_dir(&root).unwrap();
    // pid_max is at most 2^22, so this loader is certainly dead.
    let stale = root.join(format!("tmp-{DATAPATH_VERSION}-{}", 1u32 << 23));
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("junk"), b"").unwrap_err(); // bpffs refuses regular files
    std::fs::create_dir(stale.join("sub")).unwrap();

    let (_, outcome) = Datapath::open_or_load(&root).unwrap();
    assert_eq!(outcome, LoadOutcome::Loaded);
    assert!(!stale.exists());
}

#[test]
fn root_outside_bpffs_is_refused() {
    // statfs only: no privilege needed.
    let tmp = TempDir::new("notbpffs").unwrap();
    let dir = tmp.join("absent");
    let result = Datapath::open_or_load(&dir.join("ferrite"));
    assert!(
        matches!(result, Err(DatapathError::NotBpffs { .. })),
        "{result:?}"
    );
    assert!(!dir.exists(), "nothing created outside bpffs");
}

/// Not a benchmark (no assertion on time): prints what each step costs here.
#[test]
fn costs() {
    if !privileged("costs") {
        return;
    }
    in_netns(|| {
        let bpffs = Bpffs::mount("costs");
        let root = bpffs.root();
        let t = Instant::now();
        let (dp, _) = Datapath::open_or_load(&root).unwrap();
        let cold = t.elapsed();

        let n = 200;
        let t = Instant::now();
        for _ in 0..n {
            Datapath::open(&root).unwrap().unwrap();
        }
        let open = t.elapsed() / n;

        let t = Instant::now();
        for i in 0..n {
            let pod = Pod::new(&format!("10.244.{}.{}", i / 250, i % 250 + 1), 100 + i, 1);
            dp.upsert_endpoint(pod.ip, &pod.endpoint()).unwrap();
        }
        let upsert = t.elapsed() / n;

        let veths = 20;
        let ifindexes = crate::attach::make_veths("cost", veths);
        let t = Instant::now();
        for ifindex in &ifindexes {
            dp.attach(*ifindex, AttachMode::Clsact).unwrap();
        }
        let attach = t.elapsed() / veths;
        let t = Instant::now();
        for ifindex in &ifindexes {
            dp.attach(*ifindex, AttachMode::Clsact).unwrap();
        }
        let reattach = t.elapsed() / veths;
        let t = Instant::now();
        for ifindex in &ifindexes {
            assert!(dp.attachment(*ifindex).unwrap().ingress);
        }
        let check = t.elapsed() / veths;

        eprintln!(
            "costs: cold open_or_load {cold:?}; open {open:?}; upsert_endpoint {upsert:?}; \
             attach (new clsact) {attach:?}; attach (replace) {reattach:?}; attachment {check:?}"
        );
    });
}

#[test]
fn the_flow_table_takes_its_size_from_the_first_load() {
    if !privileged("the_flow_table_takes_its_size_from_the_first_load") {
        return;
    }
    let bpffs = Bpffs::mount("ctsize");
    let root = bpffs.root();
    let options = ferrite_datapath::LoadOptions {
        conntrack_entries: Some(4096),
        service_conntrack_entries: Some(2048),
    };
    let (dp, outcome) = Datapath::open_or_load_with(&root, &options).unwrap();
    assert_eq!(outcome, LoadOutcome::Loaded);
    let ct = |dp: &Datapath| {
        dp.state_map_layouts()
            .unwrap()
            .into_iter()
            .find(|(n, _)| n == "ferrite_ct")
            .unwrap()
            .1
    };
    assert_eq!(ct(&dp), "9 40 16 4096 0x0");
    // Whoever opens it later gets the same table, whatever it asks for.
    let (again, outcome) = Datapath::open_or_load(&root).unwrap();
    assert_eq!(outcome, LoadOutcome::Opened);
    assert_eq!(ct(&again), "9 40 16 4096 0x0");
}
