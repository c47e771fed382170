# SPDX-License-Identifier: Apache-2.0
"""Uninstall and install again. With the suite's pods gone, `kubectl delete
-f deploy/`, then `ferrite-agent uninstall` on every node (the image's
binary, run by the node's containerd with the DaemonSet's host paths): each
node is as it was before the install (scripts/cluster up recorded it). Then
`kubectl apply -f deploy/` again, so the cluster is as up left it."""
import time

import pytest

import harness
from harness import ClusterError, Steps, since, state_diff, state_summary, wait_for

pytestmark = pytest.mark.stage(95)
AGENTS_GONE_WITHIN = 60  # s after kubectl delete returns
REINSTALL_WITHIN = 120  # s


@pytest.fixture(scope="module")
def uninstalled(cluster, agent):
    steps = Steps()

    def pods_gone():
        # Nothing of the checks may still run: their pods' DEL needs the plugin.
        took = {ns: cluster.delete_test_pods(ns) for ns in cluster.test_namespaces()}
        for ns in took:
            cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
        return took

    def agents_gone():
        t0 = time.monotonic()
        said = cluster.kubectl("delete", "-f", str(cluster.deploy_dir), "--wait=true", "--timeout=60s",
                               timeout=90, check=False)
        returned = since(t0)
        try:
            wait_for("the agent pods to go", AGENTS_GONE_WITHIN,
                     lambda: not cluster.get("pods", "-l", "app.kubernetes.io/name=ferrite",
                                             namespace="kube-system")["items"])
        except ClusterError as e:
            # What the cluster says about them, for whoever reads the failure.
            pods = cluster.get("pods", "-l", "app.kubernetes.io/name=ferrite", namespace="kube-system")["items"]
            state = [(p["metadata"]["name"], p["spec"].get("nodeName"), p["status"].get("phase"),
                      p["metadata"].get("deletionTimestamp"),
                      [c.get("state") for c in p["status"].get("containerStatuses") or []]) for p in pods]
            events = cluster.kubectl("-n", "kube-system", "get", "events", "--sort-by=.lastTimestamp",
                                     check=False).splitlines()[-15:]
            raise AssertionError(f"agent pods still there {AGENTS_GONE_WITHIN} s after kubectl delete -f deploy/ "
                                 f"returned ({returned:.1f} s, saying {said.strip()!r}): {state}; "
                                 f"events: {events}") from e
        return returned, since(t0)

    def uninstall(node):
        ref = cluster.recorded("image-ref")
        assert ref, "no image-ref in the state dir"
        t0 = time.monotonic()
        mounts = []
        for src, dst in (("/opt/cni/bin", "/host/opt/cni/bin"), ("/etc/cni/net.d", "/host/etc/cni/net.d"),
                         ("/sys/fs/bpf", "/sys/fs/bpf"), ("/var/lib/ferrite", "/var/lib/ferrite")):
            mounts += ["--mount", f"type=bind,src={src},dst={dst},options=rbind:rw"]
        p = cluster.on(node, "ctr", "-a", "/run/containerd/containerd.sock", "-n", "k8s.io", "run", "--rm",
                       "--net-host", "--privileged", "--cgroup", f"/{cluster.prefix}-{node}/ferrite-uninstall",
                       *mounts, ref, f"ferrite-uninstall-{node}", "/opt/ferrite/bin/ferrite-agent", "uninstall",
                       "--cni-bin-dir=/host/opt/cni/bin", "--cni-conf-dir=/host/etc/cni/net.d",
                       "--plugin-source=/opt/ferrite/bin", "--bpffs-root=/sys/fs/bpf/ferrite",
                       "--state-dir=/var/lib/ferrite", timeout=120)
        out = (p.stdout + p.stderr).strip()
        assert p.returncode == 0, f"ferrite-agent uninstall on {node} failed: {' '.join(out.splitlines()[-5:])}"
        said = [line[line.index("uninstall: "):] for line in out.splitlines() if "uninstall: " in line]
        return since(t0), said[-1] if said else out.splitlines()[-1] if out else ""

    steps.run("pods gone", pods_gone)
    steps.run("agents gone", agents_gone)
    for n in cluster.nodes:
        if steps.ok("agents gone"):
            steps.run(f"uninstall {n}", lambda n=n: uninstall(n))
        steps.run(f"state {n}", lambda n=n: cluster.node_state(n))
    reinstalled = []
    yield steps, reinstalled
    if not reinstalled:  # the cluster as up left it, whatever happened
        cluster.kubectl("apply", "-f", str(cluster.deploy_dir), check=False)


def test_pods_gone(uninstalled, figures):
    steps, _ = uninstalled
    took = steps["pods gone"]
    figures("the suite's pods gone: " + ", ".join(f"{ns} {t:.1f} s" for ns, t in took.items()))


def test_agents_gone(uninstalled, figures):
    steps, _ = uninstalled
    returned, gone = steps["agents gone"]
    figures(f"kubectl delete -f deploy/ returned in {returned:.1f} s; the agent pods gone {gone:.1f} s after it began")


def test_uninstall_on_node(uninstalled, node, figures):
    steps, _ = uninstalled
    steps["agents gone"]
    took, said = steps[f"uninstall {node}"]
    figures(f"ferrite-agent uninstall on {node} in {took:.1f} s: {said}")


def test_node_as_before(cluster, uninstalled, node, figures):
    steps, _ = uninstalled
    steps[f"uninstall {node}"]
    before = cluster.recorded(f"state-before-{node}")
    assert before is not None, f"{node}: no record of its state before the install"
    after = steps[f"state {node}"]
    diff = state_diff(before + "\n", after)
    assert not diff, f"{node} differs from before the install: {'; '.join(diff[:10])}"
    figures(f"{node} as before the install: {state_summary(after)}")


def test_reinstall(cluster, uninstalled, figures):
    _, reinstalled = uninstalled
    t0 = time.monotonic()
    reinstalled.append(True)
    cluster.kubectl("apply", "-f", str(cluster.deploy_dir))

    def installed():
        for n in cluster.nodes:
            if not list((cluster.node_dir(n) / "fs/etc/cni/net.d").glob("*.conflist")):
                return False
            if sum(1 for _, ready in cluster.agent_pods(n) if ready) != 1 or not cluster.node_ready(n):
                return False
        return True

    try:
        wait_for("ferrite on every node again", REINSTALL_WITHIN, installed, interval=1)
    except ClusterError as e:
        raise AssertionError(f"ferrite not back on every node {REINSTALL_WITHIN} s after kubectl apply -f deploy/") from e
    figures(f"kubectl apply -f deploy/ again: every node has its conflist, a Ready agent and is Ready in "
            f"{since(t0):.1f} s")
