"""The per-vif planners: what online and offline plan, and in which order (plan_vif, plan_nat, plan_connected)."""

from __future__ import annotations

import itertools
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vif_hotplug.core.errors import InvalidInput
from vif_hotplug.core.firewall import Ruleset, SetElement
from vif_hotplug.core.model import (
    AddressRelease,
    ConntrackPurge,
    DeviceAddress,
    HardeningHold,
    Hooks,
    IPNetwork,
    LinkFacts,
    LinkGroup,
    LinkRename,
    LinkState,
    Neighbour,
    Netns,
    NetvmParams,
    Plan,
    Route,
    Step,
    Sysctl,
    VmNetwork,
    dev_sysctl,
)
from vif_hotplug.core.netvm_params import Connected
from vif_hotplug.core.plan_base import antispoof_ruleset
from vif_hotplug.core.plan_connected import connected_steps
from vif_hotplug.core.plan_nat import NatNamespace, nat_ruleset, plan_nat_offline, plan_nat_online
from vif_hotplug.core.plan_vif import (
    ALWAYS6,
    HARDEN4,
    HARDEN6,
    HARDEN_ALL4,
    HARDEN_ALL6,
    Mapped,
    OfflineInputs,
    OnlineInputs,
    plan_offline,
    plan_online,
)

GW = IPv4Address("10.137.0.1")
GW6 = IPv6Address("fd09:24ef:4179::a89:1")
DNS1, DNS2 = IPv4Address("10.139.1.1"), IPv4Address("10.139.1.2")
NETVM = NetvmParams(gateway=GW, primary_dns=DNS1, secondary_dns=DNS2)
NETVM6 = NetvmParams(gateway=GW, gateway6=GW6, primary_dns=DNS1, secondary_dns=DNS2)
MAC = "00:16:3e:5e:6c:00"
A4 = ip_network("10.137.0.5/32")
B4 = ip_network("10.137.0.6/32")
NET4 = ip_network("10.137.8.0/24")
A6 = ip_network("fd09:24ef:4179::a89:5/128")
B6 = ip_network("fd09:24ef:4179::a89:6/128")
UP = LinkFacts(exists=True)
GONE = LinkFacts(exists=False)
DEV = "vif4.0"
METRIC = 32748


def online(*nets: IPNetwork, netvm: NetvmParams = NETVM6, link: LinkFacts = UP, dev: str = DEV, domid: int = 4,
           **kw: Any) -> Plan:
    return plan_online(OnlineInputs(dev, domid, VmNetwork(tuple(nets), MAC), netvm, link, "/hooks", **kw))


def offline(*nets: IPNetwork, netvm: NetvmParams = NETVM6, link: LinkFacts = UP, dev: str = DEV, domid: int = 4,
            **kw: Any) -> Plan:
    return plan_offline(OfflineInputs(dev, domid, tuple(nets), netvm, link, "/hooks", **kw))


def targets(plan: Plan) -> list[object]:
    return [s.target for s in plan.steps]


def at(plan: Plan, op: str, target: object) -> int:
    return plan.steps.index(Step(op, target))  # type: ignore[arg-type]


def of_type(plan: Plan, kind: type) -> list[int]:
    return [i for i, s in enumerate(plan.steps) if isinstance(s.target, kind)]


def sysctls(plan: Plan) -> dict[str, str]:
    return {s.target.key: s.target.value for s in plan.steps if isinstance(s.target, Sysctl)}


def mentions_ipv6(target: object) -> bool:
    return any(":" in str(getattr(target, a, "")) for a in ("address", "destination", "network"))


# --- online: order contract ----------------------------------------------------------------------


@pytest.mark.parametrize(("domid", "metric"), [(0, 32752), (4, 32748), (32751, 1)])
def test_route_metric_is_32752_minus_domid(domid: int, metric: int) -> None:
    assert Step("add", Route(DEV, str(A4), metric)) in online(A4, domid=domid).steps


BEFORE_LINK_UP = [
    ("antispoof ruleset ensured", Step("ensure", antispoof_ruleset((4, 6)))),
    ("vif joins group 2", Step("set", LinkGroup(DEV, 2))),
    ("allowed4 element", Step("add", SetElement(4, "allowed", str(A4), DEV))),
    ("allowed6 element", Step("add", SetElement(6, "allowed", str(A6), DEV))),
    ("downstream4 element", Step("add", SetElement(4, "downstream", str(A4)))),
    ("downstream6 element", Step("add", SetElement(6, "downstream", str(A6)))),
    ("neighbour4", Step("add", Neighbour(DEV, str(A4.network_address), MAC))),
    ("neighbour6", Step("add", Neighbour(DEV, str(A6.network_address), MAC))),
    ("proxy_arp", Step("set", dev_sysctl("ipv4/proxy_arp", DEV, "1"))),
    ("conntrack purge", Step("run", ConntrackPurge((str(A4.network_address), str(A6.network_address))))),
]


@pytest.mark.parametrize("step", [pytest.param(s, id=i) for i, s in BEFORE_LINK_UP])
def test_online_puts_antispoofing_and_neighbours_in_place_before_the_link_goes_up(step: Step) -> None:
    plan = online(A4, A6)
    assert plan.steps.index(step) < at(plan, "set", LinkState(DEV, True))


def test_online_adds_routes_only_after_the_link_is_up() -> None:
    plan = online(A4, A6)
    assert min(of_type(plan, Route)) > at(plan, "set", LinkState(DEV, True))


def test_online_adds_the_gateway_address_after_every_route() -> None:
    plan = online(A4, B4)
    assert at(plan, "add", DeviceAddress(DEV, f"{GW}/32")) > max(of_type(plan, Route))


def test_ipv4_gateway_address_is_the_last_step_of_an_ipv4_only_vif() -> None:
    assert online(A4).steps[-1] == Step("add", DeviceAddress(DEV, f"{GW}/32"))


def test_ipv6_gateway_address_is_the_last_step_of_a_dual_stack_vif() -> None:
    steps = online(A4, A6).steps
    assert steps[-2:] == (
        Step("set", dev_sysctl("ipv6/proxy_ndp", DEV, "1")),
        Step("add", DeviceAddress(DEV, f"{GW6}/128")),
    )


def test_online_adds_a_host_route_neighbour_and_set_elements_per_address() -> None:
    t = set(targets(online(A4, A6)))
    for net in (A4, A6):
        family = net.version
        assert {
            Route(DEV, str(net), METRIC),
            Neighbour(DEV, str(net.network_address), MAC),
            SetElement(family, "allowed", str(net), DEV),  # type: ignore[arg-type]
            SetElement(family, "downstream", str(net)),  # type: ignore[arg-type]
        } <= t


def test_online_sets_proxy_arp_on_the_vif() -> None:
    assert sysctls(online(A4))[f"net/ipv4/conf/{DEV}/proxy_arp"] == "1"


def test_online_puts_the_vif_in_interface_group_2() -> None:
    assert Step("set", LinkGroup(DEV, 2)) in online(A4).steps


def test_rename_is_the_first_step() -> None:
    plan = online(A4, dev="work-vm", rename_from=DEV)
    assert plan.steps[0] == Step("set", LinkRename(DEV, "work-vm"))


def test_every_step_after_a_rename_names_the_new_device() -> None:
    plan = online(A4, A6, dev="work-vm", rename_from=DEV)
    devs = {getattr(t, "dev", "work-vm") for t in targets(plan)[1:] if not isinstance(t, (SetElement, Ruleset))}
    assert devs == {"work-vm"}


def test_no_rename_when_the_device_already_has_its_name() -> None:
    assert not [t for t in targets(online(A4, rename_from=DEV)) if isinstance(t, LinkRename)]


def test_online_hooks_name_command_vif_type_and_every_address() -> None:
    assert online(A6, A4).hooks == Hooks("online", DEV, "vif", (str(A4.network_address), str(A6.network_address)),
                                         "/hooks")


# --- online: addresses -----------------------------------------------------------------------------


def test_a_network_gets_a_route_and_set_elements_but_no_neighbour() -> None:
    t = targets(online(NET4))
    assert Route(DEV, str(NET4), METRIC) in t
    assert SetElement(4, "allowed", str(NET4), DEV) in t
    assert not [x for x in t if isinstance(x, Neighbour)]


def test_conntrack_entries_are_purged_for_each_new_host_address_in_one_pass() -> None:
    purged = [a for t in targets(online(A4, A6, NET4)) if isinstance(t, ConntrackPurge) for a in t.addresses]
    assert purged == [str(A4.network_address), str(A6.network_address)]


def test_conntrack_entries_of_an_address_the_vif_already_allows_are_kept() -> None:
    plan = online(A4, B4, already_allowed=frozenset({str(A4)}))
    assert [a for t in targets(plan) if isinstance(t, ConntrackPurge) for a in t.addresses] == [str(B4.network_address)]


# --- online: IPv6 ------------------------------------------------------------------------------------

NO_GATEWAY6 = [
    ("ipv4-only vm", (A4,), NETVM6, UP),
    ("link-local gateway6", (A4, A6), NetvmParams(gateway=GW, gateway6=IPv6Address("fe80::1")), UP),
    ("ipv6 disabled on the interface", (A4, A6), NETVM6, LinkFacts(exists=True, ipv6_disabled=True)),
    ("ipv6_override off", (A4, A6), NetvmParams(gateway=GW, gateway6=GW6, ipv6_override=False), UP),
    ("ipv6_override on without gateway6", (A4, A6), NetvmParams(gateway=GW, ipv6_override=True), UP),
    ("no gateway6", (A4, A6), NETVM, UP),
]


@pytest.mark.parametrize(("nets", "netvm", "link"), [pytest.param(*r[1:], id=r[0]) for r in NO_GATEWAY6])
def test_ipv6_gateway_and_proxy_ndp_are_not_planned(
    nets: tuple[IPNetwork, ...], netvm: NetvmParams, link: LinkFacts
) -> None:
    plan = online(*nets, netvm=netvm, link=link)
    assert not [t for t in targets(plan) if isinstance(t, DeviceAddress) and ":" in t.address]
    assert f"net/ipv6/conf/{DEV}/proxy_ndp" not in sysctls(plan)


@pytest.mark.parametrize(
    "netvm", [NETVM6, NetvmParams(gateway=GW, gateway6=GW6, ipv6_override=True)], ids=["gateway6", "override on"]
)
def test_dual_stack_vif_gets_the_ipv6_gateway_and_proxy_ndp(netvm: NetvmParams) -> None:
    plan = online(A4, A6, netvm=netvm)
    assert DeviceAddress(DEV, f"{GW6}/128") in targets(plan)
    assert sysctls(plan)[f"net/ipv6/conf/{DEV}/proxy_ndp"] == "1"


def test_link_local_gateway6_is_left_out_with_a_note() -> None:
    plan = online(A4, A6, netvm=NetvmParams(gateway=GW, gateway6=IPv6Address("fe80::1")))
    assert any("link-local" in n for n in plan.notes)


def test_ipv6_disabled_on_the_interface_configures_no_ipv6_address() -> None:
    plan = online(A4, A6, link=LinkFacts(exists=True, ipv6_disabled=True))
    assert [t for t in targets(plan) if mentions_ipv6(t)] == []
    assert Route(DEV, str(A4), METRIC) in targets(plan)
    assert any("IPv6 disabled" in n for n in plan.notes)


def test_ipv6_only_vm_needs_no_ipv4_gateway() -> None:
    plan = online(A6, netvm=NetvmParams(gateway6=GW6))
    assert Route(DEV, str(A6), METRIC) in targets(plan)
    assert DeviceAddress(DEV, f"{GW6}/128") in targets(plan)


def test_ipv4_vm_without_a_netvm_gateway_is_refused() -> None:
    with pytest.raises(InvalidInput, match="gateway"):
        online(A4, netvm=NetvmParams())


def test_antispoof_ruleset_covers_ipv4_only_without_ipv6_in_the_kernel() -> None:
    plan = online(A4, link=LinkFacts(exists=True, ipv6_disabled=True, ipv6_in_kernel=False))
    assert Step("ensure", antispoof_ruleset((4,))) in plan.steps


# --- online: sysctls ------------------------------------------------------------------------------------

HARDENING = [
    ("off", False, UP, {}),
    ("on, ipv6 on the link", True, UP, dict(HARDEN4 + HARDEN6)),
    ("on, ipv6 disabled on the link", True, LinkFacts(exists=True, ipv6_disabled=True), dict(HARDEN4)),
    ("on, no ipv6 in the kernel", True, LinkFacts(exists=True, ipv6_disabled=True, ipv6_in_kernel=False),
     dict(HARDEN4)),
]


@pytest.mark.parametrize(("harden", "link", "expected"), [pytest.param(*r[1:], id=r[0]) for r in HARDENING])
def test_hardening_sysctls_follow_the_setting_and_ipv6_on_the_link(
    harden: bool, link: LinkFacts, expected: dict[str, str]
) -> None:
    keys = {k for k, _ in HARDEN4 + HARDEN6}
    planned = {f"{k.split('/')[1]}/{k.split('/')[-1]}": v for k, v in sysctls(online(A4, harden=harden, link=link))
               .items()}
    assert {k: v for k, v in planned.items() if k in keys} == expected


def _holds(plan: Plan) -> list[Step]:
    return [s for s in plan.steps if isinstance(s.target, HardeningHold)]


def test_hardening_holds_the_conf_all_keys_the_kernel_combines_with_the_vifs() -> None:
    (step,) = _holds(online(A4, harden=True))
    assert step.op == "add" and dict(step.target.keys) == {  # type: ignore[union-attr]
        f"net/{k.split('/')[0]}/conf/all/{k.split('/')[1]}": v for k, v in HARDEN_ALL4 + HARDEN_ALL6}


def test_the_conf_all_side_holds_send_redirects_which_the_kernel_ors_with_the_vifs() -> None:
    # include/linux/inetdevice.h: IN_DEV_TX_REDIRECTS is IN_DEV_ORCONF, so the vif's 0 alone does nothing.
    (step,) = _holds(online(A4, harden=True))
    assert ("net/ipv4/conf/all/send_redirects", "0") in step.target.keys  # type: ignore[union-attr]


def test_hardening_holds_no_ipv6_key_without_ipv6_in_the_kernel() -> None:
    (step,) = _holds(online(A4, harden=True, link=LinkFacts(exists=True, ipv6_disabled=True, ipv6_in_kernel=False)))
    assert not any("ipv6" in k for k, _ in step.target.keys)  # type: ignore[union-attr]


def test_without_hardening_online_holds_nothing() -> None:
    assert _holds(online(A4)) == []


def test_the_hold_comes_before_the_link_goes_up() -> None:
    plan = online(A4, harden=True)
    assert plan.steps.index(_holds(plan)[0]) < at(plan, "set", LinkState(DEV, True))


@pytest.mark.parametrize("harden", [True, False], ids=["hardened", "not hardened (now)"])
def test_offline_lets_go_of_the_hold_whatever_the_setting_is_now(harden: bool) -> None:
    assert _holds(offline(A4, harden=harden)) == [Step("remove", HardeningHold(DEV))]


@pytest.mark.parametrize(
    ("link", "planned"),
    [
        (UP, True),
        (LinkFacts(exists=True, ipv6_disabled=True), True),
        (LinkFacts(exists=True, ipv6_disabled=True, ipv6_in_kernel=False), False),
    ],
    ids=["ipv6 on", "ipv6 disabled on the link", "no ipv6 in the kernel"],
)
def test_drop_unsolicited_na_is_set_whenever_the_kernel_has_ipv6(link: LinkFacts, planned: bool) -> None:
    key = f"net/ipv6/conf/{DEV}/drop_unsolicited_na"
    assert (sysctls(online(A4, link=link)).get(key) == dict(ALWAYS6)["ipv6/drop_unsolicited_na"]) is planned


def test_gratuitous_arp_is_dropped_on_every_vif_and_offline_restores_the_default() -> None:
    key = f"net/ipv4/conf/{DEV}/drop_gratuitous_arp"
    assert sysctls(online(A4)).get(key) == "1"
    link = LinkFacts(exists=True, sysctl_defaults=(("ipv4/drop_gratuitous_arp", "0"),))
    assert sysctls(offline(A4, link=link)).get(key) == "0"


# --- online: a VM without addresses -------------------------------------------------------------------


def test_vm_without_addresses_comes_up_in_group_2() -> None:
    steps = online(netvm=NETVM).steps
    assert Step("set", LinkGroup(DEV, 2)) in steps
    assert steps[-1] == Step("set", LinkState(DEV, True))


def test_vm_without_addresses_gets_no_route_neighbour_element_or_gateway() -> None:
    kinds = {type(t) for t in targets(online(netvm=NETVM))}
    assert kinds.isdisjoint({Route, Neighbour, SetElement, DeviceAddress, ConntrackPurge})


def test_vm_without_addresses_needs_no_netvm_parameters() -> None:
    assert Step("set", LinkState(DEV, True)) in online(netvm=NetvmParams()).steps


def test_vm_without_addresses_runs_hooks_with_no_address() -> None:
    hooks = online(netvm=NETVM).hooks
    assert hooks is not None and hooks.addresses == ()


# --- online: refusals ---------------------------------------------------------------------------------

OWN_ADDRESSES = [
    ("the gateway", "10.137.0.1/32"),
    ("the primary dns", "10.139.1.1/32"),
    ("the secondary dns", "10.139.1.2/32"),
    ("a network holding the gateway", "10.137.0.0/24"),
    ("a network holding a dns", "10.139.0.0/16"),
    ("the ipv6 gateway", f"{GW6}/128"),
    ("a network holding the ipv6 gateway", "fd09:24ef:4179::/64"),
]


@pytest.mark.parametrize("net", [pytest.param(n, id=i) for i, n in OWN_ADDRESSES])
def test_a_vm_address_overlapping_the_netvms_own_addresses_is_refused(net: str) -> None:
    with pytest.raises(InvalidInput, match="own gateway or DNS"):
        online(A4, ip_network(net))


def test_a_vm_address_that_is_this_netvms_own_is_refused() -> None:
    with pytest.raises(InvalidInput, match="this netvm itself"):
        online(A4, local_addresses=frozenset({"10.137.0.5"}))


# --- online: mapped addresses --------------------------------------------------------------------------

MAPPED = Mapped(IPv4Address("10.137.0.5"), IPv4Address("10.138.0.2"), IPv4Address("10.138.0.1"))
NAT = NatNamespace(DEV, "10.137.0.5", "10.138.0.2", "10.138.0.1", str(GW), MAC)


def test_mapped_vif_builds_its_nat_namespace_first() -> None:
    nat_steps = plan_nat_online(NAT)
    assert online(A4, B4, A6, mapped=MAPPED).steps[: len(nat_steps)] == nat_steps


def test_mapped_vif_builds_its_nat_namespace_right_after_a_rename() -> None:
    nat = NatNamespace("work-vm", "10.137.0.5", "10.138.0.2", "10.138.0.1", str(GW), MAC)
    steps = online(A4, dev="work-vm", rename_from=DEV, mapped=MAPPED).steps
    assert steps[1 : 1 + len(plan_nat_online(nat))] == plan_nat_online(nat)


def test_mapped_vif_configures_only_the_mapped_ipv4_address() -> None:
    plan = online(A4, B4, A6, mapped=MAPPED)
    assert sorted(t.destination for t in targets(plan) if isinstance(t, Route) and t.netns is None) == [str(A4)]
    assert {e.network for e in targets(plan) if isinstance(e, SetElement)} == {str(A4)}
    assert any(f"only {A4}" in n for n in plan.notes)


def test_mapped_vif_without_visible_gateway_sees_the_netvm_gateway() -> None:
    steps = online(A4, mapped=Mapped(IPv4Address("10.137.0.5"), IPv4Address("10.138.0.2"))).steps
    assert Step("ensure", nat_ruleset(NatNamespace(DEV, "10.137.0.5", "10.138.0.2", str(GW), str(GW), MAC))) in steps


def test_a_mapping_of_an_address_the_vm_does_not_have_is_ignored() -> None:
    plan = online(B4, mapped=MAPPED)
    assert not [t for t in targets(plan) if isinstance(t, Netns)]


def test_a_vif_name_too_long_for_its_nat_peer_is_refused() -> None:
    with pytest.raises(InvalidInput, match="too long"):
        online(A4, dev="abcdefghijklmn", mapped=MAPPED)


def test_nat_ruleset_translates_visible_and_real_address_both_ways() -> None:
    table = nat_ruleset(NAT).table(4, "qubes-nat")
    assert [r.text(4) for r in table.chain("dnat").rules] == [
        "iifname vif4.0-p ip daddr 10.137.0.5 dnat to 10.138.0.2",
        "iifname vif4.0 ip daddr 10.138.0.1 dnat to 10.137.0.1",
    ]
    assert [r.text(4) for r in table.chain("snat").rules] == [
        "oifname vif4.0-p ip saddr 10.138.0.2 snat to 10.137.0.5",
        "oifname vif4.0 ip saddr 10.137.0.1 snat to 10.138.0.1",
    ]


def test_nat_ruleset_drops_any_source_but_the_visible_address_from_the_vm() -> None:
    chain = nat_ruleset(NAT).table(4, "qubes-nat").chain("antispoof")
    assert [r.text(4) for r in chain.rules] == ["iifname vif4.0 ip saddr != 10.138.0.2 drop"]


def test_nat_ruleset_has_no_gateway_translation_when_the_vm_sees_the_real_gateway() -> None:
    nat = NatNamespace(DEV, "10.137.0.5", "10.138.0.2", str(GW), str(GW), MAC)
    table = nat_ruleset(nat).table(4, "qubes-nat")
    assert (len(table.chain("dnat").rules), len(table.chain("snat").rules)) == (1, 1)


def test_nat_ruleset_lives_in_the_namespace() -> None:
    assert nat_ruleset(NAT).netns == "vif4.0-nat"


def test_nat_offline_removes_veth_then_brings_the_vif_back_then_removes_the_namespace() -> None:
    assert [(s.op, type(s.target).__name__) for s in plan_nat_offline(DEV)] == [
        ("remove", "Veth"), ("remove", "LinkNetns"), ("remove", "Netns"),
    ]


# --- offline -------------------------------------------------------------------------------------------


def test_offline_removes_routes_before_any_address() -> None:
    plan = offline(A4, A6, B4)
    assert max(of_type(plan, Route)) < min(of_type(plan, DeviceAddress))


def test_offline_takes_the_link_down_after_removing_routes_and_addresses() -> None:
    plan = offline(A4, A6)
    down = at(plan, "set", LinkState(DEV, False))
    assert max(of_type(plan, Route) + of_type(plan, DeviceAddress)) < down


def test_offline_releases_addresses_after_removing_their_allowed_elements() -> None:
    plan = offline(A4, A6)
    allowed = [i for i, s in enumerate(plan.steps) if isinstance(s.target, SetElement)]
    assert max(allowed) < min(of_type(plan, AddressRelease))


def test_offline_removes_everything_online_adds() -> None:
    on = online(A4, A6, NET4)
    off = offline(A4, A6, NET4)
    removed = {s.target for s in off.steps if s.op == "remove"}
    added = {s.target for s in on.steps if s.op == "add" and isinstance(s.target, (Route, DeviceAddress))}
    added |= {s.target for s in on.steps if isinstance(s.target, SetElement) and s.target.set == "allowed"}
    assert added <= removed


def test_offline_removes_every_neighbour_online_adds() -> None:
    def neighbours(plan: Plan, op: str) -> set[tuple[str, str]]:
        return {(t.dev, t.address) for s in plan.steps if s.op == op and isinstance(t := s.target, Neighbour)}

    assert neighbours(online(A4, A6), "add") == neighbours(offline(A4, A6), "remove")


def test_offline_releases_every_downstream_element_online_adds() -> None:
    on = {(t.family, t.network) for t in targets(online(A4, A6, NET4)) if isinstance(t, SetElement)
          and t.set == "downstream"}
    off = {(t.family, t.network) for t in targets(offline(A4, A6, NET4)) if isinstance(t, AddressRelease)}
    assert on == off


def test_offline_restores_group_link_state_and_sysctls_to_the_defaults() -> None:
    link = LinkFacts(exists=True, sysctl_defaults=(("ipv4/proxy_arp", "0"), ("ipv6/proxy_ndp", "1")))
    t = targets(offline(A4, link=link))
    assert {LinkGroup(DEV, 0), LinkState(DEV, False)} <= set(t)
    assert sysctls(offline(A4, link=link))[f"net/ipv6/conf/{DEV}/proxy_ndp"] == "1"


@pytest.mark.parametrize("harden", [False, True], ids=["not hardened", "hardened"])
@pytest.mark.parametrize("in_kernel", [True, False], ids=["ipv6 in kernel", "no ipv6 in kernel"])
def test_offline_restores_only_sysctls_online_changes(harden: bool, in_kernel: bool) -> None:
    link = LinkFacts(exists=True, ipv6_disabled=not in_kernel, ipv6_in_kernel=in_kernel)
    on = set(sysctls(online(A4, A6, link=link, harden=harden)))
    assert set(sysctls(offline(A4, A6, link=link, harden=harden))) <= on


def test_offline_without_hardening_leaves_hardening_sysctls_alone() -> None:
    keys = {k.split("/")[-1] for k, _ in HARDEN4 + HARDEN6}
    assert not [k for k in sysctls(offline(A4, A6)) if k.split("/")[-1] in keys]


def test_offline_removes_the_ipv6_gateway_only_when_the_netvm_has_one() -> None:
    assert not [t for t in targets(offline(A4, netvm=NETVM)) if isinstance(t, DeviceAddress) and ":" in t.address]
    assert DeviceAddress(DEV, f"{GW6}/128") in targets(offline(A4, netvm=NETVM6))


def test_offline_of_a_vanished_link_lists_only_set_elements_and_releases() -> None:
    assert {type(t) for t in targets(offline(A4, A6, link=GONE))} == {SetElement, AddressRelease, HardeningHold}


def test_offline_of_a_vanished_link_with_no_known_address_does_nothing() -> None:
    assert offline(link=GONE).steps == (Step("remove", HardeningHold(DEV)),)


def test_offline_removes_the_nat_namespace_last_when_there_is_one() -> None:
    steps = offline(A4, link=LinkFacts(exists=True, nat_namespace=True)).steps
    assert steps[-3:] == plan_nat_offline(DEV)


def test_offline_hooks_name_every_address() -> None:
    assert offline(A4, A6, vif_type="ioemu").hooks == Hooks(
        "offline", DEV, "ioemu", (str(A4.network_address), str(A6.network_address)), "/hooks"
    )


# --- plans do not depend on the order addresses come in ---------------------------------------------------

NETWORKS = (A4, B4, NET4, A6, B6)


@pytest.mark.parametrize("order", list(itertools.permutations(NETWORKS)), ids=lambda o: "-".join(
    str(n.network_address).split(".")[-1].split(":")[-1] for n in o))
def test_online_plan_is_the_same_whatever_the_address_order(order: tuple[IPNetwork, ...]) -> None:
    assert online(*order) == online(*NETWORKS)


@pytest.mark.parametrize("order", list(itertools.permutations(NETWORKS)))
def test_offline_plan_is_the_same_whatever_the_address_order(order: tuple[IPNetwork, ...]) -> None:
    assert offline(*order) == offline(*NETWORKS)


@pytest.mark.parametrize("order", list(itertools.permutations((A4, B4, A6))))
def test_mapped_online_plan_is_the_same_whatever_the_address_order(order: tuple[IPNetwork, ...]) -> None:
    assert online(*order, mapped=MAPPED) == online(A4, B4, A6, mapped=MAPPED)


POOL4 = [IPv4Address(f"10.137.0.{i}") for i in range(5, 12)]
POOL6 = [IPv6Address(f"fd09:24ef:4179::a89:{i}") for i in range(5, 12)]


@pytest.mark.parametrize("order", list(itertools.permutations(range(4))))
def test_connected_steps_are_the_same_whatever_the_address_order(order: tuple[int, ...]) -> None:
    present = [SetElement(4, "connected", f"{POOL4[i]}/32") for i in (4, 5)]
    base = connected_steps(Connected(tuple(POOL4[:4]), tuple(POOL6[:4])), present, (4, 6))
    shuffled = Connected(tuple(POOL4[i] for i in order), tuple(POOL6[i] for i in order))
    assert connected_steps(shuffled, list(reversed(present)), (4, 6)) == base


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(st.lists(st.sampled_from([*POOL4, *POOL6]), min_size=1, max_size=8, unique=True), st.data())
def test_online_plan_is_the_same_for_any_order_of_any_addresses(addrs: list[Any], data: st.DataObject) -> None:
    nets = [ip_network(a) for a in addrs]
    shuffled = data.draw(st.permutations(nets))
    assert online(*shuffled) == online(*sorted(nets, key=lambda n: (n.version, n)))


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(st.lists(st.sampled_from([*POOL4, *POOL6]), max_size=8, unique=True), st.data())
def test_offline_plan_is_the_same_for_any_order_of_any_addresses(addrs: list[Any], data: st.DataObject) -> None:
    nets = [ip_network(a) for a in addrs]
    assert offline(*data.draw(st.permutations(nets))) == offline(*sorted(nets, key=lambda n: (n.version, n)))


# --- connected sets -----------------------------------------------------------------------------------------


def test_connected_steps_add_what_is_missing_and_remove_what_is_extra() -> None:
    present = [SetElement(4, "connected", "10.137.0.9/32"), SetElement(4, "connected", "10.137.0.5/32")]
    steps = connected_steps(Connected((IPv4Address("10.137.0.5"), IPv4Address("10.137.0.6"))), present, (4, 6))
    assert steps == (
        Step("add", SetElement(4, "connected", "10.137.0.6/32")),
        Step("remove", SetElement(4, "connected", "10.137.0.9/32")),
    )


def test_connected_steps_touch_only_the_given_families() -> None:
    steps = connected_steps(Connected((), (IPv6Address("fd09::5"),)), [], (4,))
    assert steps == ()


def test_connected_steps_are_empty_when_the_sets_hold_exactly_the_addresses() -> None:
    present = [SetElement(6, "connected", "fd09::5/128")]
    assert connected_steps(Connected((), (ip_address("fd09::5"),)), present, (4, 6)) == ()  # type: ignore[arg-type]


# --- dry-run text ------------------------------------------------------------------------


def test_plan_lines_show_each_change_as_a_command() -> None:
    lines = online(A4, netvm=NETVM).lines()
    assert "add route 10.137.0.5/32 dev vif4.0 metric 32748" in lines
    assert "sysctl net.ipv4.conf.vif4.0.proxy_arp=1" in lines
    assert lines[-1] == "hooks in /hooks: online vif4.0 vif 10.137.0.5"
