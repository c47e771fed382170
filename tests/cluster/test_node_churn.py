# SPDX-License-Identifier: Apache-2.0
"""A node leaves and comes back. The last node goes (its kubelet stopped, its
Node deleted): the route to its pod CIDR leaves the other nodes. It returns
(its kubelet started: a new Node, a new pod CIDR): its route appears on them.
Both within 5 s: `ip -ts monitor route` on the other nodes times the routes;
the deletion's start, and the controller-manager's log line giving the Node
its pod CIDR, time the causes. Then its agent (still running: a stopped
kubelet leaves pods alone) rewrites its conflist, and the node turns Ready."""
import time
from datetime import datetime

import pytest

from harness import ClusterError, Steps, wait_for

pytestmark = pytest.mark.stage(90)
WITHIN_MS = 5000


def monitor_time(line: str) -> float:
    """"[2026-11-25T17:43:57.647833] ..." (local time): epoch seconds."""
    return datetime.fromisoformat(line[1:line.index("]")]).timestamp()


def klog_time(line: str) -> float:
    """"I1125 17:42:40.706326 ..." (local time, this year): epoch seconds."""
    md, hms = line[1:5], line.split()[1]
    return datetime.strptime(f"{time.localtime().tm_year}{md} {hms}", "%Y%m%d %H:%M:%S.%f").timestamp()


@pytest.fixture(scope="module")
def churn(cluster, two_nodes, agent, workload):
    last, others = cluster.last, cluster.nodes[:-1]
    via = cluster.node_ip(last)
    steps = Steps()
    # The test pods on the last node go first: its kubelet is about to stop.
    steps.run("pods gone", lambda: cluster.delete_test_pods(workload.namespace, node=last))
    old = cluster.podcidr(last)
    logs = {o: cluster.dir / "logs" / f"routes-{o}.log" for o in others}

    def route_event(o: str, text: str) -> str | None:
        """The first event of a proto-71 route via the last node starting with text."""
        for line in logs[o].read_text().splitlines() if logs[o].exists() else []:
            if f"] {text} via {via} " in line and "proto 71" in line:
                return line
        return None

    def times_ms(text: str, since_epoch: float) -> dict[str, float]:
        events = {o: route_event(o, text) for o in others}
        return {o: 1000 * (monitor_time(e) - since_epoch) for o, e in events.items() if e}

    for o in others:
        logs[o].write_text("")
        cluster.daemon(f"routes-{o}", o, "ip", "-ts", "monitor", "route")

    def remove():
        cluster.script("kubelet", last, "stop")
        t0 = time.time()
        cluster.kubectl("delete", "node", last)
        try:
            wait_for(f"{last}'s route to go", 30, lambda: len(times_ms(f"Deleted {old}", t0)) == len(others))
        except ClusterError as e:
            raise AssertionError(f"{last} deleted: the route to its {old} is still on {others} after 30 s") from e
        return old, times_ms(f"Deleted {old}", t0)

    def add():
        t_k = time.time()
        cluster.script("kubelet", last, "start")
        new = wait_for(f"{last} to register with a pod CIDR", 90, lambda: cluster.podcidr(last))
        cm = (cluster.dir / "logs/kube-controller-manager.log").read_text().splitlines()
        lines = [line for line in cm if f"Set node {last} PodCIDR to [{new}]" in line]
        t_c = klog_time(lines[-1]) if lines else time.time()
        try:
            wait_for(f"{last}'s new route", 30, lambda: len(times_ms(new, t_c)) == len(others))
        except ClusterError as e:
            raise AssertionError(f"{last} registered again with {new}: no route to it on {others} after 30 s") from e
        return new, t_c - t_k, t_c, times_ms(new, t_c)

    try:
        steps.run("removed", remove)
        steps.run("added", add)
    finally:
        for o in others:
            cluster.stop_daemon(f"routes-{o}")
        if not cluster.alive(f"kubelet-{last}"):
            cluster.script("kubelet", last, "start")
    if steps.ok("added"):
        new, _, t_c, _ = steps["added"]
        # The harness's own route in the control plane's namespace follows.
        cluster.on("cp", "ip", "route", "del", old, timeout=10)
        cluster.on("cp", "ip", "route", "replace", new, "via", via, "dev", "eth0", timeout=10, check=True)
        (cluster.dir / f"podcidr-{last}").write_text(new + "\n")
        conf = cluster.node_dir(last) / "fs/etc/cni/net.d/10-ferrite.conflist"

        def rewritten():
            try:
                wait_for(f"{last}'s conflist for {new}", 60, lambda: f'"{new}"' in conf.read_text())
            except ClusterError as e:
                text = conf.read_text() if conf.exists() else "(none)"
                raise AssertionError(f"{last}'s conflist does not name its new pod CIDR {new}: "
                                     f"{''.join(text.split())[:300]}") from e
            # The controller-manager logs after its update: the agent may be first.
            written = 1000 * (conf.stat().st_mtime - t_c)
            try:
                wait_for(f"{last} Ready", 60, lambda: cluster.node_ready(last))
            except ClusterError as e:
                raise AssertionError(f"{last} not Ready 60 s after its conflist for {new}") from e
            return written

        steps.run("conflist", rewritten)
    return last, steps


def fmt(times: dict[str, float]) -> str:
    return ", ".join(f"{o} {ms:.0f} ms" for o, ms in times.items())


def test_test_pods_gone_first(churn, figures):
    last, steps = churn
    figures(f"the test pods on {last} gone in {steps['pods gone']:.1f} s")


def test_route_removed(churn, figures):
    last, steps = churn
    cidr, times = steps["removed"]
    figures(f"{last} deleted: the route to its {cidr} left the other nodes (from kubectl delete node): {fmt(times)}")
    assert all(ms <= WITHIN_MS for ms in times.values()), f"after {fmt(times)} (want <= {WITHIN_MS} ms)"


def test_route_added(churn, figures):
    last, steps = churn
    new, registered, _, times = steps["added"]
    figures(f"{last} registered again and got {new} {registered:.2f} s after its kubelet started; its route on "
            f"the other nodes (from the controller-manager's log line): {fmt(times)}")
    assert all(ms <= WITHIN_MS for ms in times.values()), f"after {fmt(times)} (want <= {WITHIN_MS} ms)"


def test_conflist_rewritten(churn, figures):
    last, steps = churn
    written = steps["conflist"]
    figures(f"{last}'s agent rewrote its conflist for {steps['added'][0]} ({written:.0f} ms from the "
            f"controller-manager's log line); {last} Ready")
