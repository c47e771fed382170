//! Attaching to a host veth: a clsact qdisc and two cls_bpf direct-action
//! filters, as netlink-packet-route's typed tc messages over ferrite's
//! netlink layer (no `tc`, no name lookups).
//!
//! One `sendmsg` carries the three requests (qdisc, ingress filter, egress
//! filter), ADD's in the host veth's own datagram; only the last asks for
//! an ack, and the kernel answers the others only if it refuses them
//! (`Batch::ack_last_only`): one receive. Filters use a fixed
//! priority and handle, so attaching again replaces ferrite's own filters and
//! nobody else's. A clsact filter lives and dies with the veth; nothing to
//! clean up on DEL.

use std::os::fd::{AsRawFd, BorrowedFd};

use ferrite_netlink::route::{self, RouteNetlink};
use ferrite_netlink::wire::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use ferrite_netlink::{Batch, Request};
use netlink_packet_route::tc::{
    TcAttribute, TcBpfFlags, TcFilterBpf, TcFilterBpfOption, TcHandle, TcMessage, TcOption,
};
use netlink_packet_route::RouteNetlinkMessage;

/// A failed tc request: its name says which and on which device, and the
/// kernel's extended ack, when it gave one, follows the errno.
pub type TcError = ferrite_netlink::NetlinkError;

/// Priority of ferrite's filters (`tc filter ... pref`).
pub const TC_PRIORITY: u16 = 1;
/// Handle of ferrite's filters (`tc filter ... handle`).
pub const TC_HANDLE: u32 = 0xfe;

/// `ffff:` — the clsact qdisc's own handle.
const CLSACT_HANDLE: TcHandle = TcHandle {
    major: 0xffff,
    minor: 0,
};
/// `ffff:fff2` (TC_H_MIN_INGRESS) and `ffff:fff3` (TC_H_MIN_EGRESS): the
/// parents of clsact's two hooks.
const INGRESS_PARENT: TcHandle = TcHandle {
    major: 0xffff,
    minor: 0xfff2,
};
const EGRESS_PARENT: TcHandle = TcHandle {
    major: 0xffff,
    minor: 0xfff3,
};
const ETH_P_ALL: u16 = 0x0003;

/// Which directions of a veth run this version's programs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Attachment {
    /// tc ingress (packets from the pod) runs `from_pod`.
    pub ingress: bool,
    /// tc egress (packets to the pod) runs `to_pod`.
    pub egress: bool,
}

/// `tc qdisc add dev <ifindex> clsact`
fn clsact(ifindex: u32) -> RouteNetlinkMessage {
    let mut msg = TcMessage::with_index(ifindex as i32);
    msg.header.handle = CLSACT_HANDLE;
    msg.header.parent = TcHandle::CLSACT;
    msg.attributes.push(TcAttribute::Kind("clsact".into()));
    RouteNetlinkMessage::NewQueueDiscipline(msg)
}

/// `tc filter replace dev <ifindex> <parent> pref 1 handle 0xfe protocol
/// all bpf direct-action fd <prog> name <name>`
fn bpf_filter(
    ifindex: u32,
    parent: TcHandle,
    prog: BorrowedFd<'_>,
    name: &str,
) -> RouteNetlinkMessage {
    let mut msg = TcMessage::with_index(ifindex as i32);
    msg.header.handle = TcHandle::from(TC_HANDLE);
    msg.header.parent = parent;
    // tcm_info: the priority above, the protocol (network order) below.
    msg.header.info = (u32::from(TC_PRIORITY) << 16) | u32::from(ETH_P_ALL.to_be());
    msg.attributes
        .push(TcAttribute::Kind(TcFilterBpf::KIND.into()));
    msg.attributes.push(TcAttribute::Options(vec![
        TcOption::Bpf(TcFilterBpfOption::ProgFd(prog.as_raw_fd() as u32)),
        TcOption::Bpf(TcFilterBpfOption::ProgName(name.into())),
        TcOption::Bpf(TcFilterBpfOption::Flags(TcBpfFlags::DirectAction)),
    ]));
    RouteNetlinkMessage::NewTrafficFilter(msg)
}

/// The attach requests: the qdisc (an existing clsact is what we want)
/// and ferrite's two filters, in this order. ADD sends them in the host
/// veth's own datagram ([`crate::Datapath::attach_requests`]), so a pod
/// pays one RTNL wait fewer; [`attach`] sends them alone.
pub(crate) fn attach_requests(
    ifindex: u32,
    from_pod: BorrowedFd<'_>,
    to_pod: BorrowedFd<'_>,
) -> [Request<RouteNetlinkMessage>; 3] {
    [
        Request::new(
            format!("RTM_NEWQDISC clsact on ifindex {ifindex}"),
            clsact(ifindex),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .tolerating(libc::EEXIST),
        Request::new(
            format!("RTM_NEWTFILTER ingress from_pod on ifindex {ifindex}"),
            bpf_filter(ifindex, INGRESS_PARENT, from_pod, "ferrite_from_pod"),
            NLM_F_CREATE | NLM_F_REPLACE,
        ),
        Request::new(
            format!("RTM_NEWTFILTER egress to_pod on ifindex {ifindex}"),
            bpf_filter(ifindex, EGRESS_PARENT, to_pod, "ferrite_to_pod"),
            NLM_F_CREATE | NLM_F_REPLACE,
        ),
    ]
}

/// The attach requests alone in one batch, acked by the last one's answer.
fn attach_batch(
    ifindex: u32,
    from_pod: BorrowedFd<'_>,
    to_pod: BorrowedFd<'_>,
) -> Batch<RouteNetlinkMessage> {
    let mut batch = Batch::new();
    for request in attach_requests(ifindex, from_pod, to_pod) {
        batch.push(request);
    }
    batch.ack_last_only();
    batch
}

/// Adds clsact (if absent) and ferrite's filters on `ifindex`, in one
/// `sendmsg` over `nl`, a socket in the device's namespace.
pub(crate) fn attach(
    nl: &mut RouteNetlink,
    ifindex: u32,
    from_pod: BorrowedFd<'_>,
    to_pod: BorrowedFd<'_>,
) -> Result<(), TcError> {
    nl.batch(&attach_batch(ifindex, from_pod, to_pod))
}

/// Program ids of the direct-action bpf filters under `parent`.
fn filter_prog_ids(
    nl: &mut RouteNetlink,
    ifindex: u32,
    parent: TcHandle,
    direction: &str,
) -> Result<Vec<u32>, TcError> {
    let mut msg = TcMessage::with_index(ifindex as i32);
    msg.header.parent = parent;
    let replies = nl.dump(
        &format!("RTM_GETTFILTER {direction} on ifindex {ifindex}"),
        RouteNetlinkMessage::GetTrafficFilter(msg),
    )?;
    Ok(replies.iter().filter_map(direct_action_prog_id).collect())
}

/// The program id of a direct-action bpf filter.
fn direct_action_prog_id(msg: &RouteNetlinkMessage) -> Option<u32> {
    let RouteNetlinkMessage::NewTrafficFilter(filter) = msg else {
        return None;
    };
    let mut is_bpf = false;
    let mut id = None;
    let mut direct = false;
    for attr in &filter.attributes {
        match attr {
            TcAttribute::Kind(kind) => is_bpf = kind == TcFilterBpf::KIND,
            TcAttribute::Options(options) => {
                for option in options {
                    match option {
                        TcOption::Bpf(TcFilterBpfOption::ProgId(i)) => id = Some(*i),
                        TcOption::Bpf(TcFilterBpfOption::Flags(f)) => {
                            direct = f.contains(TcBpfFlags::DirectAction)
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    id.filter(|_| is_bpf && direct)
}

/// Every bpf program id attached at ingress and egress of `ifindex`.
pub(crate) fn attached_ids(ifindex: u32) -> Result<Vec<u32>, TcError> {
    let mut nl = route::open()?;
    let mut ids = filter_prog_ids(&mut nl, ifindex, INGRESS_PARENT, "ingress")?;
    ids.extend(filter_prog_ids(&mut nl, ifindex, EGRESS_PARENT, "egress")?);
    Ok(ids)
}

/// Whether ingress runs `from_pod_id` and egress `to_pod_id`.
pub(crate) fn attachment(
    ifindex: u32,
    from_pod_id: u32,
    to_pod_id: u32,
) -> Result<Attachment, TcError> {
    let mut nl = route::open()?;
    let ingress = filter_prog_ids(&mut nl, ifindex, INGRESS_PARENT, "ingress")?;
    let egress = filter_prog_ids(&mut nl, ifindex, EGRESS_PARENT, "egress")?;
    Ok(Attachment {
        ingress: ingress.contains(&from_pod_id),
        egress: egress.contains(&to_pod_id),
    })
}

#[cfg(test)]
mod tests {
    use ferrite_test_support::hex;
    use std::os::fd::AsFd;

    use ferrite_netlink::wire::{self, NLM_F_ACK, NLM_F_REQUEST};
    use netlink_packet_core::{NetlinkDeserializable, NetlinkHeader};

    use super::*;

    /// The attach batch for ifindex 7 is byte for byte what the hand-built
    /// messages before it sent (and kernel 6.18 accepted): RTM_NEWQDISC
    /// clsact, then RTM_NEWTFILTER at ingress and at egress. One
    /// difference: netlink-packet-route writes TCA_OPTIONS without
    /// NLA_F_NESTED (0x0002 where the old bytes had 0x8002); cls_bpf parses
    /// its options either way (nla_parse_nested_deprecated).
    #[test]
    fn attach_batch_bytes() {
        let from = std::fs::File::open("/dev/null").unwrap();
        let to = std::fs::File::open("/dev/null").unwrap();
        let fd_hex = |f: &std::fs::File| {
            let n = f.as_fd().as_raw_fd() as u32;
            n.to_ne_bytes()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        };
        let batch = attach_batch(7, from.as_fd(), to.as_fd());
        let mut bytes = Vec::new();
        let acked = batch.encode(1, &mut bytes);
        assert_eq!(acked.iter().map(|a| a.0).collect::<Vec<_>>(), vec![3]);
        assert_eq!(acked[0].1, "RTM_NEWTFILTER egress to_pod on ifindex 7");
        // (message length, options length, sequence number, parent,
        // program fd, TCA_BPF_NAME with its padding)
        // Only the last request asks for an ack (NLM_F_ACK, 0x0004).
        let filter =
            |flags: &str, len: &str, opts: &str, seq: &str, parent: &str, fd: &str, name: &str| {
                hex(&format!(
                    "{len} 2c00 {flags} {seq} 00000000
                 00000000 07000000 fe000000 {parent} 00030100
                 08000100 62706600
                 {opts} 0200
                   08000600 {fd}
                   {name}
                   08000800 01000000"
                ))
            };
        let expected = [
            hex("30000000 2400 0106 01000000 00000000
                 00000000 07000000 0000ffff f1ffffff 00000000
                 0b000100 636c7361637400 00"),
            filter(
                "0105",
                "58000000",
                "2c00",
                "02000000",
                "f2ffffff",
                &fd_hex(&from),
                "15000700 666572726974655f66726f6d5f706f64 00000000",
            ),
            filter(
                "0505",
                "54000000",
                "2800",
                "03000000",
                "f3ffffff",
                &fd_hex(&to),
                "13000700 666572726974655f746f5f706f64 0000",
            ),
        ]
        .concat();
        assert_eq!(bytes, expected);
        let flags: Vec<u16> = wire::frames(&bytes).map(|f| f.unwrap().flags).collect();
        assert_eq!(
            flags,
            vec![
                NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL,
                NLM_F_REQUEST | NLM_F_CREATE | NLM_F_REPLACE,
                NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
            ]
        );
    }

    fn parse_filter(body: &[u8]) -> RouteNetlinkMessage {
        let mut header = NetlinkHeader::default();
        header.message_type = 44; // RTM_NEWTFILTER
        RouteNetlinkMessage::deserialize(&header, body).unwrap()
    }

    /// `RTM_GETTFILTER` dump of ingress (ffff:fff2) of a veth with ifindex
    /// 3 after `tc filter add dev d0 ingress pref 1 handle 0xfe bpf da obj
    /// cls.o sec classifier`, as kernel 6.18 answered it: first the
    /// priority's own entry (handle 0, no options), then the filter
    /// (program id 405, name, direct-action, not_in_hw, tag).
    const DUMP_HEAD: &str = "00000000 03000000 00000000 f2ffffff 00030100
        08000100 62706600 08000b00 00000000";
    const DUMP_FILTER: &str = "00000000 03000000 fe000000 f2ffffff 00030100
        08000100 62706600 08000b00 00000000
        4000 0200
          17000700 636c732e6f3a5b636c61737369666965725d00 00
          08000b00 95010000
          0c000a00 59f4a931744dcdc6
          08000800 01000000
          08000900 08000000";

    #[test]
    fn filter_dump_replies_give_direct_action_ids() {
        assert_eq!(direct_action_prog_id(&parse_filter(&hex(DUMP_HEAD))), None);
        let mut filter = hex(DUMP_FILTER);
        assert_eq!(direct_action_prog_id(&parse_filter(&filter)), Some(405));
        // The same filter without direct-action (TCA_BPF_FLAGS 0) is not
        // one of ferrite's.
        let flags_at = filter.len() - 12;
        assert_eq!(&filter[flags_at - 4..flags_at], &[8, 0, 8, 0]);
        filter[flags_at] = 0;
        assert_eq!(direct_action_prog_id(&parse_filter(&filter)), None);
    }
}
