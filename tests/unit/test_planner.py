from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_network

import pytest

from vif_hotplug.errors import InvalidInput
from vif_hotplug.model import (
    AntispoofBase,
    DeviceAddress,
    Hooks,
    LinkFacts,
    LinkGroup,
    LinkRename,
    LinkState,
    Neighbour,
    NetvmParams,
    Route,
    SetEntry,
    Sysctl,
    VmNetwork,
)
from vif_hotplug.planner import plan_offline, plan_online

NETVM = NetvmParams(gateway=IPv4Address("10.137.0.1"), primary_dns=IPv4Address("10.139.1.1"))
NETVM6 = NetvmParams(gateway=IPv4Address("10.137.0.1"), gateway6=IPv6Address("fd09:24ef:4179::a89:1"))
V4 = VmNetwork((ip_network("10.137.0.5/32"),), "00:16:3e:5e:6c:00")
DUAL = VmNetwork((ip_network("10.137.0.5/32"), ip_network("fd09:24ef:4179::a89:5/128")), "00:16:3e:5e:6c:00")
UP = LinkFacts(exists=True)


def targets(plan: object) -> list[object]:
    return [s.target for s in plan.steps]  # type: ignore[attr-defined]


def test_online_metric_is_32752_minus_domid() -> None:
    plan = plan_online("vif4.0", 4, V4, NETVM, UP)
    assert Route("vif4.0", "10.137.0.5/32", 32748) in targets(plan)


def test_online_installs_antispoofing_before_link_up() -> None:
    t = targets(plan_online("vif4.0", 4, V4, NETVM, UP))
    up = t.index(LinkState("vif4.0", True))
    assert t.index(SetEntry("qbs-allowed4", "10.137.0.5/32", "vif4.0")) < up
    assert t.index(SetEntry("qbs-downstream4", "10.137.0.5/32")) < up
    assert t.index(LinkGroup("vif4.0", 2)) < up
    assert t.index(AntispoofBase((4, 6))) < up
    assert t.index(Neighbour("vif4.0", "10.137.0.5", "00:16:3e:5e:6c:00")) < up


def test_online_order_ends_with_routes_gateway_then_hooks() -> None:
    t = targets(plan_online("vif4.0", 4, V4, NETVM, UP))
    assert t[0] == Sysctl("ipv4", "vif4.0", "proxy_arp", "1")
    assert t.index(LinkState("vif4.0", True)) < t.index(Route("vif4.0", "10.137.0.5/32", 32748))
    assert t.index(Route("vif4.0", "10.137.0.5/32", 32748)) < t.index(DeviceAddress("vif4.0", "10.137.0.1/32"))
    assert isinstance(t[-1], Hooks)


def test_ipv4_only_vif_gets_no_ipv6_gateway_even_when_netvm_has_one() -> None:
    t = targets(plan_online("vif4.0", 4, V4, NETVM6, UP))
    assert not [x for x in t if isinstance(x, DeviceAddress) and ":" in x.address]
    assert Sysctl("ipv6", "vif4.0", "proxy_ndp", "1") not in t


def test_dual_stack_vif_gets_ipv6_gateway_and_proxy_ndp() -> None:
    t = targets(plan_online("vif4.0", 4, DUAL, NETVM6, UP))
    assert DeviceAddress("vif4.0", "fd09:24ef:4179::a89:1/128") in t
    assert Sysctl("ipv6", "vif4.0", "proxy_ndp", "1") in t
    assert Route("vif4.0", "fd09:24ef:4179::a89:5/128", 32748) in t


def test_link_local_gateway6_is_not_added() -> None:
    netvm = NetvmParams(gateway=IPv4Address("10.137.0.1"), gateway6=IPv6Address("fe80::1"))
    plan = plan_online("vif4.0", 4, DUAL, netvm, UP)
    assert DeviceAddress("vif4.0", "fe80::1/128") not in targets(plan)
    assert any("link-local" in n for n in plan.notes)


def test_ipv6_disabled_on_interface_skips_only_the_ipv6_part() -> None:
    plan = plan_online("vif4.0", 4, DUAL, NETVM6, LinkFacts(exists=True, ipv6_disabled=True))
    t = targets(plan)
    addresses = [getattr(x, a) for x in t for a in ("address", "destination", "network") if hasattr(x, a)]
    assert addresses and not [a for a in addresses if ":" in a]
    assert Route("vif4.0", "10.137.0.5/32", 32748) in t
    assert any("IPv6 disabled" in n for n in plan.notes)


def test_ipv6_override_off_keeps_gateway6_away() -> None:
    netvm = NetvmParams(gateway=IPv4Address("10.137.0.1"), gateway6=IPv6Address("fd00::1"), ipv6_override=False)
    assert DeviceAddress("vif4.0", "fd00::1/128") not in targets(plan_online("vif4.0", 4, DUAL, netvm, UP))


def test_rename_comes_first_when_vifname_differs() -> None:
    t = targets(plan_online("myvm", 4, V4, NETVM, UP, rename_from="vif4.0"))
    assert t[0] == LinkRename("vif4.0", "myvm")
    assert Route("myvm", "10.137.0.5/32", 32748) in t


def test_online_without_gateway_is_an_error() -> None:
    with pytest.raises(InvalidInput, match="gateway"):
        plan_online("vif4.0", 4, V4, NetvmParams(), UP)


def test_plans_compare_equal_for_equal_inputs() -> None:
    assert plan_online("vif4.0", 4, DUAL, NETVM6, UP) == plan_online("vif4.0", 4, DUAL, NETVM6, UP)


def test_offline_removes_what_online_adds() -> None:
    on = targets(plan_online("vif4.0", 4, DUAL, NETVM6, UP))
    off = plan_offline("vif4.0", 4, DUAL.networks, NETVM6, UP)
    removed = {s.target for s in off.steps if s.op == "remove"}
    added = {x for x in on if isinstance(x, (Route, DeviceAddress, SetEntry))}
    assert added <= removed
    neigh_on = {(n.dev, n.address) for n in on if isinstance(n, Neighbour)}
    neigh_off = {(n.dev, n.address) for n in removed if isinstance(n, Neighbour)}
    assert neigh_on == neigh_off


def test_offline_restores_interface_defaults() -> None:
    t = targets(plan_offline("vif4.0", 4, V4.networks, NETVM, UP))
    assert LinkState("vif4.0", False) in t
    assert LinkGroup("vif4.0", 0) in t
    assert Sysctl("ipv4", "vif4.0", "proxy_arp", "0") in t


def test_offline_keeps_downstream_entry_another_vif_still_uses() -> None:
    t = targets(plan_offline("vif4.0", 4, V4.networks, NETVM, UP, frozenset({"10.137.0.5/32"})))
    assert SetEntry("qbs-downstream4", "10.137.0.5/32") not in t
    assert SetEntry("qbs-allowed4", "10.137.0.5/32", "vif4.0") in t


def test_offline_of_vanished_link_only_touches_set_members() -> None:
    t = targets(plan_offline("vif4.0", 4, V4.networks, NETVM, LinkFacts(exists=False)))
    assert {type(x) for x in t} <= {SetEntry, Hooks}


def test_offline_with_nothing_known_is_empty_for_a_vanished_link() -> None:
    assert plan_offline("vif4.0", 4, (), NETVM, LinkFacts(exists=False)).steps == ()


def test_mapped_vif_gets_a_nat_namespace_first_and_only_its_first_ipv4_address() -> None:
    from vif_hotplug.model import NatNamespace

    vm = VmNetwork((ip_network("10.137.0.50/32"), ip_network("10.137.0.51/32"), ip_network("fd09::5/128")),
                   "00:16:3e:5e:6c:00")
    plan = plan_online("vif4.0", 4, vm, NETVM6, UP, mapped=(IPv4Address("10.138.0.2"), None))
    t = targets(plan)
    assert t[0] == NatNamespace("vif4.0", "10.137.0.50", "10.138.0.2", "10.137.0.1", "10.137.0.1", "00:16:3e:5e:6c:00")
    routed = [x.destination for x in t if isinstance(x, Route)]
    assert routed == ["10.137.0.50/32"]
    assert any("only 10.137.0.50/32" in n for n in plan.notes)


def test_offline_removes_the_nat_namespace_when_one_exists() -> None:
    from vif_hotplug.model import NatNamespace

    t = targets(plan_offline("vif4.0", 4, V4.networks, NETVM, LinkFacts(exists=True, nat_namespace=True)))
    assert NatNamespace("vif4.0") in t


@pytest.mark.parametrize("addr", ["10.137.0.1/32", "10.139.1.1/32", "10.137.0.0/24"])
def test_a_vm_address_overlapping_the_netvms_own_addresses_is_refused(addr: str) -> None:
    vm = VmNetwork((ip_network(addr),), "00:16:3e:5e:6c:00")
    with pytest.raises(InvalidInput, match="own gateway or DNS"):
        plan_online("vif4.0", 4, vm, NETVM, UP)
