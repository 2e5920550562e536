#!/usr/bin/env python3
"""Per-event cost of QubesDB: Qubes' module in the agent against a ``qubesdb-read`` process per event (issue 16).

Run as root: ``python3 benchmarks/bench_qubesdb.py [-n 12] [--backend nftables] [--json PATH]``
(any Python 3.11+; the product runs on ``.venv/bin/python3``, or ``--python``). About 2 minutes.

Three netvms in throw-away network namespaces, each with its own embedded
XenStore, state directory and resident agent, the same firewall backend,
one vif brought online and offline per round, interleaved:

* **module**: netvm.conf without ``[netvm]``; the agent imports the
  ``qubesdb`` module (the test stand-in, ``tests/standin_qubesdb``, on the
  agent's own ``PYTHONPATH``) and keeps one watched connection to a
  stand-in qubesdb-daemon (``tests/qubesdb_daemon.py``, a process of its
  own): an event reads its cache and starts no process;
* **qubesdb-read**: the same netvm.conf and daemon, no module: the agent
  runs the fake ``qubesdb-read`` (``tests/standin_qubesdb/qubesdb-read``, a
  real process: ``python3 -IS`` and the stand-in module, one connection,
  one read per key) once per event for every key the event reads;
* **qubesdb-read sh**: the same, with a ``qubesdb-read`` that costs about
  what Qubes' own C program costs (``/bin/sh`` exec'ing ``cat`` of the
  answer, two small execs): the Python fake's interpreter start is much
  more than that, so this is the honest baseline for a real netvm;
* **netvm.conf**: the parameters (and the same connected addresses) in
  netvm.conf, no QubesDB at all: what an event costs without any.

Events are started as the toolstack starts them: fork+exec of a script with
the toolstack's environment and argv, inside the netvm's namespace
(``_runner.py``); the script is the ``/etc/xen/scripts/vif-route-qubes``
wrapper as the work tree has it (``PYTHON -I -S`` and the thin client from
the package's directory), with the run's interpreter and package copy. Also
measured: one run of the fake ``qubesdb-read`` by itself (Qubes' own is a C
program and starts faster than this Python fake; the difference between
the two agents' events is what one such process costs an event).

Printed: the cells, and as ratios in the same run: module / qubesdb-read
sh (online, offline: what the module saves on a real netvm; the Python
fake's ratio is reported beside it) and module / netvm.conf (what QubesDB
through the module costs over none). A benchmark, not a test:
exit 0 whatever the ratios say.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (
    DNS1,
    DNS2,
    GATEWAY,
    REPO,
    Cells,
    Goal,
    Netvm,
    Record,
    Run,
    Variant,
    _wait_for,
    boot_ratio_ci,
    cleanup_on_exit,
    ensure_tools,
    interleave,
    log,
    machine_info,
    p50,
    print_goals,
    require_root,
    table,
    write_json,
)

NAME = "bench_qubesdb"
STANDIN = REPO / "tests/standin_qubesdb"
DAEMON = REPO / "tests/qubesdb_daemon.py"
DOMID = 1
CONNECTED = "10.137.0.200 10.137.0.201"
#: What dom0 gives a Qubes netvm (the keys an event reads, and some it does not).
QUBESDB = {
    "/qubes-netvm-gateway": GATEWAY, "/qubes-netvm-primary-dns": DNS1, "/qubes-netvm-secondary-dns": DNS2,
    "/qubes-netvm-network": "10.137.0.0", "/qubes-ip": "10.138.0.9", "/connected-ips": CONNECTED,
    "/name": "sys-net", "/qubes-vm-type": "NetVM", "/qubes-service/qubes-network": "1",
}
WRAPPER = """#!/bin/sh
exec {python} -I -S -c 'import sys; sys.path[0:0] = [sys.argv.pop(1)]; from vif_hotplug.agent import client; \
client.main()' {site} vif-route-qubes "$@"
"""
TOOLS = {"nsenter": "util-linux", "ip": "iproute2", "nft": "nftables", "iptables-legacy": "iptables",
         "ipset": "ipset", "conntrack": "conntrack"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--events", type=int, default=12, help="measured events per cell (default 12)")
    p.add_argument("--warmup", type=int, default=2, help="unrecorded rounds first (default 2)")
    p.add_argument("--backend", default="nftables", choices=("nftables", "iptables"))
    p.add_argument("--python", default=str(REPO / ".venv/bin/python3"), help="the product's interpreter")
    p.add_argument("--live", action="store_true", help="run the work tree in place instead of a copy")
    p.add_argument("--json", type=Path, default=REPO / "benchmarks/results" / f"{NAME}.json")
    return p.parse_args()


def start_agent(nv: Netvm, extra_env: dict[str, str]) -> None:
    """``vif-hotplug agent`` in ``nv`` as :meth:`Netvm.start_agent` starts it, plus ``extra_env`` in its own
    environment (how the module becomes importable there, as python3-qubesdb is on a Qubes netvm)."""
    nv.agent = nv.run_.popen(
        nv.ns.enter(str(nv.run_.bin / "vif-hotplug"), "agent", "--no-start-up"), f"agent {nv.role}",
        env={**nv.env, "LANG": "C.UTF-8", **extra_env}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=open(nv.tmp / "agent.log", "w"),
    )
    sock = nv.tmp / "state" / "agent.sock"
    _wait_for(sock.exists, f"agent of {nv.role}", nv.agent, 60)


def main() -> int:
    args = parse_args()
    require_root()
    ensure_tools(TOOLS)
    info = machine_info(args.python)
    log(f"{NAME}: {info['cpu_model']}, {info['nproc']} CPUs, kernel {info['uname_r']}, "
        f"Python {info['python_product']}")
    cells = Cells()
    t_start = time.perf_counter()
    b = args.backend
    with cleanup_on_exit() as cleanup:
        run = Run(cleanup, args.python, live=args.live)
        site = REPO if args.live else next((run.prefix / "lib").glob("python3.*/site-packages"))
        wrapper = run.prefix / "vif-route-qubes-bench"
        wrapper.write_text(WRAPPER.format(python=run.python, site=site))
        wrapper.chmod(0o755)

        sock = str(run.tmp / "qubesdb.sock")
        daemon = run.popen([sys.executable, str(DAEMON), "--socket", sock,
                            *(f"{k}={v}" for k, v in QUBESDB.items())], "stand-in qubesdb-daemon",
                           stdout=subprocess.PIPE, text=True)
        assert daemon.stdout is not None
        if daemon.stdout.readline().strip() != "ready":
            raise RuntimeError("the stand-in qubesdb-daemon did not start")
        # The tools directory: root's and writable by root alone (VIF_HOTPLUG_TOOLS_DIR's rule).
        tools = run.tmp / "tools"
        tools.mkdir(mode=0o755)
        for name in ("qubesdb-read", "qubesdb.py"):
            (tools / name).write_bytes((STANDIN / name).read_bytes())
        (tools / "qubesdb-read").chmod(0o755)
        cheap = run.tmp / "tools-sh"
        cheap.mkdir(mode=0o755)
        (cheap / "answer").write_text("".join(f"{k} = {v}\n" for k, v in QUBESDB.items()))
        (cheap / "qubesdb-read").write_text(f"#!/bin/sh\nexec cat {cheap / 'answer'}\n")
        (cheap / "qubesdb-read").chmod(0o755)

        no_params = f"[firewall]\nbackend = {b}\n"
        with_params = (f"[netvm]\ngateway = {GATEWAY}\nprimary_dns = {DNS1}\nsecondary_dns = {DNS2}\n"
                       f"connected_ips = {CONNECTED}\n\n{no_params}")
        qubesdb_env = {"QUBESDB_STANDIN_SOCKET": sock}
        netvms = {
            "module": (Netvm(run, "mod", b, conf=no_params), {**qubesdb_env, "PYTHONPATH": str(STANDIN)}, {}),
            "qubesdb-read": (Netvm(run, "cli", b, conf=no_params), qubesdb_env,
                             {"VIF_HOTPLUG_TOOLS_DIR": str(tools)}),
            "qubesdb-read sh": (Netvm(run, "csh", b, conf=no_params), {}, {"VIF_HOTPLUG_TOOLS_DIR": str(cheap)}),
            "netvm.conf": (Netvm(run, "cnf", b, conf=with_params), {}, {}),
        }
        for label, (nv, agent_env, _) in netvms.items():
            nv.tool("init", "--resolv-conf", "/dev/null")
            start_agent(nv, agent_env)
            nv.add_vifs([DOMID])
            log(f"{label}: netvm {nv.ns.name} ready")

        def job(nv: Netvm, command: str, extra: dict[str, str]) -> dict[str, Any]:
            env = nv.toolstack_env(DOMID, "/etc/xen/scripts/vif-route-qubes", **extra)
            return {"argv": [str(wrapper), command, "type_if=vif"], "env": env,
                    "out": str(nv.tmp / "out" / f"{command}.log")}

        def cycle(label: str) -> Variant:
            nv, _, extra = netvms[label]

            def fn(rec: Record) -> None:
                rec(f"{label} online", nv.timed(job(nv, "online", extra)))
                assert nv.status(DOMID) == "connected", nv.status(DOMID)
                nv.clear_status([DOMID])
                rec(f"{label} offline", nv.timed(job(nv, "offline", extra)))
            return label, fn

        fake = {"argv": [str(tools / "qubesdb-read"), "-f", "-q", "--", *QUBESDB],
                "env": {"PATH": "/usr/bin:/bin", **qubesdb_env}, "out": str(run.tmp / "fake.log")}

        cheap_alone = {"argv": [str(cheap / "qubesdb-read"), "-f", "-q", "--", *QUBESDB],
                       "env": {"PATH": "/usr/bin:/bin"}, "out": str(run.tmp / "fake-sh.log")}

        def fake_alone(rec: Record) -> None:
            rec("fake qubesdb-read alone", netvms["netvm.conf"][0].timed(fake, agent=False))
            rec("sh qubesdb-read alone", netvms["netvm.conf"][0].timed(cheap_alone, agent=False))

        variants = [cycle(label) for label in netvms] + [("fake", fake_alone)]
        log(f"measuring: {args.warmup} warm-up + {args.events} rounds of {len(variants)} variants")
        interleave(variants, args.events, args.warmup, cells)
        gateway = netvms["module"][0].ns.run("ip", "-o", "-4", "addr", "show", "dev", f"vif{DOMID}.0").stdout
        info["loadavg_end"] = os.getloadavg()

    def wall(name: str) -> list[float]:
        return [v * 1e3 for v in cells[name].wall]

    def cpu(name: str) -> list[float]:
        return [v * 1e3 for v in cells[name].cpu]

    goals: list[Goal] = []
    for ev in ("online", "offline"):
        for base_label, note in (("qubesdb-read sh", ""), ("qubesdb-read", " (reported: Python fake)")):
            for what, samples in (("wall", wall), ("cpu", cpu)):
                a, base = samples(f"module {ev}"), samples(f"{base_label} {ev}")
                goals.append(Goal(f"{ev} {what}: module vs {base_label} per event{note}", p50(a), p50(base),
                                  1.0, ci=boot_ratio_ci(a, base)))
        a, base = wall(f"module {ev}"), wall(f"netvm.conf {ev}")
        goals.append(Goal(f"{ev} wall: module vs no QubesDB (netvm.conf)", p50(a), p50(base), 1.1,
                          ci=boot_ratio_ci(a, base)))

    print()
    print(f"{NAME} ({b}): {info['cpu_model']}, nproc {info['nproc']}, kernel {info['uname_r']}, "
          f"Python {info['python_product']}, load {info['loadavg_start'][0]:.1f} -> {info['loadavg_end'][0]:.1f}")
    print(f"p50 of {args.events} events per cell, {args.warmup} warm-up rounds, variants interleaved\n")
    print(table(Cells.HEADERS, cells.rows()))
    print_goals(goals)
    write_json(args.json, {
        "benchmark": NAME, "machine": info, "config": {k: str(v) for k, v in vars(args).items()},
        **cells.as_dict(), "goals": [g.as_dict() for g in goals], "module_vif_addresses": gateway,
        "duration_s": time.perf_counter() - t_start,
    })
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
