// SPDX-License-Identifier: Apache-2.0
//! The request logic against a recording fake transport (scripted kernel
//! answers), and against the real kernel in a private network namespace.

use std::collections::VecDeque;
use std::io;

use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::RouteNetlinkMessage;

use crate::wire::{self, *};
use crate::*;

/// Records what is sent; answers each receive with the next scripted
/// datagram, and with EAGAIN (as a receive timeout would) once there is
/// none, so a test that waits for too much fails instead of hanging.
#[derive(Default)]
struct Fake {
    sent: Vec<Vec<u8>>,
    replies: VecDeque<Vec<u8>>,
}

impl Transport for Fake {
    fn send(&mut self, buf: &[u8]) -> io::Result<()> {
        self.sent.push(buf.to_vec());
        Ok(())
    }

    fn recv(&mut self, buf: &mut Vec<u8>) -> io::Result<()> {
        let d = self
            .replies
            .pop_front()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EAGAIN))?;
        buf.clear();
        buf.extend_from_slice(&d);
        Ok(())
    }
}

fn fake<M: Message>(datagrams: Vec<Vec<u8>>) -> Netlink<M, Fake> {
    Netlink::with_transport(Fake {
        sent: Vec::new(),
        replies: datagrams.into(),
    })
}

fn message(kind: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
    let len = NLMSG_HDRLEN + payload.len();
    let mut m = Vec::new();
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&77u32.to_ne_bytes());
    m.extend_from_slice(payload);
    m.resize(wire::align(m.len()), 0);
    m
}

/// An NLMSG_ERROR as a socket with capped extended acks gets it.
fn answer(seq: u32, errno: i32, extack: Option<&str>) -> Vec<u8> {
    let mut p = (-errno).to_ne_bytes().to_vec();
    p.extend_from_slice(&[0; NLMSG_HDRLEN]); // the request's header
    let mut flags = NLM_F_CAPPED;
    if let Some(text) = extack {
        AttrWriter(&mut p).strz(1, text);
        flags |= NLM_F_ACK_TLVS;
    }
    message(NLMSG_ERROR, flags, seq, &p)
}

fn raw(kind: u16, body: &[u8]) -> RawMessage {
    RawMessage {
        message_type: kind,
        body: body.to_vec(),
    }
}

fn sent_seqs(bytes: &[u8]) -> Vec<(u16, u16, u32)> {
    wire::frames(bytes)
        .map(|f| f.map(|f| (f.kind, f.flags, f.seq)).unwrap())
        .collect()
}

#[test]
fn batch_is_one_datagram_and_matches_acks_by_sequence() {
    // Answers out of order, split over datagrams, with a late answer to an
    // earlier request (seq 1) in between; the qdisc's EEXIST is tolerated.
    let mut nl = fake::<RawMessage>(vec![
        answer(1, libc::ENOENT, None),
        [answer(4, 0, None), answer(2, libc::EEXIST, None)].concat(),
        answer(3, 0, None),
    ]);
    nl.seq = 1; // one request went before
    let mut batch = Batch::new();
    batch
        .push(Request::new("qdisc", raw(36, &[1; 4]), NLM_F_CREATE).tolerating(libc::EEXIST))
        .push(Request::new("ingress", raw(44, &[2; 8]), NLM_F_REPLACE))
        .push(Request::new("egress", raw(44, &[3; 8]), NLM_F_REPLACE));
    nl.batch(&batch).unwrap();
    let sent = &nl.transport().sent;
    assert_eq!(sent.len(), 1, "one sendmsg");
    assert_eq!(
        sent_seqs(&sent[0]),
        vec![
            (36, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE, 2),
            (44, NLM_F_REQUEST | NLM_F_ACK | NLM_F_REPLACE, 3),
            (44, NLM_F_REQUEST | NLM_F_ACK | NLM_F_REPLACE, 4),
        ]
    );
    assert_eq!(sent[0].len(), 3 * 16 + 4 + 8 + 8);
    // Every scripted answer was read: the batch waited for all three.
    assert!(nl.transport().replies.is_empty());
}

#[test]
fn batch_error_names_its_request_and_ends_the_wait() {
    let mut nl = fake::<RawMessage>(vec![
        answer(2, 0, None),
        answer(3, libc::EINVAL, Some("bpf: Program fd is invalid")),
        answer(4, 0, None),
    ]);
    let mut batch = Batch::new();
    batch
        .push(Request::new("begin", raw(16, &[]), 0).without_ack())
        .push(Request::new("first", raw(44, &[]), 0))
        .push(Request::new("second", raw(44, &[]), 0))
        .push(Request::new("third", raw(44, &[]), 0));
    let err = nl.batch(&batch).unwrap_err();
    assert_eq!(err.errno(), Some(libc::EINVAL));
    assert_eq!(err.extack(), Some("bpf: Program fd is invalid"));
    let text = err.to_string();
    assert!(text.starts_with("netlink second: "), "{text}");
    assert!(text.ends_with(" (bpf: Program fd is invalid)"), "{text}");
    // The unacked marker carries no NLM_F_ACK; the error stopped the wait.
    let flags: Vec<u16> = sent_seqs(&nl.transport().sent[0])
        .iter()
        .map(|s| s.1)
        .collect();
    assert_eq!(flags[0], NLM_F_REQUEST);
    assert_eq!(nl.transport().replies.len(), 1);
}

#[test]
fn batch_refusal_of_an_unacked_request_is_an_error() {
    let mut nl = fake::<RawMessage>(vec![answer(1, libc::EPERM, None)]);
    let mut batch = Batch::new();
    batch
        .push(Request::new("begin", raw(16, &[]), 0).without_ack())
        .push(Request::new("table", raw(0xa00, &[]), 0));
    let err = nl.batch(&batch).unwrap_err();
    assert_eq!(err.errno(), Some(libc::EPERM));
    assert!(err.to_string().starts_with("netlink begin: "));
}

#[test]
fn batch_acking_the_last_only_takes_one_answer_and_sees_earlier_refusals() {
    let batch = || {
        let mut b = Batch::new();
        b.push(Request::new("addr", raw(20, &[1; 4]), NLM_F_CREATE))
            .push(Request::new("up", raw(19, &[2; 4]), 0))
            .push(Request::new("route", raw(24, &[3; 4]), NLM_F_CREATE))
            .ack_last_only();
        b
    };
    // Success: the kernel answers the last request only.
    let mut nl = fake::<RawMessage>(vec![answer(3, 0, None)]);
    nl.batch(&batch()).unwrap();
    let flags: Vec<u16> = sent_seqs(&nl.transport().sent[0])
        .iter()
        .map(|s| s.1)
        .collect();
    assert_eq!(
        flags,
        vec![
            NLM_F_REQUEST | NLM_F_CREATE,
            NLM_F_REQUEST,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE
        ]
    );
    assert!(nl.transport().replies.is_empty());
    // A refusal of an earlier request arrives before the last answer and
    // is the error.
    let mut nl = fake::<RawMessage>(vec![
        answer(1, libc::EEXIST, Some("address exists")),
        answer(3, 0, None),
    ]);
    let err = nl.batch(&batch()).unwrap_err();
    assert_eq!(err.errno(), Some(libc::EEXIST));
    assert!(err.to_string().starts_with("netlink addr: "), "{err}");
    // A lone request keeps its ack.
    let mut one = Batch::new();
    one.push(Request::new("up", raw(19, &[]), 0))
        .ack_last_only();
    let mut nl = fake::<RawMessage>(vec![answer(1, 0, None)]);
    nl.batch(&one).unwrap();
    assert_eq!(
        sent_seqs(&nl.transport().sent[0])[0].1,
        NLM_F_REQUEST | NLM_F_ACK
    );
}

#[test]
fn batch_get_is_one_datagram_and_a_refusal_comes_before_the_answer() {
    let mut make = Batch::new();
    make.push(Request::new("link add", raw(16, &[1; 4]), NLM_F_CREATE).without_ack());
    // Made: the get's answer is the only datagram.
    let mut nl = fake::<RawMessage>(vec![message(16, 0, 2, &[7; 8])]);
    let got = nl
        .batch_get(&make, "link show", raw(18, &[2; 4]), 0)
        .unwrap();
    assert_eq!(got.unwrap().body, vec![7; 8]);
    assert_eq!(nl.transport().sent.len(), 1, "one sendmsg");
    assert_eq!(
        sent_seqs(&nl.transport().sent[0]),
        vec![
            (16, NLM_F_REQUEST | NLM_F_CREATE, 1),
            (18, NLM_F_REQUEST, 2)
        ]
    );
    // Refused: its error arrives first, and the answer about someone
    // else's link of that name is not taken for ours.
    let mut nl = fake::<RawMessage>(vec![
        answer(1, libc::EEXIST, None),
        message(16, 0, 2, &[9; 8]),
    ]);
    let err = nl
        .batch_get(&make, "link show", raw(18, &[2; 4]), 0)
        .unwrap_err();
    assert_eq!(err.errno(), Some(libc::EEXIST));
    assert!(err.to_string().starts_with("netlink link add: "), "{err}");
}

#[test]
fn request_skips_other_answers_and_reports_extack() {
    let mut nl = fake::<RawMessage>(vec![[
        answer(9, libc::ENOENT, None),
        answer(1, libc::ENETDOWN, Some("Device for nexthop is not up")),
    ]
    .concat()]);
    let err = nl
        .request("route add", raw(24, &[0; 12]), NLM_F_CREATE)
        .unwrap_err();
    assert_eq!(err.errno(), Some(libc::ENETDOWN));
    assert_eq!(
        err.to_string(),
        format!(
            "netlink route add: {} (Device for nexthop is not up)",
            io::Error::from_raw_os_error(libc::ENETDOWN)
        )
    );
    let mut nl = fake::<RawMessage>(vec![answer(1, 0, None)]);
    nl.request("link set", raw(19, &[]), 0).unwrap();
    // Nothing answers: the receive error names the request.
    let err = nl.request("link set", raw(19, &[]), 0).unwrap_err();
    assert!(matches!(err, NetlinkError::Io { .. }), "{err}");
    assert_eq!(err.errno(), None);
}

#[test]
fn dump_reads_datagrams_until_done() {
    let part = |seq, body: &[u8]| message(0xa00, NLM_F_MULTIPART, seq, body);
    let mut nl = fake::<RawMessage>(vec![
        [part(1, b"one\0"), part(1, b"two\0")].concat(),
        [part(5, b"not ours"), part(1, b"three\0\0\0")].concat(),
        message(NLMSG_DONE, NLM_F_MULTIPART, 1, &0i32.to_ne_bytes()),
        part(1, b"after the end"),
    ]);
    let got = nl.dump("list tables", raw(0xa01, &[])).unwrap();
    let bodies: Vec<&[u8]> = got.iter().map(|m| &m.body[..]).collect();
    assert_eq!(bodies, vec![&b"one\0"[..], b"two\0", b"three\0\0\0"]);
    assert_eq!(got[0].message_type, 0xa00);
    // The request asked for a dump; what followed DONE was left alone.
    assert_eq!(
        sent_seqs(&nl.transport().sent[0]),
        vec![(0xa01, NLM_F_REQUEST | NLM_F_DUMP, 1)]
    );
    assert_eq!(nl.transport().replies.len(), 1);
}

#[test]
fn dump_failure_in_done_or_error_is_an_error() {
    let mut p = (-libc::EMSGSIZE).to_ne_bytes().to_vec();
    AttrWriter(&mut p).strz(1, "dump too big");
    let mut nl = fake::<RawMessage>(vec![message(
        NLMSG_DONE,
        NLM_F_MULTIPART | NLM_F_ACK_TLVS,
        1,
        &p,
    )]);
    let err = nl.dump("dump", raw(1, &[])).unwrap_err();
    assert_eq!(err.errno(), Some(libc::EMSGSIZE));
    assert_eq!(err.extack(), Some("dump too big"));

    let mut nl = fake::<RawMessage>(vec![answer(1, libc::EOPNOTSUPP, None)]);
    let err = nl.dump("dump", raw(1, &[])).unwrap_err();
    assert_eq!(err.errno(), Some(libc::EOPNOTSUPP));

    // A datagram cut short is a decode error, not an early end.
    let mut cut = message(0xa00, NLM_F_MULTIPART, 1, b"abcdefgh");
    cut.truncate(20);
    let mut nl = fake::<RawMessage>(vec![cut]);
    let err = nl.dump("dump", raw(1, &[])).unwrap_err();
    assert!(matches!(err, NetlinkError::Decode { .. }), "{err}");
}

#[test]
fn get_returns_the_answer_typed() {
    use netlink_packet_core::NetlinkSerializable;
    let mut link = LinkMessage::default();
    link.header.index = 7;
    link.attributes.push(LinkAttribute::IfName("veth7".into()));
    let reply = RouteNetlinkMessage::NewLink(link.clone());
    let mut body = vec![0; reply.buffer_len()];
    reply.serialize(&mut body);
    let mut nl = fake::<RouteNetlinkMessage>(vec![message(reply.message_type(), 0, 1, &body)]);
    let got = nl
        .get(
            "link show 7",
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            0,
        )
        .unwrap();
    assert_eq!(got, Some(RouteNetlinkMessage::NewLink(link)));

    let mut nl = fake::<RouteNetlinkMessage>(vec![answer(1, libc::ENODEV, None)]);
    let err = nl
        .get(
            "link show 8",
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            0,
        )
        .unwrap_err();
    assert_eq!(err.errno(), Some(libc::ENODEV));
    let mut nl = fake::<RawMessage>(vec![answer(1, 0, None)]);
    assert_eq!(nl.get("x", raw(1, &[]), 0).unwrap(), None);
}

#[test]
fn sequence_numbers_wrap() {
    let mut batch = Batch::new();
    for what in ["a", "b", "c"] {
        batch.push(Request::new(what, raw(1, &[]), 0));
    }
    let mut nl = fake::<RawMessage>(vec![
        answer(u32::MAX, 0, None),
        answer(0, 0, None),
        answer(1, 0, None),
        answer(2, 0, None),
    ]);
    nl.seq = u32::MAX - 1;
    nl.batch(&batch).unwrap();
    nl.request("after", raw(1, &[]), 0).unwrap();
    let seqs: Vec<u32> = nl
        .transport()
        .sent
        .iter()
        .flat_map(|d| sent_seqs(d))
        .map(|s| s.2)
        .collect();
    assert_eq!(seqs, vec![u32::MAX, 0, 1, 2]);
}

/// The real kernel, in a namespace of this test's own: a thread unshares
/// it, so nothing of the machine's is seen or changed, and it dies with
/// the thread.
mod kernel {
    use std::net::Ipv4Addr;

    use netlink_packet_route::link::LinkFlags;
    use netlink_packet_route::route::{
        RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
    };

    use super::*;

    fn in_private_netns(test: impl FnOnce() + Send) {
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: changes this thread's namespace only.
                assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
                test();
            })
            .join()
            .unwrap();
        });
    }

    fn route_to(dst: Ipv4Addr, oif: u32) -> RouteNetlinkMessage {
        let mut msg = RouteMessage::default();
        msg.header.address_family = netlink_packet_route::AddressFamily::Inet;
        msg.header.destination_prefix_length = 24;
        msg.header.table = libc::RT_TABLE_MAIN;
        msg.header.protocol = RouteProtocol::Static;
        msg.header.scope = RouteScope::Link;
        msg.header.kind = RouteType::Unicast;
        msg.attributes
            .push(RouteAttribute::Destination(RouteAddress::from(
                std::net::IpAddr::V4(dst),
            )));
        msg.attributes.push(RouteAttribute::Oif(oif));
        RouteNetlinkMessage::NewRoute(msg)
    }

    fn lo_up() -> RouteNetlinkMessage {
        let mut up = LinkMessage::default();
        up.header.index = 1;
        up.header.flags = LinkFlags::Up;
        up.header.change_mask = LinkFlags::Up;
        RouteNetlinkMessage::SetLink(up)
    }

    #[test]
    fn kernel_requests_dumps_batches_and_extack() {
        if !ferrite_test_support::privileged("kernel_requests_dumps_batches_and_extack") {
            return;
        }
        in_private_netns(|| {
            let mut nl = route::open().unwrap();
            // A fresh namespace has lo alone, down.
            let links = nl
                .dump(
                    "link show",
                    RouteNetlinkMessage::GetLink(LinkMessage::default()),
                )
                .unwrap();
            assert_eq!(links.len(), 1, "{links:?}");

            // The extended ack reaches the error.
            let err = nl
                .request(
                    "route add",
                    route_to(Ipv4Addr::new(10, 9, 0, 0), 1),
                    NLM_F_CREATE,
                )
                .unwrap_err();
            assert_eq!(err.errno(), Some(libc::ENETDOWN), "{err}");
            assert_eq!(err.extack(), Some("Device for nexthop is not up"));

            // A batch: lo up, then two routes; the second route exists
            // already, and only it fails.
            let mut batch = Batch::new();
            batch
                .push(Request::new("lo up", lo_up(), 0))
                .push(Request::new(
                    "route a",
                    route_to(Ipv4Addr::new(10, 9, 1, 0), 1),
                    NLM_F_CREATE,
                ))
                .push(Request::new(
                    "route b",
                    route_to(Ipv4Addr::new(10, 9, 1, 0), 1),
                    NLM_F_CREATE | NLM_F_EXCL,
                ));
            let err = nl.batch(&batch).unwrap_err();
            assert_eq!(err.errno(), Some(libc::EEXIST), "{err}");
            assert!(err.to_string().starts_with("netlink route b: "), "{err}");

            // The same, tolerating EEXIST, succeeds; and the socket is still
            // in step: a dump afterwards sees both routes of the batch.
            let mut batch = Batch::new();
            batch
                .push(
                    Request::new(
                        "route b",
                        route_to(Ipv4Addr::new(10, 9, 1, 0), 1),
                        NLM_F_CREATE | NLM_F_EXCL,
                    )
                    .tolerating(libc::EEXIST),
                )
                .push(Request::new(
                    "route c",
                    route_to(Ipv4Addr::new(10, 9, 2, 0), 1),
                    NLM_F_CREATE,
                ));
            nl.batch(&batch).unwrap();
            let mut get = RouteMessage::default();
            get.header.address_family = netlink_packet_route::AddressFamily::Inet;
            let routes = nl
                .dump("route show", RouteNetlinkMessage::GetRoute(get))
                .unwrap();
            let ours = routes
                .iter()
                .filter(|m| matches!(m, RouteNetlinkMessage::NewRoute(r) if r.header.protocol == RouteProtocol::Static))
                .count();
            assert_eq!(ours, 2, "{routes:?}");
        });
    }
}
