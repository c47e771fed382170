// SPDX-License-Identifier: Apache-2.0
//! The netlink wire format below any protocol: message headers, the answers
//! every protocol shares (NLMSG_ERROR with its extended ack, NLMSG_DONE),
//! and attributes, read and written by hand where no typed crate has them.
//!
//! From `linux/netlink.h`: a message is a 16-byte header (length, type,
//! flags, sequence number, port id) and a payload, each message starting on
//! a 4-byte boundary; an attribute is a 4-byte header (length, type) and a
//! payload, padded to 4 bytes.

/// Length of `struct nlmsghdr`.
pub const NLMSG_HDRLEN: usize = 16;
pub const NLMSG_NOOP: u16 = 1;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLMSG_OVERRUN: u16 = 4;

pub use netlink_packet_core::{
    NLM_F_ACK, NLM_F_ACK_TLVS, NLM_F_APPEND, NLM_F_CAPPED, NLM_F_CREATE, NLM_F_DUMP,
    NLM_F_DUMP_INTR, NLM_F_EXCL, NLM_F_MULTIPART, NLM_F_REPLACE, NLM_F_REQUEST,
};

/// `NLA_F_NESTED` and `NLA_F_NET_BYTEORDER`: flags in an attribute's type.
pub const NLA_F_NESTED: u16 = 0x8000;
pub const NLA_F_NET_BYTEORDER: u16 = 0x4000;

/// Extended ack attributes (`enum nlmsgerr_attrs`).
const NLMSGERR_ATTR_MSG: u16 = 1;
const NLMSGERR_ATTR_OFFS: u16 = 2;

/// `NLMSG_ALIGN`.
pub const fn align(len: usize) -> usize {
    (len + 3) & !3
}

/// One message of a datagram the kernel sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    pub port: u32,
    /// Everything after the header, up to the message's own length.
    pub payload: &'a [u8],
}

/// A datagram whose framing does not add up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed netlink message at byte {offset}: {what}")]
pub struct Malformed {
    pub offset: usize,
    pub what: &'static str,
}

/// The messages of one datagram, in order. A message whose length does not
/// fit is an error (and ends the iteration), never a silent end.
pub fn frames(buf: &[u8]) -> Frames<'_> {
    Frames { buf, offset: 0 }
}

pub struct Frames<'a> {
    buf: &'a [u8],
    offset: usize,
}

impl<'a> Iterator for Frames<'a> {
    type Item = Result<Frame<'a>, Malformed>;

    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.buf.get(self.offset..)?;
        if rest.is_empty() {
            return None;
        }
        let offset = self.offset;
        let fail = |what| Some(Err(Malformed { offset, what }));
        if rest.len() < NLMSG_HDRLEN {
            self.offset = self.buf.len();
            return fail("shorter than a header");
        }
        let len = u32::from_ne_bytes(word(rest, 0)) as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            self.offset = self.buf.len();
            return fail("length out of bounds");
        }
        let frame = Frame {
            kind: u16::from_ne_bytes([rest[4], rest[5]]),
            flags: u16::from_ne_bytes([rest[6], rest[7]]),
            seq: u32::from_ne_bytes(word(rest, 8)),
            port: u32::from_ne_bytes(word(rest, 12)),
            payload: &rest[NLMSG_HDRLEN..len],
        };
        self.offset = (offset + align(len)).min(self.buf.len());
        Some(Ok(frame))
    }
}

fn word(buf: &[u8], at: usize) -> [u8; 4] {
    [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]
}

/// The kernel's answer in an NLMSG_ERROR (or the status of an NLMSG_DONE).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ack {
    /// A positive errno, or 0 for success.
    pub errno: i32,
    /// NLMSGERR_ATTR_MSG: the kernel's own words ("Nexthop device is not up").
    pub message: Option<String>,
    /// NLMSGERR_ATTR_OFFS: where in the request the offending attribute starts.
    pub offset: Option<u32>,
}

impl Ack {
    /// Parses an NLMSG_ERROR frame. After the errno the kernel echoes the
    /// request: its header alone when the socket asked for capped acks (or
    /// the answer is a success), all of it otherwise; extended ack
    /// attributes follow when NLM_F_ACK_TLVS is set.
    pub fn from_error(frame: &Frame<'_>) -> Result<Self, Malformed> {
        let short = Malformed {
            offset: 0,
            what: "NLMSG_ERROR shorter than its errno",
        };
        let p = frame.payload;
        let code = i32::from_ne_bytes(p.get(0..4).ok_or(short)?.try_into().expect("4 bytes"));
        let mut ack = Ack {
            errno: code.saturating_neg(),
            ..Ack::default()
        };
        if frame.flags & NLM_F_ACK_TLVS != 0 {
            let echoed = if frame.flags & NLM_F_CAPPED != 0 {
                NLMSG_HDRLEN
            } else {
                let len = p.get(4..8).map(|b| u32::from_ne_bytes(word(b, 0)) as usize);
                align(len.unwrap_or(NLMSG_HDRLEN))
            };
            ack.read_tlvs(p.get(4 + echoed..).unwrap_or_default());
        }
        Ok(ack)
    }

    /// Parses an NLMSG_DONE frame: a dump's status, then (NLM_F_ACK_TLVS)
    /// extended ack attributes. An empty payload is a plain end.
    pub fn from_done(frame: &Frame<'_>) -> Self {
        let p = frame.payload;
        let Some(code) = p.get(0..4) else {
            return Ack::default();
        };
        let mut ack = Ack {
            errno: i32::from_ne_bytes(word(code, 0)).saturating_neg(),
            ..Ack::default()
        };
        if frame.flags & NLM_F_ACK_TLVS != 0 {
            ack.read_tlvs(&p[4..]);
        }
        ack
    }

    fn read_tlvs(&mut self, tlvs: &[u8]) {
        for (kind, value) in attrs(tlvs) {
            match kind {
                NLMSGERR_ATTR_MSG => {
                    let text = String::from_utf8_lossy(value);
                    let text = text.trim_end_matches('\0');
                    if !text.is_empty() {
                        self.message = Some(text.to_owned());
                    }
                }
                NLMSGERR_ATTR_OFFS if value.len() >= 4 => {
                    self.offset = Some(u32::from_ne_bytes(word(value, 0)));
                }
                _ => {}
            }
        }
    }
}

/// The attributes in `buf` as (type without the nested and byte-order
/// flags, payload). Stops at the first attribute that does not fit.
pub fn attrs(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        let kind = u16::from_ne_bytes([rest[2], rest[3]]) & !(NLA_F_NESTED | NLA_F_NET_BYTEORDER);
        if len < 4 || len > rest.len() {
            return None;
        }
        let value = &rest[4..len];
        rest = &rest[align(len).min(rest.len())..];
        Some((kind, value))
    })
}

/// Appends attributes to a message body, for protocols no typed crate
/// covers (nf_tables). Integers are written as given: the caller picks the
/// byte order the protocol wants.
pub struct AttrWriter<'a>(pub &'a mut Vec<u8>);

impl AttrWriter<'_> {
    /// One attribute, padded.
    pub fn put(&mut self, kind: u16, value: &[u8]) -> &mut Self {
        let len = 4 + value.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(value);
        self.0.resize(align(self.0.len()), 0);
        self
    }

    /// A NUL-terminated string.
    pub fn strz(&mut self, kind: u16, s: &str) -> &mut Self {
        let len = 4 + s.len() + 1;
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(s.as_bytes());
        self.0.push(0);
        self.0.resize(align(self.0.len()), 0);
        self
    }

    /// A 32-bit integer in network byte order.
    pub fn be32(&mut self, kind: u16, v: u32) -> &mut Self {
        self.put(kind, &v.to_be_bytes())
    }

    /// A nest (NLA_F_NESTED set) holding what `inner` writes.
    pub fn nest(&mut self, kind: u16, inner: impl FnOnce(&mut AttrWriter<'_>)) -> &mut Self {
        let start = self.0.len();
        self.0.extend_from_slice(&[0, 0]);
        self.0
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        inner(&mut AttrWriter(self.0));
        let len = (self.0.len() - start) as u16;
        self.0[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrite_test_support::hex;

    /// `ip route add 10.9.0.0/24 dev lo` (RTM_NEWROUTE, seq 42) sent into a
    /// fresh namespace whose lo is down, and what kernel 6.18 answered, read
    /// from a socket with NETLINK_EXT_ACK and NETLINK_CAP_ACK set ...
    const ENETDOWN_CAPPED: &str = "
        48000000 0200 0003 2a000000 a3680000
        9cffffff
        2c000000 1800 0506 2a000000 00000000
        21000100 44657669636520666f72206e657874686f70206973206e6f7420757000000000";
    /// ... and from one with NETLINK_EXT_ACK only: the whole request echoed.
    const ENETDOWN_UNCAPPED: &str = "
        64000000 0200 0002 2a000000 cc680000
        9cffffff
        2c000000 1800 0506 2a000000 00000000
        02180000 fe03fd01 00000000 08000100 0a090000 08000400 01000000
        21000100 44657669636520666f72206e657874686f70206973206e6f7420757000000000";

    #[test]
    fn extended_acks_carry_the_kernels_message() {
        for (capture, flags) in [
            (ENETDOWN_CAPPED, NLM_F_CAPPED | NLM_F_ACK_TLVS),
            (ENETDOWN_UNCAPPED, NLM_F_ACK_TLVS),
        ] {
            let bytes = hex(capture);
            let all: Vec<_> = frames(&bytes).collect::<Result<_, _>>().unwrap();
            assert_eq!(all.len(), 1);
            let f = all[0];
            assert_eq!((f.kind, f.seq, f.flags), (NLMSG_ERROR, 42, flags));
            let ack = Ack::from_error(&f).unwrap();
            assert_eq!(ack.errno, libc::ENETDOWN);
            assert_eq!(ack.message.as_deref(), Some("Device for nexthop is not up"));
            assert_eq!(ack.offset, None);
        }
    }

    #[test]
    fn uncapped_error_skips_the_whole_echoed_request() {
        // errno EINVAL, a 24-byte echoed request (header and 8 bytes of
        // body, which hold bytes that would read as an attribute), then an
        // offset and a message.
        let mut p = (-libc::EINVAL).to_ne_bytes().to_vec();
        p.extend_from_slice(&24u32.to_ne_bytes());
        p.extend_from_slice(&[0x18, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0]);
        p.extend_from_slice(&[8, 0, 1, 0, b'x', b'y', 0, 0]);
        let mut tlvs = Vec::new();
        AttrWriter(&mut tlvs)
            .put(NLMSGERR_ATTR_OFFS, &20u32.to_ne_bytes())
            .strz(NLMSGERR_ATTR_MSG, "Attribute failed policy validation");
        p.extend_from_slice(&tlvs);
        let frame = Frame {
            kind: NLMSG_ERROR,
            flags: NLM_F_ACK_TLVS,
            seq: 3,
            port: 0,
            payload: &p,
        };
        let ack = Ack::from_error(&frame).unwrap();
        assert_eq!(ack.errno, libc::EINVAL);
        assert_eq!(ack.offset, Some(20));
        assert_eq!(
            ack.message.as_deref(),
            Some("Attribute failed policy validation")
        );
        // Without NLM_F_ACK_TLVS nothing after the echo is read.
        let plain = Frame { flags: 0, ..frame };
        assert_eq!(Ack::from_error(&plain).unwrap().message, None);
    }

    #[test]
    fn success_ack_and_short_error() {
        let ok = Frame {
            kind: NLMSG_ERROR,
            flags: NLM_F_CAPPED,
            seq: 1,
            port: 0,
            payload: &[0; 20],
        };
        assert_eq!(Ack::from_error(&ok).unwrap(), Ack::default());
        let short = Frame {
            payload: &[0; 3],
            ..ok
        };
        assert!(Ack::from_error(&short).is_err());
    }

    #[test]
    fn done_may_be_empty_or_carry_an_error() {
        let empty = Frame {
            kind: NLMSG_DONE,
            flags: NLM_F_MULTIPART,
            seq: 1,
            port: 0,
            payload: &[],
        };
        assert_eq!(Ack::from_done(&empty).errno, 0);
        let mut p = (-libc::EMSGSIZE).to_ne_bytes().to_vec();
        AttrWriter(&mut p).strz(NLMSGERR_ATTR_MSG, "too big");
        let failed = Frame {
            flags: NLM_F_MULTIPART | NLM_F_ACK_TLVS,
            payload: &p,
            ..empty
        };
        let ack = Ack::from_done(&failed);
        assert_eq!(ack.errno, libc::EMSGSIZE);
        assert_eq!(ack.message.as_deref(), Some("too big"));
    }

    #[test]
    fn frames_walk_padding_and_reject_bad_lengths() {
        // Two messages, the first 18 bytes long (padded to 20).
        let mut buf = Vec::new();
        buf.extend_from_slice(&18u32.to_ne_bytes());
        buf.extend_from_slice(&[16, 0, 1, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0xaa, 0xbb, 0, 0]);
        buf.extend_from_slice(&16u32.to_ne_bytes());
        buf.extend_from_slice(&[3, 0, 2, 0, 6, 0, 0, 0, 0, 0, 0, 0]);
        let got: Vec<_> = frames(&buf).collect::<Result<_, _>>().unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(
            (got[0].kind, got[0].seq, got[0].payload),
            (16, 5, &[0xaa, 0xbb][..])
        );
        assert_eq!((got[1].kind, got[1].seq), (NLMSG_DONE, 6));

        let mut bad = buf.clone();
        bad[0] = 200;
        let got: Vec<_> = frames(&bad).collect();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].unwrap_err().what, "length out of bounds");
        assert!(frames(&buf[..10]).next().unwrap().is_err());
        assert!(frames(&[]).next().is_none());
    }

    #[test]
    fn writer_pads_and_nests() {
        let mut buf = Vec::new();
        AttrWriter(&mut buf)
            .strz(1, "abc")
            .nest(2, |n| {
                n.be32(3, 0x0102_0304);
            })
            .put(4, &[9]);
        assert_eq!(
            buf,
            hex("0800 0100 61626300  0c00 0280 0800 0300 01020304  0500 0400 09000000")
        );
        let top: Vec<_> = attrs(&buf).collect();
        assert_eq!(top.len(), 3);
        assert_eq!(top[1].0, 2);
        assert_eq!(
            attrs(top[1].1).collect::<Vec<_>>(),
            vec![(3, &[1, 2, 3, 4][..])]
        );
        assert_eq!(top[2], (4, &[9][..]));
    }
}
