# SPDX-License-Identifier: Apache-2.0
"""scripts/bench --services: ferrite's Service balancing against kube-proxy
(iptables mode), on one cluster (scripts/cluster: two nodes, kube-proxy
running), in one run. Each mode is the same cluster with ferrite-config's
`services` "on" (ferrite translates pods' Service traffic at from_pod) or
"off" (kube-proxy's DNAT does), the agents restarted in between.

Measures, from a client pod on node1 through a ClusterIP whose only backend
is on node1 ("same node") or on node2 ("cross node"):
  - request/response: one TCP connection, one byte each way at a time
    (probe rr), p50 and p99;
  - TCP throughput: 1 GB to a sink (probe send), Gbit/s;
  - new connections per second (connect, one byte each way, close:
    probe conns), with 1, 1,000 and 5,000 Services present (each with an
    endpoint, so kube-proxy writes their chains);
and, ferrite only: the time from an endpoint change in the API to the
backend in node1's maps, p50 and p99, two ways: an Endpoints object
written directly (a Service without a selector: the API change itself),
and a label that puts a pod in or out of a Service's selector (the
endpoints controller's reaction included). Each change is one request on a
kept-open HTTPS connection to the API server, timed from just before it is
sent to the frontend's backend count changing in node1's ferrite_svc map,
read with bpf(2) every 0.2 ms. And the agent's memory and CPU with 5,000
Services.
Never asserts: numbers for people, written to OUT/services.json and .md.
"""
import ctypes
import http.client
import ipaddress
import json
import os
import ssl
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "cluster"))

import harness  # noqa: E402  (tests/cluster's)

NS = "bench-svc"
FILLER_BATCH = 500


def log(*a):
    print(*a, file=sys.stderr, flush=True)


LIBC = ctypes.CDLL("libc.so.6", use_errno=True)
CLONE_NEWNET = 0x40000000
SYS_BPF = 321  # x86_64
BPF_MAP_LOOKUP_ELEM, BPF_OBJ_GET = 1, 7


class Api:
    """A kept-open HTTPS connection to the API server (made inside the
    control plane's network namespace), as admin."""

    def __init__(self, c: harness.Cluster):
        ctx = ssl.create_default_context(cafile=str(c.dir / "pki/ca.crt"))
        ctx.load_cert_chain(str(c.dir / "pki/admin.crt"), str(c.dir / "pki/admin.key"))
        self.conn = http.client.HTTPSConnection(c.cp_ip, 6443, context=ctx, timeout=10)
        here = os.open("/proc/self/ns/net", os.O_RDONLY)
        there = os.open(f"/run/netns/{c.prefix}-cp", os.O_RDONLY)
        try:
            if LIBC.setns(there, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns into the control plane")
            self.conn.connect()
        finally:
            LIBC.setns(here, CLONE_NEWNET)
            os.close(here)
            os.close(there)

    def patch(self, path: str, body: dict):
        self.conn.request("PATCH", path, json.dumps(body), {"Content-Type": "application/merge-patch+json"})
        r = self.conn.getresponse()
        data = r.read()
        if r.status >= 300:
            raise harness.ClusterError(f"PATCH {path}: {r.status} {data[:300]!r}")


class SvcMap:
    """node1's ferrite_svc map, opened through a node1 process's root."""

    def __init__(self, c: harness.Cluster, node: str):
        pid = c.daemon_pid(f"kubelet-{node}")
        path = f"/proc/{pid}/root/sys/fs/bpf/ferrite/state-1/ferrite_svc".encode()
        self.path = ctypes.create_string_buffer(path)
        attr = struct.pack("QIIi", ctypes.addressof(self.path), 0, 0, 0) + b"\0" * 16
        buf = ctypes.create_string_buffer(attr, len(attr))
        self.fd = LIBC.syscall(SYS_BPF, BPF_OBJ_GET, buf, len(attr))
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), f"BPF_OBJ_GET {path.decode()}")
        self.value = ctypes.create_string_buffer(16)

    def backends(self, vip: str, port: int) -> int:
        """The frontend's active backends (svc_value.count), -1 if absent."""
        addr = ipaddress.ip_address(vip)
        a16 = (b"\0" * 10 + b"\xff\xff" + addr.packed) if addr.version == 4 else addr.packed
        key = ctypes.create_string_buffer(a16 + struct.pack("!H", port) + bytes([6, 0]), 20)
        attr = struct.pack("IIQQQ", self.fd, 0, ctypes.addressof(key), ctypes.addressof(self.value), 0)
        buf = ctypes.create_string_buffer(attr, len(attr))
        if LIBC.syscall(SYS_BPF, BPF_MAP_LOOKUP_ELEM, buf, len(attr)) != 0:
            return -1
        return struct.unpack_from("II", self.value.raw)[1]


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p / 100))] if xs else None


class Bench:
    def __init__(self, c: harness.Cluster, reps: int, seconds: int, gbytes: float):
        self.c, self.reps, self.seconds, self.bytes = c, reps, seconds, int(gbytes * 1e9)
        self.n1, self.n2 = c.nodes[0], c.nodes[1]

    # -- the workload -------------------------------------------------------------------------

    def setup(self):
        c = self.c
        c.ensure_test_image()
        c.namespace(NS)
        servers = harness.pod_servers(rr=(9003,))
        objs = [harness.pod_manifest("client", NS, node=self.n1, labels={"app": "client"}, command=servers)]
        for name, node in (("srv-same", self.n1), ("srv-cross", self.n2)):
            objs.append(harness.pod_manifest(name, NS, node=node, labels={"app": name}, command=servers))
            for svc, port, target in ((f"{name}-rr", 80, 9003), (f"{name}-sink", 80, 9002)):
                objs.append(harness.service_manifest(svc, NS, {"app": name}, port=port, target=target))
        # Endpoint churn: a Service whose selector a label puts "chg" in and out of.
        objs.append(harness.pod_manifest("chg", NS, node=self.n2, labels={"app": "chg"}, command=servers))
        objs.append(harness.service_manifest("churn", NS, {"app": "chg", "in": "yes"}, port=80, target=9003))
        # And one without a selector, whose Endpoints the bench writes itself.
        manual = harness.service_manifest("manual", NS, {}, port=80, target=9003)
        del manual["spec"]["selector"]
        objs.append(manual)
        c.apply(*objs)
        c.wait_pods_ready(NS, ["client", "srv-same", "srv-cross", "chg"], timeout=180)
        self.client = next(p for p in c.pods(NS) if p.name == "client")
        self.pod_ip = {p.name: p.ip for p in c.pods(NS)}
        self.vip = {s: c.get("service", s, namespace=NS)["spec"]["clusterIP"]
                    for s in ("srv-same-rr", "srv-same-sink", "srv-cross-rr", "srv-cross-sink", "churn", "manual")}

    def fillers(self, n: int):
        """Exactly n filler Services (each with srv-cross as its endpoint)."""
        have = len(self.c.get("services", "-l", "bench=filler", namespace=NS)["items"])
        for start in range(have, n, FILLER_BATCH):
            end = min(n, start + FILLER_BATCH)
            objs = []
            for i in range(start, end):
                s = harness.service_manifest(f"filler-{i}", NS, {"app": "srv-cross"}, port=80, target=9003)
                s["metadata"]["labels"] = {"bench": "filler"}
                objs.append(s)
            self.c.apply(*objs)
            log(f"  {end} filler Services")
        if have > n:
            self.c.kubectl("-n", NS, "delete", "services", "-l", "bench=filler", timeout=600)
            self.fillers(n)

    # -- the modes ----------------------------------------------------------------------------

    def frontends(self) -> int:
        m = self.c.metrics(self.n1)
        v = {s.split()[0]: s.split()[-1] for s in m.splitlines() if s and not s.startswith("#")}
        return int(float(v.get("ferrite_services_frontends", "0")))

    def kube_proxy_services(self) -> int:
        out = self.c.on(self.n1, "iptables-save", "-t", "nat", timeout=120).stdout
        return sum(1 for line in out.splitlines() if line.startswith("-A KUBE-SERVICES") and "KUBE-SVC-" in line)

    def mode(self, services: str, want: int):
        """ferrite-config services=SERVICES, agents restarted, and both
        translators caught up with `want` Services."""
        c = self.c
        c.kubectl("-n", "kube-system", "patch", "configmap", "ferrite-config", "--type", "merge",
                  "-p", json.dumps({"data": {"services": services}}))
        c.kubectl("-n", "kube-system", "rollout", "restart", "daemonset/ferrite-agent")
        c.kubectl("-n", "kube-system", "rollout", "status", "daemonset/ferrite-agent", "--timeout=180s", timeout=200)
        harness.wait_for(f"kube-proxy's chains for {want} Services", 600,
                         lambda: self.kube_proxy_services() >= want, interval=2)
        if services == "on":
            harness.wait_for(f"ferrite's frontends for {want} Services", 300,
                             lambda: self.frontends() >= want, interval=1)
        else:
            # The maps themselves: a new agent's /metrics says 0 before it
            # has emptied them.
            harness.wait_for("ferrite's maps emptied", 120, lambda: self.view().startswith("0 frontends")
                             or "\n0 frontends" in self.view(), interval=1)

    def view(self) -> str:
        return self.c.on(self.n1, "/opt/cni/bin/ferrite", "services", timeout=30).stdout

    # -- the measurements ---------------------------------------------------------------------

    def probe(self, script: str, timeout: float) -> list[str]:
        out = self.client.out(script, timeout=timeout)
        return out.split()

    def rr(self, addr: str, port: int = 80):
        runs = [self.probe(f"probe rr {addr} {port} {self.seconds}", self.seconds + 60) for _ in range(self.reps)]
        p50 = statistics.median(float(r[1]) for r in runs)
        p99 = statistics.median(float(r[2]) for r in runs)
        return {"p50_us": p50, "p99_us": p99, "round_trips": sum(int(r[0]) for r in runs)}

    def throughput(self, vip: str):
        gbits = []
        for _ in range(self.reps):
            f = self.probe(f"probe send {vip} 80 {self.bytes}", 300)
            gbits.append(float(f[-2]))  # "<n> bytes in <t> s, <g> Gbit/s"
        return {"gbit_s": statistics.median(gbits), "runs": gbits}

    def conns(self, vip: str):
        runs = [self.probe(f"probe conns {vip} 80 {self.seconds}", self.seconds + 60) for _ in range(self.reps)]
        return {"per_s": statistics.median(float(r[1]) for r in runs), "failed": sum(int(r[2]) for r in runs)}

    def churn(self, changes: int):
        """Endpoint changes, each timed from its request to node1's maps:
        the manual Service's Endpoints written directly, then chg's label
        flipped (the endpoints controller writes the churn Service's)."""
        c = self.c
        chg_ip = next(p for p in c.pods(NS) if p.name == "chg").ip
        api, svc = Api(c), SvcMap(c, self.n1)
        c.apply({"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "manual", "namespace": NS},
                 "subsets": []})
        harness.wait_for("the manual Service in node1's maps", 30,
                         lambda: svc.backends(self.vip["manual"], 80) == 0, interval=0.05)

        def timed(vip: str, want: int, send) -> float:
            t0 = time.monotonic()
            send()
            deadline = t0 + 30
            while svc.backends(vip, 80) != want:
                if time.monotonic() > deadline:
                    raise harness.ClusterError(f"{vip}: {want} backends not in node1's maps after 30 s")
                time.sleep(0.0002)
            return (time.monotonic() - t0) * 1000

        direct, label = [], []
        for i in range(changes):
            want = 1 if i % 2 == 0 else 0
            subsets = [{"addresses": [{"ip": chg_ip}], "ports": [{"port": 9003, "protocol": "TCP"}]}] if want else []
            direct.append(timed(self.vip["manual"], want, lambda: api.patch(
                f"/api/v1/namespaces/{NS}/endpoints/manual", {"subsets": subsets})))
            time.sleep(0.05)
        for i in range(changes):
            want = 1 if i % 2 == 0 else 0
            label.append(timed(self.vip["churn"], want, lambda: api.patch(
                f"/api/v1/namespaces/{NS}/pods/chg", {"metadata": {"labels": {"in": "yes" if want else "no"}}})))
            time.sleep(0.05)
        m = c.metrics(self.n1)
        v = {x.split()[0]: x.split()[-1] for x in m.splitlines() if x and not x.startswith("#")}
        events = int(float(v.get("ferrite_services_event_to_datapath_seconds_count", "0")))
        total = float(v.get("ferrite_services_event_to_datapath_seconds_sum", "0"))
        return {"changes": changes, "p50_ms": pct(direct, 50), "p99_ms": pct(direct, 99), "ms": direct,
                "label_p50_ms": pct(label, 50), "label_p99_ms": pct(label, 99), "label_ms": label,
                "backend": chg_ip, "agent_events": events, "agent_mean_ms": 1000 * total / max(events, 1)}

    def agent_footprint(self, seconds: int = 30):
        pid = self.c.agent_pid(self.n1)
        proc = Path(f"/proc/{pid}")

        def cpu_ns():
            return sum(int(t.read_text().split()[0]) for t in proc.glob("task/*/schedstat"))

        c0 = cpu_ns()
        time.sleep(seconds)
        c1 = cpu_ns()
        status = dict(line.split(":", 1) for line in (proc / "status").read_text().splitlines() if ":" in line)
        return {"rss_mib": int(status["VmRSS"].split()[0]) / 1024, "cpu_ms_per_30s": (c1 - c0) / 1e6}


def write(r: dict, out: str):
    rows = []
    for count, modes in r["by_services"].items():
        k, f = modes.get("kube-proxy", {}), modes.get("ferrite", {})

        def ratio(a, b):
            return f"{a / b:.2f}" if a and b else "-"

        rows.append(f"| {count} | {k.get('conns', {}).get('per_s', 0):.0f} | {f.get('conns', {}).get('per_s', 0):.0f} | "
                    f"{ratio(f.get('conns', {}).get('per_s'), k.get('conns', {}).get('per_s'))} |")
    dp = []
    for path in ("same", "cross"):
        k = r["by_services"]["1"]["kube-proxy"][path]
        f = r["by_services"]["1"]["ferrite"][path]
        dp.append(f"| {path} node | request/response p50 | {k['rr']['p50_us']:.1f} µs | {f['rr']['p50_us']:.1f} µs | "
                  f"{f['rr']['p50_us'] / k['rr']['p50_us']:.2f} |")
        dp.append(f"| {path} node | request/response p99 | {k['rr']['p99_us']:.1f} µs | {f['rr']['p99_us']:.1f} µs | "
                  f"{f['rr']['p99_us'] / k['rr']['p99_us']:.2f} |")
        if "pod_rr" in f:
            dp.append(f"| {path} node | request/response p50 to the pod's own address (no Service) | | "
                      f"{f['pod_rr']['p50_us']:.1f} µs | {f['pod_rr']['p50_us'] / k['rr']['p50_us']:.2f} |")
        dp.append(f"| {path} node | TCP throughput | {k['tcp']['gbit_s']:.2f} Gbit/s | {f['tcp']['gbit_s']:.2f} Gbit/s | "
                  f"{f['tcp']['gbit_s'] / k['tcp']['gbit_s']:.2f} |")
    ch = r.get("churn", {})
    fp = r.get("footprint", {})
    md = f"""# Services: ferrite against kube-proxy (iptables), {r['date']}

{r['machine']}; one cluster (scripts/cluster, 2 nodes), client on node1; {r['reps']} repetitions of {r['seconds']} s, medians.

| path | measure | kube-proxy | ferrite | ferrite / kube-proxy |
|---|---|---|---|---|
{chr(10).join(dp)}

New connections per second (connect, one byte each way, close), cross node:

| Services | kube-proxy | ferrite | ferrite / kube-proxy |
|---|---|---|---|
{chr(10).join(rows)}

Endpoint change to node1's maps (ferrite, with {max(int(k) for k in r['by_services'])} Services present; each change one request on a kept-open HTTPS connection to the API server, timed from just before it is sent to the frontend's backend count changing in node1's ferrite_svc map, read every 0.2 ms):

| change | changes | p50 | p99 |
|---|---|---|---|
| an Endpoints object written (a Service without a selector) | {ch.get('changes', 0)} | {ch.get('p50_ms') or 0:.1f} ms | {ch.get('p99_ms') or 0:.1f} ms |
| a pod's label put in or out of a selector (the endpoints controller between) | {ch.get('changes', 0)} | {ch.get('label_p50_ms') or 0:.1f} ms | {ch.get('label_p99_ms') or 0:.1f} ms |

Of that, the agent's own part (the watch event reaching it to the maps written, ferrite_services_event_to_datapath_seconds): mean {ch.get('agent_mean_ms') or 0:.2f} ms over {ch.get('agent_events') or 0} events.

The agent on node1 with {max(int(k) for k in r['by_services'])} Services: RSS {fp.get('rss_mib', 0):.1f} MiB, CPU at rest {fp.get('cpu_ms_per_30s', 0):.1f} ms per 30 s; from its start to every Service programmed it used {r.get('program_cpu_ms', 0):.0f} ms of CPU.
"""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "services.json"), "w") as f:
        json.dump(r, f, indent=1)
    with open(os.path.join(out, "services.md"), "w") as f:
        f.write(md)
    print(md)  # noqa: T201 (the benchmark's report)


def services_bench(a, machine: dict):
    env = {"FERRITE_CLUSTER_DIR": "/run/ferrite-bench-svc", "FERRITE_CLUSTER_PREFIX": "fb"}
    os.environ.update(env)
    counts = (1, 100) if a.quick else (1, 1000, 5000)
    reps, seconds = (1, 1) if a.quick else (a.reps, a.rr_seconds)
    gbytes = 0.05 if a.quick else 1.0
    r = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine, "reps": reps,
         "seconds": seconds, "by_services": {}}
    log("bench: services: a two-node cluster (scripts/cluster up)")
    subprocess.run([str(ROOT / "scripts/cluster"), "up", "--cni=agent"], check=True)
    try:
        b = Bench(harness.Cluster.from_env(), reps, seconds, gbytes)
        b.setup()
        for n in counts:
            log(f"bench: services: {n} Services")
            b.fillers(n - 1)
            row = r["by_services"][str(n)] = {}
            for label, services in (("kube-proxy", "off"), ("ferrite", "on")):
                log(f"  {label}")
                b.mode(services, n + 4)
                m = row[label] = {"conns": b.conns(b.vip["srv-cross-rr"])}
                if n == counts[0]:
                    for path in ("same", "cross"):
                        m[path] = {"rr": b.rr(b.vip[f"srv-{path}-rr"]), "tcp": b.throughput(b.vip[f"srv-{path}-sink"])}
                        if services == "on":
                            # The same server by its pod address: the path
                            # without a Service, the floor for either.
                            m[path]["pod_rr"] = b.rr(b.pod_ip[f"srv-{path}"], 9003)
            if n == counts[-1]:
                # The agent restarted for this mode: its CPU so far is its
                # start plus programming every Service.
                pid = b.c.agent_pid(b.n1)
                r["program_cpu_ms"] = sum(int(t.read_text().split()[0])
                                          for t in Path(f"/proc/{pid}").glob("task/*/schedstat")) / 1e6
                r["footprint"] = b.agent_footprint()
        r["churn"] = b.churn(4 if a.quick else 100)
    finally:
        subprocess.run([str(ROOT / "scripts/cluster"), "down"], check=False)
    write(r, a.out)
