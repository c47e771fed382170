# SPDX-License-Identifier: Apache-2.0
"""hostPorts, served by ferrite's datapath (no portmap): a CNI ADD writes a
frontend (hostIP, or every address of the node; hostPort; protocol) to the
pod's address and containerPort, DEL removes it.

- Kubernetes' conformance scenario "HostPort validates that there is no
  conflict between pods with same hostPort but different hostIP and
  protocol", on the first node: hp-local (54321/tcp on 127.0.0.1), hp-tcp
  (54321/tcp on the node's address) and hp-udp (54321/udp on the node's
  address); from the node's own namespace (the cgroup socket hooks) each
  address and protocol reaches its own pod, and from the outside host
  (from_uplink) the node's address reaches hp-tcp and hp-udp;
- hp-any, hostIP unspecified, 28080 tcp and udp, on the last node: reached
  at that node's address from the outside host, from a pod on another
  node, from a pod on the node itself (from_pod), and from the node's own
  namespace at its address and at 127.0.0.1;
- `ferrite services` on each node lists its own pods' hostPorts (and no
  other node's); once hp-any is deleted its lines go and the outside host's
  connection to the node's address:28080 is refused or times out at once.

Every answer names the pod that served it (its hostname is its name: the
test image's /cgi-bin/id and `probe udp-serve` answer "<hostname> <client>").
"""
import time
from dataclasses import dataclass

import pytest

import harness
from harness import ClusterError, Pod, Timeout, wait_for

pytestmark = pytest.mark.stage(48)
TRIES = 3
# The conformance test's port (in the ephemeral range: a node's own
# connection may have it as its source port, and its answers must still reach
# the node, not the pod).
CONFLICT_PORT = 54321
# hp-any's: no other check uses it, below the NodePort range (30000-32767)
# and the ephemeral one (32768-60999); not 18080 (test_leaving's host httpd).
ANY_PORT = 28080
HTTP, UDP = 8080, 9000  # what every test pod serves (harness.pod_servers)
READY_WITHIN = 90  # s
# s from a pod's deletion to its CNI DEL's removal of its hostPorts (grace
# period 1 s; the DEL comes when the kubelet has stopped the pod's sandbox)
UNMAPPED_WITHIN = 60

# One datagram per socket (each a new flow), 1 s for its answer, from a
# socket connected to addr:port, so only an answer from there counts (the
# reverse translation); prints the answer, or "- <why>" for none.
UDP_ASK = r"""
import socket, sys
addr, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(n):
    s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1)
    try:
        s.connect((addr, port))
        s.send(b"ask %d" % i)
        print(s.recv(512).decode().strip() or "- empty", flush=True)
    except OSError as e:
        print("- " + type(e).__name__, flush=True)
    finally:
        s.close()
"""

# Case 1 (the conformance scenario): (from, to, protocol, pod): from the
# conflict node's own namespace or the outside host, to 127.0.0.1 or the
# node's address.
CONFLICT_CASES = [
    ("node", "127.0.0.1", "tcp", "local"),
    ("node", "address", "tcp", "tcp"),
    ("node", "address", "udp", "udp"),
    ("outside", "address", "tcp", "tcp"),
    ("outside", "address", "udp", "udp"),
]


def any_sources(c) -> list[tuple[str, str]]:
    """Case 2: (from, to) for hp-any on the last node."""
    out = [("outside", "address")]
    if len(c.nodes) >= 2:
        out.append(("pod-other-node", "address"))
    out += [("pod-same-node", "address"), ("node", "address"), ("node", "127.0.0.1")]
    return out


def pytest_generate_tests(metafunc):
    c = harness.current()
    if "conflict_case" in metafunc.fixturenames:
        metafunc.parametrize("conflict_case", CONFLICT_CASES,
                             ids=[f"{p}-{t}-from-{f}" for f, t, p, _ in CONFLICT_CASES])
    if "any_case" in metafunc.fixturenames:
        cases = [(f, t, p) for f, t in any_sources(c) for p in ("tcp", "udp")]
        metafunc.parametrize("any_case", cases, ids=[f"{p}-{t}-from-{f}" for f, t, p in cases])


# ---- the pods ------------------------------------------------------------------------


@dataclass
class HostPorts:
    namespace: str
    conflict_node: str  # hp-local, hp-tcp, hp-udp
    any_node: str  # hp-any
    pods: dict  # "local", "tcp", "udp", "any" -> Pod
    mappings: dict  # the same keys -> the lines `ferrite services` shows for the pod


def host_port_pod(name: str, ns: str, node: str, ports: list[dict]) -> dict:
    """A test pod serving HTTP on 8080 and UDP on 9000 with `ports` (each
    with its hostPort), Ready once its HTTP server listens."""
    m = harness.pod_manifest(name, ns, node=node, labels={"app": "hostport"})
    c = m["spec"]["containers"][0]
    c["ports"] = ports
    c["readinessProbe"] = {"tcpSocket": {"port": HTTP}, "periodSeconds": 1}
    return m


def mapping(host_ip: str, host_port: int, proto: str, pod_ip: str, port: int) -> str:
    """A line of `ferrite services` for one hostPort (IPv4 here: the cluster is)."""
    return f"HostPort {host_ip}:{host_port}/{proto} -> {pod_ip}:{port}"


@pytest.fixture(scope="module")
def hostports(cluster, namespaces):
    ns = namespaces(f"hostport-{int(time.time())}")
    n1, n2 = cluster.first, cluster.last
    a1 = cluster.node_ip(n1)
    specs = {
        "local": ("hp-local", n1, [{"containerPort": HTTP, "protocol": "TCP", "hostPort": CONFLICT_PORT,
                                    "hostIP": "127.0.0.1"}]),
        "tcp": ("hp-tcp", n1, [{"containerPort": HTTP, "protocol": "TCP", "hostPort": CONFLICT_PORT,
                                "hostIP": a1}]),
        "udp": ("hp-udp", n1, [{"containerPort": UDP, "protocol": "UDP", "hostPort": CONFLICT_PORT,
                                "hostIP": a1}]),
        "any": ("hp-any", n2, [{"containerPort": HTTP, "protocol": "TCP", "hostPort": ANY_PORT},
                               {"containerPort": UDP, "protocol": "UDP", "hostPort": ANY_PORT}]),
    }
    cluster.apply(*[host_port_pod(name, ns, node, ports) for name, node, ports in specs.values()])
    try:
        cluster.wait_pods_ready(ns, [s[0] for s in specs.values()], timeout=READY_WITHIN)
        pods = {k: cluster.pod(ns, s[0]) for k, s in specs.items()}
        # Their UDP servers too (readiness covers HTTP), asked at the pod's
        # own address from its node: no hostPort involved.
        for p in pods.values():
            wait_for(f"{p.name}'s UDP server at {p.ip}:{UDP}", 15,
                     lambda p=p: served_by(ask(cluster, p.node, "udp", p.ip, UDP, 1), p))
    except ClusterError as e:
        said = cluster.kubectl("-n", ns, "get", "pods", "-o", "wide", check=False)
        raise ClusterError(f"the hostPort pods are not serving: {e}\n{said}") from e
    maps = {
        "local": [mapping("127.0.0.1", CONFLICT_PORT, "tcp", pods["local"].ip, HTTP)],
        "tcp": [mapping(a1, CONFLICT_PORT, "tcp", pods["tcp"].ip, HTTP)],
        "udp": [mapping(a1, CONFLICT_PORT, "udp", pods["udp"].ip, UDP)],
        "any": [mapping("0.0.0.0", ANY_PORT, "tcp", pods["any"].ip, HTTP),
                mapping("0.0.0.0", ANY_PORT, "udp", pods["any"].ip, UDP)],
    }
    print("\n" + "\n".join(f"        {p.name} {p.node} {p.ip}" for p in pods.values()))
    yield HostPorts(ns, n1, n2, pods, maps)
    # The namespace goes at the end of the run; its hostPorts go now.
    cluster.kubectl("-n", ns, "delete", "pods", "--all", "--wait=false", check=False)


# ---- asking --------------------------------------------------------------------------


def ask(cluster, src, proto: str, addr: str, port: int, n: int = TRIES) -> list[str]:
    """n requests from a part's own namespace (a node, "outside") or from a
    pod: TCP, GET /cgi-bin/id (3 s each); UDP, a datagram from a new socket
    (1 s for its answer). The answers, "<server> <client address>"; the
    missing ones left out."""
    if isinstance(src, Pod):
        if proto == "tcp":
            out = src.out(f"for i in $(seq {n}); do printf 'GET /cgi-bin/id HTTP/1.0\\r\\n\\r\\n' | "
                          f"nc -w 2 {addr} {port} | tail -n 1; done", timeout=n * 5 + 30)
            return [ln.strip() for ln in out.splitlines() if len(ln.split()) == 2 and not ln.startswith("nc:")]
        out = src.out(f"for i in $(seq {n}); do probe udp-ask {addr} {port} 1; done", timeout=n * 3 + 30)
        return [ln.removeprefix("1/1 ").strip() for ln in out.splitlines() if ln.startswith("1/1 ")]
    if proto == "tcp":
        return cluster.http_from(src, f"http://{addr}:{port}/cgi-bin/id", n)
    p = cluster.on(src, "python3", "-c", UDP_ASK, addr, str(port), str(n), timeout=n * 2 + 20)
    return [ln.strip() for ln in p.stdout.splitlines() if ln.strip() and not ln.startswith("-")]


def served_by(answers: list[str], pod: Pod) -> list[str]:
    return [a for a in answers if a.split()[0] == pod.name]


def clients(answers: list[str]) -> str:
    return " ".join(sorted({a.split()[1] for a in answers if len(a.split()) > 1})) or "-"


def api_state(cluster, ns: str, pod: Pod) -> str:
    """Where the API has the pod: gone, or its phase and containers' states."""
    items = cluster.get("pods", "--field-selector", f"metadata.name={pod.name}", namespace=ns)["items"]
    if not items:
        return "gone from the API"
    st = items[0].get("status", {})
    states = ", ".join(f"{c.get('name')} {next(iter(c.get('state') or {'unknown': 0}))}"
                       for c in st.get("containerStatuses", []))
    return f"still in the API ({st.get('phase')}; {states or 'no containers'})"


def host_port_view(cluster, node) -> list[str]:
    """The HostPort lines of `ferrite services` on the node."""
    p = cluster.on(node, "/opt/cni/bin/ferrite", "services", timeout=30)
    if p.returncode != 0:
        raise ClusterError(f"ferrite services on {node}: exit {p.returncode}: {(p.stderr or p.stdout).strip()[-500:]}")
    return [ln.strip() for ln in p.stdout.splitlines() if ln.strip().startswith("HostPort ")]


# ---- 1: same hostPort, other hostIP or protocol ----------------------------------------


def test_no_conflict_other_host_ip_or_protocol(cluster, hostports, conflict_case, figures):
    frm, to, proto, key = conflict_case
    node = hostports.conflict_node
    pod = hostports.pods[key]
    addr = "127.0.0.1" if to == "127.0.0.1" else cluster.node_ip(node)
    src = node if frm == "node" else "outside"
    answers = ask(cluster, src, proto, addr, CONFLICT_PORT)
    mine = served_by(answers, pod)
    where = f"{node}'s own namespace" if frm == "node" else "the outside host"
    what = (f"{proto.upper()} {addr}:{CONFLICT_PORT} from {where} (hp-local on 127.0.0.1/tcp, hp-tcp on "
            f"{cluster.node_ip(node)}/tcp, hp-udp on {cluster.node_ip(node)}/udp): {len(mine)}/{TRIES} answered "
            f"by {pod.name}")
    assert len(mine) == TRIES, f"{what}; all answers: {answers}"
    figures(f"{what}, seen from {clients(mine)}")


# ---- 2: hostIP unspecified, from everywhere ----------------------------------------------


def test_host_port_any_address(cluster, workload, hostports, any_case, figures):
    frm, to, proto = any_case
    node = hostports.any_node
    pod = hostports.pods["any"]
    addr = "127.0.0.1" if to == "127.0.0.1" else cluster.node_ip(node)
    if frm == "outside":
        src, where = "outside", "the outside host"
    elif frm == "node":
        src, where = node, f"{node}'s own namespace"
    else:
        other = next(n for n in cluster.nodes if n != node) if frm == "pod-other-node" else node
        src = workload.echo(other)
        where = f"{src.name} ({other})"
    answers = ask(cluster, src, proto, addr, ANY_PORT)
    mine = served_by(answers, pod)
    what = (f"{proto.upper()} {addr}:{ANY_PORT} (hp-any on {node}, hostIP unspecified) from {where}: "
            f"{len(mine)}/{TRIES} answered by {pod.name}")
    assert len(mine) == TRIES, f"{what}; all answers: {answers}"
    figures(f"{what}, seen from {clients(mine)}")


# ---- 3: what `ferrite services` shows, and DEL -------------------------------------------


def test_services_view_lists_host_ports(cluster, hostports, node, figures):
    here = [k for k, p in hostports.pods.items() if p.node == node]
    want = [ln for k in here for ln in hostports.mappings[k]]
    elsewhere = [p.ip for p in hostports.pods.values() if p.node != node]
    view = host_port_view(cluster, node)
    missing = [ln for ln in want if ln not in view]
    foreign = [ln for ln in view if any(f"-> {ip}:" in ln for ip in elsewhere)]
    what = f"ferrite services on {node}: {len(want) - len(missing)}/{len(want)} of its pods' hostPorts listed"
    assert not missing, f"{what}; missing: {missing}; its HostPort lines: {view}"
    assert not foreign, f"{what}; other nodes' pods' hostPorts listed too: {foreign}"
    figures(f"{what}" + (f" ({'; '.join(want)})" if want else ""))


def test_host_port_gone_with_pod(cluster, hostports, figures):
    """Last in the module: deletes hp-any. What is ferrite's: its CNI DEL
    removes the pod's hostPorts. When the pod then leaves the API is the
    kubelet's (its status manager waits for the pod's containers, volumes
    and cgroup to go, re-checking every 10 s): reported, not asserted."""
    node, pod = hostports.any_node, hostports.pods["any"]
    want = hostports.mappings["any"]
    before = host_port_view(cluster, node)
    assert all(ln in before for ln in want), f"{pod} runs but ferrite services on {node} lacks {want}: {before}"

    t0 = time.monotonic()
    cluster.kubectl("-n", hostports.namespace, "delete", "pod", pod.name, "--wait=false")
    left: list[str] = []
    try:
        wait_for(f"{pod.name}'s hostPorts to leave ferrite services on {node}", UNMAPPED_WITHIN,
                 lambda: not [ln for ln in host_port_view(cluster, node) if ln in want], interval=0.5)
    except Timeout:
        left = [ln for ln in host_port_view(cluster, node) if ln in want]
    unmapped = harness.since(t0)
    assert not left, (f"{pod.name} deleted {unmapped:.0f} s ago (grace period 1 s), ferrite services on {node} "
                      f"still lists {left}; the pod as the API has it: {api_state(cluster, hostports.namespace, pod)}")

    url = f"http://{cluster.node_ip(node)}:{ANY_PORT}/cgi-bin/id"
    t1 = time.monotonic()
    p = cluster.on("outside", "curl", "-s", "--connect-timeout", "2", "--max-time", "3", url, timeout=15)
    took = harness.since(t1)
    said = {7: "refused", 28: "timed out"}.get(p.returncode, f"curl exit {p.returncode}: {p.stdout.strip()[:200]}")
    udp = ask(cluster, "outside", "udp", cluster.node_ip(node), ANY_PORT, 1)
    what = (f"{pod.name} deleted: its {len(want)} hostPorts gone from ferrite services on {node} {unmapped:.1f} s "
            f"after the delete (the pod then {api_state(cluster, hostports.namespace, pod)}); TCP "
            f"{cluster.node_ip(node)}:{ANY_PORT} from the outside host {said} in {took:.1f} s, UDP {len(udp)}/1 "
            f"answered")
    assert p.returncode in (7, 28), what
    assert not udp, f"{what}: {udp}"
    figures(what)
