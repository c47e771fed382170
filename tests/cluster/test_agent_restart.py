# SPDX-License-Identifier: Apache-2.0
"""The agent's pod replaced under load: a TCP connection across nodes, a
line every 100 ms, while the first node's agent pod is deleted and the
DaemonSet's new one becomes Ready: no break, no gap over 1 s, and the node's
network (conflist, CNI binaries, routes, nftables, pins and their inodes,
uplink programs) exactly as it was."""
import re
import time

import pytest

from harness import ClusterError, Steps, since, state_diff, state_summary, wait_for

pytestmark = pytest.mark.stage(80)
MAX_GAP_MS = 1000
READY_WITHIN = 90  # s


@pytest.fixture(scope="module")
def replaced(cluster, two_nodes, agent, workload):
    a, b = workload.peers()
    node = cluster.first
    steps = Steps()
    steps.run("before", lambda: cluster.node_state(node))

    def says(pattern):
        return lambda: re.search(pattern, a.out("cat /tmp/stream.out 2>/dev/null"))

    def stream():
        a.exec(f"rm -f /tmp/stop; probe stream {b.ip} 9001 /tmp/stop </dev/null >/tmp/stream.out 2>&1 &")
        try:
            wait_for("the stream to connect", 15, says("connected|broken"))
        except ClusterError as e:
            raise AssertionError(f"the stream {a.name} -> {b.name} did not connect: {a.out('cat /tmp/stream.out')}") from e
        pods = cluster.agent_pods(node)
        assert pods, f"no agent pod on {node}"
        old = pods[0][0]
        t0 = time.monotonic()
        cluster.kubectl("-n", "kube-system", "delete", "pod", old, "--wait=true", "--timeout=60s",
                        timeout=90, check=False)
        try:
            wait_for(f"a new agent pod on {node}", READY_WITHIN,
                     lambda: any(n != old and ready for n, ready in cluster.agent_pods(node)))
            t_ready = since(t0)
        except ClusterError:
            t_ready = None
        # The new agent's start-up sync is over once it is Ready; one more
        # second of the stream, then it stops.
        time.sleep(1)
        a.exec("touch /tmp/stop")
        wait_for("the stream to end", 10, says("kept|broken"))
        return old, t_ready, a.out("tail -n 1 /tmp/stream.out")

    steps.run("stream", stream)
    steps.run("after", lambda: cluster.node_state(node))
    return node, a, b, steps


def test_stream_kept(replaced, figures):
    node, a, b, steps = replaced
    old, t_ready, last = steps["stream"]
    assert t_ready is not None, f"no new agent pod Ready on {node} {READY_WITHIN} s after deleting {old}"
    m = re.fullmatch(r"kept: (\d+) lines, longest gap (\d+) ms", last)
    assert m, f"TCP stream {a.name} -> {b.name} across the agent's replacement: {last} (want kept)"
    lines, gap = int(m.group(1)), int(m.group(2))
    figures(f"{a.name} ({a.node}) -> {b.name} ({b.node}) kept while {node}'s agent pod was replaced (new one "
            f"Ready {t_ready:.1f} s after the delete): {lines} lines, one connection, longest gap {gap} ms")
    assert gap <= MAX_GAP_MS, f"longest gap {gap} ms (want <= {MAX_GAP_MS})"


def test_node_unchanged(replaced, figures):
    node, _, _, steps = replaced
    before, after = steps["before"], steps["after"]
    steps["stream"]  # the replacement happened
    diff = state_diff(before, after)
    assert not diff, f"{node} changed by the new agent: {'; '.join(diff[:10])}"
    figures(f"{node} unchanged by the new agent: {state_summary(after)}")

