# SPDX-License-Identifier: Apache-2.0
"""A NodePort Service whose only backend runs on another node than the one
whose address is dialled: kube-proxy on the entry node DNATs, masquerades
and sends the connection on to the backend's node with its own address;
without kube-proxy, ferrite does (from_uplink for the outside host, the
host socket hooks for the node's own namespace). From the outside host and
from the entry node's own namespace, both ways."""
import pytest

import harness
from harness import wait_for

pytestmark = pytest.mark.stage(50)
TRIES = 5


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        c = harness.current()
        cases = []
        if len(c.nodes) >= 2:
            for backend, entry in ((c.last, c.first), (c.first, c.last)):
                cases += [(backend, entry, "outside"), (backend, entry, entry)]
        metafunc.parametrize("case", cases, ids=[f"{e}-to-{b}-from-{f}" for b, e, f in cases])


@pytest.fixture(scope="module")
def node_ports(cluster, workload):
    """service(backend node, entry node): a NodePort Service np-BACKEND
    selecting only the backend node's first echo pod, once kube-proxy on the
    entry node has its rule: (node port, backend pod)."""
    made = {}

    def service(backend, entry):
        if (backend, entry) not in made:
            b = workload.echo(backend)
            ns, svc = workload.namespace, f"np-{backend}"
            cluster.kubectl("-n", ns, "label", "pod", b.name, f"np={backend}", "--overwrite")
            cluster.apply(harness.service_manifest(svc, ns, {"np": backend}, kind="NodePort"))
            port = cluster.get("service", svc, namespace=ns)["spec"]["ports"][0]["nodePort"]

            def programmed():
                if not cluster.kube_proxy:
                    view = cluster.on(entry, "/opt/cni/bin/ferrite", "services", timeout=30).stdout
                    return any(ln.startswith(f"NodePort {port}/tcp ") and ": 1 backends" in ln for ln in view.splitlines())
                rules = cluster.on(entry, "iptables-save", "-t", "nat", timeout=20).stdout.splitlines()
                return any(f"--to-destination {b.ip}:8080" in r and f"{ns}/{svc}" in r for r in rules)

            who = "kube-proxy" if cluster.kube_proxy else "ferrite"
            try:
                wait_for(f"{who} on {entry} to program {svc}", 30, programmed)
                made[(backend, entry)] = (port, b)
            except harness.Timeout as e:
                made[(backend, entry)] = e
        v = made[(backend, entry)]
        if isinstance(v, Exception):
            who = "kube-proxy" if cluster.kube_proxy else "ferrite"
            raise harness.ClusterError(f"NodePort np-{backend}: {who} on {entry} has no rule to its backend "
                                       f"after 30 s: {v}")
        return v

    return service


def test_node_port(cluster, two_nodes, node_ports, case, figures):
    backend, entry, part = case
    port, b = node_ports(backend, entry)
    out = cluster.http_from(part, f"http://{cluster.node_ip(entry)}:{port}/cgi-bin/id", TRIES)
    src = out[0].split()[1] if out and len(out[0].split()) > 1 else "?"
    frm = "the outside host" if part == "outside" else f"{entry}'s namespace"
    what = f"NodePort {cluster.node_ip(entry)}:{port} ({entry}) from {frm} -> its only backend {b.name} ({backend})"
    answered = [a for a in out if a.startswith(f"{b.name} ")]
    assert len(answered) == TRIES, f"{what}: want {TRIES} answers from {b.name}, got {len(answered)}: {out[:1]}"
    figures(f"{what}: {TRIES}/{TRIES} answered, seen from {src}")
