# SPDX-License-Identifier: Apache-2.0
"""The cross-node fast path: a bulk transfer between the peer pods leaves
the sender by redirect (bpf_fib_lookup + bpf_redirect_neigh) and reaches the
receiver redirected in (bpf_redirect_peer at the uplink's TCX ingress)."""
import re

import pytest

pytestmark = pytest.mark.stage(55)
# 64 MiB: a few thousand packets (GSO), so a stray ARP request cannot decide the share.
BYTES = 64 * 1024 * 1024
MIN_SHARE = 99.0  # per cent, both ways


def pct(a, b):
    return 100.0 * a / b if b > 0 else 0.0


def test_fast_path(cluster, two_nodes, agent, workload, figures):
    if not cluster.fast_path_on():
        pytest.skip('fastPath is not "true" in the ferrite-config ConfigMap')
    a, b = workload.peers()
    s0, r0 = cluster.ep_stats(a.node, a.ip), cluster.ep_stats(b.node, b.ip)
    assert s0 and r0, f"no counters for the peer pods ({a}: {s0}, {b}: {r0})"
    p = a.exec(f"probe send {b.ip} 9002 {BYTES}", timeout=120)
    assert p.returncode == 0, f"{a.name} -> {b.name}: {(p.stdout + p.stderr).strip()}"
    s1, r1 = cluster.ep_stats(a.node, a.ip), cluster.ep_stats(b.node, b.ip)
    assert s1 and r1, "the peer pods' counters went away"
    s, r = s1 - s0, r1 - r0
    share, in_share = pct(s.redirected, s.from_pod), pct(r.redirected_in, s.redirected)
    rate = re.sub(r".*, ", "", p.stdout.strip())
    fig = (f"{a.name} ({a.node}) -> {b.name} ({b.node}), {BYTES >> 20} MiB ({rate}): sender {s.redirected}/"
           f"{s.from_pod} packets left by redirect ({share:.2f} %), receiver {r.redirected_in} redirected in "
           f"({in_share:.2f} %), {r.via_stack} via the stack; ACKs {r.redirected}/{r.from_pod} redirected, "
           f"{s.redirected_in} redirected in")
    figures(fig)
    assert share >= MIN_SHARE and in_share >= MIN_SHARE, f"want >= {MIN_SHARE} % both ways: {fig}"
