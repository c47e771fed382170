// SPDX-License-Identifier: Apache-2.0
//! Requests over one socket: sequence numbers, acks, dumps and batches,
//! generic over the protocol's message type.

use std::marker::PhantomData;
use std::os::fd::BorrowedFd;
use std::time::Duration;

use netlink_packet_core::{NetlinkDeserializable, NetlinkHeader, NetlinkSerializable};

use crate::socket::{Socket, Transport};
use crate::wire::{
    self, Ack, Frame, NLMSG_DONE, NLMSG_ERROR, NLMSG_HDRLEN, NLMSG_NOOP, NLMSG_OVERRUN, NLM_F_ACK,
    NLM_F_DUMP, NLM_F_REQUEST,
};
use crate::{NetlinkError, Result};

/// A datagram the kernel sends is at most 32 KiB for a dump (more only if a
/// receive asked for more), so 64 KiB is never cut short.
const RECV_BUF: usize = 64 * 1024;

/// What a message type needs to travel over [`Netlink`]:
/// `RouteNetlinkMessage` for NETLINK_ROUTE, [`RawMessage`](crate::RawMessage)
/// for protocols built by hand.
pub trait Message: NetlinkSerializable + NetlinkDeserializable {}
impl<M: NetlinkSerializable + NetlinkDeserializable> Message for M {}

/// One socket and its sequence numbers: requests that wait for their ack,
/// gets, dumps, and batches sent in one `sendmsg`. Every answer is matched
/// to its request by sequence number; anything else on the socket (a late
/// answer to an earlier request) is skipped.
pub struct Netlink<M, T = Socket> {
    transport: T,
    pub(crate) seq: u32,
    buf: Vec<u8>,
    out: Vec<u8>,
    _message: PhantomData<fn(M) -> M>,
}

impl<M: Message> Netlink<M, Socket> {
    /// A socket of `protocol` in the calling thread's network namespace.
    pub fn open(protocol: isize) -> Result<Self> {
        Ok(Self::with_transport(Socket::open(protocol)?))
    }

    /// A socket of `protocol` in the network namespace `netns`.
    pub fn open_in_netns(protocol: isize, netns: BorrowedFd<'_>) -> Result<Self> {
        Ok(Self::with_transport(Socket::open_in_netns(
            protocol, netns,
        )?))
    }

    /// See [`Socket::set_recv_timeout`].
    pub fn set_recv_timeout(&self, timeout: Duration) -> Result<()> {
        self.transport.set_recv_timeout(timeout)
    }
}

impl<M: Message, T: Transport> Netlink<M, T> {
    pub fn with_transport(transport: T) -> Self {
        Self {
            transport,
            seq: 0,
            buf: Vec::new(),
            out: Vec::new(),
            _message: PhantomData,
        }
    }

    pub fn transport(&self) -> &T {
        &self.transport
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn send_one(&mut self, what: &str, msg: &M, flags: u16) -> Result<u32> {
        let seq = self.next_seq();
        self.out.clear();
        encode(&mut self.out, msg, flags, seq);
        self.transport
            .send(&self.out)
            .map_err(|source| NetlinkError::Io {
                request: what.into(),
                source,
            })?;
        Ok(seq)
    }

    /// Receives datagrams and hands `each` every message in them, until it
    /// says stop.
    fn receive(
        &mut self,
        what: &str,
        mut each: impl FnMut(&Frame<'_>) -> Result<bool>,
    ) -> Result<()> {
        if self.buf.capacity() < RECV_BUF {
            self.buf.reserve(RECV_BUF);
        }
        loop {
            self.transport
                .recv(&mut self.buf)
                .map_err(|source| NetlinkError::Io {
                    request: what.into(),
                    source,
                })?;
            for frame in wire::frames(&self.buf) {
                let frame = frame.map_err(|e| NetlinkError::decode(what, e))?;
                if each(&frame)? {
                    return Ok(());
                }
            }
        }
    }

    /// Sends `msg` with NLM_F_ACK and `flags` (NLM_F_CREATE, ...) and waits
    /// for the kernel's answer.
    pub fn request(&mut self, what: &str, msg: M, flags: u16) -> Result<()> {
        let seq = self.send_one(what, &msg, NLM_F_REQUEST | NLM_F_ACK | flags)?;
        self.receive(what, |frame| {
            if frame.seq != seq || frame.kind != NLMSG_ERROR {
                return Ok(false);
            }
            match ack(what, frame)? {
                Ack { errno: 0, .. } => Ok(true),
                Ack { errno, message, .. } => Err(NetlinkError::kernel(what, errno, message)),
            }
        })
    }

    /// Sends a request that the kernel answers with one message (a
    /// `RTM_GETLINK` for one link, say): that message, or `None` if the
    /// kernel answered with a bare ack.
    pub fn get(&mut self, what: &str, msg: M, flags: u16) -> Result<Option<M>> {
        let seq = self.send_one(what, &msg, NLM_F_REQUEST | flags)?;
        let mut reply = None;
        self.receive(what, |frame| {
            if frame.seq != seq {
                return Ok(false);
            }
            match frame.kind {
                NLMSG_ERROR => match ack(what, frame)? {
                    Ack { errno: 0, .. } => Ok(true),
                    Ack { errno, message, .. } => Err(NetlinkError::kernel(what, errno, message)),
                },
                NLMSG_NOOP | NLMSG_OVERRUN | NLMSG_DONE => Ok(false),
                _ => {
                    reply = Some(decode(what, frame)?);
                    Ok(true)
                }
            }
        })?;
        Ok(reply)
    }

    /// Sends a dump request and collects every message of the answer, which
    /// may span many datagrams, up to NLMSG_DONE.
    pub fn dump(&mut self, what: &str, msg: M) -> Result<Vec<M>> {
        let seq = self.send_one(what, &msg, NLM_F_REQUEST | NLM_F_DUMP)?;
        let mut out = Vec::new();
        self.receive(what, |frame| {
            if frame.seq != seq {
                return Ok(false);
            }
            match frame.kind {
                NLMSG_DONE => match Ack::from_done(frame) {
                    Ack { errno: 0, .. } => Ok(true),
                    Ack { errno, message, .. } => Err(NetlinkError::kernel(what, errno, message)),
                },
                NLMSG_ERROR => match ack(what, frame)? {
                    Ack { errno: 0, .. } => Ok(true),
                    Ack { errno, message, .. } => Err(NetlinkError::kernel(what, errno, message)),
                },
                NLMSG_NOOP | NLMSG_OVERRUN => Ok(false),
                _ => {
                    out.push(decode(what, frame)?);
                    Ok(false)
                }
            }
        })?;
        Ok(out)
    }

    /// Sends every request of `batch` in one `sendmsg`, numbered in order,
    /// and waits for the answer to each that asked for an ack. The first
    /// refusal a request does not tolerate ends the wait and is the error
    /// (the kernel may not answer what follows it).
    pub fn batch(&mut self, batch: &Batch<M>) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let first = self.seq.wrapping_add(1);
        self.seq = self.seq.wrapping_add(batch.requests.len() as u32);
        self.out.clear();
        batch.encode(first, &mut self.out);
        let what = batch
            .requests
            .first()
            .map(|r| r.what.as_str())
            .unwrap_or("batch");
        self.transport
            .send(&self.out)
            .map_err(|source| NetlinkError::Io {
                request: what.into(),
                source,
            })?;
        let mut waiting: Vec<bool> = batch.requests.iter().map(|r| r.ack).collect();
        let mut left = waiting.iter().filter(|w| **w).count();
        if left == 0 {
            return Ok(());
        }
        self.receive(what, |frame| {
            let Some(index) = batch.answer(first, frame)? else {
                return Ok(false);
            };
            if std::mem::take(&mut waiting[index]) {
                left -= 1;
            }
            Ok(left == 0)
        })
    }
}

impl<M: Message, T: Transport> Netlink<M, T> {
    /// Sends the requests of `batch`, then the get `msg`, in one datagram,
    /// and returns the get's answer as [`Netlink::get`] does: "make it,
    /// then say what it is" in one send and one receive. The kernel
    /// handles the messages in order, so a refusal of a batch request
    /// arrives before the get's answer, and is the error. Requests of the
    /// batch that ask for an ack cost a receive each; build it without.
    pub fn batch_get(
        &mut self,
        batch: &Batch<M>,
        what: &str,
        msg: M,
        flags: u16,
    ) -> Result<Option<M>> {
        let first = self.seq.wrapping_add(1);
        self.seq = self.seq.wrapping_add(batch.requests.len() as u32);
        self.out.clear();
        batch.encode(first, &mut self.out);
        let seq = self.next_seq();
        encode(&mut self.out, &msg, NLM_F_REQUEST | flags, seq);
        let sent = batch.requests.first().map_or(what, |r| r.what.as_str());
        self.transport
            .send(&self.out)
            .map_err(|source| NetlinkError::Io {
                request: sent.into(),
                source,
            })?;
        let mut reply = None;
        self.receive(what, |frame| {
            if frame.seq == seq {
                return match frame.kind {
                    NLMSG_ERROR => match ack(what, frame)? {
                        Ack { errno: 0, .. } => Ok(true),
                        Ack { errno, message, .. } => {
                            Err(NetlinkError::kernel(what, errno, message))
                        }
                    },
                    NLMSG_NOOP | NLMSG_OVERRUN | NLMSG_DONE => Ok(false),
                    _ => {
                        reply = Some(decode(what, frame)?);
                        Ok(true)
                    }
                };
            }
            batch.answer(first, frame)?;
            Ok(false)
        })?;
        Ok(reply)
    }
}

fn ack(what: &str, frame: &Frame<'_>) -> Result<Ack> {
    Ack::from_error(frame).map_err(|e| NetlinkError::decode(what, e))
}

fn decode<M: Message>(what: &str, frame: &Frame<'_>) -> Result<M> {
    let mut header = NetlinkHeader::default();
    header.length = (NLMSG_HDRLEN + frame.payload.len()) as u32;
    header.message_type = frame.kind;
    header.flags = frame.flags;
    header.sequence_number = frame.seq;
    header.port_number = frame.port;
    M::deserialize(&header, frame.payload).map_err(|e| NetlinkError::decode(what, e))
}

/// Appends `msg` with its header to `out`, padded to 4 bytes.
fn encode<M: NetlinkSerializable>(out: &mut Vec<u8>, msg: &M, flags: u16, seq: u32) {
    let start = out.len();
    let len = NLMSG_HDRLEN + msg.buffer_len();
    out.resize(start + wire::align(len), 0);
    header(out, start, len, msg.message_type(), flags, seq);
    msg.serialize(&mut out[start + NLMSG_HDRLEN..start + len]);
}

/// Writes a message header at `out[start..]`. Port id 0: the message is
/// for the kernel.
fn header(out: &mut [u8], start: usize, len: usize, kind: u16, flags: u16, seq: u32) {
    let h = &mut out[start..start + NLMSG_HDRLEN];
    h[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
    h[4..6].copy_from_slice(&kind.to_ne_bytes());
    h[6..8].copy_from_slice(&flags.to_ne_bytes());
    h[8..12].copy_from_slice(&seq.to_ne_bytes());
    h[12..16].fill(0);
}

/// One request of a [`Batch`], serialized when made (so a batch holds
/// bytes, whatever the message type).
pub struct Request<M> {
    what: String,
    kind: u16,
    body: Vec<u8>,
    flags: u16,
    ack: bool,
    tolerated: Option<i32>,
    _message: PhantomData<fn(M) -> M>,
}

impl<M: NetlinkSerializable> Request<M> {
    /// `msg` with NLM_F_REQUEST, NLM_F_ACK and `flags`; `what` names it in
    /// an error ("link add veth0").
    pub fn new(what: impl Into<String>, msg: M, flags: u16) -> Self {
        let mut body = vec![0; msg.buffer_len()];
        msg.serialize(&mut body);
        Self {
            what: what.into(),
            kind: msg.message_type(),
            body,
            flags,
            ack: true,
            tolerated: None,
            _message: PhantomData,
        }
    }
}

impl<M> Request<M> {
    /// Without NLM_F_ACK: the kernel answers only if it refuses (the
    /// begin and end markers of an nf_tables batch).
    pub fn without_ack(mut self) -> Self {
        self.ack = false;
        self
    }

    /// A refusal with `errno` counts as success ("file exists" for a
    /// qdisc that is already there).
    pub fn tolerating(mut self, errno: i32) -> Self {
        self.tolerated = Some(errno);
        self
    }
}

/// Requests sent together in one `sendmsg` by [`Netlink::batch`].
pub struct Batch<M> {
    requests: Vec<Request<M>>,
}

impl<M> Default for Batch<M> {
    fn default() -> Self {
        Self {
            requests: Vec::new(),
        }
    }
}

impl<M> Batch<M> {
    pub fn new() -> Self {
        Self::default()
    }

    /// `frame` seen as the answer to one of this batch's requests, whose
    /// sequence numbers start at `first`: the request's index if it is an
    /// ack of one, an error if it refuses one (unless the request
    /// tolerates that errno), `None` if it answers none.
    fn answer(&self, first: u32, frame: &Frame<'_>) -> Result<Option<usize>> {
        let index = frame.seq.wrapping_sub(first) as usize;
        let Some(request) = self.requests.get(index) else {
            return Ok(None);
        };
        if frame.kind != NLMSG_ERROR {
            return Ok(None);
        }
        let answer = ack(&request.what, frame)?;
        if answer.errno != 0 && Some(answer.errno) != request.tolerated {
            return Err(NetlinkError::kernel(
                request.what.clone(),
                answer.errno,
                answer.message,
            ));
        }
        Ok(Some(index))
    }

    pub fn push(&mut self, request: Request<M>) -> &mut Self {
        self.requests.push(request);
        self
    }

    pub fn len(&self) -> usize {
        self.requests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }

    /// Asks for an ack from the last request only. The kernel handles the
    /// requests of one datagram in order and answers a request without
    /// NLM_F_ACK only when it refuses it, so every refusal is queued before
    /// the last request's answer: [`Netlink::batch`] still sees each one,
    /// and a batch that succeeds takes one receive instead of one per
    /// request. (A refused request does not stop the kernel from handling
    /// the ones after it; callers that undo the whole batch on an error,
    /// as ADD does by deleting the veth, do not mind.)
    pub fn ack_last_only(&mut self) -> &mut Self {
        let n = self.requests.len();
        for (i, r) in self.requests.iter_mut().enumerate() {
            r.ack = i + 1 == n;
        }
        self
    }

    /// The requests' bytes as one datagram, numbered from `first_seq`, and
    /// (sequence number, name) of each that asks for an ack: what
    /// [`Netlink::batch`] sends, and what tests compare with captures.
    pub fn encode(&self, first_seq: u32, out: &mut Vec<u8>) -> Vec<(u32, &str)> {
        let mut acked = Vec::new();
        for (i, r) in self.requests.iter().enumerate() {
            let seq = first_seq.wrapping_add(i as u32);
            let ack = if r.ack { NLM_F_ACK } else { 0 };
            let start = out.len();
            let len = NLMSG_HDRLEN + r.body.len();
            out.resize(start + wire::align(len), 0);
            header(out, start, len, r.kind, NLM_F_REQUEST | ack | r.flags, seq);
            out[start + NLMSG_HDRLEN..start + len].copy_from_slice(&r.body);
            if r.ack {
                acked.push((seq, r.what.as_str()));
            }
        }
        acked
    }
}
