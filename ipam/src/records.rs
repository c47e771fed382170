// SPDX-License-Identifier: Apache-2.0
//! The address index of a [`State`](crate::State): every reservation, sorted
//! by address. Owners loaded from the state file stay in the file's bytes
//! (checked when the file was parsed) until something asks for an
//! [`Owner`] value, so loading and dropping a state costs one pass over the
//! file and no allocation per record.

use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use crate::state::Owner;

/// Size of a slot of the state file (see `store`).
pub(crate) const UNIT: usize = 128;
/// Bytes of a record before the container id.
pub(crate) const FIXED: usize = 36;

/// A sort key with the order of `IpAddr` (IPv4 first), cheap to compare.
#[inline]
pub(crate) fn key(ip: IpAddr) -> (bool, u128) {
    match ip {
        IpAddr::V4(v4) => (false, u128::from(u32::from(v4))),
        IpAddr::V6(v6) => (true, u128::from(v6)),
    }
}

/// The container id and ifname of the address record starting at `slot`
/// of `bytes` (a state file, or a record starting at slot 0).
#[inline]
pub(crate) fn owner_bytes(bytes: &[u8], slot: usize) -> (&[u8], &[u8]) {
    let rec = &bytes[slot * UNIT..];
    let id_len = usize::from(u16::from_le_bytes([rec[32], rec[33]]));
    let if_len = usize::from(u16::from_le_bytes([rec[34], rec[35]]));
    (
        &rec[FIXED..FIXED + id_len],
        &rec[FIXED + id_len..FIXED + id_len + if_len],
    )
}

/// An owner from bytes that were checked to be valid UTF-8 when the file
/// was parsed.
fn owner_from_checked(id: &[u8], ifname: &[u8]) -> Owner {
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).expect("checked when parsed");
    Owner {
        container_id: text(id),
        ifname: text(ifname),
    }
}

/// Where the owner of an address is.
#[derive(Clone, Debug)]
pub(crate) enum Loc {
    /// In the address record starting at this slot of the loaded file.
    Slot(u32),
    /// Set since the load.
    Owned(Box<Owner>),
}

#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub(crate) ip: IpAddr,
    pub(crate) loc: Loc,
}

/// Reservations by address; see the module documentation.
#[derive(Default)]
pub(crate) struct Records {
    /// The state file the `Loc::Slot` entries point into.
    base: Option<Arc<Vec<u8>>>,
    /// Sorted by address, one per address.
    entries: Vec<Entry>,
    /// Every owner in entry order, built on first use by `iter` and `get`
    /// (which hand out references); reset by every change.
    owners: OnceLock<Box<[Owner]>>,
}

impl Clone for Records {
    fn clone(&self) -> Records {
        Records {
            base: self.base.clone(),
            entries: self.entries.clone(),
            owners: OnceLock::new(),
        }
    }
}

impl Records {
    /// Records loaded from `base`; `entries` sorted by address, unique.
    pub(crate) fn loaded(base: Arc<Vec<u8>>, entries: Vec<Entry>) -> Records {
        Records {
            base: Some(base),
            entries,
            owners: OnceLock::new(),
        }
    }

    pub(crate) fn base(&self) -> Option<&Arc<Vec<u8>>> {
        self.base.as_ref()
    }

    pub(crate) fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn changed(&mut self) {
        if self.owners.get().is_some() {
            self.owners = OnceLock::new();
        }
    }

    fn find(&self, ip: IpAddr) -> Result<usize, usize> {
        let k = key(ip);
        self.entries.binary_search_by(|e| key(e.ip).cmp(&k))
    }

    /// The owner of entry `i` as bytes: container id, ifname.
    #[inline]
    pub(crate) fn owner_bytes_at(&self, i: usize) -> (&[u8], &[u8]) {
        match &self.entries[i].loc {
            Loc::Slot(slot) => owner_bytes(
                self.base.as_ref().expect("slot entries have a base"),
                *slot as usize,
            ),
            Loc::Owned(owner) => (owner.container_id.as_bytes(), owner.ifname.as_bytes()),
        }
    }

    fn owner_at(&self, i: usize) -> Owner {
        match &self.entries[i].loc {
            Loc::Owned(owner) => (**owner).clone(),
            Loc::Slot(_) => {
                let (id, ifname) = self.owner_bytes_at(i);
                owner_from_checked(id, ifname)
            }
        }
    }

    fn owners(&self) -> &[Owner] {
        self.owners
            .get_or_init(|| (0..self.entries.len()).map(|i| self.owner_at(i)).collect())
    }

    /// The owner of `ip`, as a value.
    pub(crate) fn owner_of(&self, ip: IpAddr) -> Option<Owner> {
        self.find(ip).ok().map(|i| self.owner_at(i))
    }

    pub(crate) fn get(&self, ip: &IpAddr) -> Option<&Owner> {
        let i = self.find(*ip).ok()?;
        match &self.entries[i].loc {
            Loc::Owned(owner) => Some(owner),
            Loc::Slot(_) => Some(&self.owners()[i]),
        }
    }

    /// Sets the owner of `ip`; returns the previous one.
    pub(crate) fn insert(&mut self, ip: IpAddr, owner: Owner) -> Option<Owner> {
        self.changed();
        let loc = Loc::Owned(Box::new(owner));
        match self.find(ip) {
            Ok(i) => {
                let old = self.owner_at(i);
                self.entries[i].loc = loc;
                Some(old)
            }
            Err(i) => {
                self.entries.insert(i, Entry { ip, loc });
                None
            }
        }
    }

    pub(crate) fn remove(&mut self, ip: &IpAddr) -> bool {
        match self.find(*ip) {
            Ok(i) => {
                self.changed();
                self.entries.remove(i);
                true
            }
            Err(_) => false,
        }
    }

    /// Every reservation in address order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&IpAddr, &Owner)> {
        let owners: &[Owner] = if self.entries.is_empty() {
            &[]
        } else {
            self.owners()
        };
        self.entries.iter().map(|e| &e.ip).zip(owners)
    }

    /// The entries with addresses in `from..=to`.
    pub(crate) fn range(&self, from: IpAddr, to: IpAddr) -> &[Entry] {
        let (from, to) = (key(from), key(to));
        let start = self.entries.partition_point(|e| key(e.ip) < from);
        let end = self.entries.partition_point(|e| key(e.ip) <= to);
        &self.entries[start..end.max(start)]
    }

    /// Addresses held by `owner`, in address order; compares bytes, builds
    /// nothing.
    pub(crate) fn held_by(&self, owner: &Owner) -> Vec<IpAddr> {
        let want = (owner.container_id.as_bytes(), owner.ifname.as_bytes());
        (0..self.entries.len())
            .filter(|&i| self.owner_bytes_at(i) == want)
            .map(|i| self.entries[i].ip)
            .collect()
    }

    /// Removes every entry `keep` rejects; returns them.
    pub(crate) fn retain(&mut self, keep: impl Fn(&Owner) -> bool) -> Vec<(IpAddr, Owner)> {
        let mut released = Vec::new();
        let mut keeps = Vec::with_capacity(self.entries.len());
        // One owner value reused for every record from the file.
        let mut scratch = Owner::new(String::new(), String::new());
        for i in 0..self.entries.len() {
            let kept = match &self.entries[i].loc {
                Loc::Owned(owner) => keep(owner),
                Loc::Slot(_) => {
                    let (id, ifname) = self.owner_bytes_at(i);
                    scratch.container_id.clear();
                    scratch.ifname.clear();
                    scratch
                        .container_id
                        .push_str(std::str::from_utf8(id).expect("checked when parsed"));
                    scratch
                        .ifname
                        .push_str(std::str::from_utf8(ifname).expect("checked when parsed"));
                    keep(&scratch)
                }
            };
            if !kept {
                released.push((self.entries[i].ip, self.owner_at(i)));
            }
            keeps.push(kept);
        }
        if !released.is_empty() {
            self.changed();
            let mut keeps = keeps.into_iter();
            self.entries
                .retain(|_| keeps.next().expect("one per entry"));
        }
        released
    }
}

impl PartialEq for Records {
    fn eq(&self, other: &Records) -> bool {
        self.entries.len() == other.entries.len()
            && (0..self.entries.len()).all(|i| {
                self.entries[i].ip == other.entries[i].ip
                    && self.owner_bytes_at(i) == other.owner_bytes_at(i)
            })
    }
}

impl Eq for Records {}

impl fmt::Debug for Records {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}
