// SPDX-License-Identifier: Apache-2.0
//! STATUS: whether an ADD would succeed now.

use std::path::Path;

use ferrite_datapath::Datapath;

use super::datapath_error;
use crate::addresses;
use crate::config::NetConf;
use crate::error::{CniError, CniResult, Code};

/// Is `path` on a bpf filesystem, or could ferrite create it inside one?
fn bpffs_usable(path: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let mut p = Some(path);
    while let Some(dir) = p {
        if dir.exists() {
            let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
                return false;
            };
            // SAFETY: statfs fills the struct for a valid path.
            let mut st: libc::statfs = unsafe { std::mem::zeroed() };
            let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
            return rc == 0 && st.f_type as i64 == BPF_FS_MAGIC;
        }
        p = dir.parent();
    }
    false
}

pub fn status(conf: &NetConf) -> CniResult<()> {
    if !bpffs_usable(&conf.bpffs_root) {
        return Err(CniError::new(
            Code::NotAvailable,
            format!("no bpf filesystem at {}", conf.bpffs_root.display()),
        )
        .with_details("mount one: mount -t bpf bpf /sys/fs/bpf"));
    }
    if let Ok(Some(dp)) = Datapath::open(&conf.bpffs_root) {
        let used = dp
            .endpoints()
            .map_err(|e| datapath_error("cannot read the endpoint map", &e))?
            .len();
        if used >= ferrite_datapath::MAX_ENDPOINTS {
            return Err(CniError::new(
                Code::NotAvailable,
                format!("the endpoint map is full ({used} endpoints)"),
            ));
        }
    }
    if let Some(pool) = conf.pool()? {
        let store = addresses::open_store(conf).map_err(|e| {
            CniError::new(Code::NotAvailable, "the IPAM store is not usable").with_details(e)
        })?;
        let state = store.read().map_err(|e| {
            CniError::new(Code::NotAvailable, "the IPAM store cannot be read").with_details(e)
        })?;
        let free = state.free_per_set(&pool);
        if let Some(set) = free.iter().position(|f| *f == 0) {
            return Err(CniError::new(
                Code::NotAvailable,
                format!("range set {set} has no free address"),
            ));
        }
        // An ADD must be able to write the store.
        let probe = conf
            .state_dir
            .join("ipam")
            .join(&conf.name)
            .join(".status-probe");
        std::fs::write(&probe, b"")
            .and_then(|()| std::fs::remove_file(&probe))
            .map_err(|e| {
                CniError::new(
                    Code::NotAvailable,
                    format!(
                        "state directory {} is not writable",
                        conf.state_dir.display()
                    ),
                )
                .with_details(e)
            })?;
    }
    Ok(())
}
