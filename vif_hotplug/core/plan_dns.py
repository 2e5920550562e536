"""Plan the DNAT that maps the virtual resolvers onto the real ones. Pure.

VMs always ask DNS1 and DNS2 (private addresses nothing answers on). This
planner pairs each virtual resolver with an upstream and returns the
firewall state that makes it so, in table ``ip qubes``:

* ``dnat-dns`` (nat, prerouting, dstnat priority): for each pair, udp and
  tcp port 53 DNAT from the virtual address to the upstream. Only the first
  packet of a connection sees a nat chain, so it costs established traffic
  nothing;
* ``dns-guard`` (filter, forward, just before the netvm's ``forward``):
  rejects anything still addressed to a virtual resolver. After DNAT a
  query carries the upstream's address, so this only catches queries no
  DNAT rule took: with no upstream they fail at once (port unreachable, or
  a TCP reset) instead of timing out or leaving through the uplink towards
  whatever answers to that private address there. (REJECT is not valid in
  a nat chain, hence the second chain.)

Both are replaced in one transaction, so a VM never sees a moment without
either.

A chained netvm (Qubes' sys-firewall behind sys-net) has no real upstream:
its own resolver configuration names DNS1/DNS2, which the upstream netvm
maps onto real nameservers with these same rules. Queries to those
addresses then pass through unchanged: no DNAT, no guard for them, so they
are routed out of the uplink to the upstream netvm. Real upstreams always
win, and a source naming nothing usable still rejects.
"""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import IPv4Address
from itertools import cycle

from .errors import InvalidInput
from .firewall import PRIORITY, Addr, Chain, Dnat, DPort, Hook, Proto, Reject, Rule, Ruleset, Table, rule
from .plan_base import TABLE

DNS_PORT = 53


def _unique(addrs: Sequence[IPv4Address]) -> tuple[IPv4Address, ...]:
    return tuple(dict.fromkeys(addrs))


def pair_resolvers(
    virtual: Sequence[IPv4Address],
    upstreams: Sequence[IPv4Address],
    chained_to: Sequence[IPv4Address] = (),
) -> tuple[tuple[IPv4Address, IPv4Address], ...]:
    """(virtual, upstream) pairs: DNS1 -> first upstream, DNS2 -> second.

    Upstreams are reused from the start when there are fewer of them than
    virtual resolvers; extra upstreams are left unused. Duplicates in every
    list are dropped first, keeping order, and a virtual resolver given as
    an upstream is ignored (mapping DNS1 onto itself maps nothing).

    With no upstream left, ``chained_to`` (the virtual resolvers the upstream
    source listed, served by the upstream netvm) takes over: each of them
    pairs with itself, meaning "forwarded unchanged", and any other virtual
    resolver pairs with them in turn, so a source naming only DNS1 still
    serves DNS2. With neither there is no pair.
    """
    vdns = _unique(virtual)
    ups = tuple(u for u in _unique(upstreams) if u not in vdns)
    if ups:
        return tuple(zip(vdns, cycle(ups)))
    via = tuple(a for a in _unique(chained_to) if a in vdns)
    if not via:
        return ()
    others = cycle(via)
    return tuple((v, v if v in via else next(others)) for v in vdns)


DNAT_CHAIN = "dnat-dns"
GUARD_CHAIN = "dns-guard"


def dnat_rules(virtual: IPv4Address, upstream: IPv4Address) -> tuple[Rule, ...]:
    """The udp and tcp port 53 DNAT rules for one pair."""
    return tuple(
        rule(Addr("dst", f"{virtual}/32"), DPort(proto, DNS_PORT), verdict=Dnat(str(upstream)))
        for proto in ("udp", "tcp")
    )


def guard_rules(virtual: IPv4Address) -> tuple[Rule, ...]:
    """Reject whatever reaches ``forward`` still addressed to ``virtual``.

    TCP gets a reset (``connect`` fails with "connection refused"), the rest
    an ICMP port unreachable, which a UDP resolver also reports as refused.
    """
    dst = Addr("dst", f"{virtual}/32")
    return (
        rule(dst, Proto("tcp"), verdict=Reject("tcp-reset")),
        rule(dst, verdict=Reject("icmp-port-unreachable")),
    )


def plan_dns_ruleset(
    virtual: Sequence[IPv4Address],
    upstreams: Sequence[IPv4Address],
    *,
    chained_to: Sequence[IPv4Address] = (),
) -> Ruleset:
    """The complete DNS firewall state for ``virtual`` resolvers served by ``upstreams``.

    Pairs as :func:`pair_resolvers` does: a virtual resolver paired with a
    real upstream gets DNAT and stays guarded; one that is forwarded
    unchanged (chained netvm, ``chained_to`` and no upstream) gets neither,
    so it is routed to the upstream netvm. With no upstream and no
    ``chained_to``, ``dnat-dns`` is empty and the guard rejects everything.
    Raises :class:`InvalidInput` when ``virtual`` is empty.
    """
    vdns = _unique(virtual)
    if not vdns:
        raise InvalidInput("no virtual DNS resolvers configured (primary_dns/secondary_dns)")
    pairs = pair_resolvers(vdns, upstreams, chained_to)
    nat_rules = tuple(r for v, u in pairs if v != u for r in dnat_rules(v, u))
    # After DNAT a packet carries its pair's target address; when that target
    # is one of our virtual resolvers (chained), the guard must let it pass.
    # The guard of a virtual resolver DNATed elsewhere never matches, but it
    # stays: the same rule rejects it should that DNAT rule ever be missing.
    forwarded = {u for _, u in pairs if u in vdns}
    guard = tuple(r for v in vdns if v not in forwarded for r in guard_rules(v))
    return Ruleset(
        "dns",
        (
            Table(
                4,
                TABLE,
                (
                    Chain(DNAT_CHAIN, nat_rules, Hook("prerouting", "nat", PRIORITY["dstnat"]), kind="replaced"),
                    Chain(GUARD_CHAIN, guard, Hook("forward", "filter", PRIORITY["filter"] - 1), kind="replaced"),
                ),
            ),
        ),
    )


def plan_guard_ruleset(virtual: Sequence[IPv4Address]) -> Ruleset:
    """DNS1/DNS2 rejected, nothing mapped: what ``init`` installs before any upstream is known."""
    return plan_dns_ruleset(virtual, ())


def dnat_targets(ruleset: Ruleset) -> tuple[IPv4Address, ...]:
    """The upstream nameservers a DNS ruleset points DNS1/DNS2 at (none for a guard-only one)."""
    found: list[IPv4Address] = []
    for table in ruleset.tables:
        for chain in table.chains:
            for r in chain.rules:
                if isinstance(r.verdict, Dnat):
                    found.append(IPv4Address(r.verdict.to))
    return tuple(dict.fromkeys(found))
