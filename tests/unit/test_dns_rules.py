"""Pairing virtual resolvers with upstreams, and the firewall state planned for it (plan_dns)."""

from __future__ import annotations

from ipaddress import IPv4Address
from typing import Any

import pytest

from vif_hotplug.core.errors import InvalidInput
from vif_hotplug.core.firewall import PRIORITY, Addr, Chain, Dnat, Hook, Proto, Reject, Rule, Ruleset, rule
from vif_hotplug.core.plan_dns import DNAT_CHAIN, GUARD_CHAIN, pair_resolvers, plan_dns_ruleset, plan_guard_ruleset
from vif_hotplug.kernel.iptables_backend import NAMES, XtChain, _describe_rule

DNS1 = IPv4Address("10.139.1.1")
DNS2 = IPv4Address("10.139.1.2")
VIRTUAL = (DNS1, DNS2)
A, B, C = IPv4Address("192.0.2.53"), IPv4Address("192.0.2.54"), IPv4Address("192.0.2.55")


def cases(table: list[tuple[Any, ...]]) -> list[Any]:
    """``(id, *values)`` rows as pytest params, so each row passes or fails on its own."""
    return [pytest.param(*row[1:], id=row[0]) for row in table]


def chain(ruleset: Ruleset, name: str) -> Chain:
    return ruleset.table(4, "qubes").chain(name)


def nat_texts(ruleset: Ruleset) -> list[str]:
    return [r.text(4) for r in chain(ruleset, DNAT_CHAIN).rules]


def guard_rules(ruleset: Ruleset) -> list[Rule]:
    return list(chain(ruleset, GUARD_CHAIN).rules)


def dnat(v: IPv4Address, u: IPv4Address) -> list[str]:
    return [f"ip daddr {v} udp dport 53 dnat to {u}", f"ip daddr {v} tcp dport 53 dnat to {u}"]


def guard(v: IPv4Address) -> list[Rule]:
    """TCP gets a reset, the rest an ICMP port unreachable (compared as intent: see test_base_ruleset for text)."""
    return [
        rule(Addr("dst", f"{v}/32"), Proto("tcp"), verdict=Reject("tcp-reset")),
        rule(Addr("dst", f"{v}/32"), verdict=Reject("icmp-port-unreachable")),
    ]


GUARD = guard(DNS1) + guard(DNS2)

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


# --- dnat chain ----------------------------------------------------------------

NAT_CONTENT = [
    ("zero upstreams: empty chain", (), []),
    ("one upstream", (A,), dnat(DNS1, A) + dnat(DNS2, A)),
    ("two upstreams", (A, B), dnat(DNS1, A) + dnat(DNS2, B)),
    ("three upstreams", (A, B, C), dnat(DNS1, A) + dnat(DNS2, B)),
]


@pytest.mark.parametrize(("upstreams", "expected"), cases(NAT_CONTENT))
def test_dnat_chain_holds_udp_and_tcp_dnat_for_each_pair(
    upstreams: tuple[IPv4Address, ...], expected: list[str]
) -> None:
    assert nat_texts(plan_dns_ruleset(VIRTUAL, upstreams)) == expected


def test_dnat_chain_is_a_nat_chain_at_dstnat_priority() -> None:
    assert chain(plan_dns_ruleset(VIRTUAL, (A,)), DNAT_CHAIN).hook == Hook("prerouting", "nat", PRIORITY["dstnat"])


@pytest.mark.parametrize("name", [DNAT_CHAIN, GUARD_CHAIN])
def test_both_chains_are_replaced_whole(name: str) -> None:
    assert chain(plan_dns_ruleset(VIRTUAL, (A,)), name).kind == "replaced"


@pytest.mark.parametrize("upstreams", [(), (A,), (A, B)], ids=["zero", "one", "two"])
def test_dnat_chain_never_holds_reject(upstreams: tuple[IPv4Address, ...]) -> None:
    # The kernel refuses a reject in a nat chain.
    rules = chain(plan_dns_ruleset(VIRTUAL, upstreams), DNAT_CHAIN).rules
    assert all(isinstance(r.verdict, Dnat) for r in rules)


# --- guard chain ---------------------------------------------------------------


@pytest.mark.parametrize("upstreams", [(), (A,), (A, B), (A, B, C)], ids=["zero", "one", "two", "three"])
def test_guard_chain_rejects_virtual_resolvers_whatever_the_upstreams(upstreams: tuple[IPv4Address, ...]) -> None:
    assert guard_rules(plan_dns_ruleset(VIRTUAL, upstreams)) == GUARD


def test_guard_chain_covers_only_configured_virtual_resolvers() -> None:
    assert guard_rules(plan_dns_ruleset((DNS1,), (A,))) == guard(DNS1)


def test_guard_chain_runs_just_before_the_netvms_forward_chain() -> None:
    hook = chain(plan_dns_ruleset(VIRTUAL, (A,)), GUARD_CHAIN).hook
    assert hook == Hook("forward", "filter", PRIORITY["filter"] - 1)


def test_guard_resets_tcp_and_answers_the_rest_with_port_unreachable() -> None:
    rules = chain(plan_dns_ruleset((DNS1,), ()), GUARD_CHAIN).rules
    assert [r.verdict for r in rules] == [Reject("tcp-reset"), Reject("icmp-port-unreachable")]


def test_plan_guard_ruleset_is_the_dns_ruleset_without_upstreams() -> None:
    assert plan_guard_ruleset(VIRTUAL) == plan_dns_ruleset(VIRTUAL, ())


# --- chained netvm ------------------------------------------------------------

CHAINED_PLANS = [
    ("chained source: nothing mapped, nothing rejected", (), VIRTUAL, [], []),
    ("chained source naming DNS1 only: DNS2 mapped onto it", (), (DNS1,), dnat(DNS2, DNS1), guard(DNS2)),
    ("chained + real upstream: DNAT to it, guard kept", (A,), VIRTUAL, dnat(DNS1, A) + dnat(DNS2, A), GUARD),
    ("no upstream at all: everything rejected", (), (), [], GUARD),
    ("virtual resolvers as upstreams alone do not chain", (DNS1, DNS2), (), [], GUARD),
]


@pytest.mark.parametrize(("upstreams", "chained_to", "nat", "guarded"), cases(CHAINED_PLANS))
def test_plan_for_chained_netvm(
    upstreams: tuple[IPv4Address, ...], chained_to: tuple[IPv4Address, ...], nat: list[str], guarded: list[Rule]
) -> None:
    ruleset = plan_dns_ruleset(VIRTUAL, upstreams, chained_to=chained_to)
    assert (nat_texts(ruleset), guard_rules(ruleset)) == (nat, guarded)


def test_chained_plan_still_holds_both_chains_at_their_hooks() -> None:
    chained = plan_dns_ruleset(VIRTUAL, (), chained_to=VIRTUAL)
    plain = plan_dns_ruleset(VIRTUAL, (A,))
    assert [(c.name, c.hook, c.kind) for c in chained.table(4).chains] == [
        (c.name, c.hook, c.kind) for c in plain.table(4).chains
    ]


# --- scope -------------------------------------------------------------------


def test_plan_holds_only_its_two_chains_and_no_set() -> None:
    (table,) = plan_dns_ruleset(VIRTUAL, (A,)).tables
    assert ([c.name for c in table.chains], table.sets) == ([DNAT_CHAIN, GUARD_CHAIN], ())


def test_plan_is_ipv4_only_in_table_qubes() -> None:
    assert [(t.family, t.name) for t in plan_dns_ruleset(VIRTUAL, (A,)).tables] == [(4, "qubes")]


def test_plan_without_virtual_resolvers_is_invalid() -> None:
    with pytest.raises(InvalidInput, match="no virtual DNS resolvers"):
        plan_dns_ruleset((), (A,))


# --- the iptables layout of the same intent (Qubes 4.0 names) ------------------------------------


def test_dnat_chain_is_pr_qbs_jumped_from_nat_prerouting() -> None:
    assert NAMES[("qubes", DNAT_CHAIN)] == XtChain("nat", "PR-QBS", "PREROUTING", -100)


def test_guard_chain_is_qbs_dns_jumped_from_filter_forward_before_the_base_chain() -> None:
    guard_at, base_at = NAMES[("qubes", GUARD_CHAIN)], NAMES[("qubes", "forward")]
    assert (guard_at.table, guard_at.name, guard_at.builtin) == ("filter", "QBS-DNS", "FORWARD")
    assert guard_at.priority < base_at.priority


def test_dnat_rule_reads_as_iptables_save_prints_it() -> None:
    ruleset = plan_dns_ruleset((DNS1,), (A,))
    (table,) = ruleset.tables
    assert [_describe_rule(r, table, "nat") for r in chain(ruleset, DNAT_CHAIN).rules] == [
        "-d 10.139.1.1/32 -p udp -m udp --dport 53 -j DNAT --to-destination 192.0.2.53",
        "-d 10.139.1.1/32 -p tcp -m tcp --dport 53 -j DNAT --to-destination 192.0.2.53",
    ]


def test_guard_rules_read_as_iptables_save_prints_them() -> None:
    ruleset = plan_dns_ruleset((DNS1,), ())
    (table,) = ruleset.tables
    assert [_describe_rule(r, table, "filter") for r in chain(ruleset, GUARD_CHAIN).rules] == [
        "-d 10.139.1.1/32 -p tcp -j REJECT --reject-with tcp-reset",
        "-d 10.139.1.1/32 -j REJECT --reject-with icmp-port-unreachable",
    ]
