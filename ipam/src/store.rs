// SPDX-License-Identifier: Apache-2.0
//! The on-disk store: one directory per network, one state file of
//! fixed-size slots, one lock.
//!
//! Layout of `<state_dir>/ipam/<network>/` (mode 0700):
//! - `lock`: an empty file that carries the flock. It is separate from the
//!   state file because that one is created (and migrated from format v1)
//!   by rename, and a lock on a replaced inode would protect nothing.
//! - `allocations`: the state (mode 0600), format v2 below.
//! - `allocations.tmp`: the first version of the state file while it is
//!   written (only when the file is created or migrated).
//!
//! # Format v2
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
//!
//! # Writing
//!
//! [`Locked::commit`] compares the state with the records loaded under the
//! lock and writes only what changed, one record per `pwrite`: a released
//! address zeroes its record, a new one goes into the first free slots (the
//! file grows only when none is free), a moved round-robin position
//! overwrites its record in place. An ADD or DEL therefore writes a few
//! hundred bytes whatever the number of pods, and never renames.
//!
//! # Crash safety
//!
//! The guarantee is against processes killed at any instant (SIGKILL, OOM
//! kill, a runtime timing out the plugin), which is what happens to CNI
//! plugins; there is deliberately no fsync. A power loss that loses recent
//! writes also takes down every pod network namespace that used the
//! addresses; the runtime re-runs ADD for new sandboxes and GC reconciles
//! whatever the file still holds. Skipping fsync keeps an ADD from waiting on
//! the disk.
//!
//! - A record is written by a single `pwrite` of at most 4 KiB that stays
//!   inside one page of the file, from a buffer in memory. Linux copies a
//!   write into the page cache page by page and only checks for a fatal
//!   signal between pages, so a killed writer leaves each record wholly old
//!   or wholly new: never a torn record. The checksum catches everything
//!   else (a file damaged or edited by hand).
//! - Every record names its address, and an address is only added to the
//!   file when the loaded state (read under the same lock) does not hold it;
//!   a change of owner rewrites the record in place. So no sequence of
//!   writes, cut anywhere, gives an address two owners; a file that does
//!   anyway is reported as corrupt.
//! - One commit may write several records (a dual-stack ADD writes two
//!   addresses and two round-robin positions; releases are written before
//!   reservations). Cut in between, the file holds part of the change: an
//!   attachment with the address of one family but not the other, or a
//!   release done for one family only. That is at most a reservation
//!   without a pod, which the runtime's retried ADD completes (allocation
//!   is idempotent per owner), or its DEL or GC releases.
//! - The file is created, and a v1 file converted, by writing
//!   `allocations.tmp` and renaming it into place, so no process ever sees
//!   a file without its header.
//!
//! A file that does not follow the format exactly is reported as corrupt,
//! with the byte offset of the bad slot; it is never reset silently.
//!
//! # Format v1
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

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;

use crate::records::{self, key, Entry, Loc, Records, FIXED, UNIT};
use crate::state::{validate_fields, Owner, State, MAX_CONTAINER_ID, MAX_IFNAME};
/// Records never cross a boundary of this many bytes.
const PAGE: usize = 4096;
const UNITS_PER_PAGE: usize = PAGE / UNIT;
const HEADER: &[u8] = b"ferrite-ipam allocations v2\n";
const HEADER_V1: &str = "ferrite-ipam allocations v1";
const HEADER_PREFIX: &[u8] = b"ferrite-ipam allocations ";
const MAGIC: u8 = 0xf7;
const KIND_ADDRESS: u8 = 1;
const KIND_LAST: u8 = 2;
const ZERO_UNIT: [u8; UNIT] = [0; UNIT];

#[derive(Debug, Error)]
pub enum StoreError {
    #[error(
        "invalid network name {name:?}: use 1 to 64 of A-Z a-z 0-9 _ . - , not starting with '.'"
    )]
    InvalidName { name: String },
    #[error("ipam store: cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("ipam state file {path} is corrupt at byte {offset}: {reason} (fix or remove it; addresses it records may be in use)")]
    Corrupt {
        path: PathBuf,
        /// Where the bad slot (format v2) or line (format v1) starts.
        offset: u64,
        reason: String,
    },
}

fn io_error<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The store of one network.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

/// The state loaded under the exclusive lock; the lock is held until this
/// is dropped. Dropping without [`Locked::commit`] discards the changes.
#[derive(Debug)]
pub struct Locked<'a> {
    store: &'a Store,
    _lock: File,
    state: State,
    /// What the file holds, as of the load or the last commit; `None` after
    /// a failed commit, until the next one reads the file again.
    disk: Option<Disk>,
}

/// The state file as loaded: its bytes and where each record lies.
struct Disk {
    /// Open for writing; `None` when there is no state file yet.
    file: Option<File>,
    /// The file as loaded, shared with the [`State`] loaded with it (whose
    /// records point into it). Never changed: what was written since is in
    /// `written`.
    base: Arc<Vec<u8>>,
    /// Records (or zeros) written since the load, by first slot.
    written: BTreeMap<usize, Vec<u8>>,
    /// Slot holds (part of) a record. Slot 0, the header, counts as used.
    used: Vec<bool>,
    /// Slot was written since the load (as long as `used`).
    rewritten: Vec<bool>,
    /// Slot of each address record, by address.
    addresses: Vec<(IpAddr, usize)>,
    /// Address and slot of each set's last-reserved record.
    last: BTreeMap<usize, (IpAddr, usize)>,
    /// Tests: fail every write after this many, as a writer killed there
    /// would stop.
    #[cfg(test)]
    write_budget: Option<usize>,
}

impl fmt::Debug for Disk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Disk")
            .field("exists", &self.file.is_some())
            .field("bytes", &self.used.len().saturating_sub(1))
            .field("addresses", &self.addresses.len())
            .field("last", &self.last)
            .finish()
    }
}

fn valid_network_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

impl Store {
    /// Opens (creating, mode 0700) `<state_dir>/ipam/<network>/`. The name
    /// is checked so it cannot escape that directory.
    pub fn open(state_dir: &Path, network: &str) -> Result<Store, StoreError> {
        if !valid_network_name(network) {
            return Err(StoreError::InvalidName {
                name: network.to_string(),
            });
        }
        let dir = state_dir.join("ipam").join(network);
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_error("create directory", &dir))?;
        Ok(Store { dir })
    }

    /// The network's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The state file.
    pub fn path(&self) -> PathBuf {
        self.dir.join("allocations")
    }

    /// Takes the exclusive lock (waiting for it), then loads the state. Hold
    /// it across search and reserve: that is what keeps two concurrent ADDs
    /// from handing out one address.
    pub fn lock(&self) -> Result<Locked<'_>, StoreError> {
        let lock = self.lock_file(libc::LOCK_EX)?;
        let (state, disk) = self.load_for_writing()?;
        Ok(Locked {
            store: self,
            _lock: lock,
            state,
            disk: Some(disk),
        })
    }

    /// Takes a shared lock, loads the state and unlocks (for CHECK and
    /// STATUS).
    pub fn read(&self) -> Result<State, StoreError> {
        let _lock = self.lock_file(libc::LOCK_SH)?;
        let path = self.path();
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(State::new()),
            Err(e) => return Err(io_error("open", &path)(e)),
        };
        decode_vec(read_all(&file, &path)?, &path)
    }

    fn lock_file(&self, op: libc::c_int) -> Result<File, StoreError> {
        let path = self.dir.join("lock");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io_error("open lock file", &path))?;
        loop {
            // SAFETY: flock only reads the descriptor, which `file` keeps
            // open for the duration of the call.
            if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
                return Ok(file);
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(io_error("lock", &path)(err));
            }
        }
    }

    /// Loads the state file for a writer (under the exclusive lock),
    /// converting a v1 file first.
    fn load_for_writing(&self) -> Result<(State, Disk), StoreError> {
        let path = self.path();
        let file = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok((State::new(), Disk::missing()))
            }
            Err(e) => return Err(io_error("open", &path)(e)),
        };
        let bytes = read_all(&file, &path)?;
        if bytes.starts_with(HEADER_V1.as_bytes()) {
            let state = decode_v1(&bytes, &path)?;
            drop(file);
            self.create(&state)?;
            return self.load_for_writing();
        }
        let (state, mut disk) = parse(bytes, &path)?;
        disk.file = Some(file);
        Ok((state, disk))
    }

    /// Writes the whole state to `allocations.tmp`, then renames it over
    /// `allocations`: for the first write, and for converting a v1 file.
    fn create(&self, state: &State) -> Result<(), StoreError> {
        let tmp = self.dir.join("allocations.tmp");
        // A stale temporary from a killed writer is ours to replace; remove
        // it so the new one is created with mode 0600 whatever it had.
        match fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("remove", &tmp)(e)),
        }
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_error("create", &tmp))?;
        file.write_all(&encode(state))
            .map_err(io_error("write", &tmp))?;
        drop(file);
        let path = self.path();
        fs::rename(&tmp, &path).map_err(io_error("replace", &path))
    }
}

fn read_all(file: &File, path: &Path) -> Result<Vec<u8>, StoreError> {
    let len = file.metadata().map_err(io_error("stat", path))?.len();
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0).saturating_add(1));
    let mut reader = file;
    reader
        .read_to_end(&mut bytes)
        .map_err(io_error("read", path))?;
    Ok(bytes)
}

impl Locked<'_> {
    pub fn state(&mut self) -> &mut State {
        &mut self.state
    }

    /// Writes what changed since the state was loaded (or last committed):
    /// one record per changed address or round-robin position. The lock
    /// stays held.
    pub fn commit(&mut self) -> Result<(), StoreError> {
        let path = self.store.path();
        if self.disk.is_none() {
            // A commit failed half way: start over from what the file holds
            // now.
            let (_, disk) = self.store.load_for_writing()?;
            self.disk = Some(disk);
        }
        let disk = self.disk.as_mut().expect("just loaded");
        if disk.file.is_none() {
            if self.state.records.is_empty() && self.state.last.is_empty() {
                return Ok(());
            }
            self.disk = None;
            self.store.create(&self.state)?;
            let (_, disk) = self.store.load_for_writing()?;
            self.disk = Some(disk);
            return Ok(());
        }
        let result = disk.write_changes(&self.state, &path);
        if result.is_err() {
            self.disk = None;
        }
        result
    }
}

/// One record to write; `slot` is where it replaces a record of the same
/// size, `None` for a new record.
struct Pending {
    slot: Option<usize>,
    bytes: Vec<u8>,
}

impl Disk {
    fn missing() -> Disk {
        Disk {
            file: None,
            base: Arc::default(),
            written: BTreeMap::new(),
            used: Vec::new(),
            rewritten: Vec::new(),
            addresses: Vec::new(),
            last: BTreeMap::new(),
            #[cfg(test)]
            write_budget: None,
        }
    }

    /// The bytes of the record starting at `slot`, as the file holds them
    /// now (running on past the record when it was not written since the
    /// load).
    fn record_at(&self, slot: usize) -> &[u8] {
        match self.written.get(&slot) {
            Some(rec) => rec,
            None => &self.base[slot * UNIT..],
        }
    }

    /// The owner bytes of the address record at `slot`.
    fn owner_bytes(&self, slot: usize) -> (&[u8], &[u8]) {
        records::owner_bytes(self.record_at(slot), 0)
    }

    fn units_at(&self, slot: usize) -> usize {
        usize::from(self.record_at(slot)[2])
    }

    fn write_changes(&mut self, state: &State, path: &Path) -> Result<(), StoreError> {
        let mut clear: Vec<usize> = Vec::new();
        let mut writes: Vec<Pending> = Vec::new();
        // The new address index: slots of new records (`NEW` here) are
        // filled in below, in the order of `writes` that have no slot.
        const NEW: usize = usize::MAX;
        let mut addresses: Vec<(IpAddr, usize)> = Vec::with_capacity(state.records.len());

        // Records of the state that point into the bytes this disk was
        // loaded from, at a slot not written since, are unchanged: no need
        // to compare owners.
        let same_base = state
            .records
            .base()
            .is_some_and(|base| Arc::ptr_eq(base, &self.base));
        let mut old = self.addresses.iter().copied().peekable();
        for (i, entry) in state.records.entries().iter().enumerate() {
            let ip = entry.ip;
            let k = key(ip);
            while let Some((_, slot)) = old.next_if(|&(o, _)| key(o) < k) {
                clear.push(slot);
            }
            match old.next_if(|&(o, _)| o == ip) {
                Some((_, slot)) => {
                    if same_base
                        && matches!(entry.loc, Loc::Slot(s) if s as usize == slot)
                        && !self.rewritten[slot]
                    {
                        addresses.push((ip, slot));
                        continue;
                    }
                    let owner = state.records.owner_bytes_at(i);
                    if self.owner_bytes(slot) == owner {
                        addresses.push((ip, slot));
                        continue;
                    }
                    let bytes = address_record(ip, owner);
                    if bytes.len() == self.units_at(slot) * UNIT {
                        // Same size: the new owner replaces the old one in
                        // one write.
                        addresses.push((ip, slot));
                        writes.push(Pending {
                            slot: Some(slot),
                            bytes,
                        });
                    } else {
                        clear.push(slot);
                        addresses.push((ip, NEW));
                        writes.push(Pending { slot: None, bytes });
                    }
                }
                None => {
                    addresses.push((ip, NEW));
                    writes.push(Pending {
                        slot: None,
                        bytes: address_record(ip, state.records.owner_bytes_at(i)),
                    });
                }
            }
        }
        clear.extend(old.map(|(_, slot)| slot));
        let address_writes = writes.len();

        let mut last = BTreeMap::new();
        for (&set, &ip) in &state.last {
            match self.last.get(&set) {
                Some(&(held, slot)) if held == ip => {
                    last.insert(set, (ip, slot));
                }
                Some(&(_, slot)) => {
                    last.insert(set, (ip, slot));
                    writes.push(Pending {
                        slot: Some(slot),
                        bytes: last_record(set, ip),
                    });
                }
                None => writes.push(Pending {
                    slot: None,
                    bytes: last_record(set, ip),
                }),
            }
        }
        for (set, &(_, slot)) in &self.last {
            if !state.last.contains_key(set) {
                clear.push(slot);
            }
        }

        // Releases first, then reservations: a cut in between leaves an
        // address neither here nor there, never held twice.
        for slot in clear {
            let units = self.units_at(slot);
            self.write_at(slot, &ZERO_UNIT.repeat(units), path)?;
            self.used[slot..slot + units].fill(false);
        }
        let mut new_slots = Vec::new();
        for (n, write) in writes.into_iter().enumerate() {
            let units = write.bytes.len() / UNIT;
            let slot = match write.slot {
                Some(slot) => slot,
                None => {
                    let slot = self.free_slots(units);
                    if n < address_writes {
                        new_slots.push(slot);
                    } else {
                        let set = u64::from_le_bytes(write.bytes[8..16].try_into().unwrap());
                        last.insert(set as usize, (record_address(&write.bytes), slot));
                    }
                    slot
                }
            };
            self.write_at(slot, &write.bytes, path)?;
            self.used[slot..slot + units].fill(true);
        }
        let mut new_slots = new_slots.into_iter();
        for (_, slot) in addresses.iter_mut().filter(|(_, slot)| *slot == NEW) {
            *slot = new_slots.next().expect("one slot per new record");
        }
        self.addresses = addresses;
        self.last = last;
        Ok(())
    }

    /// First fit for a record of `units` slots that does not cross a page;
    /// past the end of the file when nothing is free.
    fn free_slots(&mut self, units: usize) -> usize {
        let mut slot = self
            .used
            .iter()
            .position(|&u| !u)
            .unwrap_or(self.used.len());
        while slot + units <= self.used.len() {
            let page_end = (slot / UNITS_PER_PAGE + 1) * UNITS_PER_PAGE;
            if slot + units > page_end {
                slot = page_end;
                continue;
            }
            match self.used[slot..slot + units].iter().rposition(|&u| u) {
                None => return slot,
                Some(busy) => slot += busy + 1,
            }
        }
        let mut slot = self.used.len();
        if slot % UNITS_PER_PAGE + units > UNITS_PER_PAGE {
            slot = slot.next_multiple_of(UNITS_PER_PAGE);
        }
        self.used.resize(slot + units, false);
        self.rewritten.resize(slot + units, false);
        slot
    }

    /// One `pwrite` of a whole record (or of the zeros that free it).
    fn write_at(&mut self, slot: usize, bytes: &[u8], path: &Path) -> Result<(), StoreError> {
        debug_assert!(
            bytes.len() <= PAGE && (slot * UNIT) / PAGE == (slot * UNIT + bytes.len() - 1) / PAGE
        );
        #[cfg(test)]
        if let Some(budget) = &mut self.write_budget {
            if *budget == 0 {
                return Err(io_error("write", path)(io::Error::other(
                    "test: write budget",
                )));
            }
            *budget -= 1;
        }
        let file = self.file.as_ref().expect("writes go to an existing file");
        let offset = slot * UNIT;
        file.write_all_at(bytes, offset as u64)
            .map_err(io_error("write", path))?;
        self.rewritten[slot..slot + bytes.len() / UNIT].fill(true);
        self.written.insert(slot, bytes.to_vec());
        Ok(())
    }
}

/// Checksum of a record, with bytes 4..8 (where it is stored) read as 0:
/// four lanes of multiply-rotate over little-endian words, then a final
/// mix. Not cryptographic; it catches damaged records.
fn checksum(record: &[u8]) -> u32 {
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

fn record(kind: u8, ip: IpAddr, set: u64, id: &[u8], ifname: &[u8]) -> Vec<u8> {
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
fn address_record(ip: IpAddr, (id, ifname): (&[u8], &[u8])) -> Vec<u8> {
    record(KIND_ADDRESS, ip, 0, id, ifname)
}

fn last_record(set: usize, ip: IpAddr) -> Vec<u8> {
    record(KIND_LAST, ip, set as u64, &[], &[])
}

fn record_address(rec: &[u8]) -> IpAddr {
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

fn decode_vec(bytes: Vec<u8>, path: &Path) -> Result<State, StoreError> {
    if bytes.starts_with(HEADER_V1.as_bytes()) {
        return decode_v1(&bytes, path);
    }
    parse(bytes, path).map(|(state, _)| state)
}

/// Parses format v2, keeping where each record lies.
fn parse(bytes: Vec<u8>, path: &Path) -> Result<(State, Disk), StoreError> {
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

/// Parses format v1 (the line format); `path` names the file in errors,
/// which give the byte offset of the line and its number.
fn decode_v1(bytes: &[u8], path: &Path) -> Result<State, StoreError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::range::{Pool, RangeConfig};
    use std::collections::BTreeSet;
    use std::os::unix::fs::PermissionsExt;

    use ferrite_test_support::TempDir;

    fn pool() -> Pool {
        let cfg = |s: &str| RangeConfig {
            subnet: s.into(),
            range_start: None,
            range_end: None,
            gateway: None,
        };
        Pool::from_config(&[vec![cfg("10.244.1.0/24")], vec![cfg("fd00::/64")]]).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn pod(n: usize) -> Owner {
        Owner::new(format!("{n:064x}"), "eth0")
    }

    /// Recomputes the checksum of the record at `slot`, so a test can make
    /// a record that is well sealed but wrong inside.
    fn reseal(bytes: &mut [u8], slot: usize) {
        let units = usize::from(bytes[slot * UNIT + 2]).max(1);
        let end = ((slot + units) * UNIT).min(bytes.len());
        let rec = &mut bytes[slot * UNIT..end];
        let sum = checksum(rec);
        rec[4..8].copy_from_slice(&sum.to_le_bytes());
    }

    /// The slots whose bytes differ between two versions of a file.
    fn changed_slots(before: &[u8], after: &[u8]) -> Vec<usize> {
        let slots = before.len().max(after.len()) / UNIT;
        let unit = |b: &[u8], s: usize| b.get(s * UNIT..(s + 1) * UNIT).map(<[u8]>::to_vec);
        (0..slots)
            .filter(|&s| {
                unit(before, s).unwrap_or(vec![0; UNIT]) != unit(after, s).unwrap_or(vec![0; UNIT])
            })
            .collect()
    }

    #[test]
    fn format_round_trip_and_layout() {
        let pool = pool();
        let mut state = State::new();
        for n in 0..3 {
            state.allocate(&pool, &pod(n), &[]).unwrap();
        }
        state.release(&pod(1));
        let bytes = encode(&state);
        // Header, 4 addresses in address order, 2 round-robin positions.
        assert_eq!(bytes.len(), 7 * UNIT);
        assert!(bytes.starts_with(b"ferrite-ipam allocations v2\n"));
        assert!(bytes[28..UNIT].iter().all(|&b| b == 0));
        let rec = &bytes[UNIT..2 * UNIT];
        assert_eq!(&rec[..4], &[MAGIC, KIND_ADDRESS, 1, 4]);
        assert_eq!(&rec[16..20], &[10, 244, 1, 1]);
        assert_eq!(&rec[32..36], &[64, 0, 4, 0]);
        assert_eq!(
            &rec[FIXED..FIXED + 68],
            format!("{:064x}eth0", 0).as_bytes()
        );
        assert!(rec[FIXED + 68..].iter().all(|&b| b == 0));
        assert_eq!(record_address(&bytes[3 * UNIT..]), ip("fd00::1"));
        let last = &bytes[5 * UNIT..6 * UNIT];
        assert_eq!(&last[..4], &[MAGIC, KIND_LAST, 1, 4]);
        assert_eq!(record_address(last), ip("10.244.1.3"));
        assert_eq!(&bytes[6 * UNIT + 8..6 * UNIT + 16], &1u64.to_le_bytes());

        assert_eq!(decode(&bytes, Path::new("x")).unwrap(), state);
        assert_eq!(encode(&State::new()).len(), UNIT);
        assert_eq!(
            decode(&encode(&State::new()), Path::new("x")).unwrap(),
            State::new()
        );

        // Long owners take several slots and never cross a page.
        let mut state = State::new();
        for n in 0..40 {
            let id = format!("{n:0>width$}", width = 64 + 100 * (n % 4));
            state.allocate(&pool, &Owner::new(id, "eth0"), &[]).unwrap();
        }
        let bytes = encode(&state);
        let (got, disk) = parse(bytes.clone(), Path::new("x")).unwrap();
        assert_eq!(got, state);
        for &(_, slot) in &disk.addresses {
            let units = usize::from(bytes[slot * UNIT + 2]);
            assert_eq!(slot / UNITS_PER_PAGE, (slot + units - 1) / UNITS_PER_PAGE);
        }
    }

    #[test]
    fn corrupt_files_are_reported_with_file_and_offset() {
        let pool = pool();
        let mut state = State::new();
        for n in 0..2 {
            state.allocate(&pool, &pod(n), &[]).unwrap();
        }
        // Slots: 1, 2 IPv4; 3, 4 IPv6; 5, 6 last.
        let good = encode(&state);
        let edit = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = good.clone();
            f(&mut b);
            b
        };
        let sealed = |slot: usize, f: &dyn Fn(&mut [u8])| {
            edit(&|b| {
                f(&mut b[slot * UNIT..]);
                reseal(b, slot);
            })
        };
        let cases: Vec<(Vec<u8>, u64, &str)> = vec![
            (Vec::new(), 0, "truncated"),
            (b"garbage\n".to_vec(), 0, "expected header"),
            (
                b"ferrite-ipam allocations v9\n".to_vec(),
                0,
                "unsupported format",
            ),
            (edit(&|b| b.truncate(good.len() - 1)), 6 * 128, "truncated"),
            (edit(&|b| b.push(0)), 7 * 128, "truncated"),
            (edit(&|b| b[100] = 1), 0, "header slot"),
            (edit(&|b| b[2 * UNIT] = 0x42), 2 * 128, "bad magic"),
            (
                edit(&|b| b.extend_from_slice(&[[0; 5].as_slice(), &[1], &[0; 122]].concat())),
                7 * 128,
                "free slot",
            ),
            (edit(&|b| b[UNIT + 50] ^= 1), 128, "checksum"),
            (edit(&|b| b[3 * UNIT + 20] ^= 0x80), 3 * 128, "checksum"),
            (sealed(1, &|r| r[1] = 9), 128, "unknown record kind"),
            (sealed(1, &|r| r[3] = 5), 128, "family"),
            (sealed(1, &|r| r[25] = 1), 128, "trailing bytes"),
            (
                sealed(1, &|r| r[FIXED + 3] = b' '),
                128,
                "invalid container id",
            ),
            (sealed(1, &|r| r[FIXED + 3] = 0xff), 128, "not UTF-8"),
            (sealed(1, &|r| r[FIXED + 65] = 0x7f), 128, "invalid ifname"),
            (sealed(1, &|r| r[32] = 0), 128, "invalid container id"),
            (sealed(1, &|r| r[32] = 200), 128, "longer than the record"),
            (sealed(1, &|r| r[8] = 1), 128, "with a set index"),
            (sealed(5, &|r| r[32] = 1), 5 * 128, "with an owner"),
            // The second IPv4 record names the first's address.
            (sealed(2, &|r| r[19] = 1), 2 * 128, "recorded twice"),
            (sealed(6, &|r| r[8] = 0), 6 * 128, "two last-reserved"),
            (sealed(6, &|r| r[2] = 2), 6 * 128, "truncated record"),
            (
                edit(&|b| {
                    b.resize(PAGE + UNIT, 0);
                    b.copy_within(UNIT..2 * UNIT, PAGE - UNIT);
                    b.copy_within(UNIT..2 * UNIT, PAGE);
                    b[PAGE - UNIT + 2] = 2;
                    b[UNIT..PAGE - UNIT].fill(0);
                    reseal(b, UNITS_PER_PAGE - 1);
                }),
                (PAGE - UNIT) as u64,
                "cannot start here",
            ),
            (sealed(1, &|r| r[2] = 0), 128, "cannot start here"),
            // Format v1: offsets of lines, with their numbers.
            (
                b"ferrite-ipam allocations v1".to_vec(),
                0,
                "line 1: truncated",
            ),
            (
                b"ferrite-ipam allocations v1x\n".to_vec(),
                0,
                "line 1: expected header",
            ),
            (
                b"ferrite-ipam allocations v1\n10.0.0.1 abc eth0".to_vec(),
                28,
                "line 2: truncated",
            ),
            (
                b"ferrite-ipam allocations v1\n10.0.0.1 abc\n".to_vec(),
                28,
                "line 2: expected",
            ),
            (
                b"ferrite-ipam allocations v1\nlast 0 10.0.0.1\n10.0.0.300 abc eth0\n".to_vec(),
                44,
                "line 3: \"10.0.0.300\" is not an IP",
            ),
            (
                b"ferrite-ipam allocations v1\n10.0.0.1 a eth0\n10.0.0.1 b eth0\n".to_vec(),
                44,
                "line 3: address 10.0.0.1 recorded twice",
            ),
            (
                b"ferrite-ipam allocations v1\nlast 0 10.0.0.1\nlast 0 10.0.0.2\n".to_vec(),
                44,
                "two last",
            ),
            (
                b"ferrite-ipam allocations v1\nlast x 10.0.0.1\n".to_vec(),
                28,
                "set index",
            ),
            (
                b"ferrite-ipam allocations v1\n10.0.0.1 a\r eth0\n".to_vec(),
                28,
                "invalid container id",
            ),
            (
                b"ferrite-ipam allocations v1\n\xff\n".to_vec(),
                28,
                "line 2: not UTF-8",
            ),
        ];
        for (bytes, offset, reason) in &cases {
            let err = decode(bytes, Path::new("/s/allocations")).unwrap_err();
            let StoreError::Corrupt { offset: got, .. } = &err else {
                panic!("{reason}: {err}");
            };
            let msg = err.to_string();
            assert_eq!(got, offset, "{reason}: {msg}");
            assert!(
                msg.contains("/s/allocations") && msg.contains(reason),
                "{reason}: {msg}"
            );
        }
        assert_eq!(decode(&good, Path::new("x")).unwrap(), state);
    }

    #[test]
    fn network_names_cannot_escape() {
        let dir = TempDir::new("store").unwrap();
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "../x",
            "a b",
            &"x".repeat(65),
            "é",
        ] {
            assert!(
                matches!(
                    Store::open(dir.path(), bad),
                    Err(StoreError::InvalidName { .. })
                ),
                "{bad:?}"
            );
        }
        for good in ["k8s-pod-network", "net_1.v2", &"x".repeat(64)] {
            Store::open(dir.path(), good).unwrap();
        }
    }

    #[test]
    fn open_creates_private_directory_and_missing_file_is_empty() {
        let dir = TempDir::new("store").unwrap();
        let store = Store::open(dir.path(), "net").unwrap();
        assert_eq!(store.dir(), dir.join("ipam/net"));
        let mode = fs::metadata(store.dir()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        assert_eq!(store.read().unwrap(), State::new());
        // An empty commit writes nothing.
        store.lock().unwrap().commit().unwrap();
        assert!(!store.path().exists());
    }

    #[test]
    fn commit_persists_and_drop_discards() {
        let dir = TempDir::new("store").unwrap();
        let store = Store::open(dir.path(), "net").unwrap();
        let pool = pool();
        let a = Owner::new("aaa", "eth0");
        {
            let mut locked = store.lock().unwrap();
            locked.state().allocate(&pool, &a, &[]).unwrap();
            locked.commit().unwrap();
        }
        let mode = fs::metadata(store.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!store.dir().join("allocations.tmp").exists());
        {
            let mut locked = store.lock().unwrap();
            locked
                .state()
                .allocate(&pool, &Owner::new("bbb", "eth0"), &[])
                .unwrap();
            // dropped without commit
        }
        let state = Store::open(dir.path(), "net").unwrap().read().unwrap();
        assert_eq!(state.owned_by(&a), vec![ip("10.244.1.1"), ip("fd00::1")]);
        assert_eq!(state.records().count(), 2);
        assert_eq!(state.last_reserved(0), Some(ip("10.244.1.1")));

        let mut locked = store.lock().unwrap();
        assert_eq!(locked.state().release(&a).len(), 2);
        locked.commit().unwrap();
        drop(locked);
        assert_eq!(store.read().unwrap().records().count(), 0);
        // The round robin position survives the release.
        assert_eq!(store.read().unwrap().last_reserved(1), Some(ip("fd00::1")));
        let mode = fs::metadata(store.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn commit_writes_only_what_changed_and_reuses_slots() {
        let dir = TempDir::new("store").unwrap();
        let store = Store::open(dir.path(), "net").unwrap();
        let pool = pool();
        for n in 0..100 {
            let mut locked = store.lock().unwrap();
            locked.state().allocate(&pool, &pod(n), &[]).unwrap();
            locked.commit().unwrap();
        }
        // Header, 200 addresses, 2 round-robin positions.
        assert_eq!(fs::metadata(store.path()).unwrap().len(), 203 * 128);

        // Several commits under one lock, each against the last.
        let mut locked = store.lock().unwrap();
        let before = fs::read(store.path()).unwrap();
        locked.state().release(&pod(10));
        locked.commit().unwrap();
        let released = fs::read(store.path()).unwrap();
        let freed = changed_slots(&before, &released);
        assert_eq!(freed.len(), 2, "{freed:?}");
        assert!(freed
            .iter()
            .all(|&s| released[s * UNIT..(s + 1) * UNIT] == ZERO_UNIT));
        locked.commit().unwrap(); // nothing changed: nothing written
        assert_eq!(fs::read(store.path()).unwrap(), released);

        locked.state().allocate(&pool, &pod(100), &[]).unwrap();
        locked.commit().unwrap();
        let added = fs::read(store.path()).unwrap();
        assert_eq!(added.len(), released.len(), "the freed slots are reused");
        let changed = changed_slots(&released, &added);
        // Two addresses into the freed slots, two positions in place.
        assert_eq!(changed.len(), 4, "{changed:?}");
        assert!(freed.iter().all(|s| changed.contains(s)));
        drop(locked);

        // A change of owner (GC frees an address, a static request takes it
        // in the same commit) rewrites its record in place.
        let mut locked = store.lock().unwrap();
        let taken = locked.state().owned_by(&pod(20))[0];
        locked.state().release(&pod(20));
        locked.state().allocate(&pool, &pod(200), &[taken]).unwrap();
        locked.commit().unwrap();
        drop(locked);
        let moved = fs::read(store.path()).unwrap();
        let changed = changed_slots(&added, &moved);
        assert_eq!(changed.len(), 4, "{changed:?}");
        assert_eq!(moved.len(), added.len());

        let state = store.read().unwrap();
        assert_eq!(state.owner_of(taken), Some(&pod(200)));
        assert_eq!(state.records().count(), 200);
        let (_, disk) = parse(moved, Path::new("x")).unwrap();
        assert_eq!(disk.addresses.len(), 200);
    }

    #[test]
    fn long_owners_take_several_slots_within_a_page() {
        let dir = TempDir::new("store").unwrap();
        let store = Store::open(dir.path(), "net").unwrap();
        let pool = pool();
        let owner = |n: usize| {
            let id = format!("{n:0>width$}", width = 40 + 150 * (n % 7));
            Owner::new(id, "eth0")
        };
        for n in 0..60 {
            let mut locked = store.lock().unwrap();
            locked.state().allocate(&pool, &owner(n), &[]).unwrap();
            if n % 3 == 0 && n > 0 {
                locked.state().release(&owner(n - 1));
            }
            locked.commit().unwrap();
        }
        let bytes = fs::read(store.path()).unwrap();
        let (state, disk) = parse(bytes.clone(), Path::new("x")).unwrap();
        for &(_, slot) in &disk.addresses {
            let units = usize::from(bytes[slot * UNIT + 2]);
            assert_eq!(slot / UNITS_PER_PAGE, (slot + units - 1) / UNITS_PER_PAGE);
        }
        for n in 0..60 {
            let want = if n % 3 == 2 && n < 59 { 0 } else { 2 };
            assert_eq!(state.owned_by(&owner(n)).len(), want, "{n}");
        }
        assert_eq!(store.read().unwrap(), state);
    }

    /// Every place a writer can die between two `pwrite`s of a commit,
    /// replayed deterministically: the file stays valid, no address has two
    /// owners, and a retried ADD (or DEL) converges. The SIGKILL tests in
    /// tests/concurrency.rs do the same with real kills at random instants.
    #[test]
    fn a_commit_cut_after_any_write_leaves_a_state_that_retries_repair() {
        let pool = pool();
        // (writes to allow, what the commit does)
        for budget in 0..8 {
            for churn in [false, true] {
                let dir = TempDir::new("store").unwrap();
                let store = Store::open(dir.path(), "net").unwrap();
                for n in 0..5 {
                    let mut locked = store.lock().unwrap();
                    locked.state().allocate(&pool, &pod(n), &[]).unwrap();
                    locked.commit().unwrap();
                }
                let before = store.read().unwrap();
                let mut locked = store.lock().unwrap();
                locked.disk.as_mut().unwrap().write_budget = Some(budget);
                locked.state().allocate(&pool, &pod(9), &[]).unwrap();
                if churn {
                    locked.state().release(&pod(2));
                }
                let result = locked.commit();
                let wanted = if churn { 6 } else { 4 };
                assert_eq!(result.is_ok(), budget >= wanted, "budget {budget}");
                drop(locked); // the "killed" writer's lock goes away

                let cut = store.read().unwrap();
                let mut seen = BTreeSet::new();
                for (ip, owner) in cut.records() {
                    assert!(seen.insert(*ip));
                    let held = cut.owned_by(owner).len();
                    let in_flight = *owner == pod(9) || (churn && *owner == pod(2));
                    assert!(
                        held == 2 || in_flight,
                        "budget {budget}: {owner} holds {held}"
                    );
                }
                for n in [0, 1, 3, 4] {
                    assert_eq!(cut.owned_by(&pod(n)), before.owned_by(&pod(n)));
                }

                // The runtime retries: ADD again for pod 9, DEL for pod 2.
                let mut locked = store.lock().unwrap();
                let got = locked.state().allocate(&pool, &pod(9), &[]).unwrap();
                let kept = cut.owned_by(&pod(9));
                for ip in &kept {
                    assert!(
                        got.iter().any(|a| a.address.ip() == *ip),
                        "retried ADD keeps {ip}"
                    );
                }
                if churn {
                    locked.state().release(&pod(2));
                }
                locked.commit().unwrap();
                drop(locked);
                let after = store.read().unwrap();
                assert_eq!(after.owned_by(&pod(9)).len(), 2);
                assert_eq!(after.records().count(), if churn { 10 } else { 12 });
            }
        }
    }

    #[test]
    fn a_failed_commit_is_retried_from_what_the_file_holds() {
        let dir = TempDir::new("store").unwrap();
        let store = Store::open(dir.path(), "net").unwrap();
        let pool = pool();
        let mut locked = store.lock().unwrap();
        locked.state().allocate(&pool, &pod(0), &[]).unwrap();
        locked.commit().unwrap();
        locked.disk.as_mut().unwrap().write_budget = Some(1);
        locked.state().allocate(&pool, &pod(1), &[]).unwrap();
        assert!(matches!(
            locked.commit(),
            Err(StoreError::Io { op: "write", .. })
        ));
        // The next commit reloads and writes the rest.
        locked.commit().unwrap();
        let want = locked.state().clone();
        drop(locked);
        assert_eq!(store.read().unwrap(), want);
    }

    /// A commit skips records the state still points at in the loaded
    /// file; a state put back from a clone after other commits under the
    /// same lock must still be written as it is.
    #[test]
    fn a_state_restored_from_a_clone_is_committed_as_it_is() {
        let dir = TempDir::new("store").unwrap();
        let store = Store::open(dir.path(), "net").unwrap();
        let pool = pool();
        for n in 0..4 {
            let mut locked = store.lock().unwrap();
            locked.state().allocate(&pool, &pod(n), &[]).unwrap();
            locked.commit().unwrap();
        }
        let mut locked = store.lock().unwrap();
        let snapshot = locked.state().clone();
        let taken = locked.state().owned_by(&pod(1))[0];
        locked.state().release(&pod(1));
        locked.state().allocate(&pool, &pod(9), &[taken]).unwrap();
        locked.commit().unwrap();
        locked.state().release(&pod(2));
        locked.commit().unwrap();
        *locked.state() = snapshot.clone();
        locked.commit().unwrap();
        drop(locked);
        assert_eq!(store.read().unwrap(), snapshot);
        assert_eq!(store.read().unwrap().owner_of(taken), Some(&pod(1)));
    }

    #[test]
    fn stale_temporary_file_is_replaced() {
        let dir = TempDir::new("store").unwrap();
        let store = Store::open(dir.path(), "net").unwrap();
        let tmp = store.dir().join("allocations.tmp");
        fs::write(&tmp, "half a file from a killed writer").unwrap();
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)).unwrap();
        let mut locked = store.lock().unwrap();
        locked
            .state()
            .allocate(&pool(), &Owner::new("a", "eth0"), &[])
            .unwrap();
        locked.commit().unwrap();
        drop(locked);
        assert!(!tmp.exists());
        assert_eq!(store.read().unwrap().records().count(), 2);
        let mode = fs::metadata(store.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn v1_file_is_read_as_is_and_converted_under_the_lock() {
        let dir = TempDir::new("store").unwrap();
        let store = Store::open(dir.path(), "net").unwrap();
        let v1 = format!(
            "ferrite-ipam allocations v1\nlast 0 10.244.1.7\nlast 1 fd00::7\n\
             10.244.1.5 {a} eth0\n10.244.1.7 {b} eth0\nfd00::7 {b} eth0\n",
            a = "0f3c".repeat(16),
            b = "9a1b".repeat(16)
        );
        fs::write(store.path(), &v1).unwrap();
        fs::set_permissions(store.path(), fs::Permissions::from_mode(0o644)).unwrap();
        let state = store.read().unwrap();
        assert_eq!(state.records().count(), 3);
        assert_eq!(state.last_reserved(1), Some(ip("fd00::7")));
        assert_eq!(
            fs::read_to_string(store.path()).unwrap(),
            v1,
            "read converts nothing"
        );

        let mut locked = store.lock().unwrap();
        assert_eq!(locked.state(), &state);
        let got = locked
            .state()
            .allocate(&pool(), &Owner::new("new", "eth0"), &[])
            .unwrap();
        assert_eq!(got[0].address.ip(), ip("10.244.1.8"));
        locked.commit().unwrap();
        drop(locked);
        let bytes = fs::read(store.path()).unwrap();
        assert!(bytes.starts_with(b"ferrite-ipam allocations v2\n"));
        let mode = fs::metadata(store.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let after = store.read().unwrap();
        assert_eq!(after.records().count(), 5);
        assert_eq!(
            after.owned_by(&Owner::new("9a1b".repeat(16), "eth0")).len(),
            2
        );

        // A corrupt v1 file is reported, not converted.
        fs::write(store.path(), "ferrite-ipam allocations v1\n10.0.0.1 abc\n").unwrap();
        assert!(matches!(
            store.lock(),
            Err(StoreError::Corrupt { offset: 28, .. })
        ));
        assert_eq!(
            fs::read_to_string(store.path()).unwrap(),
            "ferrite-ipam allocations v1\n10.0.0.1 abc\n"
        );
    }

    #[test]
    fn corrupt_file_fails_lock_and_read() {
        let dir = TempDir::new("store").unwrap();
        let store = Store::open(dir.path(), "net").unwrap();
        let mut state = State::new();
        state.allocate(&pool(), &pod(1), &[]).unwrap();
        let mut bytes = encode(&state);
        bytes[2 * UNIT + 40] ^= 0x20;
        fs::write(store.path(), &bytes).unwrap();
        let msg = store.read().unwrap_err().to_string();
        assert!(msg.contains(&store.path().display().to_string()), "{msg}");
        assert!(msg.contains("at byte 256: checksum mismatch"), "{msg}");
        assert!(matches!(
            store.lock(),
            Err(StoreError::Corrupt { offset: 256, .. })
        ));
        // Not reset.
        assert_eq!(fs::read(store.path()).unwrap(), bytes);
        // Nor is an empty file taken for an empty state.
        fs::write(store.path(), "").unwrap();
        assert!(matches!(
            store.read(),
            Err(StoreError::Corrupt { offset: 0, .. })
        ));
    }

    #[test]
    fn unusable_state_dir_is_a_clear_error() {
        // A path under a regular file: fails for root too, unlike chmod.
        let dir = TempDir::new("store").unwrap();
        let file = dir.join("not-a-dir");
        fs::write(&file, "").unwrap();
        let err = Store::open(&file, "net").unwrap_err();
        assert!(matches!(
            err,
            StoreError::Io {
                op: "create directory",
                ..
            }
        ));
        assert!(err.to_string().contains("not-a-dir/ipam/net"), "{err}");

        // The directory vanishing under an open store.
        let store = Store::open(dir.path(), "gone").unwrap();
        fs::remove_dir_all(store.dir()).unwrap();
        let err = store.lock().unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Io {
                    op: "open lock file",
                    ..
                }
            ),
            "{err}"
        );
    }
}
