# SPDX-License-Identifier: Apache-2.0
"""Nodes: Ready only once the agent wrote their conflist, and the kubernetes
Service reachable from each node through kube-proxy."""
from datetime import datetime, timezone

import pytest

pytestmark = pytest.mark.stage(10)


def test_ready(cluster, node, figures):
    assert cluster.node_ready(node), f"{node} is not Ready: {cluster.condition(node)}"
    t = {k: cluster.recorded(f"{k}-{node}") for k in ("registered", "podcidr-time", "conflist", "ready")}
    if all(t.values()):
        d = lambda a, b: float(t[b]) - float(t[a])  # noqa: E731
        figures(f"Ready {d('registered', 'ready'):.1f} s after registering: pod CIDR after "
                f"{d('registered', 'podcidr-time'):.1f} s, conflist {d('podcidr-time', 'conflist'):.1f} s later, "
                f"Ready {d('conflist', 'ready'):.1f} s after that")


def test_not_ready_before_conflist(cluster, node, figures):
    """Before the agent wrote a conflist, the node said NotReady for want of a network."""
    before = cluster.recorded(f"before-cni-{node}") or "?"
    figures(f"before its conflist: {before}")
    status, _, message = before.partition(" ")
    assert status == "False" and ("network" in message or "cni" in message), (
        f"{node} was not NotReady-for-network before its conflist: {before}")


def test_ready_after_conflist(cluster, node, figures):
    """The Ready transition (the API server's clock, whole seconds) is not before the conflist's write."""
    tr = cluster.condition(node).get("lastTransitionTime", "")
    cf = float(cluster.recorded(f"conflist-{node}") or 0)
    ready = datetime.fromisoformat(tr.replace("Z", "+00:00")).timestamp() if tr else 0
    written = datetime.fromtimestamp(int(cf), timezone.utc).strftime("%H:%M:%SZ")
    figures(f"turned Ready {tr}, conflist written {written}")
    assert ready >= int(cf), f"{node} turned Ready ({tr}) before its conflist ({written})"


def test_reaches_kubernetes_service(cluster, node):
    url = f"https://{cluster.api_svc_ip}/version"
    p = cluster.on(node, "curl", "-sf", "--max-time", "5", "--cacert", str(cluster.dir / "pki/ca.crt"), url,
                   timeout=20)
    assert p.returncode == 0, f"{node} cannot reach the kubernetes Service ({url}): {p.stderr.strip()}"
