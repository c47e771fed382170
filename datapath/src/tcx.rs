//! TCX attachment (Linux 6.6), for a host veth that ferrite shares with a
//! plugin chained after it: the reference `bandwidth` plugin adds an
//! `ingress` qdisc, which cannot coexist with clsact but can with TCX.
//!
//! Attached without a link (`BPF_PROG_ATTACH`), so the attachment lives and
//! dies with the veth, as a tc filter does, and no pin is left behind. Each
//! attach waits for an RCU grace period (5–20 ms here), which is why clsact
//! stays the default.

use std::os::fd::{AsFd, BorrowedFd};

use thiserror::Error;

use crate::sys::{self, SysError, BPF_TCX_EGRESS, BPF_TCX_INGRESS};

/// A failed TCX step on one hook of one device.
#[derive(Debug, Error)]
#[error("TCX {hook} of ifindex {ifindex}: {source}")]
pub struct TcxError {
    pub hook: &'static str,
    pub ifindex: u32,
    #[source]
    pub source: SysError,
}

struct Hook {
    name: &'static str,
    attach_type: u32,
    /// The kernel name of ferrite's program at this hook, in any version.
    program: &'static str,
}

const INGRESS: Hook = Hook {
    name: "ingress",
    attach_type: BPF_TCX_INGRESS,
    program: "from_pod",
};
const EGRESS: Hook = Hook {
    name: "egress",
    attach_type: BPF_TCX_EGRESS,
    program: "to_pod",
};

impl Hook {
    fn err(&self, ifindex: u32) -> impl FnOnce(SysError) -> TcxError + '_ {
        move |source| TcxError {
            hook: self.name,
            ifindex,
            source,
        }
    }

    /// Puts `prog` at this hook: nothing if it is there, in place of
    /// another version of ferrite's program if one is, else last.
    fn attach(&self, ifindex: u32, prog: BorrowedFd<'_>) -> Result<(), TcxError> {
        let ours = sys::prog_id(prog).map_err(self.err(ifindex))?;
        let ids = sys::tcx_query(ifindex, self.attach_type).map_err(self.err(ifindex))?;
        if ids.contains(&ours) {
            return Ok(());
        }
        for id in ids {
            let old = match sys::prog_fd_by_id(id) {
                Ok(fd) => fd,
                // Detached since the query.
                Err(e) if e.errno() == Some(libc::ENOENT) => continue,
                Err(e) => return Err(self.err(ifindex)(e)),
            };
            if sys::prog_name(old.as_fd()).map_err(self.err(ifindex))? == self.program {
                return sys::tcx_attach(ifindex, self.attach_type, prog, Some(old.as_fd()))
                    .map_err(self.err(ifindex));
            }
        }
        sys::tcx_attach(ifindex, self.attach_type, prog, None).map_err(self.err(ifindex))
    }

    fn ids(&self, ifindex: u32) -> Result<Vec<u32>, TcxError> {
        sys::tcx_query(ifindex, self.attach_type).map_err(self.err(ifindex))
    }
}

/// `from_pod` at TCX ingress and `to_pod` at TCX egress of `ifindex`. The
/// two attaches run at once so that their grace periods overlap.
pub(crate) fn attach(
    ifindex: u32,
    from_pod: BorrowedFd<'_>,
    to_pod: BorrowedFd<'_>,
) -> Result<(), TcxError> {
    std::thread::scope(|s| {
        let egress = s.spawn(|| EGRESS.attach(ifindex, to_pod));
        let ingress = INGRESS.attach(ifindex, from_pod);
        let egress = egress.join().expect("the TCX egress attach does not panic");
        ingress.and(egress)
    })
}

/// Program ids at TCX ingress and egress of `ifindex`.
pub(crate) fn attached_ids(ifindex: u32) -> Result<(Vec<u32>, Vec<u32>), TcxError> {
    Ok((INGRESS.ids(ifindex)?, EGRESS.ids(ifindex)?))
}
