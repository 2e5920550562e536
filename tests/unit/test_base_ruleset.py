"""The netvm's firewall intent (plan_base): anti-spoofing, NAT, input and forward as current Qubes lays them out.

Rule texts are nft syntax: every one below loads as is with ``nft -f`` (nftables 1.0.6), and the
last table holds what nft printed back for them.
"""

from __future__ import annotations

import re
from ipaddress import IPv4Address

import pytest

from vif_hotplug.core.firewall import (
    PRIORITY,
    Accept,
    Chain,
    CtState,
    DPort,
    Drop,
    Family,
    FlowtableDevice,
    Hook,
    IcmpType,
    IfGroup,
    IfName,
    Jump,
    Proto,
    Reject,
    Ruleset,
    merge,
    rule,
)
from vif_hotplug.core.model import Step, Sysctl
from vif_hotplug.core.plan_base import (
    antispoof_ruleset,
    base_ruleset,
    flow_offload,
    flowtable_device,
    plan_base,
    plan_flow_offload,
    plan_stop,
)
from vif_hotplug.core.plan_dns import plan_dns_ruleset
from vif_hotplug.core.plan_nat import NatNamespace, nat_ruleset

OPEN = base_ruleset(ipv6=True)
CLOSED = base_ruleset(ipv6=False)
IPV4_ONLY_KERNEL = base_ruleset(ipv6=True, ipv6_in_kernel=False)


def chain(rs: Ruleset, family: Family, name: str) -> Chain:
    return rs.table(family, "qubes").chain(name)


def texts(rs: Ruleset, family: Family, name: str) -> list[str]:
    return [r.text(family) for r in chain(rs, family, name).rules]


def names(rs: Ruleset, family: Family) -> set[str]:
    return {c.name for c in rs.table(family, "qubes").chains}


# --- anti-spoofing ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", [4, 6])
def test_prerouting_sends_vm_packets_to_antispoof_and_drops_other_packets_from_vm_addresses(family: Family) -> None:
    ip = "ip6" if family == 6 else "ip"
    assert texts(antispoof_ruleset((4, 6)), family, "prerouting") == [
        "iifgroup 2 goto antispoof",
        "iifname vif* counter drop",
        f"{ip} saddr @downstream counter drop",
        f"{ip} saddr @connected counter drop",
    ]


@pytest.mark.parametrize("family", [4, 6])
def test_prerouting_is_a_filter_chain_at_raw_priority(family: Family) -> None:
    assert chain(antispoof_ruleset((4, 6)), family, "prerouting").hook == Hook("prerouting", "filter", -300)


@pytest.mark.parametrize("family", [4, 6])
def test_antispoof_accepts_allowed_interface_source_pairs_and_drops_the_rest(family: Family) -> None:
    ip = "ip6" if family == 6 else "ip"
    c = chain(antispoof_ruleset((4, 6)), family, "antispoof")
    assert (c.hook, [r.text(family) for r in c.rules]) == (
        None, [f"iifname . {ip} saddr @allowed accept", "counter drop"],
    )


@pytest.mark.parametrize("family", [4, 6])
def test_downstream_out_drops_packets_leaving_a_non_vm_interface_towards_a_vm_or_connected_address(
    family: Family,
) -> None:
    ip = "ip6" if family == 6 else "ip"
    c = chain(antispoof_ruleset((4, 6)), family, "downstream-out")
    assert c.hook == Hook("postrouting", "filter", PRIORITY["raw"])
    assert [r.text(family) for r in c.rules] == ["oifgroup 2 accept", f"{ip} daddr @downstream counter drop",
                                                 f"{ip} daddr @connected counter drop"]


def test_packets_towards_vm_interfaces_leave_downstream_out_after_one_comparison() -> None:
    first = chain(antispoof_ruleset((4,)), 4, "downstream-out").rules[0]
    assert (first.match, first.verdict) == ((IfGroup("out", 2),), Accept())


@pytest.mark.parametrize("family", [4, 6])
def test_antispoof_tables_hold_the_three_sets(family: Family) -> None:
    assert antispoof_ruleset((4, 6)).table(family).sets == ("allowed", "downstream", "connected")


def test_antispoof_ruleset_has_only_the_families_asked_for() -> None:
    assert [t.family for t in antispoof_ruleset((4,)).tables] == [4]


@pytest.mark.parametrize("rs", [OPEN, CLOSED], ids=["ipv6 on", "ipv6 off"])
def test_base_ruleset_includes_the_antispoofing_of_both_families(rs: Ruleset) -> None:
    for family in (4, 6):
        for c in antispoof_ruleset((4, 6)).table(family).chains:
            assert chain(rs, family, c.name) == c


# --- forward --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", [4, 6])
def test_forward_blocks_only_new_connections_towards_vms(family: Family) -> None:
    assert texts(OPEN, family, "forward") == [
        "jump custom-forward",
        "ct state invalid counter drop",
        "ct state established,related accept",
        "oifgroup 2 counter drop",
    ]


@pytest.mark.parametrize("family", [4, 6])
def test_forward_policy_is_accept(family: Family) -> None:
    assert chain(OPEN, family, "forward").hook == Hook("forward", "filter", 0, "accept")


# --- input ----------------------------------------------------------------------------------------


def test_ipv4_input_follows_current_qubes() -> None:
    from_vm = IfGroup("in", 2)
    assert chain(OPEN, 4, "input").rules == (
        rule(verdict=Jump("custom-input")),
        rule(CtState(("invalid",)), verdict=Drop(), counter=True),
        rule(from_vm, DPort("udp", 68), verdict=Drop(), counter=True),
        rule(CtState(("established", "related")), verdict=Accept()),
        rule(from_vm, Proto("icmp"), verdict=Accept()),
        rule(IfName("in", "lo", by_index=True), verdict=Accept()),
        rule(from_vm, verdict=Reject("icmp-host-prohibited"), counter=True),
        rule(counter=True),
    )


@pytest.mark.parametrize("family", [4, 6])
def test_input_policy_is_drop(family: Family) -> None:
    assert chain(OPEN, family, "input").hook == Hook("input", "filter", 0, "drop")


def test_ipv6_input_sends_vm_packets_to_the_icmpv6_chain() -> None:
    assert texts(OPEN, 6, "input") == [
        "jump custom-input",
        "ct state invalid counter drop",
        "ct state established,related accept",
        "iifgroup 2 goto _icmpv6",
        "iif lo accept",
        "ip6 saddr fe80::/64 ip6 daddr fe80::/64 udp dport 546 accept",
        "meta l4proto ipv6-icmp accept",
        "counter",
    ]


def test_ipv6_from_vms_rejects_non_icmpv6_and_drops_router_advertisements_and_redirects() -> None:
    assert chain(OPEN, 6, "_icmpv6").rules == (
        rule(Proto("icmpv6", negate=True), verdict=Reject("icmp6-adm-prohibited"), counter=True),
        rule(IcmpType((134, 137)), verdict=Drop(), counter=True),
        rule(verdict=Accept()),
    )


def test_icmpv6_chain_is_a_regular_chain() -> None:
    assert chain(OPEN, 6, "_icmpv6").hook is None


# --- NAT --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", [4, 6])
def test_postrouting_masquerades_all_but_traffic_towards_vms_and_lo(family: Family) -> None:
    c = chain(OPEN, family, "postrouting")
    assert c.hook == Hook("postrouting", "nat", PRIORITY["srcnat"])
    assert [r.text(family) for r in c.rules] == ["oifgroup 2 accept", "oif lo accept", "masquerade"]


# --- reserved chains -----------------------------------------------------------------------------------

RESERVED = ["custom-input", "custom-forward", "services"]


@pytest.mark.parametrize("name", RESERVED)
@pytest.mark.parametrize("family", [4, 6])
def test_administrators_chains_are_reserved_and_empty(family: Family, name: str) -> None:
    c = chain(OPEN, family, name)
    assert (c.kind, c.rules) == ("reserved", ())


def test_reserved_chain_lines_say_they_are_never_edited() -> None:
    (line,) = chain(OPEN, 4, "custom-input").lines(4, "qubes")
    assert "reserved" in line and "never edited" in line


def test_services_chain_runs_right_after_dns_dnat() -> None:
    assert chain(OPEN, 4, "services").hook == Hook("prerouting", "nat", PRIORITY["dstnat"] + 1)


# --- IPv6 off and no IPv6 in the kernel -------------------------------------------------------------------


def test_ipv6_off_drops_everything_from_vms_before_anything_is_accepted() -> None:
    rules = [r.text(6) for r in chain(CLOSED, 6, "input").rules]
    first_accept = next(i for i, r in enumerate(rules) if r.endswith("accept"))
    assert rules.index("iifgroup 2 counter drop") < first_accept


def test_ipv6_off_keeps_the_netvms_own_ipv6_input_as_with_ipv6_on() -> None:
    # Current Qubes loads qubes-ipv6.nft whatever the netvm's IPv6 (Qubes issue 9903): neighbour
    # discovery, router advertisements and DHCPv6 replies on the uplink still reach the netvm.
    c = chain(CLOSED, 6, "input")
    assert (c.hook, [r.text(6) for r in c.rules]) == (Hook("input", "filter", 0, "drop"), [
        "jump custom-input", "ct state invalid counter drop", "iifgroup 2 counter drop",
        "ct state established,related accept", "iif lo accept",
        "ip6 saddr fe80::/64 ip6 daddr fe80::/64 udp dport 546 accept", "meta l4proto ipv6-icmp accept", "counter",
    ])


def test_ipv6_off_keeps_the_administrators_input_chain() -> None:
    assert chain(CLOSED, 6, "custom-input").kind == "reserved"


def test_ipv6_off_forwards_nothing() -> None:
    c = chain(CLOSED, 6, "forward")
    assert (c.hook, [r.text(6) for r in c.rules]) == (Hook("forward", "filter", 0, "drop"), ["counter"])


@pytest.mark.parametrize("name", ["postrouting", "_icmpv6"])
def test_ipv6_off_removes_the_ip6_chains_of_ipv6_on(name: str) -> None:
    assert chain(CLOSED, 6, name).kind == "absent"


def test_ipv6_off_leaves_ipv4_as_with_ipv6_on() -> None:
    assert CLOSED.table(4) == OPEN.table(4)


@pytest.mark.parametrize("rs", [IPV4_ONLY_KERNEL, base_ruleset(False, False)], ids=["ipv6 on", "ipv6 off"])
def test_kernel_without_ipv6_gets_no_ip6_table(rs: Ruleset) -> None:
    assert {t.family for t in rs.tables} == {4}


def test_base_ruleset_is_one_table_per_family() -> None:
    assert sorted((t.family, t.name) for t in OPEN.tables) == [(4, "qubes"), (6, "qubes")]


def test_every_jump_and_goto_names_a_chain_of_the_same_table() -> None:
    for t in OPEN.tables:
        targets = {getattr(r.verdict, "chain", None) for c in t.chains for r in c.rules} - {None}
        assert targets <= {c.name for c in t.chains}, t.family


def test_merge_joins_tables_of_the_same_family_and_name() -> None:
    a = Ruleset("a", (antispoof_ruleset((4,)).table(4),))
    merged = merge("both", a, Ruleset("b", (OPEN.table(6),)), Ruleset("c", (CLOSED.table(4),)))
    assert [(t.family, len(t.chains)) for t in merged.tables] == [
        (4, len(a.tables[0].chains) + len(CLOSED.table(4).chains)), (6, len(OPEN.table(6).chains)),
    ]


# --- plan_base and plan_stop ----------------------------------------------------------------------------


def test_plan_base_puts_the_firewall_in_before_forwarding() -> None:
    assert plan_base(True).steps == (
        Step("ensure", OPEN),
        Step("set", Sysctl("net/ipv4/ip_forward", "1")),
        Step("set", Sysctl("net/ipv6/conf/all/forwarding", "1")),
    )


def test_plan_base_with_ipv6_off_leaves_ipv6_forwarding_alone() -> None:
    plan = plan_base(False)
    assert plan.steps == (Step("ensure", CLOSED), Step("set", Sysctl("net/ipv4/ip_forward", "1")))
    assert any("IPv6 is off" in n for n in plan.notes)


def test_plan_base_without_ipv6_in_the_kernel_plans_nothing_ip6() -> None:
    plan = plan_base(True, ipv6_in_kernel=False)
    assert plan.steps == (Step("ensure", IPV4_ONLY_KERNEL), Step("set", Sysctl("net/ipv4/ip_forward", "1")))


@pytest.mark.parametrize("ipv6", [True, False], ids=["ipv6 on", "ipv6 off"])
def test_plan_base_without_forwarding_plans_no_forwarding_sysctl(ipv6: bool) -> None:
    plan = plan_base(ipv6, forwarding=False)
    assert plan.steps == (Step("ensure", OPEN if ipv6 else CLOSED),)
    assert any("qubes-network.service" in n for n in plan.notes)


def test_plan_stop_switches_forwarding_off() -> None:
    assert plan_stop() == (
        Step("set", Sysctl("net/ipv4/ip_forward", "0")),
        Step("set", Sysctl("net/ipv6/conf/all/forwarding", "0")),
    )


def test_plan_stop_without_ipv6_in_the_kernel_touches_only_ipv4() -> None:
    assert plan_stop(ipv6_in_kernel=False) == (Step("set", Sysctl("net/ipv4/ip_forward", "0")),)


def test_ruleset_lines_show_sets_and_chains_for_dry_run() -> None:
    lines = antispoof_ruleset((4,)).lines()
    assert lines[0] == "firewall antispoof:"
    assert "  set ip qubes allowed" in lines
    assert "  chain ip qubes prerouting { type filter hook prerouting priority raw; policy accept; }" in lines
    assert "    iifgroup 2 goto antispoof" in lines


# --- text() reads as nft lists the rule ------------------------------------------------------------------
#
# What ``nft list ruleset`` (nftables 1.0.6) printed for each planned rule once loaded. Only the
# numbers of a counter and the quotes around interface names are ignored.

DNS = plan_dns_ruleset([IPv4Address("10.139.1.1")], [IPv4Address("192.0.2.53")])
DNS_NONE = plan_dns_ruleset([IPv4Address("10.139.1.1")], [])
NAT = nat_ruleset(NatNamespace("vif4.0", "10.137.0.50", "10.138.0.2", "10.138.0.1", "10.137.0.1", "00:16:3e:0:0:1"))

AS_NFT_PRINTS: list[tuple[Ruleset, Family, str, str, int, str]] = [
    (OPEN, 4, "qubes", "prerouting", 0, "iifgroup 2 goto antispoof"),
    (OPEN, 4, "qubes", "prerouting", 1, 'iifname "vif*" counter packets 0 bytes 0 drop'),
    (OPEN, 4, "qubes", "prerouting", 2, "ip saddr @downstream counter packets 0 bytes 0 drop"),
    (OPEN, 4, "qubes", "antispoof", 0, "iifname . ip saddr @allowed accept"),
    (OPEN, 4, "qubes", "antispoof", 1, "counter packets 0 bytes 0 drop"),
    (OPEN, 4, "qubes", "downstream-out", 0, "oifgroup 2 accept"),
    (OPEN, 4, "qubes", "downstream-out", 1, "ip daddr @downstream counter packets 0 bytes 0 drop"),
    (OPEN, 4, "qubes", "downstream-out", 2, "ip daddr @connected counter packets 0 bytes 0 drop"),
    (OPEN, 4, "qubes", "postrouting", 1, 'oif "lo" accept'),
    (OPEN, 4, "qubes", "postrouting", 2, "masquerade"),
    (OPEN, 4, "qubes", "forward", 0, "jump custom-forward"),
    (OPEN, 4, "qubes", "forward", 2, "ct state established,related accept"),
    (OPEN, 4, "qubes", "input", 2, "iifgroup 2 udp dport 68 counter packets 0 bytes 0 drop"),
    (OPEN, 4, "qubes", "input", 4, "iifgroup 2 meta l4proto icmp accept"),
    (OPEN, 4, "qubes", "input", 6, "iifgroup 2 counter packets 0 bytes 0 reject with icmp host-prohibited"),
    (OPEN, 4, "qubes", "input", 7, "counter packets 0 bytes 0"),
    (OPEN, 6, "qubes", "_icmpv6", 0,
     "meta l4proto != ipv6-icmp counter packets 0 bytes 0 reject with icmpv6 admin-prohibited"),
    (OPEN, 6, "qubes", "_icmpv6", 1, "icmpv6 type { nd-router-advert, nd-redirect } counter packets 0 bytes 0 drop"),
    (OPEN, 6, "qubes", "input", 5, "ip6 saddr fe80::/64 ip6 daddr fe80::/64 udp dport 546 accept"),
    (OPEN, 6, "qubes", "input", 6, "meta l4proto ipv6-icmp accept"),
    (DNS, 4, "qubes", "dnat-dns", 0, "ip daddr 10.139.1.1 udp dport 53 dnat to 192.0.2.53"),
    (DNS_NONE, 4, "qubes", "dns-guard", 0, "ip daddr 10.139.1.1 reject with tcp reset"),
    (DNS_NONE, 4, "qubes", "dns-guard", 1, "ip daddr 10.139.1.1 reject"),
    (NAT, 4, "qubes-nat", "antispoof", 0, 'iifname "vif4.0" ip saddr != 10.138.0.2 drop'),
    (NAT, 4, "qubes-nat", "dnat", 0, 'iifname "vif4.0-p" ip daddr 10.137.0.50 dnat to 10.138.0.2'),
    (NAT, 4, "qubes-nat", "snat", 1, 'oifname "vif4.0" ip saddr 10.137.0.1 snat to 10.138.0.1'),
]


def as_compared(printed: str) -> str:
    return re.sub(r" packets \d+ bytes \d+", "", printed).replace('"', "")


@pytest.mark.parametrize(
    ("rs", "family", "table", "name", "index", "printed"),
    [pytest.param(*row, id=f"{row[1]} {row[3]} {row[4]}") for row in AS_NFT_PRINTS],
)
def test_rule_text_is_what_nft_prints(
    rs: Ruleset, family: Family, table: str, name: str, index: int, printed: str
) -> None:
    assert rs.table(family, table).chain(name).rules[index].text(family) == as_compared(printed)


# --- flow offload (current Qubes' inet qubes-nat-accel) --------------------------------------------


def test_flow_offload_is_current_qubes_nat_accel_table() -> None:
    f = flow_offload(["vif5.0"])
    assert (f.table, f.flowtable, f.from_group, f.to_group, f.forward_priority, f.ingress_priority) == (
        "qubes-nat-accel", "qubes-accel", 2, 1, PRIORITY["filter"] + 5, 0,
    )


def test_flow_offload_lists_each_device_once_in_order() -> None:
    assert flow_offload(["vif7.0", "eth0", "vif7.0", "vif12.0"]).devices == ("eth0", "vif12.0", "vif7.0")


def test_flow_offload_shows_its_flowtable_and_rule_for_dry_run() -> None:
    assert flow_offload(["eth0"]).lines() == [
        "firewall flow offload:",
        "  flowtable inet qubes-nat-accel qubes-accel { hook ingress priority 0; devices = { eth0 } }",
        "  chain inet qubes-nat-accel qubes-accel { type filter hook forward priority 5; policy accept; }",
        "    meta l4proto { tcp, udp } iifgroup 2 oifgroup 1 flow add @qubes-accel",
    ]


def test_without_flowtables_init_plans_no_offload_and_says_why() -> None:
    got = plan_flow_offload("the kernel refused a flowtable", ["vif5.0"], ["eth0"])
    assert (got.step, got.note) == (
        None, "no flow offload: the kernel refused a flowtable; every packet takes the netfilter path",
    )


def test_with_flowtables_init_offloads_over_the_vifs_and_the_uplinks() -> None:
    got = plan_flow_offload(None, ["vif5.0", "vif6.0"], ["eth0"])
    assert got.step == Step("ensure", flow_offload(["eth0", "vif5.0", "vif6.0"]))


def test_a_vif_joins_the_flowtable_by_its_name() -> None:
    assert flowtable_device("vif5.0") == FlowtableDevice("vif5.0", "qubes-nat-accel", "qubes-accel")
