#!/usr/bin/env python3
"""Which part of the netvm ruleset costs forwarding throughput: the product's nftables ruleset, piece by piece.

Run as root: ``python3 benchmarks/ablate_throughput.py [--rounds 2] [--seconds 5] [--others 1000]``.

One VM namespace -> netvm -> uplink namespace path (as ``bench_backends.py``:
veths with tso/gso/gro off, the VM configured as a Qubes VM, the netvm's
route and neighbour entry set by hand, ``--others`` elements in the sets),
and a series of rulesets loaded by hand with ``nft -f`` into the netvm
between measurements: the product's ruleset as ``vif-hotplug init`` +
``online`` leave it (copied from a real run, see ``RULESET``), then the same
with one chain removed, then only conntrack, etc. ``empty`` (no table: no
conntrack hooks either) is the baseline. Rulesets are interleaved round by
round; conntrack is flushed before each measurement. A tool for finding
costs, not a benchmark.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import REPO, Netvm, Run, cleanup_on_exit, log, rotate, table, vm_ip
from bench_backends import IPERF_DOMID, Path3

VM = vm_ip(IPERF_DOMID)
VIF = f"vif{IPERF_DOMID}.0"

SETS = """
    set allowed { type ifname . ipv4_addr; }
    set allowed-nets { type ifname . ipv4_addr; flags interval; }
    set downstream { type ipv4_addr; }
    set downstream-nets { type ipv4_addr; flags interval; }
    set connected { type ipv4_addr; }
"""
CHAINS = {
    "prerouting": """
    chain prerouting {
        type filter hook prerouting priority raw; policy accept;
        iifgroup 2 goto antispoof
        ip saddr @downstream counter drop
        ip saddr @downstream-nets counter drop
        ip saddr @connected counter drop
    }
    chain antispoof {
        iifname . ip saddr @allowed accept
        iifname . ip saddr @allowed-nets accept
        counter drop
    }""",
    "downstream-out": """
    chain downstream-out {
        type filter hook postrouting priority raw; policy accept;
        oifgroup != 2 ip daddr @connected counter drop
    }""",
    "postrouting": """
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifgroup 2 accept
        oif "lo" accept
        masquerade
    }""",
    "forward": """
    chain custom-forward { }
    chain forward {
        type filter hook forward priority filter; policy accept;
        jump custom-forward
        ct state invalid counter drop
        ct state established,related accept
        oifgroup 2 counter drop
    }""",
    "input": """
    chain custom-input { }
    chain input {
        type filter hook input priority filter; policy drop;
        jump custom-input
        ct state invalid counter drop
        ct state established,related accept
        iif "lo" accept
        counter
    }""",
    "dnat-dns": """
    chain dnat-dns {
        type nat hook prerouting priority dstnat; policy accept;
        ip daddr 10.139.1.1 udp dport 53 dnat to 192.0.2.53
        ip daddr 10.139.1.1 tcp dport 53 dnat to 192.0.2.53
        ip daddr 10.139.1.2 udp dport 53 dnat to 192.0.2.53
        ip daddr 10.139.1.2 tcp dport 53 dnat to 192.0.2.53
    }""",
    "dns-guard": """
    chain dns-guard {
        type filter hook forward priority filter - 1; policy accept;
        ip daddr 10.139.1.1 reject with tcp reset
        ip daddr 10.139.1.1 reject
        ip daddr 10.139.1.2 reject with tcp reset
        ip daddr 10.139.1.2 reject
    }""",
    # Variants of single chains, for comparison.
    "hook-only": """
    chain prerouting {
        type filter hook prerouting priority raw; policy accept;
    }""",
    "prerouting-vif-only": """
    chain prerouting {
        type filter hook prerouting priority raw; policy accept;
        iifgroup 2 goto antispoof
    }
    chain antispoof {
        iifname . ip saddr @allowed accept
        counter drop
    }""",
    "prerouting-no-nets": """
    chain prerouting {
        type filter hook prerouting priority raw; policy accept;
        iifgroup 2 goto antispoof
        ip saddr @downstream counter drop
    }
    chain antispoof {
        iifname . ip saddr @allowed accept
        counter drop
    }""",
    "ct-only": """
    chain forward {
        type filter hook forward priority filter; policy accept;
        ct state established,related accept
    }""",
    "dns-guard-one-rule": """
    chain dns-guard {
        type filter hook forward priority filter - 1; policy accept;
        ip daddr { 10.139.1.1, 10.139.1.2 } meta l4proto tcp reject with tcp reset
        ip daddr { 10.139.1.1, 10.139.1.2 } reject
    }""",
    "forward-with-dns-guard-after-established": """
    chain custom-forward { }
    chain forward {
        type filter hook forward priority filter; policy accept;
        jump custom-forward
        ct state invalid counter drop
        ct state established,related accept
        ip daddr { 10.139.1.1, 10.139.1.2 } meta l4proto tcp reject with tcp reset
        ip daddr { 10.139.1.1, 10.139.1.2 } reject
        oifgroup 2 counter drop
    }""",
}
FULL = ["prerouting", "downstream-out", "postrouting", "forward", "input", "dnat-dns", "dns-guard"]
VARIANTS: dict[str, list[str] | None] = {
    "empty (no table)": None,
    "product ruleset": FULL,
    "- dns-guard": [c for c in FULL if c != "dns-guard"],
    "- prerouting/antispoof": [c for c in FULL if c != "prerouting"],
    "- downstream-out": [c for c in FULL if c != "downstream-out"],
    "- postrouting (no masquerade)": [c for c in FULL if c != "postrouting"],
    "- dnat-dns": [c for c in FULL if c != "dnat-dns"],
    "dns-guard as 2 set rules": [c for c in FULL if c != "dns-guard"] + ["dns-guard-one-rule"],
    "dns-guard inside forward, after established": [c for c in FULL if c not in ("dns-guard", "forward")]
    + ["forward-with-dns-guard-after-established"],
    "conntrack only (forward ct accept)": ["ct-only"],
    "conntrack + masquerade": ["ct-only", "postrouting"],
    "prerouting/antispoof only (no conntrack)": ["prerouting"],
    "prerouting: vif branch only (no conntrack)": ["prerouting-vif-only"],
    "one empty base chain (hook only)": ["hook-only"],
    "prerouting: no -nets/connected lookups (no conntrack)": ["prerouting-no-nets"],
    "product ruleset, nf_conntrack_checksum=0": FULL,
    "empty + rp_filter=1": None,
    "product ruleset - prerouting/antispoof + rp_filter=1": [c for c in FULL if c != "prerouting"],
}
#: sysctls a variant sets in the netvm (others get the defaults back).
_RP = {"net.ipv4.conf.all.rp_filter": "1", f"net.ipv4.conf.vif{IPERF_DOMID}/0.rp_filter": "1",
       "net.ipv4.conf.uplink0.rp_filter": "1"}
SYSCTLS = {"product ruleset, nf_conntrack_checksum=0": {"net.netfilter.nf_conntrack_checksum": "0"},
           "empty + rp_filter=1": _RP,
           "product ruleset - prerouting/antispoof + rp_filter=1": _RP}
DEFAULT_SYSCTLS = {"net.netfilter.nf_conntrack_checksum": "1", "net.ipv4.conf.all.rp_filter": "0",
                   f"net.ipv4.conf.vif{IPERF_DOMID}/0.rp_filter": "0", "net.ipv4.conf.uplink0.rp_filter": "0"}


def ruleset(chains: list[str], others: int) -> str:
    body = SETS + "".join(CHAINS[c] for c in chains)
    elems = [f'"{VIF}" . {VM}'] + [f'"vif{3001 + i}.0" . {vm_ip(3001 + i)}' for i in range(others)]
    down = [VM] + [vm_ip(3001 + i) for i in range(others)]
    return (f"flush ruleset\ntable ip qubes {{{body}\n}}\n"
            f"add element ip qubes allowed {{ {', '.join(elems)} }}\n"
            f"add element ip qubes downstream {{ {', '.join(down)} }}\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--others", type=int, default=1000)
    p.add_argument("--only", help="variant names separated by ';'")
    args = p.parse_args()
    variants = {k: v for k, v in VARIANTS.items() if not args.only or k in args.only.split(";")}
    variants.setdefault("empty (no table)", None)
    results: dict[str, list[float]] = {k: [] for k in variants}
    with cleanup_on_exit() as cleanup:
        run = Run(cleanup, str(REPO / ".venv/bin/python3"))
        nv = Netvm(run, "abl", None)
        # The VM's vif grouped as online does (the rules match interface group 2).
        path = Path3(run, nv, filtered=False)
        nv.ns.batch([f"link set {VIF} group 2"])
        files: dict[str, Path] = {}
        for name, chains in variants.items():
            f = run.tmp / f"rules-{len(files)}.nft"
            f.write_text("flush ruleset\n" if chains is None else ruleset(chains, args.others))
            files[name] = f
        names = list(variants)
        for r in range(args.rounds):
            for name in rotate(names, r):
                nv.ns.run("nft", "-f", str(files[name]))
                for key, value in {**DEFAULT_SYSCTLS, **SYSCTLS.get(name, {})}.items():
                    nv.ns.run("sysctl", "-qw", f"{key}={value}", check=False)
                nv.ns.run("conntrack", "-F", check=False)
                m = path.measure(args.seconds)
                results[name].append(m["bps"] / 1e9)
                log(f"round {r + 1} {name}: {m['bps'] / 1e9:.3f} Gbit/s")
    base = statistics.median(results["empty (no table)"])
    rows = [[k, " ".join(f"{x:.2f}" for x in v), f"{statistics.median(v):.3f}", f"{statistics.median(v) / base:.3f}"]
            for k, v in results.items()]
    print()
    print(f"iperf3 TCP 1 stream, {args.seconds} s x {args.rounds} rounds, tso/gso/gro off, "
          f"{args.others} other elements in the sets; ratio to 'empty (no table)'")
    print(table(("ruleset in the netvm", "Gbit/s per round", "p50", "ratio"), rows))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
