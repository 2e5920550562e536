"""Spawns and times commands from inside a network namespace; the benchmarks' hands in a netvm.

Started by the benchmark as ``nsenter --net=/run/netns/NETVM PYTHON -I -S _runner.py``,
so every command it starts runs in the netvm's network namespace and in the
host's mount namespace, exactly as the toolstack (``xl devd``/udev in the
driver domain) would start a hotplug script: fork+exec of the script, nothing
in between. Standard library only (``-I -S``).

Protocol: one JSON object per line on stdin, one JSON answer per line on stdout.

* ``{"op": "run", "argv": [...], "env": {...}, "out": PATH, "agent_pid": PID|null}``
  -> ``{"wall", "utime", "stime", "rc", "agent_cpu", "agent_ticks", "agent_children_cpu"}``:
  wall time from just before ``posix_spawn`` to ``wait4``'s return, the
  child's own rusage (``wait4``: the process and every descendant it waited
  for), and the agent's CPU time consumed meanwhile (its process CPU clock,
  nanosecond resolution, all threads, dead ones included; and the same from
  ``/proc/PID/stat`` utime+stime, in clock ticks), plus the CPU of the
  children the agent forked and reaped meanwhile (cutime+cstime, ticks).
* ``{"op": "storm", "jobs": [{"argv", "env", "out"}, ...], "agent_pid": ...}``
  -> every job spawned back to back, then reaped: ``{"wall", "rcs", "utime",
  "stime", "agent_cpu", "spawn_spread"}`` (wall from the first spawn to the last exit).
* ``{"op": "exit"}``.
"""

import json
import os
import sys
import time

CLOCK_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_clock(pid):
    """The CPU-time clock of process ``pid`` (Linux MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED))."""
    return ((~pid) << 3) | 2


def agent_cpu(pid):
    """(seconds of CPU by the clock, ticks from /proc/PID/stat utime+stime, ticks of its reaped children).

    The process CPU clock covers every thread of the agent, exited ones too,
    but not the children it forks (the iptables backend applies rules with
    extension targets in a forked child): those come from cutime+cstime,
    counted when the agent has reaped them, in clock ticks.
    """
    if not pid:
        return None, None, None
    try:
        precise = time.clock_gettime(_cpu_clock(pid))
    except OSError:
        precise = None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])
        children = int(fields[13]) + int(fields[14])
    except (OSError, IndexError, ValueError):
        ticks = children = None
    return precise, ticks, children


def _spawn(job):
    out = job.get("out") or "/dev/null"
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    return os.posix_spawn(job["argv"][0], job["argv"], job["env"], file_actions=actions)


def _rc(status):
    return os.waitstatus_to_exitcode(status)


def run(cmd):
    pid_a = cmd.get("agent_pid")
    c0, k0, ch0 = agent_cpu(pid_a)
    t0 = time.perf_counter()
    pid = _spawn(cmd)
    _, status, ru = os.wait4(pid, 0)
    t1 = time.perf_counter()
    c1, k1, ch1 = agent_cpu(pid_a)
    return {
        "wall": t1 - t0,
        "utime": ru.ru_utime,
        "stime": ru.ru_stime,
        "rc": _rc(status),
        "agent_cpu": (c1 - c0) if c0 is not None and c1 is not None else None,
        "agent_ticks": (k1 - k0) if k0 is not None and k1 is not None else None,
        "agent_children_cpu": (ch1 - ch0) / CLOCK_TICK if ch0 is not None and ch1 is not None else None,
    }


def storm(cmd):
    pid_a = cmd.get("agent_pid")
    c0, _, ch0 = agent_cpu(pid_a)
    pids = {}
    t0 = time.perf_counter()
    for i, job in enumerate(cmd["jobs"]):
        pids[_spawn(job)] = i
    t_spawned = time.perf_counter()
    rcs = [None] * len(pids)
    utime = stime = 0.0
    while pids:
        pid, status, ru = os.wait4(-1, 0)
        if pid in pids:
            rcs[pids.pop(pid)] = _rc(status)
            utime += ru.ru_utime
            stime += ru.ru_stime
    t1 = time.perf_counter()
    c1, _, ch1 = agent_cpu(pid_a)
    return {
        "wall": t1 - t0,
        "spawn_spread": t_spawned - t0,
        "rcs": rcs,
        "utime": utime,
        "stime": stime,
        "agent_cpu": (c1 - c0) if c0 is not None and c1 is not None else None,
        "agent_children_cpu": (ch1 - ch0) / CLOCK_TICK if ch0 is not None and ch1 is not None else None,
    }


def main():
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "exit":
            break
        try:
            answer = run(cmd) if op == "run" else storm(cmd) if op == "storm" else {"error": f"unknown op {op}"}
        except Exception as exc:  # noqa: BLE001 - reported to the benchmark, which decides
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
