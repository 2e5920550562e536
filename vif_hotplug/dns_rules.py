"""Plan the DNAT that maps the virtual resolvers onto the real ones.

VMs always ask DNS1 and DNS2 (private addresses nothing answers on). This
planner pairs each virtual resolver with an upstream and returns the firewall
state that makes it so:

* nat chain ``PR-QBS`` (jumped from nat PREROUTING): for each pair, udp and
  tcp port 53 DNAT from the virtual address to the upstream;
* filter chain ``QBS-DNS`` (jumped from filter FORWARD, first): rejects
  anything still addressed to a virtual resolver. After DNAT a query carries
  the upstream's address, so this only catches queries that no DNAT rule
  took: with no upstream they fail at once (port unreachable, or a TCP
  reset) instead of timing out or leaving through the uplink towards
  whatever answers to that private address there.

A chained netvm (Qubes' sys-firewall behind sys-net) has no real upstream:
its own resolver configuration names DNS1/DNS2, which the upstream netvm
maps onto real nameservers with these same rules. Queries to those
addresses then pass through unchanged: no DNAT, no guard for them, so they
are routed out of the uplink to the upstream netvm. Qubes' reference script
gets there by accident (it DNATs DNS1 onto DNS1); here the planner decides
it from :attr:`~vif_hotplug.resolvers.Upstreams.virtual_listed`. Real
upstreams always win, and a source naming nothing usable still rejects.

The guard depends only on DNS1/DNS2 and on whether the netvm is chained, so
an ordinary change of upstream never touches the filter table.

REJECT is only valid in the filter table (the nat table refuses the whole
commit with EINVAL), which is why the guard cannot sit in ``PR-QBS``.
"""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import IPv4Address
from itertools import cycle

from .errors import InvalidInput
from .firewall import ChainSpec, Hook, Rule, Ruleset

NAT_CHAIN = "PR-QBS"
GUARD_CHAIN = "QBS-DNS"
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


def dnat_rules(virtual: IPv4Address, upstream: IPv4Address) -> tuple[Rule, ...]:
    """The udp and tcp port 53 DNAT rules for one pair, in iptables-save syntax."""
    return tuple(
        Rule(f"-d {virtual}/32 -p {proto} -m {proto} --dport {DNS_PORT} -j DNAT --to-destination {upstream}")
        for proto in ("udp", "tcp")
    )


def guard_rules(virtual: IPv4Address) -> tuple[Rule, ...]:
    """Reject whatever reaches FORWARD still addressed to ``virtual``.

    TCP gets a reset (``connect`` fails with "connection refused"), the rest
    an ICMP port unreachable, which a UDP resolver also reports as refused.
    """
    return (
        Rule(f"-d {virtual}/32 -p tcp -j REJECT --reject-with tcp-reset"),
        Rule(f"-d {virtual}/32 -j REJECT --reject-with icmp-port-unreachable"),
    )


def plan_dns_ruleset(
    virtual: Sequence[IPv4Address],
    upstreams: Sequence[IPv4Address],
    *,
    chained_to: Sequence[IPv4Address] = (),
) -> Ruleset:
    """The complete firewall state for ``virtual`` resolvers served by ``upstreams``.

    Pure. Owns ``PR-QBS`` (nat) and ``QBS-DNS`` (filter) and ensures their
    jumps at the top of nat PREROUTING and filter FORWARD; says nothing about
    any other chain. Pairs as :func:`pair_resolvers` does: a virtual resolver
    paired with a real upstream gets DNAT and stays guarded; one that is
    forwarded unchanged (chained netvm, ``chained_to`` and no upstream) gets
    neither, so it is routed to the upstream netvm. With no upstream and no
    ``chained_to``, ``PR-QBS`` is empty and the guard rejects everything.
    Raises :class:`InvalidInput` when ``virtual`` is empty (there would be
    nothing to map).
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
        chains=(
            ChainSpec(4, "nat", NAT_CHAIN, nat_rules),
            ChainSpec(4, "filter", GUARD_CHAIN, guard),
        ),
        hooks=(
            Hook(4, "nat", "PREROUTING", Rule(f"-j {NAT_CHAIN}"), 1),
            Hook(4, "filter", "FORWARD", Rule(f"-j {GUARD_CHAIN}"), 1),
        ),
    )
