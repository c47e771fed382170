// SPDX-License-Identifier: Apache-2.0
//! The allocator: who holds which address, in memory. Pure; the store loads
//! and saves it under a lock.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use thiserror::Error;

use crate::range::{from_u128, to_u128, Pool, Range, RangeSet};
use crate::records::Records;

/// The longest container id an [`Owner`] may have, in bytes (runtimes use
/// 64 hex digits).
pub const MAX_CONTAINER_ID: usize = 1024;
/// The longest ifname an [`Owner`] may have, in bytes (Linux allows 15).
pub const MAX_IFNAME: usize = 255;

/// Who holds an address: one attachment, as CNI names it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Owner {
    pub container_id: String,
    pub ifname: String,
}

impl Owner {
    pub fn new(container_id: impl Into<String>, ifname: impl Into<String>) -> Owner {
        Owner {
            container_id: container_id.into(),
            ifname: ifname.into(),
        }
    }

    /// Both fields are non-empty and free of whitespace and control
    /// characters (so they print unambiguously), and short enough for one
    /// store record: a container id of at most [`MAX_CONTAINER_ID`] bytes, an
    /// ifname of at most [`MAX_IFNAME`].
    pub fn validate(&self) -> Result<(), IpamError> {
        validate_fields(&self.container_id, &self.ifname)
    }
}

/// [`Owner::validate`] on borrowed fields.
pub(crate) fn validate_fields(container_id: &str, ifname: &str) -> Result<(), IpamError> {
    for (field, value, max) in [
        ("container id", container_id, MAX_CONTAINER_ID),
        ("ifname", ifname, MAX_IFNAME),
    ] {
        if value.is_empty() || value.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(IpamError::InvalidOwner {
                field,
                value: value.to_string(),
            });
        }
        if value.len() > max {
            return Err(IpamError::OwnerTooLong {
                field,
                len: value.len(),
                max,
            });
        }
    }
    Ok(())
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "container {} interface {}",
            self.container_id, self.ifname
        )
    }
}

/// One address handed to an attachment.
#[derive(Clone, Debug, PartialEq)]
pub struct Allocation {
    /// The address with its range's subnet prefix.
    pub address: IpNetwork,
    pub gateway: Option<IpAddr>,
    /// Index of the range set it came from.
    pub set: usize,
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum IpamError {
    #[error(
        "invalid {field} {value:?}: must be non-empty, without whitespace or control characters"
    )]
    InvalidOwner { field: &'static str, value: String },
    #[error("{field} is {len} bytes long, more than the {max} the store allows")]
    OwnerTooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{family} {ranges} is exhausted ({total} addresses, all in use)")]
    Exhausted {
        set: usize,
        family: &'static str,
        /// "range 10.1.0.0/30" or "range set 1 (a, b)".
        ranges: String,
        total: u128,
    },
    #[error("requested address {ip} is not in any configured range")]
    RequestedOutOfRange { ip: IpAddr },
    #[error("requested address {ip} is reserved (network, broadcast or gateway address)")]
    RequestedReserved { ip: IpAddr },
    #[error("requested address {ip} is already held by {owner}")]
    RequestedUnavailable { ip: IpAddr, owner: Owner },
    #[error("requested addresses {first} and {second} both fall in range set {set}; one address per set")]
    RequestedSameSet {
        set: usize,
        first: IpAddr,
        second: IpAddr,
    },
    #[error(
        "requested address {requested} differs from {held}, which this attachment already holds"
    )]
    RequestedMismatch { requested: IpAddr, held: IpAddr },
}

/// Every reservation of one network, plus the last address reserved in each
/// set (where the next round-robin search starts, as in host-local).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct State {
    pub(crate) records: Records,
    pub(crate) last: BTreeMap<usize, IpAddr>,
}

impl State {
    pub fn new() -> State {
        State::default()
    }

    /// One address from every set, atomically: all or nothing (on error the
    /// state is unchanged).
    ///
    /// Idempotent: addresses `owner` already holds in a set (a retried ADD
    /// after a crash) are returned again; only sets where it holds nothing
    /// get a new address. `requested` are static addresses (podman's `IP=`,
    /// the `ips` capability): each picks the address of the set it falls in.
    /// Otherwise the search starts after the last address reserved in the
    /// set, wraps around, and skips taken and reserved addresses.
    pub fn allocate(
        &mut self,
        pool: &Pool,
        owner: &Owner,
        requested: &[IpAddr],
    ) -> Result<Vec<Allocation>, IpamError> {
        owner.validate()?;
        let mut wanted: Vec<Option<IpAddr>> = vec![None; pool.sets.len()];
        for &ip in requested {
            let (set, range) = pool
                .locate(ip)
                .ok_or(IpamError::RequestedOutOfRange { ip })?;
            if range.is_reserved(ip) {
                return Err(IpamError::RequestedReserved { ip });
            }
            match wanted[set] {
                Some(first) if first != ip => {
                    return Err(IpamError::RequestedSameSet {
                        set,
                        first,
                        second: ip,
                    })
                }
                _ => wanted[set] = Some(ip),
            }
        }

        let held = self.owned_by(owner);
        // Decide everything first, then apply: sets never overlap, so the
        // choices cannot collide with each other.
        let mut chosen = Vec::with_capacity(pool.sets.len());
        for (index, set) in pool.sets.iter().enumerate() {
            let held_here = held.iter().copied().find(|&ip| set.contains(ip));
            let (ip, new) = match (held_here, wanted[index]) {
                (Some(held), Some(requested)) if held != requested => {
                    return Err(IpamError::RequestedMismatch { requested, held })
                }
                (Some(held), _) => (held, false),
                (None, Some(ip)) => {
                    if let Some(other) = self.records.owner_of(ip) {
                        return Err(IpamError::RequestedUnavailable { ip, owner: other });
                    }
                    (ip, true)
                }
                (None, None) => {
                    let last = self.last.get(&index).copied();
                    let ip = self
                        .next_free(set, last)
                        .ok_or_else(|| exhausted(index, set))?;
                    (ip, true)
                }
            };
            chosen.push((index, ip, new));
        }

        let mut out = Vec::with_capacity(chosen.len());
        for (index, ip, new) in chosen {
            if new {
                self.records.insert(ip, owner.clone());
                self.last.insert(index, ip);
            }
            let range = pool.sets[index]
                .range_for(ip)
                .expect("chosen address lies in its set");
            out.push(Allocation {
                address: IpNetwork::new(ip, range.subnet.prefix())
                    .expect("prefix comes from a valid subnet of the same family"),
                gateway: range.gateway,
                set: index,
            });
        }
        Ok(out)
    }

    /// Releases everything `owner` holds; returns what was released.
    /// Releasing twice is not an error: the second call returns nothing.
    pub fn release(&mut self, owner: &Owner) -> Vec<IpAddr> {
        let released = self.owned_by(owner);
        for ip in &released {
            self.records.remove(ip);
        }
        released
    }

    /// Addresses held by `owner`, in address order.
    pub fn owned_by(&self, owner: &Owner) -> Vec<IpAddr> {
        self.records.held_by(owner)
    }

    pub fn owner_of(&self, ip: IpAddr) -> Option<&Owner> {
        self.records.get(&ip)
    }

    /// Every reservation, in address order (IPv4 first).
    pub fn records(&self) -> impl Iterator<Item = (&IpAddr, &Owner)> {
        self.records.iter()
    }

    /// The last address reserved in `set`, where the next search starts.
    pub fn last_reserved(&self, set: usize) -> Option<IpAddr> {
        self.last.get(&set).copied()
    }

    /// GC: releases every record whose owner `keep` rejects; returns what was
    /// released.
    pub fn retain(&mut self, keep: impl Fn(&Owner) -> bool) -> Vec<(IpAddr, Owner)> {
        self.records.retain(keep)
    }

    /// Free addresses per set, for STATUS. Saturates at `u128::MAX`, which
    /// only an IPv6 /0 could reach.
    pub fn free_per_set(&self, pool: &Pool) -> Vec<u128> {
        pool.sets
            .iter()
            .map(|set| {
                set.0.iter().fold(0u128, |acc, range| {
                    let used = self
                        .records
                        .range(range.start, range.end)
                        .iter()
                        .filter(|e| !range.is_reserved(e.ip))
                        .count() as u128;
                    acc.saturating_add(range.size().saturating_sub(used))
                })
            })
            .collect()
    }

    /// Round robin over the set: from just after `last` to the end of its
    /// range, through the following ranges, back around to `last` itself.
    fn next_free(&self, set: &RangeSet, last: Option<IpAddr>) -> Option<IpAddr> {
        let ranges = &set.0;
        let whole = |r: &Range| self.first_free(r, r.start_u128(), r.end_u128());
        let found = last.and_then(|l| ranges.iter().position(|r| r.contains(l)).map(|i| (i, l)));
        let Some((i, last)) = found else {
            return ranges.iter().find_map(whole);
        };
        let range = &ranges[i];
        let last = to_u128(last);
        if last < range.end_u128() {
            if let Some(ip) = self.first_free(range, last + 1, range.end_u128()) {
                return Some(ip);
            }
        }
        ranges[i + 1..]
            .iter()
            .chain(&ranges[..i])
            .find_map(whole)
            .or_else(|| self.first_free(range, range.start_u128(), last))
    }

    /// The lowest address in `from..=to` of `range` that is neither taken
    /// nor reserved. Walks the taken addresses of the span in order, so the
    /// cost is the length of the run of taken addresses, never the size of
    /// the span.
    fn first_free(&self, range: &Range, from: u128, to: u128) -> Option<IpAddr> {
        if from > to {
            return None;
        }
        let v6 = range.is_v6();
        let mut taken = self
            .records
            .range(from_u128(from, v6), from_u128(to, v6))
            .iter()
            .map(|e| to_u128(e.ip))
            .peekable();
        let mut candidate = from;
        loop {
            while taken.next_if(|&t| t < candidate).is_some() {}
            let busy = taken.peek() == Some(&candidate) || range.is_reserved_u128(candidate);
            if !busy {
                return Some(from_u128(candidate, v6));
            }
            if candidate == to {
                return None;
            }
            candidate += 1;
        }
    }
}

fn exhausted(index: usize, set: &RangeSet) -> IpamError {
    let ranges = if set.0.len() == 1 {
        format!("range {set}")
    } else {
        format!("range set {index} ({set})")
    };
    IpamError::Exhausted {
        set: index,
        family: set.family(),
        ranges,
        total: set.size(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::range::RangeConfig;
    use std::time::Instant;

    fn cfg(subnet: &str) -> RangeConfig {
        RangeConfig {
            subnet: subnet.into(),
            range_start: None,
            range_end: None,
            gateway: None,
        }
    }

    fn pool(sets: &[&[&str]]) -> Pool {
        let configs: Vec<Vec<RangeConfig>> = sets
            .iter()
            .map(|s| s.iter().map(|subnet| cfg(subnet)).collect())
            .collect();
        Pool::from_config(&configs).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn owner(n: usize) -> Owner {
        Owner::new(format!("c{n}"), "eth0")
    }

    fn one(state: &mut State, pool: &Pool, n: usize) -> Result<IpAddr, IpamError> {
        state
            .allocate(pool, &owner(n), &[])
            .map(|a| a[0].address.ip())
    }

    #[test]
    fn allocation_carries_prefix_gateway_and_set() {
        let mut c = cfg("10.244.1.0/24");
        c.gateway = Some("10.244.1.1".into());
        let pool = Pool::from_config(&[vec![c], vec![cfg("fd00::/64")]]).unwrap();
        let mut state = State::new();
        let got = state.allocate(&pool, &owner(1), &[]).unwrap();
        assert_eq!(
            got,
            vec![
                Allocation {
                    address: "10.244.1.2/24".parse().unwrap(),
                    gateway: Some(ip("10.244.1.1")),
                    set: 0
                },
                Allocation {
                    address: "fd00::1/64".parse().unwrap(),
                    gateway: None,
                    set: 1
                },
            ]
        );
        assert_eq!(state.owner_of(ip("10.244.1.2")), Some(&owner(1)));
        assert_eq!(
            state.owned_by(&owner(1)),
            vec![ip("10.244.1.2"), ip("fd00::1")]
        );
    }

    #[test]
    fn round_robin_continues_after_the_last_reserved_and_wraps() {
        let pool = pool(&[&["10.0.0.0/29"]]); // .1 ..= .6
        let mut state = State::new();
        let got: Vec<IpAddr> = (0..3).map(|n| one(&mut state, &pool, n).unwrap()).collect();
        assert_eq!(got, vec![ip("10.0.0.1"), ip("10.0.0.2"), ip("10.0.0.3")]);
        // Releasing .1 does not make it the next one: host-local moves on.
        state.release(&owner(0));
        assert_eq!(one(&mut state, &pool, 3).unwrap(), ip("10.0.0.4"));
        assert_eq!(one(&mut state, &pool, 4).unwrap(), ip("10.0.0.5"));
        assert_eq!(one(&mut state, &pool, 5).unwrap(), ip("10.0.0.6"));
        // Wraps to the start, skipping .2 and .3 still held.
        assert_eq!(one(&mut state, &pool, 6).unwrap(), ip("10.0.0.1"));
        assert!(matches!(
            one(&mut state, &pool, 7),
            Err(IpamError::Exhausted { .. })
        ));
        assert_eq!(state.last_reserved(0), Some(ip("10.0.0.1")));
    }

    #[test]
    fn round_robin_crosses_ranges_in_order() {
        let pool = pool(&[&["10.1.0.0/30", "10.2.0.0/30"]]);
        let mut state = State::new();
        let got: Vec<IpAddr> = (0..4).map(|n| one(&mut state, &pool, n).unwrap()).collect();
        assert_eq!(
            got,
            vec![
                ip("10.1.0.1"),
                ip("10.1.0.2"),
                ip("10.2.0.1"),
                ip("10.2.0.2")
            ]
        );
        let err = one(&mut state, &pool, 9).unwrap_err();
        assert_eq!(
            err.to_string(),
            "IPv4 range set 0 (10.1.0.0/30, 10.2.0.0/30) is exhausted (4 addresses, all in use)"
        );
        // Free one in the first range: the search wraps back to it.
        state.release(&owner(1));
        assert_eq!(one(&mut state, &pool, 9).unwrap(), ip("10.1.0.2"));
    }

    #[test]
    fn slash30_gives_exactly_two_addresses() {
        let pool = pool(&[&["10.1.0.0/30"]]);
        let mut state = State::new();
        assert_eq!(one(&mut state, &pool, 0).unwrap(), ip("10.1.0.1"));
        assert_eq!(one(&mut state, &pool, 1).unwrap(), ip("10.1.0.2"));
        let err = one(&mut state, &pool, 2).unwrap_err();
        assert_eq!(
            err,
            IpamError::Exhausted {
                set: 0,
                family: "IPv4",
                ranges: "range 10.1.0.0/30".into(),
                total: 2
            }
        );
        assert_eq!(
            err.to_string(),
            "IPv4 range 10.1.0.0/30 is exhausted (2 addresses, all in use)"
        );
    }

    #[test]
    fn gateway_is_never_handed_out() {
        let mut c = cfg("10.1.0.0/29");
        c.gateway = Some("10.1.0.3".into());
        let pool = Pool::from_config(&[vec![c]]).unwrap();
        let mut state = State::new();
        let got: Vec<IpAddr> = (0..5).map(|n| one(&mut state, &pool, n).unwrap()).collect();
        assert!(!got.contains(&ip("10.1.0.3")));
        assert!(!got.contains(&ip("10.1.0.0")));
        assert!(!got.contains(&ip("10.1.0.7")));
        assert!(one(&mut state, &pool, 5).is_err());
    }

    #[test]
    fn retried_add_returns_the_same_addresses() {
        let pool = pool(&[&["10.0.0.0/24"], &["fd00::/64"]]);
        let mut state = State::new();
        let first = state.allocate(&pool, &owner(1), &[]).unwrap();
        let before = state.clone();
        let again = state.allocate(&pool, &owner(1), &[]).unwrap();
        assert_eq!(first, again);
        assert_eq!(state, before);
        // Same container, other interface: a different attachment.
        let other = state
            .allocate(&pool, &Owner::new("c1", "net1"), &[])
            .unwrap();
        assert_ne!(other[0].address, first[0].address);
    }

    #[test]
    fn retried_add_completes_a_partial_allocation() {
        let pool = pool(&[&["10.0.0.0/24"], &["fd00::/64"]]);
        let mut state = State::new();
        state.records.insert(ip("10.0.0.7"), owner(1));
        let got = state.allocate(&pool, &owner(1), &[]).unwrap();
        assert_eq!(got[0].address.ip(), ip("10.0.0.7"));
        assert_eq!(got[1].address.ip(), ip("fd00::1"));
        assert_eq!(state.records().count(), 2);
    }

    #[test]
    fn dual_stack_is_all_or_nothing() {
        let dual = pool(&[&["10.1.0.0/30"], &["fd00::/64"]]);
        let mut state = State::new();
        state.allocate(&dual, &owner(0), &[]).unwrap();
        state.allocate(&dual, &owner(1), &[]).unwrap();
        let before = state.clone();
        let err = state.allocate(&dual, &owner(2), &[]).unwrap_err();
        assert!(matches!(
            err,
            IpamError::Exhausted {
                set: 0,
                family: "IPv4",
                ..
            }
        ));
        assert_eq!(state, before, "the IPv6 address must not be taken");
        assert!(state.owned_by(&owner(2)).is_empty());

        // And the IPv6 set running out is named as IPv6.
        let small_v6 = pool(&[&["10.0.0.0/24"], &["fd00::/126"]]);
        let mut state = State::new();
        for n in 0..3 {
            state.allocate(&small_v6, &owner(n), &[]).unwrap();
        }
        let err = state.allocate(&small_v6, &owner(3), &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "IPv6 range fd00::/126 is exhausted (3 addresses, all in use)"
        );
        assert!(state.owned_by(&owner(3)).is_empty());
    }

    #[test]
    fn requested_addresses() {
        let mut gw = cfg("10.0.0.0/24");
        gw.gateway = Some("10.0.0.1".into());
        let pool = Pool::from_config(&[vec![gw], vec![cfg("fd00::/64")]]).unwrap();
        let mut state = State::new();
        let got = state
            .allocate(&pool, &owner(1), &[ip("10.0.0.50")])
            .unwrap();
        assert_eq!(got[0].address.ip(), ip("10.0.0.50"));
        assert_eq!(got[1].address.ip(), ip("fd00::1"));
        assert_eq!(state.last_reserved(0), Some(ip("10.0.0.50")));
        // A retry with the same request is idempotent.
        assert_eq!(
            state
                .allocate(&pool, &owner(1), &[ip("10.0.0.50")])
                .unwrap(),
            got
        );

        let before = state.clone();
        let cases = [
            (
                vec![ip("10.0.0.50")],
                IpamError::RequestedUnavailable {
                    ip: ip("10.0.0.50"),
                    owner: owner(1),
                },
            ),
            (
                vec![ip("10.9.0.1")],
                IpamError::RequestedOutOfRange { ip: ip("10.9.0.1") },
            ),
            (
                vec![ip("10.0.0.1")],
                IpamError::RequestedReserved { ip: ip("10.0.0.1") },
            ),
            (
                vec![ip("10.0.0.255")],
                IpamError::RequestedOutOfRange {
                    ip: ip("10.0.0.255"),
                },
            ),
            (
                vec![ip("10.0.0.60"), ip("10.0.0.61")],
                IpamError::RequestedSameSet {
                    set: 0,
                    first: ip("10.0.0.60"),
                    second: ip("10.0.0.61"),
                },
            ),
            // The IPv6 request is fine, the IPv4 one taken: nothing happens.
            (
                vec![ip("fd00::99"), ip("10.0.0.50")],
                IpamError::RequestedUnavailable {
                    ip: ip("10.0.0.50"),
                    owner: owner(1),
                },
            ),
        ];
        for (requested, want) in cases {
            assert_eq!(state.allocate(&pool, &owner(2), &requested), Err(want));
            assert_eq!(state, before);
        }
        assert_eq!(
            state.allocate(&pool, &owner(1), &[ip("10.0.0.51")]),
            Err(IpamError::RequestedMismatch {
                requested: ip("10.0.0.51"),
                held: ip("10.0.0.50")
            })
        );

        // Both families requested at once.
        let got = state
            .allocate(&pool, &owner(3), &[ip("fd00::99"), ip("10.0.0.99")])
            .unwrap();
        assert_eq!(got[0].address.ip(), ip("10.0.0.99"));
        assert_eq!(got[1].address.ip(), ip("fd00::99"));
    }

    #[test]
    fn owners_that_would_break_the_file_format_are_refused() {
        let pool = pool(&[&["10.0.0.0/24"]]);
        let mut state = State::new();
        for bad in [
            Owner::new("a b", "eth0"),
            Owner::new("abc", "eth\n0"),
            Owner::new("", "eth0"),
            Owner::new("abc", ""),
            Owner::new("abc\t", "eth0"),
        ] {
            assert!(matches!(
                state.allocate(&pool, &bad, &[]),
                Err(IpamError::InvalidOwner { .. })
            ));
        }
        // Too long for one store record.
        for (bad, field) in [
            (
                Owner::new("a".repeat(MAX_CONTAINER_ID + 1), "eth0"),
                "container id",
            ),
            (Owner::new("abc", "e".repeat(MAX_IFNAME + 1)), "ifname"),
        ] {
            assert!(matches!(
                state.allocate(&pool, &bad, &[]),
                Err(IpamError::OwnerTooLong { field: f, .. }) if f == field
            ));
        }
        // The longest allowed, and non-ASCII, are fine.
        let long = Owner::new("é".repeat(MAX_CONTAINER_ID / 2), "i".repeat(MAX_IFNAME));
        assert!(state.allocate(&pool, &long, &[]).is_ok());
        state.release(&long);
        state.last.clear();
        assert_eq!(state, State::new());
    }

    #[test]
    fn release_is_idempotent() {
        let pool = pool(&[&["10.0.0.0/24"], &["fd00::/64"]]);
        let mut state = State::new();
        state.allocate(&pool, &owner(1), &[]).unwrap();
        state.allocate(&pool, &owner(2), &[]).unwrap();
        assert_eq!(
            state.release(&owner(1)),
            vec![ip("10.0.0.1"), ip("fd00::1")]
        );
        assert_eq!(state.release(&owner(1)), Vec::<IpAddr>::new());
        assert_eq!(state.release(&owner(99)), Vec::<IpAddr>::new());
        assert_eq!(state.records().count(), 2);
    }

    #[test]
    fn retain_releases_what_gc_does_not_keep() {
        let pool = pool(&[&["10.0.0.0/24"]]);
        let mut state = State::new();
        for n in 0..5 {
            state.allocate(&pool, &owner(n), &[]).unwrap();
        }
        let valid = [owner(1), owner(3)];
        let released = state.retain(|o| valid.contains(o));
        assert_eq!(
            released.iter().map(|(_, o)| o.clone()).collect::<Vec<_>>(),
            vec![owner(0), owner(2), owner(4)]
        );
        let left: Vec<&Owner> = state.records().map(|(_, o)| o).collect();
        assert_eq!(left, vec![&owner(1), &owner(3)]);
    }

    #[test]
    fn free_counts() {
        let mut gw = cfg("10.0.0.0/24");
        gw.gateway = Some("10.0.0.1".into());
        let pool =
            Pool::from_config(&[vec![gw, cfg("10.0.1.0/30")], vec![cfg("fd00::/64")]]).unwrap();
        let mut state = State::new();
        assert_eq!(state.free_per_set(&pool), vec![253 + 2, (1u128 << 64) - 1]);
        for n in 0..3 {
            state.allocate(&pool, &owner(n), &[]).unwrap();
        }
        // A record outside every range (config changed since) is not counted.
        state.records.insert(ip("10.9.9.9"), owner(9));
        assert_eq!(state.free_per_set(&pool), vec![252, (1u128 << 64) - 4]);
        let big = pool_of("::/0");
        assert_eq!(State::new().free_per_set(&big), vec![u128::MAX]);
    }

    fn pool_of(subnet: &str) -> Pool {
        Pool::from_config(&[vec![cfg(subnet)]]).unwrap()
    }

    #[test]
    fn skipping_taken_addresses_is_fast() {
        // A /64 with its first 1000 addresses taken and no last-reserved
        // hint: the search walks the run of taken addresses, not 2^64.
        let pool = pool_of("fd00::/64");
        let mut state = State::new();
        for n in 1..=1000u128 {
            state.records.insert(
                from_u128(to_u128(ip("fd00::")) + n, true),
                owner(n as usize),
            );
        }
        let t = Instant::now();
        let got = one(&mut state, &pool, 5000).unwrap();
        let v6 = t.elapsed();
        assert_eq!(got, ip("fd00::3e9"));

        // A /24 with 250 taken, last reserved at the end of the run.
        let pool = pool_of("10.0.0.0/24");
        let mut state = State::new();
        for n in 0..250 {
            one(&mut state, &pool, n).unwrap();
        }
        let t = Instant::now();
        let got = one(&mut state, &pool, 250).unwrap();
        let v4 = t.elapsed();
        assert_eq!(got, ip("10.0.0.251"));
        // Full /24 but one hole, last reserved at the end: a full wrap.
        for n in 251..254 {
            one(&mut state, &pool, n).unwrap();
        }
        state.release(&owner(7));
        let t = Instant::now();
        assert_eq!(one(&mut state, &pool, 999).unwrap(), ip("10.0.0.8"));
        let wrap = t.elapsed();
        eprintln!("allocate: /64 past 1000 taken {v6:?}, /24 with 250 taken {v4:?}, /24 full wrap {wrap:?}");
        assert!(v6.as_millis() < 50 && v4.as_millis() < 50 && wrap.as_millis() < 50);
    }
}
