# SPDX-License-Identifier: Apache-2.0
"""The agent's footprint at rest with 50 more pods on the first node: its
/metrics (an endpoint gauge and counters per pod, and how many series), its
resident memory and its CPU over 30 s of rest, each under a limit.

The limits (measured on this 2-core machine, 2026-12, 53 endpoints: RSS
13.3 MiB, 5.0 ms of CPU in 30 s = 0.017 % of a core, 2 threads, 16 series
per endpoint and 10 others):
- RSS <= 32 MiB: the memory the DaemonSet requests (deploy/daemonset.yaml);
- CPU <= 0.25 % of a core over 30 s at rest: 15 times what it uses (a
  resync loop or a busy poll would cross it; the DaemonSet requests 100m
  for bursts). Rest is a window in which the policy thread ran at most its
  periodic resync: the watches first go quiet (no sync for 5 s), and a
  window that saw watch events is tried again, up to 3 times;
- series per endpoint <= 24 (8 counters and 8 drop reasons today: each new
  drop reason adds one per pod), other series <= 80 (51 with the policy and
  Service threads' series, 2026-12).
"""
import time
from pathlib import Path

import pytest

import harness
from harness import Steps, since

pytestmark = pytest.mark.stage(85)
PODS = 50
WINDOW = 30  # s
WINDOWS = 3  # windows tried until one is at rest
QUIET = 5  # s without a policy sync before the first window
QUIET_MAX = 90  # s
RSS_MAX_MIB = 32
CPU_MAX_PCT = 0.25
SERIES_PER_ENDPOINT_MAX = 24
OTHER_SERIES_MAX = 80


@pytest.fixture(scope="module")
def footprint(cluster, agent, workload):
    node = cluster.first
    ns = workload.namespace
    cluster.apply(harness.deployment_manifest("idle", ns, PODS, labels={"app": "idle"}, node=node,
                                              command=["sleep", "100000"], readiness_port=None))
    steps = Steps()

    def start():
        t0 = time.monotonic()
        cluster.kubectl("-n", ns, "rollout", "status", "deployment/idle", "--timeout=300s", timeout=330)
        return since(t0)

    steps.run("pods", start)
    if steps.ok("pods"):
        steps.run("metrics", lambda: cluster.metrics(node))

        def rest():
            pid = cluster.agent_pid(node)
            proc = Path(f"/proc/{pid}")

            def cpu_ns():  # every thread's run time (schedstat), ns
                return sum(int(t.read_text().split()[0]) for t in proc.glob("task/*/schedstat"))

            def syncs():  # the policy thread wakes once per batch of watch events
                return policy_syncs(cluster.metrics(node))

            # Rest is when the watches are quiet: the cluster's last changes
            # (the pods above, the checks before) can still reach the agent.
            t0 = time.monotonic()
            last = syncs()
            while time.monotonic() - t0 < QUIET_MAX:
                time.sleep(QUIET)
                now = syncs()
                if now == last:
                    break
                last = now
            windows = []
            for _ in range(WINDOWS):
                s0, c0 = syncs(), cpu_ns()
                time.sleep(WINDOW)
                c1, s1 = cpu_ns(), syncs()
                windows.append({"cpu_ms": (c1 - c0) / 1e6, "syncs": s1 - s0})
                # At most the periodic resync ran: the window was at rest.
                if s1 - s0 <= 1:
                    break
            status = dict(line.split(":", 1) for line in (proc / "status").read_text().splitlines() if ":" in line)
            return {"windows": windows, "quiet_after_s": since(t0) - WINDOW * len(windows),
                    "rss_mib": int(status["VmRSS"].split()[0]) / 1024, "threads": int(status["Threads"])}

        steps.run("rest", rest)
    yield node, steps
    # Its pods go while the next checks run.
    cluster.kubectl("-n", ns, "delete", "deployment/idle", "--wait=false", check=False)


def parse(metrics: str):
    samples = [line for line in metrics.splitlines() if line and not line.startswith("#")]
    value = {s.split()[0]: s.split()[-1] for s in samples}
    per_endpoint = [s for s in samples if "ip=\"" in s]
    return samples, value, per_endpoint


def policy_syncs(metrics: str) -> int:
    return int(float(parse(metrics)[1].get("ferrite_policy_syncs_total", "0")))


def endpoints(metrics: str) -> int:
    return int(float(parse(metrics)[1].get("ferrite_endpoints", "0")))


def test_metrics_per_endpoint(footprint, figures):
    node, steps = footprint
    started = steps["pods"]
    text = steps["metrics"]
    samples, value, per_ep = parse(text)
    eps = endpoints(text)
    counted = sum(1 for s in samples if s.startswith("ferrite_endpoint_from_pod_packets_total{"))
    figures(f"/metrics on {node} ({PODS} idle pods Ready in {started:.1f} s): ferrite_endpoints {eps}, "
            f"per-endpoint counters for {counted} endpoints, {len(per_ep)} per-endpoint series, "
            f"{len(samples)} series in all")
    assert eps >= PODS and counted >= PODS, (
        f"/metrics on {node}: ferrite_endpoints {eps}, counters for {counted} endpoints (want >= {PODS})")


def test_series_count(footprint, figures):
    node, steps = footprint
    samples, _, per_ep = parse(steps["metrics"])
    eps = endpoints(steps["metrics"])
    assert eps > 0, "no endpoints in /metrics"
    per = len(per_ep) / eps
    other = len(samples) - len(per_ep)
    figures(f"{len(samples)} series with {eps} endpoints: {per:.1f} per endpoint "
            f"(limit {SERIES_PER_ENDPOINT_MAX}), {other} others (limit {OTHER_SERIES_MAX})")
    assert per <= SERIES_PER_ENDPOINT_MAX, (
        f"{per:.1f} series per endpoint (limit {SERIES_PER_ENDPOINT_MAX}; measured 16 when set)")
    assert other <= OTHER_SERIES_MAX, f"{other} series not per endpoint (limit {OTHER_SERIES_MAX}; measured 51 when set)"


def test_rss(footprint, figures):
    node, steps = footprint
    r = steps["rest"]
    figures(f"the agent on {node} at rest with {endpoints(steps['metrics'])} endpoints: RSS {r['rss_mib']:.1f} MiB "
            f"(limit {RSS_MAX_MIB}), {r['threads']} threads")
    assert r["rss_mib"] <= RSS_MAX_MIB, f"RSS {r['rss_mib']:.1f} MiB (limit {RSS_MAX_MIB}; measured 13.3 when set)"


def test_idle_cpu(footprint, figures):
    node, steps = footprint
    r = steps["rest"]
    seen = ", ".join(f"{w['cpu_ms']:.1f} ms with {w['syncs']} policy syncs" for w in r["windows"])
    rest = [w for w in r["windows"] if w["syncs"] <= 1]
    assert rest, (f"the agent on {node} was never at rest in {len(r['windows'])} windows of {WINDOW} s "
                  f"({seen}): something keeps waking its policy thread")
    w = rest[0]
    pct = 100 * w["cpu_ms"] / (WINDOW * 1000)
    figures(f"the agent on {node} at rest: CPU {w['cpu_ms']:.1f} ms in {WINDOW} s ({pct:.3f} % of a core; "
            f"limit {CPU_MAX_PCT} %); watches quiet after {r['quiet_after_s']:.1f} s; windows: {seen}")
    assert pct <= CPU_MAX_PCT, (
        f"CPU {w['cpu_ms']:.1f} ms in {WINDOW} s = {pct:.3f} % of a core (limit {CPU_MAX_PCT} %; "
        f"measured 0.017 % when set)")
