//! TCX attachment (Linux 6.6), for devices ferrite shares: the node's
//! uplink, and a host veth with a plugin chained after ferrite (the
//! reference `bandwidth` plugin adds an `ingress` qdisc, which cannot
//! coexist with clsact but can with TCX).
//!
//! Attached without a link (`BPF_PROG_ATTACH`), so the attachment lives and
//! dies with the veth, as a tc filter does, and no pin is left behind. Each
//! attach waits for an RCU grace period (5–20 ms here), which is why clsact
//! stays the default.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

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

#[derive(Clone, Copy)]
struct Hook {
    name: &'static str,
    attach_type: u32,
}

const INGRESS: Hook = Hook {
    name: "ingress",
    attach_type: BPF_TCX_INGRESS,
};
const EGRESS: Hook = Hook {
    name: "egress",
    attach_type: BPF_TCX_EGRESS,
};

impl Hook {
    fn err(self, ifindex: u32) -> impl FnOnce(SysError) -> TcxError {
        move |source| TcxError {
            hook: self.name,
            ifindex,
            source,
        }
    }

    /// Programs at this hook whose kernel name is `program` (ferrite's, of
    /// any version), as (id, fd).
    fn named(self, ifindex: u32, program: &str) -> Result<Vec<(u32, OwnedFd)>, TcxError> {
        let mut out = Vec::new();
        for id in self.ids(ifindex)? {
            let fd = match sys::prog_fd_by_id(id) {
                Ok(fd) => fd,
                // Detached since the query.
                Err(e) if e.errno() == Some(libc::ENOENT) => continue,
                Err(e) => return Err(self.err(ifindex)(e)),
            };
            if sys::prog_name(fd.as_fd()).map_err(self.err(ifindex))? == program {
                out.push((id, fd));
            }
        }
        Ok(out)
    }

    /// Puts `prog` (kernel name `program`) at this hook: nothing if it is
    /// there, in place of another version of it if one is, else last.
    /// Never touches another program.
    fn attach(self, ifindex: u32, prog: BorrowedFd<'_>, program: &str) -> Result<(), TcxError> {
        let ours = sys::prog_id(prog).map_err(self.err(ifindex))?;
        let named = self.named(ifindex, program)?;
        if named.iter().any(|(id, _)| *id == ours) {
            return Ok(());
        }
        let replace = named.first().map(|(_, fd)| fd.as_fd());
        sys::tcx_attach(ifindex, self.attach_type, prog, replace).map_err(self.err(ifindex))
    }

    /// Detaches every program named `program` from this hook; how many.
    fn detach(self, ifindex: u32, program: &str) -> Result<usize, TcxError> {
        let named = self.named(ifindex, program)?;
        for (_, fd) in &named {
            match sys::tcx_detach(ifindex, self.attach_type, fd.as_fd()) {
                Ok(()) => {}
                Err(e) if e.errno() == Some(libc::ENOENT) => {}
                Err(e) => return Err(self.err(ifindex)(e)),
            }
        }
        Ok(named.len())
    }

    fn ids(self, ifindex: u32) -> Result<Vec<u32>, TcxError> {
        sys::tcx_query(ifindex, self.attach_type).map_err(self.err(ifindex))
    }
}

/// `ingress_prog` (kernel name `ingress_name`) at TCX ingress and
/// `egress_prog` at TCX egress of `ifindex`. The two attaches run at once
/// so that their grace periods overlap.
pub(crate) fn attach(
    ifindex: u32,
    (ingress_prog, ingress_name): (BorrowedFd<'_>, &str),
    (egress_prog, egress_name): (BorrowedFd<'_>, &str),
) -> Result<(), TcxError> {
    std::thread::scope(|s| {
        let egress = s.spawn(|| EGRESS.attach(ifindex, egress_prog, egress_name));
        let ingress = INGRESS.attach(ifindex, ingress_prog, ingress_name);
        let egress = egress.join().expect("the TCX egress attach does not panic");
        ingress.and(egress)
    })
}

/// Detaches the programs named `ingress_name` and `egress_name` (any
/// version) from `ifindex`; how many there were.
pub(crate) fn detach(
    ifindex: u32,
    ingress_name: &str,
    egress_name: &str,
) -> Result<usize, TcxError> {
    Ok(INGRESS.detach(ifindex, ingress_name)? + EGRESS.detach(ifindex, egress_name)?)
}

/// Program ids at TCX ingress and egress of `ifindex`.
pub(crate) fn attached_ids(ifindex: u32) -> Result<(Vec<u32>, Vec<u32>), TcxError> {
    Ok((INGRESS.ids(ifindex)?, EGRESS.ids(ifindex)?))
}
