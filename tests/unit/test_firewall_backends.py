"""The pure parts of the firewall backends: nftables JSON rendering, the iptables layout, choosing a backend.

The expected JSON below is what ``nft -j list ruleset`` (nftables 1.0.6)
printed for these rules after they were loaded from :func:`render_rule`'s
output, counters normalised: comparing the two is how the nftables backend
tells whether a chain differs, so any difference would rewrite the chain at
every run.
"""

from __future__ import annotations

import os
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from vif_hotplug.core.errors import InvalidInput
from vif_hotplug.core.firewall import (
    Accept,
    Addr,
    CtState,
    Dnat,
    DPort,
    Drop,
    Family,
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
    rule,
)
from vif_hotplug.core.plan_base import antispoof_ruleset, base_ruleset, flow_offload, flowtable_device
from vif_hotplug.core.plan_dns import plan_dns_ruleset
from vif_hotplug.core.plan_nat import NatNamespace, nat_ruleset
from vif_hotplug.kernel import firewall_backend
from vif_hotplug.kernel.firewall_backend import choose_backend, iptables_flavour
from vif_hotplug.kernel.iptables_backend import NAMES, IptablesBackend, _describe_rule, ipset_name, ipset_type
from vif_hotplug.kernel.nftables_backend import (
    PROBE_TABLE,
    NftablesBackend,
    _element_value,
    _normalise,
    _offload_commands,
    _offload_drift,
    _parse_element,
    _set_specs,
    render_rule,
)


def meta(key: str) -> dict[str, Any]:
    return {"meta": {"key": key}}


def payload(proto: str, field: str) -> dict[str, Any]:
    return {"payload": {"protocol": proto, "field": field}}


def match(left: dict[str, Any], right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


COUNTER: dict[str, Any] = {"counter": None}

AS_NFT_LISTS_THEM: list[tuple[str, Family, Rule, list[dict[str, Any]]]] = [
    ("negated protocol", 4, rule(Proto("tcp", negate=True), verdict=Drop()),
     [match(meta("l4proto"), "tcp", "!="), {"drop": None}]),
    ("one icmp type by name", 4, rule(IcmpType((8,)), verdict=Accept()),
     [match(payload("icmp", "type"), "echo-request"), {"accept": None}]),
    ("icmp types as a set, with counter", 4, rule(IcmpType((0, 8)), counter=True, verdict=Accept()),
     [match(payload("icmp", "type"), {"set": ["echo-reply", "echo-request"]}), COUNTER, {"accept": None}]),
    ("icmpv6 types by name", 6, rule(IcmpType((134, 137)), verdict=Drop()),
     [match(payload("icmpv6", "type"), {"set": ["nd-router-advert", "nd-redirect"]}), {"drop": None}]),
    ("one ct state", 4, rule(CtState(("new",)), verdict=Accept()),
     [match({"ct": {"key": "state"}}, "new", "in"), {"accept": None}]),
    ("ct states as a list", 4, rule(CtState(("established", "related")), verdict=Accept()),
     [match({"ct": {"key": "state"}}, ["established", "related"], "in"), {"accept": None}]),
    ("negated prefix", 4, rule(Addr("src", "10.1.0.0/16", negate=True), verdict=Drop()),
     [match(payload("ip", "saddr"), {"prefix": {"addr": "10.1.0.0", "len": 16}}, "!="), {"drop": None}]),
    ("host address without prefix", 6, rule(Addr("src", "fd09::1/128"), verdict=Drop()),
     [match(payload("ip6", "saddr"), "fd09::1"), {"drop": None}]),
    ("negated interface name", 4, rule(IfName("in", "vif4.0", negate=True), verdict=Accept()),
     [match(meta("iifname"), "vif4.0", "!="), {"accept": None}]),
    ("interface by index", 4, rule(IfName("in", "lo", by_index=True), verdict=Jump("x")),
     [match(meta("iif"), "lo"), {"jump": {"target": "x"}}]),
    ("negated group", 4, rule(IfGroup("in", 2, negate=True), verdict=Accept()),
     [match(meta("iifgroup"), 2, "!="), {"accept": None}]),
    ("tcp reset without its protocol", 4, rule(Addr("dst", "10.0.0.1/32"), Proto("tcp"), verdict=Reject("tcp-reset")),
     [match(payload("ip", "daddr"), "10.0.0.1"), {"reject": {"type": "tcp reset"}}]),
    ("tcp reset in ip6", 6, rule(Proto("tcp"), verdict=Reject("tcp-reset")), [{"reject": {"type": "tcp reset"}}]),
    ("port unreachable", 4, rule(verdict=Reject("icmp-port-unreachable")),
     [{"reject": {"type": "icmp", "expr": "port-unreachable"}}]),
    ("admin prohibited", 6, rule(verdict=Reject("icmp6-adm-prohibited")),
     [{"reject": {"type": "icmpv6", "expr": "admin-prohibited"}}]),
    ("host prohibited", 4, rule(verdict=Reject("icmp-host-prohibited")),
     [{"reject": {"type": "icmp", "expr": "host-prohibited"}}]),
    ("dport dnat", 4, rule(DPort("tcp", 53), verdict=Dnat("1.2.3.4")),
     [match(payload("tcp", "dport"), 53), {"dnat": {"addr": "1.2.3.4"}}]),
    ("icmpv6 protocol", 6, rule(Proto("icmpv6"), verdict=Accept()),
     [match(meta("l4proto"), "ipv6-icmp"), {"accept": None}]),
    ("goto", 4, rule(verdict=Goto("x")), [{"goto": {"target": "x"}}]),
    ("masquerade", 4, rule(verdict=Masquerade()), [{"masquerade": None}]),
    ("counter only", 4, rule(counter=True), [COUNTER]),
    ("connected set lookup", 4, rule(InSet("connected", "dst"), verdict=Drop()),
     [match(payload("ip", "daddr"), "@connected"), {"drop": None}]),
]


@pytest.mark.parametrize(("family", "r", "listed"), [pytest.param(*row[1:], id=row[0]) for row in AS_NFT_LISTS_THEM])
def test_render_rule_gives_what_nft_lists_back(family: Family, r: Rule, listed: list[dict[str, Any]]) -> None:
    assert render_rule(r, family) == [listed]


def test_a_network_set_lookup_renders_once_per_physical_set() -> None:
    left = {"concat": [meta("iifname"), payload("ip", "saddr")]}
    assert render_rule(rule(InSet("allowed"), verdict=Accept()), 4) == [
        [match(left, "@allowed"), {"accept": None}],
        [match(left, "@allowed-nets"), {"accept": None}],
    ]


def test_listed_counters_compare_equal_to_rendered_ones() -> None:
    listed = [match(payload("ip", "saddr"), "@downstream"), {"counter": {"packets": 12, "bytes": 3400}}, {"drop": None}]
    assert _normalise(listed) == render_rule(rule(InSet("downstream"), verdict=Drop(), counter=True), 4)[0]


NAT = nat_ruleset(NatNamespace("vif4.0", "10.137.0.50", "10.138.0.2", "10.138.0.1", "10.137.0.1", "00:16:3e:0:0:1"))
ALL_RULESETS: list[Ruleset] = [
    base_ruleset(True),
    base_ruleset(False),
    NAT,
    plan_dns_ruleset([IPv4Address("10.139.1.1")], [IPv4Address("192.0.2.53")]),
]


def all_rules() -> list[tuple[Family, Rule]]:
    return [(t.family, r) for rs in ALL_RULESETS for t in rs.tables for c in t.chains for r in c.rules]


@pytest.mark.parametrize(("family", "r"), all_rules(), ids=lambda v: v.text(4) if isinstance(v, Rule) else str(v))
def test_every_planned_rule_renders_for_nftables(family: Family, r: Rule) -> None:
    rendered = render_rule(r, family)
    assert rendered and all(e for e in rendered)
    assert all((COUNTER in e) is r.counter for e in rendered)


# --- sets and elements -------------------------------------------------------------------------------------


def test_allowed_sets_are_keyed_on_interface_and_address_with_an_interval_companion() -> None:
    assert _set_specs(6, "qubes", "allowed") == [
        {"family": "ip6", "table": "qubes", "type": ["ifname", "ipv6_addr"], "name": "allowed"},
        {"family": "ip6", "table": "qubes", "type": ["ifname", "ipv6_addr"], "name": "allowed-nets",
         "flags": ["interval"]},
    ]


def test_connected_set_holds_addresses_only() -> None:
    assert _set_specs(4, "qubes", "connected") == [
        {"family": "ip", "table": "qubes", "type": "ipv4_addr", "name": "connected"},
    ]


@pytest.mark.parametrize(
    ("element", "value"),
    [
        (SetElement(4, "allowed", "10.137.0.5/32", "vif4.0"), {"concat": ["vif4.0", "10.137.0.5"]}),
        (SetElement(4, "downstream", "10.137.8.0/24"), {"prefix": {"addr": "10.137.8.0", "len": 24}}),
        (SetElement(6, "connected", "fd09::5/128"), "fd09::5"),
    ],
    ids=["allowed pair", "network", "ipv6 address"],
)
def test_element_values_round_trip_through_the_listing(element: SetElement, value: Any) -> None:
    assert _element_value(element) == value
    assert _parse_element(element.family, element.set, value) == element


def test_nftables_describe_names_the_network_companion_sets() -> None:
    lines = NftablesBackend("/nonexistent/lock", 1.0).describe(antispoof_ruleset((4,)))
    assert "add set ip qubes allowed (and allowed-nets for networks)" in lines
    assert "add set ip qubes connected" in lines


def test_nftables_describe_leaves_out_chains_current_qubes_has_no_place_for() -> None:
    lines = NftablesBackend("/nonexistent/lock", 1.0).describe(base_ruleset(True))
    assert not [line for line in lines if " services" in line]


# --- the iptables layout ------------------------------------------------------------------------------------


def every_chain() -> list[tuple[str, str]]:
    return sorted({(t.name, c.name) for rs in ALL_RULESETS for t in rs.tables for c in t.chains})


@pytest.mark.parametrize("key", every_chain(), ids="/".join)
def test_every_planned_chain_has_a_place_in_xtables(key: tuple[str, str]) -> None:
    assert key in NAMES


@pytest.mark.parametrize(
    ("logical", "xtables"),
    [
        ("prerouting", ("raw", "QBS-ANTISPOOF")),
        ("custom-input", ("filter", "QBS-INPUT-ADMIN")),
        ("custom-forward", ("filter", "QBS-FORWARD")),
        ("services", ("nat", "PR-QBS-SERVICES")),
        ("postrouting", ("nat", "QBS-POSTROUTING")),
    ],
)
def test_chains_keep_their_qubes_4_0_names(logical: str, xtables: tuple[str, str]) -> None:
    where = NAMES[("qubes", logical)]
    assert (where.table, where.name) == xtables


def test_ipsets_are_named_per_family_and_typed_per_set() -> None:
    assert (ipset_name("allowed", 4), ipset_type("allowed")) == ("qbs-allowed4", "hash:net,iface")
    assert (ipset_name("downstream", 6), ipset_type("downstream")) == ("qbs-downstream6", "hash:net")


def test_an_accept_in_the_raw_table_only_returns_to_the_builtin_chain() -> None:
    table = antispoof_ruleset((4,)).table(4)
    assert _describe_rule(rule(InSet("allowed"), verdict=Accept()), table, "raw") == (
        "-m set --match-set qbs-allowed4 src,src -j RETURN"
    )


def test_an_accept_in_the_filter_table_accepts() -> None:
    table = base_ruleset(True).table(4)
    assert _describe_rule(rule(IfName("in", "lo", by_index=True), verdict=Accept()), table, "filter") == (
        "-i lo -j ACCEPT"
    )


def test_interface_groups_read_as_the_devgroup_match() -> None:
    table = base_ruleset(True).table(4)
    assert _describe_rule(rule(IfGroup("out", 2, negate=True), verdict=Drop()), table, "mangle") == (
        "-m devgroup ! --dst-group 0x2 -j DROP"
    )


def test_a_goto_names_the_xtables_chain() -> None:
    table = antispoof_ruleset((4,)).table(4)
    assert _describe_rule(rule(IfGroup("in", 2), verdict=Goto("antispoof")), table, "raw") == (
        "-m devgroup --src-group 0x2 -g QBS-ANTISPOOF-VIF"
    )


def test_iptables_describe_keeps_reserved_chains_untouched_and_sets_policies() -> None:
    lines = IptablesBackend("/nonexistent/lock", 1.0).describe(base_ruleset(True))
    assert "iptables -t filter -N QBS-FORWARD (reserved: contents left alone)" in lines
    assert "iptables -t filter -P INPUT DROP" in lines
    assert "iptables -t filter -P FORWARD ACCEPT" in lines
    assert "ipset create qbs-allowed6 hash:net,iface (if missing)" in lines


def test_iptables_describe_shows_one_rule_per_icmpv6_type_as_installed() -> None:
    # The icmp6 match takes one type: the encoder installs one rule per type, and the
    # dry run must show those rules, in syntax ip6tables accepts.
    lines = IptablesBackend("/nonexistent/lock", 1.0).describe(base_ruleset(True))
    icmp = [line for line in lines if "--icmpv6-type" in line]
    assert icmp == [
        "ip6tables -t filter -A QBS-INPUT-ICMPV6 -p icmpv6 -m icmp6 --icmpv6-type 134 -j DROP",
        "ip6tables -t filter -A QBS-INPUT-ICMPV6 -p icmpv6 -m icmp6 --icmpv6-type 137 -j DROP",
    ]


def test_iptables_describe_lists_no_rule_for_counting_only_rules() -> None:
    # xtables counts every rule anyway: a rule without a verdict has no xtables rule.
    rs = base_ruleset(True)
    lines = IptablesBackend("/nonexistent/lock", 1.0).describe(rs)
    with_verdict = [r for r in rs.table(4).chain("input").rules if r.verdict is not None]
    assert len([line for line in lines if line.startswith("iptables -t filter -A QBS-INPUT ")]) == len(with_verdict)


# --- choosing a backend -----------------------------------------------------------------------------------


@pytest.mark.parametrize("choice", ["nftables", "iptables"])
def test_an_explicit_backend_choice_is_taken_as_is(choice: str) -> None:
    assert choose_backend(choice, "/nonexistent") == choice


def test_an_unknown_backend_choice_is_refused() -> None:
    with pytest.raises(InvalidInput, match="'ebtables'"):
        choose_backend("ebtables")


def fake_iptables(tmp_path: Path, target: str) -> str:
    """A PATH whose ``iptables`` is a symlink to ``target``, as Debian's alternatives make it."""
    binary = tmp_path / target
    binary.write_text("#!/bin/sh\nexit 99\n")
    binary.chmod(0o755)
    (tmp_path / "iptables").symlink_to(binary)
    return str(tmp_path)


@pytest.mark.parametrize(
    ("target", "flavour"),
    [("xtables-nft-multi", "nf_tables"), ("xtables-legacy-multi", "legacy")],
)
def test_iptables_flavour_is_read_from_the_symlink(tmp_path: Path, target: str, flavour: str) -> None:
    assert iptables_flavour(fake_iptables(tmp_path, target)) == flavour


def test_no_iptables_command_has_no_flavour(tmp_path: Path) -> None:
    assert iptables_flavour(str(tmp_path)) is None


@pytest.mark.parametrize(
    ("target", "legacy_in_kernel", "chosen"),
    [
        ("xtables-nft-multi", True, "nftables"),
        ("xtables-legacy-multi", True, "iptables"),
        ("xtables-legacy-multi", False, "nftables"),
    ],
    ids=["nf_tables flavour", "legacy flavour", "legacy flavour, no xtables in the kernel"],
)
def test_auto_follows_the_hosts_iptables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str, legacy_in_kernel: bool, chosen: str
) -> None:
    marker = tmp_path / "ip_tables_names"
    if legacy_in_kernel:
        marker.write_text("")
    monkeypatch.setattr(firewall_backend, "LEGACY_XTABLES", str(marker))
    assert choose_backend("auto", fake_iptables(tmp_path, target)) == chosen


def test_auto_without_iptables_is_nftables(tmp_path: Path) -> None:
    assert not os.path.exists(tmp_path / "iptables")
    assert choose_backend("auto", str(tmp_path)) == "nftables"


# --- flow offload ------------------------------------------------------------------------------------------

OFFLOAD = flow_offload(["eth0", "vif5.0"])
OFFLOAD_RULE = [match(meta("l4proto"), {"set": ["tcp", "udp"]}), match(meta("iifgroup"), 2),
                match(meta("oifgroup"), 1), {"flow": {"op": "add", "flowtable": "@qubes-accel"}}]


def test_flow_offload_renders_as_current_qubes_recreates_its_table() -> None:
    table = {"family": "inet", "name": "qubes-nat-accel"}
    assert _offload_commands(OFFLOAD) == [
        {"add": {"table": table}}, {"delete": {"table": table}}, {"add": {"table": table}},
        {"add": {"flowtable": {"family": "inet", "table": "qubes-nat-accel", "name": "qubes-accel", "hook": "ingress",
                               "prio": 0, "dev": ["eth0", "vif5.0"]}}},
        {"add": {"chain": {"family": "inet", "table": "qubes-nat-accel", "name": "qubes-accel", "type": "filter",
                           "hook": "forward", "prio": 5, "policy": "accept"}}},
        {"add": {"rule": {"family": "inet", "table": "qubes-nat-accel", "chain": "qubes-accel",
                          "expr": OFFLOAD_RULE}}},
    ]


def test_a_flowtable_without_devices_is_rendered_without_a_device_list() -> None:
    flowtable = _offload_commands(flow_offload([]))[3]["add"]["flowtable"]
    assert "dev" not in flowtable


def listed_offload(devices: Any, prio: int = 5, rule_expr: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """``nft -j list table inet qubes-nat-accel`` as libnftables prints it (one device reads as a string)."""
    return [
        {"table": {"family": "inet", "name": "qubes-nat-accel"}},
        {"flowtable": {"family": "inet", "table": "qubes-nat-accel", "name": "qubes-accel", "hook": "ingress",
                       "prio": 0, "dev": devices}},
        {"chain": {"family": "inet", "table": "qubes-nat-accel", "name": "qubes-accel", "type": "filter",
                   "hook": "forward", "prio": prio, "policy": "accept"}},
        {"rule": {"family": "inet", "table": "qubes-nat-accel", "chain": "qubes-accel",
                  "expr": rule_expr if rule_expr is not None else OFFLOAD_RULE}},
    ]


def test_flow_offload_in_place_has_no_drift_even_with_the_vifs_onlines_added() -> None:
    assert _offload_drift(OFFLOAD, listed_offload(["eth0", "vif5.0", "vif9.0"])) == []


def test_a_missing_flow_offload_table_is_drift() -> None:
    assert _offload_drift(OFFLOAD, None) == ["table inet qubes-nat-accel missing"]


def test_devices_the_flowtable_lacks_are_the_only_drift_when_the_rest_is_in_place() -> None:
    assert _offload_drift(OFFLOAD, listed_offload("eth0")) == [
        "flowtable inet qubes-nat-accel qubes-accel lacks vif5.0"]


@pytest.mark.parametrize("listed", [listed_offload(["eth0", "vif5.0"], prio=0),
                                    listed_offload(["eth0", "vif5.0"], rule_expr=OFFLOAD_RULE[1:])],
                         ids=["other priority", "other rule"])
def test_an_offload_chain_that_differs_is_drift(listed: list[dict[str, Any]]) -> None:
    assert _offload_drift(OFFLOAD, listed) == ["chain inet qubes-nat-accel qubes-accel missing or differs"]


def test_the_probe_finds_flow_offload_where_the_kernel_takes_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    b = NftablesBackend("/nonexistent.lock", 1.0)
    monkeypatch.setattr(b, "_dry_run", lambda text: (0, ""))
    assert b.flow_offload_missing() is None


def test_the_probe_says_why_where_the_kernel_has_no_flowtables(monkeypatch: pytest.MonkeyPatch) -> None:
    b = NftablesBackend("/nonexistent.lock", 1.0)
    # What libnftables 1.0.6 answered on this project's kernel (CONFIG_NF_FLOW_TABLE not set).
    err = ("Error: Could not process rule: No such file or directory\n"
           "add flowtable inet qubes-nat-accel-probe ft { hook ingress priority 0; }\n")
    monkeypatch.setattr(b, "_dry_run", lambda text: (1, err))
    assert b.flow_offload_missing() == (
        "the kernel refused a flowtable (Could not process rule: No such file or directory): it needs "
        "CONFIG_NF_FLOW_TABLE, CONFIG_NF_FLOW_TABLE_INET and CONFIG_NFT_FLOW_OFFLOAD")


def test_the_probe_sends_a_throw_away_table_with_the_flowtable_and_its_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    b = NftablesBackend("/nonexistent.lock", 1.0)
    sent: list[str] = []
    monkeypatch.setattr(b, "_dry_run", lambda text: (sent.append(text), (0, ""))[1])
    b.flow_offload_missing()
    assert [line.split(" {")[0] for line in sent[0].splitlines()] == [
        f"add table inet {PROBE_TABLE}", f"add flowtable inet {PROBE_TABLE} ft", f"add chain inet {PROBE_TABLE} c",
        f"add rule inet {PROBE_TABLE} c meta l4proto",
    ]


def test_iptables_has_no_flow_offload_and_does_nothing_about_it() -> None:
    b = IptablesBackend("/nonexistent.lock", 1.0)
    assert (b.flow_offload_missing() is not None, b.ensure_offload(OFFLOAD), b.add_flow_device(
        flowtable_device("vif5.0"))) == (True, False, False)
