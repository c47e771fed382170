//! The pinned maps, as user space reads and writes them.

use std::{
    fs, io,
    net::IpAddr,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    sync::OnceLock,
};

use thiserror::Error;

use crate::{
    sys::{self, SysError, BPF_ANY, BPF_NOEXIST},
    types::{
        ip_from_key, ip_key, Endpoint, EndpointStats, Pod, RawEndpoint, RawFlowKey, RawIface,
        RawStats,
    },
};

const POSSIBLE_CPUS: &str = "/sys/devices/system/cpu/possible";

#[derive(Debug, Error)]
pub enum MapError {
    #[error("map {map}: {source}")]
    Syscall {
        map: &'static str,
        #[source]
        source: SysError,
    },
    #[error("reading {POSSIBLE_CPUS}: {source}")]
    PossibleCpus {
        #[source]
        source: io::Error,
    },
}

/// Handles to the maps of one datapath version that every ADD and DEL
/// uses (others are opened from their pins when asked for).
#[derive(Debug)]
pub(crate) struct Maps {
    pub endpoints: OwnedFd,
    pub ifaces: OwnedFd,
    pub stats: OwnedFd,
}

/// The error of a syscall on `map`.
pub(crate) fn on(map: &'static str) -> impl FnOnce(SysError) -> MapError {
    move |source| MapError::Syscall { map, source }
}

/// Every key of `map`, `N` bytes each.
pub(crate) fn keys<const N: usize>(
    map: &OwnedFd,
    name: &'static str,
) -> Result<Vec<[u8; N]>, MapError> {
    let mut out: Vec<[u8; N]> = Vec::new();
    loop {
        let mut next = [0u8; N];
        let more = sys::map_next_key(map.as_fd(), out.last().map(|k| &k[..]), &mut next)
            .map_err(on(name))?;
        if !more {
            return Ok(out);
        }
        out.push(next);
    }
}

/// How many per-CPU values the kernel copies for a per-CPU map.
pub(crate) fn possible_cpus() -> Result<usize, MapError> {
    static CPUS: OnceLock<usize> = OnceLock::new();
    if let Some(n) = CPUS.get() {
        return Ok(*n);
    }
    let text = read_small(POSSIBLE_CPUS).map_err(|source| MapError::PossibleCpus { source })?;
    let n = parse_cpu_list(&text).ok_or_else(|| MapError::PossibleCpus {
        source: io::Error::new(io::ErrorKind::InvalidData, format!("bad cpu list {text:?}")),
    })?;
    Ok(*CPUS.get_or_init(|| n))
}

/// A sysfs attribute, in one read: the kernel renders it whole (at most a
/// page) on the first read, so the read that would find the end is not
/// needed, nor the size a stat would give. Open, read, close: three system
/// calls per ADD instead of five.
fn read_small(path: &str) -> io::Result<String> {
    use std::io::Read;
    let mut buf = [0u8; 4096];
    let n = fs::File::open(path)?.read(&mut buf)?;
    let text = std::str::from_utf8(&buf[..n])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    if !text.ends_with('\n') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{path}: not one whole line: {text:?}"),
        ));
    }
    Ok(text.to_string())
}

/// Counts the CPUs in a list like `0-3,5,7-8`.
fn parse_cpu_list(text: &str) -> Option<usize> {
    let mut n = 0;
    for part in text.trim().split(',') {
        n += match part.split_once('-') {
            Some((a, b)) => {
                b.parse::<usize>()
                    .ok()?
                    .checked_sub(a.parse::<usize>().ok()?)?
                    + 1
            }
            None => {
                part.parse::<usize>().ok()?;
                1
            }
        };
    }
    (n > 0).then_some(n)
}

impl Maps {
    pub fn upsert_endpoint(&self, ip: IpAddr, ep: &Endpoint) -> Result<(), MapError> {
        let key = ifindex_key(ep.ifindex);
        // Counters first, zeroed, and kept if the endpoint is re-added.
        let zero = vec![0u8; size_of::<RawStats>() * possible_cpus()?];
        match sys::map_update(self.stats.as_fd(), key.as_bytes(), &zero, BPF_NOEXIST) {
            Err(e) if e.errno() != Some(libc::EEXIST) => return Err(on(crate::pin::STATS_MAP)(e)),
            _ => {}
        }
        let iface = RawIface {
            pod_mac: ep.pod_mac,
            host_mac: ep.host_mac,
            _pad: [0; 4],
        };
        sys::map_update(
            self.ifaces.as_fd(),
            key.as_bytes(),
            iface.as_bytes(),
            BPF_ANY,
        )
        .map_err(on(crate::pin::IFACES_MAP))?;
        // Last: from_pod redirects to it as soon as it is visible.
        sys::map_update(
            self.endpoints.as_fd(),
            &ip_key(ip),
            RawEndpoint::from(ep).as_bytes(),
            BPF_ANY,
        )
        .map_err(on(crate::pin::ENDPOINTS_MAP))
    }

    /// Removes `ip` if it still points at `ifindex` (a late DEL must not
    /// remove an address already given to another pod), then the veth's
    /// counters and interface entry.
    pub fn remove_endpoint(&self, ip: IpAddr, ifindex: u32) -> Result<(), MapError> {
        if self.endpoint(ip)?.is_some_and(|ep| ep.ifindex == ifindex) {
            sys::map_delete(self.endpoints.as_fd(), &ip_key(ip))
                .map_err(on(crate::pin::ENDPOINTS_MAP))?;
        }
        let key = ifindex_key(ifindex);
        sys::map_delete(self.ifaces.as_fd(), key.as_bytes()).map_err(on(crate::pin::IFACES_MAP))?;
        sys::map_delete(self.stats.as_fd(), key.as_bytes()).map_err(on(crate::pin::STATS_MAP))?;
        Ok(())
    }

    /// Removes everything that points at `ifindex`: endpoint entries (a
    /// scan of the map), counters and the interface entry. For veths whose
    /// addresses are not known, such as one a killed ADD left behind.
    pub fn forget_interface(&self, ifindex: u32) -> Result<(), MapError> {
        for (ip, ep) in self.endpoints()? {
            if ep.ifindex == ifindex {
                self.remove_endpoint(ip, ifindex)?;
            }
        }
        let key = ifindex_key(ifindex);
        sys::map_delete(self.ifaces.as_fd(), key.as_bytes()).map_err(on(crate::pin::IFACES_MAP))?;
        sys::map_delete(self.stats.as_fd(), key.as_bytes()).map_err(on(crate::pin::STATS_MAP))?;
        Ok(())
    }

    pub fn endpoint(&self, ip: IpAddr) -> Result<Option<Endpoint>, MapError> {
        self.endpoint_by_key(&ip_key(ip))
    }

    fn endpoint_by_key(&self, key: &[u8; 16]) -> Result<Option<Endpoint>, MapError> {
        let mut buf = [0u8; size_of::<RawEndpoint>()];
        let found = sys::map_lookup(self.endpoints.as_fd(), key, &mut buf)
            .map_err(on(crate::pin::ENDPOINTS_MAP))?;
        Ok(found.then(|| RawEndpoint::from_bytes(&buf).into()))
    }

    /// The host ifindexes that have counters or an interface entry.
    pub fn interfaces(&self) -> Result<Vec<u32>, MapError> {
        let mut out = Vec::new();
        for (fd, name) in [
            (self.stats.as_fd(), crate::pin::STATS_MAP),
            (self.ifaces.as_fd(), crate::pin::IFACES_MAP),
        ] {
            let mut key: Option<[u8; 4]> = None;
            loop {
                let mut next = [0u8; 4];
                let more = sys::map_next_key(fd, key.as_ref().map(|k| &k[..]), &mut next)
                    .map_err(on(name))?;
                if !more {
                    break;
                }
                let ifindex = u32::from_ne_bytes(next);
                if !out.contains(&ifindex) {
                    out.push(ifindex);
                }
                key = Some(next);
            }
        }
        Ok(out)
    }

    pub fn endpoints(&self) -> Result<Vec<(IpAddr, Endpoint)>, MapError> {
        let mut out = Vec::new();
        let mut key: Option<[u8; 16]> = None;
        loop {
            let mut next = [0u8; 16];
            let more = sys::map_next_key(
                self.endpoints.as_fd(),
                key.as_ref().map(|k| &k[..]),
                &mut next,
            )
            .map_err(on(crate::pin::ENDPOINTS_MAP))?;
            if !more {
                return Ok(out);
            }
            // Deleted between the two calls: skip it.
            if let Some(ep) = self.endpoint_by_key(&next)? {
                out.push((ip_from_key(next), ep));
            }
            key = Some(next);
        }
    }

    pub fn stats(&self, ifindex: u32) -> Result<Option<EndpointStats>, MapError> {
        let cpus = possible_cpus()?;
        let mut buf = vec![0u8; size_of::<RawStats>() * cpus];
        let found = sys::map_lookup(
            self.stats.as_fd(),
            ifindex_key(ifindex).as_bytes(),
            &mut buf,
        )
        .map_err(on(crate::pin::STATS_MAP))?;
        if !found {
            return Ok(None);
        }
        let mut sum = EndpointStats::default();
        for cpu in buf.chunks_exact(size_of::<RawStats>()) {
            sum.add(&RawStats::from_bytes(cpu));
        }
        Ok(Some(sum))
    }
}

/// How many flows `ferrite_stkflow` (`stackflow`) holds (walks the map).
pub(crate) fn stack_flows(stackflow: BorrowedFd<'_>) -> Result<usize, MapError> {
    let mut n = 0;
    let mut key: Option<RawFlowKey> = None;
    loop {
        let mut buf = [0u8; size_of::<RawFlowKey>()];
        let more = sys::map_next_key(stackflow, key.as_ref().map(Pod::as_bytes), &mut buf)
            .map_err(on(crate::pin::STACKFLOW_MAP))?;
        if !more {
            return Ok(n);
        }
        n += 1;
        key = Some(RawFlowKey::from_bytes(&buf));
    }
}

/// `struct podnet_key`: prefix length (of the v4-mapped form), address.
fn podnet_key(ip: IpAddr, prefix: u8) -> [u8; 20] {
    let (addr, len) = match ip {
        IpAddr::V4(v4) => (v4.to_ipv6_mapped(), u32::from(prefix.min(32)) + 96),
        IpAddr::V6(v6) => (v6, u32::from(prefix.min(128))),
    };
    let mut key = [0u8; 20];
    key[..4].copy_from_slice(&len.to_ne_bytes());
    key[4..].copy_from_slice(&addr.octets());
    key
}

fn podnet_of_key(key: &[u8; 20]) -> (IpAddr, u8) {
    let len = u32::from_ne_bytes(key[..4].try_into().expect("4 bytes"));
    let octets: [u8; 16] = key[4..].try_into().expect("16 bytes");
    let v6 = std::net::Ipv6Addr::from(octets);
    match v6.to_ipv4_mapped() {
        Some(v4) if len >= 96 => (IpAddr::V4(v4), (len - 96) as u8),
        _ => (IpAddr::V6(v6), len as u8),
    }
}

fn lpm_keys(map: BorrowedFd<'_>, name: &'static str) -> Result<Vec<[u8; 20]>, MapError> {
    let mut out: Vec<[u8; 20]> = Vec::new();
    loop {
        let mut next = [0u8; 20];
        let more =
            sys::map_next_key(map, out.last().map(|k| &k[..]), &mut next).map_err(on(name))?;
        if !more {
            return Ok(out);
        }
        out.push(next);
    }
}

/// The CIDRs in an LPM set laid out like `ferrite_podnets`.
pub(crate) fn lpm_set(
    map: BorrowedFd<'_>,
    name: &'static str,
) -> Result<Vec<(IpAddr, u8)>, MapError> {
    Ok(lpm_keys(map, name)?.iter().map(podnet_of_key).collect())
}

/// Makes an LPM set laid out like `ferrite_podnets` hold exactly `cidrs`:
/// adds the missing ones first, then removes the rest, so a CIDR kept is
/// never absent.
pub(crate) fn set_lpm_set(
    map: BorrowedFd<'_>,
    name: &'static str,
    cidrs: &[(IpAddr, u8)],
) -> Result<(), MapError> {
    let want: Vec<[u8; 20]> = cidrs.iter().map(|(ip, p)| podnet_key(*ip, *p)).collect();
    for key in &want {
        sys::map_update(map, key, &1u32.to_ne_bytes(), BPF_ANY).map_err(on(name))?;
    }
    for key in lpm_keys(map, name)? {
        if !want.contains(&key) {
            sys::map_delete(map, &key).map_err(on(name))?;
        }
    }
    Ok(())
}

/// Key of `ferrite_stats` and `ferrite_ifaces`: the host veth's ifindex.
fn ifindex_key(ifindex: u32) -> u32 {
    ifindex
}

#[cfg(test)]
mod tests {
    use super::parse_cpu_list;

    #[test]
    fn podnet_keys_round_trip() {
        use super::{podnet_key, podnet_of_key};
        for (ip, len) in [("10.244.0.0", 16u8), ("fd00:10:244::", 56), ("0.0.0.0", 0)] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            assert_eq!(podnet_of_key(&podnet_key(ip, len)), (ip, len));
        }
        let k = podnet_key("10.244.0.0".parse().unwrap(), 16);
        assert_eq!(u32::from_ne_bytes(k[..4].try_into().unwrap()), 112);
        assert_eq!(
            &k[4..],
            &"::ffff:10.244.0.0"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0\n"), Some(1));
        assert_eq!(parse_cpu_list("0-1\n"), Some(2));
        assert_eq!(parse_cpu_list("0-3,5,7-8"), Some(7));
        assert_eq!(parse_cpu_list(""), None);
        assert_eq!(parse_cpu_list("3-1"), None);
    }
}
