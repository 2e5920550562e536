"""``vif-hotplug lab``: the whole system in network namespaces, proven with real traffic.

Builds an uplink (two real resolvers, a probe server) and a netvm
(:mod:`vif_hotplug.lab.topology`), starts the embedded XenStore, runs
``vif-hotplug init --backend B`` and ``qubes-setup-dnat-to-ns`` in the
netvm, then starts N VMs as libxl and netback would (XenStore entries, a
``vifD.0`` veth) and runs ``vif-route-qubes online`` for each exactly as the
toolstack does. Then it runs the checks of :mod:`vif_hotplug.lab.checks` and
prints their table (or JSON). Exit status 0 only if every check passed.

Every tool of this package it runs uses the firewall backend chosen with
``--backend`` (in the lab's netvm.conf and on ``init``'s command line), a
private state directory, locks and netvm.conf in the lab's tmpdir, and no
resident agent (:func:`~vif_hotplug.lab.topology.tool_overrides`).

Everything it creates is listed in a state file under
:data:`STATE_DIR` before it is created, and removed on success, failure,
Ctrl-C and SIGTERM (or left running with ``--keep`` until ``--down``).
Nothing runs in the caller's network namespace: every command goes through
``ip netns exec`` into a namespace the lab created.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from types import FrameType
from typing import IO, Any

from ..core.errors import HotplugError
from ..kernel.firewall_backend import BACKEND_CHOICES, BackendName, choose_backend
from ..xen.xenstore_client import XenStore
from .checks import Checker, CheckResult, FirewallTools, Tools, format_table, poll, to_json
from .topology import (
    ANSWER_A,
    ANSWER_B,
    DNS1,
    DNS2,
    GATEWAY,
    NETVM_HOME,
    PREFIX,
    PROBE_PORT,
    RESOLVER_A,
    RESOLVER_B,
    TEST_NAME,
    UPLINK6_PEER,
    UPLINK_PEER,
    LabPaths,
    Topology,
    Vm,
    hotplug_env,
    netvm_commands,
    netvm_conf,
    netvm_xenstore_entries,
    plan_topology,
    resolv_conf,
    tool_env,
    tool_overrides,
    uplink_commands,
    vif_commands,
    vm_commands,
    vm_xenstore_entries,
)

log = logging.getLogger(__name__)

PROG = "vif-hotplug lab"
STATE_DIR = "/run/vif-hotplug-lab"
NETNS_ETC = "/etc/netns"
STARTUP_TIMEOUT = 10.0
STOP_TIMEOUT = 3.0
DNAT_CHANGED, DNAT_UNCHANGED = 0, 100
DNAT_MEANING = {DNAT_CHANGED: "changed", DNAT_UNCHANGED: "unchanged"}

#: (program, Debian package that ships it)
REQUIRED_TOOLS = (
    ("ip", "iproute2"),
    ("dnsmasq", "dnsmasq-base"),
    ("dig", "dnsutils"),
)
#: What reads each backend's firewall (the checks' counters and set members).
BACKEND_TOOLS: dict[BackendName, tuple[tuple[str, str], ...]] = {
    "nftables": (("nft", "nftables"),),
    "iptables": (("iptables-legacy-save", "iptables"), ("ip6tables-legacy-save", "iptables"), ("ipset", "ipset")),
}
ENTRY_POINTS = ("vif-hotplug", "vif-route-qubes", "qubes-setup-dnat-to-ns")
_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/local/bin", "/usr/bin", "/bin")


class LabError(Exception):
    """Setting up the lab failed; the message says which step."""


class Interrupted(BaseException):
    """SIGTERM or SIGHUP arrived (SIGINT arrives as ``KeyboardInterrupt``).

    A ``BaseException`` like ``KeyboardInterrupt``: the signal handler raises it
    wherever the main thread is, and an ``except Exception`` there (``logging``
    swallows errors raised while a record is written) would lose it.
    """


# --- state: what exists, so it can be removed by this run or by --down --------------


@dataclass
class LabState:
    """Everything a lab created. Saved before each creation, so a crash leaves a usable record."""

    lab_id: str
    tmpdir: str = ""
    namespaces: list[str] = field(default_factory=list)
    etc_dirs: list[str] = field(default_factory=list)
    #: ``{"pid", "start", "what"}``; ``start`` is the kernel's start time, so a
    #: recycled PID is never mistaken for ours.
    processes: list[dict[str, Any]] = field(default_factory=list)

    @staticmethod
    def path_for(lab_id: str) -> str:
        return os.path.join(STATE_DIR, f"{lab_id}.json")

    def save(self) -> None:
        os.makedirs(STATE_DIR, mode=0o700, exist_ok=True)
        path = self.path_for(self.lab_id)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(asdict(self), f, indent=1)
        os.replace(path + ".tmp", path)

    @classmethod
    def load(cls, path: str) -> LabState:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        return cls(
            lab_id=str(raw["lab_id"]),
            tmpdir=str(raw.get("tmpdir", "")),
            namespaces=[str(n) for n in raw.get("namespaces", [])],
            etc_dirs=[str(d) for d in raw.get("etc_dirs", [])],
            processes=list(raw.get("processes", [])),
        )


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (field 3 on), or ``None`` if gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces: split after it.
    return stat.rsplit(")", 1)[1].split()


def process_start_time(pid: int) -> int | None:
    """Field 22 of ``/proc/PID/stat`` (clock ticks since boot), or ``None`` if gone."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[19])


def _reap(pid: int) -> bool:
    """Whether ``pid`` is gone (reaping it if it is our zombie child).

    A process of a kept lab is no longer our child when ``--down`` stops it:
    it has exited once it is a zombie, whenever its new parent reaps it.
    """
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return True
    fields = _stat_fields(pid)
    return fields is None or fields[0] in ("Z", "X")


def stop_process(pid: int, start: int | None, what: str) -> None:
    """SIGTERM, then SIGKILL after :data:`STOP_TIMEOUT`; only if it is still the process we started."""
    if start is None or process_start_time(pid) != start:
        _reap(pid)
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        if poll(lambda: _reap(pid), bool, STOP_TIMEOUT):
            return
    log.warning("%s (pid %d) did not exit", what, pid)


def teardown(state: LabState, ip: str) -> list[str]:
    """Remove everything ``state`` lists, in reverse order of creation. Returns what failed.

    The lab's children first (by PID, verified against their start time),
    then the namespaces, their ``/etc/netns`` directories, the tmpdir and the
    state file. Idempotent: what is already gone is skipped.
    """
    problems: list[str] = []
    for proc in reversed(state.processes):
        stop_process(int(proc["pid"]), proc.get("start"), str(proc.get("what", "child")))
    for ns in reversed(state.namespaces):
        if not os.path.exists(f"/run/netns/{ns}"):
            continue
        # Whatever still runs inside was not started by the lab (a shell someone
        # opened in a kept lab): it is left alone, and keeps that namespace alive
        # after its name is gone until it exits.
        others = subprocess.run([ip, "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        if others:
            log.warning("%s: processes not started by the lab still inside, left alone: %s", ns, " ".join(others))
        proc = subprocess.run([ip, "netns", "del", ns], capture_output=True, text=True)
        if proc.returncode != 0:
            problems.append(f"ip netns del {ns}: {proc.stderr.strip()}")
    for d in reversed(state.etc_dirs):
        shutil.rmtree(d, ignore_errors=True)
    if state.tmpdir:
        shutil.rmtree(state.tmpdir, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(LabState.path_for(state.lab_id))
    with contextlib.suppress(OSError):  # only when no other lab is kept
        os.rmdir(STATE_DIR)
    return problems


# --- preflight -----------------------------------------------------------------


def find_program(name: str, path: str | None) -> str | None:
    """``name`` on ``path`` or in the usual sbin/bin directories (root's PATH may lack sbin)."""
    found = shutil.which(name, path=path)
    if found:
        return found
    for d in _SBIN:
        candidate = os.path.join(d, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def find_tools(env: Mapping[str, str], backend: BackendName) -> tuple[Tools | None, list[str]]:
    """Every program the lab needs with ``backend``, or the list of what is missing (naming Debian packages).

    This package's own entry points are taken from next to ``sys.executable``:
    the lab tests the installation it runs from, never another one on PATH.
    """
    missing: list[str] = []
    found: dict[str, str] = {}
    for name, package in REQUIRED_TOOLS + BACKEND_TOOLS[backend]:
        path = find_program(name, env.get("PATH"))
        if path is None:
            missing.append(f"{name} (Debian package {package})")
        else:
            found[name] = path
    bindir = Path(sys.executable).parent
    for name in ENTRY_POINTS:
        entry = bindir / name
        if not os.access(entry, os.X_OK):
            missing.append(f"{name} (not installed next to {sys.executable}: install this package there)")
        else:
            found[name] = str(entry)
    if missing:
        return None, missing
    defaults = FirewallTools()
    firewall = FirewallTools(
        nft=found.get("nft", defaults.nft),
        iptables_save=found.get("iptables-legacy-save", defaults.iptables_save),
        ip6tables_save=found.get("ip6tables-legacy-save", defaults.ip6tables_save),
        ipset=found.get("ipset", defaults.ipset),
    )
    return (
        Tools(
            ip=found["ip"],
            dnsmasq=found["dnsmasq"],
            dig=found["dig"],
            vif_hotplug=found["vif-hotplug"],
            vif_route=found["vif-route-qubes"],
            dnat=found["qubes-setup-dnat-to-ns"],
            firewall=firewall,
        ),
        [],
    )


# --- running commands inside the lab's namespaces ------------------------------------


class NetnsShell:
    """:class:`~vif_hotplug.lab.checks.Shell` that runs everything through ``ip netns exec``."""

    def __init__(self, ip: str) -> None:
        self.ip = ip

    def run(
        self, ns: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Run to completion; a timeout comes back as exit status 124, never as an exception."""
        full = [self.ip, "netns", "exec", ns, *argv]
        try:
            proc = subprocess.run(
                full, capture_output=True, text=True, env=None if env is None else dict(env),
                timeout=timeout, stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            proc = subprocess.CompletedProcess(full, 124, "", f"timed out after {timeout:g}s")
        log.debug("[%s] %s -> %d %s", ns, " ".join(argv), proc.returncode, proc.stderr.strip()[:200])
        return proc

    def must(self, ns: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
        proc = self.run(ns, argv, env=env)
        if proc.returncode != 0:
            msg = (proc.stderr or proc.stdout).strip().splitlines()
            raise LabError(f"[{ns}] {' '.join(argv)} exited {proc.returncode}: {msg[-1] if msg else ''}")
        return proc.stdout

    def popen(self, ns: str, argv: Sequence[str]) -> subprocess.Popen[str]:
        """A short-lived helper talking over pipes (the caller waits for it)."""
        return subprocess.Popen(
            [self.ip, "netns", "exec", ns, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True,
        )


# --- the lab -------------------------------------------------------------------------


class Lab:
    """One lab run: creates the topology, keeps :class:`LabState` current, runs the checks."""

    def __init__(
        self, topo: Topology, tools: Tools, state: LabState, env: Mapping[str, str], backend_choice: str,
        backend: BackendName,
    ) -> None:
        self.topo = topo
        self.tools = tools
        self.state = state
        self.shell = NetnsShell(tools.ip)
        self.env = dict(env)
        #: What the tools are told (``auto`` included) and what that means on this host.
        self.backend_choice = backend_choice
        self.backend = backend
        self.paths = LabPaths(state.tmpdir)
        self.results: list[CheckResult] = []
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[IO[bytes]] = []
        self.checker = Checker(topo, self.shell, tools, backend, lambda: f"{topo.lab_id}-{secrets.token_hex(4)}")

    def record(self, result: CheckResult) -> CheckResult:
        self.results.append(result)
        log.info("%s %s %s: %s", "pass" if result.ok else "FAIL", result.check, result.vm, result.detail)
        return result

    # --- building ---------------------------------------------------------------

    def build(self) -> None:
        """Namespaces, the uplink and the netvm (no VM yet), servers, XenStore. Raises :class:`LabError`."""
        topo = self.topo
        log.info("creating namespaces %s-%s-*", PREFIX, topo.lab_id)
        for ns in topo.namespaces:
            self.state.namespaces.append(ns)
            self.state.save()
            proc = subprocess.run([self.tools.ip, "netns", "add", ns], capture_output=True, text=True)
            if proc.returncode != 0:
                raise LabError(f"ip netns add {ns}: {proc.stderr.strip()}")
        self._write_netns_file(topo.netvm_ns, "resolv.conf", resolv_conf((RESOLVER_A,)))
        for vm in topo.vms:
            self._write_netns_file(vm.ns, "resolv.conf", resolv_conf((DNS1, DNS2)))
        log.info("wiring uplink and netvm")
        for ns, argv in netvm_commands(topo) + uplink_commands(topo):
            self.shell.must(ns, argv)
        os.makedirs(self.paths.state_dir, mode=0o700, exist_ok=True)
        os.makedirs(self.paths.hooks_dir, exist_ok=True)
        self._start_servers()
        self._write_conf()
        log.info("writing the netvm parameters to XenStore")
        self._xenstore_write(netvm_xenstore_entries(topo.ipv6))

    def start_vm(self, vm: Vm) -> None:
        """What libxl and netback do when ``vm`` starts, and the VM's own set-up. Raises :class:`LabError`."""
        log.info("starting %s: backend entries, %s, its network set-up", vm.name, vm.vif)
        self._xenstore_write(vm_xenstore_entries(vm, f"{self.topo.lab_id}-{vm.name}"))
        for ns, argv in vif_commands(self.topo.netvm_ns, vm) + vm_commands(vm):
            self.shell.must(ns, argv)

    def _write_netns_file(self, ns: str, name: str, text: str) -> None:
        """``ip netns exec`` bind-mounts ``/etc/netns/NS/NAME`` over ``/etc/NAME``."""
        d = os.path.join(NETNS_ETC, ns)
        if d not in self.state.etc_dirs:
            self.state.etc_dirs.append(d)
            self.state.save()
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, name), "w", encoding="utf-8") as f:
            f.write(text)

    def spawn(self, ns: str, argv: Sequence[str], what: str, env: Mapping[str, str] | None = None) -> None:
        """Start a long-lived child inside ``ns``, recorded by PID; output to a log in the tmpdir.

        It gets its own session, so a Ctrl-C meant for the lab (or the end of
        the terminal of a kept lab) does not kill it behind the lab's back.
        """
        logf = open(os.path.join(self.paths.tmpdir, f"{what}.log"), "wb")  # closed in close_logs()
        self._logs.append(logf)
        # Started and recorded, or neither: an interruption in between would
        # leave a child that teardown does not know.
        with _GUARD.deferred():
            p = subprocess.Popen(
                [self.tools.ip, "netns", "exec", ns, *argv], stdin=subprocess.DEVNULL, stdout=logf,
                stderr=subprocess.STDOUT, start_new_session=True, env=None if env is None else dict(env),
            )
            self.children[what] = p
            self.state.processes.append({"pid": p.pid, "start": process_start_time(p.pid), "what": what})
            self.state.save()
        log.info("started %s in %s (pid %d)", what, ns, p.pid)

    def _wait(self, what: str, ready: Callable[[], bool]) -> None:
        child = self.children[what]
        ok = poll(lambda: child.poll() is not None or ready(), bool, STARTUP_TIMEOUT)
        if child.poll() is not None or not ok:
            tail = Path(self.paths.tmpdir, f"{what}.log").read_text(errors="replace").strip().splitlines()[-3:]
            state = f"exited {child.returncode}" if child.poll() is not None else "not ready"
            raise LabError(f"{what} {state}: {' | '.join(tail)}")

    def _resolves(self, resolver: IPv4Address) -> bool:
        argv = (self.tools.dig, "+short", "+tries=1", "+time=1", f"@{resolver}", TEST_NAME)
        return bool(self.shell.run(self.topo.uplink_ns, argv).stdout.strip())

    def _start_servers(self) -> None:
        up, t = self.topo.uplink_ns, self.tools
        log.info("starting resolvers %s and %s, probe server and XenStore", RESOLVER_A, RESOLVER_B)
        for what, addr, answer in (("dnsmasq-a", RESOLVER_A, ANSWER_A), ("dnsmasq-b", RESOLVER_B, ANSWER_B)):
            self.spawn(up, (
                t.dnsmasq, "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
                "--bind-interfaces", f"--listen-address={addr}", f"--address=/{TEST_NAME}/{answer}",
                f"--pid-file={self.paths.tmpdir}/{what}.pid", f"--log-facility={self.paths.tmpdir}/{what}.queries",
            ), what)
        self.spawn(up, t.probe("serve", "--port", str(PROBE_PORT)), "probe-server")
        self.spawn(self.topo.netvm_ns, (t.vif_hotplug, "xenstored", "--socket", self.paths.xenstore_socket),
                   "xenstored", env=tool_env(self.paths, self.env))
        self._wait("dnsmasq-a", lambda: self._resolves(RESOLVER_A))
        self._wait("dnsmasq-b", lambda: self._resolves(RESOLVER_B))
        self._wait("probe-server", lambda: "ready" in Path(self.paths.tmpdir, "probe-server.log").read_text())
        self._wait("xenstored", lambda: _accepts(self.paths.xenstore_socket))

    def _xenstore(self) -> XenStore:
        return XenStore(("unix", self.paths.xenstore_socket))

    def _write_conf(self) -> None:
        # QubesDB, when the host has it, comes before XenStore and would hand
        # the tools the host's values: then the lab's go in netvm.conf too.
        qubesdb = find_program("qubesdb-read", self.env.get("PATH")) is not None
        with open(self.paths.conf, "w", encoding="utf-8") as f:
            f.write(netvm_conf(self.topo.ipv6, self.paths.hooks_dir, self.backend_choice, with_params=qubesdb))

    def _xenstore_write(self, entries: Sequence[tuple[str, str]]) -> None:
        try:
            with self._xenstore() as xs:
                for path, value in entries:
                    xs.write(path, value)
        except HotplugError as exc:
            raise LabError(f"XenStore: {exc}") from exc

    def close_logs(self) -> None:
        for f in self._logs:
            f.close()
        self._logs.clear()

    # --- toolstack actions ---------------------------------------------------------

    def run_tool(self, argv: Sequence[str], env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
        return self.shell.run(self.topo.netvm_ns, argv, env=env, timeout=60.0)

    def init(self) -> CheckResult:
        log.info("vif-hotplug init --backend %s in the netvm", self.backend_choice)
        argv = (self.tools.vif_hotplug, "init", "--backend", self.backend_choice)
        proc = self.run_tool(argv, tool_env(self.paths, self.env))
        detail = f"{_outcome(proc)}; firewall {self.backend}"
        return self.record(CheckResult(f"vif-hotplug init --backend {self.backend_choice}", "-",
                                       proc.returncode == 0, detail))

    def dnat(self, check: str, expect: Collection[int]) -> CheckResult:
        # The D-Bus socket is not per network namespace: asking systemd-resolved
        # would give the host's servers. The netvm's resolv.conf is the uplink here.
        proc = self.run_tool((self.tools.dnat, "--resolv-conf", "/etc/resolv.conf"), tool_env(self.paths, self.env))
        shown = " or ".join(f"{code} ({DNAT_MEANING[code]})" for code in sorted(expect))
        detail = f"exit {proc.returncode} (expected {shown})"
        err = proc.stderr.strip().splitlines()
        if proc.returncode not in DNAT_MEANING and err:
            detail += f": {err[-1]}"
        return self.record(CheckResult(check, "-", proc.returncode in expect, detail))

    def hotplug(self, vm: Vm, command: str, prefix: str = "") -> CheckResult:
        log.info("vif-route-qubes %s type_if=vif for %s", command, vm.vif)
        proc = self.run_tool((self.tools.vif_route, command, "type_if=vif"), hotplug_env(vm, self.paths, self.env))
        if command != "online":
            return self.record(CheckResult(f"{prefix}{command}: exit 0", vm.name, proc.returncode == 0, _outcome(proc)))
        status = error = None
        try:
            with self._xenstore() as xs:
                status = xs.read(f"{NETVM_HOME}/{vm.xenbus_path}/hotplug-status")
                error = xs.read(f"{NETVM_HOME}/{vm.xenbus_path}/hotplug-error")
        except HotplugError as exc:
            error = str(exc)
        ok = proc.returncode == 0 and status == "connected"
        detail = f"exit {proc.returncode}, hotplug-status={status}" + (f", hotplug-error={error}" if error else "")
        if proc.returncode != 0:
            detail += f" ({_outcome(proc)})"
        return self.record(CheckResult(f"{prefix}online: hotplug-status connected", vm.name, ok, detail))

    # --- the scenario --------------------------------------------------------------

    def scenario(self) -> None:
        """Build, init, start and bring every VM online, run every check. Rows accumulate in ``results``."""
        topo, c = self.topo, self.checker
        self.build()
        # A driver domain sets itself up before any VM starts; init also runs
        # the DNS tool's logic, so the DNS tool may find nothing to change.
        if not self.init().ok or not self.dnat("qubes-setup-dnat-to-ns", (DNAT_CHANGED, DNAT_UNCHANGED)).ok:
            return
        for vm in topo.vms:
            self.start_vm(vm)
        online = [vm for vm in topo.vms if self.hotplug(vm, "online").ok]
        if len(online) != len(topo.vms):
            return
        log.info("checking traffic")
        for vm in topo.vms:
            self.record(c.ping(vm, GATEWAY, "ping gateway"))
            self.record(c.ping(vm, UPLINK_PEER, "ping uplink"))
            self.record(c.tcp_nat(vm, 4))
            for server in (DNS1, DNS2):
                for tcp in (False, True):
                    self.record(c.dns(vm, server, tcp))
            if vm.ipv6 is not None:
                self.record(c.ping(vm, UPLINK6_PEER, "ping6 uplink"))
                self.record(c.tcp_nat(vm, 6))
        if len(topo.vms) > 1:
            for i, vm in enumerate(topo.vms):
                other = topo.vms[(i + 1) % len(topo.vms)]
                self.record(c.no_vm_to_vm(vm, other, 4))
                if vm.ipv6 is not None and other.ipv6 is not None:
                    self.record(c.no_vm_to_vm(vm, other, 6))
        for vm in topo.vms:
            self.record(c.forged_from_vm(vm, 4))
            if vm.ipv6 is not None:
                self.record(c.forged_from_vm(vm, 6))
        self.record(c.forged_from_uplink(topo.vms[0], 4))
        if topo.ipv6:
            self.record(c.forged_from_uplink(topo.vms[0], 6))
            self.record(c.no_ipv6_without_address(topo.vms[-1]))
        self.switch_resolver()
        self.offline(topo.vms[-1])
        # Back online, so the VM works again (and a kept lab is complete).
        if self.hotplug(topo.vms[-1], "online", prefix="again ").ok:
            self.record(c.ping(topo.vms[-1], UPLINK_PEER, "again online: ping uplink"))

    def switch_resolver(self) -> None:
        """The DNS tool rerun without a change changes nothing; after the uplink's resolver
        changes it moves every VM to the new server while the VMs keep asking DNS1/DNS2."""
        self.dnat("qubes-setup-dnat-to-ns again: unchanged", (DNAT_UNCHANGED,))
        log.info("switching the netvm's resolver from %s to %s", RESOLVER_A, RESOLVER_B)
        self._write_netns_file(self.topo.netvm_ns, "resolv.conf", resolv_conf((RESOLVER_B,)))
        if not self.dnat("resolver switched: qubes-setup-dnat-to-ns", (DNAT_CHANGED,)).ok:
            return
        for vm in self.topo.vms:
            for server in (DNS1, DNS2):
                self.record(self.checker.dns(vm, server, False, expect=ANSWER_B, prefix="after switch: dns"))

    def offline(self, vm: Vm) -> None:
        """Offline of one VM removes all its objects and leaves the others working."""
        if not self.hotplug(vm, "offline").ok:
            return
        for row in self.checker.offline_leftovers(vm):
            self.record(row)
        for other in self.topo.vms:
            if other != vm:
                self.record(self.checker.ping(other, UPLINK_PEER, f"after {vm.name} offline: ping uplink"))
                prefix = f"after {vm.name} offline: dns"
                self.record(self.checker.dns(other, DNS1, False, expect=ANSWER_B, prefix=prefix))


def _accepts(path: str) -> bool:
    """Whether a Unix socket at ``path`` accepts connections (it exists before it listens)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def _outcome(proc: subprocess.CompletedProcess[str]) -> str:
    err = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    return f"exit {proc.returncode}" + (f": {err[-1]}" if proc.returncode != 0 and err else "")


# --- entry point ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Build an uplink, a netvm and VMs in network namespaces, run the real hotplug "
        "tools against an embedded XenStore as the Xen toolstack would, and prove routing, NAT, "
        "DNS, isolation and anti-spoofing with real traffic. Needs root; touches nothing outside "
        "the namespaces it creates.",
        epilog="exit status: 0 every check passed; 1 a check failed or the lab could not be built; "
        "2 usage error. State of running labs: " + STATE_DIR,
    )
    p.add_argument("--vms", type=int, default=3, metavar="N", help="number of VMs (default 3)")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                   help="firewall backend of the netvm's tools (default auto: as the package picks it on this host)")
    p.add_argument("--ipv6", action="store_true",
                   help="IPv6 for the uplink and every VM but the last (which proves it gets none through)")
    p.add_argument("--json", action="store_true", help="print the results as JSON: [{check, vm, ok, detail}]")
    p.add_argument("--keep", action="store_true", help="leave the lab running and say how to enter and remove it")
    p.add_argument("--down", nargs="?", const="", metavar="ID",
                   help="tear down a kept (or crashed) lab: ID, 'all', or nothing when only one exists")
    p.add_argument("-v", "--verbose", action="store_true", help="log every command to stderr")
    return p


def _configure_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("vif-hotplug lab: %(message)s"))
    pkg = logging.getLogger("vif_hotplug")
    pkg.handlers[:] = [handler]
    pkg.propagate = False
    pkg.setLevel(logging.DEBUG if verbose else logging.INFO)


class _SignalGuard:
    """SIGINT, SIGTERM and SIGHUP interrupt the lab (so ``finally`` blocks clean up), except inside
    :meth:`deferred`, where they wait until the section is over."""

    def __init__(self) -> None:
        self._depth = 0
        self._pending: int | None = None

    @staticmethod
    def _interruption(signum: int) -> BaseException:
        return KeyboardInterrupt() if signum == signal.SIGINT else Interrupted(signal.Signals(signum).name)

    def handler(self, signum: int, frame: FrameType | None) -> None:
        if self._depth:
            self._pending = self._pending or signum
            return
        raise self._interruption(signum)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A section a signal must not cut in two (a child started but not yet recorded)."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if not self._depth and self._pending is not None:
            signum, self._pending = self._pending, None
            raise self._interruption(signum)


_GUARD = _SignalGuard()


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGINT raises ``KeyboardInterrupt``, SIGTERM and SIGHUP :class:`Interrupted` (see :class:`_SignalGuard`)."""
    old = {s: signal.signal(s, _GUARD.handler) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """While tearing down, a second Ctrl-C must not leave half a lab behind."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, signal.SIG_IGN) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def down(which: str, ip: str) -> int:
    """Tear down kept labs: ``which`` is an id, ``vhlab-ID``, ``all``, or empty for the only one."""
    try:
        files = sorted(p for p in os.listdir(STATE_DIR) if p.endswith(".json"))
    except FileNotFoundError:
        files = []
    ids = [f[: -len(".json")] for f in files]
    which = which.removeprefix(f"{PREFIX}-")
    if which == "all":
        chosen = ids
    elif which:
        if which not in ids:
            log.error("no lab %s (known: %s)", which, ", ".join(ids) or "none")
            return 1
        chosen = [which]
    elif len(ids) > 1:
        log.error("several labs exist, name one (or 'all'): %s", ", ".join(ids))
        return 2
    else:
        chosen = ids
    if not chosen:
        log.info("no lab to tear down")
        return 0
    status = 0
    for lab_id in chosen:
        try:
            state = LabState.load(LabState.path_for(lab_id))
        except (OSError, ValueError, KeyError) as exc:
            log.error("cannot read state of lab %s: %s", lab_id, exc)
            status = 1
            continue
        log.info("tearing down lab %s", lab_id)
        with _signals_ignored():
            problems = teardown(state, ip)
        for problem in problems:
            log.error("%s", problem)
            status = 1
    return status


def keep_instructions(topo: Topology, paths: LabPaths, tools: Tools) -> str:
    lines = [f"lab {topo.lab_id} is left running. Enter a namespace with:"]
    width = max(len(name) for name in ("uplink", "netvm", *(vm.name for vm in topo.vms)))
    lines.append(f"  {'uplink':{width}}  ip netns exec {topo.uplink_ns} bash")
    lines.append(f"  {'netvm':{width}}  ip netns exec {topo.netvm_ns} bash")
    for vm in topo.vms:
        lines.append(f"  {vm.name:{width}}  ip netns exec {vm.ns} bash")
    overrides = " ".join(f"{k}={v}" for k, v in tool_overrides(paths).items())
    lines.append(f"The tools in the netvm need: {overrides}")
    lines.append(f"Tear down with: {tools.vif_hotplug} lab --down {topo.lab_id}")
    return "\n".join(lines)


def run(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """The whole command; returns the exit status (never calls ``sys.exit``)."""
    env = dict(os.environ if env is None else env)
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # --help, usage errors
        return int(exc.code or 0)
    _configure_logging(args.verbose)

    if os.geteuid() != 0:
        log.error("must run as root (it creates network namespaces)")
        return 1
    if args.down is not None:
        ip = find_program("ip", env.get("PATH"))
        if ip is None:
            log.error("missing required program: ip (Debian package iproute2)")
            return 1
        return down(args.down, ip)
    try:
        backend = choose_backend(args.backend, env.get("PATH"))
    except HotplugError as exc:
        log.error("%s", exc)
        return 2
    if args.backend == "auto":
        log.info("firewall backend auto: %s on this host", backend)
    tools, missing = find_tools(env, backend)
    if tools is None:
        log.error("missing required programs: %s", "; ".join(missing))
        return 1

    lab_id = secrets.token_hex(3)
    try:
        topo = plan_topology(lab_id, args.vms, args.ipv6)
    except ValueError as exc:
        log.error("%s", exc)
        return 2

    state = LabState(lab_id)
    results: list[CheckResult] = []
    # With --keep the lab stays even when a check or the set-up failed: that
    # is when one wants to look inside. An interruption always tears down.
    keep = args.keep
    completed = False
    with _signals_raise():
        lab: Lab | None = None
        try:
            state.save()
            state.tmpdir = tempfile.mkdtemp(prefix=f"{PREFIX}-{lab_id}-")
            state.save()
            lab = Lab(topo, tools, state, env, args.backend, backend)
            results = lab.results
            lab.scenario()
            completed = True
        except LabError as exc:
            log.error("%s", exc)
            results.append(CheckResult("lab set-up", "-", False, str(exc)))
        except (KeyboardInterrupt, Interrupted) as exc:
            log.error("interrupted (%s): tearing down", exc if isinstance(exc, Interrupted) else "SIGINT")
            keep = False
            results.append(CheckResult("lab run", "-", False, "interrupted"))
        finally:
            if lab is not None:
                lab.close_logs()
            if not keep:
                log.info("tearing down lab %s", lab_id)
                with _signals_ignored():
                    for problem in teardown(state, tools.ip):
                        log.error("%s", problem)

    print(to_json(results) if args.json else format_table(results))
    if keep:
        print(keep_instructions(topo, LabPaths(state.tmpdir), tools), file=sys.stderr if args.json else sys.stdout)
    return 0 if completed and results and all(r.ok for r in results) else 1


def run_command(argv: Sequence[str], env: Mapping[str, str], runtime: object, logs: object,
                out: Callable[[str], None], prog: str) -> tuple[int, None]:
    """``vif-hotplug lab`` as the registry runs it (:mod:`vif_hotplug.registry`)."""
    return run(argv, env), None
