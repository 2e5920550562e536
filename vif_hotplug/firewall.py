"""Firewall state as data, and the interface every backend implements.

Rules are written in ``iptables-save`` argument syntax (``-i lo -j ACCEPT``)
because that is the language administrators read; a backend translates them.
Planners only build these values; :class:`Firewall` implementations apply them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

Family = Literal[4, 6]


@dataclass(frozen=True, order=True)
class Rule:
    """One rule, e.g. ``Rule("-p udp -m udp --dport 53 -j DROP")``."""

    text: str

    @property
    def tokens(self) -> tuple[str, ...]:
        return tuple(self.text.split())

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, order=True)
class ChainSpec:
    """A chain and, if ``owned``, its complete contents.

    An owned chain is made to hold exactly ``rules`` (replaced in one commit
    when different). A chain that is not owned is only created when missing:
    it is reserved for an administrator and never flushed or edited.
    """

    family: Family
    table: str
    name: str
    rules: tuple[Rule, ...] = ()
    owned: bool = True

    def lines(self) -> list[str]:
        fam = "ip6tables" if self.family == 6 else "iptables"
        if not self.owned:
            return [f"{fam} -t {self.table} -N {self.name} (reserved, contents left alone)"]
        return [f"{fam} -t {self.table} -N {self.name}"] + [
            f"{fam} -t {self.table} -A {self.name} {r}" for r in self.rules
        ]


@dataclass(frozen=True, order=True)
class Hook:
    """A rule that must stand at ``position`` (from 1) in a chain we do not own.

    It is inserted there when missing and moved back there when something
    pushed it down; other rules in that chain are left alone.
    """

    family: Family
    table: str
    chain: str
    rule: Rule
    position: int = 1

    def line(self) -> str:
        fam = "ip6tables" if self.family == 6 else "iptables"
        return f"{fam} -t {self.table} -I {self.chain} {self.position} {self.rule}"


@dataclass(frozen=True, order=True)
class Policy:
    family: Family
    table: str
    chain: str
    target: Literal["ACCEPT", "DROP"]

    def line(self) -> str:
        fam = "ip6tables" if self.family == 6 else "iptables"
        return f"{fam} -t {self.table} -P {self.chain} {self.target}"


@dataclass(frozen=True)
class Ruleset:
    """Everything one tool wants in the firewall, applied as one batch."""

    chains: tuple[ChainSpec, ...] = ()
    hooks: tuple[Hook, ...] = ()
    policies: tuple[Policy, ...] = ()

    def lines(self) -> list[str]:
        out: list[str] = []
        for c in self.chains:
            out += c.lines()
        out += [h.line() for h in self.hooks]
        out += [p.line() for p in self.policies]
        return out


class Firewall(Protocol):
    """What planners need from a firewall backend."""

    def sync(self, ruleset: Ruleset) -> bool:
        """Make the firewall contain ``ruleset``; return whether anything changed.

        Idempotent. Each table is committed at most once, atomically, under the
        backend's lock; nothing is committed when nothing differs. Rules and
        chains outside the ruleset are left alone. Raises ``KernelError``.
        """
        ...

