"""Firewall backend on legacy xtables through python-iptables (``iptc``), and ipset.

Layout (Qubes 4.0 names where Qubes 4.0 had the chain): a logical base
chain becomes a chain of ours jumped from the top of the builtin chain of
its hook, in the table its type and priority select; a logical set becomes
an ipset per family (``qbs-allowed4``: ``hash:net,iface``; the others
``hash:net``, which hold single addresses and networks alike).

======================  ============  =====================================
logical (table qubes)   xtables       iptables chain
======================  ============  =====================================
prerouting              raw           ``QBS-ANTISPOOF`` (from PREROUTING)
antispoof               raw           ``QBS-ANTISPOOF-VIF``
downstream-out          mangle        ``QBS-DOWNSTREAM-OUT`` (from POSTROUTING)
postrouting             nat           ``QBS-POSTROUTING`` (from POSTROUTING)
input                   filter        ``QBS-INPUT`` (from INPUT)
_icmpv6                 filter        ``QBS-INPUT-ICMPV6``
forward                 filter        ``QBS-FORWARD-BASE`` (from FORWARD)
custom-input            filter        ``QBS-INPUT-ADMIN`` (reserved)
custom-forward          filter        ``QBS-FORWARD`` (reserved)
services                nat           ``PR-QBS-SERVICES`` (reserved, from PREROUTING)
dnat-dns                nat           ``PR-QBS`` (from PREROUTING)
dns-guard               filter        ``QBS-DNS`` (from FORWARD, first)
======================  ============  =====================================

Facts this module is built around:

* ``iptc`` commits a whole table in one ``setsockopt``: a reader sees the
  old table or the new one, never a half-written chain.
* Commits from several processes lose each other's rules unless they are
  serialised: every read-modify-commit holds ``flock`` on the xtables lock
  file (the same lock ``iptables -w`` takes) and refreshes the table after
  taking it.
* An ``accept`` in a nftables base chain ends only that chain; ``ACCEPT``
  ends the whole xtables table. In the raw and mangle tables, where other
  rules may follow ours, an accept is rendered as ``RETURN`` (back to the
  builtin chain after our jump); in the tables whose policy we set it is
  ``ACCEPT``.
* libxtables registers a multi-family extension (``MASQUERADE``, ``DNAT``
  ...) for the first family that loads it; python-iptables then cannot
  build it for the other family in that process (python-iptables issues
  #316, #325). A ruleset with extension targets is applied one family per
  forked child, so no process of ours (a resident agent included) ever
  loads one; the anti-spoofing ruleset of every event has none.
* xtables has no flow offload: the ``FLOWOFFLOAD`` target exists only in
  OpenWrt's kernel patches, never in Linux itself, and an nftables
  flowtable beside legacy xtables would take established packets past this
  backend's chains. :meth:`IptablesBackend.flow_offload_missing` says so,
  and the flow offload intents are no-ops here.
* ``import iptc`` runs ``ldconfig`` to find the extensions unless
  ``XTABLES_LIBDIR`` is set, and pulls setuptools in through its distutils
  shim: :func:`load_iptc` avoids both.
"""

from __future__ import annotations

import glob
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

from ..core.errors import KernelError
from ..core.firewall import (
    PRIORITY,
    SET_NAMES,
    Accept,
    Addr,
    Chain,
    CtState,
    Dnat,
    DPort,
    Drop,
    Family,
    FlowOffload,
    FlowtableDevice,
    Goto,
    IcmpType,
    IfGroup,
    IfName,
    InSet,
    Jump,
    Masquerade,
    Proto,
    Reject,
    Rule,
    Ruleset,
    SetElement,
    SetName,
    Snat,
    Table,
)
from .ipset import IpSets
from .locks import file_lock
from .verified import VerifiedRulesets
from .xtables_state import tables_digest

log = logging.getLogger(__name__)

_LIBDIR_CANDIDATES = ("/usr/lib/x86_64-linux-gnu/xtables", "/usr/lib/*/xtables", "/usr/lib64/xtables",
                      "/usr/lib/xtables")


@dataclass(frozen=True)
class XtChain:
    table: str
    name: str
    #: Builtin chain our jump stands in, and the base chain's priority (orders
    #: our jumps there); ``None`` for a chain only reached from ours.
    builtin: str | None = None
    priority: int = 0


#: (logical table, logical chain) -> where it lives in xtables.
NAMES: dict[tuple[str, str], XtChain] = {
    ("qubes", "prerouting"): XtChain("raw", "QBS-ANTISPOOF", "PREROUTING", -300),
    ("qubes", "antispoof"): XtChain("raw", "QBS-ANTISPOOF-VIF"),
    ("qubes", "downstream-out"): XtChain("mangle", "QBS-DOWNSTREAM-OUT", "POSTROUTING", -300),
    ("qubes", "postrouting"): XtChain("nat", "QBS-POSTROUTING", "POSTROUTING", 100),
    ("qubes", "input"): XtChain("filter", "QBS-INPUT", "INPUT", 0),
    ("qubes", "_icmpv6"): XtChain("filter", "QBS-INPUT-ICMPV6"),
    ("qubes", "forward"): XtChain("filter", "QBS-FORWARD-BASE", "FORWARD", 0),
    ("qubes", "custom-input"): XtChain("filter", "QBS-INPUT-ADMIN"),
    ("qubes", "custom-forward"): XtChain("filter", "QBS-FORWARD"),
    ("qubes", "services"): XtChain("nat", "PR-QBS-SERVICES", "PREROUTING", -99),
    ("qubes", "dnat-dns"): XtChain("nat", "PR-QBS", "PREROUTING", -100),
    ("qubes", "dns-guard"): XtChain("filter", "QBS-DNS", "FORWARD", -1),
    ("qubes-nat", "antispoof"): XtChain("raw", "QBS-NAT-ANTISPOOF", "PREROUTING", -300),
    ("qubes-nat", "dnat"): XtChain("nat", "QBS-NAT-PRE", "PREROUTING", -100),
    ("qubes-nat", "snat"): XtChain("nat", "QBS-NAT-POST", "POSTROUTING", 100),
}
#: ``struct ip6t_ip6`` flag: the protocol field is to be tested (linux/netfilter_ipv6/ip6_tables.h).
IP6T_F_PROTO = 0x01
#: Tables whose builtin chains' policy is ours to set; elsewhere an accept is a RETURN.
POLICY_TABLES = frozenset({"filter"})
_REJECT = {"icmp-host-prohibited": "icmp-host-prohibited", "icmp-port-unreachable": "icmp-port-unreachable",
           "icmp6-adm-prohibited": "icmp6-adm-prohibited", "tcp-reset": "tcp-reset"}
_EXTENSION_TARGETS = (Masquerade, Dnat, Snat, Reject)


def ipset_name(set_name: SetName, family: Family) -> str:
    return f"qbs-{set_name}{family}"


def ipset_type(set_name: SetName) -> str:
    return "hash:net,iface" if set_name == "allowed" else "hash:net"


def load_iptc(libdir: str | None = None) -> ModuleType:
    """Import ``iptc`` on first use, without ``ldconfig`` and without setuptools.

    python-iptables takes its extension directory only from the environment,
    when imported; so ``XTABLES_LIBDIR`` is set here, once, if not given.
    """
    loaded: ModuleType | None = sys.modules.get("iptc")
    if loaded is not None:
        return loaded
    if libdir is None:
        for pattern in _LIBDIR_CANDIDATES:
            found = sorted(glob.glob(pattern))
            if found:
                libdir = found[0]
                break
    if libdir is not None:
        os.environ.setdefault("XTABLES_LIBDIR", libdir)
    # setuptools' .pth hook serves "distutils" from setuptools, which costs
    # ~80 ms of imports on Python 3.11; iptc.util only wants get_python_lib
    # from it, which iptc's own sysconfig fallback answers as well.
    hooks = [f for f in sys.meta_path if type(f).__module__ == "_distutils_hack"]
    for finder in hooks:
        sys.meta_path.remove(finder)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import iptc
    except Exception as exc:  # ImportError, or XTablesError from its ldconfig probe
        raise KernelError(f"cannot load python-iptables: {exc}") from exc
    finally:
        sys.meta_path[:0] = hooks
    module: ModuleType = iptc
    return module


def _where(table: str, chain: str) -> XtChain:
    try:
        return NAMES[(table, chain)]
    except KeyError:
        raise KernelError(f"no iptables layout for chain {chain} of table {table}") from None


def _xt_table(table: Table) -> Iterator[tuple[str, list[Chain]]]:
    by: dict[str, list[Chain]] = {}
    for c in table.chains:
        by.setdefault(_where(table.name, c.name).table, []).append(c)
    yield from by.items()


class _Encoder:
    """Builds iptc rule objects; every unknown option raises (never a silently wider rule)."""

    def __init__(self, iptc: ModuleType, family: Family, table: str, xt_table: str) -> None:
        self.iptc, self.family, self.table, self.xt_table = iptc, family, table, xt_table

    def _new(self) -> Any:
        return self.iptc.Rule6() if self.family == 6 else self.iptc.Rule()

    def rules(self, r: Rule) -> list[Any]:
        if r.verdict is None:
            return []  # a counting rule: xtables counts every rule anyway
        icmp = [p for p in r.match if isinstance(p, IcmpType)]
        types: list[int | None] = list(icmp[0].types) if icmp else [None]
        return [self._one(r, t) for t in types]

    def _one(self, r: Rule, icmp_type: int | None) -> Any:
        rule = self._new()
        groups: dict[str, str] = {}
        for p in r.match:
            if isinstance(p, IfName):
                value = ("!" if p.negate else "") + _xt_ifname(p.name)
                if p.direction == "in":
                    rule.in_interface = value
                else:
                    rule.out_interface = value
            elif isinstance(p, IfGroup):
                key = "src-group" if p.direction == "in" else "dst-group"
                groups[key] = ("!" if p.negate else "") + f"{p.group:#x}"
            elif isinstance(p, Addr):
                value = ("!" if p.negate else "") + p.network
                if p.direction == "src":
                    rule.src = value
                else:
                    rule.dst = value
            elif isinstance(p, Proto):
                rule.protocol = ("!" if p.negate else "") + p.proto
                if self.family == 6 and p.negate:
                    # python-iptables clears IP6T_F_PROTO for "!proto", and
                    # the kernel then skips the test: the rule would match
                    # every protocol. The flag says "test the protocol".
                    rule.entry.ipv6.flags |= IP6T_F_PROTO
            elif isinstance(p, DPort):
                rule.protocol = p.proto
                rule.create_match(p.proto).set_parameter("dport", str(p.port))
            elif isinstance(p, IcmpType):
                if self.family == 6:
                    rule.protocol = "icmpv6"
                    rule.create_match("icmp6").set_parameter("icmpv6-type", str(icmp_type))
                else:
                    rule.protocol = "icmp"
                    rule.create_match("icmp").set_parameter("icmp-type", str(icmp_type))
            elif isinstance(p, CtState):
                rule.create_match("conntrack").set_parameter("ctstate", ",".join(s.upper() for s in p.states))
            elif isinstance(p, InSet):
                flags = "src,src" if p.with_interface else p.direction
                rule.create_match("set").set_parameter("match-set", [ipset_name(p.set, self.family), flags])
        if groups:
            match = rule.create_match("devgroup")
            for key, value in groups.items():
                match.set_parameter(key, value)
        self._target(rule, r)
        return rule

    def _target(self, rule: Any, r: Rule) -> None:
        v = r.verdict
        if isinstance(v, Accept):
            rule.create_target("ACCEPT" if self.xt_table in POLICY_TABLES or self.xt_table == "nat" else "RETURN")
        elif isinstance(v, Drop):
            rule.create_target("DROP")
        elif isinstance(v, Reject):
            rule.create_target("REJECT").set_parameter("reject-with", _REJECT[v.kind])
        elif isinstance(v, Jump):
            rule.create_target(_where(self.table, v.chain).name)
        elif isinstance(v, Goto):
            rule.create_target(_where(self.table, v.chain).name, goto=True)
        elif isinstance(v, Dnat):
            rule.create_target("DNAT").set_parameter("to-destination", v.to)
        elif isinstance(v, Snat):
            rule.create_target("SNAT").set_parameter("to-source", v.to)
        elif isinstance(v, Masquerade):
            rule.create_target("MASQUERADE")
        # Targets such as MASQUERADE fill in defaults only in final_check
        # (called at commit); without it a rule read back from the kernel
        # never equals the one built here.
        rule.target.final_check()

    def jump(self, name: str) -> Any:
        rule = self._new()
        rule.create_target(name)
        return rule


class IptablesBackend:
    """:class:`~vif_hotplug.kernel.firewall_backend.FirewallBackend` on legacy xtables and ipset."""

    name: Literal["iptables"] = "iptables"

    def __init__(self, lock_path: str, lock_timeout: float, libdir: str | None = None,
                 verified_path: str | None = None) -> None:
        self._lock_path = lock_path
        self._lock_timeout = lock_timeout
        self._libdir = libdir
        self._sets = IpSets()
        #: Rulesets found complete, with the digest of the tables (and which
        #: of their ipsets existed) they were found in.
        self._verified = VerifiedRulesets(verified_path)

    def close(self) -> None:
        self._sets.close()

    def _lock(self) -> AbstractContextManager[None]:
        return file_lock(self._lock_path, self._lock_timeout, "xtables lock")

    # --- rulesets ---------------------------------------------------------------------

    def ensure(self, ruleset: Ruleset) -> bool:
        if ruleset.netns is not None:
            return "changed" in self._isolated(ruleset, lambda b, part: ["changed"] if b._ensure_here(part) else [])
        # The digest costs microseconds; loading python-iptables and decoding
        # the tables costs tens of milliseconds: an unchanged ruleset is not
        # read again.
        before = self._state(ruleset)
        if self._verified.holds(ruleset, before):
            return False
        changed = "changed" in self._isolated(ruleset, lambda b, part: ["changed"] if b._ensure_here(part) else [])
        # Trusted only when found complete and nothing moved while it was read.
        if not changed and self._state(ruleset) == before:
            self._verified.put(ruleset, before)
        return changed

    def _state(self, ruleset: Ruleset) -> str:
        """A digest of the xtables tables ``ruleset`` lives in, and which of its ipsets exist."""
        try:
            digest = tables_digest((t.family, xt_table) for t in ruleset.tables for xt_table, _ in _xt_table(t))
            sets = [self._sets.exists(ipset_name(s, t.family)) for t in ruleset.tables for s in t.sets]
        except OSError as exc:
            raise KernelError(f"cannot read the xtables tables of {ruleset.what}: {exc.strerror}") from exc
        return f"xtables {digest} sets {''.join('1' if x else '0' for x in sets)}"

    def drift(self, ruleset: Ruleset) -> list[str]:
        return self._isolated(ruleset, lambda b, part: b._drift_here(part))

    def _isolated(self, ruleset: Ruleset, fn: Callable[[IptablesBackend, Ruleset], list[str]]) -> list[str]:
        """``fn`` here, or once per family in a forked child (in the ruleset's namespace) when needed."""
        if ruleset.netns is None and not self._needs_isolation(ruleset):
            return fn(self, ruleset)
        from .forked import call_in_child

        out: list[str] = []
        for family in sorted({t.family for t in ruleset.tables}):
            part = Ruleset(ruleset.what, tuple(t for t in ruleset.tables if t.family == family))
            backend = IptablesBackend(self._lock_path, self._lock_timeout, self._libdir)
            out += call_in_child(lambda b=backend, p=part: fn(b, p), netns=ruleset.netns,  # type: ignore[misc]
                                 what=f"iptables {ruleset.what}")
        return out

    @staticmethod
    def _needs_isolation(ruleset: Ruleset) -> bool:
        # Any extension target, even of one family: once loaded into this
        # (possibly long-lived) process it would spoil the other family later.
        return any(isinstance(r.verdict, _EXTENSION_TARGETS) for t in ruleset.tables for c in t.chains
                   for r in c.rules)

    def _ensure_here(self, ruleset: Ruleset) -> bool:
        changed = self._ensure_sets(ruleset)
        with self._lock():
            for t in ruleset.tables:
                for xt_table, chains in _xt_table(t):
                    changed |= bool(self._sync_table(t, xt_table, chains, commit=True))
        return changed

    def _ensure_sets(self, ruleset: Ruleset) -> bool:
        changed = False
        for t in ruleset.tables:
            for s in t.sets:
                name = ipset_name(s, t.family)
                if not self._sets.exists(name):
                    self._sets.ensure_set(name, ipset_type(s), t.family)
                    changed = True
        return changed

    def _drift_here(self, ruleset: Ruleset) -> list[str]:
        out = [f"set {ipset_name(s, t.family)} missing" for t in ruleset.tables for s in t.sets
               if not self._sets.exists(ipset_name(s, t.family))]
        if out:
            # python-iptables cannot even build a rule naming a missing set.
            return [*out, f"{ruleset.what} rules not compared while its sets are missing"]
        for t in ruleset.tables:
            for xt_table, chains in _xt_table(t):
                out += self._sync_table(t, xt_table, chains, commit=False)
        return out

    def _table(self, family: Family, name: str) -> Any:
        iptc = load_iptc(self._libdir)
        table = iptc.Table6(name) if family == 6 else iptc.Table(name)
        table.autocommit = False
        table.refresh()
        return table

    def _sync_table(self, t: Table, xt_table: str, chains: list[Chain], commit: bool) -> list[str]:
        """Changes that make ``xt_table`` hold ``chains``, applied in one commit when ``commit``."""
        iptc = load_iptc(self._libdir)
        fam = "ip6tables" if t.family == 6 else "iptables"
        try:
            table = self._table(t.family, xt_table)
            enc = _Encoder(iptc, t.family, t.name, xt_table)
            why: list[str] = []
            # Every chain exists before a rule names it as a target.
            for c in chains:
                where = _where(t.name, c.name)
                if c.kind != "absent" and not table.is_chain(where.name):
                    table.create_chain(where.name)
                    why.append(f"{fam} -t {xt_table} {where.name} missing")
            for c in chains:
                where = _where(t.name, c.name)
                label = f"{fam} -t {xt_table} {where.name}"
                if c.kind == "absent":
                    continue
                if c.kind != "reserved":
                    chain = iptc.Chain(table, where.name)
                    want = [x for r in c.rules for x in enc.rules(r)]
                    if chain.rules != want:
                        chain.flush()
                        for rule in want:
                            chain.append_rule(rule)
                        why.append(f"{label} differs")
                if where.builtin is not None and self._place_jumps(iptc, table, enc, t.name, where.builtin, c):
                    why.append(f"{fam} -t {xt_table} {where.builtin}: jump to {where.name} not at its place")
                if c.hook is not None and where.builtin is not None and _sets_policy(c, xt_table):
                    builtin = iptc.Chain(table, where.builtin)
                    policy = c.hook.policy.upper()
                    if builtin.get_policy().name != policy:
                        builtin.set_policy(policy)
                        why.append(f"{fam} -t {xt_table} {where.builtin}: policy is not {policy}")
            for c in chains:
                where = _where(t.name, c.name)
                if c.kind == "absent" and table.is_chain(where.name):
                    self._drop_chain(iptc, table, enc, where)
                    why.append(f"{fam} -t {xt_table} {where.name} should not exist")
            if why and commit:
                table.commit()
                log.debug("committed %s table %s: %s", fam, xt_table, "; ".join(why))
            else:
                table.refresh()  # drop the handle's pending state
            return why
        except (iptc.IPTCError, iptc.XTablesError, ValueError) as exc:
            # ValueError: an extension refused a parameter (a set match naming a missing ipset).
            raise KernelError(f"{fam} -t {xt_table}: {exc}") from exc

    @staticmethod
    def _our_jumps(builtin: str, table: str, xt_table: str) -> list[XtChain]:
        """Every base chain of ours jumped from ``builtin``, in priority order."""
        found = [x for (t, _), x in NAMES.items() if t == table and x.table == xt_table and x.builtin == builtin]
        return sorted(found, key=lambda x: (x.priority, x.name))

    def _place_jumps(self, iptc: ModuleType, table: Any, enc: _Encoder, logical_table: str, builtin: str,
                     chain: Chain) -> bool:
        """Keep our jumps together at the top of ``builtin``, in priority order.

        A jump that something else pushed down would let the rules above it
        bypass ours (an ACCEPT above the anti-spoofing jump): it moves back.
        Jumps of the other tools of this package stay, in their place.
        """
        ours = self._our_jumps(builtin, logical_table, enc.xt_table)
        names = {x.name for x in ours}
        target_name = _where(logical_table, chain.name).name
        bchain = iptc.Chain(table, builtin)
        rules = bchain.rules
        present = {r.target.name for r in rules if r.target.name in names and r == enc.jump(r.target.name)}
        present.add(target_name)
        want = [enc.jump(x.name) for x in ours if x.name in present]
        if rules[: len(want)] == want and sum(1 for r in rules if r.target.name in names) == len(want):
            return False
        for r in reversed(rules):
            if r.target.name in names:
                bchain.delete_rule(r)
        for position, rule in enumerate(want):
            bchain.insert_rule(rule, position=position)
        return True

    def _drop_chain(self, iptc: ModuleType, table: Any, enc: _Encoder, where: XtChain) -> None:
        if where.builtin is not None:
            bchain = iptc.Chain(table, where.builtin)
            for r in reversed(bchain.rules):
                if r.target.name == where.name:
                    bchain.delete_rule(r)
        chain = iptc.Chain(table, where.name)
        chain.flush()
        chain.delete()

    def describe(self, ruleset: Ruleset) -> list[str]:
        out = []
        for t in ruleset.tables:
            cmd = "ip6tables" if t.family == 6 else "iptables"
            out += [f"ipset create {ipset_name(s, t.family)} {ipset_type(s)} (if missing)" for s in t.sets]
            for c in t.chains:
                where = _where(t.name, c.name)
                head = f"{cmd} -t {where.table}"
                if c.kind == "absent":
                    out.append(f"{head} -X {where.name} (if present)")
                    continue
                out.append(f"{head} -N {where.name}" + (" (reserved: contents left alone)" if c.kind == "reserved"
                                                         else ""))
                if c.kind != "reserved":
                    for r in c.rules:
                        if r.verdict is None:
                            continue
                        text = _describe_rule(r, t, where.table)
                        icmp = [p for p in r.match if isinstance(p, IcmpType)]
                        for icmp_type in icmp[0].types if icmp else (None,):
                            out.append(f"{head} -A {where.name} {text.format(icmp_type) if icmp else text}")
                if where.builtin is not None:
                    out.append(f"{head} -I {where.builtin} -j {where.name} (kept among our jumps at the top)")
                if c.hook is not None and _sets_policy(c, where.table):
                    out.append(f"{head} -P {where.builtin} {c.hook.policy.upper()}")
        return out

    # --- set elements -------------------------------------------------------------------

    @staticmethod
    def _entry(e: SetElement) -> tuple[str, str | None]:
        return e.network, e.dev

    def add_element(self, e: SetElement) -> bool:
        return self._sets.add(ipset_name(e.set, e.family), e.family, self._entry(e))

    def remove_element(self, e: SetElement) -> bool:
        return self._sets.remove(ipset_name(e.set, e.family), e.family, self._entry(e))

    def element_present(self, e: SetElement) -> bool:
        return self._sets.test(ipset_name(e.set, e.family), e.family, self._entry(e))

    def elements(self, family: Family, set_name: SetName, dev: str | None = None) -> list[SetElement]:
        return [SetElement(family, set_name, net, name)
                for net, name in self._sets.members(ipset_name(set_name, family), dev)]

    # --- flow offload (none) -----------------------------------------------------------

    @staticmethod
    def flow_offload_missing() -> str | None:
        return ("the iptables backend has none (xtables' FLOWOFFLOAD target is an OpenWrt kernel patch, "
                "not in Linux)")

    @staticmethod
    def ensure_offload(f: FlowOffload) -> bool:
        return False

    @staticmethod
    def offload_drift(f: FlowOffload) -> list[str]:
        return []

    @staticmethod
    def add_flow_device(d: FlowtableDevice) -> bool:
        return False

    @staticmethod
    def remove_flow_device(d: FlowtableDevice) -> bool:
        return False

    @staticmethod
    def flow_device_present(d: FlowtableDevice) -> bool:
        return False

    # --- ownership ---------------------------------------------------------------------

    def owns_state(self) -> bool:
        return any(self._sets.exists(ipset_name(s, f)) for s in SET_NAMES for f in (4, 6))

    def remove_all(self) -> bool:
        """Our jumps, chains and ipsets go; reserved chains stay; INPUT/FORWARD policies back to ACCEPT."""
        iptc = load_iptc(self._libdir)
        changed = False
        self._verified.clear()
        with self._lock():
            for family in (4, 6):
                fam: Family = 4 if family == 4 else 6
                by_table: dict[str, list[XtChain]] = {}
                for (t, c), x in NAMES.items():
                    if t == "qubes" and c not in ("custom-input", "custom-forward", "services"):
                        by_table.setdefault(x.table, []).append(x)
                for xt_table, chains in by_table.items():
                    try:
                        table = self._table(fam, xt_table)
                        enc = _Encoder(iptc, fam, "qubes", xt_table)
                        dirty = False
                        for x in sorted(chains, key=lambda x: x.builtin is None):
                            if table.is_chain(x.name):
                                self._drop_chain(iptc, table, enc, x)
                                dirty = True
                        services = NAMES[("qubes", "services")]
                        if xt_table == services.table and table.is_chain(services.name):
                            # Qubes 4.0's chain for the administrator's port forwards: gone with
                            # its jump when nothing is in it, kept (and its jump) when something is.
                            if iptc.Chain(table, services.name).rules:
                                log.warning("iptables -t nat %s holds rules: left in place", services.name)
                            else:
                                self._drop_chain(iptc, table, enc, services)
                                dirty = True
                        if xt_table in POLICY_TABLES:
                            for builtin in ("INPUT", "FORWARD"):
                                bchain = iptc.Chain(table, builtin)
                                if bchain.get_policy().name != "ACCEPT":
                                    bchain.set_policy("ACCEPT")
                                    dirty = True
                        if dirty:
                            table.commit()
                            changed = True
                        else:
                            table.refresh()
                    except iptc.IPTCError as exc:
                        raise KernelError(f"iptables -t {xt_table}: {exc}") from exc
        for s in SET_NAMES:
            for fam in (4, 6):
                changed |= self._sets.destroy(ipset_name(s, 6 if fam == 6 else 4))
        return changed


def _sets_policy(c: Chain, xt_table: str) -> bool:
    """Only the main filter chains (filter priority) decide a builtin chain's policy;
    a guard running before them (the DNS tool's) has no say."""
    return c.hook is not None and xt_table in POLICY_TABLES and c.hook.priority == PRIORITY["filter"]


def _xt_ifname(name: str) -> str:
    """An interface name as xtables writes it: its prefix match is a trailing ``+``, nft's a ``*``."""
    return name[:-1] + "+" if name.endswith("*") else name


def _describe_rule(r: Rule, t: Table, xt_table: str) -> str:
    words: list[str] = []
    for p in r.match:
        neg = "! " if getattr(p, "negate", False) else ""
        if isinstance(p, IfName):
            words.append(f"{neg}{'-i' if p.direction == 'in' else '-o'} {_xt_ifname(p.name)}")
        elif isinstance(p, IfGroup):
            words.append(f"-m devgroup {neg}--{'src' if p.direction == 'in' else 'dst'}-group {p.group:#x}")
        elif isinstance(p, Addr):
            words.append(f"{neg}{'-s' if p.direction == 'src' else '-d'} {p.network}")
        elif isinstance(p, Proto):
            words.append(f"{neg}-p {p.proto}")
        elif isinstance(p, DPort):
            words.append(f"-p {p.proto} -m {p.proto} --dport {p.port}")
        elif isinstance(p, IcmpType):
            # One rule per type, as installed: the placeholder is filled in by describe().
            words.append("-p icmpv6 -m icmp6 --icmpv6-type {}" if t.family == 6 else "-p icmp -m icmp --icmp-type {}")
        elif isinstance(p, CtState):
            words.append(f"-m conntrack --ctstate {','.join(s.upper() for s in p.states)}")
        elif isinstance(p, InSet):
            flags = "src,src" if p.with_interface else p.direction
            words.append(f"-m set --match-set {ipset_name(p.set, t.family)} {flags}")
    v = r.verdict
    if isinstance(v, Accept):
        words.append("-j " + ("ACCEPT" if xt_table in POLICY_TABLES or xt_table == "nat" else "RETURN"))
    elif isinstance(v, Drop):
        words.append("-j DROP")
    elif isinstance(v, Reject):
        words.append(f"-j REJECT --reject-with {_REJECT[v.kind]}")
    elif isinstance(v, Jump):
        words.append(f"-j {_where(t.name, v.chain).name}")
    elif isinstance(v, Goto):
        words.append(f"-g {_where(t.name, v.chain).name}")
    elif isinstance(v, Dnat):
        words.append(f"-j DNAT --to-destination {v.to}")
    elif isinstance(v, Snat):
        words.append(f"-j SNAT --to-source {v.to}")
    elif isinstance(v, Masquerade):
        words.append("-j MASQUERADE")
    return " ".join(words)

