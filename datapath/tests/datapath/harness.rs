//! Guards and helpers: a private bpffs per test, a private netns per test
//! (on its own thread), pods with addresses and MACs.

use std::{net::IpAddr, path::PathBuf, process::Command};

use ferrite_datapath::{Datapath, Endpoint, LoadOutcome};

pub use ferrite_test_support::{privileged, TempDir};

/// A private bpf filesystem mounted on a fresh directory; unmounted and
/// removed on drop.
pub struct Bpffs(TempDir);

impl Bpffs {
    pub fn mount(test: &str) -> Self {
        Self(TempDir::bpffs(test).unwrap_or_else(|e| panic!("{test}: {e}")))
    }

    /// The root ferrite is given: a not-yet-existing directory in the mount.
    pub fn root(&self) -> PathBuf {
        self.0.join("ferrite")
    }
}

/// Runs `f` on a new thread inside a new network namespace; the namespace
/// goes away with the thread, and the test runner's threads never enter it.
pub fn in_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: affects only this thread (CLONE_NEWNET on a thread is per-task).
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            panic!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
        }
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// A mounted bpffs with the datapath loaded in it.
pub struct Loaded {
    pub dp: Datapath,
    /// Keeps the mount alive as long as the handles.
    pub _bpffs: Bpffs,
}

pub fn load(test: &str) -> Loaded {
    let bpffs = Bpffs::mount(test);
    let (dp, outcome) = Datapath::open_or_load(&bpffs.root()).expect("open_or_load");
    assert_eq!(outcome, LoadOutcome::Loaded);
    Loaded { dp, _bpffs: bpffs }
}

/// A pod as the tests see it.
#[derive(Clone, Copy, Debug)]
pub struct Pod {
    pub ip: IpAddr,
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub host_mac: [u8; 6],
}

impl Pod {
    pub fn new(ip: &str, ifindex: u32, n: u8) -> Self {
        Self {
            ip: ip.parse().unwrap(),
            ifindex,
            mac: [0x02, 0, 0, 0, 0xa0, n],
            host_mac: [0x02, 0, 0, 0, 0xb0, n],
        }
    }

    pub fn endpoint(&self) -> Endpoint {
        Endpoint {
            ifindex: self.ifindex,
            flags: 0,
            pod_mac: self.mac,
            host_mac: self.host_mac,
        }
    }

    pub fn add_to(&self, dp: &Datapath) -> Self {
        dp.upsert_endpoint(self.ip, &self.endpoint())
            .expect("upsert_endpoint");
        *self
    }
}

/// Host veths the programs can run "on": BPF_PROG_TEST_RUN needs a real
/// device for each sender. One end of a veth pair each, in the test's netns.
pub fn devices(n: usize) -> Vec<u32> {
    (0..n)
        .map(|i| {
            let (a, b) = (format!("pv{i}"), format!("pw{i}"));
            let st = Command::new("ip")
                .args(["link", "add", &a, "type", "veth", "peer", "name", &b])
                .status()
                .expect("ip link add");
            assert!(st.success(), "ip link add {a}");
            let name = std::ffi::CString::new(a).unwrap();
            // SAFETY: a valid NUL-terminated name.
            let idx = unsafe { libc::if_nametoindex(name.as_ptr()) };
            assert_ne!(idx, 0, "ifindex of pv{i}");
            idx
        })
        .collect()
}
