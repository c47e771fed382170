//! clsact + cls_bpf on real veths (made with `ip` in a private netns).

use std::{ffi::CString, process::Command};

use ferrite_datapath::{AttachMode, Attachment, Datapath};

use crate::harness::{in_netns, load, privileged, Bpffs};

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ifindex(name: &str) -> u32 {
    let c = CString::new(name).unwrap();
    // SAFETY: NUL-terminated name.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(i, 0, "{name}: {}", std::io::Error::last_os_error());
    i
}

/// Makes `n` veth pairs in the current (private) netns; returns the ifindexes
/// of the host-side ends.
pub fn make_veths(prefix: &str, n: u32) -> Vec<u32> {
    (0..n)
        .map(|i| {
            let (host, peer) = (format!("{prefix}h{i}"), format!("{prefix}p{i}"));
            ip(&["link", "add", &host, "type", "veth", "peer", "name", &peer]);
            ifindex(&host)
        })
        .collect()
}

fn filters(dev: &str, dir: &str) -> String {
    let out = Command::new("tc")
        .args(["filter", "show", "dev", dev, dir])
        .output()
        .expect("run tc");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn attach_reports_both_directions_and_repeats_in_place() {
    if !privileged("attach_reports_both_directions_and_repeats_in_place") {
        return;
    }
    in_netns(|| {
        let t = load("attach");
        let veth = make_veths("fa", 1)[0];
        assert_eq!(t.dp.attachment(veth).unwrap(), Attachment::default());

        t.dp.attach(veth, AttachMode::Clsact).unwrap();
        let both = Attachment {
            ingress: true,
            egress: true,
        };
        assert_eq!(t.dp.attachment(veth).unwrap(), both);

        t.dp.attach(veth, AttachMode::Clsact).unwrap();
        assert_eq!(t.dp.attachment(veth).unwrap(), both);
        for dir in ["ingress", "egress"] {
            let shown = filters("fah0", dir);
            assert_eq!(shown.matches("direct-action").count(), 1, "{dir}: {shown}");
        }

        // Programs of another load (another root) are not this one's.
        let other = Bpffs::mount("attach-other");
        let (other_dp, _) = Datapath::open_or_load(&other.root()).unwrap();
        assert_eq!(other_dp.attachment(veth).unwrap(), Attachment::default());
        other_dp.attach(veth, AttachMode::Clsact).unwrap();
        assert_eq!(
            t.dp.attachment(veth).unwrap(),
            Attachment::default(),
            "replaced by the other load"
        );
        assert_eq!(other_dp.attachment(veth).unwrap(), both);
    });
}

#[test]
fn attach_to_a_missing_device_fails() {
    if !privileged("attach_to_a_missing_device_fails") {
        return;
    }
    in_netns(|| {
        let t = load("attach-missing");
        let err = t.dp.attach(4242, AttachMode::Clsact).unwrap_err();
        assert!(err.to_string().contains("ifindex 4242"), "{err}");
    });
}
