//! The endpoint map and stats as user space sees them.

use ferrite_datapath::{Endpoint, Program, TC_ACT_REDIRECT};

use crate::{
    harness::{in_netns, load, privileged, Pod},
    packet::*,
};

#[test]
fn endpoints_round_trip_and_remove_is_idempotent() {
    if !privileged("endpoints_round_trip_and_remove_is_idempotent") {
        return;
    }
    let t = load("endpoints");
    let a = Pod::new("10.244.1.2", 11, 1).add_to(&t.dp);
    let b = Pod::new("fd00::2", 12, 2).add_to(&t.dp);

    assert_eq!(t.dp.endpoint(a.ip).unwrap(), Some(a.endpoint()));
    assert_eq!(t.dp.endpoint(b.ip).unwrap(), Some(b.endpoint()));
    let mut all = t.dp.endpoints().unwrap();
    all.sort_by_key(|(_, ep)| ep.ifindex);
    assert_eq!(all, vec![(a.ip, a.endpoint()), (b.ip, b.endpoint())]);

    let stats =
        t.dp.stats(a.ifindex)
            .unwrap()
            .expect("zeroed stats entry created");
    assert_eq!(stats.from_pod_packets, 0);
    assert!(stats.drops.iter().all(|(_, n)| *n == 0));

    // Re-adding updates the value.
    let moved = Endpoint {
        flags: 0,
        ..a.endpoint()
    };
    t.dp.upsert_endpoint(a.ip, &moved).unwrap();

    // A late DEL for an address now owned by another veth leaves it alone.
    t.dp.remove_endpoint(a.ip, 99).unwrap();
    assert!(t.dp.endpoint(a.ip).unwrap().is_some());

    for _ in 0..2 {
        t.dp.remove_endpoint(a.ip, a.ifindex).unwrap();
    }
    assert_eq!(t.dp.endpoint(a.ip).unwrap(), None);
    assert_eq!(t.dp.stats(a.ifindex).unwrap(), None);
    assert_eq!(t.dp.endpoints().unwrap(), vec![(b.ip, b.endpoint())]);
}

#[test]
fn re_adding_an_endpoint_keeps_its_counters() {
    if !privileged("re_adding_an_endpoint_keeps_its_counters") {
        return;
    }
    in_netns(|| {
        let t = load("keepstats");
        let a = Pod::new("10.244.1.2", 1, 1).add_to(&t.dp);
        let b = Pod::new("10.244.1.3", 42, 2).add_to(&t.dp);
        let pkt = ip(a.mac, a.host_mac, a.ip, b.ip, IPPROTO_UDP, 64, &udp(1, 2));
        assert_eq!(
            t.dp.test_run(Program::FromPod, &pkt, 1).unwrap().verdict,
            TC_ACT_REDIRECT
        );
        a.add_to(&t.dp);
        assert_eq!(t.dp.stats(1).unwrap().unwrap().redirected_packets, 1);
    });
}
