#!/usr/bin/env python3
"""What each part of the netvm ruleset costs forwarding throughput, against current Qubes' shape (issue 21).

Run as root: ``python3 benchmarks/ablate_throughput.py [--rounds 3] [--seconds 5] [--others 1000]
[--offloads off,on] [--previous benchmarks/rulesets/restructure-2369cdc.json]``. About 8 minutes with
the defaults on 2 cores (setup ~2, then ~2 per round).

One netvm namespace (``_harness.Netvm``), nftables backend: ``vif-hotplug
init``, ``--others`` VMs brought online through the agent (plus the iperf3 VM,
``bench_backends.Path3``), every VM's address in ``connected_ips``. The
product's ruleset is then read back (``nft -j list ruleset``), and each
variant is built from it and loaded with ``nft -j -f`` into the same
namespace between measurements, so the topology (1001 vifs, routes,
neighbours, groups) is the same for every cell and only the ruleset differs:

* ``no filter``: ``flush ruleset`` (no table, so no conntrack hooks either),
  measured twice per round (``no filter, again``: the machine's noise floor);
* ``conntrack + masquerade``: current Qubes' ``postrouting`` nat chain alone
  (``network/qubes-ipv4.nft``), what NAT at every hop needs;
* ``Qubes shape``: current Qubes' anti-spoofing (``network/qubes-antispoof.nft``:
  ``prerouting`` + ``antispoof``, sets ``allowed`` and ``downstream``) plus
  that ``postrouting``, sets filled with the product's elements;
* ``Qubes + <chain>``: each base chain of the product that Qubes' shape has
  not, with the chains it jumps to, read from the product's ruleset (so the
  rows follow the ruleset as it changes); ``Qubes + product's prerouting``:
  the product's own anti-spoofing chains instead of Qubes' (the vif-name
  drop, the connected set, the ``-nets`` companions);
* ``Qubes + connected-set drop``: Qubes' ``prerouting`` plus one ``ip saddr
  @connected drop``;
* ``whole ruleset``, ``whole ruleset without counters``, and, when
  ``--previous`` names a file, the whole ruleset of an earlier version with
  the same set elements.

Offloads: ``off`` (tso/gso/gro and the rest off on the four veth ends of the
path, as ``bench_backends.py``) and ``on`` (tso/gso/gro on). Every round runs
every (variant, offload) cell once, rotated; conntrack is flushed before each
measurement. Each cell's ratio is to ``no filter`` of the same round and the
same offloads; the table shows every round and the median. A benchmark, not
a test: it prints measured value, baseline, ratio and PASS/FAIL for the
goals, writes JSON (``--json``), and exits 0 whatever the goals say.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (
    DNS1,
    DNS2,
    GATEWAY,
    REPO,
    Goal,
    Netns,
    Netvm,
    Run,
    boot_ratio_ci,
    cleanup_on_exit,
    ensure_tools,
    log,
    machine_info,
    print_goals,
    require_root,
    rotate,
    table,
    vm_ip,
    write_json,
)
from bench_backends import IPERF_DOMID, OFFLOADS, TOOLS, Path3, offloads_off

NAME = "ablate_throughput"
OTHERS_BASE = 3001
Json = dict[str, Any]
NONE = "no filter"
NONE_AGAIN = "no filter, again"
NAT_ONLY = "conntrack + masquerade"
QUBES = "Qubes shape"
WHOLE = "whole ruleset"
QUBES_WHOLE = "current Qubes as a whole (antispoof, ipv4, DNS, firewall service)"
ON = ("tso", "gso", "gro")


# --- rulesets as nft JSON -----------------------------------------------------------------


def _m(left: Json, right: Any, op: str = "==") -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> Json:
    return {"meta": {"key": key}}


def _saddr() -> Json:
    return {"payload": {"protocol": "ip", "field": "saddr"}}


#: Current Qubes' IPv4 anti-spoofing (qubes-core-agent-linux network/qubes-antispoof.nft) and NAT
#: (network/qubes-ipv4.nft, chain postrouting), written out here as nft JSON.
QUBES_CHAINS: dict[str, tuple[Json, list[list[Json]]]] = {
    "prerouting": ({"type": "filter", "hook": "prerouting", "prio": -300, "policy": "accept"}, [
        [_m(_meta("iifgroup"), 2), {"goto": {"target": "antispoof"}}],
        [_m(_saddr(), "@downstream"), {"counter": None}, {"drop": None}],
    ]),
    "antispoof": ({}, [
        [_m({"concat": [_meta("iifname"), _saddr()]}, "@allowed"), {"accept": None}],
        [{"counter": None}, {"drop": None}],
    ]),
    "postrouting": ({"type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}, [
        [_m(_meta("oifgroup"), 2), {"accept": None}],
        [_m(_meta("oif"), "lo"), {"accept": None}],
        [{"masquerade": None}],
    ]),
}
#: How many base chains and lookups the calibration variants add (per packet, each direction).
CALIB_CHAINS = 8
CALIB_LOOKUPS = 16
#: The one rule of "Qubes + connected-set drop" (the product's prerouting has it, among others).
CONNECTED_DROP = [_m(_saddr(), "@connected"), {"counter": None}, {"drop": None}]


@dataclass
class Listed:
    """One ``nft -j list ruleset``: per (family, table) its chains (spec, rules) and sets (spec, elements)."""

    chains: dict[tuple[str, str, str], Json] = field(default_factory=dict)
    rules: dict[tuple[str, str, str], list[list[Json]]] = field(default_factory=dict)
    sets: dict[tuple[str, str, str], Json] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Listed:
        out = cls()
        for item in json.loads(text)["nftables"]:
            if "chain" in item:
                c = item["chain"]
                key = (c["family"], c["table"], c["name"])
                out.chains[key] = {k: v for k, v in c.items() if k in ("type", "hook", "prio", "policy")}
                out.rules.setdefault(key, [])
            elif "rule" in item:
                r = item["rule"]
                out.rules.setdefault((r["family"], r["table"], r["chain"]), []).append(r["expr"])
            elif "set" in item:
                s = item["set"]
                out.sets[(s["family"], s["table"], s["name"])] = {k: v for k, v in s.items() if k != "handle"}
        return out

    def without_elements(self) -> Listed:
        sets = {k: {n: v for n, v in s.items() if n != "elem"} for k, s in self.sets.items()}
        return Listed(dict(self.chains), dict(self.rules), sets)

    def base_chains(self, family: str = "ip", table: str = "qubes") -> list[str]:
        found = [(spec["prio"], name) for (f, t, name), spec in self.chains.items()
                 if (f, t) == (family, table) and "hook" in spec]
        return [name for _, name in sorted(found)]

    def closure(self, name: str, family: str = "ip", table: str = "qubes") -> list[str]:
        """``name`` and every chain its rules jump or go to, recursively."""
        out: list[str] = []
        todo = [name]
        while todo:
            c = todo.pop(0)
            if c in out or (family, table, c) not in self.chains:
                continue
            out.append(c)
            for expr in self.rules.get((family, table, c), []):
                for e in expr:
                    for k in ("jump", "goto"):
                        if k in e:
                            todo.append(e[k]["target"])
        return out


def _strip_counters(expr: list[Json]) -> list[Json]:
    return [e for e in expr if "counter" not in e]


def _fresh_counters(expr: list[Json]) -> list[Json]:
    return [{"counter": None} if "counter" in e else e for e in expr]


def build(product: Listed, chains: dict[str, tuple[str, Listed | None]], *, counters: bool = True,
          extra_rules: dict[str, list[list[Json]]] | None = None, everything: Listed | None = None) -> Json:
    """The nft JSON that flushes the ruleset and loads table ``ip qubes`` with the product's sets
    (and their elements) and ``chains``: name -> (source label, listing or ``None`` for Qubes' own).

    ``everything``: every table of that listing instead (the whole ruleset, ip6 included).
    """
    cmds: list[Json] = [{"flush": {"ruleset": None}}]
    keep = (lambda e: e) if counters else _strip_counters
    if everything is not None:
        tables = sorted({(f, t) for f, t, _ in [*everything.chains, *everything.sets]})
        for f, t in tables:
            cmds.append({"add": {"table": {"family": f, "name": t}}})
        for (f, t, name), spec in everything.sets.items():
            cmds += _set_cmds(f, t, name, spec, product.sets.get((f, t, name)))
        for (f, t, name), spec in everything.chains.items():
            cmds.append({"add": {"chain": {"family": f, "table": t, "name": name, **spec}}})
        for (f, t, name), rules in everything.rules.items():
            cmds += [{"add": {"rule": {"family": f, "table": t, "chain": name, "expr": keep(_fresh_counters(e))}}}
                     for e in rules]
        return {"nftables": cmds}
    cmds.append({"add": {"table": {"family": "ip", "name": "qubes"}}})
    for (f, t, name), spec in product.sets.items():
        if (f, t) == ("ip", "qubes"):
            cmds += _set_cmds(f, t, name, spec, spec)
    rules: list[Json] = []
    for name, (_, src) in chains.items():
        if src is None:
            spec, body = QUBES_CHAINS[name]
        else:
            spec, body = src.chains[("ip", "qubes", name)], src.rules[("ip", "qubes", name)]
        body = [*body, *(extra_rules or {}).get(name, [])]
        cmds.append({"add": {"chain": {"family": "ip", "table": "qubes", "name": name, **spec}}})
        rules += [{"add": {"rule": {"family": "ip", "table": "qubes", "chain": name,
                                    "expr": keep(_fresh_counters(e))}}} for e in body]
    return {"nftables": cmds + rules}


def _set_cmds(family: str, table: str, name: str, spec: Json, filled: Json | None) -> list[Json]:
    bare = {k: v for k, v in spec.items() if k != "elem"}
    out: list[Json] = [{"add": {"set": {**bare, "family": family, "table": table, "name": name}}}]
    elems = filled.get("elem") if filled is not None else None
    if elems:
        out.append({"add": {"element": {"family": family, "table": table, "name": name, "elem": elems}}})
    return out


def qubes_plus(product: Listed, *names: str) -> dict[str, tuple[str, Listed | None]]:
    chains: dict[str, tuple[str, Listed | None]] = {c: ("qubes", None) for c in QUBES_CHAINS}
    for n in names:
        for c in product.closure(n):
            chains[c] = ("product", product)
    return chains


#: Calibration lookups: the set each rule looks the source up in (every one misses).
CALIB_SETS: dict[str, Json] = {
    "hash": {"type": "ipv4_addr"},  # no size: the kernel picks its resizable hash (nft_rhash), as Qubes' sets get
    "sized hash": {"type": "ipv4_addr", "size": 16384},  # a size: its fixed hash (nft_hash_fast for 4-byte keys)
    "empty interval": {"type": "ipv4_addr", "flags": ["interval"]},  # nft_rbtree, as the -nets companions
}


def _ct_in(*states: str) -> Json:
    return _m({"ct": {"key": "state"}}, list(states), "in")


#: current Qubes' ``forward`` (network/qubes-ipv4.nft): its own, not this package's.
QUBES_FORWARD = [
    [{"jump": {"target": "custom-forward"}}],
    [_ct_in("invalid"), {"counter": None}, {"drop": None}],
    [_ct_in("established", "related"), {"accept": None}],
    [_m(_meta("iifgroup"), 2, "!="), {"counter": None}, {"drop": None}],
    [_m(_meta("oifgroup"), 2), {"counter": None}, {"drop": None}],
]


def current_qubes(product: Listed) -> Json:
    """A netvm of current Qubes as a whole, IPv4: ``qubes-antispoof.nft`` and ``qubes-ipv4.nft``
    (table ``ip qubes``), the DNS script's ``dnat-dns`` (the same DNAT rules as this package's), and
    the firewall service's ``ip qubes-firewall`` (qubesagent/firewall.py: ``forward`` at priority 0,
    policy drop, established first, then one ``ip saddr X jump qbs-X`` per VM in ``qubes-forward``;
    ``prerouting`` and ``postrouting`` at -300 dropping connected addresses from and to non-vif
    interfaces), with every VM's chain accepting (its policy)."""
    chains = qubes_plus(product, "input", "dnat-dns")
    out = build(product, chains)["nftables"]
    out += [{"add": {"chain": {"family": "ip", "table": "qubes", "name": "forward", "type": "filter",
                               "hook": "forward", "prio": 0, "policy": "accept"}}},
            {"add": {"chain": {"family": "ip", "table": "qubes", "name": "custom-forward"}}}]
    out += [{"add": {"rule": {"family": "ip", "table": "qubes", "chain": "forward", "expr": e}}}
            for e in QUBES_FORWARD]
    vms = [e if isinstance(e, str) else e["elem"]["val"] if "elem" in e else e
           for e in product.sets.get(("ip", "qubes", "connected"), {}).get("elem", [])]
    fw = {"family": "ip", "table": "qubes-firewall"}
    out.append({"add": {"table": {"family": "ip", "name": "qubes-firewall"}}})
    out.append({"add": {"set": {**fw, "name": "dns-addr", "type": "ipv4_addr"}}})
    for name, hook, prio, policy in (("forward", "forward", 0, "drop"), ("prerouting", "prerouting", -300, "accept"),
                                     ("postrouting", "postrouting", -300, "accept")):
        out.append({"add": {"chain": {**fw, "name": name, "type": "filter", "hook": hook, "prio": prio,
                                      "policy": policy}}})
    out.append({"add": {"chain": {**fw, "name": "qubes-forward"}}})
    rules: list[list[Json]] = []
    vif = {"left": _meta("iifname"), "right": "vif*", "op": "!="}
    out += [{"add": {"rule": {**fw, "chain": "forward", "expr": e}}} for e in (
        [_ct_in("established", "related"), {"accept": None}],
        [{"match": vif}, {"accept": None}],
        [{"jump": {"target": "qubes-forward"}}])]
    if vms:
        out.append({"add": {"rule": {**fw, "chain": "prerouting", "expr": [
            {"match": vif}, _m(_saddr(), {"set": vms}), {"drop": None}]}}})
        out.append({"add": {"rule": {**fw, "chain": "postrouting", "expr": [
            {"match": {**vif, "left": _meta("oifname")}},
            _m({"payload": {"protocol": "ip", "field": "daddr"}}, {"set": vms}), {"drop": None}]}}})
    for addr in vms:
        chain = "qbs-" + str(addr).replace(".", "-")
        out.append({"add": {"chain": {**fw, "name": chain}}})
        rules.append([_m(_saddr(), addr), {"jump": {"target": chain}}])
        out.append({"add": {"rule": {**fw, "chain": chain, "expr": [{"accept": None}]}}})
    out += [{"add": {"rule": {**fw, "chain": "qubes-forward", "expr": e}}} for e in rules]
    return {"nftables": out}


def calibration(product: Listed, base_chains: int, lookups: int, kind: str = "hash") -> Json:
    """Qubes' shape plus ``base_chains`` empty filter base chains at the forward hook, the first with
    ``lookups`` rules that each miss in a set of ``kind`` (1000 addresses, or none for the interval set;
    ``cmp``: an address comparison instead): what one base chain, and one lookup, cost, amplified
    above the noise."""
    cmds = build(product, qubes_plus(product))["nftables"]
    if kind != "cmp":
        cmds.append({"add": {"set": {"family": "ip", "table": "qubes", "name": "calib", **CALIB_SETS[kind]}}})
    if kind in ("hash", "sized hash"):
        cmds.append({"add": {"element": {"family": "ip", "table": "qubes", "name": "calib",
                                         "elem": [f"198.18.{i // 250}.{i % 250 + 1}" for i in range(1000)]}}})
    for i in range(base_chains):
        cmds.append({"add": {"chain": {"family": "ip", "table": "qubes", "name": f"calib{i}", "type": "filter",
                                       "hook": "forward", "prio": 10 + i, "policy": "accept"}}})
    miss = _m(_saddr(), "198.18.255.1") if kind == "cmp" else _m(_saddr(), "@calib")
    for _ in range(lookups):
        cmds.append({"add": {"rule": {"family": "ip", "table": "qubes", "chain": "calib0",
                                      "expr": [miss, {"drop": None}]}}})
    return {"nftables": cmds}


def variants(product: Listed, previous: Listed | None, calibrate: bool = True) -> dict[str, Json | None]:
    """Variant name -> nft JSON to load (``None``: flush only)."""
    out: dict[str, Json | None] = {NONE: None, NONE_AGAIN: None}
    out[NAT_ONLY] = build(product, {"postrouting": ("qubes", None)})
    out[QUBES] = build(product, qubes_plus(product))
    out[QUBES_WHOLE] = current_qubes(product)
    shared = set(QUBES_CHAINS)
    for base in product.base_chains():
        if base in shared:
            continue
        members = product.closure(base)
        label = base + (f" (+ {', '.join(c for c in members if c != base)})" if len(members) > 1 else "")
        out[f"Qubes + {label}"] = build(product, qubes_plus(product, base))
    pre = product.closure("prerouting")
    chains = qubes_plus(product)
    for c in ("prerouting", "antispoof"):
        chains.pop(c)
    for c in pre:
        chains[c] = ("product", product)
    out[f"Qubes + product's prerouting ({', '.join(pre)})"] = build(product, chains)
    out["Qubes + connected-set drop"] = build(product, qubes_plus(product), extra_rules={"prerouting": [
        CONNECTED_DROP]})
    out[f"{WHOLE} without counters"] = build(product, {}, counters=False, everything=product)
    out[WHOLE] = build(product, {}, everything=product)
    if previous is not None:
        out["previous whole ruleset"] = build(product, {}, everything=previous)
    if calibrate:
        out["calibration: Qubes + 1 empty base chain"] = calibration(product, 1, 0)
        out[f"calibration: Qubes + {CALIB_CHAINS} empty base chains"] = calibration(product, CALIB_CHAINS, 0)
        for kind in ("hash", "sized hash", "empty interval", "cmp"):
            what = "address comparisons" if kind == "cmp" else f"{kind} set misses"
            out[f"calibration: Qubes + 1 base chain, {CALIB_LOOKUPS} {what}"] = calibration(
                product, 1, CALIB_LOOKUPS, kind)
    return out


# --- the path -------------------------------------------------------------------------------


def offloads_on(ns: Netns, dev: str) -> str:
    args: list[str] = []
    for f in ON:
        args += [f, "on"]
    ns.run("ethtool", "-K", dev, *args, check=False)
    return "tso/gso/gro on"


def set_offloads(path: Path3, nv: Netvm, mode: str) -> None:
    for ns, dev in ((path.vm, f"e{IPERF_DOMID}"), (nv.ns, f"vif{IPERF_DOMID}.0"), (nv.ns, nv.uplink),
                    (nv.vms, "wan0")):
        (offloads_off if mode == "off" else offloads_on)(ns, dev)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=int, default=5, help="iperf3 seconds per measurement (+1 omitted)")
    p.add_argument("--others", type=int, default=1000)
    p.add_argument("--offloads", default="off,on", help="off, on or off,on (default)")
    p.add_argument("--only", help="variant names separated by ';' (no filter is always measured)")
    p.add_argument("--previous", type=Path, default=REPO / "benchmarks/rulesets/restructure-2369cdc.json",
                   help="an earlier whole ruleset (nft -j list ruleset, elements left out) to compare; '' for none")
    p.add_argument("--no-calibration", action="store_true", help="leave out the calibration variants")
    p.add_argument("--save-ruleset", type=Path, help="write the product's ruleset (no elements) there and go on")
    p.add_argument("--python", default=str(REPO / ".venv/bin/python3"))
    p.add_argument("--live", action="store_true", help="run the work tree in place instead of a copy")
    p.add_argument("--json", type=Path, default=REPO / "benchmarks/results" / f"{NAME}.json")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    require_root()
    ensure_tools(TOOLS)
    info = machine_info(args.python)
    log(f"{NAME}: {info['cpu_model']}, {info['nproc']} CPUs, kernel {info['uname_r']}, "
        f"load {info['loadavg_start'][0]:.1f}")
    modes = [m for m in args.offloads.split(",") if m]
    others = list(range(OTHERS_BASE, OTHERS_BASE + args.others))
    everyone = [vm_ip(d) for d in [IPERF_DOMID, *others]]
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    setup: dict[str, float] = {}
    t_start = time.perf_counter()
    with cleanup_on_exit() as cleanup:
        run = Run(cleanup, args.python, live=args.live)
        conf = (f"[netvm]\ngateway = {GATEWAY}\nprimary_dns = {DNS1}\nsecondary_dns = {DNS2}\n"
                f"connected_ips = {' '.join(everyone)}\n\n[firewall]\nbackend = nftables\n")
        nv = Netvm(run, "abl", "nftables", conf=conf)
        resolv = run.tmp / "resolv.conf"
        resolv.write_text("nameserver 192.0.2.53\n")
        t0 = time.perf_counter()
        nv.tool("init", "--resolv-conf", str(resolv))
        setup["init"] = time.perf_counter() - t0
        nv.start_agent()
        nv.add_vifs(others)
        log(f"bringing {len(others)} vifs online through the agent")
        setup[f"{len(others)} online"] = nv.bring_online(others)
        path = Path3(run, nv, filtered=True)
        listing = nv.ns.run("nft", "-j", "list", "ruleset").stdout
        product = Listed.parse(listing)
        if args.save_ruleset:
            args.save_ruleset.parent.mkdir(parents=True, exist_ok=True)
            data = json.loads(listing)
            for item in data["nftables"]:
                if "set" in item:
                    item["set"].pop("elem", None)
                if "rule" in item:
                    item["rule"]["expr"] = _fresh_counters(item["rule"]["expr"])
            args.save_ruleset.write_text(json.dumps(data, indent=1) + "\n")
            log(f"wrote {args.save_ruleset}")
        previous = Listed.parse(args.previous.read_text()) if args.previous and args.previous.is_file() else None
        wanted = variants(product, previous, calibrate=not args.no_calibration)
        if args.only:
            keep = set(args.only.split(";")) | {NONE}
            wanted = {k: v for k, v in wanted.items() if k in keep}
        files: dict[str, Path] = {}
        for i, (name, rules) in enumerate(wanted.items()):
            f = run.tmp / f"variant-{i}.json"
            f.write_text(json.dumps(rules if rules is not None else {"nftables": [{"flush": {"ruleset": None}}]}))
            nv.ns.run("nft", "-j", "-f", str(f))  # every variant loads, before anything is measured
            files[name] = f
        cells = [(name, mode) for mode in modes for name in wanted]
        results = {mode: {name: [] for name in wanted} for mode in modes}
        loads: list[float] = []
        for r in range(args.rounds):
            t0 = time.perf_counter()
            for name, mode in rotate(cells, r * max(1, len(cells) // args.rounds)):
                nv.ns.run("nft", "-j", "-f", str(files[name]))
                set_offloads(path, nv, mode)
                nv.ns.run("conntrack", "-F", check=False)
                m = path.measure(args.seconds)
                m["load"] = os.getloadavg()[0]
                loads.append(m["load"])
                results[mode][name].append(m)
                log(f"round {r + 1} offloads {mode} {name}: {m['bps'] / 1e9:.3f} Gbit/s")
            log(f"round {r + 1}/{args.rounds}: {time.perf_counter() - t0:.0f} s, load {os.getloadavg()[0]:.1f}")
        info["loadavg_end"] = os.getloadavg()

    goals: list[Goal] = []
    print()
    print(f"{NAME}: {info['cpu_model']}, nproc {info['nproc']}, kernel {info['uname_r']}, load average "
          f"{info['loadavg_start'][0]:.1f} at start, {min(loads):.1f}-{max(loads):.1f} during, "
          f"{info['loadavg_end'][0]:.1f} at end")
    print(f"iperf3 TCP, 1 stream, {args.seconds} s (+1 omitted) per cell, {args.rounds} rounds interleaved, "
          f"{args.others} + 1 VMs online, ratio to '{NONE}' of the same round and offloads")
    for mode in modes:
        res = results[mode]
        base = [m["bps"] for m in res[NONE]]
        rows = []
        for name, ms in res.items():
            bps = [m["bps"] for m in ms]
            ratios = [b / n for b, n in zip(bps, base, strict=True)]
            rows.append([name, " ".join(f"{b / 1e9:.2f}" for b in bps), f"{statistics.median(bps) / 1e9:.3f}",
                         " ".join(f"{x:.3f}" for x in ratios), f"{statistics.median(ratios):.3f}"])
        print(f"\noffloads {mode} ({'tso/gso/gro and the rest off' if mode == 'off' else 'tso/gso/gro on'})")
        print(table(("ruleset in the netvm", "Gbit/s per round", "Gbit/s p50", "ratio per round", "ratio p50"),
                    rows))

        def gbps(name: str, res: dict[str, list[dict[str, Any]]] = res) -> list[float]:
            return [m["bps"] / 1e9 for m in res[name]]

        whole, qubes, nat = gbps(WHOLE), gbps(QUBES) if QUBES in res else [], gbps(NAT_ONLY) if NAT_ONLY in res else []
        if qubes:
            goals.append(Goal(f"offloads {mode}: whole ruleset >= Qubes shape", statistics.median(whole),
                              statistics.median(qubes), 1.0, unit="Gbit/s", op=">=", ci=boot_ratio_ci(whole, qubes)))
        if QUBES_WHOLE in res:
            goals.append(Goal(f"offloads {mode}: whole ruleset vs {QUBES_WHOLE} (reported)",
                              statistics.median(whole), statistics.median(gbps(QUBES_WHOLE)), 1.0, unit="Gbit/s",
                              op=">=", ci=boot_ratio_ci(whole, gbps(QUBES_WHOLE))))
        if nat:
            goals.append(Goal(f"offloads {mode}: whole ruleset >= 0.95 conntrack + masquerade",
                              statistics.median(whole), statistics.median(nat), 0.95, unit="Gbit/s", op=">=",
                              ci=boot_ratio_ci(whole, nat)))
        again = gbps(NONE_AGAIN) if NONE_AGAIN in res else []
        if again:
            goals.append(Goal(f"offloads {mode}: {NONE_AGAIN} vs {NONE} (reported: the noise)",
                              statistics.median(again), statistics.median(gbps(NONE)), 1.0, unit="Gbit/s", op=">=",
                              ci=boot_ratio_ci(again, gbps(NONE))))
    print_goals(goals)
    write_json(args.json, {
        "benchmark": NAME, "machine": info, "config": {k: str(v) for k, v in vars(args).items()},
        "offload_features": {"off": list(OFFLOADS), "on": list(ON)}, "setup_s": setup, "throughput": results,
        "goals": [g.as_dict() for g in goals], "duration_s": time.perf_counter() - t_start,
    })
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
