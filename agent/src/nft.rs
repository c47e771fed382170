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
//!
//! No maintained crate fits (Apache-2.0 compatible, no C library, no `nft`
//! binary, nat chains, sets and lookups): rustables is GPL-3.0, nftnl
//! binds libnftnl, nftables drives the `nft` binary, nf_tables 0.1 has no
//! chain type, sets, lookup or masquerade. So the bodies are built here
//! and travel over ferrite-netlink, which numbers, sends (one `sendmsg`)
//! and matches the acks.

use ferrite_netlink::wire::{AttrWriter, NLM_F_APPEND, NLM_F_CREATE};
use ferrite_netlink::{Netlink, RawMessage, Request, NETLINK_NETFILTER};

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

/// An `NFTA_DATA_VALUE` inside `kind`.
fn data_value(a: &mut AttrWriter<'_>, kind: u16, value: &[u8]) {
    a.nest(kind, |d| {
        d.put(NFTA_DATA_VALUE, value);
    });
}

/// One expression of a rule's `NFTA_RULE_EXPRESSIONS`.
fn expr(a: &mut AttrWriter<'_>, expr: &Expr) {
    a.nest(NFTA_LIST_ELEM, |a| match expr {
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
                data_value(d, 4, mask); // NFTA_BITWISE_MASK
                data_value(d, 5, &vec![0; mask.len()]); // NFTA_BITWISE_XOR
            });
        }
        Expr::CmpEq { reg, data } => {
            a.strz(NFTA_EXPR_NAME, "cmp");
            a.nest(NFTA_EXPR_DATA, |d| {
                d.be32(1, *reg); // NFTA_CMP_SREG
                d.be32(2, CMP_EQ); // NFTA_CMP_OP
                data_value(d, 3, data); // NFTA_CMP_DATA
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
                        c.be32(NFTA_VERDICT_CODE, *code as u32);
                    });
                });
            });
        }
        Expr::Masquerade { flags } => {
            a.strz(NFTA_EXPR_NAME, "masq");
            a.nest(NFTA_EXPR_DATA, |d| {
                d.be32(1, *flags); // NFTA_MASQ_FLAGS
            });
        }
    });
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
    inner: ferrite_netlink::Batch<RawMessage>,
}

impl Default for Batch {
    fn default() -> Self {
        Self::new()
    }
}

/// `NFNL_MSG_BATCH_BEGIN`/`END`: no ack asked; the kernel answers only if
/// it refuses the batch.
fn frame(kind: u16) -> Request<RawMessage> {
    let body = nfgenmsg(0, NFNL_SUBSYS_NFTABLES);
    Request::new(
        "nf_tables batch",
        RawMessage {
            message_type: kind,
            body,
        },
        0,
    )
    .without_ack()
}

/// The 4-byte `nfgenmsg` every message body starts with.
fn nfgenmsg(family: u8, res_id: u16) -> Vec<u8> {
    let mut body = Vec::with_capacity(64);
    body.push(family);
    body.push(NFNETLINK_V0);
    body.extend_from_slice(&res_id.to_be_bytes());
    body
}

/// An nf_tables message for the inet family: its type and body.
fn message(msg: u16, attrs: impl FnOnce(&mut AttrWriter<'_>)) -> RawMessage {
    let mut body = nfgenmsg(NFPROTO_INET, 0);
    attrs(&mut AttrWriter(&mut body));
    RawMessage {
        message_type: (NFNL_SUBSYS_NFTABLES << 8) | msg,
        body,
    }
}

impl Batch {
    /// An empty transaction (its begin marker only).
    pub fn new() -> Self {
        let mut inner = ferrite_netlink::Batch::new();
        inner.push(frame(NFNL_MSG_BATCH_BEGIN));
        Self { inner }
    }

    fn message(
        &mut self,
        msg: u16,
        flags: u16,
        what: String,
        attrs: impl FnOnce(&mut AttrWriter<'_>),
    ) -> &mut Self {
        self.inner
            .push(Request::new(what, message(msg, attrs), flags));
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
            |a| {
                a.strz(NFTA_TABLE_NAME, name);
            },
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
                        list.nest(NFTA_LIST_ELEM, |e| data_value(e, NFTA_SET_ELEM_KEY, key));
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
                        expr(list, e);
                    }
                });
            },
        )
    }

    /// The transaction with its end marker, as [`NfTables::commit`] sends it.
    fn finish(mut self) -> ferrite_netlink::Batch<RawMessage> {
        self.inner.push(frame(NFNL_MSG_BATCH_END));
        self.inner
    }

    /// The bytes the kernel gets, numbered from `first_seq`, and (sequence
    /// number, description) of every message that expects an answer.
    pub fn encode(self, first_seq: u32) -> (Vec<u8>, Vec<(u32, String)>) {
        let batch = self.finish();
        let mut bytes = Vec::new();
        let acked = batch
            .encode(first_seq, &mut bytes)
            .into_iter()
            .map(|(seq, what)| (seq, what.to_owned()))
            .collect();
        (bytes, acked)
    }

    /// How many messages expect an answer.
    pub fn len(&self) -> usize {
        self.inner.len() - 1
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A failed nf_tables request: the message's description (`add table inet
/// ferrite`), the errno and the kernel's extended ack.
pub type NftError = ferrite_netlink::NetlinkError;

/// A `NETLINK_NETFILTER` socket in the namespace it was made in.
pub struct NfTables {
    nl: Netlink<RawMessage>,
}

impl NfTables {
    pub fn new() -> Result<Self, NftError> {
        let nl = Netlink::open(NETLINK_NETFILTER)?;
        nl.set_recv_timeout(crate::netlink::RECV_TIMEOUT)?;
        Ok(Self { nl })
    }

    /// A fresh batch.
    pub fn batch(&mut self) -> Batch {
        Batch::new()
    }

    /// Sends `batch` in one `sendmsg` and waits for the kernel's answer to
    /// every message. The kernel applies all of it or none; the first error
    /// names the message that caused it.
    pub fn commit(&mut self, batch: Batch) -> Result<(), NftError> {
        self.nl.batch(&batch.finish())
    }

    /// Whether `table` exists in the inet family.
    pub fn table_exists(&mut self, table: &str) -> Result<bool, NftError> {
        let get = message(NFT_MSG_GETTABLE, |a| {
            a.strz(NFTA_TABLE_NAME, table);
        });
        match self.nl.get(&format!("list table inet {table}"), get, 0) {
            Ok(_) => Ok(true),
            Err(e) if e.errno() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use ferrite_netlink::wire::{NLM_F_ACK, NLM_F_REQUEST};

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
        let mut b = Batch::new();
        b.del_table("ferrite");
        let (bytes, pending) = b.encode(0);
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
        let mut b = Batch::new();
        b.new_table("ferrite")
            .new_nat_chain("ferrite", "postrouting", HOOK_POSTROUTING, PRIORITY_SRCNAT)
            .new_set(&SetSpec {
                table: "ferrite",
                name: "node_ips4",
                id: 1,
                key_type: KEY_TYPE_IPV4,
                key_len: 4,
            });
        let (bytes, _) = b.encode(0);
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
        let mut b = Batch::new();
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
        let (bytes, _) = b.encode(0);
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
        let mut b = Batch::new();
        b.flush_set("ferrite", "node_ips4");
        let (bytes, pending) = b.encode(0);
        let m = messages(&bytes);
        assert_eq!(m[1].0, (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_DELSETELEM);
        assert_eq!(
            m[1].3,
            hex("010000000c00010066657272697465000e0002006e6f64655f69707334000000")
        );
        assert_eq!(pending[0].1, "flush set inet ferrite node_ips4");
    }

    #[test]
    fn table_lookup_is_a_gettable_for_the_name() {
        // The same body as the delete captured above, as GETTABLE.
        let get = message(NFT_MSG_GETTABLE, |a| {
            a.strz(NFTA_TABLE_NAME, "ferrite");
        });
        assert_eq!(get.message_type, 2561);
        assert_eq!(get.body, hex("010000000c0001006665727269746500"));
    }
}
