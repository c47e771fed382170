// SPDX-License-Identifier: Apache-2.0
//! The state file's format v2: records encoded, and the whole file parsed
//! and checked (with where each record lies, for the slot writer).
//!
//! The file is an array of 128-byte slots; its length is always a multiple
//! of 128. Slot 0 is the header: the text `ferrite-ipam allocations v2\n`,
//! then zeros. Every other slot is free (128 zero bytes) or part of a
//! record. A record fills `units` consecutive slots (1 for any owner a real
//! runtime sends: 64 hex digits and `eth0` take 104 bytes) and never
//! crosses a 4 KiB boundary of the file:
//!
//! ```text
//! 0      magic 0xf7
//! 1      kind: 1 = address record, 2 = last-reserved record
//! 2      units: slots the record fills, 1..=32
//! 3      family: 4 or 6
//! 4..8   checksum (little endian) of the whole record, these 4 bytes read as 0
//! 8..16  set index (last-reserved records; 0 in address records), u64 LE
//! 16..32 address: 4 bytes and 12 zeros for IPv4, 16 bytes for IPv6
//! 32..34 container id length, u16 LE (0 in last-reserved records)
//! 34..36 ifname length, u16 LE (0 in last-reserved records)
//! 36..   container id, ifname, zeros to the end of the record
//! ```
//!
//! An address record says "this address is held by this attachment"; a
//! last-reserved record says where the round robin of one set resumes. The
//! order of records carries no meaning.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::sync::Arc;

use super::disk::Disk;
use super::v1::{decode_v1, HEADER_V1};
use super::StoreError;
use crate::records::{self, Entry, Loc, Records, FIXED, UNIT};
use crate::state::{validate_fields, Owner, State, MAX_CONTAINER_ID, MAX_IFNAME};

/// Records never cross a boundary of this many bytes.
pub(super) const PAGE: usize = 4096;
pub(super) const UNITS_PER_PAGE: usize = PAGE / UNIT;
pub(super) const HEADER: &[u8] = b"ferrite-ipam allocations v2\n";
pub(super) const HEADER_PREFIX: &[u8] = b"ferrite-ipam allocations ";
pub(super) const MAGIC: u8 = 0xf7;
pub(super) const KIND_ADDRESS: u8 = 1;
pub(super) const KIND_LAST: u8 = 2;
pub(super) const ZERO_UNIT: [u8; UNIT] = [0; UNIT];

/// Checksum of a record, with bytes 4..8 (where it is stored) read as 0:
/// four lanes of multiply-rotate over little-endian words, then a final
/// mix. Not cryptographic; it catches damaged records.
pub(super) fn checksum(record: &[u8]) -> u32 {
    const P: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut h: [u64; 4] = [
        0x243f_6a88_85a3_08d3,
        0x1319_8a2e_0370_7344,
        0xa409_3822_299f_31d0,
        0x082e_fa98_ec4e_6c89,
    ];
    for (n, chunk) in record.chunks_exact(32).enumerate() {
        for (lane, h) in h.iter_mut().enumerate() {
            let mut word = u64::from_le_bytes(chunk[lane * 8..lane * 8 + 8].try_into().unwrap());
            if n == 0 && lane == 0 {
                // Bytes 4..8, the stored checksum, are the high half.
                word &= 0x0000_0000_ffff_ffff;
            }
            *h = (*h ^ word).wrapping_mul(P).rotate_left(31);
        }
    }
    let mut x = h[0] ^ h[1].rotate_left(16) ^ h[2].rotate_left(32) ^ h[3].rotate_left(48);
    x ^= record.len() as u64;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x as u32
}

pub(super) fn record(kind: u8, ip: IpAddr, set: u64, id: &[u8], ifname: &[u8]) -> Vec<u8> {
    let len = (FIXED + id.len() + ifname.len()).next_multiple_of(UNIT);
    let mut rec = vec![0u8; len];
    rec[0] = MAGIC;
    rec[1] = kind;
    rec[2] = (len / UNIT) as u8;
    rec[8..16].copy_from_slice(&set.to_le_bytes());
    match ip {
        IpAddr::V4(v4) => {
            rec[3] = 4;
            rec[16..20].copy_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            rec[3] = 6;
            rec[16..32].copy_from_slice(&v6.octets());
        }
    }
    rec[32..34].copy_from_slice(&(id.len() as u16).to_le_bytes());
    rec[34..36].copy_from_slice(&(ifname.len() as u16).to_le_bytes());
    rec[FIXED..FIXED + id.len()].copy_from_slice(id);
    rec[FIXED + id.len()..FIXED + id.len() + ifname.len()].copy_from_slice(ifname);
    let sum = checksum(&rec);
    rec[4..8].copy_from_slice(&sum.to_le_bytes());
    rec
}

/// The record of one reservation. The owner's lengths are bounded by
/// [`Owner::validate`] (which `State::allocate` applies), so the record
/// fits in a page.
pub(super) fn address_record(ip: IpAddr, (id, ifname): (&[u8], &[u8])) -> Vec<u8> {
    record(KIND_ADDRESS, ip, 0, id, ifname)
}

pub(super) fn last_record(set: usize, ip: IpAddr) -> Vec<u8> {
    record(KIND_LAST, ip, set as u64, &[], &[])
}

pub(super) fn record_address(rec: &[u8]) -> IpAddr {
    if rec[3] == 4 {
        IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(&rec[16..20]).unwrap()))
    } else {
        IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&rec[16..32]).unwrap()))
    }
}

/// The state in format v2, records packed from slot 1 in address order,
/// round-robin positions last.
pub fn encode(state: &State) -> Vec<u8> {
    let mut disk = Disk::missing();
    disk.used.push(true);
    disk.rewritten.push(false);
    let mut bytes = HEADER.to_vec();
    bytes.resize(UNIT, 0);
    let records = (0..state.records.len())
        .map(|i| {
            let ip = state.records.entries()[i].ip;
            address_record(ip, state.records.owner_bytes_at(i))
        })
        .chain(state.last.iter().map(|(&set, &ip)| last_record(set, ip)));
    for rec in records {
        let slot = disk.free_slots(rec.len() / UNIT);
        disk.used[slot..slot + rec.len() / UNIT].fill(true);
        let end = slot * UNIT + rec.len();
        if bytes.len() < end {
            bytes.resize(end, 0);
        }
        bytes[slot * UNIT..end].copy_from_slice(&rec);
    }
    bytes
}

/// Parses a state file, format v2 or v1; `path` names the file in errors.
pub fn decode(bytes: &[u8], path: &Path) -> Result<State, StoreError> {
    if bytes.starts_with(HEADER_V1.as_bytes()) {
        return decode_v1(bytes, path);
    }
    parse(bytes.to_vec(), path).map(|(state, _)| state)
}

pub(super) fn decode_vec(bytes: Vec<u8>, path: &Path) -> Result<State, StoreError> {
    if bytes.starts_with(HEADER_V1.as_bytes()) {
        return decode_v1(&bytes, path);
    }
    parse(bytes, path).map(|(state, _)| state)
}

/// Parses format v2, keeping where each record lies.
pub(super) fn parse(bytes: Vec<u8>, path: &Path) -> Result<(State, Disk), StoreError> {
    let corrupt = |slot: usize, reason: String| StoreError::Corrupt {
        path: path.to_path_buf(),
        offset: (slot * UNIT) as u64,
        reason,
    };
    if bytes.is_empty() {
        return Err(corrupt(0, "truncated: the file is empty".into()));
    }
    if !bytes.starts_with(HEADER) {
        let line = bytes.split(|&b| b == b'\n').next().unwrap_or_default();
        let line = String::from_utf8_lossy(&line[..line.len().min(64)]);
        let header = String::from_utf8_lossy(HEADER);
        let header = header.trim_end();
        if bytes.starts_with(HEADER_PREFIX) {
            return Err(corrupt(
                0,
                format!("unsupported format {line:?}, expected {header:?}"),
            ));
        }
        return Err(corrupt(
            0,
            format!("expected header {header:?}, found {line:?}"),
        ));
    }
    if !bytes.len().is_multiple_of(UNIT) {
        return Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            offset: (bytes.len() - bytes.len() % UNIT) as u64,
            reason: format!(
                "truncated: the length {} is not a multiple of {UNIT}",
                bytes.len()
            ),
        });
    }
    if bytes[HEADER.len()..UNIT].iter().any(|&b| b != 0) {
        return Err(corrupt(0, "header slot has bytes after the header".into()));
    }
    let slots = bytes.len() / UNIT;
    let mut used = vec![false; slots];
    used[0] = true;
    // (address, slot) per family, sorted below: IPv4 sorts before IPv6.
    let mut v4: Vec<(u32, u32)> = Vec::with_capacity(slots);
    let mut v6: Vec<(u128, u32)> = Vec::new();
    let mut last: BTreeMap<usize, (IpAddr, usize)> = BTreeMap::new();
    let mut slot = 1;
    while slot < slots {
        let unit = &bytes[slot * UNIT..(slot + 1) * UNIT];
        if unit[0] == 0 {
            if *unit != ZERO_UNIT {
                return Err(corrupt(slot, "free slot is not all zeros".into()));
            }
            slot += 1;
            continue;
        }
        if unit[0] != MAGIC {
            return Err(corrupt(
                slot,
                format!(
                    "bad magic byte {:#04x}, expected {MAGIC:#04x} or a free slot",
                    unit[0]
                ),
            ));
        }
        let units = usize::from(unit[2]);
        if units == 0 || slot % UNITS_PER_PAGE + units > UNITS_PER_PAGE {
            return Err(corrupt(
                slot,
                format!("a record of {units} slots cannot start here"),
            ));
        }
        if slot + units > slots {
            return Err(corrupt(slot, "truncated record".into()));
        }
        let rec = &bytes[slot * UNIT..(slot + units) * UNIT];
        let sum = u32::from_le_bytes(rec[4..8].try_into().unwrap());
        if sum != checksum(rec) {
            return Err(corrupt(slot, "checksum mismatch".into()));
        }
        let ip = match rec[3] {
            4 if rec[20..32].iter().all(|&b| b == 0) => record_address(rec),
            6 => record_address(rec),
            f => {
                return Err(corrupt(
                    slot,
                    format!("bad address family {f} or IPv4 address with trailing bytes"),
                ))
            }
        };
        let set = u64::from_le_bytes(rec[8..16].try_into().unwrap());
        let id_len = usize::from(u16::from_le_bytes([rec[32], rec[33]]));
        let if_len = usize::from(u16::from_le_bytes([rec[34], rec[35]]));
        if FIXED + id_len + if_len > rec.len() {
            return Err(corrupt(slot, "owner longer than the record".into()));
        }
        match rec[1] {
            KIND_ADDRESS => {
                if set != 0 {
                    return Err(corrupt(slot, "address record with a set index".into()));
                }
                let id = &rec[FIXED..FIXED + id_len];
                let ifname = &rec[FIXED + id_len..FIXED + id_len + if_len];
                check_owner_bytes(id, ifname).map_err(|e| corrupt(slot, e))?;
                match ip {
                    IpAddr::V4(a) => v4.push((u32::from(a), slot as u32)),
                    IpAddr::V6(a) => v6.push((u128::from(a), slot as u32)),
                }
            }
            KIND_LAST => {
                if id_len != 0 || if_len != 0 {
                    return Err(corrupt(slot, "last-reserved record with an owner".into()));
                }
                let set = usize::try_from(set)
                    .map_err(|_| corrupt(slot, format!("set index {set} out of range")))?;
                if let Some((_, first)) = last.insert(set, (ip, slot)) {
                    return Err(corrupt(
                        slot,
                        format!(
                            "set {set} has two last-reserved records (also at byte {})",
                            first * UNIT
                        ),
                    ));
                }
            }
            kind => return Err(corrupt(slot, format!("unknown record kind {kind}"))),
        }
        used[slot..slot + units].fill(true);
        slot += units;
    }

    // Files grown by ADDs hold each family mostly in address order already.
    if !v4.is_sorted() {
        v4.sort_unstable();
    }
    if !v6.is_sorted() {
        v6.sort_unstable();
    }
    let v4_twice = v4
        .windows(2)
        .find(|w| w[0].0 == w[1].0)
        .map(|w| (IpAddr::V4(Ipv4Addr::from(w[0].0)), w[0].1, w[1].1));
    let v6_twice = || {
        v6.windows(2)
            .find(|w| w[0].0 == w[1].0)
            .map(|w| (IpAddr::V6(Ipv6Addr::from(w[0].0)), w[0].1, w[1].1))
    };
    if let Some((ip, first, second)) = v4_twice.or_else(v6_twice) {
        let (id, ifname) = records::owner_bytes(&bytes, first as usize);
        let holder = Owner::new(
            String::from_utf8_lossy(id).into_owned(),
            String::from_utf8_lossy(ifname).into_owned(),
        );
        return Err(corrupt(
            second as usize,
            format!(
                "address {ip} recorded twice (also at byte {}, held by {holder})",
                first as usize * UNIT
            ),
        ));
    }
    let base = Arc::new(bytes);
    let addresses: Vec<(IpAddr, usize)> = v4
        .iter()
        .map(|&(a, slot)| (IpAddr::V4(Ipv4Addr::from(a)), slot as usize))
        .chain(
            v6.iter()
                .map(|&(a, slot)| (IpAddr::V6(Ipv6Addr::from(a)), slot as usize)),
        )
        .collect();
    drop((v4, v6));
    let entries = addresses
        .iter()
        .map(|&(ip, slot)| Entry {
            ip,
            loc: Loc::Slot(slot as u32),
        })
        .collect();
    let state = State {
        records: Records::loaded(base.clone(), entries),
        last: last.iter().map(|(&set, &(ip, _))| (set, ip)).collect(),
    };
    let rewritten = vec![false; used.len()];
    let disk = Disk {
        file: None,
        base,
        written: BTreeMap::new(),
        used,
        rewritten,
        addresses,
        last,
        #[cfg(test)]
        write_budget: None,
    };
    Ok((state, disk))
}

/// Checks the owner bytes of a record as [`Owner::validate`] does (and
/// that they are UTF-8), building nothing; the common all-ASCII case without
/// decoding characters.
fn check_owner_bytes(id: &[u8], ifname: &[u8]) -> Result<(), String> {
    // Printable ASCII, no space: branch-free so that it vectorizes.
    let plain = |b: &[u8]| {
        !b.is_empty()
            && b.iter()
                .fold(true, |ok, &c| ok & (c.wrapping_sub(0x21) < 0x5e))
    };
    if plain(id) && plain(ifname) && id.len() <= MAX_CONTAINER_ID && ifname.len() <= MAX_IFNAME {
        return Ok(());
    }
    let text = |b, field: &str| std::str::from_utf8(b).map_err(|_| format!("{field} is not UTF-8"));
    validate_fields(text(id, "container id")?, text(ifname, "ifname")?).map_err(|e| e.to_string())
}
