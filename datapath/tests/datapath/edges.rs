//! Where the fast path and the kernel must agree about a packet: whom the
//! uplink trusts, fragments, ICMP errors, IPv6 extension headers, TTL and
//! the uplink's MTU. Each test below fails on a datapath that gets its case
//! wrong (the one before these tests did, for all but TTL).

use std::net::IpAddr;

use ferrite_datapath::{DropReason, Program, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT};

use crate::{
    harness::{in_netns, load, privileged, Loaded, Pod},
    packet::*,
};

/// TC_ACT_UNSPEC: the uplink programs pass a packet on to the stack.
const PASS: i32 = -1;
/// The node's end of the uplink in a test run: ifindex 1 (`lo`), whose MAC
/// is all zeros, so a frame sent to it is PACKET_HOST.
const UPLINK: u32 = 1;
const NODE_MAC: [u8; 6] = [0; 6];
const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xcc, 1];
const TTL4: usize = 14 + 8;
const HOP6: usize = 14 + 7;

/// Addresses of one family: two pods on this node, a pod on another node,
/// another node's own address, and a host outside the cluster.
struct Family {
    a: &'static str,
    b: &'static str,
    remote_pod: &'static str,
    node: &'static str,
    outside: &'static str,
    ttl_at: usize,
}

const V4: Family = Family {
    a: "10.244.1.2",
    b: "10.244.1.3",
    remote_pod: "10.244.2.5",
    node: "172.20.0.12",
    outside: "192.0.2.7",
    ttl_at: TTL4,
};

const V6: Family = Family {
    a: "fd00:10:244:1::2",
    b: "fd00:10:244:1::3",
    remote_pod: "fd00:10:244:2::5",
    node: "fd00:20::12",
    outside: "2001:db8::7",
    ttl_at: HOP6,
};

fn addr(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The datapath as the agent leaves it: the cluster's pod CIDRs known.
fn cluster(test: &str) -> Loaded {
    let t = load(test);
    t.dp.set_cluster_cidrs(&[(addr("10.244.0.0"), 16), (addr("fd00:10:244::"), 56)])
        .unwrap();
    t.dp.load_uplink().unwrap();
    t
}

/// A frame another node sends to this node's uplink.
fn from_peer(src: IpAddr, dst: IpAddr, proto: u8, ttl: u8, l4: &[u8]) -> Vec<u8> {
    ip(PEER_MAC, NODE_MAC, src, dst, proto, ttl, l4)
}

fn icmp_proto(ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        IPPROTO_ICMP
    } else {
        IPPROTO_ICMPV6
    }
}

/// Port unreachable, in the packet's family.
fn port_unreachable(family_of: IpAddr, quoted: &[u8]) -> Vec<u8> {
    if family_of.is_ipv4() {
        icmp_error(3, 3, quoted)
    } else {
        icmp_error(1, 4, quoted)
    }
}

fn assert_redirected_to(run_packet: &[u8], to: &Pod, ttl_at: usize, ttl: u8) {
    assert_eq!(run_packet[0..6], to.mac, "eth dst = destination pod");
    assert_eq!(run_packet[6..12], to.host_mac, "eth src = its host veth");
    assert_eq!(run_packet[ttl_at], ttl, "one hop less");
    if ttl_at == TTL4 {
        assert_eq!(checksum(&run_packet[14..34]), 0, "IPv4 checksum valid");
    }
}

/// Issue 15 items 0 and 5: only the cluster's pods are redirected in from
/// the uplink; a node's own address (kubelet, hostNetwork pods, NodePort
/// traffic kube-proxy forwards) and the outside take the stack, whose
/// conntrack and firewall must see the whole flow; a local pod's address
/// from outside is dropped and counted.
#[test]
fn uplink_redirects_only_the_clusters_pods() {
    if !privileged("uplink_redirects_only_the_clusters_pods") {
        return;
    }
    in_netns(|| {
        let t = cluster("uplinktrust");
        for (n, f) in [V4, V6].iter().enumerate() {
            let n = n as u8 * 2;
            let a = Pod::new(f.a, 41 + u32::from(n), 1 + n).add_to(&t.dp);
            let b = Pod::new(f.b, 42 + u32::from(n), 2 + n).add_to(&t.dp);
            let tcp_syn = tcp(40000, 8080);

            let pkt = from_peer(addr(f.remote_pod), b.ip, IPPROTO_TCP, 63, &tcp_syn);
            let run = t.dp.test_run(Program::FromUplink, &pkt, UPLINK).unwrap();
            assert_eq!(
                run.verdict, TC_ACT_REDIRECT,
                "{}: a pod of another node",
                f.b
            );
            assert_redirected_to(&run.packet, &b, f.ttl_at, 62);

            for src in [f.node, f.outside] {
                let pkt = from_peer(addr(src), b.ip, IPPROTO_TCP, 63, &tcp_syn);
                let run = t.dp.test_run(Program::FromUplink, &pkt, UPLINK).unwrap();
                assert_eq!(run.verdict, PASS, "{src} -> {}: the stack's", f.b);
                assert_eq!(run.packet, pkt, "untouched");
            }

            let spoofed = from_peer(a.ip, b.ip, IPPROTO_TCP, 63, &tcp_syn);
            let run =
                t.dp.test_run(Program::FromUplink, &spoofed, UPLINK)
                    .unwrap();
            assert_eq!(run.verdict, TC_ACT_SHOT, "{} from outside", f.a);

            let s = t.dp.stats(b.ifindex).unwrap().unwrap();
            assert_eq!(s.redirected_in_packets, 1);
            assert_eq!(s.dropped(DropReason::UplinkSpoof), 1);
            let s = t.dp.stats(a.ifindex).unwrap().unwrap();
            assert_eq!(
                s.dropped(DropReason::UplinkSpoof),
                0,
                "counted at the target"
            );
        }
    });
}

/// Issue 15 item 1: every fragment of a datagram takes the same path, the
/// stack's, which reassembles; the first fragment of a flow the stack
/// delivered is still recorded, so the replies stay on the stack too.
#[test]
fn every_fragment_takes_the_stack() {
    if !privileged("every_fragment_takes_the_stack") {
        return;
    }
    in_netns(|| {
        let t = cluster("fragments");
        let a = Pod::new(V4.a, 1, 1).add_to(&t.dp);
        let b = Pod::new(V4.b, 42, 2).add_to(&t.dp);
        let remote = addr(V4.remote_pod);
        let whole = from_peer(remote, b.ip, IPPROTO_UDP, 63, &udp(5000, 53));
        let first = fragment_v4(whole.clone(), true, 0);
        let later = fragment_v4(whole.clone(), false, 185);

        let run = t.dp.test_run(Program::FromUplink, &whole, UPLINK).unwrap();
        assert_eq!(run.verdict, TC_ACT_REDIRECT, "control: a whole datagram");
        for (what, pkt) in [("first", &first), ("later", &later)] {
            let run = t.dp.test_run(Program::FromUplink, pkt, UPLINK).unwrap();
            assert_eq!(run.verdict, PASS, "{what} fragment from the uplink");
            assert_eq!(&run.packet, pkt);
        }

        let whole = ip(
            a.mac,
            a.host_mac,
            a.ip,
            b.ip,
            IPPROTO_UDP,
            64,
            &udp(5000, 53),
        );
        for (more, offset) in [(true, 0), (false, 185)] {
            let pkt = fragment_v4(whole.clone(), more, offset);
            let run = t.dp.test_run(Program::FromPod, &pkt, a.ifindex).unwrap();
            assert_eq!(
                run.verdict, TC_ACT_OK,
                "fragment from a pod, offset {offset}"
            );
        }

        // IPv6: a fragment header behind a hop-by-hop header is still seen.
        let (a6, b6) = (
            Pod::new(V6.a, 1, 3).add_to(&t.dp),
            Pod::new(V6.b, 44, 4).add_to(&t.dp),
        );
        let remote6 = addr(V6.remote_pod);
        for (more, offset) in [(true, 0), (false, 185)] {
            let frag = ipv6_fragment(IPPROTO_UDP, more, offset, &udp(5000, 53));
            let hop_frag = ipv6_options(IPPROTO_FRAGMENT, &frag);
            for (l4, next) in [(&frag, IPPROTO_FRAGMENT), (&hop_frag, IPPROTO_HOPOPTS)] {
                let pkt = ip(a6.mac, a6.host_mac, a6.ip, b6.ip, next, 64, l4);
                let run = t.dp.test_run(Program::FromPod, &pkt, a6.ifindex).unwrap();
                assert_eq!(
                    run.verdict, TC_ACT_OK,
                    "v6 from pod, next {next}, offset {offset}"
                );
                let pkt = from_peer(remote6, b6.ip, next, 63, l4);
                let run = t.dp.test_run(Program::FromUplink, &pkt, UPLINK).unwrap();
                assert_eq!(
                    run.verdict, PASS,
                    "v6 from uplink, next {next}, offset {offset}"
                );
            }
        }

        // The stack delivers a fragmented datagram (after DNAT) from B to S
        // (on ifindex 1, which test runs of to_pod need): the first fragment
        // records the flow, a later one cannot.
        let s = Pod::new("10.244.1.20", 1, 9).add_to(&t.dp);
        let delivered = ip(
            s.host_mac,
            s.mac,
            b.ip,
            s.ip,
            IPPROTO_UDP,
            63,
            &udp(40000, 53),
        );
        let later = fragment_v4(delivered.clone(), false, 185);
        t.dp.test_run(Program::ToPod, &later, s.ifindex).unwrap();
        assert_eq!(
            t.dp.stack_flows().unwrap(),
            0,
            "a later fragment has no ports"
        );
        let first = fragment_v4(delivered, true, 0);
        t.dp.test_run(Program::ToPod, &first, s.ifindex).unwrap();
        assert_eq!(t.dp.stack_flows().unwrap(), 1);
        let reply = ip(
            s.mac,
            s.host_mac,
            s.ip,
            b.ip,
            IPPROTO_UDP,
            64,
            &udp(53, 40000),
        );
        let run = t.dp.test_run(Program::FromPod, &reply, s.ifindex).unwrap();
        assert_eq!(run.verdict, TC_ACT_OK, "the reply stays on the stack");
    });
}

/// Issue 15 item 2: an ICMP error belongs to the flow it quotes. A port
/// unreachable about a Service flow (DNAT by the stack) goes to the stack,
/// which un-NATs it; one about a direct flow keeps the fast path; one whose
/// quote was not sent by its destination is left to the stack.
#[test]
fn icmp_errors_follow_the_flow_they_quote() {
    if !privileged("icmp_errors_follow_the_flow_they_quote") {
        return;
    }
    in_netns(|| {
        let t = cluster("icmperr");
        for (n, f) in [V4, V6].iter().enumerate() {
            let n = n as u8 * 3;
            // B (the backend, sending the error) on ifindex 1.
            let b = Pod::new(f.b, 1, 1 + n).add_to(&t.dp);
            let a = Pod::new(f.a, 50 + u32::from(n), 2 + n).add_to(&t.dp);
            let icmp = icmp_proto(a.ip);

            let delivered = ip(
                b.host_mac,
                b.mac,
                a.ip,
                b.ip,
                IPPROTO_UDP,
                63,
                &udp(40000, 53),
            );
            t.dp.test_run(Program::ToPod, &delivered, b.ifindex)
                .unwrap();

            let quote = bare_ip(a.ip, b.ip, IPPROTO_UDP, 63, &udp(40000, 53));
            let err = ip(
                b.mac,
                b.host_mac,
                b.ip,
                a.ip,
                icmp,
                64,
                &port_unreachable(a.ip, &quote),
            );
            let run = t.dp.test_run(Program::FromPod, &err, b.ifindex).unwrap();
            assert_eq!(run.verdict, TC_ACT_OK, "{}: error about a stack flow", f.b);
            assert_eq!(run.packet, err, "untouched");

            let quote = bare_ip(a.ip, b.ip, IPPROTO_UDP, 63, &udp(40001, 53));
            let err = ip(
                b.mac,
                b.host_mac,
                b.ip,
                a.ip,
                icmp,
                64,
                &port_unreachable(a.ip, &quote),
            );
            let run = t.dp.test_run(Program::FromPod, &err, b.ifindex).unwrap();
            assert_eq!(
                run.verdict, TC_ACT_REDIRECT,
                "{}: error about a direct flow",
                f.b
            );
            assert_redirected_to(&run.packet, &a, f.ttl_at, 63);

            let quote = bare_ip(addr(f.remote_pod), b.ip, IPPROTO_UDP, 63, &udp(40001, 53));
            let err = ip(
                b.mac,
                b.host_mac,
                b.ip,
                a.ip,
                icmp,
                64,
                &port_unreachable(a.ip, &quote),
            );
            let run = t.dp.test_run(Program::FromPod, &err, b.ifindex).unwrap();
            assert_eq!(run.verdict, TC_ACT_OK, "{}: a quote A never sent", f.b);

            // From another node: A's flow to a remote pod left through the
            // stack (to_uplink recorded it); the remote pod's error about it
            // goes to the stack, an error about another flow comes in.
            let c = Pod::new(
                if a.ip.is_ipv4() {
                    "10.244.1.9"
                } else {
                    "fd00:10:244:1::9"
                },
                60 + u32::from(n),
                3 + n,
            )
            .add_to(&t.dp);
            let remote = addr(f.remote_pod);
            let out = ip(
                NODE_MAC,
                PEER_MAC,
                c.ip,
                remote,
                IPPROTO_UDP,
                63,
                &udp(40000, 53),
            );
            assert_eq!(
                t.dp.test_run(Program::ToUplink, &out, UPLINK)
                    .unwrap()
                    .verdict,
                PASS
            );
            for (sport, verdict) in [(40000, PASS), (40002, TC_ACT_REDIRECT)] {
                let quote = bare_ip(c.ip, remote, IPPROTO_UDP, 62, &udp(sport, 53));
                let err = from_peer(remote, c.ip, icmp, 63, &port_unreachable(c.ip, &quote));
                let run = t.dp.test_run(Program::FromUplink, &err, UPLINK).unwrap();
                assert_eq!(
                    run.verdict, verdict,
                    "{}: remote error about port {sport}",
                    f.a
                );
            }
        }
    });
}

/// Issue 15 item 2: IPv6 extension headers are walked to the transport
/// header, so a flow is named alike with and without them.
#[test]
fn ipv6_extension_headers_are_walked() {
    if !privileged("ipv6_extension_headers_are_walked") {
        return;
    }
    in_netns(|| {
        let t = cluster("exthdr");
        let b = Pod::new(V6.b, 1, 1).add_to(&t.dp);
        let a = Pod::new(V6.a, 42, 2).add_to(&t.dp);

        // The stack delivers A:40000 -> B:8080 with a hop-by-hop header.
        let hop = ipv6_options(IPPROTO_TCP, &tcp(40000, 8080));
        let delivered = ip(b.host_mac, b.mac, a.ip, b.ip, IPPROTO_HOPOPTS, 63, &hop);
        t.dp.test_run(Program::ToPod, &delivered, b.ifindex)
            .unwrap();

        let reply = ip(
            b.mac,
            b.host_mac,
            b.ip,
            a.ip,
            IPPROTO_TCP,
            64,
            &tcp(8080, 40000),
        );
        let run = t.dp.test_run(Program::FromPod, &reply, b.ifindex).unwrap();
        assert_eq!(run.verdict, TC_ACT_OK, "the plain reply stays on the stack");

        let dst = ipv6_options(IPPROTO_TCP, &tcp(8080, 40000));
        let reply = ip(b.mac, b.host_mac, b.ip, a.ip, IPPROTO_DSTOPTS, 64, &dst);
        let run = t.dp.test_run(Program::FromPod, &reply, b.ifindex).unwrap();
        assert_eq!(
            run.verdict, TC_ACT_OK,
            "so does one with destination options"
        );

        let dst = ipv6_options(IPPROTO_TCP, &tcp(8080, 40001));
        let other = ip(b.mac, b.host_mac, b.ip, a.ip, IPPROTO_DSTOPTS, 64, &dst);
        let run = t.dp.test_run(Program::FromPod, &other, b.ifindex).unwrap();
        assert_eq!(
            run.verdict, TC_ACT_REDIRECT,
            "another flow keeps the fast path"
        );
        assert_redirected_to(&run.packet, &a, HOP6, 63);

        // More headers than the walk follows: the stack decides.
        let mut deep = ipv6_options(IPPROTO_TCP, &tcp(8080, 40001));
        for _ in 0..4 {
            deep = ipv6_options(IPPROTO_DSTOPTS, &deep);
        }
        let pkt = ip(b.mac, b.host_mac, b.ip, a.ip, IPPROTO_DSTOPTS, 64, &deep);
        let run = t.dp.test_run(Program::FromPod, &pkt, b.ifindex).unwrap();
        assert_eq!(run.verdict, TC_ACT_OK);
    });
}

/// Issue 15 item 4: the fast path is a router: it takes one hop off, and a
/// packet with none left goes to the stack, which answers time exceeded.
#[test]
fn ttl_runs_out_at_the_stack() {
    if !privileged("ttl_runs_out_at_the_stack") {
        return;
    }
    in_netns(|| {
        let t = cluster("ttl");
        for (n, f) in [V4, V6].iter().enumerate() {
            let n = n as u8 * 2;
            let a = Pod::new(f.a, 1, 1 + n).add_to(&t.dp);
            let b = Pod::new(f.b, 42 + u32::from(n), 2 + n).add_to(&t.dp);
            let remote = addr(f.remote_pod);

            let pkt = from_peer(remote, b.ip, IPPROTO_UDP, 1, &udp(5000, 53));
            let run = t.dp.test_run(Program::FromUplink, &pkt, UPLINK).unwrap();
            assert_eq!(run.verdict, PASS, "{}: TTL 1 from the uplink", f.b);
            assert_eq!(run.packet, pkt);
            let pkt = from_peer(remote, b.ip, IPPROTO_UDP, 2, &udp(5000, 53));
            let run = t.dp.test_run(Program::FromUplink, &pkt, UPLINK).unwrap();
            assert_eq!(
                run.verdict, TC_ACT_REDIRECT,
                "{}: TTL 2 from the uplink",
                f.b
            );
            assert_redirected_to(&run.packet, &b, f.ttl_at, 1);

            for dst in [b.ip, remote] {
                let pkt = ip(a.mac, a.host_mac, a.ip, dst, IPPROTO_UDP, 1, &udp(5000, 53));
                let run = t.dp.test_run(Program::FromPod, &pkt, a.ifindex).unwrap();
                assert_eq!(run.verdict, TC_ACT_OK, "{dst}: TTL 1 from a pod");
            }
        }
    });
}

/// Runs `ip` (or another tool) in the calling thread's network namespace:
/// a child forked from a thread inherits that thread's namespace.
fn sh(args: &[&str]) {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Issue 15 item 3: a packet for another node's pod that does not fit the
/// uplink's MTU goes to the stack, which fragments it or answers "too big",
/// also while the next hop's MAC is still unresolved (the FIB's MTU check
/// covers only resolved next hops).
#[test]
fn too_big_for_the_uplink_goes_to_the_stack() {
    if !privileged("too_big_for_the_uplink_goes_to_the_stack") {
        return;
    }
    in_netns(|| {
        let t = cluster("uplinkmtu");
        sh(&[
            "ip", "link", "add", "up0", "mtu", "1400", "type", "veth", "peer", "name", "up1",
        ]);
        sh(&["ip", "link", "set", "up1", "up"]);
        sh(&["ip", "link", "set", "up0", "up"]);
        sh(&["ip", "addr", "add", "172.31.0.1/24", "dev", "up0"]);
        sh(&["ip", "addr", "add", "fd31::1/64", "dev", "up0", "nodad"]);
        sh(&[
            "ip",
            "route",
            "add",
            "10.244.2.0/24",
            "via",
            "172.31.0.2",
            "dev",
            "up0",
        ]);
        sh(&[
            "ip",
            "route",
            "add",
            "fd00:10:244:2::/64",
            "via",
            "fd31::2",
            "dev",
            "up0",
        ]);
        sh(&[
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
        ]);
        for (n, f) in [V4, V6].iter().enumerate() {
            let a = Pod::new(f.a, 1, 1 + n as u8).add_to(&t.dp);
            let remote = addr(f.remote_pod);
            let ip_header = if a.ip.is_ipv4() { 20 } else { 40 };
            for (size, verdict) in [(1000, TC_ACT_REDIRECT), (1500, TC_ACT_OK)] {
                let l4_len = size - ip_header;
                let mut datagram = udp(5000, 53);
                datagram.resize(l4_len, 0);
                datagram[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
                let pkt = ip(a.mac, a.host_mac, a.ip, remote, IPPROTO_UDP, 64, &datagram);
                assert_eq!(pkt.len(), 14 + size);
                let run = t.dp.test_run(Program::FromPod, &pkt, a.ifindex).unwrap();
                assert_eq!(
                    run.verdict, verdict,
                    "{}: {size}-byte packet, uplink MTU 1400",
                    f.a
                );
            }
        }
    });
}
