// SPDX-License-Identifier: Apache-2.0
//! Host-local style ranges: the configuration as written, and the validated
//! form the allocator works on.

use std::fmt;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// One host-local range as written in the network configuration:
/// `{"subnet": "10.244.1.0/24", "rangeStart": "...", "rangeEnd": "...", "gateway": "..."}`.
/// Unknown keys are ignored, as host-local does.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RangeConfig {
    pub subnet: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range_start: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range_end: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
}

/// Why a range configuration was refused. Every message names the value.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RangeError {
    #[error("ipam: no ranges configured")]
    NoRanges,
    #[error("ipam: range set {set} is empty")]
    EmptySet { set: usize },
    #[error("invalid subnet {value:?}: {reason}")]
    InvalidSubnet { value: String, reason: &'static str },
    #[error("invalid {field} {value:?}: not an IP address")]
    InvalidAddress { field: &'static str, value: String },
    #[error("subnet {subnet} is too small to allocate from (IPv4 needs /30 or shorter, IPv6 /126 or shorter)")]
    TooSmall { subnet: IpNetwork },
    #[error("{field} {addr} is not in subnet {subnet}")]
    OutsideSubnet {
        field: &'static str,
        addr: IpAddr,
        subnet: IpNetwork,
    },
    #[error("rangeStart {start} is after rangeEnd {end} in subnet {subnet}")]
    StartAfterEnd {
        start: IpAddr,
        end: IpAddr,
        subnet: IpNetwork,
    },
    #[error("gateway {gateway} is the network or broadcast address of subnet {subnet}")]
    GatewayReserved { gateway: IpAddr, subnet: IpNetwork },
    #[error(
        "range {range} has no usable address (network, broadcast and gateway are never handed out)"
    )]
    NoUsableAddress { range: String },
    #[error("range set {set} mixes IPv4 and IPv6 ({first} and {other}); use one set per family")]
    MixedFamily {
        set: usize,
        first: IpNetwork,
        other: IpNetwork,
    },
    #[error("range {a} (set {set_a}) overlaps range {b} (set {set_b})")]
    Overlap {
        a: String,
        set_a: usize,
        b: String,
        set_b: usize,
    },
}

/// A validated range: `start..=end` inside `subnet`, same family throughout.
/// The network address, the IPv4 broadcast address and the gateway are never
/// handed out, even when they fall between `start` and `end`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Range {
    /// The network address (host bits zero) and prefix.
    pub subnet: IpNetwork,
    pub start: IpAddr,
    pub end: IpAddr,
    pub gateway: Option<IpAddr>,
}

/// Ranges of one family; an allocation takes one address from the set,
/// trying the ranges in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeSet(pub Vec<Range>);

/// Every set of a network: an ADD takes one address from each (dual stack is
/// one IPv4 set and one IPv6 set).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pool {
    pub sets: Vec<RangeSet>,
}

/// An address as an integer, so ranges can be walked and compared without
/// caring about the family.
pub(crate) fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// The inverse of [`to_u128`]; `v6` picks the family. IPv4 values always fit
/// because they come from IPv4 ranges.
pub(crate) fn from_u128(value: u128, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(value.into())
    } else {
        IpAddr::V4((value as u32).into())
    }
}

pub(crate) fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    }
}

/// Parses `address/prefix` strictly: std's address parser (which refuses
/// "10.0.0/24", unlike ipnetwork's own), a decimal prefix, and host bits
/// cleared ("10.0.0.1/24" becomes 10.0.0.0/24, the friendlier reading).
fn parse_subnet(value: &str) -> Result<IpNetwork, RangeError> {
    let bad = |reason| RangeError::InvalidSubnet {
        value: value.to_string(),
        reason,
    };
    let (addr, prefix) = value
        .split_once('/')
        .ok_or_else(|| bad("expected address/prefix, e.g. 10.244.1.0/24"))?;
    let addr: IpAddr = addr.parse().map_err(|_| bad("not an IP address"))?;
    if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("the prefix length is not a number"));
    }
    let prefix: u8 = prefix
        .parse()
        .map_err(|_| bad("the prefix length is too long"))?;
    let net = IpNetwork::new(addr, prefix).map_err(|_| bad("the prefix length is too long"))?;
    IpNetwork::new(net.network(), prefix).map_err(|_| bad("the prefix length is too long"))
}

fn parse_addr(field: &'static str, value: &str) -> Result<IpAddr, RangeError> {
    value.parse().map_err(|_| RangeError::InvalidAddress {
        field,
        value: value.to_string(),
    })
}

impl Range {
    /// Validates one range and fills in host-local's defaults: start is the
    /// address after the network address, end the last address before the
    /// broadcast address (IPv4) or the last address of the subnet (IPv6).
    /// Unlike host-local, no gateway is assumed when none is given.
    pub fn from_config(config: &RangeConfig) -> Result<Range, RangeError> {
        let subnet = parse_subnet(&config.subnet)?;
        let max_prefix = if subnet.is_ipv4() { 30 } else { 126 };
        if subnet.prefix() > max_prefix {
            return Err(RangeError::TooSmall { subnet });
        }
        let v6 = subnet.is_ipv6();
        let (first, last) = bounds(subnet);
        let in_subnet = |field, value: &Option<String>| -> Result<Option<IpAddr>, RangeError> {
            let Some(value) = value else { return Ok(None) };
            let addr = parse_addr(field, value)?;
            if !subnet.contains(addr) || addr.is_ipv4() != subnet.is_ipv4() {
                return Err(RangeError::OutsideSubnet {
                    field,
                    addr,
                    subnet,
                });
            }
            Ok(Some(addr))
        };
        let start = in_subnet("rangeStart", &config.range_start)?
            .unwrap_or_else(|| from_u128(first + 1, v6));
        let end = in_subnet("rangeEnd", &config.range_end)?
            .unwrap_or_else(|| from_u128(if v6 { last } else { last - 1 }, v6));
        let gateway = in_subnet("gateway", &config.gateway)?;
        if to_u128(start) > to_u128(end) {
            return Err(RangeError::StartAfterEnd { start, end, subnet });
        }
        if let Some(gateway) = gateway {
            let g = to_u128(gateway);
            if g == first || (!v6 && g == last) {
                return Err(RangeError::GatewayReserved { gateway, subnet });
            }
        }
        let range = Range {
            subnet,
            start,
            end,
            gateway,
        };
        if range.size() == 0 {
            return Err(RangeError::NoUsableAddress {
                range: range.to_string(),
            });
        }
        Ok(range)
    }

    /// Whether `ip` lies in `start..=end` (reserved addresses included).
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.start.is_ipv4()
            && (self.start_u128()..=self.end_u128()).contains(&to_u128(ip))
    }

    /// Whether `ip` is never handed out: the network address, the IPv4
    /// broadcast address, the gateway.
    pub fn is_reserved(&self, ip: IpAddr) -> bool {
        self.is_reserved_u128(to_u128(ip))
    }

    /// How many addresses this range can hand out.
    pub fn size(&self) -> u128 {
        let (start, end) = (self.start_u128(), self.end_u128());
        if start > end {
            return 0; // only a hand-built Range can get here
        }
        let span = (end - start).saturating_add(1);
        let (first, last) = bounds(self.subnet);
        let mut reserved = vec![first];
        if self.subnet.is_ipv4() {
            reserved.push(last);
        }
        reserved.extend(self.gateway.map(to_u128));
        reserved.sort_unstable();
        reserved.dedup();
        let inside = reserved
            .iter()
            .filter(|r| (start..=end).contains(r))
            .count();
        span - inside as u128
    }

    pub(crate) fn is_v6(&self) -> bool {
        self.subnet.is_ipv6()
    }

    pub(crate) fn start_u128(&self) -> u128 {
        to_u128(self.start)
    }

    pub(crate) fn end_u128(&self) -> u128 {
        to_u128(self.end)
    }

    pub(crate) fn is_reserved_u128(&self, value: u128) -> bool {
        let (first, last) = bounds(self.subnet);
        value == first
            || (self.subnet.is_ipv4() && value == last)
            || self.gateway.map(to_u128) == Some(value)
    }

    fn overlaps(&self, other: &Range) -> bool {
        self.is_v6() == other.is_v6()
            && self.start_u128() <= other.end_u128()
            && other.start_u128() <= self.end_u128()
    }

    fn is_default_span(&self) -> bool {
        let (first, last) = bounds(self.subnet);
        let default_end = if self.is_v6() { last } else { last - 1 };
        self.start_u128() == first + 1 && self.end_u128() == default_end
    }
}

/// First and last address of a subnet, as integers.
fn bounds(subnet: IpNetwork) -> (u128, u128) {
    let width = if subnet.is_ipv4() { 32 } else { 128 };
    let host_bits = width - u32::from(subnet.prefix());
    let host_mask = if host_bits == 128 {
        u128::MAX
    } else {
        (1u128 << host_bits) - 1
    };
    let first = to_u128(subnet.network());
    (first, first | host_mask)
}

impl fmt::Display for Range {
    /// The subnet alone when the range spans it by default, otherwise
    /// `start-end in subnet`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_default_span() {
            write!(f, "{}", self.subnet)
        } else {
            write!(f, "{}-{} in {}", self.start, self.end, self.subnet)
        }
    }
}

impl RangeSet {
    /// Whether any range of the set holds `ip` between its start and end.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.range_for(ip).is_some()
    }

    /// The range holding `ip` between its start and end.
    pub fn range_for(&self, ip: IpAddr) -> Option<&Range> {
        self.0.iter().find(|r| r.contains(ip))
    }

    /// "IPv4" or "IPv6".
    pub fn family(&self) -> &'static str {
        self.0.first().map_or("IP", |r| family(r.start))
    }

    /// How many addresses the set can hand out (saturating).
    pub fn size(&self) -> u128 {
        self.0
            .iter()
            .fold(0u128, |acc, r| acc.saturating_add(r.size()))
    }
}

impl fmt::Display for RangeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, range) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{range}")?;
        }
        Ok(())
    }
}

impl Pool {
    /// Validates `ipam.ranges`: each inner list is one set. Ranges in a set
    /// share one family and do not overlap; sets do not overlap each other.
    pub fn from_config(ranges: &[Vec<RangeConfig>]) -> Result<Pool, RangeError> {
        if ranges.is_empty() {
            return Err(RangeError::NoRanges);
        }
        let mut sets = Vec::with_capacity(ranges.len());
        for (set, configs) in ranges.iter().enumerate() {
            if configs.is_empty() {
                return Err(RangeError::EmptySet { set });
            }
            let parsed = configs
                .iter()
                .map(Range::from_config)
                .collect::<Result<Vec<_>, _>>()?;
            let first = &parsed[0];
            if let Some(other) = parsed.iter().find(|r| r.is_v6() != first.is_v6()) {
                return Err(RangeError::MixedFamily {
                    set,
                    first: first.subnet,
                    other: other.subnet,
                });
            }
            sets.push(RangeSet(parsed));
        }
        let all: Vec<(usize, &Range)> = sets
            .iter()
            .enumerate()
            .flat_map(|(i, s)| s.0.iter().map(move |r| (i, r)))
            .collect();
        for (n, (set_a, a)) in all.iter().enumerate() {
            if let Some((set_b, b)) = all[n + 1..].iter().find(|(_, b)| a.overlaps(b)) {
                return Err(RangeError::Overlap {
                    a: a.to_string(),
                    set_a: *set_a,
                    b: b.to_string(),
                    set_b: *set_b,
                });
            }
        }
        Ok(Pool { sets })
    }

    /// The set and range that hold `ip` between their start and end.
    pub fn locate(&self, ip: IpAddr) -> Option<(usize, &Range)> {
        self.sets
            .iter()
            .enumerate()
            .find_map(|(i, s)| s.range_for(ip).map(|r| (i, r)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(subnet: &str) -> RangeConfig {
        RangeConfig {
            subnet: subnet.into(),
            range_start: None,
            range_end: None,
            gateway: None,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_host_local_json_and_ignores_unknown_keys() {
        let json = r#"[[{"subnet":"10.244.1.0/24","rangeStart":"10.244.1.10","rangeEnd":"10.244.1.20","gateway":"10.244.1.1","extra":true}],
                       [{"subnet":"fd00::/64"}]]"#;
        let ranges: Vec<Vec<RangeConfig>> = serde_json::from_str(json).unwrap();
        assert_eq!(ranges[0][0].range_start.as_deref(), Some("10.244.1.10"));
        let pool = Pool::from_config(&ranges).unwrap();
        assert_eq!(pool.sets.len(), 2);
        let r = &pool.sets[0].0[0];
        assert_eq!(r.start, ip("10.244.1.10"));
        assert_eq!(r.end, ip("10.244.1.20"));
        assert_eq!(r.gateway, Some(ip("10.244.1.1")));
        assert_eq!(r.size(), 11);
        // Round trip: None fields are not written.
        let back = serde_json::to_string(&ranges[1][0]).unwrap();
        assert_eq!(back, r#"{"subnet":"fd00::/64"}"#);
    }

    #[test]
    fn ipv4_defaults_skip_network_and_broadcast() {
        let r = Range::from_config(&cfg("10.244.1.0/24")).unwrap();
        assert_eq!(r.start, ip("10.244.1.1"));
        assert_eq!(r.end, ip("10.244.1.254"));
        assert_eq!(r.gateway, None);
        assert_eq!(r.size(), 254);
        assert_eq!(r.to_string(), "10.244.1.0/24");
    }

    #[test]
    fn ipv4_slash30_has_two_addresses() {
        let r = Range::from_config(&cfg("10.1.0.0/30")).unwrap();
        assert_eq!((r.start, r.end), (ip("10.1.0.1"), ip("10.1.0.2")));
        assert_eq!(r.size(), 2);
    }

    #[test]
    fn ipv6_defaults_run_to_the_last_address() {
        let r = Range::from_config(&cfg("fd00::/64")).unwrap();
        assert_eq!(r.start, ip("fd00::1"));
        assert_eq!(r.end, ip("fd00::ffff:ffff:ffff:ffff"));
        assert_eq!(r.size(), (1u128 << 64) - 1);
        let r = Range::from_config(&cfg("fd00::100/120")).unwrap();
        assert_eq!((r.start, r.end), (ip("fd00::101"), ip("fd00::1ff")));
        assert_eq!(r.size(), 255);
        let r = Range::from_config(&cfg("fd00::/126")).unwrap();
        assert_eq!(r.size(), 3);
    }

    #[test]
    fn host_bits_are_cleared() {
        let r = Range::from_config(&cfg("10.0.0.1/24")).unwrap();
        assert_eq!(r.subnet.to_string(), "10.0.0.0/24");
        assert_eq!(r.start, ip("10.0.0.1"));
    }

    #[test]
    fn unparseable_subnets_are_refused() {
        for bad in [
            "10.0.0/24",
            "10.0.0.0",
            "10.0.0.0/",
            "10.0.0.0/33",
            "10.0.0.0/+8",
            "fd00::/129",
            "banana/8",
            "",
        ] {
            let err = Range::from_config(&cfg(bad)).unwrap_err();
            assert!(
                matches!(err, RangeError::InvalidSubnet { ref value, .. } if value == bad),
                "{bad}: {err}"
            );
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn too_small_subnets_are_refused() {
        for bad in ["10.0.0.0/31", "10.0.0.1/32", "fd00::/127", "fd00::1/128"] {
            let err = Range::from_config(&cfg(bad)).unwrap_err();
            assert!(matches!(err, RangeError::TooSmall { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn start_end_gateway_must_lie_in_the_subnet() {
        let mut c = cfg("10.0.0.0/24");
        c.range_start = Some("10.0.1.5".into());
        let err = Range::from_config(&c).unwrap_err();
        assert_eq!(
            err.to_string(),
            "rangeStart 10.0.1.5 is not in subnet 10.0.0.0/24"
        );

        let mut c = cfg("10.0.0.0/24");
        c.range_end = Some("fd00::1".into());
        assert!(matches!(
            Range::from_config(&c),
            Err(RangeError::OutsideSubnet {
                field: "rangeEnd",
                ..
            })
        ));

        let mut c = cfg("10.0.0.0/24");
        c.gateway = Some("10.0.0.x".into());
        assert!(matches!(
            Range::from_config(&c),
            Err(RangeError::InvalidAddress {
                field: "gateway",
                ..
            })
        ));

        let mut c = cfg("10.0.0.0/24");
        c.gateway = Some("10.0.0.255".into());
        assert!(matches!(
            Range::from_config(&c),
            Err(RangeError::GatewayReserved { .. })
        ));
    }

    #[test]
    fn start_after_end_is_refused() {
        let mut c = cfg("10.0.0.0/24");
        c.range_start = Some("10.0.0.20".into());
        c.range_end = Some("10.0.0.10".into());
        assert!(matches!(
            Range::from_config(&c),
            Err(RangeError::StartAfterEnd { .. })
        ));
    }

    #[test]
    fn gateway_inside_the_range_is_not_counted() {
        let mut c = cfg("10.0.0.0/30");
        c.gateway = Some("10.0.0.1".into());
        let r = Range::from_config(&c).unwrap();
        assert_eq!(r.size(), 1);
        assert!(r.is_reserved(ip("10.0.0.1")));

        let mut c = cfg("10.0.0.0/24");
        c.range_start = Some("10.0.0.1".into());
        c.range_end = Some("10.0.0.1".into());
        c.gateway = Some("10.0.0.1".into());
        assert!(matches!(
            Range::from_config(&c),
            Err(RangeError::NoUsableAddress { .. })
        ));
    }

    #[test]
    fn mixed_family_set_is_refused() {
        let err = Pool::from_config(&[vec![cfg("10.0.0.0/24"), cfg("fd00::/64")]]).unwrap_err();
        assert!(
            matches!(err, RangeError::MixedFamily { set: 0, .. }),
            "{err}"
        );
    }

    #[test]
    fn overlaps_are_refused_within_and_across_sets() {
        let err = Pool::from_config(&[vec![cfg("10.0.0.0/24"), cfg("10.0.0.0/25")]]).unwrap_err();
        assert!(
            matches!(
                err,
                RangeError::Overlap {
                    set_a: 0,
                    set_b: 0,
                    ..
                }
            ),
            "{err}"
        );
        let err =
            Pool::from_config(&[vec![cfg("10.0.0.0/16")], vec![cfg("10.0.5.0/24")]]).unwrap_err();
        assert!(
            matches!(
                err,
                RangeError::Overlap {
                    set_a: 0,
                    set_b: 1,
                    ..
                }
            ),
            "{err}"
        );

        // Disjoint start..end in one subnet is fine.
        let mut a = cfg("10.0.0.0/24");
        a.range_end = Some("10.0.0.99".into());
        let mut b = cfg("10.0.0.0/24");
        b.range_start = Some("10.0.0.100".into());
        let pool = Pool::from_config(&[vec![a, b]]).unwrap();
        assert_eq!(pool.sets[0].size(), 254);
        assert_eq!(
            pool.sets[0].to_string(),
            "10.0.0.1-10.0.0.99 in 10.0.0.0/24, 10.0.0.100-10.0.0.254 in 10.0.0.0/24"
        );
    }

    #[test]
    fn empty_config_is_refused() {
        assert_eq!(Pool::from_config(&[]).unwrap_err(), RangeError::NoRanges);
        assert_eq!(
            Pool::from_config(&[vec![cfg("10.0.0.0/24")], vec![]]).unwrap_err(),
            RangeError::EmptySet { set: 1 }
        );
    }

    #[test]
    fn locate_finds_set_and_range() {
        let pool = Pool::from_config(&[vec![cfg("10.0.0.0/24")], vec![cfg("fd00::/64")]]).unwrap();
        assert_eq!(pool.locate(ip("fd00::5")).map(|(s, _)| s), Some(1));
        assert_eq!(pool.locate(ip("10.0.0.5")).map(|(s, _)| s), Some(0));
        assert!(pool.locate(ip("10.0.1.5")).is_none());
        assert!(pool.locate(ip("10.0.0.255")).is_none());
    }
}
