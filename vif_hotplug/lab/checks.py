"""The lab's checks: each proves one property with real traffic and returns a row.

A row is data (:class:`CheckResult`: check, vm, ok, detail), so the lab can
print a table or JSON and its tests can assert on it. Parsers of tool output
are pure functions; :class:`Checker` runs the commands through a
:class:`Shell`, which only ever executes inside the lab's namespaces.

Negative checks ("X is dropped") always carry positive evidence as well, so
a broken probe cannot pass them: a forged packet must be counted by the
anti-spoofing rule that drops it, and a genuine packet sent right after it
on the same path must arrive.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Protocol, TypeVar

from .antispoof import ALLOWED, CHAIN, DOWNSTREAM
from .lab_topology import (
    ANSWER_A,
    DNS1,
    DNS2,
    GATEWAY,
    GATEWAY6,
    NETVM_UPLINK,
    NETVM_UPLINK6,
    PROBE_PORT,
    TEST_NAME,
    UPLINK6_PEER,
    UPLINK_PEER,
    Topology,
    Vm,
)

log = logging.getLogger(__name__)

IPAddr = IPv4Address | IPv6Address
T = TypeVar("T")

#: How long a check waits for evidence that should come within milliseconds.
EVIDENCE_TIMEOUT = 3.0
#: Packets ``send-udp`` sends per probe (all must be counted as dropped).
PROBE_PACKETS = 3


@dataclass(frozen=True)
class CheckResult:
    check: str
    vm: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class Tools:
    """Absolute paths of every program the lab runs."""

    ip: str
    dnsmasq: str
    dig: str
    ipset: str
    iptables_save: str
    ip6tables_save: str
    vif_hotplug: str
    vif_route: str
    dnat: str
    python: str = sys.executable

    def probe(self, *args: str) -> tuple[str, ...]:
        return (self.python, "-m", "vif_hotplug.lab_probe", *args)


class Shell(Protocol):
    """Runs a command inside one of the lab's namespaces."""

    def run(
        self, ns: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]: ...

    def popen(self, ns: str, argv: Sequence[str]) -> subprocess.Popen[str]: ...


# --- pure helpers ----------------------------------------------------------


def dig_answers(stdout: str) -> tuple[str, ...]:
    """The records ``dig +short`` printed (comment lines such as timeouts dropped)."""
    return tuple(line.strip() for line in stdout.splitlines() if line.strip() and not line.startswith(";"))


def antispoof_counts(save_text: str) -> dict[str, int]:
    """Packets dropped so far by each anti-spoofing rule, keyed by the set it matches.

    ``save_text`` is ``ip(6)tables-legacy-save -c -t raw`` output, whose rule
    lines start with ``[packets:bytes]``.
    """
    out: dict[str, int] = {}
    for line in save_text.splitlines():
        if not line.startswith("[") or f"-A {CHAIN} " not in line:
            continue
        counters, _, rule = line.partition(" ")
        words = rule.split()
        if "--match-set" in words:
            name = words[words.index("--match-set") + 1]
            out[name] = out.get(name, 0) + int(counters.strip("[]").split(":")[0])
    return out


def set_members(ipset_list: str) -> tuple[str, ...]:
    """Member lines of ``ipset list`` output (every set), e.g. ``10.137.0.11,vif11.0``."""
    out: list[str] = []
    in_members = False
    for line in ipset_list.splitlines():
        if line.startswith("Name:"):
            in_members = False
        elif line.startswith("Members:"):
            in_members = True
        elif in_members and line.strip():
            out.append(line.strip())
    return tuple(out)


def member_mentions(member: str, address: IPAddr, dev: str) -> bool:
    """Whether an ipset member line is about ``address`` or ``dev`` (``/32``, ``/128`` optional)."""
    parts = member.split(",")
    addr = parts[0].split("/")[0]
    try:
        same = ip_address(addr) == address
    except ValueError:
        same = False
    return same or dev in parts[1:]


def route_destinations(ip_route: str) -> tuple[str, ...]:
    """First word of each ``ip -o route`` line (``default`` or an address/prefix)."""
    return tuple(line.split()[0] for line in ip_route.splitlines() if line.strip())


def addresses_of(ip_addr: str) -> tuple[str, ...]:
    """``ADDR/LEN`` of each ``ip -o addr show`` line."""
    out = []
    for line in ip_addr.splitlines():
        words = line.split()
        for key in ("inet", "inet6"):
            if key in words:
                out.append(words[words.index(key) + 1])
    return tuple(out)


def neighbour_addresses(ip_neigh: str) -> tuple[str, ...]:
    return tuple(line.split()[0] for line in ip_neigh.splitlines() if line.strip())


def format_table(results: Sequence[CheckResult]) -> str:
    """Human-readable results: one line per check, then a summary line."""
    width_c = max([len(r.check) for r in results] + [5])
    width_v = max([len(r.vm) for r in results] + [2])
    lines = [f"{'RESULT':6}  {'CHECK':{width_c}}  {'VM':{width_v}}  DETAIL"]
    for r in results:
        lines.append(f"{'pass' if r.ok else 'FAIL':6}  {r.check:{width_c}}  {r.vm:{width_v}}  {r.detail}")
    failed = sum(not r.ok for r in results)
    lines.append(f"{len(results) - failed} passed, {failed} failed")
    return "\n".join(lines)


def to_json(results: Sequence[CheckResult]) -> str:
    return json.dumps([asdict(r) for r in results], indent=2)


def poll(read: Callable[[], T], done: Callable[[T], bool], timeout: float = EVIDENCE_TIMEOUT) -> T:
    """Call ``read`` until ``done`` holds for its value or ``timeout`` passes; return the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if done(value) or time.monotonic() >= deadline:
            return value
        time.sleep(0.05)


def _first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


# --- checks ------------------------------------------------------------------


class Checker:
    """Runs the checks of one lab. Each method returns one :class:`CheckResult`."""

    def __init__(self, topo: Topology, shell: Shell, tools: Tools, tokens: Callable[[], str]) -> None:
        self.topo = topo
        self.shell = shell
        self.tools = tools
        #: Fresh unique strings for probe payloads (so runs never count each other's packets).
        self.tokens = tokens

    # small steps ------------------------------------------------------------

    def _ok(self, ns: str, argv: Sequence[str], timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
        return self.shell.run(ns, argv, timeout=timeout)

    def _ping(self, vm: Vm, dst: IPAddr, wait: float) -> bool:
        return self._ok(vm.ns, self.tools.probe("ping", str(dst), "--wait", str(wait))).returncode == 0

    def _dig(self, vm: Vm, server: IPv4Address, tcp: bool) -> tuple[str, ...]:
        argv = [self.tools.dig, "+short", "+tries=1", "+time=2", f"@{server}", TEST_NAME, "A"]
        if tcp:
            argv.insert(1, "+tcp")
        return dig_answers(self._ok(vm.ns, argv).stdout)

    def counters(self, family: int) -> dict[str, int]:
        save = self.tools.ip6tables_save if family == 6 else self.tools.iptables_save
        return antispoof_counts(self._ok(self.topo.netvm_ns, (save, "-c", "-t", "raw")).stdout)

    def _server_count(self, token: str) -> int:
        proc = self._ok(self.topo.uplink_ns, self.tools.probe("query", str(UPLINK_PEER), str(PROBE_PORT), token))
        try:
            return int(_first_line(proc.stdout))
        except ValueError:
            return -1

    def _other_vm(self, vm: Vm, family: int) -> Vm | None:
        for other in self.topo.vms:
            if other != vm and (family == 4 or other.ipv6 is not None):
                return other
        return None

    @staticmethod
    def _addr(vm: Vm, family: int) -> IPAddr:
        if family == 4:
            return vm.ipv4
        if vm.ipv6_self is None:
            raise ValueError(f"{vm.name} has no IPv6 address")
        return vm.ipv6_self

    # checks -----------------------------------------------------------------

    def ping(self, vm: Vm, dst: IPAddr, check: str) -> CheckResult:
        ok = self._ping(vm, dst, 2)
        return CheckResult(check, vm.name, ok, f"ping {dst} {'answered' if ok else 'got no answer'}")

    def tcp_nat(self, vm: Vm, family: int) -> CheckResult:
        dst, want = (UPLINK6_PEER, NETVM_UPLINK6) if family == 6 else (UPLINK_PEER, NETVM_UPLINK)
        check = f"tcp{'6' if family == 6 else ''} to uplink, source NATed"
        proc = self._ok(vm.ns, self.tools.probe("connect", str(dst), str(PROBE_PORT)))
        if proc.returncode != 0:
            return CheckResult(check, vm.name, False, f"connect to {dst}: {_first_line(proc.stderr) or 'failed'}")
        seen = _first_line(proc.stdout)
        ok = seen == str(want)
        return CheckResult(check, vm.name, ok, f"server saw {seen or 'nothing'} (expected the netvm's {want})")

    def dns(
        self, vm: Vm, server: IPv4Address, tcp: bool, expect: IPv4Address = ANSWER_A, prefix: str = "dns"
    ) -> CheckResult:
        label = "DNS1" if server == DNS1 else "DNS2" if server == DNS2 else str(server)
        check = f"{prefix} {label} {'tcp' if tcp else 'udp'}"
        answers = self._dig(vm, server, tcp)
        ok = answers == (str(expect),)
        shown = " ".join(answers) or "no answer"
        return CheckResult(check, vm.name, ok, f"{TEST_NAME} -> {shown} via {server} (expected {expect})")

    def no_vm_to_vm(self, vm: Vm, other: Vm) -> CheckResult:
        reached = self._ping(vm, other.ipv4, 1)
        detail = f"ping {other.ipv4} ({other.name}) {'answered' if reached else 'got no answer'}"
        return CheckResult("no vm-to-vm", vm.name, not reached, detail)

    def forged_from_vm(self, vm: Vm, family: int) -> CheckResult:
        """``vm`` sends from an address that is not its own: nothing reaches the uplink."""
        check = "forged IPv6 source dropped" if family == 6 else "forged source dropped"
        other = self._other_vm(vm, family)
        own = self._addr(vm, family)
        if other is not None:
            forged: IPAddr = self._addr(other, family)
        else:
            forged = ip_address(int(own) + 200)
        dst = UPLINK6_PEER if family == 6 else UPLINK_PEER
        t_forged, t_genuine = self.tokens(), self.tokens()
        before = self.counters(family).get(ALLOWED[family], 0)
        self._ok(vm.ns, self.tools.probe("send-udp", str(forged), str(dst), str(PROBE_PORT), t_forged))
        self._ok(vm.ns, self.tools.probe("send-udp", str(own), str(dst), str(PROBE_PORT), t_genuine))
        # Both went the same way, forged first: once the genuine ones are in,
        # the forged ones would be too.
        genuine = poll(lambda: self._server_count(t_genuine), lambda n: n >= PROBE_PACKETS)
        arrived = self._server_count(t_forged)
        dropped = self.counters(family).get(ALLOWED[family], 0) - before
        ok = arrived == 0 and genuine >= 1 and dropped >= PROBE_PACKETS
        detail = (
            f"from {forged}: {arrived} arrived at the uplink, {dropped} dropped by anti-spoofing; "
            f"from its own {own}: {genuine} arrived"
        )
        return CheckResult(check, vm.name, ok, detail)

    def forged_from_uplink(self, target: Vm, family: int) -> CheckResult:
        """The uplink sends to ``target`` from a VM address: the netvm drops it on arrival."""
        check = "uplink-forged VM IPv6 address dropped" if family == 6 else "uplink-forged VM address dropped"
        other = self._other_vm(target, family) or target
        forged, dst = self._addr(other, family), self._addr(target, family)
        token = self.tokens()
        before = self.counters(family).get(DOWNSTREAM[family], 0)
        listener = self.shell.popen(target.ns, self.tools.probe("listen-udp", str(PROBE_PORT), token))
        try:
            if listener.stdout is None or listener.stdout.readline().strip() != "ready":
                return CheckResult(check, target.name, False, "the VM's listener did not start")
            self._ok(self.topo.uplink_ns, self.tools.probe("send-udp", str(forged), str(dst), str(PROBE_PORT), token))
            dropped = poll(
                lambda: self.counters(family).get(DOWNSTREAM[family], 0) - before,
                lambda n: n >= PROBE_PACKETS,
            )
            out, _ = listener.communicate(input="", timeout=EVIDENCE_TIMEOUT)
        finally:
            if listener.poll() is None:
                listener.kill()
                listener.wait()
        try:
            arrived = int(_first_line(out))
        except ValueError:
            arrived = -1
        ok = arrived == 0 and dropped >= PROBE_PACKETS
        detail = f"{forged} -> {dst}: {arrived} arrived at {target.name}, {dropped} dropped by anti-spoofing"
        return CheckResult(check, target.name, ok, detail)

    def no_ipv6_without_address(self, vm: Vm) -> CheckResult:
        """A VM with no IPv6 address in XenStore gets no IPv6 through, whatever it configures."""
        before = self.counters(6).get(ALLOWED[6], 0)
        reached = self._ping(vm, UPLINK6_PEER, 1)
        dropped = self.counters(6).get(ALLOWED[6], 0) - before
        detail = (
            f"ping {UPLINK6_PEER} from {vm.ipv6_self} {'answered' if reached else 'got no answer'}, "
            f"{dropped} dropped by anti-spoofing"
        )
        return CheckResult("no IPv6 for an IPv4-only VM", vm.name, not reached and dropped >= 1, detail)

    def offline_leftovers(self, vm: Vm) -> list[CheckResult]:
        """After offline: no route, gateway address, neighbour or set member of ``vm`` is left."""
        net, ip = self.topo.netvm_ns, self.tools.ip
        vm_addrs: list[IPAddr] = [vm.ipv4] + ([vm.ipv6] if vm.ipv6 is not None else [])
        routes = route_destinations(self._ok(net, (ip, "-o", "route", "show")).stdout) + route_destinations(
            self._ok(net, (ip, "-o", "-6", "route", "show")).stdout
        )
        left_routes = [r for r in routes if r.split("/")[0] in {str(a) for a in vm_addrs}]
        addr_proc = self._ok(net, (ip, "-o", "addr", "show", "dev", vm.vif))
        gateways = {f"{GATEWAY}/32", f"{GATEWAY6}/128"}
        left_addrs = [a for a in addresses_of(addr_proc.stdout) if a in gateways]
        neigh = neighbour_addresses(self._ok(net, (ip, "neigh", "show", "nud", "permanent")).stdout)
        neigh += neighbour_addresses(self._ok(net, (ip, "-6", "neigh", "show", "nud", "permanent")).stdout)
        left_neigh = [n for n in neigh if n in {str(a) for a in vm_addrs}]
        members = set_members(self._ok(net, (self.tools.ipset, "list")).stdout)
        left_members = [m for m in members if any(member_mentions(m, a, vm.vif) for a in vm_addrs)]

        def row(check: str, left: list[str], what: str) -> CheckResult:
            return CheckResult(check, vm.name, not left, f"left: {' '.join(left)}" if left else f"no {what} left")

        return [
            row("offline: routes gone", left_routes, "route to the VM"),
            row("offline: gateway address gone", left_addrs, f"gateway address on {vm.vif}"),
            row("offline: neighbour gone", left_neigh, "permanent neighbour entry"),
            row("offline: set entries gone", left_members, "anti-spoofing set member"),
        ]
