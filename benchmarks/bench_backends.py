#!/usr/bin/env python3
"""nftables against python-iptables: per-event latency and forwarding throughput (issue 9).

Run as root: ``python3 benchmarks/bench_backends.py [-n 12] [--others 1000] [--seconds 8] [--json PATH]``
(any Python 3.11+; the product runs on ``.venv/bin/python3``, or ``--python``).
About 6 minutes with the defaults on 2 cores.

Built in throw-away network namespaces (see ``_harness.py``): per backend a
netvm with no other vif and one with ``--others`` vifs online, each after
``vif-hotplug init``, with its own agent, XenStore, config and locks.

Per-event latency and CPU, p50 of N events per cell, variants interleaved
round by round: online and offline of one vif, through the agent (the
``/etc/xen/scripts`` wrapper) and in-process (the same wrapper with
``VIF_HOTPLUG_AGENT=off``: the client execs the full entry point), with 0
and ``--others`` other vifs online. CPU = the client's rusage + the agent's
CPU delta (see ``bench_events.py``).

Throughput: one TCP stream (iperf3) from a VM namespace through the netvm
to an uplink namespace, every veth on the path with tso/gso/gro off, in the
``--others`` netvm of each backend (``vif-hotplug init`` applied, 1000 other
vifs online, the VM's vif brought online by the product), against the same
topology (1000 other vifs as plain veths) with no filtering at all: no init,
no rules, the VM's route and neighbour entry set by hand. ``--rounds``
interleaved rounds (none, nftables, iptables, rotated); each round's ratio
is printed.

Goals:

* nftables per-event cost no worse than python-iptables': ratio of p50s
  <= 1.0 + ``--margin`` (default 0.10: the spread of a p50 of 12 events on a
  shared 2-core machine; the bootstrap 95 % interval of each ratio is
  printed), wall and CPU, every cell;
* flat: p50 with ``--others`` other vifs <= 1.2x with none, each backend, agent and in-process;
* throughput with the backend >= 0.95x no filtering, each backend.

A benchmark, not a test: it prints measured value, baseline, ratio and
PASS/FAIL per goal, writes JSON, and exits 0 whatever the goals say.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (
    GATEWAY,
    NETBACK_MAC,
    REPO,
    Cells,
    Goal,
    Netns,
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
    p50,
    print_goals,
    require_root,
    rotate,
    sh,
    table,
    vm_ip,
    vm_mac,
    write_json,
)

NAME = "bench_backends"
DOMID = 1  # the vif of the latency cells
IPERF_DOMID = 5  # the VM that sends the iperf3 stream
OTHERS_BASE = 3001
UPLINK_PEER = "192.0.2.2"
TOOLS = {
    "iperf3": "iperf3",
    "ethtool": "ethtool",
    "nsenter": "util-linux",
    "ip": "iproute2",
    "nft": "nftables",
    "iptables-legacy": "iptables",
    "ipset": "ipset",
    "conntrack": "conntrack",
}
#: The floor of "NAT at every hop": conntrack and masquerade, no other rule (reported, not a goal).
NAT_ONLY = "conntrack+masquerade only"
NAT_ONLY_RULES = """table ip natonly {
    chain postrouting { type nat hook postrouting priority srcnat; policy accept; oifgroup 2 accept; masquerade; }
    chain forward { type filter hook forward priority filter; policy accept; ct state established,related accept; }
}
"""
OFFLOADS = ("tso", "gso", "gro", "lro", "tx-gre-segmentation", "tx-udp-segmentation", "rx-gro-list",
            "rx-udp-gro-forwarding")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--events", type=int, default=12, help="measured events per cell (default 12)")
    p.add_argument("--warmup", type=int, default=2, help="unrecorded rounds first (default 2)")
    p.add_argument("--others", type=int, default=1000, help="other vifs online (default 1000)")
    p.add_argument("--backends", default="nftables,iptables")
    p.add_argument("--margin", type=float, default=0.10, help="noise margin of nft <= ipt (default 0.10)")
    p.add_argument("--rounds", type=int, default=3, help="throughput rounds (default 3)")
    p.add_argument("--seconds", type=int, default=8, help="iperf3 seconds per measurement (default 8, +1 omitted)")
    p.add_argument("--no-throughput", action="store_true")
    p.add_argument("--no-latency", action="store_true")
    p.add_argument("--python", default=str(REPO / ".venv/bin/python3"), help="the product's interpreter")
    p.add_argument("--live", action="store_true",
                   help="run the work tree in place (its .venv console scripts, client.py, wrapper) instead of "
                        "a copy taken at start (safe while the package is being edited)")
    p.add_argument("--json", type=Path, default=REPO / "benchmarks/results" / f"{NAME}.json")
    return p.parse_args()


def offloads_off(ns: Netns, dev: str) -> str:
    """Every segmentation/GRO offload off on ``dev``; what ``ethtool -k`` says afterwards."""
    args: list[str] = []
    for f in OFFLOADS:
        args += [f, "off"]
    ns.run("ethtool", "-K", dev, *args, check=False)  # unknown/fixed features are skipped
    shown = ns.run("ethtool", "-k", dev).stdout
    on = [line.strip() for line in shown.splitlines()
          if any(line.strip().startswith(f"{name}:") for name in
                 ("tcp-segmentation-offload", "generic-segmentation-offload", "generic-receive-offload"))
          and ": on" in line]
    if on:
        raise RuntimeError(f"{dev} in {ns.name}: offloads still on: {on}")
    return "tso/gso/gro off"


class Path3:
    """VM namespace -> netvm -> uplink namespace for one iperf3 stream."""

    def __init__(self, run: Run, nv: Netvm, filtered: bool) -> None:
        self.nv = nv
        self.vm = run.netns(f"{nv.role}m")
        d = IPERF_DOMID
        nv.add_vifs([d], vm_ns=self.vm)
        vm_dev = f"e{d}"
        self.vm.batch([f"addr add {vm_ip(d)}/32 dev {vm_dev}",
                       f"neigh replace {GATEWAY} lladdr {NETBACK_MAC} dev {vm_dev} nud permanent",
                       f"route add default via {GATEWAY} dev {vm_dev} onlink"])
        up = nv.vms  # the uplink side (wan0) lives in the netvm's "-vms" namespace
        up.batch([f"addr add {UPLINK_PEER}/24 dev wan0", "route add 10.137.0.0/16 via 192.0.2.1"])
        nv.ns.batch([f"route add default via {UPLINK_PEER}"])
        if filtered:
            nv.timed(nv.wrapper("online", d))
            assert nv.status(d) == "connected"
        else:  # by hand: what online does to the routing, nothing to the firewall
            nv.ns.batch([f"link set vif{d}.0 up", f"route add {vm_ip(d)}/32 dev vif{d}.0",
                         f"neigh replace {vm_ip(d)} lladdr {vm_mac(d)} dev vif{d}.0 nud permanent"])
        for ns, dev in ((self.vm, vm_dev), (nv.ns, f"vif{d}.0"), (nv.ns, nv.uplink), (up, "wan0")):
            offloads_off(ns, dev)
        self.server = run.popen(up.enter("iperf3", "-s", "-B", UPLINK_PEER), f"iperf3 server {nv.role}",
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while UPLINK_PEER + ":5201" not in up.run("ss", "-ltn").stdout:
            if time.monotonic() > deadline:
                raise RuntimeError("iperf3 server did not start")
            time.sleep(0.05)

    def measure(self, seconds: int) -> dict[str, Any]:
        out = sh(*self.vm.enter("iperf3", "-c", UPLINK_PEER, "-t", str(seconds), "-O", "1", "-J"),
                 timeout=seconds + 60).stdout
        end = json.loads(out)["end"]
        return {"bps": end["sum_received"]["bits_per_second"], "retransmits": end["sum_sent"].get("retransmits"),
                "cpu_sender": end["cpu_utilization_percent"]["host_total"],
                "cpu_receiver": end["cpu_utilization_percent"]["remote_total"]}


def main() -> int:
    args = parse_args()
    require_root()
    ensure_tools(TOOLS)
    backends = [b for b in args.backends.split(",") if b]
    info = machine_info(args.python)
    log(f"{NAME}: {info['cpu_model']}, {info['nproc']} CPUs, kernel {info['uname_r']}, "
        f"Python {info['python_product']}")
    cells = Cells()
    tput: dict[str, list[dict[str, Any]]] = {}
    setup: dict[str, float] = {}
    t_start = time.perf_counter()
    other_ids = list(range(OTHERS_BASE, OTHERS_BASE + args.others))
    with cleanup_on_exit() as cleanup:
        run = Run(cleanup, args.python, live=args.live)
        resolv = run.tmp / "resolv.conf"
        resolv.write_text("nameserver 192.0.2.53\n")
        nv0: dict[str, Netvm] = {}
        nvk: dict[str, Netvm] = {}
        for b in backends:
            for role, others in ((f"{b[:3]}0", []), (f"{b[:3]}k", other_ids)):
                if others is not other_ids and args.no_latency:
                    continue
                nv = Netvm(run, role, b)
                t0 = time.perf_counter()
                nv.tool("init", "--resolv-conf", str(resolv))
                setup[f"{role} init"] = time.perf_counter() - t0
                nv.start_agent()
                nv.add_vifs([DOMID, *others])
                if others:
                    log(f"{role}: bringing {len(others)} other vifs online through the agent")
                    setup[f"{role} {len(others)} others online"] = nv.bring_online(others)
                (nv0 if not others else nvk)[b] = nv

        # -- latency --
        def cycle(nv: Netvm, label: str, agent: bool) -> Variant:
            def fn(rec: Record) -> None:
                rec(f"{label} online", nv.timed(nv.wrapper("online", DOMID, agent=agent), agent=agent))
                assert nv.status(DOMID) == "connected", nv.status(DOMID)
                nv.clear_status([DOMID])
                rec(f"{label} offline", nv.timed(nv.wrapper("offline", DOMID, agent=agent), agent=agent))
            return label, fn

        if not args.no_latency:
            variants: list[Variant] = []
            for b in backends:
                for nv, k in ((nv0[b], 0), (nvk[b], args.others)):
                    variants.append(cycle(nv, f"{b} agent {k} others", True))
                    variants.append(cycle(nv, f"{b} in-process {k} others", False))
            log(f"latency: {args.warmup} warm-up + {args.events} rounds of {len(variants)} variants")
            interleave(variants, args.events, args.warmup, cells)

        # -- throughput --
        if not args.no_throughput:
            paths: dict[str, Path3] = {}
            for label, role in (("none", "plain"), (NAT_ONLY, "natonly")):
                nv = Netvm(run, role, None)
                nv.add_vifs(other_ids)
                nv.ns.batch(f"link set vif{d}.0 up" for d in other_ids)
                paths[label] = Path3(run, nv, filtered=False)
                if label == NAT_ONLY:
                    nv.ns.batch([f"link set vif{IPERF_DOMID}.0 group 2"])
                    rules = run.tmp / "nat-only.nft"
                    rules.write_text(NAT_ONLY_RULES)
                    nv.ns.run("nft", "-f", str(rules))
            for b in backends:
                paths[b] = Path3(run, nvk[b], filtered=True)
            names = list(paths)
            tput = {n: [] for n in names}
            for r in range(args.rounds):
                for n in rotate(names, r):
                    m = paths[n].measure(args.seconds)
                    tput[n].append(m)
                    log(f"throughput round {r + 1} {n}: {m['bps'] / 1e9:.3f} Gbit/s, retr {m['retransmits']}")
        info["loadavg_end"] = os.getloadavg()

    # -- goals --
    goals: list[Goal] = []

    def ms(name: str, what: str) -> list[float]:
        return [v * 1e3 for v in getattr(cells[name], what)]

    if not args.no_latency and {"nftables", "iptables"} <= set(backends):
        for mode in ("agent", "in-process"):
            for k in (0, args.others):
                for ev in ("online", "offline"):
                    for what in ("wall", "cpu"):
                        a = ms(f"nftables {mode} {k} others {ev}", what)
                        base = ms(f"iptables {mode} {k} others {ev}", what)
                        goals.append(Goal(f"nft vs ipt: {mode} {k} others {ev} {what}", p50(a), p50(base),
                                          1.0 + args.margin, ci=boot_ratio_ci(a, base),
                                          note=f"limit 1.0 + noise margin {args.margin}"))
    if not args.no_latency:
        for b in backends:
            for mode in ("agent", "in-process"):
                for ev in ("online", "offline"):
                    a = ms(f"{b} {mode} {args.others} others {ev}", "wall")
                    base = ms(f"{b} {mode} 0 others {ev}", "wall")
                    goals.append(Goal(f"flat {b} {mode} {ev}: {args.others} vs 0 others", p50(a), p50(base), 1.2,
                                      ci=boot_ratio_ci(a, base)))
    round_rows: list[list[str]] = []
    if tput:
        for b in backends:
            ratios = [m["bps"] / n["bps"] for m, n in zip(tput[b], tput["none"], strict=True)]
            goals.append(Goal(f"throughput {b} vs no filtering", p50([m["bps"] / 1e9 for m in tput[b]]),
                              p50([m["bps"] / 1e9 for m in tput["none"]]), 0.95, unit="Gbit/s", op=">=",
                              note=f"per-round ratios {[round(x, 3) for x in ratios]}"))
            for i, (m, x) in enumerate(zip(tput[b], ratios, strict=True)):
                nat = tput[NAT_ONLY][i]["bps"] if NAT_ONLY in tput else float("nan")
                round_rows.append([f"round {i + 1}", b, f"{m['bps'] / 1e9:.3f}",
                                   f"{tput['none'][i]['bps'] / 1e9:.3f}", f"{x:.3f}", f"{nat / 1e9:.3f}",
                                   f"{m['bps'] / nat:.3f}", str(m["retransmits"])])
        if NAT_ONLY in tput:
            nat_ratios = [m["bps"] / n["bps"] for m, n in zip(tput[NAT_ONLY], tput["none"], strict=True)]
            for i, (m, x) in enumerate(zip(tput[NAT_ONLY], nat_ratios, strict=True)):
                round_rows.append([f"round {i + 1}", NAT_ONLY, f"{m['bps'] / 1e9:.3f}",
                                   f"{tput['none'][i]['bps'] / 1e9:.3f}", f"{x:.3f}", "", "",
                                   str(m["retransmits"])])
            for b in backends:
                goals.append(Goal(f"throughput {b} vs {NAT_ONLY} (reported)",
                                  p50([m["bps"] / 1e9 for m in tput[b]]),
                                  p50([m["bps"] / 1e9 for m in tput[NAT_ONLY]]), 0.95, unit="Gbit/s", op=">=",
                                  note="what the product's own rules cost beyond stateful NAT"))

    print()
    print(f"{NAME}: {info['cpu_model']}, nproc {info['nproc']}, kernel {info['uname_r']}, "
          f"Python {info['python_product']}, load {info['loadavg_start'][0]:.1f} -> {info['loadavg_end'][0]:.1f}")
    if cells:
        print(f"p50 of {args.events} events per cell, {args.warmup} warm-up rounds, variants interleaved\n")
        print(table(Cells.HEADERS, cells.rows()))
    if round_rows:
        print(f"\niperf3 TCP, 1 stream, {args.seconds} s (+1 s omitted), tso/gso/gro off, "
              f"{args.others} other vifs online")
        print(table(("round", "ruleset", "Gbit/s", "no filtering Gbit/s", "ratio", "NAT-only Gbit/s",
                     "ratio to NAT-only", "retransmits"), round_rows))
    print_goals(goals)
    write_json(args.json, {
        "benchmark": NAME, "machine": info, "config": {k: str(v) for k, v in vars(args).items()},
        "setup_s": setup, **cells.as_dict(), "throughput": tput, "goals": [g.as_dict() for g in goals],
        "duration_s": time.perf_counter() - t_start,
    })
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
