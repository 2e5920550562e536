"""The lab's checks: each proves one property with real traffic and returns a row.

A row is data (:class:`CheckResult`: check, vm, ok, detail), so the lab can
print a table or JSON and its tests can assert on it. Parsers of tool output
are pure functions; :class:`Checker` runs the commands through a
:class:`Shell`, which only ever executes inside the lab's namespaces.

Negative checks ("X is dropped") always carry positive evidence as well, so
a broken probe cannot pass them: the packets must be counted by the rule
that drops them, and a genuine packet sent right after them from the same
VM must arrive.

The firewall is read with the distribution's tools, never with this
package's adapters, and the same way for both backends (:func:`drop_counters`,
:func:`set_members`): ``nft -j list ruleset`` (JSON only; the text output
is not a stable interface), or ``ip(6)tables-legacy-save -c`` and ``ipset
list``. The names are those of the layouts documented in
:mod:`vif_hotplug.kernel.nftables_backend` and
:mod:`vif_hotplug.kernel.iptables_backend`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from typing import Any, Literal, Protocol, TypeVar

from . import probe
from .topology import (
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
Family = Literal[4, 6]
Backend = Literal["nftables", "iptables"]
T = TypeVar("T")

#: How long a check waits for evidence that should come within milliseconds.
EVIDENCE_TIMEOUT = 3.0
#: Packets ``send-udp`` sends per probe (all must be counted as dropped).
PROBE_PACKETS = probe.DEFAULT_COUNT

# nftables layout (current Qubes; README of the shared reference, §7).
NFT_TABLE = "qubes"
# iptables layout (Qubes 4.0 names): logical chain -> (xtables table, chain).
XT_PREROUTING = ("raw", "QBS-ANTISPOOF")
XT_ANTISPOOF = ("raw", "QBS-ANTISPOOF-VIF")
XT_FORWARD = ("filter", "QBS-FORWARD-BASE")
#: Interface group of VM interfaces (netback's vifs), as both layouts match it.
VIF_GROUP = 2


@dataclass(frozen=True)
class CheckResult:
    check: str
    vm: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class FirewallTools:
    """Programs that read the netvm's firewall (only those of the backend in use are run)."""

    nft: str = "nft"
    iptables_save: str = "iptables-legacy-save"
    ip6tables_save: str = "ip6tables-legacy-save"
    ipset: str = "ipset"


@dataclass(frozen=True)
class Tools:
    """Absolute paths of every program the lab runs."""

    ip: str
    dnsmasq: str
    dig: str
    vif_hotplug: str
    vif_route: str
    dnat: str
    firewall: FirewallTools = field(default_factory=FirewallTools)
    python: str = sys.executable

    def probe(self, *args: str) -> tuple[str, ...]:
        return probe.command(*args, python=self.python)


class Shell(Protocol):
    """Runs a command inside one of the lab's namespaces."""

    def run(
        self, ns: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]: ...

    def popen(self, ns: str, argv: Sequence[str]) -> subprocess.Popen[str]: ...


# --- the firewall, read the same way for both backends -------------------------------


@dataclass(frozen=True)
class DropCounters:
    """Packets dropped so far, per family, by the rules the negative checks rely on."""

    #: A VM sent from a source it does not own: ``antispoof``'s final drop.
    forged_from_vm: int = 0
    #: A packet from a non-VM interface with a VM's address as source:
    #: ``prerouting``'s ``saddr @downstream`` drops.
    forged_from_uplink: int = 0
    #: New traffic towards a VM interface (VM to VM, uplink to VM): ``forward``'s
    #: ``oifgroup 2`` drop.
    to_vm: int = 0

    def __sub__(self, other: DropCounters) -> DropCounters:
        return DropCounters(self.forged_from_vm - other.forged_from_vm,
                            self.forged_from_uplink - other.forged_from_uplink, self.to_vm - other.to_vm)


@dataclass(frozen=True, order=True)
class SetMember:
    """One element of one of the package's sets: an address or network, and for ``allowed`` its interface."""

    set: str
    network: str
    dev: str | None = None


Run = Callable[[Sequence[str]], str]
"""Runs argv inside the netvm's namespace and returns its standard output."""


def _nft_items(ruleset_json: str) -> list[dict[str, Any]]:
    """The objects of ``nft -j list ruleset``; raises ``ValueError`` when it is not that."""
    data = json.loads(ruleset_json)
    items = data.get("nftables") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise ValueError("not the JSON of 'nft -j list ruleset'")
    return [i for i in items if isinstance(i, dict)]


def _packets(expr: list[Any]) -> int:
    for e in expr:
        if isinstance(e, dict) and isinstance(e.get("counter"), dict):
            return int(e["counter"].get("packets", 0))
    return 0


def _matches(expr: list[Any]) -> list[dict[str, Any]]:
    return [e["match"] for e in expr if isinstance(e, dict) and isinstance(e.get("match"), dict)]


def _is_drop(expr: list[Any]) -> bool:
    return any(isinstance(e, dict) and "drop" in e for e in expr)


def _saddr_in(m: dict[str, Any], set_name: str, fam: str) -> bool:
    left, right = m.get("left"), m.get("right")
    return (
        m.get("op") == "=="
        and left == {"payload": {"protocol": fam, "field": "saddr"}}
        and isinstance(right, str)
        and right.lstrip("@") in (set_name, f"{set_name}-nets")
    )


def _oifgroup_is(m: dict[str, Any], group: int) -> bool:
    return m.get("op") == "==" and m.get("left") == {"meta": {"key": "oifgroup"}} and str(m.get("right")) == str(group)


def nft_drop_counters(ruleset_json: str, family: Family) -> DropCounters:
    """:class:`DropCounters` of ``family`` from ``nft -j list ruleset`` output (table ``ip``/``ip6 qubes``).

    ``antispoof``: the counter of its ``drop`` rule; ``prerouting``: the
    ``saddr @downstream`` (and ``@downstream-nets``) drop rules; ``forward``:
    the ``oifgroup 2`` drop rule. Raises ``ValueError`` for text that is not
    nft's JSON.
    """
    fam = "ip6" if family == 6 else "ip"
    from_vm = from_uplink = to_vm = 0
    for item in _nft_items(ruleset_json):
        rule = item.get("rule")
        if not isinstance(rule, dict) or (rule.get("family"), rule.get("table")) != (fam, NFT_TABLE):
            continue
        expr = rule.get("expr") or []
        if not _is_drop(expr):
            continue
        matches, chain = _matches(expr), rule.get("chain")
        if chain == "antispoof":
            from_vm += _packets(expr)
        elif chain == "prerouting" and any(_saddr_in(m, "downstream", fam) for m in matches):
            from_uplink += _packets(expr)
        elif chain == "forward" and any(_oifgroup_is(m, VIF_GROUP) for m in matches):
            to_vm += _packets(expr)
    return DropCounters(from_vm, from_uplink, to_vm)


def xtables_drop_counters(save_text: str, family: Family) -> DropCounters:
    """:class:`DropCounters` from ``ip(6)tables-legacy-save -c`` output (every table).

    ``QBS-ANTISPOOF-VIF`` (raw): its ``-j DROP``; ``QBS-ANTISPOOF`` (raw):
    ``--match-set qbs-downstream4|6 src -j DROP``; ``QBS-FORWARD-BASE``
    (filter): ``-m devgroup --dst-group 0x2 -j DROP``. Rule lines start with
    ``[packets:bytes]``.
    """
    downstream = f"qbs-downstream{family}"
    table = ""
    from_vm = from_uplink = to_vm = 0
    for line in save_text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
            continue
        if not line.startswith("["):
            continue
        counters, _, rule = line.partition(" ")
        words = rule.split()
        if len(words) < 2 or words[0] != "-A" or words[-2:] != ["-j", "DROP"]:
            continue
        try:
            packets = int(counters.strip("[]").split(":")[0])
        except ValueError:
            continue
        where = (table, words[1])
        if where == XT_ANTISPOOF:
            from_vm += packets
        elif where == XT_PREROUTING and _xt_option(words, "--match-set") == [downstream, "src"]:
            from_uplink += packets
        elif where == XT_FORWARD and _xt_option(words, "--dst-group") == [hex(VIF_GROUP)]:
            to_vm += packets
    return DropCounters(from_vm, from_uplink, to_vm)


def _xt_option(words: list[str], option: str) -> list[str] | None:
    """The values of a non-negated option (up to the next option), ``None`` if absent or negated."""
    if option not in words:
        return None
    i = words.index(option)
    if i > 0 and words[i - 1] == "!":
        return None
    out = []
    for w in words[i + 1:]:
        if w.startswith("-") or w == "!":
            break
        out.append(w)
    return out


def drop_counters(backend: Backend, family: Family, run: Run, tools: FirewallTools | None = None) -> DropCounters:
    """The drop counters of ``family`` in the namespace ``run`` executes in, for either backend.

    Raises ``ValueError`` when the tool's output cannot be read.
    """
    tools = tools or FirewallTools()
    if backend == "nftables":
        return nft_drop_counters(run((tools.nft, "-j", "list", "ruleset")), family)
    save = tools.ip6tables_save if family == 6 else tools.iptables_save
    return xtables_drop_counters(run((save, "-c")), family)


def _nft_value(v: Any) -> tuple[str, str | None]:
    """(network, interface) of one element as nft's JSON shows it."""
    if isinstance(v, dict) and "elem" in v:
        inner = v["elem"]
        v = inner.get("val", inner) if isinstance(inner, dict) else inner
    if isinstance(v, dict) and "concat" in v:
        dev, addr = v["concat"]
        return _nft_value(addr)[0], str(dev)
    if isinstance(v, dict) and "prefix" in v:
        return f"{v['prefix']['addr']}/{v['prefix']['len']}", None
    if isinstance(v, dict) and "range" in v:
        low, high = v["range"]
        return f"{low}-{high}", None
    return str(v), None


def nft_set_members(ruleset_json: str) -> tuple[SetMember, ...]:
    """Every element of every set of the ``qubes`` tables, from ``nft -j list ruleset``, sorted.

    Set names carry the family: ``ip allowed``, ``ip6 downstream-nets``.
    """
    out = []
    for item in _nft_items(ruleset_json):
        s = item.get("set")
        if not isinstance(s, dict) or s.get("table") != NFT_TABLE:
            continue
        for v in s.get("elem") or []:
            network, dev = _nft_value(v)
            out.append(SetMember(f"{s.get('family')} {s.get('name')}", network, dev))
    return tuple(sorted(out))


def ipset_members(ipset_list: str) -> tuple[SetMember, ...]:
    """Members of the package's ``qbs-*`` sets from ``ipset list`` output, sorted.

    ``hash:net,iface`` members read ``10.137.0.11,vif11.0``; ``hash:net``
    ones ``10.137.0.11`` (a prefix only when it is not a single address).
    """
    out: list[SetMember] = []
    name, in_members = "", False
    for line in ipset_list.splitlines():
        if line.startswith("Name:"):
            name, in_members = line.partition(":")[2].strip(), False
        elif line.startswith("Members:"):
            in_members = True
        elif in_members and line.strip() and name.startswith("qbs-"):
            parts = line.split()[0].split(",")
            out.append(SetMember(name, parts[0], parts[1] if len(parts) > 1 else None))
    return tuple(sorted(out))


def set_members(backend: Backend, run: Run, tools: FirewallTools | None = None) -> tuple[SetMember, ...]:
    """Every element of the package's sets, both families, in the namespace ``run`` executes in."""
    tools = tools or FirewallTools()
    if backend == "nftables":
        return nft_set_members(run((tools.nft, "-j", "list", "ruleset")))
    return ipset_members(run((tools.ipset, "list")))


def member_mentions(member: SetMember, address: IPAddr, dev: str) -> bool:
    """Whether a set member is about ``address`` (a host prefix counts) or the device ``dev``."""
    if member.dev == dev:
        return True
    try:
        net = ip_network(member.network, strict=False)
    except ValueError:
        return False
    return net.prefixlen == net.max_prefixlen and net.network_address == address


# --- other parsers ----------------------------------------------------------------------


def dig_answers(stdout: str) -> tuple[str, ...]:
    """The records ``dig +short`` printed (comment lines such as timeouts dropped)."""
    return tuple(line.strip() for line in stdout.splitlines() if line.strip() and not line.startswith(";"))


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


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _int(text: str) -> int:
    try:
        return int(_last_line(text))
    except ValueError:
        return -1


# --- checks ------------------------------------------------------------------


class Checker:
    """Runs the checks of one lab. Each check method returns one :class:`CheckResult` (or a list)."""

    def __init__(
        self, topo: Topology, shell: Shell, tools: Tools, backend: Backend, tokens: Callable[[], str]
    ) -> None:
        self.topo = topo
        self.shell = shell
        self.tools = tools
        #: The firewall backend the lab configured the netvm's tools with.
        self.backend = backend
        #: Fresh unique strings for probe payloads (so runs never count each other's packets).
        self.tokens = tokens

    # small steps ------------------------------------------------------------

    def _run(self, ns: str, argv: Sequence[str], timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
        return self.shell.run(ns, argv, timeout=timeout)

    def _in_netvm(self, argv: Sequence[str]) -> str:
        proc = self._run(self.topo.netvm_ns, argv)
        if proc.returncode != 0:
            log.warning("%s exited %d: %s", " ".join(argv), proc.returncode, _last_line(proc.stderr))
        return proc.stdout

    def counters(self, family: Family) -> DropCounters:
        """The netvm's drop counters; all -1 (so no check passes on them) when they cannot be read."""
        try:
            return drop_counters(self.backend, family, self._in_netvm, self.tools.firewall)
        except ValueError as exc:
            log.warning("cannot read the %s drop counters: %s", self.backend, exc)
            return DropCounters(-1, -1, -1)

    def _ping(self, vm: Vm, dst: IPAddr, wait: float) -> bool:
        return self._run(vm.ns, self.tools.probe("ping", str(dst), "--wait", str(wait))).returncode == 0

    def _dig(self, vm: Vm, server: IPv4Address, tcp: bool) -> tuple[str, ...]:
        argv = [self.tools.dig, "+short", "+tries=1", "+time=2", f"@{server}", TEST_NAME, "A"]
        if tcp:
            argv.insert(1, "+tcp")
        return dig_answers(self._run(vm.ns, argv).stdout)

    def _send(self, ns: str, src: IPAddr, dst: IPAddr, token: str) -> None:
        self._run(ns, probe.send_udp_argv(src, dst, PROBE_PORT, token, python=self.tools.python))

    def _server_count(self, token: str) -> int:
        proc = self._run(self.topo.uplink_ns, self.tools.probe("query", str(UPLINK_PEER), str(PROBE_PORT), token))
        return _int(proc.stdout)

    def _control(self, vm: Vm, family: Family) -> int:
        """``vm`` sends genuine datagrams from its own address to the uplink's server: how many arrived."""
        token = self.tokens()
        self._send(vm.ns, self._addr(vm, family), UPLINK6_PEER if family == 6 else UPLINK_PEER, token)
        return poll(lambda: self._server_count(token), lambda n: n >= PROBE_PACKETS)

    @contextlib.contextmanager
    def _listening(self, vm: Vm, token: str) -> Iterator[Callable[[], int]]:
        """A UDP listener in ``vm`` counting ``token``; yields the function that stops it and returns the count."""
        listener = self.shell.popen(vm.ns, probe.listen_udp_argv(PROBE_PORT, token, python=self.tools.python))
        try:
            if listener.stdout is None or listener.stdout.readline().strip() != "ready":
                raise OSError(f"the listener in {vm.name} did not start")

            def stop() -> int:
                out, _ = listener.communicate(input="", timeout=EVIDENCE_TIMEOUT)
                return _int(out)

            yield stop
        finally:
            if listener.poll() is None:
                listener.kill()
                listener.wait()

    def _other_vm(self, vm: Vm, family: Family) -> Vm | None:
        for other in self.topo.vms:
            if other != vm and (family == 4 or other.ipv6 is not None):
                return other
        return None

    @staticmethod
    def _addr(vm: Vm, family: Family) -> IPAddr:
        if family == 4:
            return vm.ipv4
        if vm.ipv6_self is None:
            raise ValueError(f"{vm.name} has no IPv6 address")
        return vm.ipv6_self

    # checks -----------------------------------------------------------------

    def ping(self, vm: Vm, dst: IPAddr, check: str) -> CheckResult:
        ok = self._ping(vm, dst, 2)
        return CheckResult(check, vm.name, ok, f"ping {dst} {'answered' if ok else 'got no answer'}")

    def tcp_nat(self, vm: Vm, family: Family) -> CheckResult:
        dst, want = (UPLINK6_PEER, NETVM_UPLINK6) if family == 6 else (UPLINK_PEER, NETVM_UPLINK)
        check = f"tcp{'6' if family == 6 else ''} to uplink, source NATed"
        proc = self._run(vm.ns, self.tools.probe("connect", str(dst), str(PROBE_PORT)))
        if proc.returncode != 0:
            return CheckResult(check, vm.name, False, f"connect to {dst}: {_last_line(proc.stderr) or 'failed'}")
        seen = _last_line(proc.stdout)
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

    def no_vm_to_vm(self, vm: Vm, other: Vm, family: Family = 4) -> CheckResult:
        """``vm`` sends to ``other``: nothing arrives, the forward chain's drop counts it, and the
        same VM's datagrams to the uplink right after do arrive."""
        check = "no vm-to-vm IPv6" if family == 6 else "no vm-to-vm"
        src, dst = self._addr(vm, family), self._addr(other, family)
        token = self.tokens()
        before = self.counters(family)
        try:
            with self._listening(other, token) as stop:
                self._send(vm.ns, src, dst, token)
                genuine = self._control(vm, family)
                dropped = poll(lambda: (self.counters(family) - before).to_vm, lambda n: n >= PROBE_PACKETS)
                arrived = stop()
        except (OSError, subprocess.SubprocessError) as exc:
            return CheckResult(check, vm.name, False, str(exc))
        ok = arrived == 0 and dropped >= PROBE_PACKETS and genuine >= PROBE_PACKETS
        detail = (
            f"{src} -> {dst} ({other.name}): {arrived} arrived, {dropped} dropped by the forward chain; "
            f"to the uplink right after: {genuine} of {PROBE_PACKETS} arrived"
        )
        return CheckResult(check, vm.name, ok, detail)

    def forged_from_vm(self, vm: Vm, family: Family) -> CheckResult:
        """``vm`` sends from an address that is not its own: nothing reaches the uplink."""
        check = "forged IPv6 source dropped" if family == 6 else "forged source dropped"
        other = self._other_vm(vm, family)
        own = self._addr(vm, family)
        forged: IPAddr = self._addr(other, family) if other is not None else ip_address(int(own) + 200)
        dst = UPLINK6_PEER if family == 6 else UPLINK_PEER
        token = self.tokens()
        before = self.counters(family)
        self._send(vm.ns, forged, dst, token)
        # Both went the same way, forged first: once the genuine ones are in,
        # the forged ones would be too.
        genuine = self._control(vm, family)
        arrived = self._server_count(token)
        dropped = (self.counters(family) - before).forged_from_vm
        ok = arrived == 0 and genuine >= PROBE_PACKETS and dropped >= PROBE_PACKETS
        detail = (
            f"from {forged}: {arrived} arrived at the uplink, {dropped} dropped by anti-spoofing; "
            f"from its own {own}: {genuine} of {PROBE_PACKETS} arrived"
        )
        return CheckResult(check, vm.name, ok, detail)

    def forged_from_uplink(self, target: Vm, family: Family) -> CheckResult:
        """The uplink sends to ``target`` from a VM address: the netvm drops it on arrival."""
        check = "uplink-forged VM IPv6 address dropped" if family == 6 else "uplink-forged VM address dropped"
        other = self._other_vm(target, family) or target
        forged, dst = self._addr(other, family), self._addr(target, family)
        token = self.tokens()
        before = self.counters(family)
        try:
            with self._listening(target, token) as stop:
                self._send(self.topo.uplink_ns, forged, dst, token)
                dropped = poll(lambda: (self.counters(family) - before).forged_from_uplink,
                               lambda n: n >= PROBE_PACKETS)
                arrived = stop()
        except (OSError, subprocess.SubprocessError) as exc:
            return CheckResult(check, target.name, False, str(exc))
        ok = arrived == 0 and dropped >= PROBE_PACKETS
        detail = f"{forged} -> {dst}: {arrived} arrived at {target.name}, {dropped} dropped by anti-spoofing"
        return CheckResult(check, target.name, ok, detail)

    def no_ipv6_without_address(self, vm: Vm) -> CheckResult:
        """A VM with no IPv6 address in XenStore gets no IPv6 through, whatever it configures."""
        before = self.counters(6)
        reached = self._ping(vm, UPLINK6_PEER, 1)
        dropped = (self.counters(6) - before).forged_from_vm
        genuine = self._control(vm, 4)
        detail = (
            f"ping {UPLINK6_PEER} from {vm.ipv6_self} {'answered' if reached else 'got no answer'}, "
            f"{dropped} dropped by anti-spoofing; IPv4 to the uplink right after: {genuine} of {PROBE_PACKETS} arrived"
        )
        ok = not reached and dropped >= 1 and genuine >= PROBE_PACKETS
        return CheckResult("no IPv6 for an IPv4-only VM", vm.name, ok, detail)

    def offline_leftovers(self, vm: Vm) -> list[CheckResult]:
        """After offline: no route, gateway address, neighbour or set member of ``vm`` is left."""
        ip = self.tools.ip
        vm_addrs: list[IPAddr] = [vm.ipv4] + ([vm.ipv6] if vm.ipv6 is not None else [])
        shown = {str(a) for a in vm_addrs}
        routes = route_destinations(self._in_netvm((ip, "-o", "route", "show")))
        routes += route_destinations(self._in_netvm((ip, "-o", "-6", "route", "show")))
        left_routes = [r for r in routes if r.split("/")[0] in shown]
        # The vif itself may be gone by now (netback removes it): then so is every address on it.
        addr_proc = self._run(self.topo.netvm_ns, (ip, "-o", "addr", "show", "dev", vm.vif))
        gateways = {f"{GATEWAY}/32", f"{GATEWAY6}/128"}
        left_addrs = [a for a in addresses_of(addr_proc.stdout) if a in gateways]
        neigh = neighbour_addresses(self._in_netvm((ip, "neigh", "show", "nud", "permanent")))
        neigh += neighbour_addresses(self._in_netvm((ip, "-6", "neigh", "show", "nud", "permanent")))
        left_neigh = [n for n in neigh if n in shown]
        try:
            members = set_members(self.backend, self._in_netvm, self.tools.firewall)
            left_members = [
                f"{m.set}:{m.network}{',' + m.dev if m.dev else ''}"
                for m in members if any(member_mentions(m, a, vm.vif) for a in vm_addrs)
            ]
        except ValueError as exc:
            left_members = [f"(cannot read the sets: {exc})"]

        def row(check: str, left: list[str], what: str) -> CheckResult:
            return CheckResult(check, vm.name, not left, f"left: {' '.join(left)}" if left else f"no {what} left")

        return [
            row("offline: routes gone", left_routes, "route to the VM"),
            row("offline: gateway address gone", left_addrs, f"gateway address on {vm.vif}"),
            row("offline: neighbour gone", left_neigh, "permanent neighbour entry"),
            row("offline: set entries gone", left_members, f"{self.backend} set element"),
        ]
