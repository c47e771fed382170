//! Guards and helpers: a private bpffs per test, a private netns per test
//! (on its own thread), pods with addresses and MACs.

use std::{
    ffi::CString,
    net::IpAddr,
    os::unix::ffi::OsStrExt,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use ferrite_datapath::{Datapath, Endpoint, LoadOutcome};

/// Whether privileged tests can run; under CI=true a skip is a failure.
pub fn privileged(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: needs root, and CI=true forbids skipping");
    }
    eprintln!("skipping {test}: needs root (bpffs mount, BPF_PROG_LOAD, netns)");
    false
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A unique name for a test's resources.
pub fn unique(test: &str) -> String {
    format!(
        "ferrite-dp-{test}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A private bpf filesystem mounted on a fresh directory; unmounted and
/// removed on drop.
pub struct Bpffs {
    dir: PathBuf,
}

impl Bpffs {
    pub fn mount(test: &str) -> Self {
        let dir = std::env::temp_dir().join(unique(test));
        std::fs::create_dir(&dir).expect("mkdir bpffs mountpoint");
        let target = CString::new(dir.as_os_str().as_bytes()).unwrap();
        // SAFETY: NUL-terminated strings, no data.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                target.as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            let _ = std::fs::remove_dir(&dir);
            panic!("mount -t bpf bpf {}: {e}", dir.display());
        }
        Self { dir }
    }

    /// The root ferrite is given: a not-yet-existing directory in the mount.
    pub fn root(&self) -> PathBuf {
        self.dir.join("ferrite")
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let target = CString::new(self.dir.as_os_str().as_bytes()).unwrap();
        // SAFETY: NUL-terminated path.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        let _ = std::fs::remove_dir(&self.dir);
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
