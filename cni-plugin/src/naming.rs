//! Names and marks ferrite gives to what it creates on the host.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The pod's IPv4 gateway: link-local, never routed, the same in every pod.
/// The pod holds a permanent neighbour entry for it, so it never ARPs.
pub const GATEWAY_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(169, 254, 1, 1));
/// The pod's IPv6 gateway, also with a permanent neighbour entry.
pub const GATEWAY_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1));

pub fn gateway_for(ip: IpAddr) -> IpAddr {
    if ip.is_ipv4() {
        GATEWAY_V4
    } else {
        GATEWAY_V6
    }
}

/// The host-side veth name for (container id, ifname): "fer" and 12 hex
/// digits of a stable hash, 15 bytes, the same on every retry.
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in container_id
        .bytes()
        .chain(std::iter::once(0))
        .chain(ifname.bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("fer{:012x}", h >> 16)
}

/// Is `name` shaped like `host_veth_name`'s names?
pub fn is_host_veth_name(name: &str) -> bool {
    name.len() == 15
        && name.starts_with("fer")
        && name[3..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The alias ADD puts on a host veth, for people reading `ip link`; CHECK
/// and repair also expect it. (The endpoint map entry, written last, is
/// what marks a pod complete.)
pub fn host_veth_alias(network: &str) -> String {
    format!("ferrite/{network}")
}

/// The device group every host veth of `network` is created in (set in the
/// create message itself, so even a veth whose ADD was killed a moment later
/// carries it): ferrite's mark of ownership. DEL, GC and ADD remove only
/// links named like ferrite's veths that carry their network's group. The
/// high bit keeps it clear of the small groups people assign by hand.
pub fn host_veth_group(network: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in b"ferrite/".iter().chain(network.as_bytes()) {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h | 0x8000_0000
}

/// `N` random unicast, locally administered MAC addresses, from one
/// getrandom call (a veth pair needs two).
pub fn random_macs<const N: usize>() -> [[u8; 6]; N] {
    let mut macs = [[0u8; 6]; N];
    let len = 6 * N;
    // SAFETY: getrandom writes at most len bytes into macs, which is
    // N arrays of 6 bytes laid out contiguously.
    let n = unsafe { libc::getrandom(macs.as_mut_ptr().cast(), len, 0) };
    if n != len as isize {
        // getrandom cannot fail for a few bytes once the pool is
        // initialised; fall back to time and pid rather than fail an ADD.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64
            ^ u64::from(std::process::id()) << 32;
        for (i, mac) in macs.iter_mut().enumerate() {
            let v = t.wrapping_add((i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            mac.copy_from_slice(&v.to_le_bytes()[..6]);
        }
    }
    for mac in &mut macs {
        mac[0] = (mac[0] & 0xfe) | 0x02;
    }
    macs
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veth_names_are_stable_short_and_distinct() {
        let a = host_veth_name("c0ffee", "eth0");
        assert_eq!(a, host_veth_name("c0ffee", "eth0"));
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("fer"));
        assert_ne!(a, host_veth_name("c0ffee", "eth1"));
        assert_ne!(a, host_veth_name("c0ffe", "eeth0"));
        assert!(is_host_veth_name(&a));
        for other in [
            "fer0123456789a",
            "fer0123456789abc",
            "fer0123456789aB",
            "eth0",
            "vethabcdef012345",
        ] {
            assert!(!is_host_veth_name(other), "{other}");
        }
    }

    #[test]
    fn groups_are_per_network_and_high() {
        assert_eq!(host_veth_group("a"), host_veth_group("a"));
        assert_ne!(host_veth_group("a"), host_veth_group("b"));
        assert!(host_veth_group("k8s-pod-network") >= 0x8000_0000);
    }

    #[test]
    fn macs_are_local_unicast() {
        for _ in 0..64 {
            let [m] = random_macs::<1>();
            assert_eq!(m[0] & 0x01, 0, "unicast");
            assert_eq!(m[0] & 0x02, 0x02, "locally administered");
            let [a, b] = random_macs::<2>();
            assert_ne!(a, b, "the two ends of a pair differ");
            assert_eq!((a[0] & 0x03, b[0] & 0x03), (0x02, 0x02));
        }
        assert_eq!(format_mac(&[2, 0, 0xab, 1, 2, 3]), "02:00:ab:01:02:03");
    }
}
