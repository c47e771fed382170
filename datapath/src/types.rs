//! What ferrite keeps in its maps, in Rust, and the exact C layouts
//! (`bpf/lib/common.h`) those values travel in.

use std::net::{IpAddr, Ipv6Addr};

use crate::drop_reason::{DropReason, DROP_REASON_SLOTS};

/// Traffic to this endpoint is shaped by a qdisc on its host veth: the fast
/// path delivers through the veth's egress (`bpf_redirect`) instead of
/// straight into the pod (`bpf_redirect_peer`, which skips qdiscs).
/// Mirrors `ENDPOINT_F_SHAPED` in bpf/lib/common.h.
pub const ENDPOINT_F_SHAPED: u32 = 1;
/// Mirrors `ENDPOINT_F_VIA_STACK` in bpf/lib/common.h: what the pod sends
/// passes on to a chained plugin's ingress qdisc instead of the fast path.
pub const ENDPOINT_F_VIA_STACK: u32 = 2;
/// Mirrors `ENDPOINT_F_HOSTPORT` in bpf/lib/common.h: a hostPort leads into
/// this pod, whose answers to clients off the node need translating back.
pub const ENDPOINT_F_HOSTPORT: u32 = 4;

/// Capacity of the endpoint map (FERRITE_MAX_ENDPOINTS in bpf/lib/common.h).
pub const MAX_ENDPOINTS: usize = 16384;

#[cfg(test)]
mod capacity_tests {
    #[test]
    fn max_endpoints_mirrors_the_c_header() {
        let header = include_str!("../bpf/lib/common.h");
        let line = header
            .lines()
            .find(|l| l.starts_with("#define FERRITE_MAX_ENDPOINTS"))
            .expect("FERRITE_MAX_ENDPOINTS in common.h");
        let value: usize = line.split_whitespace().nth(2).unwrap().parse().unwrap();
        assert_eq!(value, super::MAX_ENDPOINTS);
    }
}

/// A pod on this node, as `from_pod` needs it to check and redirect packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// The host veth.
    pub ifindex: u32,
    /// `ENDPOINT_F_*` bits.
    pub flags: u32,
    /// The pod's eth0.
    pub pod_mac: [u8; 6],
    /// The host veth.
    pub host_mac: [u8; 6],
}

/// One endpoint's counters, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointStats {
    /// Packets (and bytes) the pod sent, whatever became of them.
    pub from_pod_packets: u64,
    pub from_pod_bytes: u64,
    /// Packets the pod sent that took the fast path to another pod.
    pub redirected_packets: u64,
    pub redirected_bytes: u64,
    /// Packets the host stack delivered to the pod.
    pub to_pod_packets: u64,
    pub to_pod_bytes: u64,
    /// Packets another pod sent straight into this one (fast path).
    pub redirected_in_packets: u64,
    pub redirected_in_bytes: u64,
    /// Drops of packets the pod sent, per reason (every reason, in code order).
    pub drops: Vec<(DropReason, u64)>,
}

impl EndpointStats {
    /// Drops counted for `reason`.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| *n)
    }

    pub(crate) fn add(&mut self, raw: &RawStats) {
        self.from_pod_packets += raw.from_pod_packets;
        self.from_pod_bytes += raw.from_pod_bytes;
        self.redirected_packets += raw.redirected_packets;
        self.redirected_bytes += raw.redirected_bytes;
        self.to_pod_packets += raw.to_pod_packets;
        self.to_pod_bytes += raw.to_pod_bytes;
        self.redirected_in_packets += raw.redirected_in_packets;
        self.redirected_in_bytes += raw.redirected_in_bytes;
        if self.drops.is_empty() {
            self.drops = DropReason::ALL.iter().map(|r| (*r, 0)).collect();
        }
        for (reason, n) in &mut self.drops {
            *n += raw.drops[reason.slot()];
        }
    }
}

/// Key of `ferrite_endpts`: the address, IPv4 as v4-mapped IPv6.
pub(crate) fn ip_key(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

pub(crate) fn ip_from_key(key: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(key);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// Plain-old-data views as bytes for the map syscalls.
///
/// # Safety
/// Implementors are `#[repr(C)]`, have no implicit padding and accept any bit
/// pattern.
pub(crate) unsafe trait Pod: Copy + Default {
    fn as_bytes(&self) -> &[u8] {
        // SAFETY: per the trait contract every byte is initialised.
        unsafe { std::slice::from_raw_parts((self as *const Self).cast::<u8>(), size_of::<Self>()) }
    }

    fn from_bytes(bytes: &[u8]) -> Self {
        assert!(bytes.len() >= size_of::<Self>());
        // SAFETY: enough bytes, any bit pattern is valid, unaligned read.
        unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Self>()) }
    }
}

/// `struct endpoint`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RawEndpoint {
    pub ifindex: u32,
    pub flags: u32,
    pub pod_mac: [u8; 6],
    pub host_mac: [u8; 6],
    pub _pad: [u8; 4],
}

/// `struct iface`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RawIface {
    pub pod_mac: [u8; 6],
    pub host_mac: [u8; 6],
    pub _pad: [u8; 4],
}

/// `struct endpoint_stats` (one CPU's copy).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RawStats {
    pub from_pod_packets: u64,
    pub from_pod_bytes: u64,
    pub redirected_packets: u64,
    pub redirected_bytes: u64,
    pub to_pod_packets: u64,
    pub to_pod_bytes: u64,
    pub redirected_in_packets: u64,
    pub redirected_in_bytes: u64,
    pub drops: [u64; DROP_REASON_SLOTS],
}

/// `struct flow_key` (the key of `ferrite_stkflow`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RawFlowKey {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

// Sizes pinned by _Static_assert in bpf/lib/common.h.
const _: () = assert!(size_of::<RawEndpoint>() == 24);
const _: () = assert!(size_of::<RawIface>() == 16);
const _: () = assert!(size_of::<RawStats>() == 192);
const _: () = assert!(size_of::<RawFlowKey>() == 40);

// SAFETY: repr(C), fields laid out without implicit padding (sizes above).
unsafe impl Pod for RawEndpoint {}
// SAFETY: as above.
unsafe impl Pod for RawIface {}
// SAFETY: as above.
unsafe impl Pod for RawStats {}
// SAFETY: as above.
unsafe impl Pod for RawFlowKey {}
// SAFETY: integers and byte arrays.
unsafe impl Pod for u32 {}
// SAFETY: as above.
unsafe impl Pod for [u8; 16] {}

impl From<&Endpoint> for RawEndpoint {
    fn from(ep: &Endpoint) -> Self {
        Self {
            ifindex: ep.ifindex,
            flags: ep.flags,
            pod_mac: ep.pod_mac,
            host_mac: ep.host_mac,
            _pad: [0; 4],
        }
    }
}

impl From<RawEndpoint> for Endpoint {
    fn from(raw: RawEndpoint) -> Self {
        Self {
            ifindex: raw.ifindex,
            flags: raw.flags,
            pod_mac: raw.pod_mac,
            host_mac: raw.host_mac,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const COMMON_H: &str = include_str!("../bpf/lib/common.h");

    #[test]
    fn c_asserts_the_same_sizes() {
        for (c, size) in [
            ("struct endpoint", 24),
            ("struct iface", 16),
            ("struct endpoint_stats", 192),
            ("struct flow_key", 40),
            ("union v6addr", 16),
        ] {
            let line = format!("_Static_assert(sizeof({c}) == {size},");
            assert!(COMMON_H.contains(&line), "missing `{line}` in common.h");
        }
    }

    #[test]
    fn ipv4_keys_are_v4_mapped() {
        let ip = IpAddr::V4(Ipv4Addr::new(10, 244, 1, 7));
        let key = ip_key(ip);
        assert_eq!(
            key,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 244, 1, 7]
        );
        assert_eq!(ip_from_key(key), ip);
        let v6: IpAddr = "fd00::1".parse().unwrap();
        assert_eq!(ip_from_key(ip_key(v6)), v6);
    }

    #[test]
    fn stats_sum_per_reason() {
        let mut raw = RawStats {
            from_pod_packets: 2,
            ..Default::default()
        };
        raw.drops[DropReason::Malformed.slot()] = 3;
        let mut sum = EndpointStats::default();
        sum.add(&raw);
        sum.add(&raw);
        assert_eq!(sum.from_pod_packets, 4);
        assert_eq!(sum.dropped(DropReason::Malformed), 6);
        assert_eq!(sum.dropped(DropReason::SpoofedIp), 0);
        assert_eq!(sum.drops.len(), DropReason::ALL.len());
    }
}
