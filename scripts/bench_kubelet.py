# SPDX-License-Identifier: Apache-2.0
"""scripts/bench --kubelet: the seed's experiment through a real kubelet.
On a one-node cluster (scripts/cluster up --nodes 1, containerd logging at
debug level), 100 pods pinned to the node are created at once (one
`kubectl apply` of a List), three times with each network: ferrite as
deploy/ installs it (serving hostPorts itself: no portmap in its chain),
then the reference plugins as kindnet installs them
(ptp + host-local + portmap), then bridge + host-local with ipMasq (+
portmap), each in a conflist of its own after ferrite's DaemonSet is
deleted. An unmeasured round comes first (the first pods on the node also
unpack the image).

Per pod, from containerd's own log (nanosecond timestamps): RunPodSandbox
from its request to its return, and the CNI set-up inside it (containerd's
"begin cni setup" to its "cni result": the loopback plugin, then the
network's chain); and, from the API server, the time from the pod's
creation to its Ready condition. P50/P95/P99 of each, per network, and the network's share of pod start-up (CNI set-up over
creation to Ready, per pod, median). Creation and Ready are when a list of
the namespace's pods (every 20 ms, on a kept-open connection) first shows
the pod and first shows it Ready. Takes about 20 minutes; never
asserts. Writes OUT/kubelet.json, kubelet.md and kubelet-cdf.svg.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "cluster"))
sys.path.insert(0, str(ROOT / "scripts"))

import harness  # noqa: E402  (tests/cluster's)
from bench_services import Api, pct  # noqa: E402
from quiet import settle, waited  # noqa: E402

PODS = 100
REF = Path("/usr/lib/cni")

PTP = {"type": "ptp", "ipMasq": False, "mtu": 1500}
BRIDGE = {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": True, "mtu": 1500}
MAINS = {"ferrite": None, "ptp": PTP, "bridge": BRIDGE}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# The reference plugins a node gets for the ptp and bridge networks.
REF_PLUGINS = ("ptp", "bridge", "host-local", "portmap", "loopback")


def conflist(name: str, main: dict, subnet: str) -> dict:
    """A kindnet-style conflist: `main` with host-local on the node's
    pod CIDR, then portmap."""
    m = dict(main)
    m["ipam"] = {"type": "host-local", "ranges": [[{"subnet": subnet}]], "routes": [{"dst": "0.0.0.0/0"}]}
    return {"cniVersion": "0.3.1", "name": name,
            "plugins": [m, {"type": "portmap", "capabilities": {"portMappings": True}}]}


class PodTimes:
    """Pods of a namespace as the API server reports them: when each was
    first seen and first seen Ready, by this process's clock. Lists the
    namespace's pods every 20 ms over a kept-open connection (a list of
    100 pods takes a few milliseconds)."""

    def __init__(self, c: harness.Cluster, ns: str):
        self.seen, self.ready = {}, {}
        self.api, self.ns = Api(c), ns
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()

    def poll(self):
        while not self.stop.is_set():
            self.api.conn.request("GET", f"/api/v1/namespaces/{self.ns}/pods")
            r = self.api.conn.getresponse()
            body = r.read()
            now = time.monotonic()
            if r.status == 200:
                for o in json.loads(body).get("items", []):
                    name = o["metadata"]["name"]
                    self.seen.setdefault(name, now)
                    conds = o.get("status", {}).get("conditions") or []
                    if any(x.get("type") == "Ready" and x.get("status") == "True" for x in conds):
                        self.ready.setdefault(name, now)
            time.sleep(0.02)

    def close(self):
        self.stop.set()
        self.thread.join(timeout=15)
        self.api.conn.close()


TS = re.compile(r'^time="([^"]+)" level=(\w+) msg="((?:[^"\\]|\\.)*)"(?: (.*))?$')
META = re.compile(r"PodSandboxMetadata\{Name:([^,]+),Uid:[^,]*,Namespace:([^,]+),")
SBID = re.compile(r'returns sandbox id \\"([0-9a-f]+)\\"')
PSID = re.compile(r"podsandboxid=([0-9a-f]+)")


def stamp(s: str) -> float:
    """containerd's RFC 3339 time with nanoseconds, as seconds."""
    m = re.match(r"(.*T\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$", s)
    if not m:
        raise ValueError(s)
    base, frac, tz = m.groups()
    t = datetime.fromisoformat(base + ("+00:00" if tz == "Z" else tz)).timestamp()
    return t + (int(frac) / 10 ** len(frac) if frac else 0.0)


FERRITE_OK = re.compile(r"^(\d+\.\d+) INFO \[\d+\] ADD net=\S+ cid=([0-9a-f]+) if=\S+ ok in ([\d.]+) ms$")


def plugin_times(logfile: Path) -> dict:
    """sandbox id -> (start, end) in seconds of wall time, from ferrite's
    own log ("ok in N ms", written as its ADD returns)."""
    out = {}
    if logfile.exists():
        for line in logfile.read_text(errors="replace").splitlines():
            m = FERRITE_OK.match(line)
            if m:
                end, took = float(m.group(1)), float(m.group(3)) / 1000
                out[m.group(2)] = (end - took, end)
    return out


def sandbox_times(logfile: Path, ns: str, plugin: dict = None) -> dict:
    """pod name -> {"sandbox_ms", "cni_ms"} from containerd's log, and with
    `plugin` (ferrite's own ADD times by sandbox id) "plugin_ms" (ferrite's
    ADD inside it), "before_ms" (CNI set-up begun to ferrite's ADD begun:
    the loopback plugin, ferrite's exec and parsing) and "after_ms"
    (ferrite's ADD done to CNI set-up done: its exit, then portmap where
    the conflist chains it: deploy/'s does not since hostPorts moved into
    the datapath)."""
    start, end, ids, cni0, cni1 = {}, {}, {}, {}, {}
    for line in logfile.read_text(errors="replace").splitlines():
        m = TS.match(line)
        if not m:
            continue
        t, msg, rest = stamp(m.group(1)), m.group(3), m.group(4) or ""
        if msg.startswith("RunPodSandbox for &PodSandboxMetadata"):
            meta = META.search(msg)
            if not meta or meta.group(2) != ns:
                continue
            name = meta.group(1)
            sb = SBID.search(msg)
            if sb:
                end[name] = t
                ids[sb.group(1)] = name
            else:
                start.setdefault(name, t)
        elif msg == "begin cni setup" or msg.startswith("cni result:"):
            p = PSID.search(rest)
            if p:
                (cni0 if msg == "begin cni setup" else cni1)[p.group(1)] = t
    out = {}
    for sid, name in ids.items():
        if name in start and sid in cni0 and sid in cni1:
            out[name] = {"sandbox_ms": (end[name] - start[name]) * 1000,
                         "cni_ms": (cni1[sid] - cni0[sid]) * 1000}
            if plugin and sid in plugin:
                p0, p1 = plugin[sid]
                out[name].update(plugin_ms=(p1 - p0) * 1000, before_ms=(p0 - cni0[sid]) * 1000,
                                 after_ms=(cni1[sid] - p1) * 1000)
    return out


class Bench:
    def __init__(self, c: harness.Cluster):
        self.c = c
        self.node = c.first
        self.netd = c.node_dir(self.node) / "fs/etc/cni/net.d"
        self.bin = c.node_dir(self.node) / "fs/opt/cni/bin"
        self.containerd_log = c.dir / "logs" / f"containerd-{self.node}.log"
        self.plugin_log = c.node_dir(self.node) / "fs/var/log/ferrite/cni.log"

    def pods(self, ns: str) -> list:
        return [harness.pod_manifest(f"p-{i:03d}", ns, node=self.node, command="exec sleep 1000000", ports=())
                for i in range(PODS)]

    def run(self, network: str, n: int) -> dict:
        c, ns = self.c, f"kb-{network}-{n}"
        c.namespace(ns)
        quiet = settle()
        w = PodTimes(c, ns)
        try:
            t0 = time.monotonic()
            c.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                            "items": self.pods(ns)}), timeout=120)
            applied = time.monotonic() - t0
            harness.wait_for(f"{PODS} pods Ready ({network}, run {n})", 600,
                             lambda: len(w.ready) >= PODS, interval=0.2)
            wall = max(w.ready.values()) - t0
        finally:
            w.close()
        sb = sandbox_times(self.containerd_log, ns, plugin_times(self.plugin_log))
        pods = {}
        for name, seen in w.seen.items():
            if name in w.ready and name in sb:
                pods[name] = {**sb[name], "ready_ms": (w.ready[name] - seen) * 1000}
        log(f"    {network} run {n}: {len(pods)} pods measured, all Ready {wall:.1f} s after the apply "
            f"(which took {applied:.1f} s)")
        t1 = time.monotonic()
        c.kubectl("delete", "namespace", ns, "--wait=true", "--timeout=300s", timeout=330)
        log(f"    deleted in {time.monotonic() - t1:.1f} s")
        return {"pods": pods, "all_ready_s": wall, "apply_s": applied, "missing": PODS - len(pods), **quiet}

    def install(self, binary: Path):
        """`binary` as the node's ferrite plugin, replaced in one rename."""
        tmp = self.bin / ".ferrite.ab"
        shutil.copy2(binary, tmp)
        tmp.rename(self.bin / "ferrite")

    def alternate(self, other: Path, runs: int) -> tuple:
        """`runs` runs each of the installed ferrite and of `other`, in
        turns (A B B A ...: both meet the same moments of the machine, and
        neither always goes first); the installed plugin is back in place
        at the end."""
        this = self.bin.parent / ".ferrite.this"
        shutil.copy2(self.bin / "ferrite", this)
        mine, theirs = [], []
        turns = [(this, "ferrite", mine), (other, "ferrite-ab", theirs)]
        try:
            for n in range(1, runs + 1):
                for binary, name, out in turns if n % 2 else turns[::-1]:
                    self.install(binary)
                    out.append(self.run(name, n))
        finally:
            self.install(this)
            this.unlink()
        return mine, theirs

    def use_reference(self, name: str, main: dict):
        """ferrite's DaemonSet gone (once), and only `name`'s conflist."""
        c = self.c
        if c.get("daemonsets", "-l", "app.kubernetes.io/name=ferrite", namespace="kube-system")["items"]:
            c.kubectl("delete", "-f", str(c.deploy_dir), "--wait=true", "--timeout=120s", timeout=150)
            harness.wait_for("ferrite's agent gone", 120, lambda: not c.get(
                "pods", "-l", "app.kubernetes.io/name=ferrite", namespace="kube-system")["items"])
        for p in REF_PLUGINS:
            if not (self.bin / p).exists():
                shutil.copy2(REF / p, self.bin / p)
        for f in self.netd.glob("*.conflist"):
            f.unlink()
        subnet = c.podcidr(self.node)
        tmp = self.netd / f".{name}.tmp"
        tmp.write_text(json.dumps(conflist(name, main, subnet), indent=1))
        tmp.rename(self.netd / f"10-{name}.conflist")
        # containerd reloads on the file's change; a pod started too early
        # would still get the old network: give it a moment, then check.
        time.sleep(3)
        harness.wait_for(f"{self.node} Ready with {name}", 60, lambda: c.node_ready(self.node))


def summarize(runs: list) -> dict:
    pods = [p for r in runs for p in r["pods"].values()]
    out = {"pods": len(pods), "missing": sum(r["missing"] for r in runs),
           "all_ready_s": [r["all_ready_s"] for r in runs]}
    for k in ("sandbox_ms", "cni_ms", "ready_ms", "plugin_ms", "before_ms", "after_ms"):
        xs = [p[k] for p in pods if k in p]
        if xs:
            out[k] = {"p50": pct(xs, 50), "p95": pct(xs, 95), "p99": pct(xs, 99), "all": sorted(xs), "n": len(xs)}
    shares = sorted(p["cni_ms"] / p["ready_ms"] for p in pods if p["ready_ms"] > 0)
    out["share_p50"] = pct(shares, 50)
    return out


def inside_table(who: str, f: dict) -> str:
    """Where `who`'s CNI set-up goes, by ferrite's own log."""
    if "plugin_ms" not in f:
        return ""
    part = [("ferrite's ADD, from its own log (the process's main to its answer)", "plugin_ms"),
            ("CNI set-up begun to ferrite's ADD begun (the loopback plugin, ferrite's exec)", "before_ms"),
            ("ferrite's ADD answered to CNI set-up done (ferrite's exit; portmap if chained)", "after_ms")]
    return (f"Inside {who}'s CNI set-up (n = {f['plugin_ms']['n']}):\n\n| part | p50 ms | p95 | p99 |\n"
            "|---|---|---|---|\n" + "\n".join(
                f"| {what} | {f[k]['p50']:.2f} | {f[k]['p95']:.2f} | {f[k]['p99']:.2f} |" for what, k in part)
            + "\n\n")


def write(r: dict, out: str, bench):
    """The report; `bench` is scripts/bench's module (its CDF pictures)."""
    nets = r["networks"]
    rows = []
    for name, s in nets.items():
        rows.append(f"| {name} | {s['pods']} | {s['sandbox_ms']['p50']:.1f} | {s['sandbox_ms']['p95']:.1f} | "
                    f"{s['sandbox_ms']['p99']:.1f} | {s['cni_ms']['p50']:.2f} | {s['cni_ms']['p95']:.2f} | "
                    f"{s['cni_ms']['p99']:.2f} | {s['ready_ms']['p50']:.0f} | {s['ready_ms']['p95']:.0f} | "
                    f"{s['ready_ms']['p99']:.0f} | {100 * s['share_p50']:.1f} % |")
    f = nets.get("ferrite", {})
    inside = "".join(inside_table(who, nets[who]) for who in ("ferrite", "ferrite-ab") if who in nets)
    ratios = []
    if "ferrite-ab" in nets and f:
        g = nets["ferrite-ab"]
        ratios.append(f"ferrite-ab is {r['ab']}; this build's / its: CNI set-up P95 "
                      f"{f['cni_ms']['p95'] / g['cni_ms']['p95']:.3f}, ferrite's own ADD P95 "
                      f"{f['plugin_ms']['p95'] / g['plugin_ms']['p95']:.3f}")
    per_run = ""
    for who in ("ferrite", "ferrite-ab"):
        ps = [[p["plugin_ms"] for p in run["pods"].values() if "plugin_ms" in p] for run in r["raw"].get(who, [])]
        if any(ps):
            per_run += (f"\n{who}'s own ADD per run, p50 / p95 / max ms (ADDs over a second): " + "; ".join(
                f"{pct(xs, 50):.0f} / {pct(xs, 95):.0f} / {max(xs):.0f} ({sum(x > 1000 for x in xs)})"
                for xs in ps if xs) + ".\n")
    for ref in ("bridge", "ptp"):
        if ref in nets and f:
            ratios.append(f"ferrite's CNI set-up P95 / {ref}'s: {f['cni_ms']['p95'] / nets[ref]['cni_ms']['p95']:.3f}; "
                          f"RunPodSandbox P95: {f['sandbox_ms']['p95'] / nets[ref]['sandbox_ms']['p95']:.3f}")
    waits = ", ".join(f"{k} {' / '.join(waited(run) for run in r['raw'].get(k, []))}" for k in nets)
    md = f"""# 100 pods at once through kubelet, {r['date']}

{r['machine']}; a one-node cluster (scripts/cluster, Kubernetes v1.20.2, containerd {r.get('containerd', '?')}),
{r['pods']} pods pinned to the node created by one `kubectl apply`, {r['runs']} runs per network, all pods of all runs
together (n = pods measured). RunPodSandbox and CNI set-up from containerd's log; creation to Ready from lists of the pods every 20 ms.

| network | n | RunPodSandbox p50 ms | p95 | p99 | CNI set-up p50 ms | p95 | p99 | creation to Ready p50 ms | p95 | p99 | CNI share of start-up (p50) |
|---|---|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

{chr(10).join('- ' + x for x in ratios)}

{inside}
Every run's last pod Ready after the apply (s): {', '.join(f"{k} {' / '.join(f'{v:.1f}' for v in s['all_ready_s'])}" for k, s in nets.items())}.
Wait for a quiet machine before each run (s; see scripts/quiet.py): {waits}.
{per_run}

![CDF](kubelet-cdf.svg)
"""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "kubelet.json"), "w") as fh:
        json.dump(r, fh, indent=1)
    with open(os.path.join(out, "kubelet.md"), "w") as fh:
        fh.write(md)
    series = {f"{k} CNI set-up": bench.cdf(s["cni_ms"]["all"]) for k, s in nets.items()}
    series.update({f"{k} RunPodSandbox": bench.cdf(s["sandbox_ms"]["all"]) for k, s in nets.items()})
    with open(os.path.join(out, "kubelet-cdf.svg"), "w") as fh:
        fh.write(bench.svg_lines(series, "100 pods at once through kubelet: CDF", "ms (log)", "fraction of pods",
                                 logx=True, ymin=0))
    print(md)  # noqa: T201 (the benchmark's report)


def kubelet_bench(a, machine: str, bench):
    os.environ.update({"FERRITE_CLUSTER_DIR": "/run/ferrite-bench-kubelet", "FERRITE_CLUSTER_PREFIX": "fk",
                       "FERRITE_CLUSTER_BARE_NODES": "", "FERRITE_CLUSTER_CONTAINERD_LOG": "debug"})
    if a.cni_log_level:
        os.environ["FERRITE_CLUSTER_CNI_LOG_LEVEL"] = a.cni_log_level
    runs = 1 if a.quick else a.runs
    names = a.networks.split(",")
    if any(n not in MAINS for n in names) or "ferrite" in names[1:]:
        raise SystemExit(f"bench --kubelet: --networks takes some of {', '.join(MAINS)}, ferrite first "
                         "(the others replace its DaemonSet)")
    global PODS
    if a.quick:
        PODS = 10
    version = subprocess.run(["containerd", "--version"], capture_output=True, text=True).stdout.split()
    r = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine, "runs": runs,
         "pods": PODS, "containerd": version[2] if len(version) > 2 else "?", "raw": {}, "networks": {}}
    log("bench: kubelet: a one-node cluster (scripts/cluster up --nodes 1)")
    subprocess.run([str(ROOT / "scripts/cluster"), "up", "--nodes", "1"], check=True)
    b = None
    try:
        c = harness.Cluster.from_env()
        c.ensure_test_image()
        b = Bench(c)
        # One unmeasured round first: the first pods on a node also unpack
        # the image's snapshot, which is no network's cost.
        log("bench: kubelet: a warm-up round (not measured)")
        b.run("warmup", 0)
        plan = [(n, MAINS[n]) for n in names]
        for name, main in plan:
            if main is not None:
                b.use_reference(name, main)
            log(f"bench: kubelet: {name}")
            if name == "ferrite" and a.ab:
                r["ab"] = os.path.abspath(a.ab)
                r["raw"]["ferrite"], r["raw"]["ferrite-ab"] = b.alternate(Path(r["ab"]), runs)
                r["networks"]["ferrite-ab"] = summarize(r["raw"]["ferrite-ab"])
            else:
                r["raw"][name] = [b.run(name, n) for n in range(1, runs + 1)]
            r["networks"][name] = summarize(r["raw"][name])
    finally:
        # ferrite's own log of every ADD (its steps with --cni-log-level
        # debug), for a look at the slow ones; not part of the report.
        if b and b.plugin_log.exists():
            os.makedirs(a.out, exist_ok=True)
            shutil.copy2(b.plugin_log, os.path.join(a.out, "kubelet-cni.log"))
        subprocess.run([str(ROOT / "scripts/cluster"), "down"], check=False)
    write(r, a.out, bench)
