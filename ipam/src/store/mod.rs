// SPDX-License-Identifier: Apache-2.0
//! The on-disk store: one directory per network, one state file of
//! fixed-size slots, one lock.
//!
//! Layout of `<state_dir>/ipam/<network>/` (mode 0700):
//! - `lock`: an empty file that carries the flock. It is separate from the
//!   state file because that one is created (and migrated from format v1)
//!   by rename, and a lock on a replaced inode would protect nothing.
//! - `allocations`: the state (mode 0600), format v2 (`format.rs`).
//! - `allocations.tmp`: the first version of the state file while it is
//!   written (only when the file is created or migrated).
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
//! Here: the directory, its lock, and loading and committing under it.
//! `disk.rs` writes the records that changed, `format.rs` encodes and
//! parses format v2, `v1.rs` reads the old text format for the migration.

mod disk;
mod format;
#[cfg(test)]
mod tests;
mod v1;

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::state::State;
use disk::Disk;
pub use format::{decode, encode};
use format::{decode_vec, parse};
use v1::{decode_v1, HEADER_V1};

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
        // One mkdir when the directory is there (every ADD after the
        // first): a recursive create would also stat it. Something else of
        // that name fails the lock file's open, with its path.
        match DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(_) => DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(io_error("create directory", &dir))?,
        }
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

/// The whole file: one fstat for its size, then reads until end of file
/// (two, as a rule: the contents and the empty read that ends them).
/// `read_to_end` would stat the file and ask its position again.
fn read_all(file: &File, path: &Path) -> Result<Vec<u8>, StoreError> {
    let len = file.metadata().map_err(io_error("stat", path))?.len();
    let mut bytes = vec![0; usize::try_from(len).unwrap_or(0).saturating_add(1)];
    let mut filled = 0;
    let mut reader = file;
    loop {
        if filled == bytes.len() {
            // It grew since the fstat: keep going.
            bytes.resize(filled * 2, 0);
        }
        match reader.read(&mut bytes[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_error("read", path)(e)),
        }
    }
    bytes.truncate(filled);
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
