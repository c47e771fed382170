// SPDX-License-Identifier: Apache-2.0
//! nf_tables over netlink, built by hand.
//!
//! The agent needs a handful of messages (a table, one nat chain, two sets
//! and a few rules), always sent as one batch so the kernel applies them
//! atomically. Building them here keeps the agent free of libnftnl and of
//! any `nft` process; the unit tests compare the bytes with what `nft`
//! 1.0.6 sends for the same ruleset (captured with `nft --debug=mnl`).
//!
//! Layout, from `linux/netfilter/nfnetlink.h` and `nf_tables.h`: every
//! message is a netlink header, a 4-byte `nfgenmsg` (family, version,
//! resource id in big endian) and attributes; integers inside attributes
//! are big endian; nests carry `NLA_F_NESTED`. A batch is framed by
//! `NFNL_MSG_BATCH_BEGIN`/`END` whose resource id names the subsystem.

use std::io;
use std::time::Duration;

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLA_F_NESTED: u16 = 0x8000;

const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNETLINK_V0: u8 = 0;

/// `NFPROTO_INET`: one table for IPv4 and IPv6.
pub const NFPROTO_INET: u8 = 1;
/// `NFPROTO_IPV4` / `NFPROTO_IPV6`, as `meta nfproto` loads them.
pub const NFPROTO_IPV4: u8 = 2;
pub const NFPROTO_IPV6: u8 = 10;

const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_FLAGS: u16 = 2;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_ID: u16 = 10;
const NFTA_SET_USERDATA: u16 = 13;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_LIST_SET_ID: u16 = 4;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;

/// `NF_INET_POST_ROUTING`.
pub const HOOK_POSTROUTING: u32 = 4;
/// `NF_IP_PRI_NAT_SRC`, which nft calls `srcnat`.
pub const PRIORITY_SRCNAT: i32 = 100;
/// `NF_ACCEPT`, a base chain's policy.
const NF_ACCEPT: u32 = 1;
/// `NFT_RETURN`: leave this chain.
pub const VERDICT_RETURN: i32 = -5;
/// `NFT_META_NFPROTO`: the packet's family (one byte).
pub const META_NFPROTO: u32 = 15;
/// `NFT_PAYLOAD_NETWORK_HEADER`.
pub const BASE_NETWORK: u32 = 1;
/// `NFT_REG_VERDICT` and `NFT_REG_1`.
const REG_VERDICT: u32 = 0;
pub const REG_1: u32 = 1;
/// `NFT_CMP_EQ`.
const CMP_EQ: u32 = 0;
/// `NF_NAT_RANGE_PROTO_RANDOM_FULLY`: fully random source ports, so two
/// pods' flows never race for the same mapping.
pub const NAT_RANDOM_FULLY: u32 = 0x10;

/// The set key types nft knows (`TYPE_IPADDR`, `TYPE_IP6ADDR`): with them
/// `nft list` prints the elements as addresses.
pub const KEY_TYPE_IPV4: u32 = 7;
pub const KEY_TYPE_IPV6: u32 = 8;
/// nft's set userdata: `NFTNL_UDATA_SET_KEYBYTEORDER` = big endian.
const SET_UDATA_BIG_ENDIAN_KEY: [u8; 6] = [0, 4, 2, 0, 0, 0];

/// One nf_tables expression of a rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expr {
    /// `meta load <key> => reg`
    Meta { key: u32, dreg: u32 },
    /// `payload load <len>b @ <base> + <offset> => reg`
    Payload {
        base: u32,
        offset: u32,
        len: u32,
        dreg: u32,
    },
    /// `bitwise reg = (reg & mask) ^ 0`
    Mask { reg: u32, mask: Vec<u8> },
    /// `cmp eq reg <data>`
    CmpEq { reg: u32, data: Vec<u8> },
    /// `lookup reg set <name>`
    Lookup { set: String, set_id: u32, reg: u32 },
    /// `immediate reg 0 <verdict>`
    Verdict(i32),
    /// `masq flags <flags>`
    Masquerade { flags: u32 },
}

/// Attributes being appended to a message.
struct Attrs<'a>(&'a mut Vec<u8>);

impl Attrs<'_> {
    fn put(&mut self, kind: u16, payload: &[u8]) {
        let len = 4 + payload.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(payload);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
    }

    fn strz(&mut self, kind: u16, s: &str) {
        let mut bytes = s.as_bytes().to_vec();
        bytes.push(0);
        self.put(kind, &bytes);
    }

    fn be32(&mut self, kind: u16, v: u32) {
        self.put(kind, &v.to_be_bytes());
    }

    fn nest(&mut self, kind: u16, inner: impl FnOnce(&mut Attrs<'_>)) {
        let start = self.0.len();
        self.0.extend_from_slice(&[0, 0]);
        self.0
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        inner(&mut Attrs(self.0));
        let len = (self.0.len() - start) as u16;
        self.0[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn data_value(&mut self, kind: u16, value: &[u8]) {
        self.nest(kind, |a| a.put(NFTA_DATA_VALUE, value));
    }

    fn expr(&mut self, expr: &Expr) {
        self.nest(NFTA_LIST_ELEM, |a| match expr {
            Expr::Meta { key, dreg } => {
                a.strz(NFTA_EXPR_NAME, "meta");
                a.nest(NFTA_EXPR_DATA, |d| {
                    d.be32(2, *key); // NFTA_META_KEY
                    d.be32(1, *dreg); // NFTA_META_DREG
                });
            }
            Expr::Payload {
                base,
                offset,
                len,
                dreg,
            } => {
                a.strz(NFTA_EXPR_NAME, "payload");
                a.nest(NFTA_EXPR_DATA, |d| {
                    d.be32(1, *dreg); // NFTA_PAYLOAD_DREG
                    d.be32(2, *base); // NFTA_PAYLOAD_BASE
                    d.be32(3, *offset); // NFTA_PAYLOAD_OFFSET
                    d.be32(4, *len); // NFTA_PAYLOAD_LEN
                });
            }
            Expr::Mask { reg, mask } => {
                a.strz(NFTA_EXPR_NAME, "bitwise");
                a.nest(NFTA_EXPR_DATA, |d| {
                    d.be32(1, *reg); // NFTA_BITWISE_SREG
                    d.be32(2, *reg); // NFTA_BITWISE_DREG
                    d.be32(3, mask.len() as u32); // NFTA_BITWISE_LEN
                    d.data_value(4, mask); // NFTA_BITWISE_MASK
                    d.data_value(5, &vec![0; mask.len()]); // NFTA_BITWISE_XOR
                });
            }
            Expr::CmpEq { reg, data } => {
                a.strz(NFTA_EXPR_NAME, "cmp");
                a.nest(NFTA_EXPR_DATA, |d| {
                    d.be32(1, *reg); // NFTA_CMP_SREG
                    d.be32(2, CMP_EQ); // NFTA_CMP_OP
                    d.data_value(3, data); // NFTA_CMP_DATA
                });
            }
            Expr::Lookup { set, set_id, reg } => {
                a.strz(NFTA_EXPR_NAME, "lookup");
                a.nest(NFTA_EXPR_DATA, |d| {
                    d.be32(2, *reg); // NFTA_LOOKUP_SREG
                    d.strz(1, set); // NFTA_LOOKUP_SET
                    d.be32(4, *set_id); // NFTA_LOOKUP_SET_ID
                });
            }
            Expr::Verdict(code) => {
                a.strz(NFTA_EXPR_NAME, "immediate");
                a.nest(NFTA_EXPR_DATA, |d| {
                    d.be32(1, REG_VERDICT); // NFTA_IMMEDIATE_DREG
                    d.nest(2, |v| {
                        // NFTA_IMMEDIATE_DATA
                        v.nest(NFTA_DATA_VERDICT, |c| {
                            c.be32(NFTA_VERDICT_CODE, *code as u32)
                        });
                    });
                });
            }
            Expr::Masquerade { flags } => {
                a.strz(NFTA_EXPR_NAME, "masq");
                a.nest(NFTA_EXPR_DATA, |d| d.be32(1, *flags)); // NFTA_MASQ_FLAGS
            }
        });
    }
}

/// A set as [`Batch::new_set`] creates it.
pub struct SetSpec<'a> {
    pub table: &'a str,
    pub name: &'a str,
    /// Names the set inside the batch, for rules that look it up.
    pub id: u32,
    pub key_type: u32,
    pub key_len: u32,
}

/// Messages for one atomic transaction, each acknowledged by the kernel.
pub struct Batch {
    buf: Vec<u8>,
    /// Sequence number and a description of every message that expects an
    /// answer, so an error can say which one failed.
    pending: Vec<(u32, String)>,
    seq: u32,
}

impl Batch {
    /// A batch whose messages are numbered from `first_seq` on (the
    /// framing messages included).
    pub fn new(first_seq: u32) -> Self {
        let mut batch = Self {
            buf: Vec::with_capacity(4096),
            pending: Vec::new(),
            seq: first_seq,
        };
        batch.frame(NFNL_MSG_BATCH_BEGIN);
        batch
    }

    fn frame(&mut self, kind: u16) {
        let seq = self.next_seq();
        self.header(kind, NLM_F_REQUEST, seq, 0, NFNL_SUBSYS_NFTABLES);
        self.finish_message(self.buf.len() - NLMSG_HDRLEN - 4);
    }

    fn next_seq(&mut self) -> u32 {
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        seq
    }

    fn header(&mut self, kind: u16, flags: u16, seq: u32, family: u8, res_id: u16) {
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set later
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        self.buf.push(family);
        self.buf.push(NFNETLINK_V0);
        self.buf.extend_from_slice(&res_id.to_be_bytes());
    }

    fn finish_message(&mut self, start: usize) {
        let len = (self.buf.len() - start) as u32;
        self.buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
    }

    fn message(
        &mut self,
        msg: u16,
        flags: u16,
        what: String,
        attrs: impl FnOnce(&mut Attrs<'_>),
    ) -> &mut Self {
        let start = self.buf.len();
        let seq = self.next_seq();
        self.header(
            (NFNL_SUBSYS_NFTABLES << 8) | msg,
            NLM_F_REQUEST | NLM_F_ACK | flags,
            seq,
            NFPROTO_INET,
            0,
        );
        attrs(&mut Attrs(&mut self.buf));
        self.finish_message(start);
        self.pending.push((seq, what));
        self
    }

    /// `add table inet <name>`: creates it, or does nothing if it exists.
    pub fn new_table(&mut self, name: &str) -> &mut Self {
        self.message(
            NFT_MSG_NEWTABLE,
            NLM_F_CREATE,
            format!("add table inet {name}"),
            |a| {
                a.strz(NFTA_TABLE_NAME, name);
                a.be32(NFTA_TABLE_FLAGS, 0);
            },
        )
    }

    /// `delete table inet <name>`, with everything in it.
    pub fn del_table(&mut self, name: &str) -> &mut Self {
        self.message(
            NFT_MSG_DELTABLE,
            0,
            format!("delete table inet {name}"),
            |a| a.strz(NFTA_TABLE_NAME, name),
        )
    }

    /// `add chain inet <table> <name> { type nat hook <hook> priority <priority>; policy accept; }`
    pub fn new_nat_chain(
        &mut self,
        table: &str,
        name: &str,
        hook: u32,
        priority: i32,
    ) -> &mut Self {
        self.message(
            NFT_MSG_NEWCHAIN,
            NLM_F_CREATE,
            format!("add chain inet {table} {name}"),
            |a| {
                a.strz(NFTA_CHAIN_TABLE, table);
                a.strz(NFTA_CHAIN_NAME, name);
                a.strz(NFTA_CHAIN_TYPE, "nat");
                a.be32(NFTA_CHAIN_POLICY, NF_ACCEPT);
                a.nest(NFTA_CHAIN_HOOK, |h| {
                    h.be32(NFTA_HOOK_HOOKNUM, hook);
                    h.be32(NFTA_HOOK_PRIORITY, priority as u32);
                });
            },
        )
    }

    /// `add set inet <table> <name> { type <key_type>; }`
    pub fn new_set(&mut self, set: &SetSpec<'_>) -> &mut Self {
        self.message(
            NFT_MSG_NEWSET,
            NLM_F_CREATE,
            format!("add set inet {} {}", set.table, set.name),
            |a| {
                a.strz(NFTA_SET_TABLE, set.table);
                a.strz(NFTA_SET_NAME, set.name);
                a.be32(NFTA_SET_FLAGS, 0);
                a.be32(NFTA_SET_KEY_TYPE, set.key_type);
                a.be32(NFTA_SET_KEY_LEN, set.key_len);
                a.be32(NFTA_SET_ID, set.id);
                a.put(NFTA_SET_USERDATA, &SET_UDATA_BIG_ENDIAN_KEY);
            },
        )
    }

    /// `add element inet <table> <set> { <keys> }`
    pub fn new_set_elements(
        &mut self,
        table: &str,
        set: &str,
        set_id: u32,
        keys: &[Vec<u8>],
    ) -> &mut Self {
        self.message(
            NFT_MSG_NEWSETELEM,
            NLM_F_CREATE,
            format!("add element inet {table} {set} ({} keys)", keys.len()),
            |a| {
                a.strz(NFTA_SET_ELEM_LIST_TABLE, table);
                a.strz(NFTA_SET_ELEM_LIST_SET, set);
                a.be32(NFTA_SET_ELEM_LIST_SET_ID, set_id);
                a.nest(NFTA_SET_ELEM_LIST_ELEMENTS, |list| {
                    for key in keys {
                        list.nest(NFTA_LIST_ELEM, |e| e.data_value(NFTA_SET_ELEM_KEY, key));
                    }
                });
            },
        )
    }

    /// `flush set inet <table> <set>`: a delete without elements empties it.
    pub fn flush_set(&mut self, table: &str, set: &str) -> &mut Self {
        self.message(
            NFT_MSG_DELSETELEM,
            0,
            format!("flush set inet {table} {set}"),
            |a| {
                a.strz(NFTA_SET_ELEM_LIST_TABLE, table);
                a.strz(NFTA_SET_ELEM_LIST_SET, set);
            },
        )
    }

    /// `add rule inet <table> <chain> <exprs>` (appended).
    pub fn new_rule(&mut self, table: &str, chain: &str, exprs: &[Expr]) -> &mut Self {
        self.message(
            NFT_MSG_NEWRULE,
            NLM_F_CREATE | NLM_F_APPEND,
            format!(
                "add rule inet {table} {chain} ({} expressions)",
                exprs.len()
            ),
            |a| {
                a.strz(NFTA_RULE_TABLE, table);
                a.strz(NFTA_RULE_CHAIN, chain);
                a.nest(NFTA_RULE_EXPRESSIONS, |list| {
                    for e in exprs {
                        list.expr(e);
                    }
                });
            },
        )
    }

    /// The batch's bytes, end frame included, and the messages that expect
    /// an answer.
    pub fn finish(mut self) -> (Vec<u8>, Vec<(u32, String)>) {
        self.frame(NFNL_MSG_BATCH_END);
        (self.buf, self.pending)
    }

    /// How many messages expect an answer.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

/// A `GETTABLE` request for one table (not a batch message).
fn get_table_request(seq: u32, name: &str) -> Vec<u8> {
    let mut batch = Batch {
        buf: Vec::new(),
        pending: Vec::new(),
        seq,
    };
    batch.message(NFT_MSG_GETTABLE, 0, String::new(), |a| {
        a.strz(NFTA_TABLE_NAME, name)
    });
    batch.buf
}

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("nf_tables netlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("nf_tables {request}: {source}")]
    Request {
        request: String,
        #[source]
        source: io::Error,
    },
    #[error("nf_tables: malformed reply ({0})")]
    Reply(&'static str),
}

impl NftError {
    /// The errno the kernel answered with, if this was a kernel error.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Request { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// A `NETLINK_NETFILTER` socket in the namespace it was made in.
pub struct NfTables {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl NfTables {
    pub fn new() -> Result<Self, NftError> {
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(NftError::Socket)?;
        socket.bind_auto().map_err(NftError::Socket)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(NftError::Socket)?;
        crate::netlink::set_recv_timeout(&socket, Duration::from_secs(10))
            .map_err(NftError::Socket)?;
        Ok(Self {
            socket,
            seq: 1,
            buf: vec![0; 64 * 1024],
        })
    }

    /// A fresh batch numbered after everything this socket sent.
    pub fn batch(&mut self) -> Batch {
        Batch::new(self.seq)
    }

    /// Sends `batch` and waits for the kernel's answer to every message.
    /// The kernel applies all of it or none; the first error names the
    /// message that caused it.
    pub fn commit(&mut self, batch: Batch) -> Result<(), NftError> {
        let (bytes, pending) = batch.finish();
        self.seq = self.seq.wrapping_add(pending.len() as u32 + 2);
        self.socket
            .send(&bytes, 0)
            .map_err(|source| NftError::Request {
                request: "send batch".into(),
                source,
            })?;
        let mut waiting: Vec<(u32, String)> = pending;
        let mut first_error: Option<NftError> = None;
        while !waiting.is_empty() {
            let n = self.recv("batch")?;
            for (seq, errno) in acks(&self.buf[..n])? {
                let Some(at) = waiting.iter().position(|(s, _)| *s == seq) else {
                    continue;
                };
                let (_, what) = waiting.swap_remove(at);
                if errno != 0 && first_error.is_none() {
                    first_error = Some(NftError::Request {
                        request: what,
                        source: io::Error::from_raw_os_error(errno),
                    });
                }
            }
            // After an error the kernel may stop answering the rest.
            if first_error.is_some() {
                break;
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Whether `table` exists in the inet family.
    pub fn table_exists(&mut self, table: &str) -> Result<bool, NftError> {
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        let req = get_table_request(seq, table);
        let what = format!("list table inet {table}");
        self.socket
            .send(&req, 0)
            .map_err(|source| NftError::Request {
                request: what.clone(),
                source,
            })?;
        loop {
            let n = self.recv(&what)?;
            for (s, errno) in acks(&self.buf[..n])? {
                if s != seq {
                    continue;
                }
                return match errno {
                    0 => Ok(true),
                    libc::ENOENT => Ok(false),
                    e => Err(NftError::Request {
                        request: what,
                        source: io::Error::from_raw_os_error(e),
                    }),
                };
            }
        }
    }

    fn recv(&mut self, what: &str) -> Result<usize, NftError> {
        let buf = &mut &mut self.buf[..];
        self.socket
            .recv(buf, 0)
            .map_err(|source| NftError::Request {
                request: format!("{what}: waiting for the kernel's answer"),
                source,
            })
    }
}

/// The answers in one datagram: (sequence number, errno or 0). A NEWTABLE
/// reply to GETTABLE counts as success for its sequence number.
fn acks(buf: &[u8]) -> Result<Vec<(u32, i32)>, NftError> {
    let mut out = Vec::new();
    let mut offset = 0;
    while offset + NLMSG_HDRLEN <= buf.len() {
        let h = &buf[offset..];
        let len = u32::from_ne_bytes(h[0..4].try_into().unwrap()) as usize;
        let kind = u16::from_ne_bytes(h[4..6].try_into().unwrap());
        let seq = u32::from_ne_bytes(h[8..12].try_into().unwrap());
        if len < NLMSG_HDRLEN || offset + len > buf.len() {
            return Err(NftError::Reply("bad message length"));
        }
        match kind {
            NLMSG_ERROR => {
                if len < NLMSG_HDRLEN + 4 {
                    return Err(NftError::Reply("short NLMSG_ERROR"));
                }
                let code = i32::from_ne_bytes(h[16..20].try_into().unwrap());
                // The error's own seq is the request's.
                out.push((seq, -code));
            }
            NLMSG_DONE => {}
            k if k == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWTABLE => out.push((seq, 0)),
            _ => {}
        }
        offset += (len + 3) & !3;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Splits a batch into its messages: (type, flags, seq, body after the
    /// netlink header).
    pub(crate) fn messages(bytes: &[u8]) -> Vec<(u16, u16, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut off = 0;
        while off < bytes.len() {
            let len = u32::from_ne_bytes(bytes[off..off + 4].try_into().unwrap()) as usize;
            let kind = u16::from_ne_bytes(bytes[off + 4..off + 6].try_into().unwrap());
            let flags = u16::from_ne_bytes(bytes[off + 6..off + 8].try_into().unwrap());
            let seq = u32::from_ne_bytes(bytes[off + 8..off + 12].try_into().unwrap());
            out.push((kind, flags, seq, bytes[off + 16..off + len].to_vec()));
            off += len;
        }
        out
    }

    #[test]
    fn framing_matches_nft() {
        let mut b = Batch::new(0);
        b.del_table("ferrite");
        let (bytes, pending) = b.finish();
        let m = messages(&bytes);
        assert_eq!(m.len(), 3);
        // Captured from `nft --debug=mnl delete table inet ferrite`.
        assert_eq!((m[0].0, m[0].1, m[0].3.clone()), (16, 1, hex("0000000a")));
        assert_eq!(m[1].0, 2562);
        assert_eq!(m[1].3, hex("010000000c0001006665727269746500"));
        assert_eq!((m[2].0, m[2].1, m[2].3.clone()), (17, 1, hex("0000000a")));
        assert_eq!(pending, vec![(1, "delete table inet ferrite".to_string())]);
        // The agent asks for an ack on every message (nft does not).
        assert_eq!(m[1].1, NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(bytes.len(), 20 + 32 + 20);
    }

    #[test]
    fn table_chain_and_set_match_nft() {
        let mut b = Batch::new(0);
        b.new_table("ferrite")
            .new_nat_chain("ferrite", "postrouting", HOOK_POSTROUTING, PRIORITY_SRCNAT)
            .new_set(&SetSpec {
                table: "ferrite",
                name: "node_ips4",
                id: 1,
                key_type: KEY_TYPE_IPV4,
                key_len: 4,
            });
        let (bytes, _) = b.finish();
        let m = messages(&bytes);
        // nft orders the chain's attributes table, name, type, policy,
        // hook; so does the agent. Bodies captured from `nft --debug=mnl`.
        assert_eq!(m[1].0, 2560);
        assert_eq!(m[1].1, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE);
        assert_eq!(
            m[1].3,
            hex("010000000c00010066657272697465000800020000000000")
        );
        assert_eq!(m[2].0, 2563);
        assert_eq!(
            m[2].3,
            hex(concat!(
                "010000000c000100666572726974650010000300706f7374726f7574696e67",
                "00080007006e61740008000500000000011400048008000100000000040800",
                "020000000064"
            ))
        );
        assert_eq!(m[3].0, 2569);
        assert_eq!(
            m[3].3,
            hex(concat!(
                "010000000c00010066657272697465000e0002006e6f64655f697073340000",
                "0008000300000000000800040000000007080005000000000408000a000000",
                "00010a000d000004020000000000"
            ))
        );
    }

    #[test]
    fn set_elements_match_nft() {
        let mut b = Batch::new(0);
        b.new_set_elements("ferrite", "node_ips4", 2, &[vec![192, 0, 2, 8]]);
        b.new_set_elements(
            "ferrite",
            "node_ips6",
            1,
            &["2001:db8::2"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
                .to_vec()],
        );
        let (bytes, _) = b.finish();
        let m = messages(&bytes);
        assert_eq!(m[1].0, 2572);
        assert_eq!(
            m[1].3,
            hex(concat!(
                "010000000c00010066657272697465000e0002006e6f64655f697073340000",
                "00080004000000000214000380100001800c00018008000100c0000208"
            ))
        );
        assert_eq!(
            m[2].3,
            hex(concat!(
                "010000000c00010066657272697465000e0002006e6f64655f697073360000",
                "000800040000000001200003801c000180180001801400010020010db80000",
                "00000000000000000002"
            ))
        );
    }

    #[test]
    fn flush_is_a_delete_without_elements() {
        let mut b = Batch::new(0);
        b.flush_set("ferrite", "node_ips4");
        let (bytes, pending) = b.finish();
        let m = messages(&bytes);
        assert_eq!(m[1].0, (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_DELSETELEM);
        assert_eq!(
            m[1].3,
            hex("010000000c00010066657272697465000e0002006e6f64655f69707334000000")
        );
        assert_eq!(pending[0].1, "flush set inet ferrite node_ips4");
    }

    #[test]
    fn replies_parse_into_acks_and_errors() {
        let mut buf = Vec::new();
        for (seq, code) in [(7u32, 0i32), (8, -libc::ENOENT)] {
            buf.extend_from_slice(&36u32.to_ne_bytes());
            buf.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            buf.extend_from_slice(&0x100u16.to_ne_bytes());
            buf.extend_from_slice(&seq.to_ne_bytes());
            buf.extend_from_slice(&0u32.to_ne_bytes());
            buf.extend_from_slice(&code.to_ne_bytes());
            buf.extend_from_slice(&[0; 16]); // the request's header
        }
        assert_eq!(acks(&buf).unwrap(), vec![(7, 0), (8, libc::ENOENT)]);
        // A message cut short is malformed, not an empty answer.
        assert!(acks(&buf[..20]).is_err());
        let mut bad = buf.clone();
        bad[0] = 200;
        assert!(acks(&bad).is_err());
    }
}
