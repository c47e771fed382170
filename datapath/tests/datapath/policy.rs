//! NetworkPolicy in the programs (issue 13): rule sets judge a flow's first
//! packet on every path into and out of a pod, connection tracking lets its
//! later packets and answers through, ICMP errors and fragments follow
//! their flow, a pending endpoint passes nothing, and a flow evicted from
//! the table is judged again. Both address families.

use std::{
    net::IpAddr,
    sync::atomic::{AtomicU32, Ordering},
};

use ferrite_datapath::{
    policy::{encode, Cidr, EndpointPolicy, Peers, PortRange, Ports, Rule, RuleSetRef},
    DropReason, Program, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT,
};

use crate::{
    harness::{devices, in_netns, load, privileged, Loaded, Pod},
    packet::*,
};

/// TC_ACT_UNSPEC: the uplink programs pass a packet on.
const PASS: i32 = -1;
const UPLINK: u32 = 1;
const NODE_MAC: [u8; 6] = [0; 6];
const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xcc, 1];

struct Family {
    a: &'static str,
    b: &'static str,
    c: &'static str,
    remote_pod: &'static str,
    remote_net: (&'static str, u8),
    node: &'static str,
    outside: &'static str,
    service: &'static str,
    pods: (&'static str, u8),
}

const V4: Family = Family {
    a: "10.244.1.2",
    b: "10.244.1.3",
    c: "10.244.1.4",
    remote_pod: "10.244.2.5",
    remote_net: ("10.244.2.0", 24),
    node: "172.20.0.11",
    outside: "192.0.2.7",
    service: "10.96.0.10",
    pods: ("10.244.0.0", 16),
};

const V6: Family = Family {
    a: "fd00:10:244:1::2",
    b: "fd00:10:244:1::3",
    c: "fd00:10:244:1::4",
    remote_pod: "fd00:10:244:2::5",
    remote_net: ("fd00:10:244:2::", 64),
    node: "fd00:20::11",
    outside: "2001:db8::7",
    service: "fd00:96::10",
    pods: ("fd00:10:244::", 48),
};

fn addr(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The datapath as the agent leaves it: pod CIDRs, Service CIDRs and the
/// node's address known, the uplink programs loaded.
fn node(test: &str) -> Loaded {
    let t = load(test);
    t.dp.set_cluster_cidrs(&[(addr(V4.pods.0), V4.pods.1), (addr(V6.pods.0), V6.pods.1)])
        .unwrap();
    t.dp.load_uplink().unwrap();
    let pm = t.dp.policy_maps().unwrap();
    pm.set_service_cidrs(&[(addr("10.96.0.0"), 16), (addr("fd00:96::"), 108)])
        .unwrap();
    pm.set_host_addresses(&[addr(V4.node), addr(V6.node)])
        .unwrap();
    t
}

static NEXT_SET: AtomicU32 = AtomicU32::new(1);

/// Writes `rules` as a new rule set.
fn rule_set(t: &Loaded, rules: &[Rule]) -> RuleSetRef {
    let enc = encode(rules).unwrap();
    let id = NEXT_SET.fetch_add(1, Ordering::Relaxed);
    t.dp.policy_maps()
        .unwrap()
        .write_rule_set(id, &enc)
        .unwrap();
    RuleSetRef {
        id,
        words: enc.words,
    }
}

/// Isolates `pod` in the directions given (Some), with those rules.
fn isolate(t: &Loaded, pod: &Pod, ingress: Option<&[Rule]>, egress: Option<&[Rule]>) {
    let p = EndpointPolicy {
        ingress: ingress.map(|r| rule_set(t, r)),
        egress: egress.map(|r| rule_set(t, r)),
        pending: false,
    };
    t.dp.policy_maps()
        .unwrap()
        .set_endpoint(pod.ifindex, &p)
        .unwrap();
}

const IPPROTO_SCTP: u8 = 132;

fn tcp_port(port: u16) -> Ports {
    Ports::Some(vec![PortRange {
        proto: IPPROTO_TCP,
        first: port,
        last: port,
    }])
}

fn udp_port(port: u16) -> Ports {
    Ports::Some(vec![PortRange {
        proto: IPPROTO_UDP,
        first: port,
        last: port,
    }])
}

fn from(peers: &[&str], ports: Ports) -> Rule {
    Rule {
        peers: Peers::Some(peers.iter().map(|p| Cidr::host(addr(p))).collect()),
        ports,
    }
}

fn block(net: (&str, u8), except: &[(&str, u8)], ports: Ports) -> Rule {
    Rule {
        peers: Peers::Some(vec![Cidr {
            addr: addr(net.0),
            prefix: net.1,
            except: except.iter().map(|&(a, p)| (addr(a), p)).collect(),
        }]),
        ports,
    }
}

/// A frame `from` sends out of its eth0.
fn sent(from: &Pod, dst: IpAddr, proto: u8, l4: &[u8]) -> Vec<u8> {
    ip(from.mac, from.host_mac, from.ip, dst, proto, 64, l4)
}

fn run(t: &Loaded, program: Program, pkt: &[u8], ifindex: u32) -> i32 {
    t.dp.test_run(program, pkt, ifindex).unwrap().verdict
}

fn dropped(t: &Loaded, pod: &Pod, reason: DropReason) -> u64 {
    t.dp.stats(pod.ifindex).unwrap().unwrap().dropped(reason)
}

fn families() -> [(&'static Family, u8); 2] {
    [(&V4, 0), (&V6, 10)]
}

/// Same node: the destination's ingress rules are judged before the
/// redirect (which skips its hooks), port and protocol and peer each
/// matter, and the answers pass as answers.
#[test]
fn ingress_rules_judge_a_flows_first_packet() {
    if !privileged("ingress_rules_judge_a_flows_first_packet") {
        return;
    }
    in_netns(|| {
        let t = node("polingress");
        let dev = devices(6);
        for (f, n) in families() {
            let i = usize::from(n / 10) * 3;
            let a = Pod::new(f.a, dev[i], 1 + n).add_to(&t.dp);
            let b = Pod::new(f.b, dev[i + 1], 2 + n).add_to(&t.dp);
            let c = Pod::new(f.c, dev[i + 2], 3 + n).add_to(&t.dp);
            isolate(&t, &b, Some(&[from(&[f.a], tcp_port(8080))]), None);

            let syn = sent(&a, b.ip, IPPROTO_TCP, &tcp(40000, 8080));
            assert_eq!(
                run(&t, Program::FromPod, &syn, a.ifindex),
                TC_ACT_REDIRECT,
                "{}: allowed",
                f.a
            );
            let answer = sent(&b, a.ip, IPPROTO_TCP, &tcp(8080, 40000));
            assert_eq!(
                run(&t, Program::FromPod, &answer, b.ifindex),
                TC_ACT_REDIRECT,
                "{}: the answer",
                f.b
            );
            // Again, now from connection tracking.
            assert_eq!(run(&t, Program::FromPod, &syn, a.ifindex), TC_ACT_REDIRECT);

            for (what, pkt, sender) in [
                (
                    "another port",
                    sent(&a, b.ip, IPPROTO_TCP, &tcp(40001, 8081)),
                    &a,
                ),
                (
                    "another protocol",
                    sent(&a, b.ip, IPPROTO_UDP, &udp(40002, 8080)),
                    &a,
                ),
                (
                    "another peer",
                    sent(&c, b.ip, IPPROTO_TCP, &tcp(40003, 8080)),
                    &c,
                ),
                (
                    "ping",
                    sent(
                        &a,
                        b.ip,
                        if n == 0 { IPPROTO_ICMP } else { IPPROTO_ICMPV6 },
                        &icmp_echo(if n == 0 { 8 } else { 128 }, 7, 1),
                    ),
                    &a,
                ),
            ] {
                assert_eq!(
                    run(&t, Program::FromPod, &pkt, sender.ifindex),
                    TC_ACT_SHOT,
                    "{}: {what}",
                    f.b
                );
            }
            assert_eq!(
                dropped(&t, &b, DropReason::PolicyIngress),
                4,
                "counted at the destination"
            );
            assert_eq!(dropped(&t, &a, DropReason::PolicyIngress), 0);

            // B is not isolated for egress: what it starts goes anywhere,
            // and C (no policy at all) is untouched.
            let out = sent(&b, c.ip, IPPROTO_UDP, &udp(5353, 53));
            assert_eq!(run(&t, Program::FromPod, &out, b.ifindex), TC_ACT_REDIRECT);
            let free = sent(&c, a.ip, IPPROTO_TCP, &tcp(1, 2));
            assert_eq!(run(&t, Program::FromPod, &free, c.ifindex), TC_ACT_REDIRECT);

            // SCTP ports are read like TCP's and UDP's (its common header
            // starts with both ports).
            let sctp = Ports::Some(vec![PortRange {
                proto: IPPROTO_SCTP,
                first: 9000,
                last: 9000,
            }]);
            isolate(&t, &b, Some(&[from(&[f.a], sctp)]), None);
            let init = sent(&a, b.ip, IPPROTO_SCTP, &udp(40010, 9000));
            assert_eq!(run(&t, Program::FromPod, &init, a.ifindex), TC_ACT_REDIRECT);
            let other = sent(&a, b.ip, IPPROTO_SCTP, &udp(40011, 9001));
            assert_eq!(run(&t, Program::FromPod, &other, a.ifindex), TC_ACT_SHOT);
        }
    });
}

/// Egress rules with an ipBlock and its except; a Service address waits
/// for the stack's DNAT (to_pod, to_uplink judge the real destination);
/// the node itself is always reachable.
#[test]
fn egress_rules_and_ip_blocks() {
    if !privileged("egress_rules_and_ip_blocks") {
        return;
    }
    in_netns(|| {
        let t = node("polegress");
        let dev = devices(6);
        for (f, n) in families() {
            let i = usize::from(n / 10) * 3;
            let a = Pod::new(f.a, dev[i], 1 + n).add_to(&t.dp);
            let b = Pod::new(f.b, dev[i + 1], 2 + n).add_to(&t.dp);
            let c = Pod::new(f.c, dev[i + 2], 3 + n).add_to(&t.dp);
            let host_len = if n == 0 { 32 } else { 128 };
            isolate(
                &t,
                &a,
                None,
                Some(&[block(f.pods, &[(f.b, host_len)], Ports::All)]),
            );

            let to =
                |dst: &str, port: u16| sent(&a, addr(dst), IPPROTO_TCP, &tcp(41000 + port, port));
            assert_eq!(
                run(&t, Program::FromPod, &to(f.c, 80), a.ifindex),
                TC_ACT_REDIRECT,
                "{}: inside the block",
                f.c
            );
            assert_eq!(
                run(&t, Program::FromPod, &to(f.b, 80), a.ifindex),
                TC_ACT_SHOT,
                "{}: the except",
                f.b
            );
            assert_eq!(
                run(&t, Program::FromPod, &to(f.outside, 80), a.ifindex),
                TC_ACT_SHOT,
                "outside the block"
            );
            // Another node's pod: allowed; the FIB of a test netns has no
            // route, so the stack takes it.
            assert_eq!(
                run(&t, Program::FromPod, &to(f.remote_pod, 80), a.ifindex),
                TC_ACT_OK
            );
            assert_eq!(
                run(&t, Program::FromPod, &to(f.node, 10250), a.ifindex),
                TC_ACT_OK,
                "the node"
            );
            assert_eq!(dropped(&t, &a, DropReason::PolicyEgress), 2);

            // To a Service address: the stack's DNAT first. Translated to
            // B (the except), to_pod refuses it on A's behalf; to C passes.
            assert_eq!(
                run(&t, Program::FromPod, &to(f.service, 53), a.ifindex),
                TC_ACT_OK
            );
            let dnat_b = ip(
                NODE_MAC,
                b.mac,
                a.ip,
                b.ip,
                IPPROTO_TCP,
                63,
                &tcp(41053, 53),
            );
            assert_eq!(
                run(&t, Program::ToPod, &dnat_b, b.ifindex),
                TC_ACT_SHOT,
                "{}: after DNAT",
                f.b
            );
            assert_eq!(
                dropped(&t, &a, DropReason::PolicyEgress),
                3,
                "counted at the sender"
            );
            let dnat_c = ip(
                NODE_MAC,
                c.mac,
                a.ip,
                c.ip,
                IPPROTO_TCP,
                63,
                &tcp(41053, 53),
            );
            assert_eq!(run(&t, Program::ToPod, &dnat_c, c.ifindex), TC_ACT_OK);
            // ... and the answer, un-NATed by the stack, reaches A.
            let back = ip(
                NODE_MAC,
                a.mac,
                addr(f.service),
                a.ip,
                IPPROTO_TCP,
                63,
                &tcp(53, 41053),
            );
            assert_eq!(run(&t, Program::ToPod, &back, a.ifindex), TC_ACT_OK);

            // After DNAT to another node's pod: to_uplink judges.
            let out_ok = ip(
                NODE_MAC,
                PEER_MAC,
                a.ip,
                addr(f.remote_pod),
                IPPROTO_TCP,
                63,
                &tcp(41054, 53),
            );
            assert_eq!(run(&t, Program::ToUplink, &out_ok, UPLINK), PASS);
            let out_bad = ip(
                NODE_MAC,
                PEER_MAC,
                a.ip,
                addr(f.outside),
                IPPROTO_TCP,
                63,
                &tcp(41055, 53),
            );
            assert_eq!(run(&t, Program::ToUplink, &out_bad, UPLINK), TC_ACT_SHOT);
        }
    });
}

/// The uplink and the stack: another node's pod is judged before the
/// redirect in; the node's own traffic (kubelet probes) passes whatever
/// the rules say; the outside meets the ipBlocks.
#[test]
fn every_path_in_enforces_ingress() {
    if !privileged("every_path_in_enforces_ingress") {
        return;
    }
    in_netns(|| {
        let t = node("polpaths");
        let dev = devices(2);
        for (f, n) in families() {
            let b = Pod::new(f.b, dev[usize::from(n / 10)], 2 + n).add_to(&t.dp);
            isolate(
                &t,
                &b,
                Some(&[block(f.remote_net, &[], tcp_port(80))]),
                None,
            );

            let peer = |src: &str, port: u16| {
                ip(
                    PEER_MAC,
                    NODE_MAC,
                    addr(src),
                    b.ip,
                    IPPROTO_TCP,
                    63,
                    &tcp(42000, port),
                )
            };
            assert_eq!(
                run(&t, Program::FromUplink, &peer(f.remote_pod, 80), UPLINK),
                TC_ACT_REDIRECT
            );
            assert_eq!(
                run(&t, Program::FromUplink, &peer(f.remote_pod, 81), UPLINK),
                TC_ACT_SHOT
            );

            let stack = |src: &str, port: u16| {
                ip(
                    NODE_MAC,
                    b.mac,
                    addr(src),
                    b.ip,
                    IPPROTO_TCP,
                    63,
                    &tcp(43000, port),
                )
            };
            assert_eq!(
                run(&t, Program::ToPod, &stack(f.node, 8080), b.ifindex),
                TC_ACT_OK,
                "kubelet"
            );
            assert_eq!(
                run(&t, Program::ToPod, &stack(f.outside, 80), b.ifindex),
                TC_ACT_SHOT,
                "outside"
            );
            assert_eq!(
                run(&t, Program::ToPod, &stack(f.remote_pod, 80), b.ifindex),
                TC_ACT_OK
            );
            assert_eq!(dropped(&t, &b, DropReason::PolicyIngress), 2);
        }
    });
}

/// An endpoint ADD created in a namespace with policies, before the agent
/// programmed it: nothing passes either way, and it is counted.
#[test]
fn a_pending_endpoint_passes_nothing() {
    if !privileged("a_pending_endpoint_passes_nothing") {
        return;
    }
    in_netns(|| {
        let t = node("polpending");
        let dev = devices(2);
        let a = Pod::new(V4.a, dev[0], 1).add_to(&t.dp);
        let b = Pod::new(V4.b, dev[1], 2).add_to(&t.dp);
        let pm = t.dp.policy_maps().unwrap();
        pm.set_endpoint(b.ifindex, &EndpointPolicy::PENDING)
            .unwrap();

        let to_b = sent(&a, b.ip, IPPROTO_TCP, &tcp(1000, 80));
        let from_b = sent(&b, a.ip, IPPROTO_TCP, &tcp(80, 1000));
        assert_eq!(run(&t, Program::FromPod, &to_b, a.ifindex), TC_ACT_SHOT);
        assert_eq!(run(&t, Program::FromPod, &from_b, b.ifindex), TC_ACT_SHOT);
        assert_eq!(dropped(&t, &b, DropReason::PolicyPending), 2);
        assert_eq!(dropped(&t, &a, DropReason::PolicyPending), 0);

        // Programmed: not isolated at all.
        pm.set_endpoint(b.ifindex, &EndpointPolicy::default())
            .unwrap();
        assert_eq!(run(&t, Program::FromPod, &to_b, a.ifindex), TC_ACT_REDIRECT);
        assert_eq!(
            run(&t, Program::FromPod, &from_b, b.ifindex),
            TC_ACT_REDIRECT
        );
    });
}

/// An ICMP error and the later fragments of a datagram pass only with a
/// flow the rules allowed; neither opens one.
#[test]
fn icmp_errors_and_fragments_follow_their_flow() {
    if !privileged("icmp_errors_and_fragments_follow_their_flow") {
        return;
    }
    in_netns(|| {
        let t = node("policmp");
        let dev = devices(3);
        let a = Pod::new(V4.a, dev[0], 1).add_to(&t.dp);
        let b = Pod::new(V4.b, dev[1], 2).add_to(&t.dp);
        let c = Pod::new(V4.c, dev[2], 3).add_to(&t.dp);
        // A accepts nothing; B accepts A's DNS.
        isolate(&t, &a, Some(&[][..]), None);
        isolate(&t, &b, Some(&[from(&[V4.a], udp_port(53))]), None);

        let query = sent(&a, b.ip, IPPROTO_UDP, &udp(5000, 53));
        assert_eq!(
            run(&t, Program::FromPod, &query, a.ifindex),
            TC_ACT_REDIRECT
        );
        // B answers "port unreachable" about A's query: A takes it.
        let quoted = bare_ip(a.ip, b.ip, IPPROTO_UDP, 64, &udp(5000, 53));
        let err = sent(&b, a.ip, IPPROTO_ICMP, &icmp_error(3, 3, &quoted));
        assert_eq!(run(&t, Program::FromPod, &err, b.ifindex), TC_ACT_REDIRECT);
        // C claims an error about a flow A never had.
        let quoted = bare_ip(a.ip, c.ip, IPPROTO_UDP, 64, &udp(5001, 53));
        let err = sent(&c, a.ip, IPPROTO_ICMP, &icmp_error(3, 3, &quoted));
        assert_eq!(run(&t, Program::FromPod, &err, c.ifindex), TC_ACT_SHOT);
        assert_eq!(dropped(&t, &a, DropReason::PolicyIngress), 1);

        // Fragments: the first opens (and takes the stack); the rest follow.
        let big = sent(&a, b.ip, IPPROTO_UDP, &udp(5002, 53));
        let first = fragment_v4(big.clone(), true, 0);
        let later = fragment_v4(big, false, 185);
        assert_eq!(
            run(&t, Program::FromPod, &later, a.ifindex),
            TC_ACT_SHOT,
            "a later fragment first"
        );
        assert_eq!(run(&t, Program::FromPod, &first, a.ifindex), TC_ACT_OK);
        assert_eq!(run(&t, Program::FromPod, &later, a.ifindex), TC_ACT_OK);
        let stray = fragment_v4(sent(&c, b.ip, IPPROTO_UDP, &udp(5003, 53)), false, 185);
        assert_eq!(run(&t, Program::FromPod, &stray, c.ifindex), TC_ACT_SHOT);
    });
}

/// A flow the table forgot (eviction; here a flush) is judged again: its
/// answers no longer pass on their own, and its first direction, still
/// allowed, opens it again.
#[test]
fn a_forgotten_flow_is_judged_again() {
    if !privileged("a_forgotten_flow_is_judged_again") {
        return;
    }
    in_netns(|| {
        let t = node("polevict");
        let dev = devices(2);
        for (f, n) in families() {
            let a = Pod::new(f.a, dev[0], 1 + n).add_to(&t.dp);
            let b = Pod::new(f.b, dev[1], 2 + n).add_to(&t.dp);
            // A accepts nothing but starts anything.
            isolate(&t, &a, Some(&[][..]), None);
            let out = sent(&a, b.ip, IPPROTO_TCP, &tcp(44000, 443));
            let back = sent(&b, a.ip, IPPROTO_TCP, &tcp(443, 44000));
            assert_eq!(run(&t, Program::FromPod, &out, a.ifindex), TC_ACT_REDIRECT);
            assert_eq!(run(&t, Program::FromPod, &back, b.ifindex), TC_ACT_REDIRECT);

            let pm = t.dp.policy_maps().unwrap();
            assert!(pm.conntrack_len().unwrap() >= 1);
            pm.conntrack_flush().unwrap();
            assert_eq!(
                run(&t, Program::FromPod, &back, b.ifindex),
                TC_ACT_SHOT,
                "judged as new"
            );
            assert_eq!(run(&t, Program::FromPod, &out, a.ifindex), TC_ACT_REDIRECT);
            assert_eq!(run(&t, Program::FromPod, &back, b.ifindex), TC_ACT_REDIRECT);
            pm.remove_endpoint(a.ifindex).unwrap();
        }
    });
}

/// A thousand rules (sixteen words): the last one still decides, and the
/// verifier took the loop.
#[test]
fn a_thousand_rules() {
    if !privileged("a_thousand_rules") {
        return;
    }
    in_netns(|| {
        let t = node("polmany");
        let dev = devices(2);
        let a = Pod::new(V4.a, dev[0], 1).add_to(&t.dp);
        let b = Pod::new(V4.b, dev[1], 2).add_to(&t.dp);
        let rules: Vec<Rule> = (0..1000u16)
            .map(|i| {
                let peer = if i == 999 {
                    V4.a.to_owned()
                } else {
                    format!("10.9.{}.{}", i >> 8, i & 0xff)
                };
                Rule {
                    peers: Peers::Some(vec![Cidr::host(addr(&peer))]),
                    ports: tcp_port(10000 + i),
                }
            })
            .collect();
        isolate(&t, &b, Some(&rules), None);
        let ok = sent(&a, b.ip, IPPROTO_TCP, &tcp(45000, 10999));
        let wrong_port = sent(&a, b.ip, IPPROTO_TCP, &tcp(45001, 10998));
        assert_eq!(run(&t, Program::FromPod, &ok, a.ifindex), TC_ACT_REDIRECT);
        assert_eq!(
            run(&t, Program::FromPod, &wrong_port, a.ifindex),
            TC_ACT_SHOT
        );
    });
}
