# SPDX-License-Identifier: Apache-2.0
"""The workload the next checks use: the echo Deployment (two pods a node)
and the peer pods, Ready, each pod with an address from its node's pod CIDR."""
import pytest

import harness
from harness import in_cidr

pytestmark = pytest.mark.stage(20)


def test_echo_pods_ready(workload, figures):
    assert workload.rollout is not None, (
        f"the echo Deployment did not become ready in 180 s: {workload.rollout_error}")
    figures(f"{workload.replicas} pods Running and Ready in {workload.rollout:.1f} s")


def test_peer_pods_ready(cluster, two_nodes, workload, figures):
    assert workload.peers_ready is not None, f"peer pods not Ready in 120 s: {workload.peers_error}"
    figures(f"peer-{cluster.first} and peer-{cluster.last} Ready in {workload.peers_ready:.1f} s")


def pytest_generate_tests(metafunc):
    if "slot" in metafunc.fixturenames:
        c = harness.current()
        slots = [f"{n}/echo{i}" for n in c.nodes for i in (0, 1)]
        if len(c.nodes) >= 2:
            slots += [f"peer-{c.first}", f"peer-{c.last}"]
        metafunc.parametrize("slot", slots)


def test_pod_address(cluster, workload, slot, figures):
    """Each node runs two echo pods (and its peer); each pod's address is in its node's pod CIDR."""
    if slot.startswith("peer-"):
        pod = next((p for p in workload.pods if p.name == slot), None)
        assert pod is not None, f"no pod {slot}"
    else:
        node, i = slot.split("/echo")
        pod = workload.echo(node, int(i))
    cidr = cluster.podcidr(pod.node)
    assert pod.ip, f"{pod.name} on {pod.node} has no address"
    figures(f"{pod.name} on {pod.node}: {pod.ip} in {cidr}")
    assert in_cidr(pod.ip, cidr), f"{pod.name} on {pod.node} has {pod.ip}, outside {pod.node}'s {cidr}"
