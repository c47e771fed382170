// SPDX-License-Identifier: Apache-2.0
//! Egress masquerade: what leaves the cluster from this node's pods goes out
//! with the node's address; everything inside the cluster keeps the pod's.
//!
//! ```text
//! table inet ferrite {
//!     set node_ips4 { type ipv4_addr; }          every node's InternalIPs,
//!     set node_ips6 { type ipv6_addr; }          kept current from the watch
//!     chain postrouting {
//!         type nat hook postrouting priority srcnat; policy accept;
//!         ip daddr <cluster CIDR> return          per cluster CIDR of the family
//!         ip daddr @node_ips4 return
//!         ip saddr <pod CIDR> masquerade fully-random   per pod CIDR of this node
//!         (the same three for ip6)
//!     }
//! }
//! ```
//! The table is ferrite's alone: it is re-created whole in one batch at
//! start, its sets are rewritten in one batch when the node list changes,
//! and uninstall deletes it. Nobody else's tables or chains are touched.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnetwork::IpNetwork;

use crate::nft::{
    Batch, Expr, SetSpec, BASE_NETWORK, HOOK_POSTROUTING, KEY_TYPE_IPV4, KEY_TYPE_IPV6,
    META_NFPROTO, NAT_RANDOM_FULLY, NFPROTO_IPV4, NFPROTO_IPV6, PRIORITY_SRCNAT, REG_1,
    VERDICT_RETURN,
};

/// ferrite's nftables table (family inet).
pub const TABLE: &str = "ferrite";
pub const CHAIN: &str = "postrouting";

/// An address family, as the masquerade rules need to know it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        })
    }
}

impl Family {
    pub const BOTH: [Family; 2] = [Family::V4, Family::V6];

    pub fn of(ip: IpAddr) -> Self {
        if ip.is_ipv4() {
            Self::V4
        } else {
            Self::V6
        }
    }

    pub fn of_net(net: &IpNetwork) -> Self {
        Self::of(net.ip())
    }

    fn nfproto(self) -> u8 {
        match self {
            Self::V4 => NFPROTO_IPV4,
            Self::V6 => NFPROTO_IPV6,
        }
    }

    /// The node address set of this family and its id inside a batch.
    pub fn node_set(self) -> (&'static str, u32) {
        match self {
            Self::V4 => ("node_ips4", 1),
            Self::V6 => ("node_ips6", 2),
        }
    }

    fn addr_len(self) -> u32 {
        match self {
            Self::V4 => 4,
            Self::V6 => 16,
        }
    }

    /// Offsets of the source and destination address in the network header.
    fn offsets(self) -> (u32, u32) {
        match self {
            Self::V4 => (12, 16),
            Self::V6 => (8, 24),
        }
    }
}

/// Everything the table is built from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MasqueradeSpec {
    /// This node's pod CIDRs: traffic from them may be masqueraded.
    pub pod_cidrs: Vec<IpNetwork>,
    /// Destinations inside the cluster: never masqueraded.
    pub cluster_cidrs: Vec<IpNetwork>,
    /// Every node's InternalIPs: never masqueraded either.
    pub node_ips: BTreeSet<IpAddr>,
}

fn addr_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// The expressions of `ip[6] saddr|daddr <net>`, shaped as nft shapes them:
/// a prefix on a byte boundary loads and compares only its bytes; any other
/// loads the whole address and masks it.
fn match_prefix(net: &IpNetwork, source: bool) -> Vec<Expr> {
    let family = Family::of_net(net);
    let (saddr, daddr) = family.offsets();
    let offset = if source { saddr } else { daddr };
    let mut exprs = vec![
        Expr::Meta {
            key: META_NFPROTO,
            dreg: REG_1,
        },
        Expr::CmpEq {
            reg: REG_1,
            data: vec![family.nfproto()],
        },
    ];
    let prefix = u32::from(net.prefix());
    if prefix == 0 {
        return exprs;
    }
    let network = addr_bytes(net.network());
    if prefix.is_multiple_of(8) {
        let len = prefix / 8;
        exprs.push(Expr::Payload {
            base: BASE_NETWORK,
            offset,
            len,
            dreg: REG_1,
        });
        exprs.push(Expr::CmpEq {
            reg: REG_1,
            data: network[..len as usize].to_vec(),
        });
    } else {
        exprs.push(Expr::Payload {
            base: BASE_NETWORK,
            offset,
            len: family.addr_len(),
            dreg: REG_1,
        });
        exprs.push(Expr::Mask {
            reg: REG_1,
            mask: addr_bytes(net.mask()),
        });
        exprs.push(Expr::CmpEq {
            reg: REG_1,
            data: network,
        });
    }
    exprs
}

/// `ip[6] daddr @node_ips[46]`
fn match_node_ip(family: Family, set: &str, set_id: u32) -> Vec<Expr> {
    let (_, daddr) = family.offsets();
    vec![
        Expr::Meta {
            key: META_NFPROTO,
            dreg: REG_1,
        },
        Expr::CmpEq {
            reg: REG_1,
            data: vec![family.nfproto()],
        },
        Expr::Payload {
            base: BASE_NETWORK,
            offset: daddr,
            len: family.addr_len(),
            dreg: REG_1,
        },
        Expr::Lookup {
            set: set.to_string(),
            set_id,
            reg: REG_1,
        },
    ]
}

fn with(mut exprs: Vec<Expr>, last: Expr) -> Vec<Expr> {
    exprs.push(last);
    exprs
}

/// Destinations that stay unmasqueraded, for one family: the cluster CIDRs,
/// plus this node's pod CIDRs where no cluster CIDR covers them (a
/// misconfigured --cluster-cidr must not masquerade pod-to-pod traffic).
fn inside(spec: &MasqueradeSpec, family: Family) -> Vec<IpNetwork> {
    let mut nets: Vec<IpNetwork> = spec
        .cluster_cidrs
        .iter()
        .filter(|n| Family::of_net(n) == family)
        .copied()
        .collect();
    for pod in spec
        .pod_cidrs
        .iter()
        .filter(|n| Family::of_net(n) == family)
    {
        if !nets.iter().any(|c| covers(c, pod)) {
            nets.push(*pod);
        }
    }
    nets
}

/// Whether `outer` contains all of `inner`.
pub fn covers(outer: &IpNetwork, inner: &IpNetwork) -> bool {
    Family::of_net(outer) == Family::of_net(inner)
        && outer.prefix() <= inner.prefix()
        && outer.contains(inner.network())
}

/// The rules of one family, in order; none when the node has no pod CIDR
/// of that family.
pub fn family_rules(
    spec: &MasqueradeSpec,
    family: Family,
    set: &str,
    set_id: u32,
) -> Vec<Vec<Expr>> {
    let pods: Vec<&IpNetwork> = spec
        .pod_cidrs
        .iter()
        .filter(|n| Family::of_net(n) == family)
        .collect();
    if pods.is_empty() {
        return Vec::new();
    }
    let mut rules: Vec<Vec<Expr>> = inside(spec, family)
        .iter()
        .map(|net| with(match_prefix(net, false), Expr::Verdict(VERDICT_RETURN)))
        .collect();
    rules.push(with(
        match_node_ip(family, set, set_id),
        Expr::Verdict(VERDICT_RETURN),
    ));
    for pod in pods {
        rules.push(with(
            match_prefix(pod, true),
            Expr::Masquerade {
                flags: NAT_RANDOM_FULLY,
            },
        ));
    }
    rules
}

fn node_keys(ips: &BTreeSet<IpAddr>, family: Family) -> Vec<Vec<u8>> {
    ips.iter()
        .filter(|ip| Family::of(**ip) == family)
        .map(|ip| addr_bytes(*ip))
        .collect()
}

/// Appends the messages that replace ferrite's table with one built from
/// `spec`: create it if missing, delete it, create it afresh with its chain,
/// sets, elements and rules. In one batch the kernel applies all of it at
/// once, so packets never see a half-built table.
pub fn recreate(batch: &mut Batch, spec: &MasqueradeSpec) {
    batch.new_table(TABLE).del_table(TABLE).new_table(TABLE);
    batch.new_nat_chain(TABLE, CHAIN, HOOK_POSTROUTING, PRIORITY_SRCNAT);
    for family in Family::BOTH {
        let (set, id) = family.node_set();
        batch.new_set(&SetSpec {
            table: TABLE,
            name: set,
            id,
            key_type: match family {
                Family::V4 => KEY_TYPE_IPV4,
                Family::V6 => KEY_TYPE_IPV6,
            },
            key_len: family.addr_len(),
        });
        let keys = node_keys(&spec.node_ips, family);
        if !keys.is_empty() {
            batch.new_set_elements(TABLE, set, id, &keys);
        }
    }
    for family in Family::BOTH {
        let (set, id) = family.node_set();
        for rule in family_rules(spec, family, set, id) {
            batch.new_rule(TABLE, CHAIN, &rule);
        }
    }
}

/// Appends the messages that make the node address sets hold exactly `ips`.
pub fn set_node_ips(batch: &mut Batch, ips: &BTreeSet<IpAddr>) {
    for family in Family::BOTH {
        let (set, id) = family.node_set();
        batch.flush_set(TABLE, set);
        let keys = node_keys(ips, family);
        if !keys.is_empty() {
            batch.new_set_elements(TABLE, set, id, &keys);
        }
    }
}

/// Appends the messages that remove ferrite's table whether or not it
/// exists (creating an empty one first makes the delete never fail).
pub fn remove(batch: &mut Batch) {
    batch.new_table(TABLE).del_table(TABLE);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nft::Batch;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    fn bodies(batch: Batch) -> Vec<(u16, Vec<u8>)> {
        let (bytes, _) = batch.encode(0);
        let mut out = Vec::new();
        let mut off = 0;
        while off < bytes.len() {
            let len = u32::from_ne_bytes(bytes[off..off + 4].try_into().unwrap()) as usize;
            let kind = u16::from_ne_bytes(bytes[off + 4..off + 6].try_into().unwrap());
            out.push((kind, bytes[off + 16..off + len].to_vec()));
            off += len;
        }
        out
    }

    fn rule_bodies(rules: &[Vec<Expr>]) -> Vec<Vec<u8>> {
        let mut b = Batch::new();
        for r in rules {
            b.new_rule(TABLE, CHAIN, r);
        }
        let all = bodies(b);
        all[1..all.len() - 1]
            .iter()
            .map(|(_, b)| b.clone())
            .collect()
    }

    // The bodies of the NEWRULE messages `nft --debug=mnl -f` sent (nft
    // 1.0.6) for:
    //   ip daddr 10.240.0.0/12 return
    //   ip daddr @node_ips4 return
    //   ip saddr 10.244.1.0/24 masquerade fully-random
    const NFT_RULES_V4: [&str; 3] = [
        concat!(
            "010000000c000100666572726974650010000200706f7374726f7574696e670028010480",
            "24000180090001006d6574610000000014000280080002000000000f0800010000000001",
            "2c00018008000100636d700020000280080001000000000108000200000000000c000380",
            "0500010002000000340001800c0001007061796c6f616400240002800800010000000001",
            "080002000000000108000300000000100800040000000004440001800c00010062697477",
            "69736500340002800800010000000001080002000000000108000300000000040c000480",
            "08000100fff000000c00058008000100000000002c00018008000100636d700020000280",
            "080001000000000108000200000000000c000380080001000af00000300001800e000100",
            "696d6d6564696174650000001c0002800800010000000000100002800c00028008000100",
            "fffffffb",
        ),
        concat!(
            "010000000c000100666572726974650010000200706f7374726f7574696e6700ec000480",
            "24000180090001006d6574610000000014000280080002000000000f0800010000000001",
            "2c00018008000100636d700020000280080001000000000108000200000000000c000380",
            "0500010002000000340001800c0001007061796c6f616400240002800800010000000001",
            "080002000000000108000300000000100800040000000004340001800b0001006c6f6f6b",
            "757000002400028008000200000000010e0001006e6f64655f6970733400000008000400",
            "00000001300001800e000100696d6d6564696174650000001c0002800800010000000000",
            "100002800c00028008000100fffffffb",
        ),
        concat!(
            "010000000c000100666572726974650010000200706f7374726f7574696e6700d0000480",
            "24000180090001006d6574610000000014000280080002000000000f0800010000000001",
            "2c00018008000100636d700020000280080001000000000108000200000000000c000380",
            "0500010002000000340001800c0001007061796c6f616400240002800800010000000001",
            "0800020000000001080003000000000c08000400000000032c00018008000100636d7000",
            "20000280080001000000000108000200000000000c000380070001000af401001c000180",
            "090001006d617371000000000c0002800800010000000010",
        ),
    ];

    // The same for:
    //   ip6 daddr fd00:10::/56 return
    //   ip6 daddr fd00:20::/60 return
    //   ip6 daddr @node_ips6 return
    //   ip6 saddr fd00:244:1::/64 masquerade fully-random
    const NFT_RULES_V6: [&str; 4] = [
        concat!(
            "010000000c000100666572726974650010000200706f7374726f7574696e6700e8000480",
            "24000180090001006d6574610000000014000280080002000000000f0800010000000001",
            "2c00018008000100636d700020000280080001000000000108000200000000000c000380",
            "050001000a000000340001800c0001007061796c6f616400240002800800010000000001",
            "0800020000000001080003000000001808000400000000073000018008000100636d7000",
            "2400028008000100000000010800020000000000100003800b000100fd00001000000000",
            "300001800e000100696d6d6564696174650000001c000280080001000000000010000280",
            "0c00028008000100fffffffb",
        ),
        concat!(
            "010000000c000100666572726974650010000200706f7374726f7574696e67004c010480",
            "24000180090001006d6574610000000014000280080002000000000f0800010000000001",
            "2c00018008000100636d700020000280080001000000000108000200000000000c000380",
            "050001000a000000340001800c0001007061796c6f616400240002800800010000000001",
            "0800020000000001080003000000001808000400000000105c0001800c00010062697477",
            "697365004c00028008000100000000010800020000000001080003000000001018000480",
            "14000100fffffffffffffff0000000000000000018000580140001000000000000000000",
            "00000000000000003800018008000100636d70002c000280080001000000000108000200",
            "000000001800038014000100fd000020000000000000000000000000300001800e000100",
            "696d6d6564696174650000001c0002800800010000000000100002800c00028008000100",
            "fffffffb",
        ),
        concat!(
            "010000000c000100666572726974650010000200706f7374726f7574696e6700ec000480",
            "24000180090001006d6574610000000014000280080002000000000f0800010000000001",
            "2c00018008000100636d700020000280080001000000000108000200000000000c000380",
            "050001000a000000340001800c0001007061796c6f616400240002800800010000000001",
            "080002000000000108000300000000180800040000000010340001800b0001006c6f6f6b",
            "757000002400028008000200000000010e0001006e6f64655f6970733600000008000400",
            "00000001300001800e000100696d6d6564696174650000001c0002800800010000000000",
            "100002800c00028008000100fffffffb",
        ),
        concat!(
            "010000000c000100666572726974650010000200706f7374726f7574696e6700d4000480",
            "24000180090001006d6574610000000014000280080002000000000f0800010000000001",
            "2c00018008000100636d700020000280080001000000000108000200000000000c000380",
            "050001000a000000340001800c0001007061796c6f616400240002800800010000000001",
            "0800020000000001080003000000000808000400000000083000018008000100636d7000",
            "2400028008000100000000010800020000000000100003800c000100fd00024400010000",
            "1c000180090001006d617371000000000c0002800800010000000010",
        ),
    ];

    fn spec_v4() -> MasqueradeSpec {
        MasqueradeSpec {
            pod_cidrs: vec![net("10.244.1.0/24")],
            cluster_cidrs: vec![net("10.240.0.0/12")],
            node_ips: BTreeSet::new(),
        }
    }

    #[test]
    fn ipv4_rules_match_nft_bytes() {
        let rules = family_rules(&spec_v4(), Family::V4, "node_ips4", 1);
        assert_eq!(rules.len(), 3);
        let ours = rule_bodies(&rules);
        for (i, (ours, nft)) in ours.iter().zip(NFT_RULES_V4).enumerate() {
            assert_eq!(hex_of(ours), nft, "rule {i}");
        }
    }

    fn hex_of(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn ipv6_prefix_shapes_follow_nft() {
        // nft: /56 loads 7 bytes at +24 and compares them; /60 loads 16 and
        // masks; a /64 source loads 8 bytes at +8.
        let r = match_prefix(&net("fd00:10::/56"), false);
        assert_eq!(
            r[2],
            Expr::Payload {
                base: BASE_NETWORK,
                offset: 24,
                len: 7,
                dreg: REG_1
            }
        );
        assert_eq!(
            r[3],
            Expr::CmpEq {
                reg: REG_1,
                data: hex("fd000010000000")
            }
        );
        let r = match_prefix(&net("fd00:20::/60"), false);
        assert_eq!(r.len(), 5);
        assert_eq!(
            r[3],
            Expr::Mask {
                reg: REG_1,
                mask: hex("fffffffffffffff00000000000000000")
            }
        );
        let r = match_prefix(&net("fd00:244:1::/64"), true);
        assert_eq!(
            r[2],
            Expr::Payload {
                base: BASE_NETWORK,
                offset: 8,
                len: 8,
                dreg: REG_1
            }
        );
        assert_eq!(
            r[1],
            Expr::CmpEq {
                reg: REG_1,
                data: vec![10]
            }
        );
    }

    #[test]
    fn ipv6_rules_match_nft_bytes() {
        let spec = MasqueradeSpec {
            pod_cidrs: vec![net("fd00:244:1::/64")],
            cluster_cidrs: vec![net("fd00:10::/56"), net("fd00:20::/60")],
            node_ips: BTreeSet::new(),
        };
        let ours = rule_bodies(&family_rules(&spec, Family::V6, "node_ips6", 1));
        // No cluster CIDR covers the pod CIDR here, so the agent adds a
        // return for it (third rule); the rest is what nft sent.
        assert_eq!(ours.len(), 5);
        let nft_shaped = [&ours[0], &ours[1], &ours[3], &ours[4]];
        for (i, (ours, nft)) in nft_shaped.iter().zip(NFT_RULES_V6).enumerate() {
            assert_eq!(hex_of(ours), nft, "rule {i}");
        }
        let extra = family_rules(&spec, Family::V6, "node_ips6", 1).remove(2);
        assert_eq!(
            extra,
            with(
                match_prefix(&net("fd00:244:1::/64"), false),
                Expr::Verdict(VERDICT_RETURN)
            )
        );
    }

    #[test]
    fn pod_cidr_outside_the_cluster_cidr_still_stays_unmasqueraded() {
        let spec = MasqueradeSpec {
            pod_cidrs: vec![net("10.99.1.0/24")],
            cluster_cidrs: vec![net("10.244.0.0/16")],
            node_ips: BTreeSet::new(),
        };
        assert_eq!(
            inside(&spec, Family::V4),
            vec![net("10.244.0.0/16"), net("10.99.1.0/24")]
        );
        assert_eq!(inside(&spec_v4(), Family::V4), vec![net("10.240.0.0/12")]);
        assert!(covers(&net("10.240.0.0/12"), &net("10.244.1.0/24")));
        assert!(!covers(&net("10.244.1.0/24"), &net("10.244.0.0/16")));
        assert!(!covers(&net("10.0.0.0/8"), &net("fd00::/64")));
    }

    #[test]
    fn no_rules_for_a_family_without_pod_cidrs() {
        assert!(family_rules(&spec_v4(), Family::V6, "node_ips6", 2).is_empty());
    }

    #[test]
    fn recreate_is_one_batch_that_deletes_then_builds() {
        let mut spec = spec_v4();
        spec.pod_cidrs.push(net("fd00:244:1::/64"));
        spec.cluster_cidrs.push(net("fd00:244::/32"));
        spec.node_ips = ["192.0.2.1", "192.0.2.2", "2001:db8::1"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let mut b = Batch::new();
        recreate(&mut b, &spec);
        let kinds: Vec<u16> = bodies(b).iter().map(|(k, _)| *k).collect();
        let (table, del, chain, set, elems, rule) = (2560, 2562, 2563, 2569, 2572, 2566);
        assert_eq!(
            kinds,
            vec![
                16, table, del, table, chain, set, elems, set, elems, rule, rule, rule, rule, rule,
                rule, 17
            ]
        );
    }

    #[test]
    fn node_ip_update_flushes_and_refills_each_set() {
        let ips: BTreeSet<IpAddr> = ["192.0.2.9".parse().unwrap()].into();
        let mut b = Batch::new();
        set_node_ips(&mut b, &ips);
        let msgs = bodies(b);
        let kinds: Vec<u16> = msgs.iter().map(|(k, _)| *k).collect();
        assert_eq!(kinds, vec![16, 2574, 2572, 2574, 17]);
        assert!(hex_of(&msgs[2].1).ends_with("c0000209"));
    }

    #[test]
    fn remove_never_fails_on_a_missing_table() {
        let mut b = Batch::new();
        remove(&mut b);
        let kinds: Vec<u16> = bodies(b).iter().map(|(k, _)| *k).collect();
        assert_eq!(kinds, vec![16, 2560, 2562, 17]);
    }
}
