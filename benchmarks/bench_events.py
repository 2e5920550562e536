#!/usr/bin/env python3
"""Per-event cost of a hotplug event, through the resident agent and in-process (issue 11).

Run as root: ``python3 benchmarks/bench_events.py [-n 12] [--others 1000] [--json PATH]``
(any Python 3.11+; the product runs on ``.venv/bin/python3``, or ``--python``).
About 5 minutes with the defaults on 2 cores.

Everything is built in throw-away network namespaces (a netvm per firewall
backend and per number of other vifs, one for Xen's stock ``vif-route``, one
for the code before the agent redesign), each with its own embedded XenStore
(``vif-hotplug xenstored``), netvm.conf, locks and state directory. Hotplug
commands are started the way ``xl devd`` starts them: fork+exec of the
script inside the netvm's network namespace (a runner entered with
``nsenter --net``), env ``XENBUS_PATH vif script netdev ...``, argv
``online|offline type_if=vif``; the agent path is the wrapper
``etc/xen/scripts/vif-route-qubes`` of an emulated install prefix.

Every goal is a ratio to a baseline measured in the same run, interleaved
round by round (each round runs every variant once, in rotated order), p50
of N events per cell:

* floor: ``python3 -I -c pass`` of the product's interpreter as installed
  (``PREFIX/bin/python3``: ``.venv``'s binary and packages; ``.venv/bin/python3``
  itself also imports its editable install's finder at start-up, ~25 ms here,
  which an installed copy does not: it is measured and reported beside it);
* Xen's ``/etc/xen/scripts/vif-route`` (Debian xen-utils-common), with
  ``netdev`` = an uplink veth that has an address, ``xenstore-read/write``
  pointed at the embedded XenStore;
* old: ``python -m vif_hotplug.vif_route`` of commit eb75760 (a temporary
  ``git worktree``), iptables/ipset, same interpreter.

Goals (for each firewall backend):

(a) agent path, online and offline: p50 wall <= 0.9x Xen's vif-route and
    <= 1.5x the floor; CPU (client rusage + the agent's CPU delta) likewise;
(b) with 1000 other vifs online, p50 <= 1.2x the p50 with none;
(c) 100 wrapper processes at once: every vif hotplug-status=connected,
    wall <= 25x the single-event p50 of (a);
(d) ``qubes-setup-dnat-to-ns --resolv-conf F`` with nothing to change (exit
    100), the command NetworkManager's hook runs (``/usr/bin``'s, the
    thin client as the Debian package writes it): p50 <= 1.5x the floor (the pip
    console script in PREFIX/bin reported beside it);
(e) in-process fallback (agent off) online: p50 <= 0.4x the old code's.

CPU: the client's from ``wait4`` rusage (the process and its waited-for
descendants: for Xen's script every ``ip``/``xenstore-*`` it runs), the
agent's from its process CPU clock read just before the spawn and just after
the reap (nanosecond resolution; ``/proc/PID/stat`` utime+stime, 10 ms
ticks, is recorded beside it as a cross-check), plus the CPU of children the
agent forked and reaped meanwhile (cutime+cstime, 10 ms ticks: the iptables
backend applies DNAT/MASQUERADE rulesets in a forked child).

This is a benchmark, not a test: it prints measured value, baseline, ratio
and PASS/FAIL per goal, writes JSON, and exits 0 whatever the goals say
(1 only when it could not measure).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (
    REPO,
    XEN_VIF_ROUTE,
    Cells,
    Goal,
    Netvm,
    Record,
    Run,
    Variant,
    boot_ratio_ci,
    cleanup_on_exit,
    ensure_tools,
    interleave,
    log,
    machine_info,
    old_worktree,
    p50,
    print_goals,
    require_root,
    sh,
    table,
    write_json,
)

NAME = "bench_events"
#: The goals' floor: the product's interpreter as installed (PREFIX/bin/python3: the same binary and
#: packages as .venv, without .venv's editable-install finder unless --live).
FLOOR = "floor: PREFIX/bin/python3 -I -c pass"
#: Reported beside it: .venv's, whose site imports the editable install's finder (pathlib, re: ~25 ms here).
VENV_FLOOR = "floor: .venv/bin/python3 -I -c pass"
DOMID = 1  # the vif every single-event cell measures
STORM_BASE = 2001
OTHERS_BASE = 3001
TOOLS = {
    str(XEN_VIF_ROUTE): "xen-utils-common",
    "xenstore-read": "xenstore-utils",
    "ifconfig": "net-tools",  # Xen's vif-route brings the vif up with ifconfig
    "logger": "bsdutils",
    "nsenter": "util-linux",
    "ip": "iproute2",
    "nft": "nftables",
    "iptables-legacy": "iptables",
    "ipset": "ipset",
    "conntrack": "conntrack",
    "git": "git",
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--events", type=int, default=12, help="measured events per cell (default 12)")
    p.add_argument("--warmup", type=int, default=2, help="unrecorded rounds first (default 2)")
    p.add_argument("--others", type=int, default=1000, help="other vifs online for goal (b) (default 1000)")
    p.add_argument("--storm", type=int, default=100, help="vifs of a start storm (default 100)")
    p.add_argument("--storms", type=int, default=3, help="start storms per backend (default 3)")
    p.add_argument("--backends", default="nftables,iptables")
    p.add_argument("--old-commit", default="eb75760", help="the code before the redesign (goal e)")
    p.add_argument("--python", default=str(REPO / ".venv/bin/python3"), help="the product's interpreter")
    p.add_argument("--live", action="store_true",
                   help="run the work tree in place (its .venv console scripts, client.py, wrapper) instead of "
                        "a copy taken at start (safe while the package is being edited)")
    p.add_argument("--json", type=Path, default=REPO / "benchmarks/results" / f"{NAME}.json")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    require_root()
    ensure_tools(TOOLS)
    backends = [b for b in args.backends.split(",") if b]
    info = machine_info(args.python)
    log(f"{NAME}: {info['cpu_model']}, {info['nproc']} CPUs, kernel {info['uname_r']}, "
        f"Python {info['python_product']}")
    cells = Cells()
    storms: dict[str, list[dict[str, Any]]] = {b: [] for b in backends}
    setup: dict[str, float] = {}
    t_start = time.perf_counter()
    with cleanup_on_exit() as cleanup:
        run = Run(cleanup, args.python, live=args.live)
        resolv = run.tmp / "resolv.conf"
        resolv.write_text("nameserver 192.0.2.53\nnameserver 192.0.2.54\n")
        floor_env = {"PATH": "/usr/bin:/bin"}
        floor_job = {"argv": [run.python, "-I", "-c", "pass"], "env": floor_env}
        venv_floor_job = {"argv": [args.python, "-I", "-c", "pass"], "env": floor_env}

        # -- Xen's stock vif-route --
        xen = Netvm(run, "xen", None)
        xen.add_vifs([DOMID])

        def xen_job(command: str) -> dict[str, Any]:
            return {"argv": [str(XEN_VIF_ROUTE), command, "type_if=vif"],
                    "env": xen.toolstack_env(DOMID, str(XEN_VIF_ROUTE), netdev=xen.uplink),
                    "out": str(xen.tmp / "out" / f"xen-{command}.log")}

        # -- the code before the redesign --
        worktree = old_worktree(run, args.old_commit)
        old = Netvm(run, "old", None)  # its netvm.conf has no [firewall]: it knows only iptables
        old_env = {**old.env, "PYTHONPATH": str(worktree)}
        sh(*old.ns.enter(args.python, "-m", "vif_hotplug.cli", "init"), env=old_env)
        old.add_vifs([DOMID])

        def old_job(command: str) -> dict[str, Any]:
            env = old.toolstack_env(DOMID, "/etc/xen/scripts/vif-route-qubes", PYTHONPATH=str(worktree))
            return {"argv": [args.python, "-m", "vif_hotplug.vif_route", command, "type_if=vif"], "env": env,
                    "out": str(old.tmp / "out" / f"old-{command}.log")}

        # -- our netvms: per backend, with no other vif and with --others --
        nv0: dict[str, Netvm] = {}
        nvk: dict[str, Netvm] = {}
        storm_ids = list(range(STORM_BASE, STORM_BASE + args.storm))
        other_ids = list(range(OTHERS_BASE, OTHERS_BASE + args.others))
        nvs: dict[str, Netvm] = {}  # the start storms' own netvm: nothing else online at boot
        for b in backends:
            for role, vifs in ((f"{b[:3]}0", [DOMID]), (f"{b[:3]}k", [DOMID, *other_ids]),
                               (f"{b[:3]}s", storm_ids if args.storms else None)):
                if vifs is None:
                    continue
                nv = Netvm(run, role, b)
                t0 = time.perf_counter()
                nv.tool("init", "--resolv-conf", str(resolv))
                setup[f"{role} init"] = time.perf_counter() - t0
                nv.start_agent()
                nv.add_vifs(vifs)
                if role.endswith("k") and other_ids:
                    log(f"{role}: bringing {len(other_ids)} other vifs online through the agent")
                    setup[f"{role} {len(other_ids)} others online"] = nv.bring_online(other_ids)
                if role.endswith("s"):  # warm the agent (its first event imports the event path)
                    nv.timed(nv.wrapper("online", storm_ids[0]))
                    nv.timed(nv.wrapper("offline", storm_ids[0]))
                {"0": nv0, "k": nvk, "s": nvs}[role[-1]][b] = nv

        # -- variants: each runs one cycle and records it --
        def floor(rec: Record) -> None:
            rec(FLOOR, xen.timed(floor_job, agent=False))
            rec(VENV_FLOOR, xen.timed(venv_floor_job, agent=False))

        def xen_cycle(rec: Record) -> None:
            rec("xen vif-route online", xen.timed(xen_job("online"), agent=False))
            assert xen.status(DOMID) == "connected", xen.status(DOMID)
            xen.clear_status([DOMID])
            rec("xen vif-route offline", xen.timed(xen_job("offline"), agent=False))

        def old_cycle(rec: Record) -> None:
            rec(f"old {args.old_commit} online", old.timed(old_job("online"), agent=False))
            assert old.status(DOMID) == "connected", old.status(DOMID)
            old.clear_status([DOMID])
            rec(f"old {args.old_commit} offline", old.timed(old_job("offline"), agent=False))

        def agent_cycle(nv: Netvm, label: str) -> Variant:
            def fn(rec: Record) -> None:
                rec(f"{label} online", nv.timed(nv.wrapper("online", DOMID)))
                assert nv.status(DOMID) == "connected", nv.status(DOMID)
                nv.clear_status([DOMID])
                rec(f"{label} offline", nv.timed(nv.wrapper("offline", DOMID)))
            return label, fn

        def inproc_cycle(nv: Netvm, label: str) -> Variant:
            def fn(rec: Record) -> None:
                rec(f"{label} online", nv.timed(nv.wrapper("online", DOMID, agent=False), agent=False))
                assert nv.status(DOMID) == "connected", nv.status(DOMID)
                nv.clear_status([DOMID])
                rec(f"{label} offline", nv.timed(nv.wrapper("offline", DOMID, agent=False), agent=False))
            return label, fn

        def dns(nv: Netvm, label: str) -> Variant:
            console = {"argv": [str(run.bin / "qubes-setup-dnat-to-ns"), "--resolv-conf", str(resolv)],
                       "env": {**nv.env, "LANG": "C.UTF-8"}, "out": str(nv.tmp / "out" / "dns.log")}
            client = {"argv": [str(run.prefix / "path" / "qubes-setup-dnat-to-ns"), "--resolv-conf", str(resolv)],
                      "env": {**nv.env, "LANG": "C.UTF-8"}, "out": str(nv.tmp / "out" / "dns-client.log")}

            def fn(rec: Record) -> None:
                rec(f"{label} installed command", nv.timed(client, expect=100))
                rec(f"{label} console script", nv.timed(console, expect=100))
            return label, fn

        variants: list[Variant] = [("floor", floor), ("xen", xen_cycle), ("old", old_cycle)]
        for b in backends:
            variants += [
                agent_cycle(nv0[b], f"{b} agent 0 others"),
                agent_cycle(nvk[b], f"{b} agent {args.others} others"),
                inproc_cycle(nv0[b], f"{b} in-process 0 others"),
                dns(nv0[b], f"{b} dns"),
            ]

        # Storms ride along in rounds spread over the run (interleaved too).
        storm_rounds = {round(i * args.events / args.storms) for i in range(args.storms)} if args.storms else set()

        def storm_round(i: int, _rec: Record) -> None:
            if i not in storm_rounds:
                return
            for b in backends:
                nv = nvs[b]
                nv.clear_status(storm_ids)
                on = nv.storm([nv.wrapper("online", d) for d in storm_ids])
                statuses = [nv.status(d) for d in storm_ids]
                off = nv.storm([nv.wrapper("offline", d) for d in storm_ids])
                ok = sum(1 for s, rc in zip(statuses, on["rcs"], strict=True) if s == "connected" and rc == 0)
                storms[b].append({"online_wall": on["wall"], "offline_wall": off["wall"], "connected": ok,
                                  "spawn_spread": on["spawn_spread"], "online_rcs_nonzero":
                                  sum(1 for rc in on["rcs"] if rc != 0),
                                  "online_cpu": on["utime"] + on["stime"] + (on["agent_cpu"] or 0)
                                  + (on.get("agent_children_cpu") or 0)})
                log(f"storm {b}: {ok}/{len(storm_ids)} connected, online {on['wall'] * 1e3:.0f} ms, "
                    f"offline {off['wall'] * 1e3:.0f} ms")

        log(f"measuring: {args.warmup} warm-up + {args.events} rounds of {len(variants)} variants")
        interleave(variants, args.events, args.warmup, cells, storm_round)
        info["loadavg_end"] = os.getloadavg()

    # -- goals --
    goals: list[Goal] = []

    def wall(name: str) -> list[float]:
        return [v * 1e3 for v in cells[name].wall]

    def cpu(name: str) -> list[float]:
        return [v * 1e3 for v in cells[name].cpu]

    def goal(gname: str, a: list[float], base: list[float], limit: float, note: str = "") -> None:
        goals.append(Goal(gname, p50(a), p50(base), limit, note=note, ci=boot_ratio_ci(a, base)))

    fl = FLOOR
    for b in backends:
        for ev in ("online", "offline"):
            ours = f"{b} agent 0 others {ev}"
            xe = f"xen vif-route {ev}"
            goal(f"(a) {b} {ev} wall vs Xen vif-route", wall(ours), wall(xe), 0.9)
            goal(f"(a) {b} {ev} wall vs floor", wall(ours), wall(fl), 1.5)
            goal(f"(a) {b} {ev} cpu vs Xen vif-route", cpu(ours), cpu(xe), 0.9)
            goal(f"(a) {b} {ev} cpu vs floor", cpu(ours), cpu(fl), 1.5)
            goal(f"(a) {b} {ev} wall vs .venv floor (reported)", wall(ours), wall(VENV_FLOOR), 1.5)
        for ev in ("online", "offline"):
            goal(f"(b) {b} {ev}: {args.others} others vs 0", wall(f"{b} agent {args.others} others {ev}"),
                 wall(f"{b} agent 0 others {ev}"), 1.2)
        if storms[b]:
            sw = [s["online_wall"] * 1e3 for s in storms[b]]
            all_conn = all(s["connected"] == args.storm for s in storms[b])
            g = Goal(f"(c) {b} storm of {args.storm}: wall vs single event", p50(sw),
                     p50(wall(f"{b} agent 0 others online")), 25,
                     note=f"connected: {[s['connected'] for s in storms[b]]} of {args.storm}")
            goals.append(g)
            goals.append(Goal(f"(c) {b} storm: every vif connected", min(s["connected"] for s in storms[b]),
                              args.storm, 1.0, unit="vifs", op=">=",
                              note="all connected" if all_conn else "some vif not connected"))
        goal(f"(d) {b} dns installed command vs floor", wall(f"{b} dns installed command"), wall(fl), 1.5,
             note="/usr/bin/qubes-setup-dnat-to-ns as the Debian package writes it (the NetworkManager hook's)")
        goal(f"(d) {b} dns pip console script vs floor (reported)", wall(f"{b} dns console script"), wall(fl), 1.5,
             note="PREFIX/bin/qubes-setup-dnat-to-ns: imports the package before it tries the agent")
        goal(f"(e) {b} in-process online vs old {args.old_commit}", wall(f"{b} in-process 0 others online"),
             wall(f"old {args.old_commit} online"), 0.4)

    print()
    print(f"{NAME}: {info['cpu_model']}, nproc {info['nproc']}, kernel {info['uname_r']}, "
          f"Python {info['python_product']}, load {info['loadavg_start'][0]:.1f} -> {info['loadavg_end'][0]:.1f}")
    print(f"p50 of {args.events} events per cell, {args.warmup} warm-up rounds, variants interleaved\n")
    print(table(Cells.HEADERS, cells.rows()))
    if any(storms.values()):
        print()
        print(table(("storm", "online wall ms", "offline wall ms", "connected", "cpu ms"),
                    [[f"{b} #{i + 1}", f"{s['online_wall'] * 1e3:.0f}", f"{s['offline_wall'] * 1e3:.0f}",
                      f"{s['connected']}/{args.storm}", f"{s['online_cpu'] * 1e3:.0f}"]
                     for b in backends for i, s in enumerate(storms[b])]))
    print_goals(goals)
    write_json(args.json, {
        "benchmark": NAME, "machine": info, "config": {k: str(v) for k, v in vars(args).items()},
        "setup_s": setup, **cells.as_dict(), "storms": storms, "goals": [g.as_dict() for g in goals],
        "duration_s": time.perf_counter() - t_start,
    })
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
