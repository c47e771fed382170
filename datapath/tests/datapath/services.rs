//! Services in the programs (issue 14): a pod's packet to a frontend is
//! translated to a backend at from_pod and the answer back (from_pod,
//! from_uplink, to_pod), checksums stay right, affinity holds, a frontend
//! without backends answers "port unreachable", a backend reaches its own
//! Service (hairpin), a flow leaves a backend that went away, and
//! NetworkPolicy judges the backend. Both address families, TCP and UDP.

use std::net::IpAddr;

use ferrite_datapath::{
    policy::{encode, Cidr, EndpointPolicy, Peers, Ports, Rule, RuleSetRef},
    service::{Backend, Frontend, FrontendState, ServiceMaps},
    DropReason, Program, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT,
};

use crate::{
    harness::{devices, in_netns, load, privileged, Loaded, Pod},
    packet::*,
};

const UPLINK: u32 = 1;
const NODE_MAC: [u8; 6] = [0; 6];
const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xcc, 1];

struct Family {
    a: &'static str,
    b: &'static str,
    c: &'static str,
    remote_pod: &'static str,
    vip: &'static str,
    pods: (&'static str, u8),
    services: (&'static str, u8),
}

const V4: Family = Family {
    a: "10.244.1.2",
    b: "10.244.1.3",
    c: "10.244.1.4",
    remote_pod: "10.244.2.5",
    vip: "10.96.0.10",
    pods: ("10.244.0.0", 16),
    services: ("10.96.0.0", 16),
};

const V6: Family = Family {
    a: "fd00:10:244:1::2",
    b: "fd00:10:244:1::3",
    c: "fd00:10:244:1::4",
    remote_pod: "fd00:10:244:2::5",
    vip: "fd00:96::10",
    pods: ("fd00:10:244::", 48),
    services: ("fd00:96::", 108),
};

fn addr(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn families() -> [(&'static Family, u8); 2] {
    [(&V4, 0), (&V6, 10)]
}

/// The datapath as the agent leaves it: pod and Service CIDRs known.
fn node(test: &str) -> Loaded {
    let t = load(test);
    t.dp.set_cluster_cidrs(&[(addr(V4.pods.0), V4.pods.1), (addr(V6.pods.0), V6.pods.1)])
        .unwrap();
    t.dp.load_uplink().unwrap();
    t.dp.policy_maps()
        .unwrap()
        .set_service_cidrs(&[
            (addr(V4.services.0), V4.services.1),
            (addr(V6.services.0), V6.services.1),
        ])
        .unwrap();
    t
}

/// Writes a frontend with `backends` (address, port, terminating); ids
/// from `first_id` (frontend) and `first_id * 100 + i` (backends).
fn service(
    m: &ServiceMaps,
    fe: Frontend,
    first_id: u32,
    backends: &[(IpAddr, u16, bool)],
    affinity: Option<u32>,
) -> FrontendState {
    let mut active = Vec::new();
    for (i, &(addr, port, terminating)) in backends.iter().enumerate() {
        let id = first_id * 100 + i as u32;
        m.set_backend(
            id,
            &Backend {
                frontend: first_id,
                addr,
                port,
                terminating,
            },
        )
        .unwrap();
        if !terminating {
            active.push(id);
        }
    }
    let st = FrontendState {
        id: first_id,
        backends: active,
        affinity_timeout: affinity,
        source_nat: false,
    };
    m.set_frontend(&fe, &st).unwrap();
    st
}

fn fe(vip: &str, port: u16, proto: u8) -> Frontend {
    Frontend {
        addr: addr(vip),
        port,
        proto,
    }
}

/// The transport header with a correct checksum (pseudo-header included).
fn l4(src: IpAddr, dst: IpAddr, proto: u8, sport: u16, dport: u16) -> Vec<u8> {
    let h = if proto == IPPROTO_TCP {
        tcp(sport, dport)
    } else {
        udp(sport, dport)
    };
    with_checksum(src, dst, proto, h)
}

/// `h`, a transport header, with its checksum filled in.
fn with_checksum(src: IpAddr, dst: IpAddr, proto: u8, mut h: Vec<u8>) -> Vec<u8> {
    let at = if proto == IPPROTO_TCP { 16 } else { 6 };
    h[at..at + 2].copy_from_slice(&[0, 0]);
    let sum = checksum(&[pseudo(src, dst, proto, h.len()), h.clone()].concat());
    h[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    h
}

fn pseudo(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&[0, proto]);
            p.extend_from_slice(&(len as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&(len as u32).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, proto]);
        }
        _ => panic!("mixed families"),
    }
    p
}

/// A frame `from` sends (from its MAC to its host veth's).
fn sent(from: &Pod, dst: IpAddr, proto: u8, sport: u16, dport: u16) -> Vec<u8> {
    ip(
        from.mac,
        from.host_mac,
        from.ip,
        dst,
        proto,
        64,
        &l4(from.ip, dst, proto, sport, dport),
    )
}

/// What a frame says: (source, source port, destination, destination
/// port), after checking its IP and transport checksums.
fn seen(frame: &[u8]) -> (IpAddr, u16, IpAddr, u16) {
    let v6 = u16::from_be_bytes([frame[12], frame[13]]) == ETH_P_IPV6;
    let (src, dst, proto, l4): (IpAddr, IpAddr, u8, &[u8]) = if v6 {
        let s: [u8; 16] = frame[22..38].try_into().unwrap();
        let d: [u8; 16] = frame[38..54].try_into().unwrap();
        (s.into(), d.into(), frame[20], &frame[54..])
    } else {
        assert_eq!(checksum(&frame[14..34]), 0, "IPv4 header checksum");
        let s: [u8; 4] = frame[26..30].try_into().unwrap();
        let d: [u8; 4] = frame[30..34].try_into().unwrap();
        (s.into(), d.into(), frame[23], &frame[34..])
    };
    assert_eq!(
        checksum(&[pseudo(src, dst, proto, l4.len()), l4.to_vec()].concat()),
        0,
        "transport checksum of {src} -> {dst}"
    );
    let port = |i: usize| u16::from_be_bytes([l4[i], l4[i + 1]]);
    (src, port(0), dst, port(2))
}

fn run(t: &Loaded, program: Program, pkt: &[u8], ifindex: u32) -> (i32, Vec<u8>) {
    let r = t.dp.test_run(program, pkt, ifindex).unwrap();
    (r.verdict, r.packet)
}

const PROTOS: [u8; 2] = [IPPROTO_TCP, IPPROTO_UDP];

/// Same node: the client's packet reaches the backend translated (and is
/// redirected into it), the answer reaches the client from the Service's
/// address; later packets keep the backend; counters count.
#[test]
fn clusterip_translates_both_ways() {
    if !privileged("clusterip_translates_both_ways") {
        return;
    }
    in_netns(|| {
        let t = node("svcboth");
        let dev = devices(4);
        let m = t.dp.service_maps().unwrap();
        for (f, n) in families() {
            let i = usize::from(n / 10) * 2;
            let a = Pod::new(f.a, dev[i], 1 + n).add_to(&t.dp);
            let b = Pod::new(f.b, dev[i + 1], 2 + n).add_to(&t.dp);
            for (k, proto) in PROTOS.into_iter().enumerate() {
                let id = 1 + u32::from(n) + k as u32;
                service(&m, fe(f.vip, 80, proto), id, &[(b.ip, 8080, false)], None);
                let vip = addr(f.vip);
                let (v, out) = run(
                    &t,
                    Program::FromPod,
                    &sent(&a, vip, proto, 40000, 80),
                    a.ifindex,
                );
                assert_eq!(v, TC_ACT_REDIRECT, "{} proto {proto}", f.a);
                assert_eq!(seen(&out), (a.ip, 40000, b.ip, 8080), "to the backend");
                assert_eq!(&out[..6], &b.mac, "into the backend's eth0");

                let (v, out) = run(
                    &t,
                    Program::FromPod,
                    &sent(&b, a.ip, proto, 8080, 40000),
                    b.ifindex,
                );
                assert_eq!(v, TC_ACT_REDIRECT);
                assert_eq!(
                    seen(&out),
                    (vip, 80, a.ip, 40000),
                    "the answer from the Service"
                );
                assert_eq!(&out[..6], &a.mac);

                // Unrelated traffic between the pods is untouched.
                let (v, out) = run(
                    &t,
                    Program::FromPod,
                    &sent(&b, a.ip, proto, 8080, 40001),
                    b.ifindex,
                );
                assert_eq!(v, TC_ACT_REDIRECT);
                assert_eq!(seen(&out), (b.ip, 8080, a.ip, 40001));

                run(
                    &t,
                    Program::FromPod,
                    &sent(&a, vip, proto, 40000, 80),
                    a.ifindex,
                );
                let s = m.stats(id).unwrap().unwrap();
                assert_eq!((s.packets, s.flows, s.rejected), (2, 1, 0), "{id}: {s:?}");
            }
        }
    });
}

/// The backend on another node: the translated packet leaves (here the
/// test netns has no route, so the stack takes it, translated); the
/// answer comes back through from_uplink, or through the stack (to_pod),
/// and reaches the client from the Service's address either way.
#[test]
fn answers_from_another_node_are_translated_on_the_way_in() {
    if !privileged("answers_from_another_node_are_translated_on_the_way_in") {
        return;
    }
    in_netns(|| {
        let t = node("svcremote");
        let dev = devices(2);
        let m = t.dp.service_maps().unwrap();
        for (f, n) in families() {
            let a = Pod::new(f.a, dev[usize::from(n / 10)], 1 + n).add_to(&t.dp);
            let (vip, remote) = (addr(f.vip), addr(f.remote_pod));
            service(
                &m,
                fe(f.vip, 53, IPPROTO_UDP),
                1 + u32::from(n),
                &[(remote, 5353, false)],
                None,
            );
            let (v, out) = run(
                &t,
                Program::FromPod,
                &sent(&a, vip, IPPROTO_UDP, 41000, 53),
                a.ifindex,
            );
            assert_eq!(v, TC_ACT_OK, "no route in the test netns: the stack");
            assert_eq!(
                seen(&out),
                (a.ip, 41000, remote, 5353),
                "translated for the stack"
            );

            let answer = ip(
                PEER_MAC,
                NODE_MAC,
                remote,
                a.ip,
                IPPROTO_UDP,
                63,
                &l4(remote, a.ip, IPPROTO_UDP, 5353, 41000),
            );
            let (v, out) = run(&t, Program::FromUplink, &answer, UPLINK);
            assert_eq!(v, TC_ACT_REDIRECT);
            assert_eq!(seen(&out), (vip, 53, a.ip, 41000), "from_uplink");

            let (v, out) = run(&t, Program::ToPod, &answer, a.ifindex);
            assert_eq!(v, TC_ACT_OK);
            assert_eq!(seen(&out), (vip, 53, a.ip, 41000), "to_pod");
        }
    });
}

/// sessionAffinity ClientIP: every flow of a client goes to one backend;
/// without it, flows spread over both.
#[test]
fn affinity_keeps_a_client_on_one_backend() {
    if !privileged("affinity_keeps_a_client_on_one_backend") {
        return;
    }
    in_netns(|| {
        let t = node("svcaff");
        let dev = devices(6);
        let m = t.dp.service_maps().unwrap();
        for (f, n) in families() {
            let i = usize::from(n / 10) * 3;
            let a = Pod::new(f.a, dev[i], 1 + n).add_to(&t.dp);
            let b = Pod::new(f.b, dev[i + 1], 2 + n).add_to(&t.dp);
            let c = Pod::new(f.c, dev[i + 2], 3 + n).add_to(&t.dp);
            let backends = [(b.ip, 8080, false), (c.ip, 8080, false)];
            let servers = |port: u16| {
                let mut got = std::collections::BTreeSet::new();
                for sport in 42000..42040 {
                    let pkt = sent(&a, addr(f.vip), IPPROTO_TCP, sport, port);
                    let (v, out) = run(&t, Program::FromPod, &pkt, a.ifindex);
                    assert_eq!(v, TC_ACT_REDIRECT);
                    got.insert(seen(&out).2);
                }
                got
            };
            service(
                &m,
                fe(f.vip, 80, IPPROTO_TCP),
                1 + u32::from(n),
                &backends,
                None,
            );
            assert_eq!(servers(80).len(), 2, "{}: 40 flows, both backends", f.vip);
            service(
                &m,
                fe(f.vip, 81, IPPROTO_TCP),
                2 + u32::from(n),
                &backends,
                Some(10800),
            );
            assert_eq!(servers(81).len(), 1, "{}: affinity", f.vip);
        }
    });
}

/// The ICMP "port unreachable" in `out` (from `vip` to `client`): checks
/// its checksums and returns (type, code, what it quotes).
fn unreachable(out: &[u8], vip: IpAddr, client: IpAddr) -> (u8, u8, Vec<u8>) {
    if vip.is_ipv4() {
        assert_eq!(out[23], IPPROTO_ICMP);
        assert_eq!(checksum(&out[14..34]), 0, "IPv4 header checksum");
        assert_eq!(&out[26..30], &v4(vip).octets());
        assert_eq!(&out[30..34], &v4(client).octets());
        assert_eq!(checksum(&out[34..]), 0, "ICMP checksum");
        (out[34], out[35], out[42..].to_vec())
    } else {
        assert_eq!(out[20], IPPROTO_ICMPV6);
        let s: [u8; 16] = out[22..38].try_into().unwrap();
        let d: [u8; 16] = out[38..54].try_into().unwrap();
        assert_eq!((IpAddr::from(s), IpAddr::from(d)), (vip, client));
        let body = &out[54..];
        let sum = checksum(
            &[
                pseudo(vip, client, IPPROTO_ICMPV6, body.len()),
                body.to_vec(),
            ]
            .concat(),
        );
        assert_eq!(sum, 0, "ICMPv6 checksum");
        (body[0], body[1], body[8..].to_vec())
    }
}

/// A frontend without backends answers into the client, from the
/// Service's address: a TCP segment without data with a RST (seq and ack
/// as RFC 9293 says), anything else with "port unreachable" quoting it.
#[test]
fn no_backend_answers_rst_or_port_unreachable() {
    if !privileged("no_backend_answers_rst_or_port_unreachable") {
        return;
    }
    in_netns(|| {
        let t = node("svcreject");
        let dev = devices(2);
        let m = t.dp.service_maps().unwrap();
        for (f, n) in families() {
            let a = Pod::new(f.a, dev[usize::from(n / 10)], 1 + n).add_to(&t.dp);
            let vip = addr(f.vip);
            let base = 1 + u32::from(n);
            service(&m, fe(f.vip, 80, IPPROTO_TCP), base, &[], None);
            service(&m, fe(f.vip, 53, IPPROTO_UDP), base + 2, &[], None);
            let tcp_at = if n == 0 { 34 } else { 54 };
            let back = |pkt: &[u8]| {
                let (v, out) = run(&t, Program::FromPod, pkt, a.ifindex);
                assert_eq!(v, TC_ACT_REDIRECT, "back into the client");
                assert_eq!(&out[..6], &a.mac);
                assert_eq!(&out[6..12], &a.host_mac);
                out
            };

            // A SYN (seq 1, no ACK): RST|ACK, ack 2.
            let mut syn = sent(&a, vip, IPPROTO_TCP, 43000, 80);
            syn[tcp_at + 13] = 0x02;
            let sum_at = tcp_at + 16;
            syn[sum_at..sum_at + 2].copy_from_slice(&[0, 0]);
            let sum =
                checksum(&[pseudo(a.ip, vip, IPPROTO_TCP, 20), syn[tcp_at..].to_vec()].concat());
            syn[sum_at..sum_at + 2].copy_from_slice(&sum.to_be_bytes());
            let out = back(&syn);
            assert_eq!(
                seen(&out),
                (vip, 80, a.ip, 43000),
                "{}: a RST from the Service",
                f.vip
            );
            let th = &out[tcp_at..];
            assert_eq!(th[13], 0x14, "RST|ACK");
            assert_eq!(&th[4..8], &[0, 0, 0, 0], "seq 0");
            assert_eq!(&th[8..12], &[0, 0, 0, 2], "ack: the SYN's seq + 1");

            // A segment with ACK (seq 1, ack 0): RST, seq = its ack.
            let out = back(&sent(&a, vip, IPPROTO_TCP, 43001, 80));
            assert_eq!(seen(&out), (vip, 80, a.ip, 43001));
            assert_eq!(out[tcp_at + 13], 0x04, "RST");

            // UDP, and TCP carrying data: port unreachable, quoting it whole.
            let mut with_data = sent(&a, vip, IPPROTO_TCP, 43002, 80);
            with_data.extend_from_slice(b"GET /");
            let len_at = if n == 0 { 16 } else { 18 };
            let l3len = u16::from_be_bytes([with_data[len_at], with_data[len_at + 1]]) + 5;
            with_data[len_at..len_at + 2].copy_from_slice(&l3len.to_be_bytes());
            if n == 0 {
                with_data[24..26].copy_from_slice(&[0, 0]);
                let c = checksum(&with_data[14..34]);
                with_data[24..26].copy_from_slice(&c.to_be_bytes());
            }
            for pkt in [sent(&a, vip, IPPROTO_UDP, 43003, 53), with_data] {
                let out = back(&pkt);
                let (kind, code, quoted) = unreachable(&out, vip, a.ip);
                let want = if n == 0 { (3, 3) } else { (1, 4) };
                assert_eq!((kind, code), want, "port unreachable");
                assert_eq!(quoted, &pkt[14..], "quotes the packet whole");
            }
            assert_eq!(m.stats(base).unwrap().unwrap().rejected, 3);
            assert_eq!(m.stats(base + 2).unwrap().unwrap().rejected, 1);
        }
    });
}

/// A backend reaching its own Service: it sees the connection come from
/// the Service's address, and its answer goes back to itself from there.
#[test]
fn hairpin_a_backend_reaches_its_own_service() {
    if !privileged("hairpin_a_backend_reaches_its_own_service") {
        return;
    }
    in_netns(|| {
        let t = node("svchairpin");
        let dev = devices(2);
        let m = t.dp.service_maps().unwrap();
        for (f, n) in families() {
            let a = Pod::new(f.a, dev[usize::from(n / 10)], 1 + n).add_to(&t.dp);
            let vip = addr(f.vip);
            service(
                &m,
                fe(f.vip, 80, IPPROTO_TCP),
                1 + u32::from(n),
                &[(a.ip, 8080, false)],
                None,
            );
            let (v, out) = run(
                &t,
                Program::FromPod,
                &sent(&a, vip, IPPROTO_TCP, 44000, 80),
                a.ifindex,
            );
            assert_eq!(v, TC_ACT_REDIRECT, "{}: back into itself", f.a);
            assert_eq!(seen(&out), (vip, 44000, a.ip, 8080));
            let (v, out) = run(
                &t,
                Program::FromPod,
                &sent(&a, vip, IPPROTO_TCP, 8080, 44000),
                a.ifindex,
            );
            assert_eq!(v, TC_ACT_REDIRECT);
            assert_eq!(
                seen(&out),
                (vip, 80, a.ip, 44000),
                "the answer, from the Service"
            );
        }
    });
}

/// A backend that goes away: a UDP flow moves on its next packet when its
/// backend is terminating or removed; a TCP flow finishes on a
/// terminating backend and moves only when the backend is gone.
#[test]
fn flows_leave_a_backend_that_went_away() {
    if !privileged("flows_leave_a_backend_that_went_away") {
        return;
    }
    in_netns(|| {
        let t = node("svcgone");
        let dev = devices(6);
        let m = t.dp.service_maps().unwrap();
        for (f, n) in families() {
            let i = usize::from(n / 10) * 3;
            let a = Pod::new(f.a, dev[i], 1 + n).add_to(&t.dp);
            let b = Pod::new(f.b, dev[i + 1], 2 + n).add_to(&t.dp);
            let c = Pod::new(f.c, dev[i + 2], 3 + n).add_to(&t.dp);
            let vip = addr(f.vip);
            for (k, proto) in PROTOS.into_iter().enumerate() {
                let id = 1 + u32::from(n) + k as u32;
                let to_b = service(&m, fe(f.vip, 80, proto), id, &[(b.ip, 8080, false)], None);
                let pkt = sent(&a, vip, proto, 45000, 80);
                let server = || {
                    let (v, out) = run(&t, Program::FromPod, &pkt, a.ifindex);
                    assert_eq!(v, TC_ACT_REDIRECT);
                    seen(&out).2
                };
                assert_eq!(server(), b.ip);
                // C joins, B terminates (its backend id stays).
                m.set_backend(
                    id * 100 + 1,
                    &Backend {
                        frontend: id,
                        addr: c.ip,
                        port: 8080,
                        terminating: false,
                    },
                )
                .unwrap();
                m.set_frontend(
                    &fe(f.vip, 80, proto),
                    &FrontendState {
                        backends: vec![id * 100 + 1],
                        ..to_b.clone()
                    },
                )
                .unwrap();
                m.set_backend(
                    id * 100,
                    &Backend {
                        frontend: id,
                        addr: b.ip,
                        port: 8080,
                        terminating: true,
                    },
                )
                .unwrap();
                let want = if proto == IPPROTO_TCP { b.ip } else { c.ip };
                assert_eq!(server(), want, "proto {proto}: terminating");
                m.remove_backend(id * 100).unwrap();
                assert_eq!(server(), c.ip, "proto {proto}: gone");
            }
        }
    });
}

/// NetworkPolicy judges the backend: its ingress rules see the client's
/// address and the backend's port, and a refused flow is counted there.
#[test]
fn policy_judges_the_backend_after_translation() {
    if !privileged("policy_judges_the_backend_after_translation") {
        return;
    }
    in_netns(|| {
        let t = node("svcpolicy");
        let dev = devices(6);
        let m = t.dp.service_maps().unwrap();
        let pm = t.dp.policy_maps().unwrap();
        for (f, n) in families() {
            let i = usize::from(n / 10) * 3;
            let a = Pod::new(f.a, dev[i], 1 + n).add_to(&t.dp);
            let b = Pod::new(f.b, dev[i + 1], 2 + n).add_to(&t.dp);
            let c = Pod::new(f.c, dev[i + 2], 3 + n).add_to(&t.dp);
            // B admits A on 8080 (the backend's port), nobody else.
            let rules = [Rule {
                peers: Peers::Some(vec![Cidr::host(a.ip)]),
                ports: Ports::Some(vec![ferrite_datapath::policy::PortRange {
                    proto: IPPROTO_TCP,
                    first: 8080,
                    last: 8080,
                }]),
            }];
            let enc = encode(&rules).unwrap();
            let set = 10 + u32::from(n);
            pm.write_rule_set(set, &enc).unwrap();
            pm.set_endpoint(
                b.ifindex,
                &EndpointPolicy {
                    ingress: Some(RuleSetRef {
                        id: set,
                        words: enc.words,
                    }),
                    egress: None,
                    pending: false,
                },
            )
            .unwrap();
            service(
                &m,
                fe(f.vip, 80, IPPROTO_TCP),
                1 + u32::from(n),
                &[(b.ip, 8080, false)],
                None,
            );
            let vip = addr(f.vip);
            let (v, _) = run(
                &t,
                Program::FromPod,
                &sent(&a, vip, IPPROTO_TCP, 46000, 80),
                a.ifindex,
            );
            assert_eq!(v, TC_ACT_REDIRECT, "{}: A is admitted", f.b);
            let (v, _) = run(
                &t,
                Program::FromPod,
                &sent(&b, a.ip, IPPROTO_TCP, 8080, 46000),
                b.ifindex,
            );
            assert_eq!(v, TC_ACT_REDIRECT, "the answer passes as an answer");
            let (v, _) = run(
                &t,
                Program::FromPod,
                &sent(&c, vip, IPPROTO_TCP, 46001, 80),
                c.ifindex,
            );
            assert_eq!(v, TC_ACT_SHOT, "C is not");
            let st = t.dp.stats(b.ifindex).unwrap().unwrap();
            assert_eq!(
                st.dropped(DropReason::PolicyIngress),
                1,
                "counted at the backend"
            );
        }
    });
}

/// NodePorts (kube-proxy not running): a client outside reaches a backend
/// on this node with its address kept, and the answer leaves from the
/// NodePort; to another node's backend (externalTrafficPolicy Cluster) the
/// flow takes this node's address and the client's port, and that
/// backend's answer goes back to the client from the NodePort; a NodePort
/// without backends answers with a RST. The test netns has no route out,
/// so what leaves by the FIB is dropped here (the packet is checked).
#[test]
fn nodeports_from_outside() {
    if !privileged("nodeports_from_outside") {
        return;
    }
    in_netns(|| {
        let t = node("svcnodeport");
        let dev = devices(2);
        let m = t.dp.service_maps().unwrap();
        m.set_node_frontends(true, false).unwrap();
        assert!(m.nodeports().unwrap());
        let (node_v4, node_v6) = (addr("172.20.0.11"), addr("fd00:20::11"));
        t.dp.policy_maps()
            .unwrap()
            .set_host_addresses(&[node_v4, node_v6])
            .unwrap();
        for (f, n) in families() {
            let (node_ip, outside, any) = if n == 0 {
                (node_v4, addr("192.0.2.7"), addr("0.0.0.0"))
            } else {
                (node_v6, addr("2001:db8::7"), addr("::"))
            };
            let b = Pod::new(f.b, dev[usize::from(n / 10)], 2 + n).add_to(&t.dp);
            let remote = addr(f.remote_pod);
            let base = 1 + u32::from(n) * 10;
            let np = |m: &ServiceMaps, port: u16, id: u32, backends: &[(IpAddr, u16, bool)]| {
                let st = service(
                    m,
                    fe(&any.to_string(), port, IPPROTO_TCP),
                    id,
                    backends,
                    None,
                );
                m.set_frontend(
                    &fe(&any.to_string(), port, IPPROTO_TCP),
                    &FrontendState {
                        source_nat: true,
                        ..st
                    },
                )
                .unwrap();
            };
            np(&m, 30080, base, &[(b.ip, 8080, false)]);
            np(&m, 30081, base + 1, &[(remote, 8080, false)]);
            np(&m, 30082, base + 2, &[]);
            let from_outside = |port: u16, sport: u16| {
                ip(
                    PEER_MAC,
                    NODE_MAC,
                    outside,
                    node_ip,
                    IPPROTO_TCP,
                    63,
                    &l4(outside, node_ip, IPPROTO_TCP, sport, port),
                )
            };

            // A backend here: into it, the client's address kept.
            let (v, out) = run(&t, Program::FromUplink, &from_outside(30080, 40000), UPLINK);
            assert_eq!(v, TC_ACT_REDIRECT, "{}: into the backend", f.b);
            assert_eq!(seen(&out), (outside, 40000, b.ip, 8080));
            let (_, out) = run(
                &t,
                Program::FromPod,
                &sent(&b, outside, IPPROTO_TCP, 8080, 40000),
                b.ifindex,
            );
            assert_eq!(
                seen(&out),
                (node_ip, 30080, outside, 40000),
                "the answer leaves from the NodePort"
            );

            // Another node's backend: from this node's address.
            let (_, out) = run(&t, Program::FromUplink, &from_outside(30081, 40001), UPLINK);
            assert_eq!(
                seen(&out),
                (node_ip, 40001, remote, 8080),
                "source translated, the client's port kept"
            );
            let answer = ip(
                PEER_MAC,
                NODE_MAC,
                remote,
                node_ip,
                IPPROTO_TCP,
                63,
                &l4(remote, node_ip, IPPROTO_TCP, 8080, 40001),
            );
            let (_, out) = run(&t, Program::FromUplink, &answer, UPLINK);
            assert_eq!(
                seen(&out),
                (node_ip, 30081, outside, 40001),
                "back to the client"
            );
            // Another client on the same port: another source port.
            let other = if n == 0 {
                addr("192.0.2.8")
            } else {
                addr("2001:db8::8")
            };
            let pkt = ip(
                PEER_MAC,
                NODE_MAC,
                other,
                node_ip,
                IPPROTO_TCP,
                63,
                &l4(other, node_ip, IPPROTO_TCP, 40001, 30081),
            );
            let (_, out) = run(&t, Program::FromUplink, &pkt, UPLINK);
            let (s, sport, d, _) = seen(&out);
            assert_eq!((s, d), (node_ip, remote));
            assert_ne!(sport, 40001, "the port is taken by the first client's flow");

            // No backend: a RST from the NodePort, back out of the uplink.
            let mut syn = from_outside(30082, 40002);
            let tcp_at = if n == 0 { 34 } else { 54 };
            syn[tcp_at + 13] = 0x02;
            syn[tcp_at + 16..tcp_at + 18].copy_from_slice(&[0, 0]);
            let sum = checksum(
                &[
                    pseudo(outside, node_ip, IPPROTO_TCP, 20),
                    syn[tcp_at..].to_vec(),
                ]
                .concat(),
            );
            syn[tcp_at + 16..tcp_at + 18].copy_from_slice(&sum.to_be_bytes());
            let (v, out) = run(&t, Program::FromUplink, &syn, UPLINK);
            assert_eq!(v, TC_ACT_REDIRECT);
            assert_eq!(seen(&out), (node_ip, 30082, outside, 40002));
            assert_eq!(out[tcp_at + 13], 0x14, "RST|ACK");
            assert_eq!(&out[..6], &PEER_MAC, "back to the sender");

            // Without NodePorts switched on, the stack gets it all.
            m.set_node_frontends(false, false).unwrap();
            let (v, _) = run(&t, Program::FromUplink, &from_outside(30080, 40003), UPLINK);
            assert_eq!(v, -1, "TC_ACT_UNSPEC: kube-proxy's");
            m.set_node_frontends(true, false).unwrap();
        }
    });
}

/// A flow the host stack carried before (kube-proxy's, before Services
/// were switched on) with the same ends as a new Service flow: the new
/// flow is ferrite's, so its answers are redirected and translated rather
/// than handed to the stack, whose conntrack would find them INVALID.
#[test]
fn a_new_service_flow_is_not_taken_for_an_old_stack_flow() {
    if !privileged("a_new_service_flow_is_not_taken_for_an_old_stack_flow") {
        return;
    }
    in_netns(|| {
        let t = node("svcstale");
        let dev = devices(2);
        let m = t.dp.service_maps().unwrap();
        for (f, n) in families() {
            let a = Pod::new(f.a, dev[usize::from(n / 10)], 1 + n).add_to(&t.dp);
            let (vip, remote) = (addr(f.vip), addr(f.remote_pod));
            // kube-proxy's time: the stack sent a -> the backend.
            let before = t.dp.stack_flows().unwrap();
            let out = ip(
                a.mac,
                a.host_mac,
                a.ip,
                remote,
                IPPROTO_TCP,
                63,
                &l4(a.ip, remote, IPPROTO_TCP, 41000, 8080),
            );
            assert_eq!(run(&t, Program::ToUplink, &out, UPLINK).0, -1);
            assert_eq!(t.dp.stack_flows().unwrap(), before + 1, "{}: recorded", f.a);
            let answer = ip(
                PEER_MAC,
                NODE_MAC,
                remote,
                a.ip,
                IPPROTO_TCP,
                63,
                &l4(remote, a.ip, IPPROTO_TCP, 8080, 41000),
            );
            assert_eq!(
                run(&t, Program::FromUplink, &answer, UPLINK).0,
                -1,
                "the stack's answer"
            );

            // Services on: the same ends, now through the ClusterIP.
            service(
                &m,
                fe(f.vip, 80, IPPROTO_TCP),
                1 + u32::from(n),
                &[(remote, 8080, false)],
                None,
            );
            let (_, sent_out) = run(
                &t,
                Program::FromPod,
                &sent(&a, vip, IPPROTO_TCP, 41000, 80),
                a.ifindex,
            );
            assert_eq!(seen(&sent_out), (a.ip, 41000, remote, 8080));
            let (v, back) = run(&t, Program::FromUplink, &answer, UPLINK);
            assert_eq!(v, TC_ACT_REDIRECT, "{}: ferrite's answer, redirected", f.a);
            assert_eq!(seen(&back), (vip, 80, a.ip, 41000));
        }
    });
}

/// A TCP frame `from` sends with these flags (SYN 0x02, SYN-ACK 0x12).
fn sent_tcp(from: &Pod, dst: IpAddr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut h = tcp(sport, dport);
    h[13] = flags;
    let h = with_checksum(from.ip, dst, IPPROTO_TCP, h);
    ip(from.mac, from.host_mac, from.ip, dst, IPPROTO_TCP, 64, &h)
}

/// A client reuses a port of a connection that went through a Service,
/// now to the backend's own address: the new connection's answers arrive
/// as they were sent, not rewritten to the Service's address (where the
/// client's socket would drop them), and a later connection through the
/// Service on that port is translated both ways again.
#[test]
fn a_reused_client_port_to_the_backend_itself_is_not_translated() {
    if !privileged("a_reused_client_port_to_the_backend_itself_is_not_translated") {
        return;
    }
    in_netns(|| {
        let t = node("svcreuse");
        let dev = devices(4);
        let m = t.dp.service_maps().unwrap();
        for (f, n) in families() {
            let i = usize::from(n / 10) * 2;
            let a = Pod::new(f.a, dev[i], 1 + n).add_to(&t.dp);
            let b = Pod::new(f.b, dev[i + 1], 2 + n).add_to(&t.dp);
            let vip = addr(f.vip);
            service(
                &m,
                fe(f.vip, 80, IPPROTO_TCP),
                1 + u32::from(n),
                &[(b.ip, 8080, false)],
                None,
            );
            let through_service = |what: &str| {
                let (_, out) = run(
                    &t,
                    Program::FromPod,
                    &sent_tcp(&a, vip, 40000, 80, 0x02),
                    a.ifindex,
                );
                assert_eq!(
                    seen(&out),
                    (a.ip, 40000, b.ip, 8080),
                    "{what}: to the backend"
                );
                let (_, out) = run(
                    &t,
                    Program::FromPod,
                    &sent_tcp(&b, a.ip, 8080, 40000, 0x12),
                    b.ifindex,
                );
                assert_eq!(
                    seen(&out),
                    (vip, 80, a.ip, 40000),
                    "{what}: the answer from the Service"
                );
            };
            through_service("first connection");

            // The same client port, to the backend's own address.
            let (v, out) = run(
                &t,
                Program::FromPod,
                &sent_tcp(&a, b.ip, 40000, 8080, 0x02),
                a.ifindex,
            );
            assert_eq!(v, TC_ACT_REDIRECT);
            assert_eq!(seen(&out), (a.ip, 40000, b.ip, 8080), "direct: as sent");
            let (v, out) = run(
                &t,
                Program::FromPod,
                &sent_tcp(&b, a.ip, 8080, 40000, 0x12),
                b.ifindex,
            );
            assert_eq!(v, TC_ACT_REDIRECT);
            assert_eq!(
                seen(&out),
                (b.ip, 8080, a.ip, 40000),
                "direct: the answer as the backend sent it"
            );

            through_service("a later connection through the Service");
        }
    });
}

/// A frame from outside to this node's `node_ip`.
fn to_node(src: IpAddr, node_ip: IpAddr, proto: u8, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let h = if proto == IPPROTO_TCP {
        let mut h = tcp(sport, dport);
        h[13] = flags;
        h
    } else {
        udp(sport, dport)
    };
    let h = with_checksum(src, node_ip, proto, h);
    ip(PEER_MAC, NODE_MAC, src, node_ip, proto, 63, &h)
}

/// hostPorts (runtimeConfig.portMappings, written by ADD): from outside
/// and from a pod on the node, a connection to the node's address and the
/// hostPort goes into the pod and its answers come from the hostPort; a
/// hostIP's own entry comes before the one of every address; the answers
/// to the node's own connections and datagrams on that port stay the
/// node's (a TCP segment opens a flow only with SYN, a datagram only when
/// no socket of the node has the port); a removed hostPort, or a node that
/// does not serve them, leaves everything to the stack.
#[test]
fn host_ports_from_outside_and_from_pods() {
    if !privileged("host_ports_from_outside_and_from_pods") {
        return;
    }
    in_netns(|| {
        use ferrite_datapath::service::HostPort;
        let t = node("svchostport");
        let dev = devices(4);
        let m = t.dp.service_maps().unwrap();
        let uplink = |pkt: &[u8]| run(&t, Program::FromUplink, pkt, UPLINK);
        m.set_node_frontends(false, true).unwrap();
        assert!(m.hostports().unwrap() && !m.nodeports().unwrap());
        let (node_v4, node_v6) = (addr("172.20.0.11"), addr("fd00:20::11"));
        t.dp.policy_maps()
            .unwrap()
            .set_host_addresses(&[node_v4, node_v6])
            .unwrap();
        for (f, n) in families() {
            let i = usize::from(n / 10) * 2;
            let a = Pod::new(f.a, dev[i], 1 + n).add_to(&t.dp);
            // As ADD flags a pod it writes hostPorts for.
            let b = Pod::new(f.b, dev[i + 1], 2 + n);
            t.dp.upsert_endpoint(
                b.ip,
                &ferrite_datapath::Endpoint {
                    flags: ferrite_datapath::ENDPOINT_F_HOSTPORT,
                    ..b.endpoint()
                },
            )
            .unwrap();
            let (node_ip, outside, any) = if n == 0 {
                (node_v4, addr("192.0.2.7"), addr("0.0.0.0"))
            } else {
                (node_v6, addr("2001:db8::7"), addr("::"))
            };
            let hp = |host: IpAddr, port: u16, proto: u8, to: u16| HostPort {
                frontend: Frontend {
                    addr: host,
                    port,
                    proto,
                },
                backend: b.ip,
                backend_port: to,
            };
            let every = hp(any, 54321, IPPROTO_TCP, 8080);
            let id = m.add_hostport(&every).unwrap();
            assert!(id >= ferrite_datapath::service::HOSTPORT_ID_MIN);
            assert!(m
                .add_hostport(&hp(node_ip, 54322, IPPROTO_TCP, 8081))
                .is_ok());
            assert!(m.add_hostport(&hp(any, 54322, IPPROTO_TCP, 8082)).is_ok());
            m.add_hostport(&hp(any, 5353, IPPROTO_UDP, 53)).unwrap();
            // The agent's view leaves them out.
            assert!(m.frontends().unwrap().is_empty());
            assert!(m.backends().unwrap().is_empty());
            assert_eq!(
                m.host_ports()
                    .unwrap()
                    .iter()
                    .filter(|(h, _)| h.backend == b.ip)
                    .count(),
                4
            );

            // From outside: into the pod, the answer from the hostPort.
            let syn = to_node(outside, node_ip, IPPROTO_TCP, 40000, 54321, 0x02);
            let (v, out) = uplink(&syn);
            assert_eq!(v, TC_ACT_REDIRECT, "{}: into the pod", f.b);
            assert_eq!(seen(&out), (outside, 40000, b.ip, 8080));
            let (_, out) = run(
                &t,
                Program::FromPod,
                &sent_tcp(&b, outside, 8080, 40000, 0x12),
                b.ifindex,
            );
            assert_eq!(
                seen(&out),
                (node_ip, 54321, outside, 40000),
                "from the hostPort"
            );
            // Later segments of that flow follow it.
            let ack = to_node(outside, node_ip, IPPROTO_TCP, 40000, 54321, 0x10);
            let (_, out) = uplink(&ack);
            assert_eq!(seen(&out), (outside, 40000, b.ip, 8080));

            // The node's own connection from port 54321: its answers stay.
            let answer = to_node(outside, node_ip, IPPROTO_TCP, 443, 54321, 0x12);
            let (v, out) = uplink(&answer);
            assert_eq!(v, -1, "TC_ACT_UNSPEC: the node's own");
            assert_eq!(seen(&out), (outside, 443, node_ip, 54321));

            // The hostIP's own entry first.
            let (_, out) = uplink(&to_node(outside, node_ip, IPPROTO_TCP, 40001, 54322, 0x02));
            assert_eq!(seen(&out), (outside, 40001, b.ip, 8081));

            // From a pod on the node.
            let (v, out) = run(
                &t,
                Program::FromPod,
                &sent_tcp(&a, node_ip, 40002, 54321, 0x02),
                a.ifindex,
            );
            assert_eq!(v, TC_ACT_REDIRECT);
            assert_eq!(seen(&out), (a.ip, 40002, b.ip, 8080));
            let (_, out) = run(
                &t,
                Program::FromPod,
                &sent_tcp(&b, a.ip, 8080, 40002, 0x12),
                b.ifindex,
            );
            assert_eq!(seen(&out), (node_ip, 54321, a.ip, 40002));

            // UDP: translated, unless a socket of the node has the port.
            let dgram = to_node(outside, node_ip, IPPROTO_UDP, 40003, 5353, 0);
            let (_, out) = uplink(&dgram);
            assert_eq!(seen(&out), (outside, 40003, b.ip, 53));
            let bound = std::net::UdpSocket::bind((any, 5353)).unwrap();
            let dgram = to_node(outside, node_ip, IPPROTO_UDP, 40004, 5353, 0);
            let (v, out) = uplink(&dgram);
            assert_eq!(v, -1, "the node's socket on 5353 keeps it");
            assert_eq!(seen(&out), (outside, 40004, node_ip, 5353));
            drop(bound);

            // Removed: only by the pod it points at.
            let other = HostPort {
                backend: a.ip,
                ..every
            };
            assert!(!m.remove_hostport(&other).unwrap());
            assert!(m.remove_hostport(&every).unwrap());
            let (v, _) = uplink(&to_node(outside, node_ip, IPPROTO_TCP, 40005, 54321, 0x02));
            assert_eq!(v, -1, "removed: the stack's");

            // A node that does not serve hostPorts: the stack's.
            m.set_node_frontends(false, false).unwrap();
            let (v, _) = uplink(&to_node(outside, node_ip, IPPROTO_TCP, 40006, 54322, 0x02));
            assert_eq!(v, -1, "not served: the stack's");
            m.set_node_frontends(false, true).unwrap();
        }
    });
}
