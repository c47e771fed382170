//! CNI spec versions ferrite speaks.

use crate::error::{CniError, CniResult, Code};

/// Every version ferrite accepts and can shape a result for, oldest first.
pub const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
pub const LATEST: &str = "1.1.0";

/// A parsed semantic version (major, minor, patch).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u32, pub u32, pub u32);

impl Version {
    pub fn parse(s: &str) -> Option<Self> {
        let mut it = s.split('.');
        let major = it.next()?.parse().ok()?;
        let minor = it.next()?.parse().ok()?;
        let patch = it.next().unwrap_or("0").parse().ok()?;
        if it.next().is_some() {
            return None;
        }
        Some(Self(major, minor, patch))
    }

    /// Results before 1.0.0 carry `"version"` in each ip entry.
    pub fn ip_version_field(self) -> bool {
        self < Version(1, 0, 0)
    }

    /// CHECK exists from 0.4.0 on.
    pub fn has_check(self) -> bool {
        self >= Version(0, 4, 0)
    }

    /// STATUS and GC exist from 1.1.0 on.
    pub fn has_status_gc(self) -> bool {
        self >= Version(1, 1, 0)
    }
}

/// Checks that `v` is a version ferrite supports.
pub fn require_supported(v: &str) -> CniResult<Version> {
    if !SUPPORTED.contains(&v) {
        return Err(CniError::new(
            Code::IncompatibleVersion,
            format!("unsupported cniVersion {v:?}"),
        )
        .with_details(format!("ferrite supports {}", SUPPORTED.join(", "))));
    }
    Version::parse(v).ok_or_else(|| CniError::new(Code::IncompatibleVersion, "bad cniVersion"))
}

/// From a `cniVersions` list, the highest version ferrite also supports.
pub fn negotiate(offered: &[String]) -> Option<&'static str> {
    SUPPORTED
        .iter()
        .rev()
        .find(|s| offered.iter().any(|o| o == *s))
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_orders() {
        assert!(Version::parse("0.3.1").unwrap() < Version::parse("0.4.0").unwrap());
        assert!(Version::parse("1.1.0").unwrap().has_status_gc());
        assert!(!Version::parse("1.0.0").unwrap().has_status_gc());
        assert!(Version::parse("0.3.1").unwrap().ip_version_field());
        assert!(!Version::parse("1.0.0").unwrap().ip_version_field());
        assert_eq!(Version::parse("1.x.0"), None);
    }

    #[test]
    fn negotiates_highest_common() {
        let offered = vec!["0.4.0".to_string(), "1.0.0".into(), "9.9.9".into()];
        assert_eq!(negotiate(&offered), Some("1.0.0"));
        assert_eq!(negotiate(&["0.2.0".to_string()]), None);
    }

    #[test]
    fn rejects_unknown() {
        assert_eq!(
            require_supported("0.2.0").unwrap_err().code,
            Code::IncompatibleVersion
        );
        assert!(require_supported("1.1.0").is_ok());
    }
}
