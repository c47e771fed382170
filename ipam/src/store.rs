// SPDX-License-Identifier: Apache-2.0
//! The on-disk store: one directory per network, one state file, one lock.
//!
//! Layout of `<state_dir>/ipam/<network>/` (mode 0700):
//! - `lock`: an empty file that carries the flock. It is separate from the
//!   state file because that one is replaced by rename, and a lock on a
//!   replaced inode would protect nothing.
//! - `allocations`: the state, in the line format below (mode 0600).
//! - `allocations.tmp`: the next state while it is being written.
//!
//! ```text
//! ferrite-ipam allocations v1
//! last 0 10.244.1.7
//! last 1 fd00::7
//! 10.244.1.5 0f3c...e1 eth0
//! 10.244.1.7 9a1b...77 eth0
//! fd00::7 9a1b...77 eth0
//! ```
//!
//! A header naming the format version, then `last <set> <ip>` lines (where
//! each set's round robin resumes) and `<ip> <container id> <ifname>`
//! records, fields separated by one space, every line ending in `\n`.
//! Container ids and ifnames never hold whitespace (the allocator refuses
//! them), so the fields cannot run into each other. A file that does not
//! follow this exactly is reported as corrupt, with its line; it is never
//! reset silently.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::state::{Owner, State};

const HEADER: &str = "ferrite-ipam allocations v1";
const HEADER_PREFIX: &str = "ferrite-ipam allocations ";

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
    #[error("ipam state file {path} is corrupt at line {line}: {reason} (fix or remove it; addresses it records may be in use)")]
    Corrupt {
        path: PathBuf,
        line: usize,
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
    saved: State,
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
        let state = self.load()?;
        Ok(Locked {
            store: self,
            _lock: lock,
            saved: state.clone(),
            state,
        })
    }

    /// Takes a shared lock, loads the state and unlocks (for CHECK and
    /// STATUS).
    pub fn read(&self) -> Result<State, StoreError> {
        let _lock = self.lock_file(libc::LOCK_SH)?;
        self.load()
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

    fn load(&self) -> Result<State, StoreError> {
        let path = self.path();
        match fs::read(&path) {
            Ok(bytes) => decode(&bytes, &path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(State::new()),
            Err(e) => Err(io_error("read", &path)(e)),
        }
    }

    /// Writes the whole state to `allocations.tmp`, then renames it over
    /// `allocations`. A process killed at any instant leaves either the old
    /// or the new file, never a mix.
    ///
    /// There is deliberately no fsync. The store guards against crashed and
    /// killed plugin processes, and rename alone is atomic for those. A
    /// power loss that loses the latest rename also takes down every pod
    /// network namespace that used the addresses; the runtime re-runs ADD
    /// for new sandboxes and GC reconciles whatever the file still holds.
    /// Skipping fsync keeps an ADD from waiting on the disk.
    fn save(&self, state: &State) -> Result<(), StoreError> {
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
        file.write_all(encode(state).as_bytes())
            .map_err(io_error("write", &tmp))?;
        drop(file);
        let path = self.path();
        fs::rename(&tmp, &path).map_err(io_error("replace", &path))
    }
}

impl Locked<'_> {
    pub fn state(&mut self) -> &mut State {
        &mut self.state
    }

    /// Saves the state if it changed since it was loaded (or last
    /// committed). The lock stays held.
    pub fn commit(&mut self) -> Result<(), StoreError> {
        if self.state == self.saved {
            return Ok(());
        }
        self.store.save(&self.state)?;
        self.saved = self.state.clone();
        Ok(())
    }
}

/// The state in the line format.
pub fn encode(state: &State) -> String {
    let mut out = String::with_capacity(64 + state.records.len() * 96);
    out.push_str(HEADER);
    out.push('\n');
    for (set, ip) in &state.last {
        out.push_str(&format!("last {set} {ip}\n"));
    }
    for (ip, owner) in &state.records {
        out.push_str(&format!("{ip} {} {}\n", owner.container_id, owner.ifname));
    }
    out
}

/// Parses the line format; `path` names the file in errors.
pub fn decode(bytes: &[u8], path: &Path) -> Result<State, StoreError> {
    let corrupt = |line: usize, reason: String| StoreError::Corrupt {
        path: path.to_path_buf(),
        line,
        reason,
    };
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let line = 1 + bytes[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        corrupt(line, "not UTF-8 text".into())
    })?;
    if !text.ends_with('\n') {
        let line = text.lines().count().max(1);
        return Err(corrupt(
            line,
            "truncated: the last line has no newline".into(),
        ));
    }
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l));
    match lines.next() {
        Some((_, HEADER)) => {}
        Some((n, other)) if other.starts_with(HEADER_PREFIX) => {
            return Err(corrupt(
                n,
                format!("unsupported format {other:?}, expected {HEADER:?}"),
            ))
        }
        Some((n, other)) => {
            return Err(corrupt(
                n,
                format!("expected header {HEADER:?}, found {other:?}"),
            ))
        }
        None => unreachable!("text ends with a newline, so it has a line"),
    }
    let mut state = State::new();
    for (n, line) in lines {
        let fields: Vec<&str> = line.split(' ').collect();
        let parse_ip = |s: &str| -> Result<IpAddr, StoreError> {
            s.parse()
                .map_err(|_| corrupt(n, format!("{s:?} is not an IP address")))
        };
        match fields.as_slice() {
            ["last", set, ip] => {
                let set: usize = set
                    .parse()
                    .map_err(|_| corrupt(n, format!("{set:?} is not a set index")))?;
                let ip = parse_ip(ip)?;
                if state.last.insert(set, ip).is_some() {
                    return Err(corrupt(n, format!("set {set} has two last lines")));
                }
            }
            [ip, container_id, ifname] => {
                let ip = parse_ip(ip)?;
                let owner = Owner::new(*container_id, *ifname);
                owner.validate().map_err(|e| corrupt(n, e.to_string()))?;
                if let Some(first) = state.records.insert(ip, owner) {
                    return Err(corrupt(
                        n,
                        format!("address {ip} recorded twice (also held by {first})"),
                    ));
                }
            }
            _ => {
                return Err(corrupt(
                    n,
                    format!("expected \"<ip> <container id> <ifname>\" or \"last <set> <ip>\", found {line:?}"),
                ))
            }
        }
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::range::{Pool, RangeConfig};
    use std::os::unix::fs::PermissionsExt;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            static N: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "ferrite-ipam-store-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

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

    #[test]
    fn line_format_round_trip() {
        let pool = pool();
        let mut state = State::new();
        for n in 0..3 {
            state
                .allocate(&pool, &Owner::new(format!("{n:064x}"), "eth0"), &[])
                .unwrap();
        }
        state.release(&Owner::new(format!("{:064x}", 1), "eth0"));
        let text = encode(&state);
        let want = format!(
            "ferrite-ipam allocations v1\n\
             last 0 10.244.1.3\nlast 1 fd00::3\n\
             10.244.1.1 {a} eth0\n10.244.1.3 {c} eth0\nfd00::1 {a} eth0\nfd00::3 {c} eth0\n",
            a = format!("{:064x}", 0),
            c = format!("{:064x}", 2)
        );
        assert_eq!(text, want);
        assert_eq!(decode(text.as_bytes(), Path::new("x")).unwrap(), state);
        assert_eq!(
            decode(encode(&State::new()).as_bytes(), Path::new("x")).unwrap(),
            State::new()
        );
    }

    #[test]
    fn corrupt_files_are_reported_with_file_and_line() {
        let h = HEADER;
        let cases: &[(&str, usize, &str)] = &[
            ("", 1, "truncated"),
            ("garbage\n", 1, "expected header"),
            ("ferrite-ipam allocations v9\n", 1, "unsupported format"),
            (&format!("{h}\n10.0.0.1 abc eth0"), 2, "truncated"),
            (&format!("{h}\n10.0.0.1 abc\n"), 2, "expected"),
            (&format!("{h}\n10.0.0.1 abc eth0 x\n"), 2, "expected"),
            (&format!("{h}\n\n"), 2, "expected"),
            (&format!("{h}\n10.0.0.300 abc eth0\n"), 2, "not an IP"),
            (
                &format!("{h}\n10.0.0.1 a eth0\n10.0.0.1 b eth0\n"),
                3,
                "recorded twice",
            ),
            (&format!("{h}\nlast x 10.0.0.1\n"), 2, "set index"),
            (
                &format!("{h}\nlast 0 10.0.0.1\nlast 0 10.0.0.2\n"),
                3,
                "two last",
            ),
            (
                &format!("{h}\n10.0.0.1 a\u{7f} eth0\n"),
                2,
                "invalid container id",
            ),
            (
                &format!("{h}\n10.0.0.1 a\r eth0\n"),
                2,
                "invalid container id",
            ),
        ];
        for (text, line, reason) in cases {
            let err = decode(text.as_bytes(), Path::new("/s/allocations")).unwrap_err();
            let StoreError::Corrupt { line: got, .. } = &err else {
                panic!("{text:?}: {err}");
            };
            assert_eq!(got, line, "{text:?}: {err}");
            let msg = err.to_string();
            assert!(
                msg.contains("/s/allocations") && msg.contains(reason),
                "{text:?}: {msg}"
            );
        }
        let err = decode(b"ferrite-ipam allocations v1\n\xff\n", Path::new("f")).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { line: 2, .. }), "{err}");
    }

    #[test]
    fn network_names_cannot_escape() {
        let dir = TempDir::new();
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
                    Store::open(&dir.0, bad),
                    Err(StoreError::InvalidName { .. })
                ),
                "{bad:?}"
            );
        }
        for good in ["k8s-pod-network", "net_1.v2", &"x".repeat(64)] {
            Store::open(&dir.0, good).unwrap();
        }
    }

    #[test]
    fn open_creates_private_directory_and_missing_file_is_empty() {
        let dir = TempDir::new();
        let store = Store::open(&dir.0, "net").unwrap();
        assert_eq!(store.dir(), dir.0.join("ipam/net"));
        let mode = fs::metadata(store.dir()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        assert_eq!(store.read().unwrap(), State::new());
        // An empty commit writes nothing.
        store.lock().unwrap().commit().unwrap();
        assert!(!store.path().exists());
    }

    #[test]
    fn commit_persists_and_drop_discards() {
        let dir = TempDir::new();
        let store = Store::open(&dir.0, "net").unwrap();
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
        let state = Store::open(&dir.0, "net").unwrap().read().unwrap();
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
    }

    #[test]
    fn stale_temporary_file_is_replaced() {
        let dir = TempDir::new();
        let store = Store::open(&dir.0, "net").unwrap();
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
    }

    #[test]
    fn corrupt_file_fails_lock_and_read() {
        let dir = TempDir::new();
        let store = Store::open(&dir.0, "net").unwrap();
        fs::write(store.path(), "ferrite-ipam allocations v1\n10.0.0.1 abc\n").unwrap();
        let msg = store.read().unwrap_err().to_string();
        assert!(msg.contains(&store.path().display().to_string()), "{msg}");
        assert!(msg.contains("line 2"), "{msg}");
        assert!(matches!(
            store.lock(),
            Err(StoreError::Corrupt { line: 2, .. })
        ));
        // Not reset.
        assert_eq!(
            fs::read_to_string(store.path()).unwrap(),
            "ferrite-ipam allocations v1\n10.0.0.1 abc\n"
        );
    }

    #[test]
    fn unusable_state_dir_is_a_clear_error() {
        // A path under a regular file: fails for root too, unlike chmod.
        let dir = TempDir::new();
        let file = dir.0.join("not-a-dir");
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
        let store = Store::open(&dir.0, "gone").unwrap();
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
