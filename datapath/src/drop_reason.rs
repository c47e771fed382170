//! Why a program dropped a packet: mirrors `bpf/lib/drop_reasons.h`.

use std::fmt;

/// Counter slots reserved for drops in each stats entry (`DROP_REASON_SLOTS`).
pub const DROP_REASON_SLOTS: usize = 16;

/// A drop reason, with the code the C side uses (`DROP_*` in
/// `bpf/lib/drop_reasons.h`). Codes are below every `TC_ACT_*` verdict.
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The source IP is not an endpoint behind this veth.
    SpoofedIp = -130,
    /// The source MAC is not the pod's.
    SpoofedMac = -131,
    /// An ARP sender (IP or MAC) is not the pod's own.
    ArpSpoof = -132,
    /// Neither ARP, IPv4 nor IPv6.
    UnsupportedL3 = -133,
    /// A header is truncated or invalid.
    Malformed = -134,
    /// Link-local traffic from a veth with no endpoint.
    NoEndpoint = -135,
    /// `bpf_l3_csum_replace` failed after the TTL was decremented.
    CsumErr = -136,
    /// A packet from the uplink claims a pod of this node as its source.
    UplinkSpoof = -137,
}

impl DropReason {
    /// Every reason, in code order.
    pub const ALL: [DropReason; 8] = [
        Self::SpoofedIp,
        Self::SpoofedMac,
        Self::ArpSpoof,
        Self::UnsupportedL3,
        Self::Malformed,
        Self::NoEndpoint,
        Self::CsumErr,
        Self::UplinkSpoof,
    ];

    /// The first code (`DROP_REASON_FIRST`).
    pub const FIRST_CODE: i32 = -130;

    /// The numeric code, as the C header defines it.
    pub const fn code(self) -> i32 {
        self as i32
    }

    /// The name used in the C header, without `DROP_` (e.g. `SPOOFED_IP`).
    pub const fn name(self) -> &'static str {
        match self {
            Self::SpoofedIp => "SPOOFED_IP",
            Self::SpoofedMac => "SPOOFED_MAC",
            Self::ArpSpoof => "ARP_SPOOF",
            Self::UnsupportedL3 => "UNSUPPORTED_L3",
            Self::Malformed => "MALFORMED",
            Self::NoEndpoint => "NO_ENDPOINT",
            Self::CsumErr => "CSUM_ERR",
            Self::UplinkSpoof => "UPLINK_SPOOF",
        }
    }

    /// Index into the stats entry's drop counters (`DROP_SLOT()`).
    pub const fn slot(self) -> usize {
        (Self::FIRST_CODE - self.code()) as usize
    }

    /// The reason with this code, if ferrite knows it.
    pub fn from_code(code: i32) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.code() == code)
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

const _: () = {
    let mut i = 0;
    while i < DropReason::ALL.len() {
        assert!(DropReason::ALL[i].slot() == i);
        assert!(DropReason::ALL[i].slot() < DROP_REASON_SLOTS);
        i += 1;
    }
};

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = include_str!("../bpf/lib/drop_reasons.h");

    /// `#define DROP_<NAME> <int>` lines of the header.
    fn header_defines() -> Vec<(String, i64)> {
        HEADER
            .lines()
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                if words.next()? != "#define" {
                    return None;
                }
                let name = words.next()?.strip_prefix("DROP_")?;
                let value = words.next()?.trim_matches(|c| c == '(' || c == ')');
                Some((name.to_owned(), value.parse().ok()?))
            })
            .collect()
    }

    #[test]
    fn mirrors_c_header() {
        let defines = header_defines();
        let reasons: Vec<(String, i64)> = defines
            .iter()
            .filter(|(name, _)| name != "REASON_SLOTS")
            .cloned()
            .collect();
        let ours: Vec<(String, i64)> = DropReason::ALL
            .iter()
            .map(|r| (r.name().to_owned(), i64::from(r.code())))
            .collect();
        assert_eq!(reasons, ours);
        assert!(defines.contains(&("REASON_SLOTS".to_owned(), DROP_REASON_SLOTS as i64)));
        assert!(HEADER.contains("#define DROP_REASON_FIRST DROP_SPOOFED_IP"));
    }

    #[test]
    fn codes_do_not_overlap_tc_verdicts() {
        // TC_ACT_UNSPEC is -1; TC_ACT_* go up to TC_ACT_TRAP (8) and
        // TC_ACT_VALUE_MAX; ferrite's reasons stay far below.
        for r in DropReason::ALL {
            assert!(r.code() <= -130, "{r}");
            assert_eq!(DropReason::from_code(r.code()), Some(r));
        }
        assert_eq!(DropReason::from_code(-1), None);
        assert_eq!(DropReason::SpoofedIp.to_string(), "SPOOFED_IP");
    }
}
