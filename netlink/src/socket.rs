// SPDX-License-Identifier: Apache-2.0
//! The socket, behind a two-call trait so the request logic can be tested
//! against recorded kernel answers.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

use netlink_sys::SocketAddr;

use crate::{NetlinkError, Result};

pub use netlink_sys::protocols::{NETLINK_NETFILTER, NETLINK_ROUTE};

/// Where requests go and answers come from: a netlink socket, or a fake.
pub trait Transport {
    /// Sends one datagram (a request, or a batch of them).
    fn send(&mut self, buf: &[u8]) -> io::Result<()>;
    /// Receives one datagram: `buf` (cleared first) holds it after, at
    /// most its capacity.
    fn recv(&mut self, buf: &mut Vec<u8>) -> io::Result<()>;
}

/// A netlink socket connected to the kernel, asking for extended acks
/// (the kernel's own error text) and capped acks (an error does not echo
/// the whole request back).
pub struct Socket {
    inner: netlink_sys::Socket,
}

impl Socket {
    /// A socket of `protocol` (`NETLINK_ROUTE`, `NETLINK_NETFILTER`) in the
    /// calling thread's network namespace.
    pub fn open(protocol: isize) -> Result<Self> {
        let err = |call| move |source| NetlinkError::Socket { call, source };
        let inner = netlink_sys::Socket::new(protocol).map_err(err("socket(AF_NETLINK)"))?;
        // connect binds the socket to a kernel-chosen port as well.
        inner
            .connect(&SocketAddr::new(0, 0))
            .map_err(err("connect"))?;
        // Failing either only costs error detail (kernels before 4.12).
        let _ = inner.set_ext_ack(true);
        let _ = inner.set_cap_ack(true);
        Ok(Self { inner })
    }

    /// A socket inside the network namespace `netns`. A socket keeps the
    /// namespace it was created in, so only its creation runs there, on a
    /// short-lived thread: the caller's thread never changes namespace.
    pub fn open_in_netns(protocol: isize, netns: BorrowedFd<'_>) -> Result<Self> {
        let fd = netns.as_raw_fd();
        std::thread::scope(|s| {
            s.spawn(move || {
                // SAFETY: setns on this thread only; the fd outlives the scope.
                if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                    return Err(NetlinkError::Socket {
                        call: "setns(CLONE_NEWNET)",
                        source: io::Error::last_os_error(),
                    });
                }
                Self::open(protocol)
            })
            .join()
            .unwrap_or_else(|_| {
                Err(NetlinkError::Socket {
                    call: "setns(CLONE_NEWNET)",
                    source: io::Error::other("namespace thread panicked"),
                })
            })
        })
    }

    /// A receive timeout, so a kernel that never answers cannot hang a
    /// long-lived caller forever (a receive then fails with EAGAIN).
    pub fn set_recv_timeout(&self, timeout: Duration) -> Result<()> {
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: a valid timeval of the size passed, on a socket we own.
        let rc = unsafe {
            libc::setsockopt(
                self.inner.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(NetlinkError::Socket {
                call: "setsockopt(SO_RCVTIMEO)",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

impl Transport for Socket {
    fn send(&mut self, buf: &[u8]) -> io::Result<()> {
        let n = self.inner.send(buf, 0)?;
        if n != buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("sent {n} of {} bytes", buf.len()),
            ));
        }
        Ok(())
    }

    fn recv(&mut self, buf: &mut Vec<u8>) -> io::Result<()> {
        loop {
            buf.clear();
            // Into the vector's spare capacity: no zeroing of the buffer
            // first (zeroing 64 KiB per socket cost more instructions than
            // an ADD's whole netlink exchange).
            match self.inner.recv(buf, 0) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other.map(drop),
            }
        }
    }
}
