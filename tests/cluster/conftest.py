# SPDX-License-Identifier: Apache-2.0
"""The cluster suite: checks against a cluster that `scripts/cluster up` made.

    scripts/cluster up && scripts/cluster check [PYTEST ARGS]
    # or: FERRITE_CLUSTER_DIR=... python3 -m pytest tests/cluster [-k ...]

One module per area. Modules run in the order of their `stage` mark (no mark:
60, after the read-only checks and before the ones that replace the agent,
remove a node and uninstall ferrite). A check states its figures with the
`figures` fixture: they are printed at the end of the run and written, with
every check's outcome, to target/cluster/summary.txt (another name in that
directory: $FERRITE_CLUSTER_SUMMARY).

Fixtures: `cluster` (harness.Cluster), `workload` (the echo Deployment, two
pods a node, its Service and a probe-free peer pod on the first and the
last node), `namespaces` (make labelled namespaces, gone at the end),
`host_httpd` (an HTTP server in a node's or the outside host's own
network), `agent` (skips unless ferrite's agent installed the network).
Parameters: a test that takes `node` runs once per node, `bare_node` once
per node that started without CNI plugins.

Under CI=true nothing may skip: a skip fails the run.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import harness
from harness import Cluster, ClusterError, Pod

CI = os.environ.get("CI") == "true"
DEFAULT_STAGE = 60
SUMMARY = Path(os.environ.get("CARGO_TARGET_DIR", harness.REPO / "target"))
SUMMARY = ((SUMMARY if SUMMARY.is_absolute() else harness.REPO / SUMMARY) / "cluster"
           / os.environ.get("FERRITE_CLUSTER_SUMMARY", "summary.txt"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "stage(n): modules run in increasing stage (default 60)")
    config._ferrite = {"cluster": None, "results": [], "t0": time.time()}


def get_cluster(config: pytest.Config) -> Cluster:
    try:
        config._ferrite["cluster"] = harness.current()
    except ClusterError as e:
        raise pytest.UsageError(str(e)) from e
    return config._ferrite["cluster"]


def pytest_collection(session: pytest.Session) -> None:
    get_cluster(session.config)  # no cluster: one usage error, not one per module


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    c = get_cluster(metafunc.config)
    if "node" in metafunc.fixturenames:
        metafunc.parametrize("node", c.nodes)
    if "bare_node" in metafunc.fixturenames:
        metafunc.parametrize("bare_node", c.bare_nodes)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def stage(item: pytest.Item) -> int:
        mark = item.get_closest_marker("stage")
        return mark.args[0] if mark else DEFAULT_STAGE

    items.sort(key=stage)  # stable: a module's tests keep their order


# ---- CI: a skip is a failure ---------------------------------------------------------


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    rep = yield
    if CI and rep.skipped and not hasattr(rep, "wasxfail"):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = f"skipped under CI=true, where nothing may skip: {reason}"
    return rep


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    rep = yield
    if CI and rep.skipped:
        rep.outcome = "failed"
        rep.longrepr = f"a module skipped under CI=true, where nothing may skip: {rep.longrepr}"
    return rep


# ---- figures and the summary ---------------------------------------------------------


@pytest.fixture
def figures(request: pytest.FixtureRequest):
    """figures(text): what a check measured, for the README and the issues."""

    def add(text: str) -> None:
        print(f"  {request.node.name}: {text}")
        request.node.user_properties.append(("figure", text))

    return add


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        msg = ""
        if report.outcome != "passed":
            crash = getattr(report.longrepr, "reprcrash", None)
            msg = crash.message if crash else str(report.longrepr).strip().splitlines()[-1]
        figs = [v for k, v in report.user_properties if k == "figure"]
        _results.append((report.nodeid, report.outcome, report.duration, figs, msg))


_results: list[tuple[str, str, float, list[str], str]] = []


def _summary_lines() -> list[str]:
    lines = []
    for nodeid, outcome, duration, figs, msg in _results:
        lines.append(f"{outcome.upper():7} {nodeid} ({duration:.1f} s)")
        lines += [f"        {f}" for f in figs]
        if msg:
            lines += [f"        {line}" for line in msg.splitlines()[:6]]
    return lines


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    if not _results:
        return
    lines = _summary_lines()
    counts = {}
    for r in _results:
        counts[r[1]] = counts.get(r[1], 0) + 1
    total = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    took = time.time() - config._ferrite["t0"]
    terminalreporter.section("cluster checks: outcomes and figures")
    for line in lines:
        terminalreporter.write_line(line)
    terminalreporter.write_line(f"{total} in {took:.0f} s; written to {SUMMARY}")
    SUMMARY.parent.mkdir(parents=True, exist_ok=True)
    c = config._ferrite["cluster"]
    head = f"cluster {c.dir} ({len(c.nodes)} nodes), {time.strftime('%Y-%m-%d %H:%M:%S')}" if c else ""
    SUMMARY.write_text("\n".join([head, *lines, f"{total} in {took:.0f} s", ""]))


# ---- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def cluster(pytestconfig: pytest.Config) -> Cluster:
    return get_cluster(pytestconfig)


@pytest.fixture(scope="session")
def agent(cluster: Cluster) -> None:
    """Skips unless ferrite's agent installed the network (scripts/cluster up
    always does now; an older state dir may say otherwise)."""
    if cluster.cni_mode != "agent":
        pytest.skip(f"needs ferrite's agent (the cluster's CNI_MODE is {cluster.cni_mode})")


@pytest.fixture(scope="session")
def two_nodes(cluster: Cluster) -> None:
    if len(cluster.nodes) < 2:
        pytest.skip("needs two nodes or more (scripts/cluster up --nodes N)")


@pytest.fixture(scope="session")
def test_image(cluster: Cluster) -> str:
    """The workload image, imported on every node."""
    cluster.ensure_test_image()
    return harness.TEST_IMAGE


@pytest.fixture(scope="session")
def namespaces(cluster: Cluster, test_image: str):
    """make(name, labels=None): a namespace for a suite's pods, labelled as
    the suite's; all of them are deleted at the end (FERRITE_CLUSTER_KEEP=1
    keeps them)."""
    made: list[str] = []

    def make(name: str, labels: dict[str, str] | None = None) -> str:
        cluster.namespace(name, labels)
        made.append(name)
        return name

    yield make
    if os.environ.get("FERRITE_CLUSTER_KEEP") != "1":
        for ns in made:
            cluster.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found", check=False)


@pytest.fixture(scope="session")
def host_httpd(cluster: Cluster):
    """start(part, addr, port): HTTP in a part's own network namespace
    (GET /cgi-bin/id answers "<part> <client address>"); stopped at the end."""
    started: set[str] = set()

    def start(part: str, addr: str, port: int) -> None:
        cluster.host_httpd(part, addr, port)
        started.add(f"httpd-{part}")

    yield start
    for name in started:
        cluster.stop_daemon(name)


@dataclass
class Workload:
    """The echo Deployment (two pods a node, spread; the `echo` Service's
    backends) and, with two nodes or more, a peer pod on the first and the
    last node that no probe touches: only the checks' own traffic passes
    through them, so their counters measure the fast path."""

    namespace: str
    replicas: int
    pods: list[Pod]
    rollout: float | None  # seconds, None when it did not finish
    rollout_error: str = ""
    peers_ready: float | None = None
    peers_error: str = ""
    echo_by_node: dict[str, list[Pod]] = field(default_factory=dict)
    peer_a: Pod | None = None
    peer_b: Pod | None = None

    def echo(self, node: str, slot: int = 0) -> Pod:
        """The slot-th echo pod on node (by name), or an error saying it is missing."""
        pods = self.echo_by_node.get(node, [])
        if len(pods) <= slot:
            raise ClusterError(f"{node} runs {len(pods)} echo pods, no #{slot + 1}")
        return pods[slot]

    def peers(self) -> tuple[Pod, Pod]:
        if not (self.peer_a and self.peer_b):
            raise ClusterError(f"the peer pods are not Ready: {self.peers_error or 'one node'}")
        return self.peer_a, self.peer_b


@pytest.fixture(scope="session")
def workload(cluster: Cluster, namespaces) -> Workload:
    # A fresh namespace each run: an earlier one may still be going away.
    for old in cluster.test_namespaces():
        if old.startswith("ferrite-check"):
            cluster.kubectl("delete", "namespace", old, "--wait=false", check=False)
    ns = namespaces(f"ferrite-check-{int(time.time())}")
    c = cluster
    replicas = 2 * len(c.nodes)
    objs = [harness.deployment_manifest("echo", ns, replicas, labels={"app": "echo"}, spread=True),
            harness.service_manifest("echo", ns, {"app": "echo"})]
    peers = [f"peer-{c.first}", f"peer-{c.last}"] if len(c.nodes) >= 2 else []
    objs += [harness.pod_manifest(p, ns, node=p.removeprefix("peer-"), labels={"app": "peer"}) for p in peers]
    c.apply(*objs)
    t0 = time.monotonic()
    w = Workload(ns, replicas, [], None)
    try:
        c.kubectl("-n", ns, "rollout", "status", "deployment/echo", "--timeout=180s", timeout=200)
        w.rollout = harness.since(t0)
    except ClusterError as e:
        pods = c.kubectl("-n", ns, "get", "pods", "-o", "wide", check=False)
        w.rollout_error = f"{e}\n{pods}"
    if peers:
        try:
            c.wait_pods_ready(ns, peers, timeout=120)
            w.peers_ready = harness.since(t0)
        except ClusterError as e:
            w.peers_error = str(e)
    w.pods = c.pods(ns)
    for p in w.pods:
        if p.labels.get("app") == "echo" and p.ip:
            w.echo_by_node.setdefault(p.node, []).append(p)
    if w.peers_ready is not None:
        w.peer_a, w.peer_b = (next(p for p in w.pods if p.name == n) for n in peers)
    print("\n" + "\n".join(f"        {p.name} {p.node} {p.ip}" for p in w.pods))
    return w
