//! The `bandwidth` capability: runtimeConfig.bandwidth limits, in bits per
//! second (Kubernetes fills them from the kubernetes.io/ingress-bandwidth
//! and egress-bandwidth annotations), enforced with token bucket filters.
//!
//! - egressRate (what the pod sends): TBF at the root of the pod's eth0,
//!   inside the pod namespace. It shapes everything the pod sends, the eBPF
//!   fast path included, since the redirect happens after it.
//! - ingressRate (what the pod receives): TBF at the root of the host veth.
//!   The host stack delivers through it; `from_pod` sends fast-path packets
//!   for a pod flagged `ENDPOINT_F_SHAPED` to the egress of its host veth
//!   (bpf_redirect) instead of straight into it (bpf_redirect_peer, which
//!   would skip the qdisc).
//!
//! With `chainedBandwidth: true` the reference `bandwidth` plugin, chained
//! after ferrite, shapes instead: its egress side adds an `ingress` qdisc,
//! which cannot coexist with ferrite's clsact ("file exists"), so ferrite
//! attaches with TCX, installs no qdisc (the plugin's root TBF would collide
//! with ferrite's) and, for limits it is told about too, keeps the fast path
//! from skipping the plugin's qdiscs ([`Limits::endpoint_flags`]).

use crate::config::Bandwidth;
use crate::error::{CniError, CniResult, Code};
use crate::netlink::Netlink;
use crate::veth;

/// containerd's CRI (like kubelet's old CNI code) sends this burst, in bits,
/// meaning "not set": a 512 MiB bucket would let the first half gigabyte of
/// every pod's traffic through unshaped.
const BURST_UNSET: u64 = u32::MAX as u64;

/// Packets queued behind the bucket, as the reference plugin sizes it.
const LATENCY_MS: u64 = 25;

/// Handle of ferrite's root qdiscs (`1:`, as `tc` and the reference plugin).
const TBF_HANDLE: u16 = 1;

// linux/pkt_sched.h
const TCA_TBF_PARMS: u16 = 1;
const TCA_TBF_RATE64: u16 = 4;
const TCA_TBF_BURST: u16 = 6;
const TC_LINKLAYER_ETHERNET: u8 = 1;
/// PSCHED_TICKS2NS: one psched tick is 64 ns.
const PSCHED_SHIFT: u32 = 6;

/// One direction's token bucket, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tbf {
    pub rate: u64,
    pub burst: u32,
    pub limit: u32,
}

impl Tbf {
    /// The bucket for `rate` and `burst` given in bits (per second), or
    /// None when no limit is asked for.
    pub fn from_bits(rate: Option<u64>, burst: Option<u64>) -> CniResult<Option<Self>> {
        let rate = match rate {
            None | Some(0) => {
                if burst.is_some_and(|b| b > 0 && b < BURST_UNSET) {
                    return Err(CniError::new(
                        Code::InvalidConfig,
                        "bandwidth: a burst needs a rate",
                    ));
                }
                return Ok(None);
            }
            Some(r) => r / 8,
        };
        if rate == 0 {
            return Err(CniError::new(
                Code::InvalidConfig,
                "bandwidth: a rate must be at least 8 bits per second",
            ));
        }
        // Unset: 20 ms worth of traffic, at least one GSO packet (64 KiB)
        // so TBF does not have to segment them.
        let burst = match burst {
            Some(b) if b > 0 && b < BURST_UNSET => b / 8,
            _ => (rate / 50).max(64 * 1024),
        }
        .clamp(2048, u32::MAX as u64 / 2);
        let limit = (rate * LATENCY_MS / 1000 + burst).min(u32::MAX as u64);
        Ok(Some(Self {
            rate,
            burst: burst as u32,
            limit: limit as u32,
        }))
    }

    /// TCA_OPTIONS of a `tbf` qdisc.
    fn options(&self) -> Vec<(u16, Vec<u8>)> {
        // struct tc_tbf_qopt { tc_ratespec rate, peakrate; u32 limit, buffer, mtu; }
        // struct tc_ratespec { u8 cell_log, linklayer; u16 overhead; i16 cell_align;
        //                      u16 mpu; u32 rate; }
        let buffer_ns = (self.burst as u128 * 1_000_000_000 / self.rate as u128) as u64;
        let buffer_ticks = (buffer_ns >> PSCHED_SHIFT).min(u32::MAX as u64) as u32;
        let mut qopt = Vec::with_capacity(36);
        qopt.extend_from_slice(&[0, TC_LINKLAYER_ETHERNET, 0, 0, 0, 0, 0, 0]);
        qopt.extend_from_slice(&(self.rate.min(u32::MAX as u64) as u32).to_ne_bytes());
        qopt.extend_from_slice(&[0u8; 12]);
        qopt.extend_from_slice(&self.limit.to_ne_bytes());
        qopt.extend_from_slice(&buffer_ticks.to_ne_bytes());
        qopt.extend_from_slice(&0u32.to_ne_bytes());
        vec![
            (TCA_TBF_PARMS, qopt),
            (TCA_TBF_RATE64, self.rate.to_ne_bytes().to_vec()),
            (TCA_TBF_BURST, self.burst.to_ne_bytes().to_vec()),
        ]
    }
}

/// Both directions, as seen from the pod.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Traffic to the pod: shaped on the host veth.
    pub ingress: Option<Tbf>,
    /// Traffic from the pod: shaped on its eth0.
    pub egress: Option<Tbf>,
}

impl Limits {
    pub fn from_config(bw: Option<&Bandwidth>) -> CniResult<Self> {
        let Some(bw) = bw else {
            return Ok(Self::default());
        };
        Ok(Self {
            ingress: Tbf::from_bits(bw.ingress_rate, bw.ingress_burst)?,
            egress: Tbf::from_bits(bw.egress_rate, bw.egress_burst)?,
        })
    }

    /// The endpoint flags that keep the fast path from skipping the
    /// shaping: traffic to the pod goes through the host veth's root qdisc
    /// (ferrite's TBF, or a chained plugin's); traffic from the pod, when a
    /// chained plugin shapes it at the host veth's ingress, is passed on to
    /// that plugin's filter instead of redirected. ferrite's own egress TBF
    /// sits on the pod's eth0, before the redirect, and needs no flag.
    pub fn endpoint_flags(&self, chained: bool) -> u32 {
        let mut flags = 0;
        if self.ingress.is_some() {
            flags |= ferrite_datapath::ENDPOINT_F_SHAPED;
        }
        if chained && self.egress.is_some() {
            flags |= ferrite_datapath::ENDPOINT_F_VIA_STACK;
        }
        flags
    }
}

/// Installs the limits on a fresh veth pair. Nothing to undo on failure:
/// the qdiscs go with the veth, which the caller deletes.
pub fn apply(
    limits: &Limits,
    host_nl: &mut Netlink,
    host_index: u32,
    pod_nl: &mut Netlink,
    pod_ifname: &str,
) -> CniResult<()> {
    if let Some(tbf) = &limits.ingress {
        host_nl
            .qdisc_add_root(host_index, TBF_HANDLE, "tbf", tbf.options())
            .map_err(|e| veth::kernel_error("cannot shape traffic to the pod", &e))?;
    }
    if let Some(tbf) = &limits.egress {
        let pod_index = pod_nl
            .link_get(pod_ifname)
            .map_err(|e| veth::kernel_error("cannot look up the pod interface", &e))?
            .ok_or_else(|| CniError::new(Code::Kernel, format!("{pod_ifname} vanished")))?
            .index;
        pod_nl
            .qdisc_add_root(pod_index, TBF_HANDLE, "tbf", tbf.options())
            .map_err(|e| veth::kernel_error("cannot shape traffic from the pod", &e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_become_bytes() {
        let t = Tbf::from_bits(Some(80_000_000), Some(800_000))
            .unwrap()
            .unwrap();
        assert_eq!(t.rate, 10_000_000);
        assert_eq!(t.burst, 100_000);
        assert_eq!(t.limit, 10_000_000 * 25 / 1000 + 100_000);
    }

    #[test]
    fn containerds_unset_burst_gets_a_sane_bucket() {
        let t = Tbf::from_bits(Some(100_000_000), Some(u32::MAX as u64))
            .unwrap()
            .unwrap();
        assert_eq!(t.burst, 250_000);
        let t = Tbf::from_bits(Some(8_000_000), None).unwrap().unwrap();
        assert_eq!(t.burst, 64 * 1024);
    }

    #[test]
    fn no_rate_no_limit() {
        assert_eq!(Tbf::from_bits(None, None).unwrap(), None);
        assert_eq!(
            Tbf::from_bits(Some(0), Some(u32::MAX as u64)).unwrap(),
            None
        );
        assert!(Tbf::from_bits(None, Some(1000)).is_err());
        let l = Limits::from_config(Some(&Bandwidth {
            egress_rate: Some(1_000_000),
            ..Default::default()
        }))
        .unwrap();
        assert!(l.ingress.is_none());
        assert!(l.egress.is_some());
    }

    #[test]
    fn flags_route_shaped_traffic_through_the_qdiscs() {
        use ferrite_datapath::{ENDPOINT_F_SHAPED, ENDPOINT_F_VIA_STACK};
        let both = Limits::from_config(Some(&Bandwidth {
            ingress_rate: Some(1_000_000),
            egress_rate: Some(1_000_000),
            ..Default::default()
        }))
        .unwrap();
        assert_eq!(both.endpoint_flags(false), ENDPOINT_F_SHAPED);
        assert_eq!(
            both.endpoint_flags(true),
            ENDPOINT_F_SHAPED | ENDPOINT_F_VIA_STACK
        );
        assert_eq!(Limits::default().endpoint_flags(true), 0);
    }

    #[test]
    fn tbf_parms_layout() {
        let t = Tbf::from_bits(Some(8_000_000_000), Some(8_000_000))
            .unwrap()
            .unwrap();
        let opts = t.options();
        assert_eq!(opts[0].0, TCA_TBF_PARMS);
        assert_eq!(opts[0].1.len(), 36);
        assert_eq!(opts[0].1[1], TC_LINKLAYER_ETHERNET);
        // 1 GB/s fits u32; the buffer is 1 ms = 1e6 ns = 15625 ticks.
        assert_eq!(&opts[0].1[8..12], &1_000_000_000u32.to_ne_bytes());
        assert_eq!(&opts[0].1[28..32], &15_625u32.to_ne_bytes());
        assert_eq!(opts[1].1, 1_000_000_000u64.to_ne_bytes().to_vec());
        assert_eq!(opts[2].1, 1_000_000u32.to_ne_bytes().to_vec());
    }
}
