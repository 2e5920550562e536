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
  whatever answers to that private address there. Its content depends on
  DNS1/DNS2 only, so a change of upstream never touches the filter table.

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
    virtual: Sequence[IPv4Address], upstreams: Sequence[IPv4Address]
) -> tuple[tuple[IPv4Address, IPv4Address], ...]:
    """(virtual, upstream) pairs: DNS1 -> first upstream, DNS2 -> second.

    Upstreams are reused from the start when there are fewer of them than
    virtual resolvers; extra upstreams are left unused; no upstream gives no
    pair. Duplicates in either list are dropped first, keeping order.
    """
    ups = _unique(upstreams)
    if not ups:
        return ()
    return tuple(zip(_unique(virtual), cycle(ups)))


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


def plan_dns_ruleset(virtual: Sequence[IPv4Address], upstreams: Sequence[IPv4Address]) -> Ruleset:
    """The complete firewall state for ``virtual`` resolvers served by ``upstreams``.

    Pure. Owns ``PR-QBS`` (nat) and ``QBS-DNS`` (filter) and ensures their
    jumps at the top of nat PREROUTING and filter FORWARD; says nothing about
    any other chain. With no upstream, ``PR-QBS`` is empty. Raises
    :class:`InvalidInput` when ``virtual`` is empty (there would be nothing
    to map).
    """
    vdns = _unique(virtual)
    if not vdns:
        raise InvalidInput("no virtual DNS resolvers configured (primary_dns/secondary_dns)")
    nat_rules = tuple(r for v, u in pair_resolvers(vdns, upstreams) for r in dnat_rules(v, u))
    guard = tuple(r for v in vdns for r in guard_rules(v))
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
