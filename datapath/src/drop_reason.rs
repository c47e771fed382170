//! Why a program dropped a packet: generated from `bpf/lib/drop_reasons.h`.

use std::fmt;

// `DROP_REASON_SLOTS`, the enum, `ALL`, `FIRST_CODE` and `name()`, generated
// by build.rs from the header so the two cannot disagree.
include!(concat!(env!("OUT_DIR"), "/drop_reason.rs"));

impl DropReason {
    /// The numeric code, as the C header defines it.
    pub const fn code(self) -> i32 {
        self as i32
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

    /// `#define DROP_<NAME> <int>` lines of the header, read independently
    /// of the generator in build.rs.
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
    fn generated_enum_has_every_reason_of_the_header_in_order() {
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
    fn generated_enum_slots_and_names() {
        // Slots are the counters' indices in ferrite_stats: ALL lists the
        // reasons slot by slot, codes counting down from FIRST_CODE.
        for (i, r) in DropReason::ALL.into_iter().enumerate() {
            assert_eq!(r.slot(), i, "{r}");
            assert_eq!(r.code(), DropReason::FIRST_CODE - i as i32, "{r}");
            assert_eq!(format!("{r:?}").to_uppercase(), r.name().replace('_', ""));
        }
        assert_eq!(DropReason::FIRST_CODE, -130);
        assert_eq!(DropReason::SpoofedIp.code(), -130);
        assert_eq!(DropReason::UnsupportedL3.name(), "UNSUPPORTED_L3");
        assert_eq!(DropReason::UplinkSpoof.code(), -137);
        assert_eq!(DropReason::UplinkSpoof.slot(), 7);
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
