# SPDX-License-Identifier: Apache-2.0
"""A node's own address to a pod on another node (hostNetwork pods, a
kubelet probing, kube-proxy sending a NodePort connection on): the
receiving node must let its stack see the request, or conntrack calls the
pod's reply INVALID and kube-proxy's KUBE-FORWARD rule drops it."""
import pytest

import harness

pytestmark = pytest.mark.stage(45)
TRIES = 5


def pytest_generate_tests(metafunc):
    if "direction" in metafunc.fixturenames:
        c = harness.current()
        ds = [(c.first, c.last), (c.last, c.first)] if len(c.nodes) >= 2 else []
        metafunc.parametrize("direction", ds, ids=[f"{s}-{d}" for s, d in ds])


def test_http(cluster, two_nodes, workload, direction, figures):
    src, dst = direction
    b = workload.echo(dst)
    want = f"{b.name} {cluster.node_ip(src)}"
    out = cluster.http_from(src, f"http://{b.ip}:8080/cgi-bin/id", TRIES)
    what = f"{src}'s namespace ({cluster.node_ip(src)}) -> {b}"
    assert out == [want] * TRIES, f"TCP {what}: want {TRIES} answers '{want}', got {len(out)}: {out[:1]}"
    figures(f"{what}: {TRIES}/{TRIES} HTTP answers (3 s each at most), source {cluster.node_ip(src)} kept")


def test_ping(cluster, two_nodes, workload, direction, figures):
    src, dst = direction
    b = workload.echo(dst)
    # busybox's ping (the machine may have no other): 3 echoes, all answered.
    p = cluster.on(src, "busybox", "ping", "-c", "3", "-i", "0.2", "-W", "2", b.ip, timeout=30)
    r = harness.parse_ping(p.stdout + p.stderr)
    what = f"{src}'s namespace ({cluster.node_ip(src)}) -> {b}"
    assert r.received == r.transmitted == 3, f"ping {what}: {r.received}/{r.transmitted}, {r.summary}"
    figures(f"{what}: 3/3, {r.summary}")
