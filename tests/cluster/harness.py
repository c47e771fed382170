# SPDX-License-Identifier: Apache-2.0
"""The cluster that scripts/cluster made, as the suite sees it.

`Cluster` is read from the cluster's state dir ($FERRITE_CLUSTER_DIR, its
`config` written by `scripts/cluster up`): the nodes, their addresses and
pod CIDRs, kubectl as admin, commands in a part's namespaces (a node, the
control plane `cp`, the `outside` host), the cluster's daemons, ferrite's
counters and /metrics on a node, the agent's pod on a node.

`Pod` is a running pod the checks talk from: exec, HTTP, ping, UDP, TCP
probes with a timeout. `pod_manifest` and friends build the objects a check
applies; every test pod runs the workload image (`TEST_IMAGE`, busybox with
scripts/cluster-probe.c) and serves, by default:

    TCP 8080   HTTP: GET /cgi-bin/id answers "<pod name> <client address>"
    UDP 9000   each datagram answered with "<pod name> <sender address>"
    TCP 9001   echo          TCP 9002   sink (reads to the end)

Nothing here asserts: the test modules do.
"""
from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, TypeVar

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
TEST_IMAGE = "localhost/ferrite-cluster/busybox:1"
# A label on every namespace the suite makes: the uninstall check empties them.
TEST_LABEL = "ferrite.test/cluster"
AGENT_SELECTOR = "app.kubernetes.io/name=ferrite,app.kubernetes.io/component=agent"
METRICS_PORT = 9965

# Proxy variables are set on this machine; nothing here goes through a proxy.
_PROXY_VARS = {"http_proxy", "https_proxy", "no_proxy", "all_proxy"}
ENV = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARS}

T = TypeVar("T")


class ClusterError(Exception):
    """A command against the cluster failed."""


class Timeout(ClusterError):
    pass


def wait_for(what: str, timeout: float, probe: Callable[[], T], interval: float = 0.25) -> T:
    """Polls probe() until it returns something truthy and returns that.
    A probe that raises ClusterError or a subprocess error has not succeeded
    yet. Raises Timeout naming `what` (and the last error) after `timeout` s."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            value = probe()
            if value:
                return value
        except (ClusterError, subprocess.SubprocessError, OSError) as e:
            last = e
        if time.monotonic() > deadline:
            raise Timeout(f"timed out after {timeout:g} s waiting for {what}" + (f" (last: {last})" if last else ""))
        time.sleep(interval)


def run(argv: list[str], *, input: str | None = None, timeout: float = 60, check: bool = False) -> subprocess.CompletedProcess:
    """argv, text in and out, without proxy variables. check=True raises
    ClusterError with the command's stderr when it fails."""
    try:
        p = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout, env=ENV)
    except subprocess.TimeoutExpired as e:
        raise Timeout(f"{shlex.join(argv)}: no end after {timeout:g} s") from e
    if check and p.returncode != 0:
        raise ClusterError(f"{shlex.join(argv)}: exit {p.returncode}: {(p.stderr or p.stdout).strip()[-2000:]}")
    return p


def since(t0: float) -> float:
    return time.monotonic() - t0


# ---- the cluster ---------------------------------------------------------------------


@dataclass
class Stats:
    """A pod's counters, from `ferrite stats` on its node (packets)."""

    from_pod: int
    redirected: int
    redirected_in: int
    via_stack: int

    def __sub__(self, o: "Stats") -> "Stats":
        return Stats(self.from_pod - o.from_pod, self.redirected - o.redirected,
                     self.redirected_in - o.redirected_in, self.via_stack - o.via_stack)


@dataclass
class Cluster:
    dir: Path
    prefix: str
    nodes: list[str]
    kube_bin: Path
    cni_mode: str
    dns: bool
    bare_nodes: list[str]
    net: str
    cp_ip: str
    out_ip: str
    cluster_cidr: str
    service_cidr: str
    api_svc_ip: str
    dns_svc_ip: str
    kube_proxy: bool  # kube-proxy runs on the nodes (scripts/cluster up --kube-proxy=off: not)
    deploy_dir: Path  # what up applied (deploy/, or its copy set up for no kube-proxy)

    @classmethod
    def from_env(cls) -> "Cluster":
        """The cluster in $FERRITE_CLUSTER_DIR (default /run/ferrite-cluster).
        $FERRITE_CLUSTER_PREFIX, when set, must be the one it was made with."""
        d = Path(os.environ.get("FERRITE_CLUSTER_DIR", "/run/ferrite-cluster"))
        conf = d / "config"
        if not conf.is_file():
            raise ClusterError(f"no cluster in {d} (no {conf}): scripts/cluster up first")
        c = {}
        for line in conf.read_text().splitlines():
            k, sep, v = line.partition("=")
            if sep:
                c[k] = " ".join(shlex.split(v))
        prefix = c["PREFIX"]
        want = os.environ.get("FERRITE_CLUSTER_PREFIX")
        if want and want != prefix:
            raise ClusterError(f"{d} holds a cluster with prefix {prefix}, not FERRITE_CLUSTER_PREFIX={want}")
        n = int(c["NODES"])
        net = c.get("NET", "172.20.0")
        return cls(
            dir=d,
            prefix=prefix,
            nodes=[f"node{i}" for i in range(1, n + 1)],
            kube_bin=Path(c["KUBE_BIN"]),
            cni_mode=c.get("CNI_MODE", "agent"),
            dns=c.get("DNS", "0") == "1",
            bare_nodes=[f"node{i}" for i in c.get("BARE_NODES", "").split()],
            net=net,
            cp_ip=c.get("CP_IP", f"{net}.10"),
            out_ip=c.get("OUT_IP", f"{net}.100"),
            cluster_cidr=c.get("CLUSTER_CIDR", "10.244.0.0/16"),
            service_cidr=c.get("SERVICE_CIDR", "10.96.0.0/16"),
            api_svc_ip=c.get("API_SVC_IP", "10.96.0.1"),
            dns_svc_ip=c.get("DNS_SVC_IP", "10.96.0.10"),
            kube_proxy=c.get("KUBE_PROXY", "on") == "on",
            deploy_dir=Path(c.get("DEPLOY", str(REPO / "deploy"))),
        )

    # -- places --------------------------------------------------------------------

    @property
    def first(self) -> str:
        return self.nodes[0]

    @property
    def last(self) -> str:
        return self.nodes[-1]

    def node_ip(self, node: str) -> str:
        return f"{self.net}.{10 + int(node.removeprefix('node'))}"

    def node_dir(self, node: str) -> Path:
        return self.dir / "nodes" / node

    def containerd_sock(self, node: str) -> Path:
        return self.node_dir(node) / "fs/run/containerd/containerd.sock"

    def podcidr(self, node: str) -> str:
        """The node's pod CIDR as the API has it now."""
        return self.node(node)["spec"].get("podCIDR", "")

    def recorded(self, name: str) -> str | None:
        """A file scripts/cluster up left in the state dir (registered-node1,
        conflist-node1, before-cni-node1, ...), or None."""
        p = self.dir / name
        return p.read_text().strip() if p.is_file() else None

    # -- commands --------------------------------------------------------------------

    def nsenter(self, part: str, argv: Iterable[str]) -> list[str]:
        """argv in a part's namespaces (node1.., cp, outside): network, and
        mount and UTS where it has them (scripts/cluster's `nenter`)."""
        ns = [f"--net=/run/netns/{self.prefix}-{part}"]
        mnt, uts = self.dir / "ns" / f"mnt-{part}", self.dir / "ns" / f"uts-{part}"
        if mnt.exists() and part != "outside":
            ns.append(f"--mount={mnt}")
        if uts.exists():
            ns.append(f"--uts={uts}")
        return ["nsenter", *ns, "--", *argv]

    def on(self, part: str, *argv: str, **kw) -> subprocess.CompletedProcess:
        """Runs argv in a part's namespaces (see run())."""
        return run(self.nsenter(part, argv), **kw)

    def sh(self, part: str, script: str, **kw) -> subprocess.CompletedProcess:
        return self.on(part, "sh", "-c", script, **kw)

    def script(self, *args: str, timeout: float = 120) -> str:
        """scripts/cluster ARGS against this cluster."""
        env = {"FERRITE_CLUSTER_DIR": str(self.dir), "FERRITE_CLUSTER_PREFIX": self.prefix}
        try:
            p = subprocess.run([str(SCRIPTS / "cluster"), *args], capture_output=True, text=True,
                               timeout=timeout, env={**ENV, **env})
        except subprocess.TimeoutExpired as e:
            raise Timeout(f"scripts/cluster {shlex.join(args)}: no end after {timeout:g} s") from e
        if p.returncode != 0:
            raise ClusterError(f"scripts/cluster {shlex.join(args)}: exit {p.returncode}: {p.stderr.strip()[-2000:]}")
        return p.stdout

    # -- kubectl ---------------------------------------------------------------------

    def kubectl(self, *args: str, input: str | None = None, timeout: float = 60, check: bool = True) -> str:
        """The cluster's kubectl as admin, from the control plane's namespace;
        its stdout. check=False returns stdout whatever the exit status."""
        argv = [str(self.kube_bin / "kubectl"), "--kubeconfig", str(self.dir / "kubeconfig/admin.conf"), *args]
        p = self.on("cp", *argv, input=input, timeout=timeout)
        if check and p.returncode != 0:
            raise ClusterError(f"kubectl {shlex.join(args)}: {(p.stderr or p.stdout).strip()[-2000:]}")
        return p.stdout

    def get(self, *args: str, namespace: str | None = None) -> dict:
        """kubectl get ARGS -o json, parsed (an object, or a List's items in ["items"])."""
        ns = ["-n", namespace] if namespace else []
        return json.loads(self.kubectl("get", *ns, *args, "-o", "json"))

    def apply(self, *objects: dict) -> None:
        self.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)}))

    def node(self, node: str) -> dict:
        return self.get("node", node)

    def condition(self, node: str, kind: str = "Ready") -> dict:
        for c in self.node(node)["status"].get("conditions", []):
            if c["type"] == kind:
                return c
        return {}

    def node_ready(self, node: str) -> bool:
        return self.condition(node).get("status") == "True"

    def pods(self, namespace: str, selector: str | None = None, node: str | None = None) -> list["Pod"]:
        args = ["pods"]
        if selector:
            args += ["-l", selector]
        if node:
            args += ["--field-selector", f"spec.nodeName={node}"]
        items = self.get(*args, namespace=namespace)["items"]
        return sorted((Pod.from_object(self, o) for o in items), key=lambda p: p.name)

    def pod(self, namespace: str, name: str) -> "Pod":
        return Pod.from_object(self, self.get("pod", name, namespace=namespace))

    # -- ferrite on a node ----------------------------------------------------------

    def ep_stats(self, node: str, ip: str) -> Stats | None:
        """The counters of the endpoint `ip` on `node` (ferrite stats, from
        the node's pinned maps), or None when it has none."""
        out = self.on(node, "/opt/cni/bin/ferrite", "stats", timeout=30).stdout.splitlines()
        if not out:
            return None
        cols = out[0].split()
        for line in out[1:]:
            f = line.split()
            if f and f[0] == ip and len(f) >= len(cols) - 1:
                v = dict(zip(cols, f))
                return Stats(int(v["from_pod"]), int(v["redirected"]), int(v["redir_in"]), int(v["via_stack"]))
        return None

    def metrics(self, node: str) -> str:
        """The agent's /metrics on the node (host network)."""
        return self.on(node, "curl", "-sf", "--max-time", "5", f"http://{self.node_ip(node)}:{METRICS_PORT}/metrics",
                       timeout=15, check=True).stdout

    def node_state(self, node: str) -> str:
        """What ferrite puts on the node (tests/cluster/node_state.py), as
        scripts/cluster up recorded it before the install."""
        return self.on(node, "python3", str(Path(__file__).with_name("node_state.py")), "eth0",
                       timeout=30, check=True).stdout

    def agent_pods(self, node: str) -> list[tuple[str, bool]]:
        """The agent's pods on the node: (name, Ready)."""
        out = []
        for o in self.get("pods", "-l", AGENT_SELECTOR, "--field-selector", f"spec.nodeName={node}",
                          namespace="kube-system")["items"]:
            ready = any(c["type"] == "Ready" and c["status"] == "True" for c in o["status"].get("conditions", []))
            out.append((o["metadata"]["name"], ready))
        return out

    def agent_pid(self, node: str) -> int:
        """The agent's process (its pid on this machine), through the node's containerd."""
        pods = self.agent_pods(node)
        if not pods:
            raise ClusterError(f"no agent pod on {node}")
        o = self.get("pod", pods[0][0], namespace="kube-system")
        cid = o["status"]["containerStatuses"][0].get("containerID", "").removeprefix("containerd://")
        tasks = run(["ctr", "-a", str(self.containerd_sock(node)), "-n", "k8s.io", "tasks", "ls"], check=True).stdout
        for line in tasks.splitlines():
            f = line.split()
            if len(f) >= 2 and f[0] == cid:
                return int(f[1])
        raise ClusterError(f"the agent's container {cid} on {node} has no task")

    def fast_path_on(self) -> bool:
        return self.config("fastPath") == "true"

    def services_on(self) -> bool:
        """ferrite balances Services' cluster IPs (deploy/config.yaml services)."""
        return self.config("services") == "on"

    def config(self, key: str) -> str | None:
        """A value of the ferrite-config ConfigMap (None without the agent)."""
        if self.cni_mode != "agent":
            return None
        return self.kubectl("-n", "kube-system", "get", "configmap", "ferrite-config",
                            "-o", f"jsonpath={{.data.{key}}}", check=False).strip()

    # -- daemons: processes in a part's namespaces and cgroup, stopped by down ------

    def daemon(self, name: str, part: str, *argv: str) -> None:
        self.script("daemon", name, part, *argv)

    def daemon_pid(self, name: str) -> int | None:
        p = self.dir / "pids" / name
        return int(p.read_text()) if p.is_file() else None

    def alive(self, name: str) -> bool:
        pid = self.daemon_pid(name)
        if pid is None:
            return False
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, IndexError):
            return False
        return state not in ("Z", "X")

    def stop_daemon(self, name: str) -> None:
        pid = self.daemon_pid(name)
        if pid is not None and self.alive(name):
            os.kill(pid, signal.SIGTERM)
            try:
                wait_for(f"{name} to stop", 10, lambda: not self.alive(name))
            except Timeout:
                os.kill(pid, signal.SIGKILL)
        (self.dir / "pids" / name).unlink(missing_ok=True)

    def host_httpd(self, part: str, addr: str, port: int) -> None:
        """HTTP in a part's own network (a node's, the outside host's):
        GET /cgi-bin/id answers "<part> <client address>". Started once; the
        `host_httpd` fixture stops them."""
        name = f"httpd-{part}"
        if not self.alive(name):
            www = self.dir / "www" / part
            (www / "cgi-bin").mkdir(parents=True, exist_ok=True)
            cgi = www / "cgi-bin/id"
            cgi.write_text(f'#!/bin/sh\nprintf "Content-Type: text/plain\\r\\n\\r\\n"\necho "{part} $REMOTE_ADDR"\n')
            cgi.chmod(0o755)
            self.daemon(name, part, "busybox", "httpd", "-f", "-p", f"{addr}:{port}", "-h", str(www))
        wait_for(f"httpd in {part}", 10, lambda: self.on(
            part, "curl", "-sf", "--max-time", "2", f"http://{addr}:{port}/cgi-bin/id", timeout=5).returncode == 0)

    def http_from(self, part: str, url: str, tries: int) -> list[str]:
        """Up to `tries` GETs of url from a part's namespace, 3 s each,
        stopping at the first that fails: the answers."""
        out = []
        for _ in range(tries):
            p = self.on(part, "curl", "-sf", "--max-time", "3", url, timeout=10)
            if p.returncode != 0:
                break
            out.append(p.stdout.strip())
        return out

    # -- workload ----------------------------------------------------------------------

    def ensure_test_image(self) -> None:
        """The workload image on every node (built once per cluster, in its state dir)."""
        tar = self.dir / "images" / "busybox.tar"
        if not (self.dir / "images" / "busybox.imported").exists():
            build_test_image(tar)
            self.script("import", str(tar), timeout=300)
            (self.dir / "images" / "busybox.imported").touch()

    def namespace(self, name: str, labels: dict[str, str] | None = None) -> None:
        """A namespace labelled as the suite's (the uninstall check empties it)."""
        self.apply({"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": name, "labels": {TEST_LABEL: "true", **(labels or {})}}})

    def wait_pods_ready(self, namespace: str, names: Iterable[str], timeout: float = 120) -> None:
        names = list(names)
        self.kubectl("-n", namespace, "wait", "--for=condition=Ready", *[f"pod/{n}" for n in names],
                     f"--timeout={int(timeout)}s", timeout=timeout + 30)

    def delete_test_pods(self, namespace: str, node: str | None = None, timeout: float = 180) -> float:
        """Deletes a namespace's pods (on `node`, or all) and waits until they
        are gone: Deployments in the foreground (their pods first; on `node`
        only those with pods there), then bare pods. Deleting the namespace
        instead waits on the namespace controller's back-off, a minute or
        more. Returns the seconds it took."""
        t0 = time.monotonic()
        fs = ["--field-selector", f"spec.nodeName={node}"] if node else []
        for d in self.get("deployments", namespace=namespace)["items"]:
            name = d["metadata"]["name"]
            sel = ",".join(f"{k}={v}" for k, v in d["spec"]["selector"].get("matchLabels", {}).items())
            if node and not self.get("pods", "-l", sel, *fs, namespace=namespace)["items"]:
                continue
            self.kubectl("-n", namespace, "delete", f"deployment/{name}", "--cascade=foreground", "--wait=false")
        for p in self.get("pods", *fs, namespace=namespace)["items"]:
            if not p["metadata"].get("ownerReferences"):
                self.kubectl("-n", namespace, "delete", "pod", p["metadata"]["name"], "--wait=false", check=False)
        wait_for(f"the pods in {namespace}{' on ' + node if node else ''} to go", timeout,
                 lambda: not self.get("pods", *fs, namespace=namespace)["items"], interval=1)
        return since(t0)

    def test_namespaces(self) -> list[str]:
        return [o["metadata"]["name"] for o in self.get("namespaces", "-l", TEST_LABEL)["items"]
                if o["status"].get("phase") != "Terminating"]


_current: Cluster | None = None


def current() -> Cluster:
    """This run's cluster (Cluster.from_env, read once): for parametrizing
    at collection time."""
    global _current
    if _current is None:
        _current = Cluster.from_env()
    return _current


# ---- pods ------------------------------------------------------------------------------


@dataclass
class Ping:
    transmitted: int
    received: int
    summary: str  # busybox's round-trip line, or what went wrong


@dataclass
class Pod:
    cluster: Cluster = field(repr=False)
    namespace: str
    name: str
    node: str
    ip: str
    labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_object(cls, cluster: Cluster, o: dict) -> "Pod":
        return cls(cluster, o["metadata"]["namespace"], o["metadata"]["name"], o["spec"].get("nodeName", ""),
                   o["status"].get("podIP", ""), o["metadata"].get("labels", {}))

    def __str__(self) -> str:
        return f"{self.name} ({self.node}, {self.ip})"

    def exec(self, script: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """sh -c SCRIPT in the pod (kubectl exec); never raises on its exit status."""
        c = self.cluster
        argv = [str(c.kube_bin / "kubectl"), "--kubeconfig", str(c.dir / "kubeconfig/admin.conf"),
                "-n", self.namespace, "exec", self.name, "--", "sh", "-c", script]
        return c.on("cp", *argv, timeout=timeout)

    def out(self, script: str, timeout: float = 60) -> str:
        """The script's stdout and stderr, stripped (what it printed, or why not)."""
        p = self.exec(script, timeout)
        return (p.stdout + p.stderr).strip()

    def http(self, addr: str, port: int = 8080, path: str = "/cgi-bin/id", timeout: int = 5) -> str:
        """GET http://addr:port/path over busybox nc, the last line of the
        answer ("<server> <client address>" for /cgi-bin/id); "" when none
        within `timeout` s to connect and as long again to answer."""
        p = self.exec(f"printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' | timeout {2 * timeout} nc -w {timeout} {addr} {port}"
                      " | tail -n 1", timeout=2 * timeout + 30)
        return p.stdout.strip()

    def ping(self, addr: str, count: int = 3) -> Ping:
        p = self.exec(f"ping -c {count} -i 0.2 -W 2 {addr} 2>&1", timeout=30)
        return parse_ping(p.stdout)

    def udp_ask(self, addr: str, port: int = 9000, n: int = 5) -> str:
        """`probe udp-ask`: n datagrams, one at a time, 1 s for each answer:
        "<answered>/<n> <last answer>"."""
        return self.out(f"probe udp-ask {addr} {port} {n}", timeout=n * 2 + 30)

    def can_tcp(self, addr: str, port: int, timeout: int = 2) -> bool:
        """A TCP probe: an HTTP server (every test pod's) answers within
        `timeout` s. For truth tables: False means no answer, whatever the cause."""
        return self.http(addr, port, timeout=timeout) != ""

    def can_udp(self, addr: str, port: int) -> bool:
        """A UDP probe: one datagram answered within 1 s (every test pod's UDP server)."""
        return self.udp_ask(addr, port, 1).startswith("1/1 ")


def parse_ping(text: str) -> Ping:
    m = re.search(r"(\d+) packets transmitted, (\d+) packets received", text)
    rtt = re.search(r"round-trip (.*)", text)
    if not m:
        return Ping(0, 0, text.strip().splitlines()[-1] if text.strip() else "no output")
    return Ping(int(m.group(1)), int(m.group(2)), rtt.group(1) if rtt else m.group(0))


def in_cidr(ip: str, cidr: str) -> bool:
    try:
        return ipaddress.ip_address(ip) in ipaddress.ip_network(cidr)
    except ValueError:
        return False


def state_summary(state: str) -> str:
    """A node_state in a few words."""
    f = [line.split() for line in state.splitlines() if line.strip()]
    conf = [x[1] for x in f if x[0] == "conflist"]
    bins = [x[1] for x in f if x[0] == "cni-bin"]
    tables = [f"{x[2]} {x[3]}" for x in f if x[0] == "nft" and len(x) > 3 and x[1] == "table"]
    masq = sum(1 for x in f if x[0] == "nft" and "masquerade" in x)
    tcx = sum(len(x) - 4 for x in f if x[0] == "tcx" and len(x) > 3 and x[3] == "programs")
    return (f"conflist {' '.join(conf) or 'none'}; /opt/cni/bin: {' '.join(bins) or 'empty'}; "
            f"{sum(1 for x in f if x[0] == 'route')} proto-71 routes; nft table: {' '.join(tables) or 'none'} "
            f"({masq} masquerade rules); {sum(1 for x in f if x[0] == 'bpffs')} bpffs entries; "
            f"{tcx} TCX programs on eth0")



def state_diff(before: str, after: str) -> list[str]:
    """What changed between two node_state records: "-line" gone, "+line" new."""
    return [d for d in difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
            if d[:1] in "+-" and not d.startswith(("+++", "---"))]


# ---- manifests ---------------------------------------------------------------------------


def pod_servers(http: Iterable[int] = (8080,), udp: Iterable[int] = (9000,), echo: Iterable[int] = (9001,),
                sink: Iterable[int] = (9002,), rr: Iterable[int] = ()) -> str:
    """The shell command of a test pod that serves HTTP (/cgi-bin/id), UDP
    ("<name> <sender>"), TCP echo, TCP sink and a one-process TCP echo for
    request/response (probe rr-serve) on the ports given."""
    parts = [f"probe udp-serve {p} &" for p in udp]
    parts += [f"probe rr-serve {p} &" for p in rr]
    parts += [f"probe echo-serve {p} &" for p in echo]
    parts += [f"probe sink-serve {p} &" for p in sink]
    http = list(http)
    parts += [f"httpd -f -p {p} -h /www &" for p in http[1:]]
    parts.append(f"exec httpd -f -p {http[0]} -h /www" if http else "exec sleep 1000000")
    return " ".join(parts)


POD_SERVERS = pod_servers()


def container(command: str | list[str] = POD_SERVERS, ports: Iterable[tuple[int, str]] = ((8080, "TCP"),),
              readiness_port: int | None = None) -> dict:
    """The test image's container: `command` through sh -c (a string) or as it is (a list)."""
    argv = ["sh", "-c", command] if isinstance(command, str) else list(command)
    c = {"name": "main", "image": TEST_IMAGE, "imagePullPolicy": "Never", "command": argv,
         "ports": [{"containerPort": p, "protocol": proto} for p, proto in ports]}
    if readiness_port:
        c["readinessProbe"] = {"tcpSocket": {"port": readiness_port}, "periodSeconds": 1}
    return c


def pod_manifest(name: str, namespace: str, *, node: str | None = None, labels: dict[str, str] | None = None,
                 command: str = POD_SERVERS, ports: Iterable[tuple[int, str]] = ((8080, "TCP"),)) -> dict:
    """A test pod, pinned to `node` (spec.nodeName: no scheduler) when given."""
    spec = {"terminationGracePeriodSeconds": 1, "containers": [container(command, ports)]}
    if node:
        spec["nodeName"] = node
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels or {}}, "spec": spec}


def deployment_manifest(name: str, namespace: str, replicas: int, *, labels: dict[str, str],
                        command: str | list[str] = POD_SERVERS, node: str | None = None, spread: bool = False,
                        readiness_port: int | None = 8080) -> dict:
    """A Deployment of test pods; `spread`: at most one pod more on any node
    than on another; `node`: all on that node."""
    spec = {"terminationGracePeriodSeconds": 1,
            "containers": [container(command, ports=() if readiness_port is None else ((readiness_port, "TCP"),),
                                     readiness_port=readiness_port)]}
    if node:
        spec["nodeSelector"] = {"kubernetes.io/hostname": node}
    if spread:
        spec["topologySpreadConstraints"] = [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                              "whenUnsatisfiable": "DoNotSchedule",
                                              "labelSelector": {"matchLabels": labels}}]
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": namespace},
            "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels}, "spec": spec}}}


def service_manifest(name: str, namespace: str, selector: dict[str, str], port: int = 80, target: int = 8080,
                     kind: str = "ClusterIP", protocol: str = "TCP") -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace},
            "spec": {"type": kind, "selector": selector,
                     "ports": [{"port": port, "targetPort": target, "protocol": protocol}]}}


# ---- the workload image -----------------------------------------------------------------

CGI_ID = """#!/bin/sh
a=${REMOTE_ADDR#[[]}
a=${a%]}
a=${a#::ffff:}
printf 'Content-Type: text/plain\\r\\n\\r\\n'
echo "$(hostname) $a"
"""


def build_test_image(tar: Path) -> None:
    """busybox-static with every applet, /bin/probe (scripts/cluster-probe.c:
    UDP, a bulk sender and sink, a long-lived line stream; busybox has none),
    and /www/cgi-bin/id: GET answers "<hostname> <client address>" (httpd
    listens on a dual-stack socket: [::ffff:a.b.c.d] is a.b.c.d). No
    registry: scripts/oci-tar makes the tarball."""
    with tempfile.TemporaryDirectory() as tmp:
        r = Path(tmp)
        for d in ("bin", "etc", "tmp", "root", "proc", "sys", "dev", "www/cgi-bin"):
            (r / d).mkdir(parents=True, exist_ok=True)
        (r / "tmp").chmod(0o1777)
        shutil.copy2("/bin/busybox", r / "bin/busybox")
        run(["gcc", "-static", "-Os", "-s", "-o", str(r / "bin/probe"), str(SCRIPTS / "cluster-probe.c")],
            check=True, timeout=120)
        for applet in run([str(r / "bin/busybox"), "--list"], check=True).stdout.split():
            if applet != "busybox" and not (r / "bin" / applet).exists():
                (r / "bin" / applet).symlink_to("busybox")
        (r / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
        (r / "etc/group").write_text("root:x:0:\nnobody:x:65534:\n")
        (r / "www/cgi-bin/id").write_text(CGI_ID)
        (r / "www/cgi-bin/id").chmod(0o755)
        (r / "www/index.html").write_text("ok\n")
        tar.parent.mkdir(parents=True, exist_ok=True)
        run([str(SCRIPTS / "oci-tar"), "-o", str(tar), "-t", TEST_IMAGE, "--cmd", "/bin/sh", str(r)],
            check=True, timeout=120)


# ---- scenarios --------------------------------------------------------------------------


class Steps:
    """The steps of one scenario run once, in order, each keeping its result
    or its error, so that each check asserts its own step and one step's
    failure neither hides the next nor stops it from running."""

    def __init__(self) -> None:
        self._done: dict[str, tuple[bool, object]] = {}

    def run(self, name: str, fn: Callable[[], object]) -> None:
        try:
            self._done[name] = (True, fn())
        except Exception as e:  # kept for the check that asserts this step
            self._done[name] = (False, e)

    def ok(self, name: str) -> bool:
        return self._done.get(name, (False, None))[0]

    def __getitem__(self, name: str):
        if name not in self._done:
            raise ClusterError(f"step '{name}' did not run")
        ok, v = self._done[name]
        if not ok:
            raise v  # type: ignore[misc]
        return v
