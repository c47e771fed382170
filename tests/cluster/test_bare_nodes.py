# SPDX-License-Identifier: Apache-2.0
"""A node whose /opt/cni/bin started empty (FERRITE_CLUSTER_BARE_NODES, by
default the last): containerd's CRI runs `loopback` for every sandbox, so
its pods start only if the agent brought loopback along (as it brings
portmap)."""
import os
import re

import pytest

pytestmark = pytest.mark.stage(25)


def test_bare_node_runs_pods(cluster, agent, workload, bare_node, figures):
    before = cluster.recorded(f"state-before-{bare_node}") or ""
    had = [line.split()[1] for line in before.splitlines() if line.startswith("cni-bin ")]
    assert not had, f"{bare_node} was to start with an empty /opt/cni/bin, but it had: {' '.join(had)}"
    bin_dir = cluster.node_dir(bare_node) / "fs/opt/cni/bin"
    have = sorted(os.listdir(bin_dir)) if bin_dir.is_dir() else []
    pods = workload.echo_by_node.get(bare_node, [])
    if not (os.access(bin_dir / "loopback", os.X_OK) and len(pods) >= 2):
        events = cluster.kubectl("-n", workload.namespace, "get", "events", "--field-selector",
                                 "reason=FailedCreatePodSandBox", "-o",
                                 "jsonpath={range .items[*]}{.message}{\"\\n\"}{end}", check=False)
        why = re.search(r'failed to find plugin "*[a-z0-9-]*"* in path[^,]*', events)
        pytest.fail(f"{bare_node} started with an empty /opt/cni/bin: now it holds '{' '.join(have) or 'nothing'}'"
                    f" (no loopback?), {len(pods)} of its echo pods run" + (f": {why.group(0)}" if why else ""))
    figures(f"started with an empty /opt/cni/bin: the agent installed {' '.join(have)}; its pods run "
            f"({', '.join(str(p) for p in pods)})")
