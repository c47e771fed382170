// SPDX-License-Identifier: Apache-2.0
//! The built `ferrite` run by a person (no CNI_COMMAND): what a usage error,
//! help and a failing command print, where, and how they exit; and that
//! with CNI_COMMAND set none of the admin command line is looked at.
//! Unprivileged.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use ferrite_test_support::TempDir;

fn ferrite(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferrite"))
        .args(args)
        .env_remove("CNI_COMMAND")
        .stdin(Stdio::null())
        .output()
        .expect("running ferrite")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Exit 2, nothing on stdout, stderr naming `named`.
fn assert_usage_error(args: &[&str], named: &str) {
    let out = ferrite(args);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
    assert!(out.stdout.is_empty(), "{args:?}: {out:?}");
    let err = text(&out.stderr);
    assert!(err.contains(named), "{args:?}: {err}");
}

#[test]
fn a_misspelt_flag_is_refused_by_name() {
    // Before, this printed the default root's counters.
    assert_usage_error(&["stats", "--bpffs-rot", "X"], "unknown flag --bpffs-rot");
    let err = text(&ferrite(&["stats", "--bpffs-rot", "X"]).stderr);
    assert!(
        err.contains("usage: ferrite stats [--bpffs-root DIR]"),
        "{err}"
    );
    for args in [
        &["version", "--bogus"][..],
        &["failpoints", "--bogus"],
        &["datapath", "load", "--bogus"],
        &["datapath", "uplink", "lo", "--bogus"],
        &["datapath", "uplink-off", "lo", "--bogus"],
        &["repair", "--conf", "/x", "--bogus"],
        &["allocations", "--network", "n", "--bogus"],
    ] {
        assert_usage_error(args, "unknown flag --bogus");
    }
}

#[test]
fn stray_arguments_and_missing_values_are_refused() {
    assert_usage_error(&["stats", "extra"], "unexpected argument \"extra\"");
    assert_usage_error(
        &["datapath", "uplink", "a", "b"],
        "unexpected argument \"b\"",
    );
    assert_usage_error(&["allocations"], "--network is required");
    assert_usage_error(&["repair"], "--conf FILE is required");
    assert_usage_error(&["stats", "--bpffs-root"], "--bpffs-root needs a value");
    assert_usage_error(&["nothing"], "unknown command \"nothing\"");
    // Nothing asked: the overview, on stderr.
    assert_usage_error(&[], "ferrite datapath uplink DEV");
}

#[test]
fn help_goes_to_stdout() {
    for (args, shows) in [
        (&["--help"][..], "ferrite allocations --network NAME"),
        (&["-h"], "ferrite repair --conf FILE"),
        (&["help"], "ferrite stats [--bpffs-root DIR]"),
        (
            &["stats", "--help"],
            "usage: ferrite stats [--bpffs-root DIR]",
        ),
        (&["help", "repair"], "usage: ferrite repair --conf FILE"),
        (
            &["datapath", "--help"],
            "usage: ferrite datapath uplink-off DEV",
        ),
        (&["datapath", "uplink", "-h"], "--cluster-cidr CIDR"),
        (&["allocations", "--help"], "--state-dir DIR"),
        (&["version", "--help"], "usage: ferrite version"),
    ] {
        let out = ferrite(args);
        assert!(out.status.success(), "{args:?}: {out:?}");
        assert!(text(&out.stdout).contains(shows), "{args:?}: {out:?}");
        assert!(out.stderr.is_empty(), "{args:?}: {out:?}");
    }
}

#[test]
fn commands_still_run() {
    let out = ferrite(&["version"]);
    assert!(out.status.success());
    assert!(text(&out.stdout).starts_with("ferrite "), "{out:?}");
    let out = ferrite(&["failpoints"]);
    assert!(
        text(&out.stdout).lines().any(|l| l == "add-allocated"),
        "{out:?}"
    );
    // A command that fails (rather than a command line that is wrong)
    // exits 1.
    let empty = TempDir::new("admin-cli").unwrap();
    let root = empty.join("bpf");
    let out = ferrite(&["stats", "--bpffs-root", root.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(text(&out.stderr).contains("no datapath pinned"), "{out:?}");
    let out = ferrite(&[
        "allocations",
        "--network",
        "none",
        "--state-dir",
        empty.path().to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
}

/// The runtime's call: CNI_COMMAND set, whatever the arguments. The result
/// JSON, never a usage error.
#[test]
fn the_cni_path_ignores_the_command_line() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferrite"))
        .args(["stats", "--bpffs-rot", "X"])
        .env("CNI_COMMAND", "VERSION")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running ferrite");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(br#"{"cniVersion":"1.0.0"}"#)
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON");
    assert_eq!(v["cniVersion"], "1.0.0");
    assert!(v["supportedVersions"].is_array(), "{v}");
    assert!(out.stderr.is_empty(), "{out:?}");
}
