# SPDX-License-Identifier: Apache-2.0
"""Pod to pod: ping, TCP (HTTP) and UDP between the two echo pods of each
node both ways, and between the first node's and every other node's both
ways; the answer comes from the pod asked, which sees the client's own
address."""
import pytest

import harness

pytestmark = pytest.mark.stage(30)


def pairs(c):
    """(client node, slot, server node, slot, kind)"""
    out = []
    for n in c.nodes:
        out += [(n, 0, n, 1, "same-node"), (n, 1, n, 0, "same-node")]
    for n in c.nodes[1:]:
        out += [(c.first, 0, n, 0, "cross-node"), (n, 0, c.first, 0, "cross-node")]
    return out


def pytest_generate_tests(metafunc):
    if "pair" in metafunc.fixturenames:
        ps = pairs(harness.current())
        metafunc.parametrize("pair", ps, ids=[f"{a}.{i}-{b}.{j}-{k}" for a, i, b, j, k in ps])


def endpoints(workload, pair):
    a, i, b, j, kind = pair
    return workload.echo(a, i), workload.echo(b, j), kind


def test_ping(workload, pair, figures):
    a, b, kind = endpoints(workload, pair)
    r = a.ping(b.ip, 3)
    assert r.received > 0, f"ping {a} -> {b} {kind}: {r.summary}"
    assert r.received == r.transmitted == 3, f"ping {a} -> {b} {kind}: {r.received}/{r.transmitted} answered"
    figures(f"{a.name} -> {b.name} {kind}: 3/3, {r.summary}")


def test_tcp(workload, pair, figures):
    a, b, kind = endpoints(workload, pair)
    out = a.http(b.ip)
    assert out == f"{b.name} {a.ip}", f"TCP {a} -> {b} {kind}: want '{b.name} {a.ip}', got '{out}'"
    figures(f"{a.name} -> {b.name} {kind}: served by {b.name}, source {a.ip} kept")


def test_udp(workload, pair, figures):
    """Five datagrams one at a time, each answered from b's socket to a's."""
    a, b, kind = endpoints(workload, pair)
    out = a.udp_ask(b.ip, 9000, 5)
    assert out == f"5/5 {b.name} {a.ip}", f"UDP {a} -> {b} {kind}: want '5/5 {b.name} {a.ip}', got '{out}'"
    figures(f"{a.name} -> {b.name} {kind}: 5/5 answered by {b.name}, source {a.ip} kept")
