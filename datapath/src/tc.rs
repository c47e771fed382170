//! Attaching to a host veth: a clsact qdisc and two cls_bpf direct-action
//! filters, written as rtnetlink messages (no `tc`, no name lookups).
//!
//! One `sendmsg` carries the three requests (qdisc, ingress filter, egress
//! filter); the kernel answers each with an ack. Filters use a fixed
//! priority and handle, so attaching again replaces ferrite's own filters and
//! nobody else's. A clsact filter lives and dies with the veth; nothing to
//! clean up on DEL.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
};

use thiserror::Error;

/// Priority of ferrite's filters (`tc filter ... pref`).
pub const TC_PRIORITY: u16 = 1;
/// Handle of ferrite's filters (`tc filter ... handle`).
pub const TC_HANDLE: u32 = 0xfe;

const TC_H_CLSACT: u32 = 0xffff_fff1;
const TC_H_MIN_INGRESS: u32 = 0xfff2;
const TC_H_MIN_EGRESS: u32 = 0xfff3;
const CLSACT_HANDLE: u32 = 0xffff_0000;
const INGRESS_PARENT: u32 = 0xffff_0000 | TC_H_MIN_INGRESS;
const EGRESS_PARENT: u32 = 0xffff_0000 | TC_H_MIN_EGRESS;

const RTM_NEWQDISC: u16 = 36;
const RTM_NEWTFILTER: u16 = 44;
const RTM_GETTFILTER: u16 = 46;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CAPPED: u16 = 0x100;
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSGERR_ATTR_MSG: u16 = 1;

const SOL_NETLINK: i32 = 270;
const NETLINK_CAP_ACK: i32 = 10;
const NETLINK_EXT_ACK: i32 = 11;

const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_BPF_FD: u16 = 6;
const TCA_BPF_NAME: u16 = 7;
const TCA_BPF_FLAGS: u16 = 8;
const TCA_BPF_ID: u16 = 11;
const TCA_BPF_FLAG_ACT_DIRECT: u32 = 1;
const NLA_F_NESTED: u16 = 0x8000;

const ETH_P_ALL: u16 = 0x0003;

const NLMSG_HDR_LEN: usize = 16;
const TCMSG_LEN: usize = 20;

#[derive(Debug, Error)]
pub enum TcError {
    #[error("netlink socket: {call}: {source}")]
    Socket {
        call: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{request} on ifindex {ifindex}: {source}{}", extack.as_deref().map(|m| format!(" ({m})")).unwrap_or_default())]
    Request {
        request: &'static str,
        ifindex: u32,
        #[source]
        source: io::Error,
        /// The kernel's extended ack message, when it gave one.
        extack: Option<String>,
    },
    #[error("malformed netlink reply to {request}")]
    Malformed { request: &'static str },
}

/// Which directions of a veth run this version's programs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Attachment {
    /// tc ingress (packets from the pod) runs `from_pod`.
    pub ingress: bool,
    /// tc egress (packets to the pod) runs `to_pod`.
    pub egress: bool,
}

/// A netlink message under construction.
struct Message {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

impl Message {
    fn new(kind: u16, flags: u16, seq: u32, tcm: TcMsg) -> Self {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set in finish()
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        buf.push(libc::AF_UNSPEC as u8);
        buf.extend_from_slice(&[0; 3]);
        buf.extend_from_slice(&tcm.ifindex.to_ne_bytes());
        buf.extend_from_slice(&tcm.handle.to_ne_bytes());
        buf.extend_from_slice(&tcm.parent.to_ne_bytes());
        buf.extend_from_slice(&tcm.info.to_ne_bytes());
        Self {
            buf,
            nests: Vec::new(),
        }
    }

    fn attr(&mut self, kind: u16, payload: &[u8]) -> &mut Self {
        self.buf
            .extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.pad();
        self
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn begin_nest(&mut self, kind: u16) -> &mut Self {
        self.nests.push(self.buf.len());
        self.attr(kind | NLA_F_NESTED, &[])
    }

    fn end_nest(&mut self) -> &mut Self {
        let start = self.nests.pop().expect("nest begun");
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

#[derive(Clone, Copy)]
struct TcMsg {
    ifindex: u32,
    handle: u32,
    parent: u32,
    info: u32,
}

struct Socket {
    fd: OwnedFd,
}

fn sock_err(call: &'static str) -> TcError {
    TcError::Socket {
        call,
        source: io::Error::last_os_error(),
    }
}

impl Socket {
    fn open() -> Result<Self, TcError> {
        // SAFETY: plain socket(2).
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(sock_err("socket(AF_NETLINK)"));
        }
        // SAFETY: a new descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        for opt in [NETLINK_EXT_ACK, NETLINK_CAP_ACK] {
            let one: libc::c_int = 1;
            // SAFETY: valid option value pointer and length. Failure only
            // costs error detail, so it is ignored.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    SOL_NETLINK,
                    opt,
                    (&one as *const libc::c_int).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
        }
        Ok(Self { fd })
    }

    fn send(&self, buf: &[u8]) -> Result<(), TcError> {
        // SAFETY: zeroed sockaddr_nl addresses the kernel.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: buf and addr are valid for the given lengths.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                0,
                (&addr as *const libc::sockaddr_nl).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(sock_err("sendto"));
        }
        Ok(())
    }

    fn recv<'a>(&self, buf: &'a mut [u8]) -> Result<&'a [u8], TcError> {
        loop {
            // SAFETY: buf is valid for writes of its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n >= 0 {
                return Ok(&buf[..n as usize]);
            }
            if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                return Err(sock_err("recv"));
            }
        }
    }
}

/// One message of a reply.
struct Reply<'a> {
    kind: u16,
    flags: u16,
    seq: u32,
    payload: &'a [u8],
}

fn replies(mut buf: &[u8]) -> impl Iterator<Item = Reply<'_>> {
    std::iter::from_fn(move || {
        if buf.len() < NLMSG_HDR_LEN {
            return None;
        }
        let len = u32::from_ne_bytes(buf[0..4].try_into().ok()?) as usize;
        if len < NLMSG_HDR_LEN || len > buf.len() {
            return None;
        }
        let reply = Reply {
            kind: u16::from_ne_bytes(buf[4..6].try_into().ok()?),
            flags: u16::from_ne_bytes(buf[6..8].try_into().ok()?),
            seq: u32::from_ne_bytes(buf[8..12].try_into().ok()?),
            payload: &buf[NLMSG_HDR_LEN..len],
        };
        buf = &buf[((len + 3) & !3).min(buf.len())..];
        Some(reply)
    })
}

/// Attributes in `buf`, as (type without flags, payload).
fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & !(NLA_F_NESTED | 0x4000);
        if len < 4 || len > buf.len() {
            return None;
        }
        let payload = &buf[4..len];
        buf = &buf[((len + 3) & !3).min(buf.len())..];
        Some((kind, payload))
    })
}

/// The errno and extack message of an NLMSG_ERROR (errno 0 is an ack).
fn parse_error(reply: &Reply<'_>) -> Option<(i32, Option<String>)> {
    let errno = -i32::from_ne_bytes(reply.payload.get(0..4)?.try_into().ok()?);
    let mut message = None;
    if reply.flags & NLM_F_ACK_TLVS != 0 {
        // The request is echoed: just its header when capped (NETLINK_CAP_ACK).
        let echoed = if reply.flags & NLM_F_CAPPED != 0 {
            NLMSG_HDR_LEN
        } else {
            let len = u32::from_ne_bytes(reply.payload.get(4..8)?.try_into().ok()?) as usize;
            (len + 3) & !3
        };
        let tlvs = reply.payload.get(4 + echoed..).unwrap_or_default();
        message = attrs(tlvs)
            .find(|(kind, _)| *kind == NLMSGERR_ATTR_MSG)
            .map(|(_, m)| String::from_utf8_lossy(m).trim_end_matches('\0').to_owned());
    }
    Some((errno, message))
}

/// One request of the attach batch.
struct Request<'a> {
    name: &'static str,
    kind: u16,
    flags: u16,
    tcm: TcMsg,
    /// Filter name and program, for RTM_NEWTFILTER.
    filter: Option<(&'static std::ffi::CStr, BorrowedFd<'a>)>,
}

/// Adds clsact (if absent) and ferrite's filters on `ifindex`.
pub(crate) fn attach(
    ifindex: u32,
    from_pod: BorrowedFd<'_>,
    to_pod: BorrowedFd<'_>,
) -> Result<(), TcError> {
    let sock = Socket::open()?;
    let filter_info = (u32::from(TC_PRIORITY) << 16) | u32::from(ETH_P_ALL.to_be());
    let requests = [
        Request {
            name: "RTM_NEWQDISC clsact",
            kind: RTM_NEWQDISC,
            flags: NLM_F_CREATE | NLM_F_EXCL,
            tcm: TcMsg {
                ifindex,
                handle: CLSACT_HANDLE,
                parent: TC_H_CLSACT,
                info: 0,
            },
            filter: None,
        },
        Request {
            name: "RTM_NEWTFILTER ingress from_pod",
            kind: RTM_NEWTFILTER,
            flags: NLM_F_CREATE | NLM_F_REPLACE,
            tcm: TcMsg {
                ifindex,
                handle: TC_HANDLE,
                parent: INGRESS_PARENT,
                info: filter_info,
            },
            filter: Some((c"ferrite_from_pod", from_pod)),
        },
        Request {
            name: "RTM_NEWTFILTER egress to_pod",
            kind: RTM_NEWTFILTER,
            flags: NLM_F_CREATE | NLM_F_REPLACE,
            tcm: TcMsg {
                ifindex,
                handle: TC_HANDLE,
                parent: EGRESS_PARENT,
                info: filter_info,
            },
            filter: Some((c"ferrite_to_pod", to_pod)),
        },
    ];

    let mut batch = Vec::with_capacity(256);
    for (seq, req) in requests.iter().enumerate() {
        let mut msg = Message::new(
            req.kind,
            NLM_F_REQUEST | NLM_F_ACK | req.flags,
            seq as u32 + 1,
            req.tcm,
        );
        match req.filter {
            None => {
                msg.attr(TCA_KIND, b"clsact\0");
            }
            Some((name, fd)) => {
                msg.attr(TCA_KIND, b"bpf\0")
                    .begin_nest(TCA_OPTIONS)
                    .attr(TCA_BPF_FD, &(fd.as_raw_fd() as u32).to_ne_bytes())
                    .attr(TCA_BPF_NAME, name.to_bytes_with_nul())
                    .attr(TCA_BPF_FLAGS, &TCA_BPF_FLAG_ACT_DIRECT.to_ne_bytes())
                    .end_nest();
            }
        }
        batch.extend_from_slice(&msg.finish());
    }
    sock.send(&batch)?;

    let mut acked = [false; 3];
    let mut buf = vec![0u8; 8192];
    while acked.iter().any(|a| !a) {
        let data = sock.recv(&mut buf)?;
        for reply in replies(data) {
            if reply.kind != NLMSG_ERROR {
                continue;
            }
            let idx = reply.seq.wrapping_sub(1) as usize;
            let Some(request) = requests.get(idx).map(|r| r.name) else {
                continue;
            };
            let (errno, extack) = parse_error(&reply).ok_or(TcError::Malformed { request })?;
            acked[idx] = true;
            // An existing clsact qdisc is what we want.
            if errno == 0 || (idx == 0 && errno == libc::EEXIST) {
                continue;
            }
            return Err(TcError::Request {
                request,
                ifindex,
                source: io::Error::from_raw_os_error(errno),
                extack,
            });
        }
    }
    Ok(())
}

/// Program ids of the direct-action bpf filters under `parent`.
fn filter_prog_ids(
    sock: &Socket,
    ifindex: u32,
    parent: u32,
    request: &'static str,
) -> Result<Vec<u32>, TcError> {
    let tcm = TcMsg {
        ifindex,
        handle: 0,
        parent,
        info: 0,
    };
    sock.send(&Message::new(RTM_GETTFILTER, NLM_F_REQUEST | NLM_F_DUMP, 1, tcm).finish())?;
    let mut ids = Vec::new();
    let mut buf = vec![0u8; 32768];
    loop {
        let data = sock.recv(&mut buf)?;
        for reply in replies(data) {
            match reply.kind {
                NLMSG_DONE => return Ok(ids),
                NLMSG_ERROR => {
                    let (errno, extack) =
                        parse_error(&reply).ok_or(TcError::Malformed { request })?;
                    if errno == 0 {
                        return Ok(ids);
                    }
                    return Err(TcError::Request {
                        request,
                        ifindex,
                        source: io::Error::from_raw_os_error(errno),
                        extack,
                    });
                }
                RTM_NEWTFILTER => {
                    let Some(tlvs) = reply.payload.get(TCMSG_LEN..) else {
                        return Err(TcError::Malformed { request });
                    };
                    let mut is_bpf = false;
                    let mut id = None;
                    let mut direct = false;
                    for (kind, payload) in attrs(tlvs) {
                        match kind {
                            TCA_KIND => is_bpf = payload.starts_with(b"bpf\0"),
                            TCA_OPTIONS => {
                                for (kind, value) in attrs(payload) {
                                    let word = value
                                        .get(0..4)
                                        .and_then(|v| v.try_into().ok())
                                        .map(u32::from_ne_bytes);
                                    match kind {
                                        TCA_BPF_ID => id = word,
                                        TCA_BPF_FLAGS => {
                                            direct = word
                                                .is_some_and(|f| f & TCA_BPF_FLAG_ACT_DIRECT != 0)
                                        }
                                        _ => {}
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                    if let (true, true, Some(id)) = (is_bpf, direct, id) {
                        ids.push(id);
                    }
                }
                _ => {}
            }
        }
    }
}

/// Every bpf program id attached at ingress and egress of `ifindex`.
pub(crate) fn attached_ids(ifindex: u32) -> Result<Vec<u32>, TcError> {
    let sock = Socket::open()?;
    let mut ids = filter_prog_ids(&sock, ifindex, INGRESS_PARENT, "RTM_GETTFILTER ingress")?;
    ids.extend(filter_prog_ids(
        &sock,
        ifindex,
        EGRESS_PARENT,
        "RTM_GETTFILTER egress",
    )?);
    Ok(ids)
}

/// Whether ingress runs `from_pod_id` and egress `to_pod_id`.
pub(crate) fn attachment(
    ifindex: u32,
    from_pod_id: u32,
    to_pod_id: u32,
) -> Result<Attachment, TcError> {
    let sock = Socket::open()?;
    let ingress = filter_prog_ids(&sock, ifindex, INGRESS_PARENT, "RTM_GETTFILTER ingress")?;
    let egress = filter_prog_ids(&sock, ifindex, EGRESS_PARENT, "RTM_GETTFILTER egress")?;
    Ok(Attachment {
        ingress: ingress.contains(&from_pod_id),
        egress: egress.contains(&to_pod_id),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_message_bytes() {
        let tcm = TcMsg {
            ifindex: 7,
            handle: TC_HANDLE,
            parent: INGRESS_PARENT,
            info: (1 << 16) | 0x0300,
        };
        let mut msg = Message::new(RTM_NEWTFILTER, NLM_F_REQUEST | NLM_F_ACK, 2, tcm);
        msg.attr(TCA_KIND, b"bpf\0")
            .begin_nest(TCA_OPTIONS)
            .attr(TCA_BPF_FD, &5u32.to_ne_bytes())
            .end_nest();
        let bytes = msg.finish();
        let reply: Vec<_> = replies(&bytes).collect();
        assert_eq!(reply.len(), 1);
        assert_eq!(reply[0].kind, RTM_NEWTFILTER);
        assert_eq!(reply[0].seq, 2);
        let tcmsg = reply[0].payload;
        assert_eq!(&tcmsg[4..8], &7u32.to_ne_bytes());
        assert_eq!(&tcmsg[12..16], &0xffff_fff2u32.to_ne_bytes());
        let top: Vec<_> = attrs(&tcmsg[TCMSG_LEN..]).collect();
        assert_eq!(top[0], (TCA_KIND, &b"bpf\0"[..]));
        assert_eq!(top[1].0, TCA_OPTIONS);
        let inner: Vec<_> = attrs(top[1].1).collect();
        assert_eq!(inner, vec![(TCA_BPF_FD, &5u32.to_ne_bytes()[..])]);
        assert_eq!(bytes.len(), 16 + 20 + 8 + 4 + 8);
    }
}
