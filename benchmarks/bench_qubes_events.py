#!/usr/bin/env python3
"""Hotplug events on a Qubes-like netvm (QubesDB in play) against Xen's vif-route and Qubes 4.0 (issue 21).

Run as root: ``python3 benchmarks/bench_qubes_events.py --qubes40 DIR [-n 20] [--json PATH]``
(any Python 3.11+; the product runs on ``.venv/bin/python3``, or ``--python``).
About 2 minutes with the defaults on 2 cores (1.5 min measured: setup 30 s, 32 rounds, 7 storm rounds).

``DIR`` is a checkout of QubesOS/qubes-core-agent-linux at a Qubes 4.0
release tag (``git archive v4.0.65 | tar -x -C DIR``); nothing of it is in
this repository. Without ``--qubes40`` the Qubes 4.0 baseline and its goals
are skipped, with a line saying so.

One run, interleaved round by round (every variant once per round, in
rotated order), p50 of N events per cell, everything in throw-away network
namespaces with an embedded XenStore each (``vif-hotplug xenstored``):

* **module**: the product as on a Qubes netvm whose ``python3-qubesdb``
  imports: netvm.conf has no ``[netvm]`` (the parameters come from
  QubesDB), the agent imports Qubes' ``qubesdb`` module (the project's
  stand-in, ``tests/standin_qubesdb``, on the agent's ``PYTHONPATH`` only)
  and keeps a watched connection to a stand-in qubesdb-daemon
  (``tests/qubesdb_daemon.py``);
* **qubesdb-read**: the same without the module: the agent runs one
  ``qubesdb-read -f -q -- KEY...`` per event, a ``/bin/sh`` script in a
  root-owned directory (``VIF_HOTPLUG_TOOLS_DIR``) that answers as Qubes'
  ``client/qubesdb-cmd.c`` does (``path = value`` with ``-f``, nothing and
  exit 2 for a missing key): one real process start, about what Qubes' C
  program costs;
* **Xen**: Debian's ``/etc/xen/scripts/vif-route`` (xen-utils-common),
  ``xenstore-read/write`` at the netvm's embedded XenStore (``XENSTORED_PATH``);
* **Qubes 4.0**: ``network/vif-route-qubes`` of ``DIR`` (bash), laid in a
  directory of its own beside Xen's ``vif-common.sh`` and friends (it
  sources ``$dir/vif-common.sh``, and ``vif-qubes-nat.sh`` only for a VM
  with a mapped address, which these VMs have not) and run as ``xl devd``
  runs a hotplug script; on its ``PATH`` the same ``qubesdb-read`` (it
  runs one per key: six per event); iptables-legacy, as a Qubes 4.0 netvm
  had it: its runner lives in a mount namespace of its own where
  ``xtables-nft-multi`` is ``xtables-legacy-multi`` bind-mounted (Xen's
  ``xen-hotplug-common.sh`` puts ``/usr/sbin`` first on ``PATH``, so only
  the binary behind ``iptables-restore`` can choose the variant), and the
  netvm's base ruleset loaded first from ``DIR/network/iptables`` and
  ``ip6tables`` (what ``qubes-iptables`` loads at boot);
* floor (reported): ``PREFIX/bin/python3 -I -c pass``, and the
  ``qubesdb-read`` script alone.

Storms: 50 onlines started at once (fork+exec back to back, then reaped),
then 50 offlines, in netvms of their own (Xen's, module, qubesdb-read, and
Qubes 4.0's, reported), in rounds spread over the run.

Goals, each measured value / baseline in the same run:

(a) online and offline through the agent, both QubesDB variants: p50 wall
    <= 0.6x Xen's vif-route and <= 0.3x Qubes 4.0's vif-route-qubes;
(b) a storm of 50 onlines (and one of 50 offlines): wall <= 0.5x Xen's
    vif-route's storm of 50, every vif connected;
(c) with 1000 other vifs online, p50 <= 1.1x the p50 with none.

A benchmark, not a test: prints measured value, baseline, ratio and
PASS/FAIL per goal, writes JSON, exits 0 whatever the goals say (1 only
when it could not measure).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (
    BASE_PATH,
    DNS1,
    DNS2,
    GATEWAY,
    REPO,
    RUNNER,
    XEN_VIF_ROUTE,
    Cells,
    Goal,
    Netvm,
    Record,
    Run,
    Runner,
    Variant,
    _wait_for,
    boot_ratio_ci,
    cleanup_on_exit,
    ensure_tools,
    interleave,
    kill_proc,
    log,
    machine_info,
    p50,
    print_goals,
    require_root,
    rotate,
    sh,
    table,
    vm_ip,
    write_json,
)

NAME = "bench_qubes_events"
STANDIN = REPO / "tests/standin_qubesdb"
DAEMON = REPO / "tests/qubesdb_daemon.py"
DOMID = 1
STORM_BASE = 2001
OTHERS_BASE = 3001
CONNECTED = "10.137.0.200 10.137.0.201"
#: What dom0 gives a Qubes netvm (the keys an event reads, and some it does not); no IPv6.
QUBESDB = {
    "/qubes-netvm-gateway": GATEWAY, "/qubes-netvm-primary-dns": DNS1, "/qubes-netvm-secondary-dns": DNS2,
    "/qubes-netvm-network": "10.137.0.0", "/qubes-ip": "10.138.0.9", "/connected-ips": CONNECTED,
    "/name": "sys-net", "/qubes-vm-type": "NetVM", "/qubes-service/qubes-network": "1",
}
VARIANTS = ("module", "qubesdb-read")
XEN, Q40 = "xen vif-route", "qubes 4.0 vif-route-qubes"
FLOOR = "floor: PREFIX/bin/python3 -I -c pass"
FAKE_ALONE = "qubesdb-read sh alone (9 keys, -f -q)"
#: The Xen scripts Qubes 4.0's vif-route-qubes sources through vif-common.sh (Debian's, as on the netvm).
XEN_COMMON = ("vif-common.sh", "xen-hotplug-common.sh", "xen-network-common.sh", "hotplugpath.sh",
              "logging.sh", "xen-script-common.sh", "locking.sh")
TOOLS = {
    str(XEN_VIF_ROUTE): "xen-utils-common",
    "xenstore-read": "xenstore-utils",
    "ifconfig": "net-tools",  # both scripts bring the vif up with ifconfig
    "ethtool": "ethtool",  # Qubes 4.0's online turns tx checksum offload off
    "logger": "bsdutils",
    "nsenter": "util-linux",
    "unshare": "util-linux",
    "ip": "iproute2",
    "nft": "nftables",
    "iptables-legacy": "iptables",
    "/usr/sbin/xtables-legacy-multi": "iptables",
    "ipset": "ipset",
    "conntrack": "conntrack",
}

#: ``qubesdb-read`` as Qubes' client/qubesdb-cmd.c answers a read (``cmd_read``): each path in turn,
#: ``path = value`` with -f, the value alone otherwise; a missing path prints nothing (``Failed to read
#: PATH`` on stderr unless -q) and makes the exit status 2 (qubes-core-qubesdb since 4.1.13, "CLI tools:
#: distinguish 'no such entry' and 'error'"). Options are getopt's "frq" before the paths, "--" ends
#: them. Values are printable ASCII here, so -r (raw) prints the same as without it. Shell builtins
#: only: one process start per run, as the C program's.
FAKE_QUBESDB_READ = """#!/bin/sh
# Fake qubesdb-read of {name} (benchmark only): answers a read as Qubes' qubesdb-cmd.c does.
full= quiet=
while [ $# -gt 0 ]; do
    case $1 in
        --) shift; break ;;
        -*[!frq]*) echo "qubesdb-read (fake): unsupported option $1" >&2; exit 1 ;;
        -?*) case $1 in *f*) full=1 ;; esac; case $1 in *q*) quiet=1 ;; esac; shift ;;
        *) break ;;
    esac
done
rc=0
for key; do
    case $key in
{cases}
        *) [ -n "$quiet" ] || echo "Failed to read $key" >&2; rc=2; continue ;;
    esac
    if [ -n "$full" ]; then echo "$key = $value"; else echo "$value"; fi
done
exit $rc
"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--qubes40", type=Path, help="a checkout of QubesOS/qubes-core-agent-linux at a Qubes 4.0 "
                   "release tag (its network/vif-route-qubes is the Qubes 4.0 baseline); skipped without it")
    p.add_argument("-n", "--events", type=int, default=30, help="measured events per cell (default 30)")
    p.add_argument("--warmup", type=int, default=2, help="unrecorded rounds first (default 2)")
    p.add_argument("--others", type=int, default=1000, help="other vifs online for goal (c) (default 1000)")
    p.add_argument("--storm", type=int, default=50, help="vifs of a storm (default 50)")
    p.add_argument("--storms", type=int, default=7, help="storms per netvm (default 7)")
    p.add_argument("--backend", default="nftables", choices=("nftables", "iptables"))
    p.add_argument("--python", default=str(REPO / ".venv/bin/python3"), help="the product's interpreter")
    p.add_argument("--live", action="store_true", help="run the work tree in place instead of a copy")
    p.add_argument("--json", type=Path, default=REPO / "benchmarks/results" / f"{NAME}.json")
    return p.parse_args()


def fake_qubesdb_read(path: Path, values: dict[str, str], log_to: Path | None = None) -> None:
    """The fake ``qubesdb-read`` at ``path`` (0755); with ``log_to``, each run appends its argv there."""
    cases = "\n".join(f"        {shlex.quote(k)}) value={shlex.quote(v)} ;;" for k, v in values.items())
    text = FAKE_QUBESDB_READ.format(name=NAME, cases=cases)
    if log_to is not None:
        text = text.replace("full= quiet=\n", f'echo "$*" >>{shlex.quote(str(log_to))}\nfull= quiet=\n', 1)
    path.write_text(text)
    path.chmod(0o755)


def root_dir(path: Path) -> Path:
    """A directory owned and writable by root alone (``VIF_HOTPLUG_TOOLS_DIR``'s rule), its parents too."""
    path.mkdir(mode=0o755)
    path.chmod(0o755)  # whatever the umask
    return path


class QubesNetvm(Netvm):
    """A netvm whose agent gets ``agent_env`` besides the netvm's environment, and whose every process
    (agent, events, setup) gets ``common_env``."""

    def __init__(self, run: Run, role: str, backend: str | None, conf: str | None = None,
                 common_env: dict[str, str] | None = None, agent_env: dict[str, str] | None = None) -> None:
        self.common_env = common_env or {}
        self.agent_env = agent_env or {}
        super().__init__(run, role, backend, conf)

    @property
    def env(self) -> dict[str, str]:
        return {**super().env, **self.common_env}

    def start_agent(self) -> None:
        self.agent = self.run_.popen(
            self.ns.enter(str(self.run_.bin / "vif-hotplug"), "agent", "--no-start-up"), f"agent {self.role}",
            env={**self.env, "LANG": "C.UTF-8", **self.agent_env}, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=open(self.tmp / "agent.log", "w"),
        )
        _wait_for((self.tmp / "state" / "agent.sock").exists, f"agent of {self.role}", self.agent, 60)


class LegacyRunner(Runner):
    """:mod:`_runner` in the netvm's network namespace and in a private mount namespace where
    ``/usr/sbin/xtables-nft-multi`` is ``xtables-legacy-multi`` (bind mount): ``iptables``,
    ``iptables-restore``, ``ip6tables-restore`` (Debian's alternatives point at the nft multi-binary,
    which dispatches on argv[0] as the legacy one does) are the legacy tools there, and only there."""

    def __init__(self, run: Run, nv: Netvm) -> None:
        setup = 'mount --bind /usr/sbin/xtables-legacy-multi /usr/sbin/xtables-nft-multi && exec "$0" -I -S "$1"'
        self.proc = run.popen(nv.ns.enter("unshare", "--mount", "--propagation", "private", "--", "sh", "-c", setup,
                                          run.python, str(RUNNER)),
                              f"legacy runner in {nv.ns.name}", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, cwd="/")


def qubes40_scripts(run: Run, checkout: Path) -> tuple[Path, dict[str, Any]]:
    """Qubes 4.0's vif-route-qubes and vif-qubes-nat.sh in a directory of their own beside links to Xen's
    common scripts; what was taken (version, sha256 of each file)."""
    net = checkout / "network"
    files = {name: net / name for name in ("vif-route-qubes", "vif-qubes-nat.sh", "iptables", "ip6tables")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise SystemExit(f"--qubes40 {checkout}: not a qubes-core-agent-linux checkout (missing {', '.join(missing)})")
    version = (checkout / "version").read_text().strip() if (checkout / "version").is_file() else "?"
    if not version.startswith("4.0."):
        log(f"warning: --qubes40 {checkout} is version {version}, not a Qubes 4.0 release")
    scripts = root_dir(run.tmp / "q40-scripts")
    for name in ("vif-route-qubes", "vif-qubes-nat.sh"):
        (scripts / name).write_bytes(files[name].read_bytes())
        (scripts / name).chmod(0o755)
    for name in XEN_COMMON:
        os.symlink(XEN_VIF_ROUTE.parent / name, scripts / name)
    meta = {"dir": str(checkout), "version": version,
            "sha256": {n: hashlib.sha256(p.read_bytes()).hexdigest() for n, p in files.items()}}
    return scripts, meta


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine since boot (/proc/stat's ``cpu`` line; idle and
    iowait are not busy)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields) - fields[3] - fields[4], sum(fields)


def main() -> int:
    args = parse_args()
    require_root()
    ensure_tools(TOOLS)
    info = machine_info(args.python)
    log(f"{NAME}: {info['cpu_model']}, {info['nproc']} CPUs, kernel {info['uname_r']}, "
        f"Python {info['python_product']}, load {info['loadavg_start'][0]:.1f}")
    if args.qubes40 is None:
        print("Qubes 4.0 baseline SKIPPED: no --qubes40 DIR (a checkout of QubesOS/qubes-core-agent-linux at a "
              "v4.0.x tag); its goals are not measured", flush=True)
    cells = Cells()
    storms: dict[str, list[dict[str, Any]]] = {}
    setup: dict[str, float] = {}
    checks: dict[str, Any] = {}
    loads: list[float] = []
    #: CPUs kept busy (whole machine, /proc/stat) during each measured round's single events: this run
    #: alone keeps about one busy (one event at a time); the rest is other work on the machine.
    busy_cpus: list[float] = []
    #: The CPU of the measured events themselves (client rusage + agent delta) per second of the round.
    own_cpus: list[float] = []
    b = args.backend
    t_start = time.perf_counter()
    with cleanup_on_exit() as cleanup:
        run = Run(cleanup, args.python, live=args.live)
        resolv = run.tmp / "resolv.conf"
        resolv.write_text("nameserver 192.0.2.53\nnameserver 192.0.2.54\n")

        # -- QubesDB: the stand-in daemon (module) and the fake qubesdb-read (a root-owned tools dir) --
        sock = str(run.tmp / "qubesdb.sock")
        daemon = run.popen([sys.executable, str(DAEMON), "--socket", sock,
                            *(f"{k}={v}" for k, v in QUBESDB.items())], "stand-in qubesdb-daemon",
                           stdout=subprocess.PIPE, text=True)
        assert daemon.stdout is not None
        if daemon.stdout.readline().strip() != "ready":
            raise RuntimeError("the stand-in qubesdb-daemon did not start")
        tools = root_dir(run.tmp / "tools")
        fake_qubesdb_read(tools / "qubesdb-read", QUBESDB)
        probe_tools = root_dir(run.tmp / "tools-probe")
        probe_log = run.tmp / "qubesdb-read.runs"
        fake_qubesdb_read(probe_tools / "qubesdb-read", QUBESDB, log_to=probe_log)
        # The sh fake answers as the stand-in's Python qubesdb-read (itself checked against qubesdb-cmd.c):
        # same stdout and exit status, with -f -q and without, a missing key among them.
        keys = [*QUBESDB, "/qubes-netvm-gateway6", "/mapped-ip/10.137.0.3/visible-ip"]
        for flags in (["-f", "-q", "--"], []):
            mine = sh(str(tools / "qubesdb-read"), *flags, *keys, check=False)
            theirs = sh(sys.executable, str(STANDIN / "qubesdb-read"), *flags, *keys, check=False,
                        env={"PATH": "/usr/bin:/bin", "QUBESDB_STANDIN_SOCKET": sock})
            if (mine.stdout, mine.returncode) != (theirs.stdout, theirs.returncode):
                raise RuntimeError(f"the sh qubesdb-read ({mine.returncode}: {mine.stdout!r}) does not answer as the "
                                   f"stand-in's ({theirs.returncode}: {theirs.stdout!r})")
        checks["fake qubesdb-read answers as the stand-in's"] = True

        # -- Xen's vif-route --
        xen = Netvm(run, "xen", None)
        xen.add_vifs([DOMID])
        storm_ids = list(range(STORM_BASE, STORM_BASE + args.storm))
        xens = Netvm(run, "xens", None)
        xens.add_vifs(storm_ids)

        def xen_job(nv: Netvm, command: str, domid: int) -> dict[str, Any]:
            return {"argv": [str(XEN_VIF_ROUTE), command, "type_if=vif"],
                    "env": nv.toolstack_env(domid, str(XEN_VIF_ROUTE), netdev=nv.uplink),
                    "out": str(nv.tmp / "out" / f"xen-{command}-{domid}.log")}

        # -- Qubes 4.0's vif-route-qubes --
        q40: Netvm | None = None
        q40s: Netvm | None = None
        q40_script: Path | None = None
        if args.qubes40 is not None:
            scripts, info["qubes40"] = qubes40_scripts(run, args.qubes40.resolve())
            q40_script = scripts / "vif-route-qubes"
            q40, q40s = Netvm(run, "q40", None), Netvm(run, "q40s", None)
            for nv, vifs in ((q40, [DOMID]), (q40s, storm_ids)):
                kill_proc(nv.runner.proc)
                nv.runner = LegacyRunner(run, nv)
                # What qubes-iptables loads at a Qubes 4.0 netvm's boot (no IPv6: ip6tables.rules).
                nv.ns.run("iptables-legacy-restore", str(args.qubes40 / "network/iptables"))
                nv.ns.run("ip6tables-legacy-restore", str(args.qubes40 / "network/ip6tables"))
                nv.add_vifs(vifs)

        def q40_job(nv: Netvm, command: str, domid: int) -> dict[str, Any]:
            assert q40_script is not None
            env = nv.toolstack_env(domid, "/etc/xen/scripts/vif-route-qubes", PATH=f"{tools}:{BASE_PATH}")
            return {"argv": [str(q40_script), command, "type_if=vif"], "env": env,
                    "out": str(nv.tmp / "out" / f"q40-{command}-{domid}.log")}

        # -- the product, QubesDB in play: netvm.conf names the backend only --
        conf = f"[firewall]\nbackend = {b}\n"
        kinds: dict[str, dict[str, Any]] = {
            "module": {"common_env": {},
                       "agent_env": {"PYTHONPATH": str(STANDIN), "QUBESDB_STANDIN_SOCKET": sock}},
            "qubesdb-read": {"common_env": {"VIF_HOTPLUG_TOOLS_DIR": str(tools)}, "agent_env": {}},
        }
        other_ids = list(range(OTHERS_BASE, OTHERS_BASE + args.others))
        nv0: dict[str, QubesNetvm] = {}
        nvk: dict[str, QubesNetvm] = {}
        nvs: dict[str, QubesNetvm] = {}
        for v, kind in kinds.items():
            short = "mod" if v == "module" else "cli"
            for role, vifs, into in ((f"{short}0", [DOMID], nv0), (f"{short}k", [DOMID, *other_ids], nvk),
                                     (f"{short}s", storm_ids, nvs)):
                nv = QubesNetvm(run, role, b, conf=conf, **kind)
                t0 = time.perf_counter()
                # init reads QubesDB as the event does (setup: through qubesdb-read for both variants).
                sh(*nv.ns.enter(str(run.bin / "vif-hotplug"), "init", "--resolv-conf", str(resolv)),
                   env={**os.environ, **nv.env, "VIF_HOTPLUG_AGENT": "off", "VIF_HOTPLUG_TOOLS_DIR": str(tools)})
                setup[f"{role} init"] = time.perf_counter() - t0
                nv.start_agent()
                nv.add_vifs(vifs)
                if role.endswith("k") and other_ids:
                    log(f"{role}: bringing {len(other_ids)} other vifs online through the agent")
                    setup[f"{role} {len(other_ids)} others online"] = nv.bring_online(other_ids)
                if role.endswith("s"):  # warm the agent: its first event imports the event path
                    nv.timed(nv.wrapper("online", vifs[0]))
                    nv.timed(nv.wrapper("offline", vifs[0]))
                into[v] = nv

        # -- proofs that the parameters come from QubesDB (not netvm.conf): gateway on the vif; and for
        #    the qubesdb-read variant, one qubesdb-read -f -q -- KEY... per event (a logging copy) --
        for v in VARIANTS:
            nv = nv0[v]
            probe = {"VIF_HOTPLUG_TOOLS_DIR": str(probe_tools)} if v == "qubesdb-read" else {}
            job = nv.wrapper("online", DOMID)
            job["env"].update(probe)
            nv.timed(job)
            addrs = nv.ns.run("ip", "-o", "-4", "addr", "show", "dev", f"vif{DOMID}.0").stdout
            if f"{GATEWAY}/32" not in addrs or nv.status(DOMID) != "connected":
                raise RuntimeError(f"{v}: online did not configure the gateway from QubesDB: {addrs!r}")
            nv.clear_status([DOMID])
            job = nv.wrapper("offline", DOMID)
            job["env"].update(probe)
            nv.timed(job)
            checks[f"{v}: gateway {GATEWAY} from QubesDB on vif{DOMID}.0 after online"] = True
        # The baselines did their work: the VM's host route (and, Qubes 4.0, its legacy raw-table
        # anti-spoofing rules), gone again after offline.
        vm_route = f"{vm_ip(DOMID)} dev vif{DOMID}.0"
        baselines: list[tuple[str, Netvm | None, Any]] = [(XEN, xen, xen_job), (Q40, q40, q40_job)]
        for label, bnv, make in baselines:
            if bnv is None:
                continue
            nv = bnv
            nv.timed(make(nv, "online", DOMID), agent=False)
            routes = nv.ns.run("ip", "-4", "route", "show").stdout
            raw = nv.ns.run("iptables-legacy-save", "-t", "raw").stdout if nv is q40 else ""
            if vm_route not in routes or nv.status(DOMID) != "connected" or (
                    nv is q40 and f"-i vif{DOMID}.0 -j DROP" not in raw):
                raise RuntimeError(f"{label}: online did not configure vif{DOMID}.0: {routes!r} {raw!r}")
            nv.clear_status([DOMID])
            nv.timed(make(nv, "offline", DOMID), agent=False)
            raw_after = nv.ns.run("iptables-legacy-save", "-t", "raw").stdout if nv is q40 else ""
            if vm_route in nv.ns.run("ip", "-4", "route", "show").stdout or f"vif{DOMID}.0" in raw_after:
                raise RuntimeError(f"{label}: offline left vif{DOMID}.0's route or rules")
            checks[f"{label}: online added the route{' and raw rules' if nv is q40 else ''}, offline removed"] = True
            if nv is q40:
                checks["qubes 4.0 raw table after one online (iptables-legacy)"] = raw.splitlines()
        runs = probe_log.read_text().splitlines() if probe_log.exists() else []
        checks["qubesdb-read runs for one online + one offline"] = runs
        if len(runs) != 2 or not all(r.startswith("-f -q -- ") for r in runs):
            raise RuntimeError(f"expected one qubesdb-read -f -q -- KEY... per event, got {runs}")

        # -- variants: each runs one cycle and records it --
        floor_job = {"argv": [run.python, "-I", "-c", "pass"], "env": {"PATH": "/usr/bin:/bin"}}
        fake_job = {"argv": [str(tools / "qubesdb-read"), "-f", "-q", "--", *QUBESDB], "env": {"PATH": "/usr/bin:/bin"},
                    "out": str(run.tmp / "fake.out")}

        def floor(rec: Record) -> None:
            rec(FLOOR, xen.timed(floor_job, agent=False))
            rec(FAKE_ALONE, xen.timed(fake_job, agent=False))

        def script_cycle(nv: Netvm, label: str, job: Any) -> Variant:
            def fn(rec: Record) -> None:
                rec(f"{label} online", nv.timed(job(nv, "online", DOMID), agent=False))
                assert nv.status(DOMID) == "connected", (label, nv.status(DOMID))
                nv.clear_status([DOMID])
                rec(f"{label} offline", nv.timed(job(nv, "offline", DOMID), agent=False))
            return label, fn

        def agent_cycle(nv: Netvm, label: str) -> Variant:
            def fn(rec: Record) -> None:
                rec(f"{label} online", nv.timed(nv.wrapper("online", DOMID)))
                assert nv.status(DOMID) == "connected", (label, nv.status(DOMID))
                nv.clear_status([DOMID])
                rec(f"{label} offline", nv.timed(nv.wrapper("offline", DOMID)))
            return label, fn

        variants: list[Variant] = [("floor", floor), script_cycle(xen, XEN, xen_job)]
        if q40 is not None:
            variants.append(script_cycle(q40, Q40, q40_job))
        for v in VARIANTS:
            variants += [agent_cycle(nv0[v], f"{v} 0 others"), agent_cycle(nvk[v], f"{v} {args.others} others")]

        # -- storms, in rounds spread over the run, netvms in rotated order --
        storm_nets: list[tuple[str, Netvm, Any]] = [(XEN, xens, lambda nv, c, d: xen_job(nv, c, d))]
        if q40s is not None:
            storm_nets.append((Q40, q40s, q40_job))
        storm_nets += [(v, nvs[v], lambda nv, c, d: nv.wrapper(c, d)) for v in VARIANTS]
        storm_rounds = {round(i * args.events / args.storms) for i in range(args.storms)} if args.storms else set()
        storm_count = [0]

        def storm_cpu(r: dict[str, Any]) -> float:
            return float(r["utime"] + r["stime"] + (r["agent_cpu"] or 0) + (r.get("agent_children_cpu") or 0))

        def storm_round(i: int, _rec: Record) -> None:
            loads.append(os.getloadavg()[0])
            busy, total = cpu_jiffies()
            busy_cpus.append((busy - last[0]) / max(1, total - last[1]) * (os.cpu_count() or 1))
            own, now = sum(sum(c.cpu) for c in cells.values()), time.perf_counter()
            own_cpus.append((own - last[2]) / (now - last[3]))
            last[:] = [busy, total, own, now]
            if i not in storm_rounds:
                return
            for label, nv, job in rotate(storm_nets, storm_count[0]):
                nv.clear_status(storm_ids)
                load = os.getloadavg()[0]
                on = nv.storm([job(nv, "online", d) for d in storm_ids])
                statuses = [nv.status(d) for d in storm_ids]
                off = nv.storm([job(nv, "offline", d) for d in storm_ids])
                ok = sum(1 for s, rc in zip(statuses, on["rcs"], strict=True) if s == "connected" and rc == 0)
                storms.setdefault(label, []).append({
                    "online_wall": on["wall"], "offline_wall": off["wall"], "connected": ok,
                    "offline_rcs_nonzero": sum(1 for rc in off["rcs"] if rc != 0),
                    "spawn_spread": on["spawn_spread"], "load1": load,
                    "online_cpu": storm_cpu(on), "offline_cpu": storm_cpu(off)})
                log(f"storm {label}: {ok}/{len(storm_ids)} connected, online {on['wall'] * 1e3:.0f} ms, "
                    f"offline {off['wall'] * 1e3:.0f} ms")
            storm_count[0] += 1
            # the next round's share is its own, not the storms'
            last[:] = [*cpu_jiffies(), sum(sum(c.cpu) for c in cells.values()), time.perf_counter()]

        log(f"measuring: {args.warmup} warm-up + {args.events} rounds of {len(variants)} variants, "
            f"{len(storm_rounds)} storm rounds of {len(storm_nets)} netvms")
        last: list[float] = [*cpu_jiffies(), 0.0, time.perf_counter()]
        interleave(variants, args.events, args.warmup, cells, storm_round)
        info["loadavg_end"] = os.getloadavg()
        info["load1_per_round"] = loads
        info["busy_cpus_per_round"] = busy_cpus
        info["own_event_cpus_per_round"] = own_cpus

    # -- goals --
    goals: list[Goal] = []

    def wall(name: str) -> list[float]:
        return [x * 1e3 for x in cells[name].wall]

    def cpu(name: str) -> list[float]:
        return [x * 1e3 for x in cells[name].cpu]

    def goal(gname: str, a: list[float], base: list[float], limit: float, note: str = "") -> None:
        goals.append(Goal(gname, p50(a), p50(base), limit, note=note, ci=boot_ratio_ci(a, base)))

    skipped: list[str] = []
    for v in VARIANTS:
        for ev in ("online", "offline"):
            ours = f"{v} 0 others {ev}"
            goal(f"(a) {v} {ev} wall vs Xen vif-route", wall(ours), wall(f"{XEN} {ev}"), 0.6)
            if q40 is not None:
                goal(f"(a) {v} {ev} wall vs Qubes 4.0", wall(ours), wall(f"{Q40} {ev}"), 0.3)
            else:
                skipped.append(f"(a) {v} {ev} wall vs Qubes 4.0")
            goal(f"(a) {v} {ev} cpu vs Xen vif-route (reported)", cpu(ours), cpu(f"{XEN} {ev}"), 0.6)
            if q40 is not None:
                goal(f"(a) {v} {ev} cpu vs Qubes 4.0 (reported)", cpu(ours), cpu(f"{Q40} {ev}"), 0.3)
            goal(f"(a) {v} {ev} wall vs floor (reported)", wall(ours), wall(FLOOR), 1.5)
        for ev in ("online", "offline"):
            if storms.get(v) and storms.get(XEN):
                sw = [s[f"{ev}_wall"] * 1e3 for s in storms[v]]
                xw = [s[f"{ev}_wall"] * 1e3 for s in storms[XEN]]
                goal(f"(b) {v} storm of {args.storm} {ev}s vs Xen's", sw, xw, 0.5)
        if storms.get(v):
            goals.append(Goal(f"(b) {v} storm: every vif connected", min(s["connected"] for s in storms[v]),
                              args.storm, 1.0, unit="vifs", op=">=",
                              note=f"connected per storm: {[s['connected'] for s in storms[v]]}"))
        for ev in ("online", "offline"):
            goal(f"(c) {v} {ev}: {args.others} others vs 0", wall(f"{v} {args.others} others {ev}"),
                 wall(f"{v} 0 others {ev}"), 1.1)
    if storms.get(Q40) and storms.get(XEN):
        for ev in ("online", "offline"):
            goal(f"Qubes 4.0 storm of {args.storm} {ev}s vs Xen's (reported)",
                 [s[f"{ev}_wall"] * 1e3 for s in storms[Q40]], [s[f"{ev}_wall"] * 1e3 for s in storms[XEN]], 1.0)
    for label in (XEN, Q40):
        if storms.get(label):
            goals.append(Goal(f"{label} storm: every vif connected (reported)",
                              min(s["connected"] for s in storms[label]), args.storm, 1.0, unit="vifs", op=">="))

    print()
    print(f"{NAME} ({b}): {info['cpu_model']}, nproc {info['nproc']}, kernel {info['uname_r']}, "
          f"Python {info['python_product']}, load {info['loadavg_start'][0]:.1f} -> {info['loadavg_end'][0]:.1f} "
          f"(per round: min {min(loads):.1f}, median {p50(loads):.1f}, max {max(loads):.1f}); CPUs busy during "
          f"the single events of a round (of {info['nproc']}): min {min(busy_cpus):.2f}, median {p50(busy_cpus):.2f}, "
          f"max {max(busy_cpus):.2f}; of which the measured events' own: median {p50(own_cpus):.2f}; the rest "
          f"(other work, and this run's XenStore daemons): median "
          f"{p50([b_ - o for b_, o in zip(busy_cpus, own_cpus, strict=True)]):.2f}")
    if "qubes40" in info:
        print(f"Qubes 4.0: qubes-core-agent-linux {info['qubes40']['version']} ({info['qubes40']['dir']})")
    print(f"p50 of {args.events} events per cell, {args.warmup} warm-up rounds, variants interleaved\n")
    print(table(Cells.HEADERS, cells.rows()))
    print()
    print(table(("storm", "#", "online wall ms", "offline wall ms", "connected", "online cpu ms", "load"),
                [[label, str(i + 1), f"{s['online_wall'] * 1e3:.0f}", f"{s['offline_wall'] * 1e3:.0f}",
                  f"{s['connected']}/{args.storm}", f"{s['online_cpu'] * 1e3:.0f}", f"{s['load1']:.1f}"]
                 for label, ss in storms.items() for i, s in enumerate(ss)]))
    print_goals(goals)
    for name in skipped:
        print(f"SKIPPED: {name} (no --qubes40)")
    write_json(args.json, {
        "benchmark": NAME, "machine": info, "config": {k: str(v) for k, v in vars(args).items()},
        "command": " ".join(shlex.quote(a) for a in sys.argv), "setup_s": setup, "checks": checks,
        **cells.as_dict(), "storms": storms, "goals": [g.as_dict() for g in goals], "skipped": skipped,
        "duration_s": time.perf_counter() - t_start,
    })
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
