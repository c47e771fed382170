//! BPF_PROG_TEST_RUN on the real programs: verdicts, rewritten bytes, maps.
//! The sending pod sits on ifindex 1 (the private netns's `lo`), the only
//! device test runs can name without creating one.

use std::net::IpAddr;

use ferrite_datapath::{
    DropReason, Program, ENDPOINT_F_VIA_STACK, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT,
};

use crate::{
    harness::{in_netns, load, privileged, Pod},
    packet::*,
};

/// Ethernet + IPv4 header offsets.
const TTL: usize = 14 + 8;
const HOP_LIMIT: usize = 14 + 7;

#[test]
fn ipv4_to_local_pod_is_redirected_and_rewritten() {
    if !privileged("ipv4_to_local_pod_is_redirected_and_rewritten") {
        return;
    }
    in_netns(|| {
        let t = load("redirect4");
        let a = Pod::new("10.244.1.2", 1, 1).add_to(&t.dp);
        let b = Pod::new("10.244.1.3", 42, 2).add_to(&t.dp);
        let pkt = ip(
            a.mac,
            a.host_mac,
            a.ip,
            b.ip,
            IPPROTO_UDP,
            64,
            &udp(5000, 53),
        );

        let run = t.dp.test_run(Program::FromPod, &pkt, a.ifindex).unwrap();

        assert_eq!(run.verdict, TC_ACT_REDIRECT);
        assert_eq!(run.packet[0..6], b.mac, "eth dst = destination pod");
        assert_eq!(
            run.packet[6..12],
            b.host_mac,
            "eth src = destination host veth"
        );
        assert_eq!(run.packet[TTL], 63);
        assert_eq!(
            checksum(&run.packet[14..34]),
            0,
            "IPv4 header checksum valid"
        );
        assert_eq!(run.packet[34..], pkt[34..], "payload untouched");

        let sa = t.dp.stats(a.ifindex).unwrap().unwrap();
        assert_eq!((sa.from_pod_packets, sa.redirected_packets), (1, 1));
        assert_eq!(sa.redirected_bytes, pkt.len() as u64);
        let sb = t.dp.stats(b.ifindex).unwrap().unwrap();
        assert_eq!(sb.redirected_in_packets, 1);
        assert_eq!(sb.redirected_in_bytes, pkt.len() as u64);
    });
}

/// A pod whose sending a chained plugin shapes at the host veth's ingress
/// (ENDPOINT_F_VIA_STACK): its packets are still checked, then passed on
/// (TC_ACT_UNSPEC, so the plugin's filter runs) rather than redirected.
#[test]
fn via_stack_pod_is_checked_then_passed_on() {
    if !privileged("via_stack_pod_is_checked_then_passed_on") {
        return;
    }
    in_netns(|| {
        let t = load("viastack");
        let a = Pod::new("10.244.1.2", 1, 1);
        let mut ep = a.endpoint();
        ep.flags = ENDPOINT_F_VIA_STACK;
        t.dp.upsert_endpoint(a.ip, &ep).unwrap();
        let b = Pod::new("10.244.1.3", 42, 2).add_to(&t.dp);
        let pkt = ip(a.mac, a.host_mac, a.ip, b.ip, IPPROTO_UDP, 64, &udp(1, 2));

        let run = t.dp.test_run(Program::FromPod, &pkt, a.ifindex).unwrap();
        assert_eq!(run.verdict, -1, "TC_ACT_UNSPEC");
        assert_eq!(run.packet, pkt, "untouched");

        // The check still comes first.
        let spoofed = ip(a.mac, a.host_mac, b.ip, a.ip, IPPROTO_UDP, 64, &udp(1, 2));
        let run =
            t.dp.test_run(Program::FromPod, &spoofed, a.ifindex)
                .unwrap();
        assert_eq!(run.verdict, TC_ACT_SHOT);

        let s = t.dp.stats(a.ifindex).unwrap().unwrap();
        assert_eq!((s.from_pod_packets, s.redirected_packets), (2, 0));
    });
}

#[test]
fn non_local_destination_goes_to_the_stack() {
    if !privileged("non_local_destination_goes_to_the_stack") {
        return;
    }
    in_netns(|| {
        let t = load("nonlocal");
        let a = Pod::new("10.244.1.2", 1, 1).add_to(&t.dp);
        let dst: IpAddr = "10.96.0.10".parse().unwrap();
        let pkt = ip(
            a.mac,
            a.host_mac,
            a.ip,
            dst,
            IPPROTO_TCP,
            64,
            &tcp(40000, 443),
        );

        let run = t.dp.test_run(Program::FromPod, &pkt, a.ifindex).unwrap();
        assert_eq!(run.verdict, TC_ACT_OK);
        assert_eq!(run.packet, pkt, "untouched");

        // TTL 1 to a local pod: the stack answers with time exceeded.
        let b = Pod::new("10.244.1.3", 42, 2).add_to(&t.dp);
        let pkt = ip(a.mac, a.host_mac, a.ip, b.ip, IPPROTO_UDP, 1, &udp(1, 2));
        assert_eq!(
            t.dp.test_run(Program::FromPod, &pkt, a.ifindex)
                .unwrap()
                .verdict,
            TC_ACT_OK
        );
        let s = t.dp.stats(a.ifindex).unwrap().unwrap();
        assert_eq!((s.from_pod_packets, s.redirected_packets), (2, 0));
    });
}

#[test]
fn spoofed_source_ip_is_dropped_and_counted() {
    if !privileged("spoofed_source_ip_is_dropped_and_counted") {
        return;
    }
    in_netns(|| {
        let t = load("spoofip");
        let a = Pod::new("10.244.1.2", 1, 1).add_to(&t.dp);
        // Another pod's address, owned by a different veth.
        let b = Pod::new("10.244.1.3", 42, 2).add_to(&t.dp);
        let unknown: IpAddr = "192.0.2.1".parse().unwrap();
        for src in [b.ip, unknown] {
            let pkt = ip(a.mac, a.host_mac, src, b.ip, IPPROTO_UDP, 64, &udp(1, 2));
            let run = t.dp.test_run(Program::FromPod, &pkt, a.ifindex).unwrap();
            assert_eq!(run.verdict, TC_ACT_SHOT, "source {src}");
        }
        let s = t.dp.stats(a.ifindex).unwrap().unwrap();
        assert_eq!(s.dropped(DropReason::SpoofedIp), 2);
        assert_eq!(s.redirected_packets, 0);
    });
}

#[test]
fn spoofed_source_mac_is_dropped() {
    if !privileged("spoofed_source_mac_is_dropped") {
        return;
    }
    in_netns(|| {
        let t = load("spoofmac");
        let a = Pod::new("10.244.1.2", 1, 1).add_to(&t.dp);
        let b = Pod::new("10.244.1.3", 42, 2).add_to(&t.dp);
        let forged = [0x02, 0xde, 0xad, 0xbe, 0xef, 0x01];
        let pkt = ip(forged, a.host_mac, a.ip, b.ip, IPPROTO_UDP, 64, &udp(1, 2));
        let run = t.dp.test_run(Program::FromPod, &pkt, a.ifindex).unwrap();
        assert_eq!(run.verdict, TC_ACT_SHOT);
        let s = t.dp.stats(a.ifindex).unwrap().unwrap();
        assert_eq!(s.dropped(DropReason::SpoofedMac), 1);
    });
}

#[test]
fn arp_must_come_from_the_pod_itself() {
    if !privileged("arp_must_come_from_the_pod_itself") {
        return;
    }
    in_netns(|| {
        let t = load("arp");
        let a = Pod::new("10.244.1.2", 1, 1).add_to(&t.dp);
        let b = Pod::new("10.244.1.3", 42, 2).add_to(&t.dp);
        let gw = "169.254.1.1".parse().unwrap();
        let bcast = [0xff; 6];
        let request =
            |sha, spa, eth_src| eth(bcast, eth_src, ETH_P_ARP, &arp(1, sha, spa, [0; 6], gw));

        // The pod asking for its gateway is answered from the host veth's MAC,
        // straight back into the pod.
        let answered =
            t.dp.test_run(Program::FromPod, &request(a.mac, v4(a.ip), a.mac), 1)
                .unwrap();
        assert_eq!(
            answered.verdict, TC_ACT_REDIRECT,
            "the pod's own ARP for the gateway"
        );
        let reply = eth(
            a.mac,
            a.host_mac,
            ETH_P_ARP,
            &arp(2, a.host_mac, gw, a.mac, v4(a.ip)),
        );
        assert_eq!(
            &answered.packet[..reply.len()],
            &reply[..],
            "an ARP reply for 169.254.1.1"
        );
        // Any other ARP of the pod's own passes to the stack untouched.
        let other = eth(
            bcast,
            a.mac,
            ETH_P_ARP,
            &arp(1, a.mac, v4(a.ip), [0; 6], v4(b.ip)),
        );
        let ok = t.dp.test_run(Program::FromPod, &other, 1).unwrap();
        assert_eq!(ok.verdict, TC_ACT_OK, "the pod's own ARP");
        assert_eq!(ok.packet, other);

        let forged = [0x02, 0xde, 0xad, 0xbe, 0xef, 0x01];
        for (what, pkt) in [
            ("another pod's IP", request(a.mac, v4(b.ip), a.mac)),
            ("forged sender MAC", request(forged, v4(a.ip), a.mac)),
            ("forged ethernet source", request(a.mac, v4(a.ip), forged)),
        ] {
            let run = t.dp.test_run(Program::FromPod, &pkt, 1).unwrap();
            assert_eq!(run.verdict, TC_ACT_SHOT, "{what}");
        }
        let s = t.dp.stats(a.ifindex).unwrap().unwrap();
        assert_eq!(s.dropped(DropReason::ArpSpoof), 3);
    });
}

#[test]
fn unsupported_and_malformed_frames_are_dropped() {
    if !privileged("unsupported_and_malformed_frames_are_dropped") {
        return;
    }
    in_netns(|| {
        let t = load("unsupported");
        let a = Pod::new("10.244.1.2", 1, 1).add_to(&t.dp);
        let lldp = eth([0x01, 0x80, 0xc2, 0, 0, 0x0e], a.mac, 0x88cc, &[0; 46]);
        assert_eq!(
            t.dp.test_run(Program::FromPod, &lldp, 1).unwrap().verdict,
            TC_ACT_SHOT
        );
        let mut short = ip(
            a.mac,
            a.host_mac,
            a.ip,
            "10.96.0.1".parse().unwrap(),
            IPPROTO_TCP,
            64,
            &tcp(1, 2),
        );
        short.truncate(14 + 20 + 2); // TCP ports cut in half
        assert_eq!(
            t.dp.test_run(Program::FromPod, &short, 1).unwrap().verdict,
            TC_ACT_SHOT
        );
        let s = t.dp.stats(a.ifindex).unwrap().unwrap();
        assert_eq!(s.dropped(DropReason::UnsupportedL3), 1);
        assert_eq!(s.dropped(DropReason::Malformed), 1);
        assert_eq!(s.from_pod_packets, 2);
    });
}

/// Pod A reaches pod B through a Service: the stack DNATs and delivers
/// A->B to B's veth (to_pod runs there). B's reply must go back through the
/// stack, not straight to A, or conntrack never un-NATs it.
#[test]
fn replies_to_stack_delivered_flows_stay_on_the_stack() {
    if !privileged("replies_to_stack_delivered_flows_stay_on_the_stack") {
        return;
    }
    in_netns(|| {
        let t = load("stackflow");
        // B sits on ifindex 1 because it is the one sending the reply.
        let b = Pod::new("10.244.1.3", 1, 2).add_to(&t.dp);
        let a = Pod::new("10.244.1.2", 42, 1).add_to(&t.dp);

        // The stack delivers A:40000 -> B:8080 (after DNAT) to B.
        let delivered = ip(
            b.host_mac,
            b.mac,
            a.ip,
            b.ip,
            IPPROTO_TCP,
            63,
            &tcp(40000, 8080),
        );
        let run =
            t.dp.test_run(Program::ToPod, &delivered, b.ifindex)
                .unwrap();
        assert_eq!(run.verdict, TC_ACT_OK);
        assert_eq!(run.packet, delivered);
        assert_eq!(t.dp.stack_flows().unwrap(), 1);

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
        assert_eq!(run.verdict, TC_ACT_OK, "reply goes to the stack");
        assert_eq!(run.packet, reply, "and is not rewritten");

        // Another flow between the same pods still takes the fast path.
        let other = ip(
            b.mac,
            b.host_mac,
            b.ip,
            a.ip,
            IPPROTO_TCP,
            64,
            &tcp(8080, 40001),
        );
        assert_eq!(
            t.dp.test_run(Program::FromPod, &other, b.ifindex)
                .unwrap()
                .verdict,
            TC_ACT_REDIRECT
        );

        // ICMP echo: the identifier names the flow in both directions.
        let request = ip(
            b.host_mac,
            b.mac,
            a.ip,
            b.ip,
            IPPROTO_ICMP,
            63,
            &icmp_echo(8, 77, 1),
        );
        t.dp.test_run(Program::ToPod, &request, b.ifindex).unwrap();
        let echo_reply = ip(
            b.mac,
            b.host_mac,
            b.ip,
            a.ip,
            IPPROTO_ICMP,
            64,
            &icmp_echo(0, 77, 1),
        );
        assert_eq!(
            t.dp.test_run(Program::FromPod, &echo_reply, b.ifindex)
                .unwrap()
                .verdict,
            TC_ACT_OK
        );
        let other_id = ip(
            b.mac,
            b.host_mac,
            b.ip,
            a.ip,
            IPPROTO_ICMP,
            64,
            &icmp_echo(0, 78, 1),
        );
        assert_eq!(
            t.dp.test_run(Program::FromPod, &other_id, b.ifindex)
                .unwrap()
                .verdict,
            TC_ACT_REDIRECT
        );

        let s = t.dp.stats(b.ifindex).unwrap().unwrap();
        assert_eq!(s.to_pod_packets, 2);
        assert_eq!(s.to_pod_bytes, (delivered.len() + request.len()) as u64);
        assert_eq!(s.redirected_packets, 2);
    });
}

#[test]
fn ipv6_to_local_pod_is_redirected() {
    if !privileged("ipv6_to_local_pod_is_redirected") {
        return;
    }
    in_netns(|| {
        let t = load("redirect6");
        let a = Pod::new("fd00:10:244:1::2", 1, 1).add_to(&t.dp);
        let b = Pod::new("fd00:10:244:1::3", 42, 2).add_to(&t.dp);
        let pkt = ip(
            a.mac,
            a.host_mac,
            a.ip,
            b.ip,
            IPPROTO_UDP,
            64,
            &udp(5000, 53),
        );

        let run = t.dp.test_run(Program::FromPod, &pkt, a.ifindex).unwrap();
        assert_eq!(run.verdict, TC_ACT_REDIRECT);
        assert_eq!(run.packet[0..6], b.mac);
        assert_eq!(run.packet[6..12], b.host_mac);
        assert_eq!(run.packet[HOP_LIMIT], 63);
        assert_eq!(run.packet[HOP_LIMIT + 1..], pkt[HOP_LIMIT + 1..]);

        let spoofed = ip(
            a.mac,
            a.host_mac,
            "fd00:10:244:1::99".parse().unwrap(),
            b.ip,
            IPPROTO_UDP,
            64,
            &udp(1, 2),
        );
        assert_eq!(
            t.dp.test_run(Program::FromPod, &spoofed, 1)
                .unwrap()
                .verdict,
            TC_ACT_SHOT
        );
        let forged_mac = ip(
            [2, 9, 9, 9, 9, 9],
            a.host_mac,
            a.ip,
            b.ip,
            IPPROTO_UDP,
            64,
            &udp(1, 2),
        );
        assert_eq!(
            t.dp.test_run(Program::FromPod, &forged_mac, 1)
                .unwrap()
                .verdict,
            TC_ACT_SHOT
        );
        let s = t.dp.stats(a.ifindex).unwrap().unwrap();
        assert_eq!(s.dropped(DropReason::SpoofedIp), 1);
        assert_eq!(s.dropped(DropReason::SpoofedMac), 1);
        assert_eq!(s.redirected_packets, 1);
    });
}

#[test]
fn ipv6_link_local_and_neighbour_discovery_go_to_the_stack() {
    if !privileged("ipv6_link_local_and_neighbour_discovery_go_to_the_stack") {
        return;
    }
    in_netns(|| {
        let t = load("ndp");
        let a = Pod::new("fd00:10:244:1::2", 1, 1).add_to(&t.dp);
        let all_routers = "ff02::2".parse().unwrap();
        let solicited = "ff02::1:ff00:2".parse().unwrap();
        let mut ns = vec![135, 0, 0, 0, 0, 0, 0, 0];
        ns.extend_from_slice(
            &"fd00:10:244:1::2"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );

        let cases = [
            (
                "RS from link-local",
                "fe80::a0:1",
                all_routers,
                vec![133, 0, 0, 0, 0, 0, 0, 0],
                a.mac,
                TC_ACT_OK,
            ),
            (
                "DAD NS from ::",
                "::",
                solicited,
                ns.clone(),
                a.mac,
                TC_ACT_OK,
            ),
            (
                "NS from the pod's address",
                "fd00:10:244:1::2",
                solicited,
                ns.clone(),
                a.mac,
                TC_ACT_OK,
            ),
            (
                "link-local with a forged MAC",
                "fe80::a0:1",
                all_routers,
                vec![133, 0, 0, 0, 0, 0, 0, 0],
                [2, 9, 9, 9, 9, 9],
                TC_ACT_SHOT,
            ),
        ];
        for (what, src, dst, l4, mac, verdict) in cases {
            let pkt = ip(
                mac,
                [0x33, 0x33, 0, 0, 0, 2],
                src.parse().unwrap(),
                dst,
                IPPROTO_ICMPV6,
                255,
                &l4,
            );
            let run = t.dp.test_run(Program::FromPod, &pkt, 1).unwrap();
            assert_eq!(run.verdict, verdict, "{what}");
        }
        // Link-local traffic from a veth ferrite has no endpoint for.
        t.dp.remove_endpoint(a.ip, a.ifindex).unwrap();
        let pkt = ip(
            a.mac,
            [0x33, 0x33, 0, 0, 0, 2],
            "fe80::a0:1".parse().unwrap(),
            all_routers,
            IPPROTO_ICMPV6,
            255,
            &[133, 0, 0, 0, 0, 0, 0, 0],
        );
        assert_eq!(
            t.dp.test_run(Program::FromPod, &pkt, 1).unwrap().verdict,
            TC_ACT_SHOT
        );
    });
}
