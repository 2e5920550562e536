"""Pairing virtual resolvers with upstreams, and the firewall state planned for it."""

from __future__ import annotations

from ipaddress import IPv4Address
from typing import Any

import pytest

from vif_hotplug.dns_rules import GUARD_CHAIN, NAT_CHAIN, pair_resolvers, plan_dns_ruleset
from vif_hotplug.errors import InvalidInput
from vif_hotplug.firewall import ChainSpec, Hook, Rule, Ruleset
from vif_hotplug.iptables_backend import rule_to_dict

DNS1 = IPv4Address("10.139.1.1")
DNS2 = IPv4Address("10.139.1.2")
VIRTUAL = (DNS1, DNS2)
A, B, C = IPv4Address("192.0.2.53"), IPv4Address("192.0.2.54"), IPv4Address("192.0.2.55")


def cases(table: list[tuple[Any, ...]]) -> list[Any]:
    """``(id, *values)`` rows as pytest params, so each row passes or fails on its own."""
    return [pytest.param(*row[1:], id=row[0]) for row in table]


def chain(ruleset: Ruleset, table: str, name: str) -> ChainSpec:
    (spec,) = [c for c in ruleset.chains if c.table == table and c.name == name]
    return spec


def nat_texts(ruleset: Ruleset) -> list[str]:
    return [r.text for r in chain(ruleset, "nat", NAT_CHAIN).rules]


def dnat(v: IPv4Address, u: IPv4Address) -> list[str]:
    return [
        f"-d {v}/32 -p udp -m udp --dport 53 -j DNAT --to-destination {u}",
        f"-d {v}/32 -p tcp -m tcp --dport 53 -j DNAT --to-destination {u}",
    ]


# --- pairing ------------------------------------------------------------------

PAIRING = [
    ("zero upstreams: no pair", VIRTUAL, (), ()),
    ("one upstream serves both", VIRTUAL, (A,), ((DNS1, A), (DNS2, A))),
    ("two upstreams in order", VIRTUAL, (A, B), ((DNS1, A), (DNS2, B))),
    ("third upstream unused", VIRTUAL, (A, B, C), ((DNS1, A), (DNS2, B))),
    ("order of upstreams is kept", VIRTUAL, (B, A), ((DNS1, B), (DNS2, A))),
    ("duplicate upstream does not hide the next", VIRTUAL, (A, A, B), ((DNS1, A), (DNS2, B))),
    ("only a primary virtual resolver", (DNS1,), (A, B), ((DNS1, A),)),
    ("same virtual resolver twice counts once", (DNS1, DNS1), (A, B), ((DNS1, A),)),
    ("no virtual resolver", (), (A, B), ()),
    ("virtual resolver given as upstream is ignored", VIRTUAL, (DNS2, A), ((DNS1, A), (DNS2, A))),
    ("only virtual resolvers given as upstreams: no pair", VIRTUAL, (DNS1, DNS2), ()),
]


@pytest.mark.parametrize(("virtual", "upstreams", "expected"), cases(PAIRING))
def test_pair_resolvers(
    virtual: tuple[IPv4Address, ...], upstreams: tuple[IPv4Address, ...], expected: tuple[Any, ...]
) -> None:
    assert pair_resolvers(virtual, upstreams) == expected


CHAINED_PAIRING = [
    ("chained source: each forwarded unchanged", (), VIRTUAL, ((DNS1, DNS1), (DNS2, DNS2))),
    ("chained source in reverse order: still unchanged", (), (DNS2, DNS1), ((DNS1, DNS1), (DNS2, DNS2))),
    ("chained source naming DNS1 only: DNS2 goes to it", (), (DNS1,), ((DNS1, DNS1), (DNS2, DNS1))),
    ("chained source naming DNS2 only: DNS1 goes to it", (), (DNS2,), ((DNS1, DNS2), (DNS2, DNS2))),
    ("chained + real upstream: real upstream wins", (A,), VIRTUAL, ((DNS1, A), (DNS2, A))),
    ("no upstream, nothing chained: no pair", (), (), ()),
    ("chained to addresses that are not ours: no pair", (), (C,), ()),
]


@pytest.mark.parametrize(("upstreams", "chained_to", "expected"), cases(CHAINED_PAIRING))
def test_pair_resolvers_of_chained_netvm(
    upstreams: tuple[IPv4Address, ...], chained_to: tuple[IPv4Address, ...], expected: tuple[Any, ...]
) -> None:
    assert pair_resolvers(VIRTUAL, upstreams, chained_to) == expected


# --- nat chain ----------------------------------------------------------------

NAT_CONTENT = [
    ("zero upstreams: empty chain", (), []),
    ("one upstream", (A,), dnat(DNS1, A) + dnat(DNS2, A)),
    ("two upstreams", (A, B), dnat(DNS1, A) + dnat(DNS2, B)),
    ("three upstreams", (A, B, C), dnat(DNS1, A) + dnat(DNS2, B)),
]


@pytest.mark.parametrize(("upstreams", "expected"), cases(NAT_CONTENT))
def test_nat_chain_holds_dnat_for_each_pair(upstreams: tuple[IPv4Address, ...], expected: list[str]) -> None:
    assert nat_texts(plan_dns_ruleset(VIRTUAL, upstreams)) == expected


def test_dnat_rule_text_matches_iptables_save() -> None:
    rules = nat_texts(plan_dns_ruleset((DNS1,), (A,)))
    assert "-d 10.139.1.1/32 -p udp -m udp --dport 53 -j DNAT --to-destination 192.0.2.53" in rules


def test_nat_chain_is_owned() -> None:
    assert chain(plan_dns_ruleset(VIRTUAL, (A,)), "nat", NAT_CHAIN).owned


@pytest.mark.parametrize("upstreams", [(), (A,), (A, B)], ids=["zero", "one", "two"])
def test_nat_chain_never_holds_reject(upstreams: tuple[IPv4Address, ...]) -> None:
    # The kernel refuses a nat table containing REJECT (EINVAL on commit).
    assert not any("REJECT" in t for t in nat_texts(plan_dns_ruleset(VIRTUAL, upstreams)))


# --- filter guard ---------------------------------------------------------------

GUARD = [
    "-d 10.139.1.1/32 -p tcp -j REJECT --reject-with tcp-reset",
    "-d 10.139.1.1/32 -j REJECT --reject-with icmp-port-unreachable",
    "-d 10.139.1.2/32 -p tcp -j REJECT --reject-with tcp-reset",
    "-d 10.139.1.2/32 -j REJECT --reject-with icmp-port-unreachable",
]


@pytest.mark.parametrize("upstreams", [(), (A,), (A, B), (A, B, C)], ids=["zero", "one", "two", "three"])
def test_guard_chain_rejects_virtual_resolvers_whatever_the_upstreams(upstreams: tuple[IPv4Address, ...]) -> None:
    spec = chain(plan_dns_ruleset(VIRTUAL, upstreams), "filter", GUARD_CHAIN)
    assert (spec.owned, [r.text for r in spec.rules]) == (True, GUARD)


def test_guard_chain_covers_only_configured_virtual_resolvers() -> None:
    spec = chain(plan_dns_ruleset((DNS1,), (A,)), "filter", GUARD_CHAIN)
    assert [r.text for r in spec.rules] == GUARD[:2]


# --- chained netvm ------------------------------------------------------------

CHAINED_PLANS = [
    ("chained source: nothing mapped, nothing rejected", (), VIRTUAL, [], []),
    ("chained source naming DNS1 only: DNS2 mapped onto it", (), (DNS1,), dnat(DNS2, DNS1), GUARD[2:]),
    ("chained + real upstream: DNAT to it, guard kept", (A,), VIRTUAL, dnat(DNS1, A) + dnat(DNS2, A), GUARD),
    ("no upstream at all: everything rejected", (), (), [], GUARD),
    ("virtual resolvers as upstreams alone do not chain", (DNS1, DNS2), (), [], GUARD),
]


@pytest.mark.parametrize(("upstreams", "chained_to", "nat", "guard"), cases(CHAINED_PLANS))
def test_plan_for_chained_netvm(
    upstreams: tuple[IPv4Address, ...], chained_to: tuple[IPv4Address, ...], nat: list[str], guard: list[str]
) -> None:
    ruleset = plan_dns_ruleset(VIRTUAL, upstreams, chained_to=chained_to)
    assert (nat_texts(ruleset), [r.text for r in chain(ruleset, "filter", GUARD_CHAIN).rules]) == (nat, guard)


def test_chained_plan_still_owns_and_jumps_both_chains() -> None:
    ruleset = plan_dns_ruleset(VIRTUAL, (), chained_to=VIRTUAL)
    assert ({(c.table, c.name, c.owned) for c in ruleset.chains}, set(ruleset.hooks)) == (
        {("nat", NAT_CHAIN, True), ("filter", GUARD_CHAIN, True)},
        set(plan_dns_ruleset(VIRTUAL, (A,)).hooks),
    )


# --- hooks and scope ---------------------------------------------------------


def test_chains_are_jumped_from_prerouting_and_first_in_forward() -> None:
    assert set(plan_dns_ruleset(VIRTUAL, (A,)).hooks) == {
        Hook(4, "nat", "PREROUTING", Rule(f"-j {NAT_CHAIN}"), 1),
        Hook(4, "filter", "FORWARD", Rule(f"-j {GUARD_CHAIN}"), 1),
    }


def test_plan_owns_only_its_two_chains_and_sets_no_policy() -> None:
    ruleset = plan_dns_ruleset(VIRTUAL, (A,))
    assert {(c.table, c.name) for c in ruleset.chains} == {("nat", NAT_CHAIN), ("filter", GUARD_CHAIN)}
    assert ruleset.policies == ()


def test_plan_is_ipv4_only() -> None:
    ruleset = plan_dns_ruleset(VIRTUAL, (A,))
    assert {c.family for c in ruleset.chains} | {h.family for h in ruleset.hooks} == {4}


def test_same_inputs_give_equal_plans() -> None:
    assert plan_dns_ruleset(VIRTUAL, (A, B)) == plan_dns_ruleset(list(VIRTUAL), [A, B])


def test_plan_without_virtual_resolvers_is_invalid() -> None:
    with pytest.raises(InvalidInput, match="no virtual DNS resolvers"):
        plan_dns_ruleset((), (A,))


@pytest.mark.parametrize(
    ("upstreams", "chained_to"), [((), ()), ((A, B), ()), ((), (DNS1,))], ids=["zero", "two", "chained"]
)
def test_every_planned_rule_translates_for_the_iptables_backend(
    upstreams: tuple[IPv4Address, ...], chained_to: tuple[IPv4Address, ...]
) -> None:
    ruleset = plan_dns_ruleset(VIRTUAL, upstreams, chained_to=chained_to)
    rules = [r for c in ruleset.chains for r in c.rules] + [h.rule for h in ruleset.hooks]
    assert all("target" in rule_to_dict(r) for r in rules)


def test_dnat_translation_names_the_destination() -> None:
    (udp, _tcp) = chain(plan_dns_ruleset((DNS1,), (A,)), "nat", NAT_CHAIN).rules
    assert rule_to_dict(udp) == {
        "dst": "10.139.1.1/32",
        "protocol": "udp",
        "udp": {"dport": "53"},
        "target": {"DNAT": {"to-destination": "192.0.2.53"}},
    }
