# SPDX-License-Identifier: Apache-2.0
"""Leaving the pod network: a pod reaches another node's address with its
own address (the cluster keeps pod addresses), and the outside host with
its node's (the agent masquerades)."""
import pytest

import harness

pytestmark = pytest.mark.stage(35)
NODE_PORT = 18080


def pytest_generate_tests(metafunc):
    c = harness.current()
    if "src" in metafunc.fixturenames:
        metafunc.parametrize("src", list(dict.fromkeys([c.first, c.last])))


def test_pod_to_other_node(cluster, two_nodes, workload, host_httpd, src, figures):
    dst = cluster.last if src == cluster.first else cluster.first
    host_httpd(dst, cluster.node_ip(dst), NODE_PORT)
    a = workload.echo(src)
    out = a.http(cluster.node_ip(dst), NODE_PORT)
    assert out == f"{dst} {a.ip}", (
        f"TCP {a} -> {dst}'s address {cluster.node_ip(dst)}: want '{dst} {a.ip}', got '{out}'")
    figures(f"{a.name} ({src}) -> {dst}'s address {cluster.node_ip(dst)}: {dst} sees the pod's {a.ip}")


def test_pod_to_outside_masqueraded(cluster, agent, workload, host_httpd, node, figures):
    host_httpd("outside", cluster.out_ip, 8080)
    a = workload.echo(node)
    out = a.http(cluster.out_ip, 8080)
    want = f"outside {cluster.node_ip(node)}"
    assert out == want, f"TCP {a} -> the outside host {cluster.out_ip}: want '{want}', got '{out}'"
    figures(f"{a.name} ({node}) -> the outside host {cluster.out_ip}: seen from {node}'s address "
            f"{cluster.node_ip(node)} (masqueraded)")
