// SPDX-License-Identifier: Apache-2.0
//! Work inside the pod's network namespace, on the calling thread.
//!
//! A netlink socket keeps the namespace it was made in, and /proc/sys/net
//! belongs to the namespace of whoever opens it, so the pod's socket and
//! the pod's sysctls are made from inside the pod's namespace. The plugin
//! enters it on its own (single) thread and comes straight back: a thread
//! started for it cost about 25 system calls (its stack, its malloc arena,
//! signal masks, clone3, futex) against 4 for the round trip here.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Runs `f` with the calling thread in the network namespace `netns`, then
/// brings the thread back to the namespace it was in, also when `f`
/// panics. If the thread cannot come back, the process aborts: whatever it
/// did next (a sysctl, a socket) would land in the pod's namespace.
pub fn within<R>(netns: BorrowedFd<'_>, f: impl FnOnce() -> R) -> io::Result<R> {
    let home = File::open("/proc/thread-self/ns/net")?;
    enter(netns.as_raw_fd())?;
    let back = Home(home);
    let out = f();
    drop(back);
    Ok(out)
}

fn enter(fd: libc::c_int) -> io::Result<()> {
    // SAFETY: setns changes this thread's namespace only; fd is open.
    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The namespace to return to, entered again on drop.
struct Home(File);

impl Drop for Home {
    fn drop(&mut self) {
        if let Err(e) = enter(self.0.as_raw_fd()) {
            eprintln!("ferrite: cannot return to the node's network namespace: {e}");
            std::process::abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn inode(path: &str) -> u64 {
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).unwrap())
    }

    /// Entering the namespace we are in is allowed to anyone with
    /// CAP_SYS_ADMIN; without it, `within` fails before running `f` and the
    /// thread stays where it was. Either way it ends where it started.
    #[test]
    fn comes_back_to_where_it_started() {
        let before = inode("/proc/thread-self/ns/net");
        let own = File::open("/proc/thread-self/ns/net").unwrap();
        let ran = within(own.as_fd(), || inode("/proc/thread-self/ns/net"));
        if let Ok(inside) = ran {
            assert_eq!(inside, before);
        }
        assert_eq!(inode("/proc/thread-self/ns/net"), before);
    }
}
