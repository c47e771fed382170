# SPDX-License-Identifier: Apache-2.0
"""Waiting for a quiet machine before a timed run (scripts/bench's rows of
ADDs, scripts/bench --kubelet's runs of 100 pods).

The work before a run (deleted pods' network namespaces, which the kernel
destroys in a kworker after the fact, holding RTNL; containerd removing
snapshots; plugins still exiting) otherwise holds RTNL and the CPUs while
the run's ADDs start: a kubelet run of 2026-12-07 had 29 ADDs wait about
9.5 s for RTNL. For scripts/bench's row of 100 ADDs in flight, which
comes after sections that delete 3,400 namespaces, ferrite's p50 was 357
and 316 ms in the full runs of 2026-12-08 without and with the wait, and
349, 261, 265 ms (without) against 184, 312, 245 ms (with) in runs of
that row alone: the wait makes the rows start alike, it was not seen to
move them much. Quiet: SETTLE_FOR consecutive one-second windows with the
CPUs at least SETTLE_IDLE idle, no network namespace being destroyed and
no CNI plugin running. The same for every network; callers report the
wait with each run.
"""
import sys
import time
from pathlib import Path

SETTLE_IDLE = 0.75
SETTLE_FOR = 3
SETTLE_WITHIN = 180  # s; the run starts anyway after that, and says so
# Processes whose presence means a plugin's work is still going.
PLUGINS = {"ferrite", "ptp", "bridge", "host-local", "portmap", "loopback", "iptables"}


def busy_tasks() -> list:
    """Names of the tasks that mean a teardown is still going: a kworker
    destroying network namespaces ("kworker/...+netns"), a CNI plugin."""
    out = []
    for comm in Path("/proc").glob("[0-9]*/task/[0-9]*/comm"):
        try:
            name = comm.read_text().strip()
        except OSError:
            continue
        if name.endswith("+netns") or name in PLUGINS:
            out.append(name)
    return out


def cpu_idle(seconds: float = 1.0) -> float:
    """The fraction of the machine's CPU time idle over `seconds`."""
    def sample():
        f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return f[3], sum(f)
    i0, t0 = sample()
    time.sleep(seconds)
    i1, t1 = sample()
    return (i1 - i0) / max(1, t1 - t0)


def settle() -> dict:
    """Waits for a quiet machine (see SETTLE_IDLE); how long it took."""
    t0, quiet, idle, busy = time.monotonic(), 0, 0.0, []
    while quiet < SETTLE_FOR and time.monotonic() - t0 < SETTLE_WITHIN:
        idle, busy = cpu_idle(), busy_tasks()
        quiet = quiet + 1 if idle >= SETTLE_IDLE and not busy else 0
    took = time.monotonic() - t0
    settled = quiet >= SETTLE_FOR
    print(f"    settled in {took:.1f} s (CPUs {100 * idle:.0f} % idle)" if settled else
          f"    not quiet after {took:.0f} s (CPUs {100 * idle:.0f} % idle; busy: "
          f"{', '.join(sorted(set(busy))) or '-'}); the run starts anyway", file=sys.stderr, flush=True)
    return {"settle_s": took, "settled": settled, "idle": idle}


def waited(w: dict) -> str:
    """A wait as settle() returned it, for a report: seconds, and whether
    the machine got quiet ("-" for a run from before the wait)."""
    if "settle_s" not in w:
        return "-"
    return f"{w['settle_s']:.1f}" + ("" if w["settled"] else " (not quiet)")
