# SPDX-License-Identifier: Apache-2.0
"""What kube-proxy does besides pod-to-ClusterIP, checked the same way in
both install modes (scripts/cluster up, and up --kube-proxy=off, where
ferrite must do it all):

- the node's own namespace and a hostNetwork pod reach a ClusterIP (without
  kube-proxy: ferrite's host socket hooks, whose count /metrics gives: 8 in
  both modes, since they serve hostPorts too; with kube-proxy they leave
  ClusterIPs alone, so nothing is translated twice);
- hairpin: a pod reaches the Service whose only backend it is;
- a NodePort with externalTrafficPolicy Local, from the outside host: the
  node with the backend answers and the backend sees the outside host's own
  address; a node without one does not answer."""
import pytest

import harness
from harness import wait_for

pytestmark = pytest.mark.stage(45)
TRIES = 5


def hooks(cluster, node) -> int:
    for line in cluster.metrics(node).splitlines():
        if line.startswith("ferrite_services_host_socket_hooks "):
            return int(float(line.split()[-1]))
    return -1


def test_host_socket_hooks(cluster, agent, node, figures):
    want = 8
    wait_for(f"ferrite_services_host_socket_hooks {want} on {node}", 30, lambda: hooks(cluster, node) == want)
    mode = "kube-proxy runs" if cluster.kube_proxy else "no kube-proxy"
    figures(f"{node} ({mode}): {want} host socket hooks of ferrite's attached")


def test_cluster_ip_from_node(cluster, workload, node, figures):
    svc = cluster.get("service", "echo", namespace=workload.namespace)["spec"]["clusterIP"]
    out = cluster.http_from(node, f"http://{svc}/cgi-bin/id", TRIES)
    servers = sorted({a.split()[0] for a in out if a.split()})
    who = "kube-proxy" if cluster.kube_proxy else "ferrite's host socket hooks"
    what = f"{node}'s own namespace -> the echo Service {svc}:80 ({who}): {len(out)}/{TRIES} answered by {servers}"
    assert len(out) == TRIES, what
    figures(what)


@pytest.fixture(scope="module")
def host_network_pods(cluster, workload):
    ns = workload.namespace
    names = {n: f"hostnet-{n}" for n in cluster.nodes}
    objs = []
    for n, name in names.items():
        m = harness.pod_manifest(name, ns, node=n, labels={"app": "hostnet"}, command="exec sleep 1000000",
                                 ports=())
        m["spec"]["hostNetwork"] = True
        objs.append(m)
    cluster.apply(*objs)
    cluster.wait_pods_ready(ns, names.values(), timeout=120)
    return {n: cluster.pod(ns, name) for n, name in names.items()}


def test_cluster_ip_from_host_network_pod(cluster, workload, host_network_pods, node, figures):
    svc = cluster.get("service", "echo", namespace=workload.namespace)["spec"]["clusterIP"]
    p = host_network_pods[node]
    answers = [p.http(svc, 80, timeout=3) for _ in range(TRIES)]
    good = [a for a in answers if a.startswith("echo-")]
    what = f"hostNetwork pod {p.name} ({node}) -> the echo Service {svc}:80: {len(good)}/{TRIES} answered"
    assert len(good) == TRIES, f"{what}: {answers}"
    figures(what)


def test_hairpin(cluster, workload, node, figures):
    a = workload.echo(node)
    ns, svc = workload.namespace, f"hairpin-{node}"
    cluster.kubectl("-n", ns, "label", "pod", a.name, f"hairpin={node}", "--overwrite")
    cluster.apply(harness.service_manifest(svc, ns, {"hairpin": node}))
    ip = cluster.get("service", svc, namespace=ns)["spec"]["clusterIP"]

    def one_endpoint():
        o = cluster.get("endpoints", svc, namespace=ns)
        return sum(len(s.get("addresses", [])) for s in o.get("subsets") or []) == 1

    wait_for(f"{svc}'s endpoint", 30, one_endpoint)
    answers = []
    for _ in range(TRIES):
        answers.append(wait_for(f"{a.name} answering itself through {ip}", 10, lambda: a.http(ip, 80) or None))
    mine = [x for x in answers if x.split()[0] == a.name]
    seen = sorted({x.split()[1] for x in answers if len(x.split()) > 1})
    what = f"{a} -> {svc} {ip}:80 (its only backend is itself): {len(mine)}/{TRIES} answered, seen from {seen}"
    assert len(mine) == TRIES, f"{what}: {answers}"
    figures(what)


def test_node_port_local(cluster, two_nodes, workload, figures):
    b = workload.echo(cluster.first)
    ns, svc = workload.namespace, "np-local"
    cluster.kubectl("-n", ns, "label", "pod", b.name, "nplocal=1", "--overwrite")
    m = harness.service_manifest(svc, ns, {"nplocal": "1"}, kind="NodePort")
    m["spec"]["externalTrafficPolicy"] = "Local"
    cluster.apply(m)
    port = cluster.get("service", svc, namespace=ns)["spec"]["ports"][0]["nodePort"]
    url = f"http://{cluster.node_ip(cluster.first)}:{port}/cgi-bin/id"
    out = wait_for(f"{svc} answering from the outside host through {cluster.first}", 30,
                   lambda: cluster.http_from("outside", url, TRIES) or None)
    out += cluster.http_from("outside", url, TRIES - len(out))
    seen = sorted({x.split()[1] for x in out if len(x.split()) > 1})
    other = cluster.http_from("outside", f"http://{cluster.node_ip(cluster.last)}:{port}/cgi-bin/id", 1)
    what = (f"NodePort {port} (externalTrafficPolicy Local, its backend {b}) from the outside host: through "
            f"{cluster.first} {len(out)}/{TRIES} answered, seen from {seen}; through {cluster.last} (no backend) "
            f"{len(other)} answered")
    assert len(out) == TRIES and all(x.split()[0] == b.name for x in out), f"{what}: {out}"
    assert seen == [cluster.out_ip], f"{what}: the backend must see the outside host's own address"
    assert not other, f"{what}: {other}"
    figures(what)
