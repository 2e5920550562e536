#!/usr/bin/env python3
"""Where a hotplug event's time goes: cProfile of the agent's event path, and of the in-process path.

Run as root: ``python3 benchmarks/profile_event.py [--backend nftables] [--others 0] [-n 40] [--out DIR]``.

Builds one throw-away netvm like the benchmarks do (``vif-hotplug init``,
its own XenStore, ``--others`` vifs online), then, inside its network
namespace:

* agent: :func:`vif_hotplug.vif_route.run` in a loop in one process, with
  the agent's logging set up and one :class:`Runtime` kept, as the agent
  serves events (``n`` online and ``n`` offline, profiled separately; a
  plain timed loop first);
* in-process: ``python3 -X importtime -I -m vif_hotplug.vif_route online``
  and the same under ``-m cProfile``;
* client: the pieces of the wrapper path (``sh`` + ``python3 -I -S`` start,
  the client's own work against a live agent).

Prints the top functions (cumulative and own time) and writes the ``.pstats``
files and importtime logs to ``--out``. A tool for finding costs, not a benchmark.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import REPO, Netvm, Run, cleanup_on_exit, log, require_root, sh

DOMID = 1
OTHERS_BASE = 3001

INNER = r'''
import cProfile, json, logging, pstats, sys, time
env, n, out = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
from vif_hotplug.agent.server import configure_logging
configure_logging()
from vif_hotplug.vif_route import run
from vif_hotplug.app.runtime import Runtime
from vif_hotplug.app.settings import AGENT_LOCK_TIMEOUT

class Logs:
    def verbose(self, level): pass
    def tag(self, tag): pass

rt = Runtime(lock_timeout=AGENT_LOCK_TIMEOUT, role="agent")
def ev(cmd):
    code, after = run([cmd, "type_if=vif"], env, rt, Logs(), lambda s: None)
    assert code == 0, (cmd, code)
    if after is not None:
        after()

for _ in range(3):
    ev("online"); ev("offline")
times = {"online": [], "offline": []}
for _ in range(n):
    for cmd in ("online", "offline"):
        t, c = time.perf_counter(), time.process_time()
        ev(cmd)
        times[cmd].append(((time.perf_counter() - t) * 1e3, (time.process_time() - c) * 1e3))
profs = {"online": cProfile.Profile(), "offline": cProfile.Profile()}
for _ in range(n):
    for cmd in ("online", "offline"):
        profs[cmd].enable(); ev(cmd); profs[cmd].disable()
for cmd, p in profs.items():
    p.dump_stats(f"{out}/agent-{cmd}.pstats")
print(json.dumps(times))
'''


def top(pstats_file: Path, n: int, per: int, sort: str) -> str:
    import io
    import pstats

    buf = io.StringIO()
    st = pstats.Stats(str(pstats_file), stream=buf)
    st.strip_dirs().sort_stats(sort).print_stats(per)
    text = buf.getvalue()
    return text.replace("function calls", f"function calls over {n} events")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="nftables")
    p.add_argument("--others", type=int, default=0)
    p.add_argument("-n", "--events", type=int, default=40)
    p.add_argument("--top", type=int, default=35)
    p.add_argument("--python", default=str(REPO / ".venv/bin/python3"))
    p.add_argument("--live", action="store_true", help="the work tree in place, not a copy")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/results/profile")
    args = p.parse_args()
    require_root()
    out = args.out / f"{args.backend}-{args.others}"
    out.mkdir(parents=True, exist_ok=True)
    with cleanup_on_exit() as cleanup:
        run = Run(cleanup, args.python, live=args.live)
        resolv = run.tmp / "resolv.conf"
        resolv.write_text("nameserver 192.0.2.53\n")
        nv = Netvm(run, "prof", args.backend)
        nv.tool("init", "--resolv-conf", str(resolv))
        others = list(range(OTHERS_BASE, OTHERS_BASE + args.others))
        nv.add_vifs([DOMID, *others])
        if others:
            nv.start_agent()
            log(f"bringing {len(others)} other vifs online")
            nv.bring_online(others)
            nv.agent.terminate()  # type: ignore[union-attr]
            nv.agent.wait()  # type: ignore[union-attr]
            nv.agent = None
        env = nv.toolstack_env(DOMID, "/etc/xen/scripts/vif-route-qubes")

        # -- the agent's event path, in a loop --
        log(f"agent path: {args.events} online + {args.events} offline, timed, then profiled")
        res = sh(*nv.ns.enter(run.python, "-I", "-c", INNER, json.dumps(env), str(args.events), str(out)),
                 timeout=1800)
        times = json.loads(res.stdout.strip().splitlines()[-1])
        for cmd in ("online", "offline"):
            wall = statistics.median(t[0] for t in times[cmd])
            cpu = statistics.median(t[1] for t in times[cmd])
            print(f"\n=== agent path {args.backend}, {args.others} others, {cmd}: p50 wall {wall:.1f} ms, "
                  f"cpu {cpu:.1f} ms (no profiler) ===")
            print(top(out / f"agent-{cmd}.pstats", args.events, args.top, "cumulative"))
            print(top(out / f"agent-{cmd}.pstats", args.events, args.top // 2, "tottime"))

        # -- in-process: imports and the whole run --
        ie = {**env, "VIF_HOTPLUG_AGENT": "off"}
        argv = ["online", "type_if=vif"]
        sh(*nv.ns.enter(run.python, "-I", "-m", "vif_hotplug.vif_route", "offline", "type_if=vif"), env=ie)
        r = subprocess.run(nv.ns.enter(run.python, "-X", "importtime", "-I", "-m", "vif_hotplug.vif_route", *argv),
                           env=ie, capture_output=True, text=True)
        (out / "inprocess-importtime.txt").write_text(r.stderr)
        rows = []
        for line in r.stderr.splitlines():
            if line.startswith("import time:") and "|" in line:
                parts = line[len("import time:"):].split("|")
                try:
                    rows.append((int(parts[1]), int(parts[0]), parts[2].rstrip()))
                except ValueError:
                    pass
        rows.sort(reverse=True)
        total = sum(self_us for _cum, self_us, _n in rows)
        print(f"\n=== in-process online: imports, {total / 1e3:.0f} ms self time in all; top cumulative ===")
        for cum, self_us, name in rows[:args.top]:
            print(f"{cum / 1e3:8.1f} ms cum {self_us / 1e3:7.1f} ms self  {name}")
        sh(*nv.ns.enter(run.python, "-I", "-m", "vif_hotplug.vif_route", "offline", "type_if=vif"), env=ie)
        prof = out / "inprocess-online.pstats"
        sh(*nv.ns.enter(run.python, "-I", "-m", "cProfile", "-o", str(prof), "-m", "vif_hotplug.vif_route", *argv),
           env=ie)
        print("\n=== in-process online under cProfile ===")
        print(top(prof, 1, args.top, "cumulative"))
        print(top(prof, 1, args.top // 2, "tottime"))

        # -- client side pieces (agent running) --
        nv.start_agent()
        jobs = {
            "sh -c exit": {"argv": ["/bin/sh", "-c", "exit 0"], "env": {"PATH": "/usr/bin:/bin"}},
            "python3 -I -S -c pass": {"argv": [run.python, "-I", "-S", "-c", "pass"],
                                      "env": {"PATH": "/usr/bin:/bin"}},
            "python3 -I -c pass (floor)": {"argv": [args.python, "-I", "-c", "pass"], "env": {"PATH": "/usr/bin:/bin"}},
            "wrapper add (agent no-op)": nv.wrapper("add", DOMID),
            "wrapper online": nv.wrapper("online", DOMID),
            "wrapper offline": nv.wrapper("offline", DOMID),
        }
        results: dict[str, list[tuple[float, float, float]]] = {k: [] for k in jobs}
        for _ in range(15):
            for k, job in jobs.items():
                r2 = nv.timed(job)
                results[k].append((r2["wall"] * 1e3, (r2["utime"] + r2["stime"]) * 1e3, (r2["agent_cpu"] or 0) * 1e3))
        print("\n=== client-side pieces (p50 of 15): wall, client cpu, agent cpu, ms ===")
        for k, v in results.items():
            print(f"{k:32s} {statistics.median(x[0] for x in v):7.1f} {statistics.median(x[1] for x in v):7.1f} "
                  f"{statistics.median(x[2] for x in v):7.1f}")
    print(f"\nprofiles in {out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
