# SPDX-License-Identifier: Apache-2.0
"""`scripts/bench --syscalls`: every system call of one warm ferrite ADD,
grouped by what causes it (docs/bench/syscalls.md).

One ADD after a warm-up ADD and DEL (the pins exist, the IPAM store is
there), in a private node namespace with a private bpffsRoot and stateDir,
exactly as the bench's "cost of one ADD" runs it, but under `strace -f`
without -c, so that each call can be attributed: by the file or socket its
descriptor came from, by its path, or by its kind. Two ADDs are traced: as
the bench invokes it (no CNI_ARGS) and as kubelet does (K8S_POD_NAMESPACE
and K8S_POD_NAME in CNI_ARGS, which makes ADD look up the pod's policy).
Prints a markdown table, and writes it with both traces into OUT
(syscalls.md, syscalls-*.trace). Counts every call entered, exit_group
included. Asserts nothing.
"""

import os
import re
import subprocess
import time

# The groups, in the order the table lists them.
GROUPS = [
    "exec, dynamic loader, libc start-up",
    "process start-up and exit (std's runtime or ferrite's own main)",
    "a thread to enter the pod's namespace",
    "memory allocator",
    "stdin (the network configuration)",
    "log file",
    "CNI_NETNS (open, check it is a network namespace)",
    "entering the pod's namespace and back",
    "netlink sockets (open, set up, close)",
    "netlink messages (sends and receives)",
    "pins of the datapath (BPF_OBJ_GET, close)",
    "map entries (endpoint, interface, stats, policy)",
    "IPAM store (directory, lock, allocations)",
    "sysctl (IPv6 off on the host veth)",
    "possible CPUs (size of a per-CPU stats entry)",
    "random MAC addresses",
    "hash map keys (std's RandomState)",
    "result on stdout",
    "other",
]

LINE = re.compile(r"^(\d+)\s+(?:[\d:.]+\s+)?(.*)$")  # pid, [time,] call
CALL = re.compile(r"^(\w+)\((.*)$")
RET = re.compile(r"\)\s+=\s+(-?\d+|0x[0-9a-f]+|\?)")


class Classifier:
    """Attributes each call of one trace; `conf` gives the paths ADD uses."""

    def __init__(self, conf, netns):
        self.log = conf.get("logFile", "")
        self.state = conf.get("stateDir", "")
        self.netns = netns
        self.fds = {}
        self.main = None
        self.started = False
        self.maps = {}  # mmap'd address -> group, for munmap/mprotect
        self.pending = {}  # pid -> (name, group) of an unfinished call

    def group_of_path(self, path):
        if self.log and (path == self.log or path == os.path.dirname(self.log)):
            return "log file"
        if path == self.netns:
            return "CNI_NETNS (open, check it is a network namespace)"
        if path.startswith("/proc/thread-self/ns/"):
            return "entering the pod's namespace and back"
        if path.startswith("/proc/sys/"):
            return "sysctl (IPv6 off on the host veth)"
        if path == "/sys/devices/system/cpu/possible":
            return "possible CPUs (size of a per-CPU stats entry)"
        if path == "/proc/self/maps":
            return "process start-up and exit (std's runtime or ferrite's own main)"
        if self.state and path.startswith(self.state):
            return "IPAM store (directory, lock, allocations)"
        return "other"

    def classify(self, pid, name, args, ret):
        startup = "process start-up and exit (std's runtime or ferrite's own main)"
        thread = "a thread to enter the pod's namespace"
        if self.main is None:
            self.main = pid
        if pid != self.main:
            if name == "socket" and ret and ret.isdigit():
                self.fds[int(ret)] = "netlink sockets (open, set up, close)"
            return thread
        if not self.started:
            if name == "poll" and args.startswith("[{fd=0"):
                self.started = True
                return startup
            return "exec, dynamic loader, libc start-up"
        fd = re.match(r"(-?\d+)", args)
        fd = int(fd.group(1)) if fd else None
        path = re.search(r'"([^"]*)"', args)
        path = path.group(1) if path else None
        if name in ("poll", "rt_sigaction", "sigaltstack", "sched_getaffinity", "gettid",
                    "prlimit64", "exit_group"):
            return thread if "SIGRT" in args else startup
        if name in ("clone3", "clone", "futex", "rt_sigprocmask", "madvise", "set_robust_list",
                    "rseq", "exit"):
            return thread
        if name == "mmap":
            group = "memory allocator"
            if "MAP_STACK" in args:
                size = int(args.split(",")[1])
                group = thread if size > 1 << 20 else startup
            if ret:
                self.maps[ret] = group
            return group
        if name in ("mprotect", "munmap"):
            addr = args.split(",")[0]
            for base, group in self.maps.items():
                if base.startswith("0x") and addr.startswith("0x") and \
                        0 <= int(addr, 16) - int(base, 16) < 1 << 22:
                    return group
            return "memory allocator"
        if name == "brk":
            return "memory allocator"
        if name == "getrandom":
            if "GRND_INSECURE" in args:
                return "hash map keys (std's RandomState)"
            if "GRND_NONBLOCK" in args:
                return "memory allocator"  # glibc's malloc keys its tcache
            return "random MAC addresses"
        if name == "getpid":
            return "log file"
        if name == "setns":
            return "entering the pod's namespace and back"
        if name == "socket":
            group = "netlink sockets (open, set up, close)"
        elif name in ("openat", "open", "mkdir", "access") or \
                (name in ("statx", "newfstatat") and path):
            # By path (statx and newfstatat of "" go by their descriptor).
            group = self.group_of_path(path or "")
            if name not in ("openat", "open"):
                return group
        elif name == "bpf":
            if "BPF_OBJ_GET" in args:
                group = "pins of the datapath (BPF_OBJ_GET, close)"
            else:
                return "map entries (endpoint, interface, stats, policy)"
        elif name in ("connect", "setsockopt"):
            return "netlink sockets (open, set up, close)"
        elif name in ("sendto", "recvfrom", "sendmsg", "recvmsg", "recvmmsg"):
            return "netlink messages (sends and receives)"
        elif fd == 0 and name == "read":
            return "stdin (the network configuration)"
        elif fd == 1 and name == "write":
            return "result on stdout"
        elif fd is not None:
            group = self.fds.get(fd, "other")
            if name == "close":
                self.fds.pop(fd, None)
            return group
        else:
            return "other"
        # A call that makes a descriptor: remember whose it is.
        if ret is not None and ret.lstrip("-").isdigit() and int(ret) >= 0:
            self.fds[int(ret)] = group
        return group


def classify_trace(text, conf, netns):
    """{group: {call: count}} for one `strace -f` output."""
    c = Classifier(conf, netns)
    out = {}
    for line in text.splitlines():
        m = LINE.match(line)
        if not m:
            continue
        pid, rest = int(m.group(1)), m.group(2)
        if rest.startswith(("+++", "---")):
            continue
        if rest.startswith("<..."):
            # The answer of an unfinished call: its descriptor, if any.
            name, group = c.pending.pop(pid, (None, None))
            r = RET.search(rest)
            if group and r and r.group(1).isdigit() and name in ("openat", "socket"):
                c.fds[int(r.group(1))] = group
            continue
        call = CALL.match(rest)
        if not call:
            continue
        name, args = call.group(1), call.group(2)
        r = RET.search(rest)
        ret = r.group(1) if r else None
        group = c.classify(pid, name, args, ret)
        if "<unfinished" in rest:
            c.pending[pid] = (name, group)
        out.setdefault(group, {})
        out[group][name] = out[group].get(name, 0) + 1
    return out


def table(columns):
    """Markdown: one row per group, one count column per trace."""
    names = list(columns)
    lines = ["| cause | " + " | ".join(names) + " | calls |",
             "|---|" + "---|" * len(names) + "---|"]
    for g in GROUPS:
        counts = [sum(columns[n].get(g, {}).values()) for n in names]
        if not any(counts):
            continue
        calls = {}
        for n in names:
            for call, k in columns[n].get(g, {}).items():
                calls[call] = max(calls.get(call, 0), k)
        lines.append(f"| {g} | " + " | ".join(str(k) for k in counts) + " | " +
                     ", ".join(f"{call} {k}" for call, k in calls.items()) + " |")
    totals = [sum(sum(v.values()) for v in columns[n].values()) for n in names]
    lines.append("| **total** | " + " | ".join(f"**{t}**" for t in totals) + " | |")
    return "\n".join(lines) + "\n"


def syscalls_bench(a, bench):
    """Traces one warm ADD, without and with Kubernetes' CNI_ARGS; `bench`
    is the scripts/bench module (Plugin, warm, pod_ids, ...)."""
    import json
    import shutil
    import tempfile
    work = tempfile.mkdtemp(prefix="ferrite-bench-syscalls-")
    os.makedirs(a.out, exist_ok=True)
    columns = {}
    p = bench.Plugin("ferrite", "10.150.0.0/24", work)
    try:
        bench.warm(p)
        for label, k8s in (("ADD (no CNI_ARGS)", None), ("ADD as kubelet calls it", "default")):
            p.k8s_namespace = k8s
            [cid] = bench.pod_ids(1, "t")
            bench.netns_batch([cid], "add")
            netns = f"/run/netns/{cid}"
            trace = os.path.join(a.out, f"syscalls-{'k8s' if k8s else 'plain'}.trace")
            with bench.InNetns(p.node):
                r = subprocess.run(["strace", "-f", "-o", trace, p.bin], input=p.conf,
                                   env=p.env("ADD", cid, netns), capture_output=True)
                p.call("DEL", cid)
            bench.netns_batch([cid], "del")
            if r.returncode != 0:
                raise RuntimeError(f"traced ADD failed: {r.stdout!r} {r.stderr!r}")
            columns[label] = classify_trace(open(trace).read(), json.loads(p.conf), netns)
    finally:
        p.close()
        shutil.rmtree(work, ignore_errors=True)
    md = (f"System calls of one warm ferrite ADD ({p.bin}), "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, by cause:\n\n" + table(columns))
    with open(os.path.join(a.out, "syscalls.md"), "w") as f:
        f.write(md)
    print(md)
