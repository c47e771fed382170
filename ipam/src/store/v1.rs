// SPDX-License-Identifier: Apache-2.0
//! Format v1, read for the migration to v2.
//!
//! Earlier versions wrote a text file, rewritten whole on every change:
//!
//! ```text
//! ferrite-ipam allocations v1
//! last 0 10.244.1.7
//! 10.244.1.7 9a1b...77 eth0
//! ```
//!
//! [`Store::lock`] converts such a file to v2 (under the exclusive lock);
//! [`Store::read`] reads it as it is.

use std::net::IpAddr;
use std::path::Path;

use super::StoreError;
use crate::state::{Owner, State};

pub(super) const HEADER_V1: &str = "ferrite-ipam allocations v1";

/// Parses format v1 (the line format); `path` names the file in errors,
/// which give the byte offset of the line and its number.
pub(super) fn decode_v1(bytes: &[u8], path: &Path) -> Result<State, StoreError> {
    let corrupt = |offset: usize, line: usize, reason: String| StoreError::Corrupt {
        path: path.to_path_buf(),
        offset: offset as u64,
        reason: format!("line {line}: {reason}"),
    };
    let line_start = |upto: usize| {
        let before = &bytes[..upto];
        let start = before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        (start, 1 + before.iter().filter(|&&b| b == b'\n').count())
    };
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let (start, line) = line_start(e.valid_up_to());
        corrupt(start, line, "not UTF-8 text".into())
    })?;
    if !text.ends_with('\n') {
        let (start, line) = line_start(text.len());
        return Err(corrupt(
            start,
            line,
            "truncated: the last line has no newline".into(),
        ));
    }
    let mut state = State::new();
    let mut offset = 0;
    for (i, line) in text.split_terminator('\n').enumerate() {
        let (n, start) = (i + 1, offset);
        offset += line.len() + 1;
        if n == 1 {
            if line != HEADER_V1 {
                return Err(corrupt(start, n, format!("expected header {HEADER_V1:?}")));
            }
            continue;
        }
        let corrupt = |reason: String| corrupt(start, n, reason);
        let fields: Vec<&str> = line.split(' ').collect();
        let parse_ip = |s: &str| -> Result<IpAddr, StoreError> {
            s.parse()
                .map_err(|_| corrupt(format!("{s:?} is not an IP address")))
        };
        match fields.as_slice() {
            ["last", set, ip] => {
                let set: usize = set
                    .parse()
                    .map_err(|_| corrupt(format!("{set:?} is not a set index")))?;
                let ip = parse_ip(ip)?;
                if state.last.insert(set, ip).is_some() {
                    return Err(corrupt(format!("set {set} has two last lines")));
                }
            }
            [ip, container_id, ifname] => {
                let ip = parse_ip(ip)?;
                let owner = Owner::new(*container_id, *ifname);
                owner.validate().map_err(|e| corrupt(e.to_string()))?;
                if let Some(first) = state.records.insert(ip, owner) {
                    return Err(corrupt(format!(
                        "address {ip} recorded twice (also held by {first})"
                    )));
                }
            }
            _ => {
                return Err(corrupt(format!(
                "expected \"<ip> <container id> <ifname>\" or \"last <set> <ip>\", found {line:?}"
            )))
            }
        }
    }
    Ok(state)
}
