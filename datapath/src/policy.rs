//! NetworkPolicy as the datapath holds it (`bpf/lib/policy.h`): rule sets
//! encoded into two LPM tries, the per-endpoint choice of rule sets, the
//! node's own addresses, the Service CIDRs, and the connection-tracking
//! table that remembers the flows a policy allowed.
//!
//! A rule set is one direction of one endpoint's policy: numbered rules,
//! each a set of peers and a set of ports; a packet passes when one rule
//! has both its peer and its port. Rules are grouped 64 to a word; per word,
//! `ferrite_polport` answers "which rules have this port" and
//! `ferrite_polpeer` "which rules have this peer", each as a bitmap, by
//! longest-prefix match. [`encode`] turns rules into those entries: every
//! prefix written carries the union of the rules that cover all of it, so
//! the longest match is the whole answer for any address or port.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv6Addr},
    os::fd::{AsFd, OwnedFd},
};

use thiserror::Error;

use crate::{
    maps::{keys, on, MapError},
    sys::{self, BPF_ANY},
    types::{ip_from_key, ip_key},
};

/// Rules per word of a rule set (one `__u64` bitmap).
pub const RULES_PER_WORD: usize = 64;
/// Words per rule set (`FERRITE_POLICY_MAX_WORDS` in bpf/lib/policy.h).
pub const MAX_WORDS: usize = 16;
/// Rules one direction of one endpoint may have.
pub const MAX_RULES: usize = RULES_PER_WORD * MAX_WORDS;

/// `EP_POLICY_F_PENDING`: the endpoint drops everything until programmed.
const EP_POLICY_F_PENDING: u32 = 1;

/// Bits of a key before the protocol or address: set id, word, padding.
const HEAD_BITS: u32 = 64;
/// `prefixlen` of a port key that matches any port of its protocol.
const ANY_PORT_BITS: u32 = HEAD_BITS + 16;

pub(crate) const EPPOL_MAP: &str = "ferrite_eppol";
pub(crate) const POLPORT_MAP: &str = "ferrite_polport";
pub(crate) const POLPEER_MAP: &str = "ferrite_polpeer";
pub(crate) const HOSTIPS_MAP: &str = "ferrite_hostips";
pub(crate) const SVCNETS_MAP: &str = "ferrite_svcnets";
pub(crate) const CT_MAP: &str = "ferrite_ct";
pub(crate) const POLNS_MAP: &str = "ferrite_polns";
pub(crate) const PODIDS_MAP: &str = "ferrite_podids";
pub(crate) const PODPOL_MAP: &str = "ferrite_podpol";

/// Longest namespace name `ferrite_polns` and `ferrite_podids` hold (a DNS
/// label is at most 63 characters).
pub const NAMESPACE_LEN: usize = 64;
/// Longest pod name `ferrite_podids` holds (a DNS subdomain: 253).
pub const POD_NAME_LEN: usize = 256;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("{rules} rules in one direction; the datapath holds at most {MAX_RULES}")]
    TooManyRules { rules: usize },
    #[error("{addr}/{prefix}: prefix too long for the address")]
    BadPrefix { addr: IpAddr, prefix: u8 },
    #[error("ports {first}-{last} of protocol {proto}: an empty range")]
    BadPortRange { proto: u8, first: u16, last: u16 },
}

/// A CIDR with the parts of it that are left out (an `ipBlock`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
    pub except: Vec<(IpAddr, u8)>,
}

impl Cidr {
    /// One address (a pod).
    pub fn host(addr: IpAddr) -> Self {
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        Cidr {
            addr,
            prefix,
            except: Vec::new(),
        }
    }
}

/// The far ends a rule admits.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Peers {
    /// Any address.
    All,
    /// These (pods as single addresses, ipBlocks as CIDRs).
    Some(Vec<Cidr>),
}

/// Ports `first..=last` of IP protocol `proto` (all of them: 0..=65535).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    pub proto: u8,
    pub first: u16,
    pub last: u16,
}

/// The destination ports a rule admits.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Ports {
    /// Every port of every protocol (a rule that names no ports).
    All,
    Some(Vec<PortRange>),
}

/// One rule: traffic between one of `peers` and one of `ports`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Rule {
    pub peers: Peers,
    pub ports: Ports,
}

/// A `ferrite_polport` entry of a rule set: `proto` None matches every
/// protocol; otherwise ports whose first `port_bits` bits equal `port`'s.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortEntry {
    pub word: u8,
    pub proto: Option<u8>,
    pub port: u16,
    pub port_bits: u8,
    pub rules: u64,
}

/// A `ferrite_polpeer` entry of a rule set: addresses in `addr/prefix`
/// (IPv4 as itself, stored v4-mapped).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PeerEntry {
    pub word: u8,
    pub addr: IpAddr,
    pub prefix: u8,
    pub rules: u64,
}

/// A rule set as the tries hold it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Encoded {
    pub words: u32,
    pub ports: Vec<PortEntry>,
    pub peers: Vec<PeerEntry>,
}

/// A prefix in the 128-bit space the tries use (IPv4 v4-mapped).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Prefix {
    bits: u128,
    len: u8,
}

impl Prefix {
    fn of(addr: IpAddr, prefix: u8) -> Result<Prefix, PolicyError> {
        let (len, max) = match addr {
            IpAddr::V4(_) => (u32::from(prefix) + 96, 32),
            IpAddr::V6(_) => (u32::from(prefix), 128),
        };
        if prefix > max {
            return Err(PolicyError::BadPrefix { addr, prefix });
        }
        let bits = u128::from_be_bytes(ip_key(addr));
        Ok(Prefix {
            bits: bits & mask(len as u8),
            len: len as u8,
        })
    }

    fn contains(&self, other: &Prefix) -> bool {
        self.len <= other.len && other.bits & mask(self.len) == self.bits
    }

    fn entry(&self, word: u8, rules: u64) -> PeerEntry {
        let addr = ip_from_key(self.bits.to_be_bytes());
        let prefix = match addr {
            IpAddr::V4(_) if self.len >= 96 => self.len - 96,
            _ => self.len,
        };
        PeerEntry {
            word,
            addr: match (addr, self.len < 96) {
                // A short prefix of ::ffff:0:0/96's space is an IPv6 one.
                (IpAddr::V4(v4), true) => IpAddr::V6(v4.to_ipv6_mapped()),
                _ => addr,
            },
            prefix,
            rules,
        }
    }
}

fn mask(len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len))
    }
}

/// Turns `rules` (in order: rule `i` is bit `i % 64` of word `i / 64`) into
/// trie entries.
pub fn encode(rules: &[Rule]) -> Result<Encoded, PolicyError> {
    if rules.len() > MAX_RULES {
        return Err(PolicyError::TooManyRules { rules: rules.len() });
    }
    let mut out = Encoded {
        words: rules.len().div_ceil(RULES_PER_WORD) as u32,
        ..Encoded::default()
    };
    for (w, chunk) in rules.chunks(RULES_PER_WORD).enumerate() {
        let word = w as u8;
        encode_ports(word, chunk, &mut out.ports)?;
        encode_peers(word, chunk, &mut out.peers)?;
    }
    Ok(out)
}

fn encode_ports(word: u8, rules: &[Rule], out: &mut Vec<PortEntry>) -> Result<(), PolicyError> {
    let mut any = 0u64;
    // Per protocol: the rules' ranges, by rule bit.
    let mut by_proto: BTreeMap<u8, Vec<(u32, u32, u64)>> = BTreeMap::new();
    for (i, rule) in rules.iter().enumerate() {
        let bit = 1u64 << i;
        match &rule.ports {
            Ports::All => any |= bit,
            Ports::Some(ranges) => {
                for r in ranges {
                    if r.first > r.last {
                        return Err(PolicyError::BadPortRange {
                            proto: r.proto,
                            first: r.first,
                            last: r.last,
                        });
                    }
                    by_proto.entry(r.proto).or_default().push((
                        u32::from(r.first),
                        u32::from(r.last) + 1,
                        bit,
                    ));
                }
            }
        }
    }
    if any != 0 {
        out.push(PortEntry {
            word,
            proto: None,
            port: 0,
            port_bits: 0,
            rules: any,
        });
    }
    for (proto, ranges) in by_proto {
        let cuts: BTreeSet<u32> = ranges.iter().flat_map(|&(a, b, _)| [a, b]).collect();
        let cuts: Vec<u32> = cuts.into_iter().collect();
        // Elementary intervals [a, b) with their rules, merged when equal.
        let mut intervals: Vec<(u32, u32, u64)> = Vec::new();
        for pair in cuts.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            let bits = ranges
                .iter()
                .filter(|&&(s, e, _)| s <= a && b <= e)
                .fold(any, |acc, &(_, _, bit)| acc | bit);
            match intervals.last_mut() {
                Some(last) if last.1 == a && last.2 == bits => last.1 = b,
                _ => intervals.push((a, b, bits)),
            }
        }
        for (a, b, bits) in intervals {
            // Where only the every-protocol rules apply, their entry answers.
            if bits == any {
                continue;
            }
            for (port, port_bits) in range_prefixes(a, b) {
                out.push(PortEntry {
                    word,
                    proto: Some(proto),
                    port,
                    port_bits,
                    rules: bits,
                });
            }
        }
    }
    Ok(())
}

/// The prefixes (value, bits) that cover ports `a..b` exactly.
fn range_prefixes(mut a: u32, b: u32) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    while a < b {
        let mut size = if a == 0 {
            1 << 16
        } else {
            1u32 << a.trailing_zeros()
        };
        while a + size > b {
            size >>= 1;
        }
        out.push((a as u16, (16 - size.trailing_zeros()) as u8));
        a += size;
    }
    out
}

fn encode_peers(word: u8, rules: &[Rule], out: &mut Vec<PeerEntry>) -> Result<(), PolicyError> {
    // Each rule's peers as prefixes with their excepts.
    let mut blocks: Vec<Vec<(Prefix, Vec<Prefix>)>> = Vec::with_capacity(rules.len());
    let mut prefixes: BTreeSet<Prefix> = BTreeSet::new();
    for rule in rules {
        let mine = match &rule.peers {
            Peers::All => vec![(Prefix { bits: 0, len: 0 }, Vec::new())],
            Peers::Some(cidrs) => {
                let mut mine = Vec::with_capacity(cidrs.len());
                for c in cidrs {
                    let p = Prefix::of(c.addr, c.prefix)?;
                    let mut except = Vec::with_capacity(c.except.len());
                    for &(addr, prefix) in &c.except {
                        except.push(Prefix::of(addr, prefix)?);
                    }
                    mine.push((p, except));
                }
                mine
            }
        };
        for (p, except) in &mine {
            prefixes.insert(*p);
            prefixes.extend(except.iter().copied());
        }
        blocks.push(mine);
    }
    // Single addresses are the bulk (pods): find their rules by lookup.
    let mut hosts: BTreeMap<u128, u64> = BTreeMap::new();
    let mut nets: Vec<(usize, &Prefix, &Vec<Prefix>)> = Vec::new();
    for (i, mine) in blocks.iter().enumerate() {
        for (p, except) in mine {
            if p.len == 128 && except.is_empty() {
                *hosts.entry(p.bits).or_default() |= 1 << i;
            } else {
                nets.push((i, p, except));
            }
        }
    }
    for p in prefixes {
        let mut rules_here = if p.len == 128 {
            hosts.get(&p.bits).copied().unwrap_or(0)
        } else {
            0
        };
        for &(i, net, except) in &nets {
            if net.contains(&p) && !except.iter().any(|e| e.contains(&p)) {
                rules_here |= 1 << i;
            }
        }
        out.push(p.entry(word, rules_here));
    }
    Ok(())
}

/// One direction of an endpoint's policy: the rule set it uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleSetRef {
    /// Never 0 (0 means "not isolated" in the map).
    pub id: u32,
    pub words: u32,
}

/// What `ferrite_eppol` holds for one host veth.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointPolicy {
    /// None: no policy isolates the endpoint for ingress.
    pub ingress: Option<RuleSetRef>,
    pub egress: Option<RuleSetRef>,
    /// Drop everything (counted) until the agent programs it.
    pub pending: bool,
}

impl EndpointPolicy {
    /// An endpoint ADD creates where the agent has not programmed it yet.
    pub const PENDING: EndpointPolicy = EndpointPolicy {
        ingress: None,
        egress: None,
        pending: true,
    };

    fn to_bytes(self) -> [u8; 24] {
        let words = [
            self.ingress.map_or(0, |r| r.id),
            self.ingress.map_or(0, |r| r.words),
            self.egress.map_or(0, |r| r.id),
            self.egress.map_or(0, |r| r.words),
            if self.pending { EP_POLICY_F_PENDING } else { 0 },
            0,
        ];
        let mut out = [0u8; 24];
        for (chunk, w) in out.chunks_mut(4).zip(words) {
            chunk.copy_from_slice(&w.to_ne_bytes());
        }
        out
    }

    fn from_bytes(b: &[u8; 24]) -> Self {
        let w = |i: usize| u32::from_ne_bytes(b[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
        let set = |id: u32, words: u32| (id != 0).then_some(RuleSetRef { id, words });
        EndpointPolicy {
            ingress: set(w(0), w(1)),
            egress: set(w(2), w(3)),
            pending: w(4) & EP_POLICY_F_PENDING != 0,
        }
    }
}

fn port_key(set: u32, e: &PortEntry) -> [u8; 16] {
    let prefixlen = match e.proto {
        None => HEAD_BITS,
        Some(_) => ANY_PORT_BITS + u32::from(e.port_bits),
    };
    let mut k = [0u8; 16];
    k[..4].copy_from_slice(&prefixlen.to_ne_bytes());
    k[4..8].copy_from_slice(&set.to_ne_bytes());
    k[8] = e.word;
    k[12] = e.proto.unwrap_or(0);
    let port = if e.port_bits == 0 {
        0
    } else {
        e.port & (u16::MAX << (16 - e.port_bits))
    };
    k[14..16].copy_from_slice(&port.to_be_bytes());
    k
}

fn port_entry_of(k: &[u8; 16], rules: u64) -> (u32, PortEntry) {
    let prefixlen = u32::from_ne_bytes(k[..4].try_into().expect("4 bytes"));
    let set = u32::from_ne_bytes(k[4..8].try_into().expect("4 bytes"));
    let any = prefixlen < ANY_PORT_BITS;
    (
        set,
        PortEntry {
            word: k[8],
            proto: (!any).then_some(k[12]),
            port: u16::from_be_bytes([k[14], k[15]]),
            port_bits: if any {
                0
            } else {
                (prefixlen - ANY_PORT_BITS) as u8
            },
            rules,
        },
    )
}

fn peer_key(set: u32, e: &PeerEntry) -> Result<[u8; 28], PolicyError> {
    let p = Prefix::of(e.addr, e.prefix)?;
    let mut k = [0u8; 28];
    k[..4].copy_from_slice(&(HEAD_BITS + u32::from(p.len)).to_ne_bytes());
    k[4..8].copy_from_slice(&set.to_ne_bytes());
    k[8] = e.word;
    k[12..].copy_from_slice(&p.bits.to_be_bytes());
    Ok(k)
}

fn peer_entry_of(k: &[u8; 28], rules: u64) -> (u32, PeerEntry) {
    let prefixlen = u32::from_ne_bytes(k[..4].try_into().expect("4 bytes"));
    let set = u32::from_ne_bytes(k[4..8].try_into().expect("4 bytes"));
    let bits = u128::from_be_bytes(k[12..].try_into().expect("16 bytes"));
    let p = Prefix {
        bits,
        len: (prefixlen - HEAD_BITS) as u8,
    };
    (set, p.entry(k[8], rules))
}

/// Handles to the policy maps of one datapath version.
#[derive(Debug)]
pub struct PolicyMaps {
    pub(crate) eppol: OwnedFd,
    pub(crate) polport: OwnedFd,
    pub(crate) polpeer: OwnedFd,
    pub(crate) hostips: OwnedFd,
    pub(crate) svcnets: OwnedFd,
    pub(crate) ct: OwnedFd,
    pub(crate) polns: OwnedFd,
    pub(crate) podids: OwnedFd,
    pub(crate) podpol: OwnedFd,
}

/// How ADD left an endpoint's policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyStart {
    /// Its namespace has no NetworkPolicy: nothing isolates it.
    Open,
    /// The agent had computed its policy already: in place from the start.
    Programmed,
    /// Its namespace has policies and the agent has not computed this pod
    /// yet: everything dropped until it does.
    Pending,
}

/// A name in a fixed-size, NUL-padded field; None if it does not fit.
fn fixed<const N: usize>(name: &str) -> Option<[u8; N]> {
    let b = name.as_bytes();
    if b.len() >= N || b.contains(&0) {
        return None;
    }
    let mut out = [0u8; N];
    out[..b.len()].copy_from_slice(b);
    Some(out)
}

/// A `struct pod_id`: namespace and name, each NUL-padded.
fn pod_key(namespace: &str, name: &str) -> Option<Vec<u8>> {
    let mut key = Vec::with_capacity(NAMESPACE_LEN + POD_NAME_LEN);
    key.extend_from_slice(&fixed::<NAMESPACE_LEN>(namespace)?);
    key.extend_from_slice(&fixed::<POD_NAME_LEN>(name)?);
    Some(key)
}

fn unfixed(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

impl crate::Datapath {
    /// What ADD does for policy, before the endpoint is visible: records
    /// which pod the host veth serves and sets its policy: the one the
    /// agent computed for the pod (`ferrite_podpol`) if there is one, else
    /// in a namespace that has a NetworkPolicy (`ferrite_polns`) "pending",
    /// so nothing passes until the agent has programmed it; elsewhere it
    /// clears whatever an earlier veth with this ifindex left. Opens four
    /// pins, nothing more.
    pub fn start_endpoint_policy(
        &self,
        ifindex: u32,
        pod: Option<(&str, &str)>,
    ) -> Result<PolicyStart, crate::DatapathError> {
        let eppol = self.open_pin(EPPOL_MAP)?;
        let podids = self.open_pin(PODIDS_MAP)?;
        let key = ifindex.to_ne_bytes();
        let id = pod.and_then(|(ns, name)| {
            Some((fixed::<NAMESPACE_LEN>(ns)?, fixed::<POD_NAME_LEN>(name)?))
        });
        let Some((ns, name)) = id else {
            sys::map_delete(podids.as_fd(), &key).map_err(on(PODIDS_MAP))?;
            sys::map_delete(eppol.as_fd(), &key).map_err(on(EPPOL_MAP))?;
            return Ok(PolicyStart::Open);
        };
        let mut pod_id = Vec::with_capacity(NAMESPACE_LEN + POD_NAME_LEN);
        pod_id.extend_from_slice(&ns);
        pod_id.extend_from_slice(&name);
        sys::map_update(podids.as_fd(), &key, &pod_id, BPF_ANY).map_err(on(PODIDS_MAP))?;
        let mut computed = [0u8; 24];
        let podpol = self.open_pin(PODPOL_MAP)?;
        if sys::map_lookup(podpol.as_fd(), &pod_id, &mut computed).map_err(on(PODPOL_MAP))? {
            sys::map_update(eppol.as_fd(), &key, &computed, BPF_ANY).map_err(on(EPPOL_MAP))?;
            return Ok(PolicyStart::Programmed);
        }
        let mut v = [0u8; 4];
        let polns = self.open_pin(POLNS_MAP)?;
        if sys::map_lookup(polns.as_fd(), &ns, &mut v).map_err(on(POLNS_MAP))? {
            sys::map_update(
                eppol.as_fd(),
                &key,
                &EndpointPolicy::PENDING.to_bytes(),
                BPF_ANY,
            )
            .map_err(on(EPPOL_MAP))?;
            return Ok(PolicyStart::Pending);
        }
        sys::map_delete(eppol.as_fd(), &key).map_err(on(EPPOL_MAP))?;
        Ok(PolicyStart::Open)
    }

    /// What DEL does for policy: the host veth's policy and pod record go.
    pub fn forget_endpoint_policy(&self, ifindex: u32) -> Result<(), crate::DatapathError> {
        let key = ifindex.to_ne_bytes();
        sys::map_delete(self.open_pin(EPPOL_MAP)?.as_fd(), &key).map_err(on(EPPOL_MAP))?;
        sys::map_delete(self.open_pin(PODIDS_MAP)?.as_fd(), &key).map_err(on(PODIDS_MAP))?;
        Ok(())
    }
}

fn lookup_u64(map: &OwnedFd, name: &'static str, key: &[u8]) -> Result<Option<u64>, MapError> {
    let mut v = [0u8; 8];
    Ok(sys::map_lookup(map.as_fd(), key, &mut v)
        .map_err(on(name))?
        .then(|| u64::from_ne_bytes(v)))
}

impl PolicyMaps {
    /// Writes rule set `id`'s entries. Write a set whole before any endpoint
    /// points at it; an id is never rewritten with other rules.
    pub fn write_rule_set(&self, id: u32, set: &Encoded) -> Result<(), crate::DatapathError> {
        for e in &set.ports {
            sys::map_update(
                self.polport.as_fd(),
                &port_key(id, e),
                &e.rules.to_ne_bytes(),
                BPF_ANY,
            )
            .map_err(on(POLPORT_MAP))?;
        }
        for e in &set.peers {
            let key = peer_key(id, e).map_err(crate::DatapathError::from)?;
            sys::map_update(self.polpeer.as_fd(), &key, &e.rules.to_ne_bytes(), BPF_ANY)
                .map_err(on(POLPEER_MAP))?;
        }
        Ok(())
    }

    /// Removes every entry of rule sets whose id `gone` says (a scan of
    /// both tries): for sets no endpoint uses any more.
    pub fn remove_rule_sets(&self, gone: impl Fn(u32) -> bool) -> Result<usize, MapError> {
        let mut removed = 0;
        for k in keys::<16>(&self.polport, POLPORT_MAP)? {
            if gone(port_entry_of(&k, 0).0) {
                sys::map_delete(self.polport.as_fd(), &k).map_err(on(POLPORT_MAP))?;
                removed += 1;
            }
        }
        for k in keys::<28>(&self.polpeer, POLPEER_MAP)? {
            if gone(peer_entry_of(&k, 0).0) {
                sys::map_delete(self.polpeer.as_fd(), &k).map_err(on(POLPEER_MAP))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Every rule set in the tries, as they hold it (the operator's view).
    pub fn rule_sets(&self) -> Result<BTreeMap<u32, Encoded>, MapError> {
        let mut out: BTreeMap<u32, Encoded> = BTreeMap::new();
        for k in keys::<16>(&self.polport, POLPORT_MAP)? {
            let Some(rules) = lookup_u64(&self.polport, POLPORT_MAP, &k)? else {
                continue;
            };
            let (set, e) = port_entry_of(&k, rules);
            let s = out.entry(set).or_default();
            s.words = s.words.max(u32::from(e.word) + 1);
            s.ports.push(e);
        }
        for k in keys::<28>(&self.polpeer, POLPEER_MAP)? {
            let Some(rules) = lookup_u64(&self.polpeer, POLPEER_MAP, &k)? else {
                continue;
            };
            let (set, e) = peer_entry_of(&k, rules);
            let s = out.entry(set).or_default();
            s.words = s.words.max(u32::from(e.word) + 1);
            s.peers.push(e);
        }
        for s in out.values_mut() {
            s.ports.sort();
            s.peers.sort();
        }
        Ok(out)
    }

    pub fn set_endpoint(&self, ifindex: u32, policy: &EndpointPolicy) -> Result<(), MapError> {
        sys::map_update(
            self.eppol.as_fd(),
            &ifindex.to_ne_bytes(),
            &policy.to_bytes(),
            BPF_ANY,
        )
        .map_err(on(EPPOL_MAP))
    }

    /// Whether an entry was there.
    pub fn remove_endpoint(&self, ifindex: u32) -> Result<bool, MapError> {
        sys::map_delete(self.eppol.as_fd(), &ifindex.to_ne_bytes()).map_err(on(EPPOL_MAP))
    }

    pub fn endpoint(&self, ifindex: u32) -> Result<Option<EndpointPolicy>, MapError> {
        let mut v = [0u8; 24];
        Ok(
            sys::map_lookup(self.eppol.as_fd(), &ifindex.to_ne_bytes(), &mut v)
                .map_err(on(EPPOL_MAP))?
                .then(|| EndpointPolicy::from_bytes(&v)),
        )
    }

    pub fn endpoints(&self) -> Result<Vec<(u32, EndpointPolicy)>, MapError> {
        let mut out = Vec::new();
        for k in keys::<4>(&self.eppol, EPPOL_MAP)? {
            let ifindex = u32::from_ne_bytes(k);
            if let Some(p) = self.endpoint(ifindex)? {
                out.push((ifindex, p));
            }
        }
        Ok(out)
    }

    /// Makes `ferrite_hostips` hold exactly `addrs`: the node's own.
    pub fn set_host_addresses(&self, addrs: &[IpAddr]) -> Result<(), MapError> {
        let want: Vec<[u8; 16]> = addrs.iter().map(|a| ip_key(*a)).collect();
        for k in &want {
            sys::map_update(self.hostips.as_fd(), k, &1u32.to_ne_bytes(), BPF_ANY)
                .map_err(on(HOSTIPS_MAP))?;
        }
        for k in keys::<16>(&self.hostips, HOSTIPS_MAP)? {
            if !want.contains(&k) {
                sys::map_delete(self.hostips.as_fd(), &k).map_err(on(HOSTIPS_MAP))?;
            }
        }
        Ok(())
    }

    pub fn host_addresses(&self) -> Result<Vec<IpAddr>, MapError> {
        Ok(keys::<16>(&self.hostips, HOSTIPS_MAP)?
            .into_iter()
            .map(ip_from_key)
            .collect())
    }

    /// Makes `ferrite_svcnets` hold exactly `cidrs`: the Service CIDRs.
    pub fn set_service_cidrs(&self, cidrs: &[(IpAddr, u8)]) -> Result<(), MapError> {
        crate::maps::set_lpm_set(self.svcnets.as_fd(), SVCNETS_MAP, cidrs)
    }

    pub fn service_cidrs(&self) -> Result<Vec<(IpAddr, u8)>, MapError> {
        crate::maps::lpm_set(self.svcnets.as_fd(), SVCNETS_MAP)
    }

    /// Makes `ferrite_polns` hold exactly `namespaces`; names too long to
    /// be namespaces are skipped.
    pub fn set_policy_namespaces(&self, namespaces: &BTreeSet<String>) -> Result<(), MapError> {
        let want: Vec<[u8; NAMESPACE_LEN]> = namespaces.iter().filter_map(|n| fixed(n)).collect();
        for k in &want {
            sys::map_update(self.polns.as_fd(), k, &1u32.to_ne_bytes(), BPF_ANY)
                .map_err(on(POLNS_MAP))?;
        }
        for k in keys::<NAMESPACE_LEN>(&self.polns, POLNS_MAP)? {
            if !want.contains(&k) {
                sys::map_delete(self.polns.as_fd(), &k).map_err(on(POLNS_MAP))?;
            }
        }
        Ok(())
    }

    pub fn policy_namespaces(&self) -> Result<BTreeSet<String>, MapError> {
        Ok(keys::<NAMESPACE_LEN>(&self.polns, POLNS_MAP)?
            .iter()
            .map(|k| unfixed(k))
            .collect())
    }

    /// Records which pod host veth `ifindex` serves. Names that do not fit
    /// are not recorded (the agent then finds the pod by its address).
    pub fn set_pod_id(&self, ifindex: u32, namespace: &str, name: &str) -> Result<(), MapError> {
        let (Some(ns), Some(n)) = (
            fixed::<NAMESPACE_LEN>(namespace),
            fixed::<POD_NAME_LEN>(name),
        ) else {
            return Ok(());
        };
        let mut v = Vec::with_capacity(NAMESPACE_LEN + POD_NAME_LEN);
        v.extend_from_slice(&ns);
        v.extend_from_slice(&n);
        sys::map_update(self.podids.as_fd(), &ifindex.to_ne_bytes(), &v, BPF_ANY)
            .map_err(on(PODIDS_MAP))
    }

    pub fn remove_pod_id(&self, ifindex: u32) -> Result<bool, MapError> {
        sys::map_delete(self.podids.as_fd(), &ifindex.to_ne_bytes()).map_err(on(PODIDS_MAP))
    }

    /// (ifindex, namespace, name) of every recorded host veth.
    pub fn pod_ids(&self) -> Result<Vec<(u32, String, String)>, MapError> {
        let mut out = Vec::new();
        for k in keys::<4>(&self.podids, PODIDS_MAP)? {
            let mut v = [0u8; NAMESPACE_LEN + POD_NAME_LEN];
            if sys::map_lookup(self.podids.as_fd(), &k, &mut v).map_err(on(PODIDS_MAP))? {
                out.push((
                    u32::from_ne_bytes(k),
                    unfixed(&v[..NAMESPACE_LEN]),
                    unfixed(&v[NAMESPACE_LEN..]),
                ));
            }
        }
        Ok(out)
    }

    /// Sets the policy ADD gives pod `namespace/name` on this node; false
    /// if the names do not fit (ADD then starts it pending).
    pub fn set_pod_policy(
        &self,
        namespace: &str,
        name: &str,
        policy: &EndpointPolicy,
    ) -> Result<bool, MapError> {
        let Some(key) = pod_key(namespace, name) else {
            return Ok(false);
        };
        sys::map_update(self.podpol.as_fd(), &key, &policy.to_bytes(), BPF_ANY)
            .map_err(on(PODPOL_MAP))?;
        Ok(true)
    }

    pub fn remove_pod_policy(&self, namespace: &str, name: &str) -> Result<bool, MapError> {
        let Some(key) = pod_key(namespace, name) else {
            return Ok(false);
        };
        sys::map_delete(self.podpol.as_fd(), &key).map_err(on(PODPOL_MAP))
    }

    /// (namespace, name, policy) of every pod with a computed policy.
    pub fn pod_policies(&self) -> Result<Vec<(String, String, EndpointPolicy)>, MapError> {
        let mut out = Vec::new();
        for k in keys::<{ NAMESPACE_LEN + POD_NAME_LEN }>(&self.podpol, PODPOL_MAP)? {
            let mut v = [0u8; 24];
            if sys::map_lookup(self.podpol.as_fd(), &k, &mut v).map_err(on(PODPOL_MAP))? {
                out.push((
                    unfixed(&k[..NAMESPACE_LEN]),
                    unfixed(&k[NAMESPACE_LEN..]),
                    EndpointPolicy::from_bytes(&v),
                ));
            }
        }
        Ok(out)
    }

    /// Removes exactly the entries of rule set `id` (as [`encode`] made them).
    pub fn remove_rule_set(&self, id: u32, set: &Encoded) -> Result<(), crate::DatapathError> {
        for e in &set.ports {
            sys::map_delete(self.polport.as_fd(), &port_key(id, e)).map_err(on(POLPORT_MAP))?;
        }
        for e in &set.peers {
            let key = peer_key(id, e).map_err(crate::DatapathError::from)?;
            sys::map_delete(self.polpeer.as_fd(), &key).map_err(on(POLPEER_MAP))?;
        }
        Ok(())
    }

    /// How many flows connection tracking holds (a scan: for counters).
    pub fn conntrack_len(&self) -> Result<usize, MapError> {
        Ok(keys::<40>(&self.ct, CT_MAP)?.len())
    }

    /// Forgets every tracked flow (their next packets are judged again).
    pub fn conntrack_flush(&self) -> Result<usize, MapError> {
        let all = keys::<40>(&self.ct, CT_MAP)?;
        for k in &all {
            sys::map_delete(self.ct.as_fd(), k).map_err(on(CT_MAP))?;
        }
        Ok(all.len())
    }
}

impl From<PolicyError> for crate::DatapathError {
    fn from(e: PolicyError) -> Self {
        crate::DatapathError::Policy(e)
    }
}

/// One rule of an encoded set, read back for the operator: the peers it
/// admits (with the excepted prefixes inside them) and its ports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuleText {
    pub peers: Vec<String>,
    pub except: Vec<String>,
    pub ports: Vec<String>,
}

fn proto_name(p: u8) -> String {
    match p {
        6 => "tcp".into(),
        17 => "udp".into(),
        132 => "sctp".into(),
        n => format!("proto{n}"),
    }
}

fn port_text(e: &PortEntry) -> String {
    let Some(proto) = e.proto else {
        return "any".into();
    };
    if e.port_bits == 0 {
        return format!("{}/*", proto_name(proto));
    }
    let host = 16 - u32::from(e.port_bits);
    let first = if host >= 16 {
        0
    } else {
        (e.port >> host) << host
    };
    let last = first | ((1u32 << host) - 1) as u16;
    if first == last {
        format!("{}/{first}", proto_name(proto))
    } else {
        format!("{}/{first}-{last}", proto_name(proto))
    }
}

fn contains(outer: &PeerEntry, inner: &PeerEntry) -> bool {
    let (Ok(o), Ok(i)) = (
        Prefix::of(outer.addr, outer.prefix),
        Prefix::of(inner.addr, inner.prefix),
    ) else {
        return false;
    };
    i.len > o.len && (o.len == 0 || (o.bits ^ i.bits) >> (128 - u32::from(o.len)) == 0)
}

/// The rules of an encoded set, in rule order, as the tries hold them.
pub fn describe(set: &Encoded) -> Vec<RuleText> {
    let mut out = Vec::new();
    for word in 0..set.words {
        let word = word as u8;
        for bit in 0..64 {
            let has = |rules: u64| rules & (1u64 << bit) != 0;
            let peers: Vec<&PeerEntry> = set
                .peers
                .iter()
                .filter(|e| e.word == word && has(e.rules))
                .collect();
            let ports: Vec<&PortEntry> = set
                .ports
                .iter()
                .filter(|e| e.word == word && has(e.rules))
                .collect();
            if peers.is_empty() && ports.is_empty() {
                continue;
            }
            let except = set
                .peers
                .iter()
                .filter(|e| e.word == word && !has(e.rules))
                .filter(|e| peers.iter().any(|p| contains(p, e)))
                .map(peer_text)
                .collect();
            out.push(RuleText {
                peers: peers.into_iter().map(peer_text).collect(),
                except,
                ports: ports.into_iter().map(port_text).collect(),
            });
        }
    }
    out
}

/// An IPv6 address's text, or IPv4's: for the operator's view.
pub fn peer_text(e: &PeerEntry) -> String {
    match e.addr {
        IpAddr::V6(v6) if v6 == Ipv6Addr::UNSPECIFIED && e.prefix == 0 => "any".to_owned(),
        addr => format!("{addr}/{}", e.prefix),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn tcp(first: u16, last: u16) -> PortRange {
        PortRange {
            proto: 6,
            first,
            last,
        }
    }

    /// What the tries answer for (proto, port): the longest matching entry.
    fn port_lookup(e: &Encoded, word: u8, proto: u8, port: u16) -> u64 {
        e.ports
            .iter()
            .filter(|p| p.word == word)
            .filter(|p| match p.proto {
                None => true,
                Some(pr) => {
                    pr == proto
                        && (p.port_bits == 0
                            || (port ^ p.port) >> (16 - u32::from(p.port_bits)) == 0)
                }
            })
            .max_by_key(|p| p.proto.map_or(0, |_| 1 + u32::from(p.port_bits)))
            .map_or(0, |p| p.rules)
    }

    fn peer_lookup(e: &Encoded, word: u8, addr: IpAddr) -> u64 {
        let a = Prefix::of(addr, if addr.is_ipv4() { 32 } else { 128 }).unwrap();
        e.peers
            .iter()
            .filter(|p| p.word == word)
            .map(|p| (Prefix::of(p.addr, p.prefix).unwrap(), p.rules))
            .filter(|(p, _)| p.contains(&a))
            .max_by_key(|(p, _)| p.len)
            .map_or(0, |(_, r)| r)
    }

    #[test]
    fn port_ranges_become_exact_prefixes() {
        assert_eq!(range_prefixes(80, 81), vec![(80, 16)]);
        assert_eq!(range_prefixes(0, 65536), vec![(0, 0)]);
        assert_eq!(range_prefixes(8080, 8084), vec![(8080, 14)]);
        let p = range_prefixes(1000, 2001);
        let covered: u32 = p.iter().map(|&(_, b)| 1u32 << (16 - b)).sum();
        assert_eq!(covered, 1001);
        for &(v, b) in &p {
            let size = 1u32 << (16 - b);
            assert_eq!(u32::from(v) % size, 0, "{v}/{b} aligned");
            assert!(u32::from(v) >= 1000 && u32::from(v) + size <= 2001);
        }
    }

    #[test]
    fn overlapping_ports_carry_every_rule_that_covers_them() {
        let rules = vec![
            Rule {
                peers: Peers::All,
                ports: Ports::Some(vec![tcp(80, 80)]),
            },
            Rule {
                peers: Peers::All,
                ports: Ports::Some(vec![tcp(1, 1000)]),
            },
            Rule {
                peers: Peers::All,
                ports: Ports::All,
            },
        ];
        let e = encode(&rules).unwrap();
        assert_eq!(e.words, 1);
        assert_eq!(port_lookup(&e, 0, 6, 80), 0b111);
        assert_eq!(port_lookup(&e, 0, 6, 79), 0b110);
        assert_eq!(port_lookup(&e, 0, 6, 1000), 0b110);
        assert_eq!(port_lookup(&e, 0, 6, 1001), 0b100);
        assert_eq!(port_lookup(&e, 0, 17, 80), 0b100);
        assert_eq!(port_lookup(&e, 0, 1, 0), 0b100);
    }

    #[test]
    fn excepts_carve_holes_that_other_rules_can_fill() {
        let rules = vec![
            Rule {
                peers: Peers::Some(vec![Cidr {
                    addr: ip("10.0.0.0"),
                    prefix: 8,
                    except: vec![(ip("10.1.0.0"), 16)],
                }]),
                ports: Ports::All,
            },
            Rule {
                peers: Peers::Some(vec![Cidr::host(ip("10.1.2.3"))]),
                ports: Ports::All,
            },
        ];
        let e = encode(&rules).unwrap();
        assert_eq!(peer_lookup(&e, 0, ip("10.2.0.1")), 0b01);
        assert_eq!(peer_lookup(&e, 0, ip("10.1.0.1")), 0b00);
        assert_eq!(peer_lookup(&e, 0, ip("10.1.2.3")), 0b10);
        assert_eq!(peer_lookup(&e, 0, ip("11.0.0.1")), 0b00);
        assert_eq!(peer_lookup(&e, 0, ip("fd00::1")), 0b00);
    }

    #[test]
    fn any_peer_covers_both_families_and_pods_inside_blocks_get_both() {
        let rules = vec![
            Rule {
                peers: Peers::All,
                ports: Ports::Some(vec![tcp(53, 53)]),
            },
            Rule {
                peers: Peers::Some(vec![
                    Cidr {
                        addr: ip("fd00::"),
                        prefix: 64,
                        except: vec![],
                    },
                    Cidr::host(ip("fd00::5")),
                ]),
                ports: Ports::All,
            },
        ];
        let e = encode(&rules).unwrap();
        assert_eq!(peer_lookup(&e, 0, ip("192.0.2.1")), 0b01);
        assert_eq!(peer_lookup(&e, 0, ip("fd00::5")), 0b11);
        assert_eq!(peer_lookup(&e, 0, ip("fd00::6")), 0b11);
        assert_eq!(peer_lookup(&e, 0, ip("fd01::6")), 0b01);
    }

    #[test]
    fn rules_spill_into_words_and_the_limit_is_enforced() {
        let rule = |n: u16| Rule {
            peers: Peers::Some(vec![Cidr::host(IpAddr::V4(std::net::Ipv4Addr::new(
                10,
                0,
                (n >> 8) as u8,
                n as u8,
            )))]),
            ports: Ports::Some(vec![tcp(n, n)]),
        };
        let rules: Vec<Rule> = (1..=130).map(rule).collect();
        let e = encode(&rules).unwrap();
        assert_eq!(e.words, 3);
        // Rule 129 (index 128) is bit 0 of word 2.
        assert_eq!(port_lookup(&e, 2, 6, 129), 1);
        assert_eq!(peer_lookup(&e, 2, ip("10.0.0.129")), 1);
        assert_eq!(peer_lookup(&e, 0, ip("10.0.0.129")), 0);
        let too_many: Vec<Rule> = (1..=(MAX_RULES as u16 + 1)).map(rule).collect();
        assert_eq!(
            encode(&too_many),
            Err(PolicyError::TooManyRules {
                rules: MAX_RULES + 1
            })
        );
    }

    #[test]
    fn keys_round_trip() {
        let pe = PortEntry {
            word: 3,
            proto: Some(17),
            port: 8080,
            port_bits: 14,
            rules: 5,
        };
        let k = port_key(9, &pe);
        assert_eq!(u32::from_ne_bytes(k[..4].try_into().unwrap()), 80 + 14);
        assert_eq!(port_entry_of(&k, 5), (9, pe));
        for (addr, prefix) in [
            ("10.1.0.0", 16u8),
            ("fd00::", 64),
            ("::", 0),
            ("1.2.3.4", 32),
        ] {
            let e = PeerEntry {
                word: 1,
                addr: ip(addr),
                prefix,
                rules: 7,
            };
            assert_eq!(peer_entry_of(&peer_key(4, &e).unwrap(), 7), (4, e));
        }
        let p = EndpointPolicy {
            ingress: Some(RuleSetRef { id: 3, words: 2 }),
            egress: None,
            pending: true,
        };
        assert_eq!(EndpointPolicy::from_bytes(&p.to_bytes()), p);
    }

    #[test]
    fn c_layouts_match() {
        let header = include_str!("../bpf/lib/policy.h");
        for (name, size) in [
            ("struct ep_policy", 24),
            ("struct polport_key", 16),
            ("struct polpeer_key", 28),
        ] {
            let line = format!("_Static_assert(sizeof({name}) == {size},");
            assert!(header.contains(&line), "{name} is {size} bytes in policy.h");
        }
        let words = header
            .lines()
            .find(|l| l.starts_with("#define FERRITE_POLICY_MAX_WORDS"))
            .and_then(|l| l.split_whitespace().nth(2))
            .and_then(|v| v.parse::<usize>().ok());
        assert_eq!(words, Some(MAX_WORDS));
    }

    #[test]
    fn described_as_written() {
        let rules = vec![Rule {
            peers: Peers::Some(vec![
                Cidr::host(ip("10.0.0.7")),
                Cidr {
                    addr: ip("10.1.0.0"),
                    prefix: 16,
                    except: vec![(ip("10.1.2.3"), 32)],
                },
            ]),
            ports: Ports::Some(vec![tcp(80, 80), tcp(8000, 8003)]),
        }];
        let d = describe(&encode(&rules).unwrap());
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].peers, ["10.0.0.7/32", "10.1.0.0/16"]);
        assert_eq!(d[0].except, ["10.1.2.3/32"]);
        assert_eq!(d[0].ports, ["tcp/80", "tcp/8000-8003"]);
    }
}
