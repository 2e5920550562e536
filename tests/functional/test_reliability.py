"""Reliability: concurrency, crashes at every step, drift and its repair, and a long soak.

* Concurrency: 50 ``online`` processes at once, then 50 ``offline``, each
  phase racing DNS regenerations, ``init``, ``reconcile`` and a foreign
  writer editing its own firewall objects; the end state must be exactly
  the one a sequential run reaches in a second netvm, the foreign objects
  untouched, nothing hung, every exit 0.
* Faults: an event killed (SIGKILL, the test-only fault file) before or after
  every step of its plan, then the event again, the opposite event, or
  ``reconcile``, must leave exactly what a clean run leaves.
* Drift: what an administrator or a crash can break (a flushed chain or
  table, a destroyed set, a missing route, neighbour or gateway address)
  is reported by ``status`` by name and repaired by ``reconcile``; forged
  packets are dropped again afterwards.
* Soak: 1000 online/offline cycles over 50 vifs leave the namespace as they
  found it.

Spawning an interpreter per event costs ~0.3 s, so the sequential
references, the fault loop and the soak go through :class:`Driver`: one
Python process inside the netvm's namespace that imports the package once
and runs each command through the entry points' own ``run()`` functions,
either in-process with one :class:`~vif_hotplug.app.runtime.Runtime`
reused (as the resident agent does) or in a forked child (so a fault can
kill it). The concurrency test runs the installed commands as the
toolstack does: real processes.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from .conftest import BACKENDS, Netns, NetnsFactory, entry_point, require_root
from .hotplug_env import GATEWAY, UPLINK_NET, Netvm, fault, received, running_netvm, udp_listen, wait_for_line

pytestmark = pytest.mark.netns

DNS1, DNS2 = "10.139.1.1", "10.139.1.2"
CONF = f"[netvm]\ngateway = {GATEWAY}\nprimary_dns = {DNS1}\nsecondary_dns = {DNS2}\n"
DEADLINE = 240.0  # seconds a whole concurrent phase may take before it counts as a deadlock


# --- the driver: one warm interpreter in the netvm's namespace ---------------------------------------

_DRIVER = r"""
import json, os, sys, time, traceback
from vif_hotplug import cli, setup_dnat_to_ns, vif_route  # noqa: F401 (warm, no handle opened)
from vif_hotplug.entry import dispatch
from vif_hotplug.app.log_setup import ProcessLogs
from vif_hotplug.app.runtime import Runtime
import vif_hotplug.app.hotplug, vif_hotplug.app.reconcile, vif_hotplug.app.init  # noqa: F401 (warm, no handle opened)

PROGS = {"route": "vif-route-qubes", "cli": "vif-hotplug", "dns": "qubes-setup-dnat-to-ns"}

def call(prog, argv, env, runtime, logs):
    code, after = dispatch(PROGS[prog], argv, env, runtime, logs, lambda s: None)
    if after is not None:
        after()
    return code

reply = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)  # whatever the commands print goes to stderr, never into the replies
runtime = logs = None
for line in sys.stdin:
    req = json.loads(line)
    os.environ.clear()
    os.environ.update(req["env"])
    err = os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    if req["fork"]:
        pid = os.fork()
        if pid == 0:
            os.dup2(err, 2)
            rt = Runtime()
            code = call(req["prog"], req["argv"], req["env"], rt, ProcessLogs(req["prog"]))
            rt.close()
            sys.stderr.flush()
            os._exit(code)
        rc = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    else:
        saved = os.dup(2)
        os.dup2(err, 2)
        try:
            if runtime is None:
                runtime, logs = Runtime(), ProcessLogs("driver")
            rc = call(req["prog"], req["argv"], req["env"], runtime, logs)
        except BaseException:
            traceback.print_exc()
            rc = 99
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
    os.close(err)
    reply.write(json.dumps({"rc": rc}) + "\n")
    reply.flush()
"""


class Driver:
    """Commands run by a warm interpreter inside ``netvm``'s namespace, with the netvm's environment."""

    def __init__(self, netvm: Netvm) -> None:
        self.netvm = netvm
        env = dict(os.environ)
        env.update(netvm.env)
        self.proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{netvm.ns.name}", sys.executable, "-c", _DRIVER],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )
        self.errfile = netvm.tmp / "driver.err"

    def run(self, prog: str, *argv: str, env: dict[str, str] | None = None, fork: bool = False) -> tuple[int, str]:
        """(exit status, stderr); a status below 0 is the signal that ended a forked child."""
        full = dict(os.environ)
        full.update(self.netvm.env)
        full.update(env or {})
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"prog": prog, "argv": list(argv), "env": full, "fork": fork,
                                          "stderr": str(self.errfile)}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the driver died running {prog} {' '.join(argv)}"
        return int(json.loads(line)["rc"]), self.errfile.read_text()

    def hotplug(self, command: str, domid: int, env: dict[str, str] | None = None,
                fork: bool = False) -> tuple[int, str]:
        """``vif-route-qubes COMMAND type_if=vif`` with the toolstack's environment for ``domid``."""
        full = {"XENBUS_PATH": f"backend/vif/{domid}/0", "XENBUS_TYPE": "vif", "XENBUS_BASE_PATH": "backend",
                "vif": f"vif{domid}.0", "script": "/etc/xen/scripts/vif-route-qubes", "netdev": ""}
        full.update(env or {})
        return self.run("route", command, "type_if=vif", env=full, fork=fork)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def driver_for(netvm: Netvm) -> Iterator[Driver]:
    d = Driver(netvm)
    try:
        yield d
    finally:
        d.close()


def quiet_ipv6(netvm: Netvm) -> None:
    """No duplicate address detection in the netvm (before any link exists).

    Otherwise a vif's link-local address and the routes that come with it
    appear a second or two after the link goes up, and two dumps of the
    same state taken at different moments differ.
    """
    for key in ("all", "default"):
        netvm.ns.run("sysctl", "-qw", f"net.ipv6.conf.{key}.accept_dad=0")


def ok(result: tuple[int, str], *accepted: int) -> None:
    rc, err = result
    assert rc in (accepted or (0,)), f"exit {rc}: {err}"


def host_upstream_resolv_conf(path: Path) -> str:
    """A resolv.conf naming the upstreams the tools find without ``--resolv-conf`` (reconcile takes those).

    init and the DNS tool get this file; reconcile, which has no such
    option, reads the default sources: with both saying the same, which of
    them ran last does not change the DNS rules.
    """
    from vif_hotplug.app.upstreams import read_upstreams

    servers = read_upstreams((IPv4Address(DNS1), IPv4Address(DNS2))).servers
    path.write_text("".join(f"nameserver {s}\n" for s in servers))
    return str(path)


def differences(got: dict[str, list[str]], want: dict[str, list[str]]) -> dict[str, tuple[list[str], list[str]]]:
    """Per dump section: (only in got, only in want), counting duplicates."""
    out = {}
    for key in sorted(set(got) | set(want)):
        g, w = list(got.get(key, [])), list(want.get(key, []))
        extra = [x for x in g if x not in w or g.count(x) > w.count(x)]
        missing = [x for x in w if x not in g or w.count(x) > g.count(x)]
        if extra or missing:
            out[key] = (sorted(set(extra)), sorted(set(missing)))
    return out


# --- concurrency ------------------------------------------------------------------------------------

DOMIDS = list(range(10, 60))


class ForeignWriter(threading.Thread):
    """Someone else's firewall objects, edited over and over: its own iptables chain or nft table.

    Adds a rule per round and removes the oldest once it holds five; keeps
    the list of rules it believes are there (``expected``).
    """

    def __init__(self, netvm: Netvm) -> None:
        super().__init__(daemon=True)
        self.ns, self.backend = netvm.ns, netvm.fw_backend
        self.env = netvm.env
        self.stop = threading.Event()
        self.expected: list[str] = []
        self.handles: dict[str, str] = {}
        self.errors: list[str] = []
        self.rounds = 0
        if self.backend == "iptables":
            self._run("iptables-legacy", "-w", "-N", "FOREIGN")
        else:
            self._run("nft", "add table ip foreign; add chain ip foreign c")

    def _run(self, *cmd: str) -> str:
        proc = self.ns.run(*cmd, env=self.env, check=False)
        if proc.returncode != 0:
            self.errors.append(f"{' '.join(cmd)}: {proc.stderr.strip()}")
        return proc.stdout

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            addr = f"198.51.100.{i % 250 + 1}"
            if addr in self.expected:
                continue
            if self.backend == "iptables":
                self._run("iptables-legacy", "-w", "-A", "FOREIGN", "-s", f"{addr}/32", "-j", "ACCEPT")
            else:
                out = self._run("nft", "--echo", "--handle", "add", "rule", "ip", "foreign", "c", "ip", "saddr", addr,
                                "accept")
                m = re.search(r"# handle (\d+)", out)
                if m is None:
                    self.errors.append(f"no handle in {out!r}")
                    continue
                self.handles[addr] = m.group(1)
            self.expected.append(addr)
            if len(self.expected) > 5:
                old = self.expected.pop(0)
                if self.backend == "iptables":
                    self._run("iptables-legacy", "-w", "-D", "FOREIGN", "-s", f"{old}/32", "-j", "ACCEPT")
                else:
                    self._run("nft", "delete", "rule", "ip", "foreign", "c", "handle", self.handles.pop(old))
            self.rounds += 1

    def present(self) -> list[str]:
        """The sources of the rules really there, in order."""
        if self.backend == "iptables":
            out = self.ns.run("iptables-legacy-save", "-t", "filter").stdout
            return re.findall(r"^-A FOREIGN -s (\S+)/32 -j ACCEPT$", out, re.M)
        out = self.ns.run("nft", "list", "chain", "ip", "foreign", "c").stdout
        return re.findall(r"ip saddr (\S+) accept", out)

    def remove(self) -> None:
        if self.backend == "iptables":
            self.ns.run("iptables-legacy", "-w", "-F", "FOREIGN", env=self.env)
            self.ns.run("iptables-legacy", "-w", "-X", "FOREIGN", env=self.env)
        else:
            self.ns.run("nft", "delete", "table", "ip", "foreign")


def _concurrently(netvm: Netvm, command: str, resolv: str) -> list[tuple[str, subprocess.CompletedProcess[str]]]:
    """``command`` for every domid, racing DNS runs, init, reconcile and a foreign writer; all must end."""
    dns = entry_point("qubes-setup-dnat-to-ns")

    def dns_run() -> subprocess.CompletedProcess[str]:
        env = dict(os.environ)
        env.update(netvm.env)
        return subprocess.run(["nsenter", f"--net=/run/netns/{netvm.ns.name}", dns, "--resolv-conf", resolv],
                              capture_output=True, text=True, env=env, timeout=DEADLINE)

    jobs: list[tuple[str, Any]] = [(f"{command} {d}", lambda d=d: netvm.hotplug(command, d, check=False))
                                   for d in DOMIDS]
    for i in range(3):
        jobs.insert(i * 17, ("dns", dns_run))
    for i in range(2):
        jobs.insert(5 + i * 20, ("init", lambda: netvm.tool("init", "--resolv-conf", resolv, check=False)))
        jobs.insert(12 + i * 20, ("reconcile", lambda: netvm.tool("reconcile", check=False)))
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = [(name, pool.submit(job)) for name, job in jobs]
        _, pending = wait([f for _, f in futures], timeout=DEADLINE)
        assert not pending, f"{len(pending)} command(s) still running after {DEADLINE:.0f}s: a deadlock"
        return [(name, f.result()) for name, f in futures]


def _exits(results: list[tuple[str, subprocess.CompletedProcess[str]]]) -> list[str]:
    """Every command that did not succeed (the DNS tool's 100 is "nothing changed"), with its stderr."""
    return [f"{name}: exit {p.returncode}: {p.stderr.strip()}" for name, p in results
            if p.returncode != 0 and not (name == "dns" and p.returncode == 100)]


@pytest.fixture
def twin_netvms(make_netns: NetnsFactory, backend: str) -> Iterator[tuple[Netvm, Netvm]]:
    """The netvm under test and a reference netvm, each with the same 50 VMs (links and XenStore)."""
    with running_netvm(make_netns, CONF, backend) as under_test, running_netvm(make_netns, CONF, backend) as ref:
        quiet_ipv6(under_test)
        quiet_ipv6(ref)
        for domid in DOMIDS:
            under_test.add_vm(domid)
            ref.add_vm(domid)
        yield under_test, ref


def test_fifty_concurrent_onlines_then_offlines_racing_everything_end_in_the_sequential_state(
    twin_netvms: tuple[Netvm, Netvm],
) -> None:
    netvm, ref = twin_netvms
    resolv = host_upstream_resolv_conf(netvm.tmp / "resolv.conf")
    for phase in ("online", "offline"):
        if phase == "offline":
            # The toolstack marks the backends going away before their offline events (reconcile follows it).
            for vm in (netvm, ref):
                for domid in DOMIDS:
                    vm.xs_write(f"{vm.backend(domid)}/online", "0")
        writer = ForeignWriter(netvm)
        writer.start()
        try:
            results = _concurrently(netvm, phase, resolv)
        finally:
            writer.stop.set()
            writer.join(timeout=60)
        assert not writer.is_alive(), "the foreign writer hung"
        assert _exits(results) == [], f"{phase}: failed commands"
        assert writer.errors == [], f"{phase}: the foreign writer's own commands failed"
        assert writer.rounds > 0
        assert writer.present() == writer.expected, f"{phase}: the foreign writer's rules were changed"
        writer.remove()
        if phase == "online":
            assert all(netvm.status(d) == "connected" for d in DOMIDS)
        # The same, one command at a time, in the reference netvm.
        for driver in driver_for(ref):
            if phase == "online":
                ok(driver.run("cli", "init", "--resolv-conf", resolv))
            ok(driver.run("dns", "--resolv-conf", resolv), 0, 100)
            for domid in DOMIDS:
                ok(driver.hotplug(phase, domid))
            ok(driver.run("cli", "reconcile"))
        assert differences(netvm.settled_dump(), ref.settled_dump()) == {}, f"after the concurrent {phase}s"


# --- faults -------------------------------------------------------------------------------------------

FAULT_DOMID = 4


class FaultBed:
    """One IPv4 VM behind a netvm whose shared anti-spoofing objects exist, and the two clean states."""

    def __init__(self, netvm: Netvm, driver: Driver) -> None:
        self.netvm, self.driver = netvm, driver
        self.offline = netvm.settled_dump()
        ok(driver.hotplug("online", FAULT_DOMID, fork=True))
        self.online = netvm.settled_dump()
        ok(driver.hotplug("offline", FAULT_DOMID, fork=True))
        assert netvm.settled_dump() == self.offline

    def state(self, want: str) -> dict[str, tuple[list[str], list[str]]]:
        """What differs from the clean ``want`` state (looked at again briefly: the kernel may still be busy)."""
        diff = differences(self.netvm.dump(), getattr(self, want))
        for _ in range(10):
            if not diff:
                break
            time.sleep(0.05)
            diff = differences(self.netvm.dump(), getattr(self, want))
        return diff


@pytest.fixture(scope="module", params=BACKENDS)
def fault_bed(request: pytest.FixtureRequest) -> Iterator[FaultBed]:
    require_root()
    factory = NetnsFactory()
    try:
        with running_netvm(factory, CONF, str(request.param)) as netvm:
            quiet_ipv6(netvm)
            netvm.add_vm(9)
            netvm.add_vm(FAULT_DOMID)
            for driver in driver_for(netvm):
                ok(driver.hotplug("online", 9))
                ok(driver.hotplug("offline", 9))
                netvm.xs_write(f"{netvm.backend(9)}/online", "0")  # gone, as the toolstack leaves it
                yield FaultBed(netvm, driver)
    finally:
        factory.cleanup()


def _killed(driver: Driver, command: str, when: str, index: int) -> int:
    with fault(driver.netvm, command, when, index):
        return driver.hotplug(command, FAULT_DOMID, fork=True)[0]


def _recover(bed: FaultBed, recovery: str, target: str) -> tuple[int, str]:
    """Bring the vif to ``target`` ("online"/"offline") the way ``recovery`` says."""
    if recovery == "event":
        return bed.driver.hotplug(target, FAULT_DOMID, fork=True)
    # reconcile follows XenStore: the toolstack marks a vif going away offline before its event.
    path = f"{bed.netvm.backend(FAULT_DOMID)}/online"
    bed.netvm.xs_write(path, "1" if target == "online" else "0")
    try:
        return bed.driver.run("cli", "reconcile", fork=True)
    finally:
        bed.netvm.xs_write(path, "1")


RECOVERIES = {
    # (killed command, how, then the state it must converge to)
    "online then online again": ("online", "event", "online"),
    "online then offline": ("online", "event", "offline"),
    "online then reconcile": ("online", "reconcile", "online"),
    "offline then offline again": ("offline", "event", "offline"),
    "offline then online": ("offline", "event", "online"),
    "offline then reconcile": ("offline", "reconcile", "offline"),
}


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize(("killed", "recovery", "target"), list(RECOVERIES.values()), ids=list(RECOVERIES))
def test_an_event_killed_at_any_step_is_repaired_by_the_next_command(
    fault_bed: FaultBed, killed: str, recovery: str, target: str, when: str,
) -> None:
    bed, driver = fault_bed, fault_bed.driver
    assert bed.state("offline") == {}, "an earlier test left the shared fault bed dirty"
    wrong: dict[str, object] = {}
    index = 0
    for index in range(64):
        if killed == "offline":
            ok(driver.hotplug("online", FAULT_DOMID, fork=True))
        rc = _killed(driver, killed, when, index)
        if rc == 0:  # past the end of the plan: the event simply completed
            assert bed.state(killed) == {}, f"{killed} with an unfired fault left another state"
            if killed == "online":
                ok(driver.hotplug("offline", FAULT_DOMID, fork=True))
            break
        assert rc == -9, f"{killed} {when} step {index}: exit {rc}, expected SIGKILL"
        rc, err = _recover(bed, recovery, target)
        diff = bed.state(target)
        if rc != 0 or diff:
            wrong[f"{when} step {index}"] = {"exit": rc, "stderr": err.strip(), "differences": diff}
        if target == "online" or diff:
            # Back to the start for the next step, whatever happened.
            ok(driver.hotplug("offline", FAULT_DOMID, fork=True))
            if bed.state("offline"):
                wrong[f"{when} step {index}: offline afterwards"] = bed.state("offline")
                break
    assert wrong == {}, json.dumps(wrong, indent=1)
    assert index > 3, "the fault never fired"


# --- drift ----------------------------------------------------------------------------------------------


class DriftBed:
    """Two online VMs behind an initialized netvm with an uplink, shared by the drift tests of a backend."""

    def __init__(self, netvm: Netvm, uplink: Netns, resolv: str) -> None:
        self.netvm, self.uplink, self.resolv = netvm, uplink, resolv
        self.clean: dict[str, list[str]] = {}

    def status(self) -> tuple[int, dict[str, Any]]:
        """(exit status, the JSON report); a report that is no JSON fails here, showing stderr."""
        proc = self.netvm.tool("status", "--json", "--resolv-conf", self.resolv, check=False)
        try:
            return proc.returncode, json.loads(proc.stdout)
        except ValueError:
            raise AssertionError(f"status exited {proc.returncode} without a JSON report: {proc.stderr}") from None


@pytest.fixture(scope="module", params=BACKENDS)
def drift_bed(request: pytest.FixtureRequest) -> Iterator[DriftBed]:
    require_root()
    factory = NetnsFactory()
    try:
        with running_netvm(factory, CONF, str(request.param)) as netvm:
            quiet_ipv6(netvm)
            up = netvm.add_uplink()
            netvm.add_vm(4, ["10.137.0.5"])
            netvm.add_vm(6, ["10.137.0.6"])
            bed = DriftBed(netvm, up, host_upstream_resolv_conf(netvm.tmp / "resolv.conf"))
            netvm.tool("init", "--resolv-conf", bed.resolv)
            netvm.hotplug("online", 4)
            netvm.hotplug("online", 6)
            bed.clean = netvm.settled_dump()
            yield bed
    finally:
        factory.cleanup()


def _drifted(report: dict[str, Any]) -> set[tuple[str, str]]:
    """(where, object) of everything ``status --json`` reports not ok."""
    out = {("netvm", o["object"]) for o in report.get("netvm", []) if not o["ok"]}
    for vif, state in report.get("vifs", {}).items():
        out |= {(vif, o["object"]) for o in state["objects"] if not o["ok"]}
    return out


ANTISPOOF = "firewall antispoof ruleset in place"
BASE = "firewall base ruleset in place"
ELEMENT = "add element ip qubes allowed { vif4.0 . 10.137.0.5 }"
ELEMENT6 = "add element ip qubes allowed { vif6.0 . 10.137.0.6 }"
ROUTE = "add route 10.137.0.5/32 dev vif4.0 metric 32748"
NEIGHBOUR = "add neighbour 10.137.0.5 lladdr 00:16:3e:5e:6c:04 dev vif4.0 permanent"
ADDRESS = f"add address {GATEWAY}/32 dev vif4.0"
Drifted = set[tuple[str, str]]

#: name -> (commands per backend, what status must report, exactly; per backend where they differ)
DRIFTS: dict[str, tuple[dict[str, list[list[str]]], Drifted | dict[str, Drifted]]] = {
    "anti-spoofing chain flushed": (
        {"nftables": [["nft", "flush chain ip qubes antispoof"]],
         "iptables": [["iptables-legacy", "-w", "-t", "raw", "-F", "QBS-ANTISPOOF-VIF"]]},
        {("vif4.0", ANTISPOOF), ("vif6.0", ANTISPOOF), ("netvm", BASE)},
    ),
    "anti-spoofing table flushed": (
        {"nftables": [["nft", "flush table ip qubes"]],
         "iptables": [["iptables-legacy", "-w", "-t", "raw", "-F"]]},
        # nft: the DNS chain lives in the same table; xtables: it is in the nat table, untouched.
        {"nftables": {("vif4.0", ANTISPOOF), ("vif6.0", ANTISPOOF), ("netvm", BASE),
                      ("netvm", "firewall dns ruleset in place")},
         "iptables": {("vif4.0", ANTISPOOF), ("vif6.0", ANTISPOOF), ("netvm", BASE)}},
    ),
    "allowed set emptied": (
        {"nftables": [["nft", "flush set ip qubes allowed"]],
         "iptables": [["iptables-legacy", "-w", "-t", "raw", "-F", "QBS-ANTISPOOF-VIF"],
                      ["ipset", "destroy", "qbs-allowed4"]]},
        # xtables cannot destroy a set a rule uses: the rules go first, and with them the rulesets.
        {"nftables": {("vif4.0", ELEMENT), ("vif6.0", ELEMENT6)},
         "iptables": {("vif4.0", ELEMENT), ("vif6.0", ELEMENT6), ("vif4.0", ANTISPOOF), ("vif6.0", ANTISPOOF),
                      ("netvm", BASE)}},
    ),
    "one allowed element deleted": (
        {"nftables": [["nft", "delete element ip qubes allowed { vif4.0 . 10.137.0.5 }"]],
         "iptables": [["ipset", "del", "qbs-allowed4", "10.137.0.5,vif4.0"]]},
        {("vif4.0", ELEMENT)},
    ),
    "route deleted": (
        {"any": [["ip", "route", "del", "10.137.0.5/32", "dev", "vif4.0"]]},
        {("vif4.0", ROUTE)},
    ),
    "neighbour deleted": (
        {"any": [["ip", "neigh", "del", "10.137.0.5", "dev", "vif4.0"]]},
        {("vif4.0", NEIGHBOUR)},
    ),
    "gateway address removed": (
        {"any": [["ip", "addr", "del", f"{GATEWAY}/32", "dev", "vif4.0"]]},
        # The kernel flushes the routes and neighbours of a device that loses its last IPv4 address.
        {("vif4.0", ADDRESS), ("vif4.0", ROUTE), ("vif4.0", NEIGHBOUR)},
    ),
}


def _break(bed: DriftBed, name: str) -> None:
    commands, _ = DRIFTS[name]
    for cmd in commands.get(bed.netvm.fw_backend, commands.get("any", [])):
        bed.netvm.ns.run(*cmd, env=bed.netvm.env)


def _precondition(bed: DriftBed) -> None:
    diff = differences(bed.netvm.settled_dump(), bed.clean)
    assert diff == {}, f"the shared drift bed is not clean before this test (an earlier one left drift): {diff}"


@pytest.mark.parametrize("name", list(DRIFTS))
def test_status_names_exactly_the_drift(drift_bed: DriftBed, name: str) -> None:
    _precondition(drift_bed)
    _break(drift_bed, name)
    try:
        rc, report = drift_bed.status()
        assert rc == 1
        assert report["drift"] is True
        want = DRIFTS[name][1]
        assert _drifted(report) == (want[drift_bed.netvm.fw_backend] if isinstance(want, dict) else want)
    finally:
        drift_bed.netvm.tool("reconcile", check=False)


_SEND_TRANSPARENT = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, 19, 1)  # IP_TRANSPARENT: any source, no address added
s.bind((sys.argv[1], 0))
s.sendto(sys.argv[4].encode(), (sys.argv[2], int(sys.argv[3])))
"""


def _forged_then_genuine(bed: DriftBed, port: int) -> list[str]:
    """Payloads the uplink got from VM 4: forged sources first, then its own (the control, which must arrive)."""
    vm, dst = bed.netvm.vms[4], f"{UPLINK_NET}.2"
    log = bed.netvm.tmp / f"forged-{port}.log"
    listener = udp_listen(bed.uplink, dst, port, log)
    try:
        for source in ("10.137.0.99", "10.137.0.6", GATEWAY):
            vm.ns.run(sys.executable, "-c", _SEND_TRANSPARENT, source, dst, str(port), "forged")
        vm.ns.run(sys.executable, "-c", _SEND_TRANSPARENT, "10.137.0.5", dst, str(port), "genuine")
        assert wait_for_line(log, "genuine"), "the control never arrived"
    finally:
        listener.kill()
        listener.wait()
    return [line.split()[1] for line in log.read_text().splitlines()]


@pytest.mark.parametrize("name", list(DRIFTS))
def test_reconcile_repairs_the_drift_exactly_and_forged_packets_are_dropped_again(
    drift_bed: DriftBed, name: str,
) -> None:
    _precondition(drift_bed)
    _break(drift_bed, name)
    proc = drift_bed.netvm.tool("reconcile", check=False)
    assert proc.returncode == 0, proc.stderr
    rc, report = drift_bed.status()
    assert (rc, _drifted(report)) == (0, set())
    assert differences(drift_bed.netvm.settled_dump(), drift_bed.clean) == {}
    assert _forged_then_genuine(drift_bed, 5000 + list(DRIFTS).index(name)) == ["genuine"]


def test_reconcile_leaves_the_uplink_reachable_for_vms(drift_bed: DriftBed) -> None:
    _precondition(drift_bed)
    vm = drift_bed.netvm.vms[6]
    got = received(drift_bed.uplink, f"{UPLINK_NET}.2", drift_bed.netvm.tmp / "reach.log",
                   [(vm.ns, "10.137.0.6", "hello")], port=5099)
    assert got == [f"{UPLINK_NET}.1 hello"]


# --- soak -------------------------------------------------------------------------------------------------

SOAK_DOMIDS = list(range(100, 150))
SOAK_CYCLES = 1000


def _snapshot(netvm: Netvm) -> dict[str, list[str]]:
    """Everything the soak must leave as it was: the dump, conntrack, NAT namespaces, state files."""
    snap = netvm.settled_dump()
    entries = []
    for line in netvm.ns.run("conntrack", "-L", check=False).stdout.splitlines():
        words = line.split()
        # "tcp 6 2997 ESTABLISHED src=...": the third word is the timeout, which ticks.
        entries.append(" ".join(w for i, w in enumerate(words) if not (i == 2 and w.isdigit())
                                and not w.startswith(("id=", "use="))))
    snap["conntrack"] = sorted(entries)
    snap["nat namespaces"] = sorted(n.split()[0] for n in subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True).stdout.splitlines()
        if re.fullmatch(r"vif1[0-4][0-9]\.0-nat", n.split()[0]))
    files = []
    for root, _, names in os.walk(netvm.tmp):
        for n in names:
            path = Path(root, n)
            if path.name in ("driver.err", "xs.sock"):
                continue
            content = path.read_bytes() if path.is_file() else b""
            files.append(f"{path.relative_to(netvm.tmp)} {len(content)} {hash(content)}")
    snap["files"] = sorted(files)
    return snap


def test_a_thousand_online_offline_cycles_over_fifty_vifs_leave_the_namespace_as_they_found_it(
    make_netns: NetnsFactory, backend: str,
) -> None:
    with running_netvm(make_netns, CONF, backend) as netvm:
        quiet_ipv6(netvm)
        for driver in driver_for(netvm):
            # Before the VMs exist: init's reconcile then has no vif to bring up.
            ok(driver.run("cli", "init"))
        for domid in SOAK_DOMIDS:
            netvm.add_vm(domid, [f"10.137.1.{domid - 99}"])
        # Connections of others, which must outlive the soak.
        netvm.ns.run("conntrack", "-I", "-s", "198.51.100.7", "-d", "192.0.2.2", "-p", "tcp", "--sport", "4000",
                     "--dport", "443", "--state", "ESTABLISHED", "--timeout", "3000")
        netvm.ns.run("conntrack", "-I", "-s", "10.137.2.1", "-d", "192.0.2.2", "-p", "udp", "--sport", "53",
                     "--dport", "53", "--timeout", "3000")
        failures: list[str] = []
        for driver in driver_for(netvm):
            # One cycle first: the shared objects of the events exist from then on.
            ok(driver.hotplug("online", SOAK_DOMIDS[0]))
            ok(driver.hotplug("offline", SOAK_DOMIDS[0]))
            before = _snapshot(netvm)
            rng = random.Random(1234)
            online: set[int] = set()
            onlines = offlines = 0
            while offlines < SOAK_CYCLES:
                domid = rng.choice(SOAK_DOMIDS)
                if domid in online or onlines >= SOAK_CYCLES:
                    if domid not in online:
                        domid = rng.choice(sorted(online))
                    command = "offline"
                    offlines += 1
                    online.discard(domid)
                else:
                    command = "online"
                    onlines += 1
                    online.add(domid)
                rc, err = driver.hotplug(command, domid)
                if rc != 0:
                    failures.append(f"{command} vif{domid}.0 (#{onlines + offlines}): exit {rc}: {err.strip()}")
                if command == "online" and onlines % 50 == 0:
                    # A connection of the running VM: its offline must purge it.
                    netvm.ns.run("conntrack", "-I", "-s", f"10.137.1.{domid - 99}", "-d", "192.0.2.2", "-p", "tcp",
                                 "--sport", "5555", "--dport", "443", "--state", "ESTABLISHED", "--timeout", "3000")
            assert not online
        assert failures == []
        assert differences(_snapshot(netvm), before) == {}
