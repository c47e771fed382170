# SPDX-License-Identifier: Apache-2.0
"""scripts/bench --experiments: where the same-node data plane's time goes.

Two ferrite pods on one node namespace per variant, each variant one change
from ferrite as it ships, all measured in one run with loopback as the
ceiling, in rotating order:

  baseline  ferrite as it ships (clsact, bpf_redirect_peer)
  tcx       attached with TCX instead of clsact (what a chained bandwidth
            plugin gets: "chainedBandwidth": true)
  redirect  bpf_redirect out of the destination's host veth instead of
            bpf_redirect_peer (a build with FERRITE_PLAIN_REDIRECT)
  big-tcp   ferrite's bigTcp: IPv4 GSO and GRO maximum 196,608 bytes on
            both ends of both pods' veths
  gro       GRO on the host veths (veth's NAPI receive path)
  rps       the host veths' and pods' receive queues spread by flow hash
            over every CPU (RPS)
  xdp       an XDP program that passes everything, native, on the host veths

Per variant and repetition: iperf3 throughput and retransmits, the sender's
duplicate-SACKed segments (retransmits the receiver already had) and the
softnet backlog drops, then sockperf request/response p50/p99. Then, with
kernel.bpf_stats_enabled (set for that pass only, restored after), the
baseline's programs' run count and nanoseconds per run under each load.
Never asserts. Writes OUT/experiments.json and experiments.md.
"""
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time

XDP_PASS = """#include <linux/bpf.h>
__attribute__((section("xdp"), used)) int pass(struct xdp_md *ctx) { return XDP_PASS; }
char _license[] __attribute__((section("license"), used)) = "GPL";
"""

def variants(all_cpus: str):
    """(name, what, conf change, build, knob): knob(sh, node, pods, host_veths)."""
    def gro(sh, node, pods, veths):
        for v in veths:
            sh(f"ip netns exec {node} ethtool -K {v} gro on")

    def rps(sh, node, pods, veths):
        for ns, dev in [(node, v) for v in veths] + [(p, "eth0") for p in pods]:
            sh(f"ip netns exec {ns} sh -c 'echo {all_cpus} > /sys/class/net/{dev}/queues/rx-0/rps_cpus'")

    def xdp(obj):
        def attach(sh, node, pods, veths):
            for v in veths:
                sh(f"ip -n {node} link set dev {v} xdpdrv obj {obj} sec xdp")
        return attach

    return [
        ("baseline", "ferrite as it ships: clsact, bpf_redirect_peer", {}, None, None),
        ("tcx", "attached with TCX instead of clsact", {"chainedBandwidth": True}, None, None),
        ("redirect", "bpf_redirect out of the destination's host veth, not redirect_peer", {}, "redirect", None),
        ("big-tcp", "bigTcp: IPv4 GSO/GRO maximum 196,608 bytes on the pods' veths", {"bigTcp": True}, None, None),
        ("gro", "GRO on the host veths (veth's NAPI path)", {}, None, gro),
        ("rps", "RPS by flow hash over every CPU on the host veths and pods", {}, None, rps),
        ("xdp", "XDP_PASS, native, on the host veths", {}, None, xdp),
    ]


def tcp_counters(ns: str, sh) -> dict:
    """RetransSegs and TCPDSACKRecvSegs of a namespace (its /proc/net)."""
    out = {}
    for f in ("snmp", "netstat"):
        lines = sh(f"ip netns exec {ns} cat /proc/net/{f}").splitlines()
        for head, vals in zip(lines[::2], lines[1::2]):
            keys, nums = head.split()[1:], vals.split()[1:]
            for k, v in zip(keys, nums):
                if k in ("RetransSegs", "TCPDSACKRecvSegs"):
                    out[k] = int(v)
    return out


def softnet_drops() -> int:
    with open("/proc/net/softnet_stat") as f:
        return sum(int(line.split()[1], 16) for line in f if line.strip())


def experiments_bench(a, bench):
    """`bench` is scripts/bench's module (Plugin, iperf, sockperf...)."""
    sh, log = bench.sh, bench.log
    for tool in ("ethtool", "iperf3", "sockperf"):
        if not shutil.which(tool):
            sh(f"DEBIAN_FRONTEND=noninteractive apt-get install -y -qq {tool}")
    work = tempfile.mkdtemp(prefix="ferrite-bench-exp-")
    reps = 1 if a.quick else a.reps
    cpus = os.cpu_count() or 1
    all_cpus = format((1 << cpus) - 1, "x")
    xdp_obj = os.path.join(work, "xdp_pass.o")
    with open(os.path.join(work, "xdp_pass.c"), "w") as f:
        f.write(XDP_PASS)
    sh(f"clang -O2 -target bpf -I/usr/include/x86_64-linux-gnu -c {work}/xdp_pass.c -o {xdp_obj}")
    # The redirect variant's binary, in a target directory of its own.
    target = os.path.join(bench.ROOT, "target", "bench-redirect")
    log("bench: experiments: building the FERRITE_PLAIN_REDIRECT variant")
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "ferrite-cni"], cwd=bench.ROOT, check=True,
                   env={**os.environ, "CARGO_TARGET_DIR": target, "FERRITE_BPF_CFLAGS": "-DFERRITE_PLAIN_REDIRECT"})
    builds = {None: bench.ferrite_bin(), "redirect": os.path.join(target, "release/ferrite")}
    r = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "reps": reps, "seconds": a.seconds,
         "rr_seconds": a.rr_seconds, "variants": {}, "loopback": {}}
    setups, lo = {}, f"{bench.TAG}lo"
    stats_before = None
    try:
        sh(f"ip netns add {lo} && ip netns exec {lo} ip link set lo up")
        for i, (name, what, conf, build, knob) in enumerate(variants(all_cpus)):
            if name == "xdp":
                knob = knob(xdp_obj)
            p = bench.Plugin("ferrite", f"10.{150 + i}.0.0/16", work, builds[build], name)
            p.set(**conf)
            bench.warm(p)
            ids = bench.pod_ids(2, "e")
            bench.netns_batch(ids, "add")
            ips, veths = [], []
            with bench.InNetns(p.node):
                for cid in ids:
                    _, ok, out = p.call("ADD", cid)
                    if not ok:
                        raise RuntimeError(f"{name}: ADD failed: {out!r}")
                    res = json.loads(out)
                    ips.append(bench.ip_of(out))
                    veths.append(res["interfaces"][0]["name"])
            setups[name] = (p, ids, ips)
            if knob:
                knob(sh, p.node, ids, veths)
            r["variants"][name] = {"what": what, "gbps": [], "retransmits": [], "dsack_segs": [],
                                   "backlog_drops": [], "rr_p50_us": [], "rr_p99_us": []}
        keys = ["loopback"] + list(setups)
        for rep in range(reps):
            for k in keys[rep % len(keys):] + keys[:rep % len(keys)]:
                log(f"  experiments rep {rep + 1}/{reps}: {k}")
                if k == "loopback":
                    g, retr = bench.iperf(lo, "127.0.0.1", lo, a.seconds)
                    s = bench.sockperf(lo, "127.0.0.1", lo, a.rr_seconds)
                    row = r["loopback"]
                    for col, v in (("gbps", g), ("retransmits", retr), ("rr_p50_us", s.get("p50"))):
                        row.setdefault(col, []).append(v)
                    continue
                _, (server, client), (ip, _) = setups[k]
                c0, d0 = tcp_counters(client, sh), softnet_drops()
                g, retr = bench.iperf(server, ip, client, a.seconds)
                c1, d1 = tcp_counters(client, sh), softnet_drops()
                s = bench.sockperf(server, ip, client, a.rr_seconds)
                row = r["variants"][k]
                row["gbps"].append(g)
                row["retransmits"].append(retr)
                row["dsack_segs"].append(c1.get("TCPDSACKRecvSegs", 0) - c0.get("TCPDSACKRecvSegs", 0))
                row["backlog_drops"].append(d1 - d0)
                row["rr_p50_us"].append(s.get("p50"))
                row["rr_p99_us"].append(s.get("p99"))
        # The baseline's programs, each load on its own, statistics on.
        sys_path = "/proc/sys/kernel/bpf_stats_enabled"
        with open(sys_path) as f:
            stats_before = f.read().strip()
        with open(sys_path, "w") as f:
            f.write("1")
        _, (server, client), (ip, _) = setups["baseline"]
        r["program_cost"] = {}
        for load, run in (("tcp", lambda: bench.iperf(server, ip, client, a.seconds)),
                          ("rr", lambda: bench.sockperf(server, ip, client, a.rr_seconds))):
            s0 = program_stats()
            run()
            r["program_cost"][load] = stats_delta(s0, program_stats())
    finally:
        if stats_before is not None:
            with open("/proc/sys/kernel/bpf_stats_enabled", "w") as f:
                f.write(stats_before)
        for p, ids, _ in setups.values():
            with bench.InNetns(p.node):
                for cid in ids:
                    p.call("DEL", cid)
            bench.netns_batch(ids, "del")
            p.close()
        sh(f"ip netns del {lo}", check=False)
        shutil.rmtree(work, ignore_errors=True)
    write(r, a.out)


# -- program statistics (bpf(2): BPF_PROG_GET_NEXT_ID, _GET_FD_BY_ID, OBJ_GET_INFO_BY_FD)

PROGRAMS = ("from_pod", "to_pod", "from_uplink", "to_uplink")


def program_stats() -> dict:
    """(name, id) -> (run_time_ns, run_cnt) of every loaded program named
    as one of ferrite's."""
    import ctypes
    import struct
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    sys_bpf = 321  # x86_64

    def bpf(cmd, attr):
        buf = ctypes.create_string_buffer(attr, 128)
        return libc.syscall(sys_bpf, cmd, buf, 128), buf

    out, prog_id = {}, 0
    while True:
        rc, buf = bpf(11, struct.pack("II", prog_id, 0))
        if rc != 0:
            return out
        prog_id = struct.unpack_from("II", buf.raw)[1]
        fd, _ = bpf(13, struct.pack("III", prog_id, 0, 0))
        if fd < 0:
            continue
        info = ctypes.create_string_buffer(256)
        rc, _ = bpf(15, struct.pack("IIQ", fd, 256, ctypes.addressof(info)))
        os.close(fd)
        # bpf_prog_info: name at 64 (16 bytes), run_time_ns and run_cnt at 192.
        name = info.raw[64:80].split(b"\0")[0].decode()
        if rc == 0 and name in PROGRAMS:
            out[(name, prog_id)] = struct.unpack_from("QQ", info.raw, 192)


def stats_delta(before: dict, after: dict) -> dict:
    """Program name -> {"runs", "ns_per_run"} between two snapshots."""
    acc = {}
    for key, (ns, runs) in after.items():
        ns0, runs0 = before.get(key, (0, 0))
        a = acc.setdefault(key[0], [0, 0])
        a[0] += runs - runs0
        a[1] += ns - ns0
    return {k: {"runs": n, "ns_per_run": t / n} for k, (n, t) in acc.items() if n}


def write(r: dict, out: str):
    def med(xs):
        xs = [x for x in xs if x is not None]
        return statistics.median(xs) if xs else float("nan")

    lo = r["loopback"]
    base = r["variants"]["baseline"]
    rows = [f"| loopback in one netns (ceiling) | {med(lo['gbps']):.2f} | | {med(lo['retransmits']):.0f} | | | "
            f"{med(lo['rr_p50_us']):.2f} | |"]
    for name, v in r["variants"].items():
        rows.append(
            f"| {name}: {v['what']} | {med(v['gbps']):.2f} | {med(v['gbps']) / med(base['gbps']):.3f} | "
            f"{med(v['retransmits']):.0f} | {med(v['dsack_segs']):.0f} | {med(v['backlog_drops']):.0f} | "
            f"{med(v['rr_p50_us']):.2f} | {med(v['rr_p50_us']) / med(base['rr_p50_us']):.3f} |")
    cost = "\n".join(f"| {load} | {name} | {c['runs']} | {c['ns_per_run']:.0f} |"
                     for load, progs in r.get("program_cost", {}).items() for name, c in progs.items())
    md = f"""# Data plane experiments, {r['date']}

Two pods on one node per variant, each one change from ferrite as it ships; {r['reps']} repetitions in rotating
order, iperf3 {r['seconds']} s and sockperf ping-pong {r['rr_seconds']} s each, medians. Retransmits: iperf3's;
DSACK segments: retransmitted segments the receiver reported it already had (the sender's TCPDSACKRecvSegs);
backlog drops: /proc/net/softnet_stat.

| variant | TCP Gbit/s | / baseline | retransmits | DSACK segments | backlog drops | RR p50 µs | / baseline |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

The baseline's programs with kernel.bpf_stats_enabled (a pass of its own; the statistics cost two clock reads per run):

| load | program | runs | ns per run |
|---|---|---|---|
{cost}
"""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "experiments.json"), "w") as f:
        json.dump(r, f, indent=1)
    with open(os.path.join(out, "experiments.md"), "w") as f:
        f.write(md)
    print(md)  # noqa: T201 (the benchmark's report)

