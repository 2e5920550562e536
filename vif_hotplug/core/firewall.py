"""Firewall intent as data, independent of any backend.

A rule is a tuple of predicates (what a packet must look like) and a verdict
(what happens to it). Chains, sets and tables use the *logical* names of
current Qubes' nftables layout (``prerouting``, ``antispoof``, ``allowed``,
...); each backend maps them onto its own objects and syntax
(:mod:`vif_hotplug.kernel.nftables_backend`,
:mod:`vif_hotplug.kernel.iptables_backend`), the way firewalld's
``ipXtables`` and ``nftables`` backends build different text from one call.

``str()`` of every value here is nft-like syntax with the logical names: it is
what ``--dry-run`` shows and the backend-independent form tests compare.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import ip_network
from typing import Literal

Family = Literal[4, 6]
Direction = Literal["in", "out"]
AddrDirection = Literal["src", "dst"]
#: The sets every table of ours has: ``allowed`` holds (interface, address)
#: pairs a VM may send from, ``downstream`` every address behind a vif that is
#: online, ``connected`` every address of a VM using this netvm (running or not).
SetName = Literal["allowed", "downstream", "connected"]
SET_NAMES: tuple[SetName, ...] = ("allowed", "downstream", "connected")
#: Sets that may hold a whole network (a VM's ``ip`` may name one, as Xen
#: allows); ``connected`` lists addresses only.
NETWORK_SETS: frozenset[SetName] = frozenset({"allowed", "downstream"})
L4 = Literal["tcp", "udp", "icmp", "icmpv6"]
CtStateName = Literal["invalid", "established", "related", "new", "untracked"]
RejectKind = Literal["icmp-host-prohibited", "icmp-port-unreachable", "icmp6-adm-prohibited", "tcp-reset"]

#: nftables' standard priorities (``nft`` accepts them by these names).
PRIORITY: dict[str, int] = {"raw": -300, "mangle": -150, "dstnat": -100, "filter": 0, "srcnat": 100}
#: nft names ICMP and ICMPv6 message types by these names (nftables' src/proto.c) and lists them so.
ICMP_NAMES: dict[int, str] = {0: "echo-reply", 3: "destination-unreachable", 8: "echo-request", 11: "time-exceeded"}
ICMP6_NAMES: dict[int, str] = {
    1: "destination-unreachable", 2: "packet-too-big", 3: "time-exceeded", 128: "echo-request", 129: "echo-reply",
    133: "nd-router-solicit", 134: "nd-router-advert", 135: "nd-neighbor-solicit", 136: "nd-neighbor-advert",
    137: "nd-redirect",
}


def _ip(family: Family) -> str:
    return "ip6" if family == 6 else "ip"


def _not(negate: bool) -> str:
    return "!= " if negate else ""


# --- predicates ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IfName:
    """The in- or out-interface by name; ``by_index`` compares the index instead (``iif lo``)."""

    direction: Direction
    name: str
    negate: bool = False
    by_index: bool = False

    def text(self, family: Family) -> str:
        key = ("i" if self.direction == "in" else "o") + ("if" if self.by_index else "ifname")
        return f"{key} {_not(self.negate)}{self.name}"


@dataclass(frozen=True, slots=True)
class IfGroup:
    direction: Direction
    group: int
    negate: bool = False

    def text(self, family: Family) -> str:
        return f"{'iif' if self.direction == 'in' else 'oif'}group {_not(self.negate)}{self.group}"


@dataclass(frozen=True, slots=True)
class Addr:
    """Source or destination address in ``network`` (``10.0.0.1/32`` or wider)."""

    direction: AddrDirection
    network: str
    negate: bool = False

    def text(self, family: Family) -> str:
        net = ip_network(self.network)
        shown = str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)
        return f"{_ip(family)} {'s' if self.direction == 'src' else 'd'}addr {_not(self.negate)}{shown}"


@dataclass(frozen=True, slots=True)
class InSet:
    """Membership of the source (or destination) address in a logical set.

    For ``allowed`` the key is the pair (in-interface name, source address).
    """

    set: SetName
    direction: AddrDirection = "src"

    @property
    def with_interface(self) -> bool:
        return self.set == "allowed"

    def text(self, family: Family) -> str:
        addr = f"{_ip(family)} {'s' if self.direction == 'src' else 'd'}addr"
        return f"{'iifname . ' if self.with_interface else ''}{addr} @{self.set}"


@dataclass(frozen=True, slots=True)
class Proto:
    """The layer-4 protocol (``meta l4proto``)."""

    proto: L4
    negate: bool = False

    def text(self, family: Family) -> str:
        shown = "ipv6-icmp" if self.proto == "icmpv6" else self.proto
        return f"meta l4proto {_not(self.negate)}{shown}"


@dataclass(frozen=True, slots=True)
class DPort:
    """Destination port of ``proto`` (implies the protocol)."""

    proto: Literal["tcp", "udp"]
    port: int

    def text(self, family: Family) -> str:
        return f"{self.proto} dport {self.port}"


@dataclass(frozen=True, slots=True)
class IcmpType:
    """ICMP (family 4) or ICMPv6 (family 6) message types, by number (implies the protocol)."""

    types: tuple[int, ...]

    def names(self, family: Family) -> list[str]:
        table = ICMP6_NAMES if family == 6 else ICMP_NAMES
        return [table.get(t, str(t)) for t in self.types]

    def text(self, family: Family) -> str:
        names = self.names(family)
        shown = names[0] if len(names) == 1 else "{ " + ", ".join(names) + " }"
        return f"{'icmpv6' if family == 6 else 'icmp'} type {shown}"


@dataclass(frozen=True, slots=True)
class CtState:
    states: tuple[CtStateName, ...]

    def text(self, family: Family) -> str:
        return f"ct state {','.join(self.states)}"


Predicate = IfName | IfGroup | Addr | InSet | Proto | DPort | IcmpType | CtState


# --- verdicts and actions -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Accept:
    def text(self) -> str:
        return "accept"


@dataclass(frozen=True, slots=True)
class Drop:
    def text(self) -> str:
        return "drop"


@dataclass(frozen=True, slots=True)
class Reject:
    kind: RejectKind

    def text(self) -> str:
        # As nft lists it (port unreachable is what a bare "reject" sends).
        return {
            "icmp-host-prohibited": "reject with icmp host-prohibited",
            "icmp-port-unreachable": "reject",
            "icmp6-adm-prohibited": "reject with icmpv6 admin-prohibited",
            "tcp-reset": "reject with tcp reset",
        }[self.kind]


@dataclass(frozen=True, slots=True)
class Jump:
    chain: str

    def text(self) -> str:
        return f"jump {self.chain}"


@dataclass(frozen=True, slots=True)
class Goto:
    chain: str

    def text(self) -> str:
        return f"goto {self.chain}"


@dataclass(frozen=True, slots=True)
class Dnat:
    to: str

    def text(self) -> str:
        return f"dnat to {self.to}"


@dataclass(frozen=True, slots=True)
class Snat:
    to: str

    def text(self) -> str:
        return f"snat to {self.to}"


@dataclass(frozen=True, slots=True)
class Masquerade:
    def text(self) -> str:
        return "masquerade"


Verdict = Accept | Drop | Reject | Jump | Goto | Dnat | Snat | Masquerade


@dataclass(frozen=True, slots=True)
class Rule:
    """Packets matching every predicate get ``verdict`` (``None``: only counted)."""

    match: tuple[Predicate, ...] = ()
    verdict: Verdict | None = None
    counter: bool = False

    def implied(self, p: Predicate) -> bool:
        """A predicate the verdict implies (``reject with tcp reset`` is TCP): nft adds it itself and lists
        the rule without it, so backends leave it out too."""
        return isinstance(p, Proto) and p == Proto("tcp") and self.verdict == Reject("tcp-reset")

    def text(self, family: Family) -> str:
        words = [p.text(family) for p in self.match if not self.implied(p)]
        if self.counter:
            words.append("counter")
        if self.verdict is not None:
            words.append(self.verdict.text())
        return " ".join(words)


def rule(*match: Predicate, verdict: Verdict | None = None, counter: bool = False) -> Rule:
    return Rule(tuple(match), verdict, counter)


# --- chains, sets, tables --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hook:
    """What makes a chain a base chain: where packets enter it, and its policy."""

    hook: Literal["prerouting", "input", "forward", "output", "postrouting"]
    type: Literal["filter", "nat"]
    priority: int
    policy: Literal["accept", "drop"] = "accept"

    def text(self) -> str:
        names = {v: k for k, v in PRIORITY.items()}
        prio = names.get(self.priority, str(self.priority))
        return f"type {self.type} hook {self.hook} priority {prio}; policy {self.policy};"


ChainKind = Literal["owned", "reserved", "replaced", "absent"]


@dataclass(frozen=True, slots=True)
class Chain:
    """A chain and what we hold of it.

    ``owned``: made to hold exactly ``rules``; ``replaced``: the same, but
    swapped by deleting and re-adding it in one transaction (nftables' way
    of replacing a base chain atomically); ``reserved``: created when
    missing, its contents belong to the administrator and are never touched;
    ``absent``: one of ours from another configuration, removed if present.
    """

    name: str
    rules: tuple[Rule, ...] = ()
    hook: Hook | None = None
    kind: ChainKind = "owned"

    def lines(self, family: Family, table: str) -> list[str]:
        head = f"chain {_ip(family)} {table} {self.name}"
        if self.hook is not None:
            head += " { " + self.hook.text() + " }"
        if self.kind == "reserved":
            return [head + " (reserved for the administrator: created if missing, never edited)"]
        if self.kind == "absent":
            return [f"delete {head} (if present)"]
        return [head] + [f"  {r.text(family)}" for r in self.rules]


@dataclass(frozen=True, slots=True, order=True)
class SetElement:
    """A member of a logical set: ``network`` and, for ``allowed``, the interface."""

    family: Family
    set: SetName
    network: str
    dev: str | None = None

    def __str__(self) -> str:
        net = ip_network(self.network)
        shown = str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)
        member = f"{self.dev} . {shown}" if self.dev is not None else shown
        return f"element {_ip(self.family)} qubes {self.set} {{ {member} }}"


@dataclass(frozen=True, slots=True)
class Table:
    """One family's part of a ruleset: the sets and chains we hold there."""

    family: Family
    name: str
    chains: tuple[Chain, ...] = ()
    sets: tuple[SetName, ...] = ()

    def lines(self) -> list[str]:
        out = [f"set {_ip(self.family)} {self.name} {s}" for s in self.sets]
        for c in self.chains:
            out += c.lines(self.family, self.name)
        return out

    def chain(self, name: str) -> Chain:
        for c in self.chains:
            if c.name == name:
                return c
        raise KeyError(name)


@dataclass(frozen=True, slots=True)
class Ruleset:
    """Everything one tool wants in the firewall, applied as one transaction.

    ``what`` names it in logs (``antispoof``, ``base``, ``dns``, ``nat``);
    ``netns`` is the namespace whose firewall it is (``None``: the caller's).
    Only what is listed is touched; other chains, tables and rules stay.
    """

    what: str
    tables: tuple[Table, ...]
    netns: str | None = None

    def lines(self) -> list[str]:
        where = f" (netns {self.netns})" if self.netns else ""
        out = [f"firewall {self.what}{where}:"]
        for t in self.tables:
            out += [f"  {line}" for line in t.lines()]
        return out

    def table(self, family: Family, name: str = "qubes") -> Table:
        for t in self.tables:
            if t.family == family and t.name == name:
                return t
        raise KeyError((family, name))

    def __str__(self) -> str:
        return f"firewall {self.what}"


# --- flow offload ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FlowOffload:
    """Flow offload through a netfilter flowtable, in a table of its own (family ``inet``).

    A flowtable ``flowtable`` hooked at ingress (priority ``ingress_priority``)
    on ``devices``, and a base chain (hook forward, priority
    ``forward_priority``, after the filter chains have accepted the packet)
    that hands each TCP or UDP connection going from interface group
    ``from_group`` out of group ``to_group`` to it. Once a connection is in
    the flowtable the kernel forwards its packets from ingress on, past the
    IP hooks (linux Documentation/networking/nf_flowtable.rst).

    ``devices`` is what ``init`` found; vifs come and go with their events
    (:class:`FlowtableDevice`). Only nftables has flowtables.
    """

    table: str
    flowtable: str
    devices: tuple[str, ...]
    from_group: int
    to_group: int
    forward_priority: int
    ingress_priority: int = 0
    netns: str | None = None

    @property
    def what(self) -> str:
        return "flow offload"

    def lines(self) -> list[str]:
        names = ", ".join(self.devices) or "none yet"
        return [
            f"firewall {self.what}:",
            f"  flowtable inet {self.table} {self.flowtable} {{ hook ingress priority {self.ingress_priority}; "
            f"devices = {{ {names} }} }}",
            f"  chain inet {self.table} {self.flowtable} {{ type filter hook forward priority "
            f"{self.forward_priority}; policy accept; }}",
            f"    meta l4proto {{ tcp, udp }} iifgroup {self.from_group} oifgroup {self.to_group} "
            f"flow add @{self.flowtable}",
        ]

    def __str__(self) -> str:
        return f"firewall {self.what}"


@dataclass(frozen=True, slots=True)
class FlowtableDevice:
    """One interface among the devices of a flowtable (its ingress hook)."""

    dev: str
    table: str
    flowtable: str

    def __str__(self) -> str:
        return f"device {self.dev} of flowtable inet {self.table} {self.flowtable}"


def merge(what: str, *rulesets: Ruleset) -> Ruleset:
    """One ruleset holding the tables of all ``rulesets`` (tables of the same name merged)."""
    tables: dict[tuple[Family, str], Table] = {}
    for rs in rulesets:
        for t in rs.tables:
            key = (t.family, t.name)
            old = tables.get(key)
            if old is None:
                tables[key] = t
            else:
                sets = tuple(dict.fromkeys(old.sets + t.sets))
                tables[key] = Table(t.family, t.name, old.chains + t.chains, sets)
    netns = rulesets[0].netns if rulesets else None
    return Ruleset(what, tuple(tables.values()), netns)
