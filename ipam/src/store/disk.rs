// SPDX-License-Identifier: Apache-2.0
//! The slot writer: the state file as loaded under the lock, and the
//! commit that writes only the records that changed, one `pwrite` each,
//! releases before reservations.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::net::IpAddr;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use super::format::{address_record, last_record, record_address, PAGE, UNITS_PER_PAGE, ZERO_UNIT};
use super::{io_error, StoreError};
use crate::records::{self, key, Loc, UNIT};
use crate::state::State;

/// The state file as loaded: its bytes and where each record lies.
pub(super) struct Disk {
    /// Open for writing; `None` when there is no state file yet.
    pub(super) file: Option<File>,
    /// The file as loaded, shared with the [`State`] loaded with it (whose
    /// records point into it). Never changed: what was written since is in
    /// `written`.
    pub(super) base: Arc<Vec<u8>>,
    /// Records (or zeros) written since the load, by first slot.
    pub(super) written: BTreeMap<usize, Vec<u8>>,
    /// Slot holds (part of) a record. Slot 0, the header, counts as used.
    pub(super) used: Vec<bool>,
    /// Slot was written since the load (as long as `used`).
    pub(super) rewritten: Vec<bool>,
    /// Slot of each address record, by address.
    pub(super) addresses: Vec<(IpAddr, usize)>,
    /// Address and slot of each set's last-reserved record.
    pub(super) last: BTreeMap<usize, (IpAddr, usize)>,
    /// Tests: fail every write after this many, as a writer killed there
    /// would stop.
    #[cfg(test)]
    pub(super) write_budget: Option<usize>,
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

/// One record to write; `slot` is where it replaces a record of the same
/// size, `None` for a new record.
struct Pending {
    slot: Option<usize>,
    bytes: Vec<u8>,
}

impl Disk {
    pub(super) fn missing() -> Disk {
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

    pub(super) fn write_changes(&mut self, state: &State, path: &Path) -> Result<(), StoreError> {
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
    pub(super) fn free_slots(&mut self, units: usize) -> usize {
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
                return Err(io_error("write", path)(std::io::Error::other(
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
