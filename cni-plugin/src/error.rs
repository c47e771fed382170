//! The CNI error: a code from the spec (or ferrite's own, 100 and up), a
//! message for the operator, and details for whoever digs further.

use std::fmt;

use serde::Serialize;

/// Error codes from the CNI specification, and ferrite's own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
#[allow(dead_code)] // the spec's full list; not every code has a use yet
pub enum Code {
    IncompatibleVersion = 1,
    UnsupportedField = 2,
    UnknownContainer = 3,
    InvalidEnvironment = 4,
    Io = 5,
    Decode = 6,
    InvalidConfig = 7,
    TryAgainLater = 11,
    NotAvailable = 50,
    NotAvailableDamaged = 51,
    /// A kernel request (netlink, bpf) failed.
    Kernel = 100,
    /// No free address in a range set.
    RangeExhausted = 101,
    /// A statically requested address is taken or outside every range.
    AddressUnavailable = 102,
    /// The eBPF datapath cannot be loaded, opened or attached.
    Datapath = 103,
    /// CNI_IFNAME already exists in the container.
    InterfaceExists = 104,
    /// CHECK found the container's network different from what ADD made.
    Drift = 105,
    /// A delegated IPAM plugin failed.
    Delegate = 106,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CniError {
    #[serde(skip)]
    pub code: Code,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: Code, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl fmt::Display) -> Self {
        self.details = details.to_string();
        self
    }

    /// Builds an error from anything with a source chain, putting the chain in details.
    pub fn from_error(code: Code, msg: impl Into<String>, err: &dyn std::error::Error) -> Self {
        let mut details = err.to_string();
        let mut source = err.source();
        while let Some(s) = source {
            details.push_str(": ");
            details.push_str(&s.to_string());
            source = s.source();
        }
        Self::new(code, msg).with_details(details)
    }

    /// The error JSON of the spec, for the given cniVersion.
    pub fn to_json(&self, cni_version: &str) -> serde_json::Value {
        let mut v = serde_json::json!({
            "cniVersion": cni_version,
            "code": self.code as u32,
            "msg": self.msg,
        });
        if !self.details.is_empty() {
            v["details"] = serde_json::Value::String(self.details.clone());
        }
        v
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (code {})", self.msg, self.code as u32)?;
        if !self.details.is_empty() {
            write!(f, ": {}", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}

pub type CniResult<T> = Result<T, CniError>;
