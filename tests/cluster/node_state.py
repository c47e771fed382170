#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""What ferrite puts on a node, one line per thing, run inside the node's
namespaces: conflists (sha256, mtime), CNI binaries (sha256), routes of
ferrite's node protocol (71), the `inet ferrite` nftables table (its rules),
the node's bpffs (pins, with their inodes: a re-pin is a new inode) and the
programs attached with TCX to the uplink.

scripts/cluster up records it before ferrite is installed
($D/state-before-NODE); the suite compares it after the uninstall, and
around an agent's replacement (which must change none of it). One program
for both, so the two sides always agree on the format.

    node_state.py [UPLINK]      (default eth0)
"""
import ctypes
import hashlib
import os
import socket
import struct
import subprocess
import sys


def sha16(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def visible(d):
    try:
        return sorted(n for n in os.listdir(d) if not n.startswith("."))
    except FileNotFoundError:
        return []


def tcx_programs(dev):
    """bpf(BPF_PROG_QUERY) for BPF_TCX_INGRESS / BPF_TCX_EGRESS (Linux 6.6):
    bpftool 7.1 cannot list TCX links."""
    nr = {"x86_64": 321, "aarch64": 280}[os.uname().machine]
    libc = ctypes.CDLL(None, use_errno=True)
    ifindex = socket.if_nametoindex(dev)
    for hook, attach_type in (("ingress", 46), ("egress", 47)):
        ids = (ctypes.c_uint32 * 64)()
        attr = ctypes.create_string_buffer(72)
        struct.pack_into("=IIIIQI", attr, 0, ifindex, attach_type, 0, 0, ctypes.addressof(ids), 64)
        if libc.syscall(ctypes.c_long(nr), ctypes.c_long(16), attr, ctypes.c_long(72)) != 0:
            yield f"tcx {dev} {hook} query failed: {os.strerror(ctypes.get_errno())}"
            continue
        count = struct.unpack_from("=I", attr, 24)[0]
        if count:
            yield f"tcx {dev} {hook} programs {' '.join(str(i) for i in ids[:count])}"


def lines(prefix, argv):
    out = subprocess.run(argv, capture_output=True, text=True)
    if out.returncode != 0:
        return []
    return [f"{prefix} {line}" for line in out.stdout.splitlines()]


def main():
    dev = sys.argv[1] if len(sys.argv) > 1 else "eth0"
    out = []
    for name in visible("/etc/cni/net.d"):
        p = os.path.join("/etc/cni/net.d", name)
        if os.path.isfile(p):
            out.append(f"conflist {name} {sha16(p)} {os.stat(p).st_mtime_ns}")
    for name in visible("/opt/cni/bin"):
        p = os.path.join("/opt/cni/bin", name)
        if os.path.isfile(p):
            out.append(f"cni-bin {name} {sha16(p)}")
    out += lines("route", ["ip", "-4", "route", "show", "table", "all", "proto", "71"])
    out += lines("route", ["ip", "-6", "route", "show", "table", "all", "proto", "71"])
    out += lines("nft", ["nft", "list", "table", "inet", "ferrite"])
    pins = []
    for root, dirs, files in os.walk("/sys/fs/bpf"):
        for name in dirs + files:
            p = os.path.join(root, name)
            pins.append(f"bpffs {os.path.relpath(p, '/sys/fs/bpf')} {os.lstat(p).st_ino}")
    out += sorted(pins)
    out += tcx_programs(dev)
    print("\n".join(out))


if __name__ == "__main__":
    main()
