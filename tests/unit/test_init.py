"""The pure part of ``vif-hotplug init`` (app.init): what it plans, in which order, from which parameters."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest

from tests.unit.fakes import FakeKernel
from vif_hotplug.app.applier import apply_all_or_nothing
from vif_hotplug.app.init import dns_ruleset, netvm_params, plan_init, stop
from vif_hotplug.app.settings import Settings
from vif_hotplug.core.errors import InvalidInput, XenStoreUnavailable
from vif_hotplug.core.firewall import Ruleset, SetElement
from vif_hotplug.core.model import NetvmParams, Step, Sysctl
from vif_hotplug.core.plan_base import base_ruleset
from vif_hotplug.core.plan_dns import plan_dns_ruleset

PARAMS = NetvmParams(gateway=IPv4Address("10.137.0.1"), gateway6=IPv6Address("fd09::1"),
                     primary_dns=IPv4Address("10.139.1.1"), secondary_dns=IPv4Address("10.139.1.2"))
DNS = plan_dns_ruleset(PARAMS.virtual_dns, [IPv4Address("192.0.2.53")])
SETTINGS = Settings()


def xenstore_down(key: str) -> str | None:
    raise XenStoreUnavailable("XenStore at /fake: did not answer within 5s")


def targets(steps: tuple[Step, ...]) -> list[object]:
    return [s.target for s in steps]


def test_init_plans_firewall_then_dns_rules_then_forwarding() -> None:
    plan = plan_init(PARAMS, True, FakeKernel(), SETTINGS, None, None, DNS)
    assert plan.steps == (
        Step("ensure", base_ruleset(True)),
        Step("ensure", DNS),
        Step("set", Sysctl("net/ipv4/ip_forward", "1")),
        Step("set", Sysctl("net/ipv6/conf/all/forwarding", "1")),
    )


def test_init_fills_the_connected_sets_before_forwarding_goes_on() -> None:
    xenstore = {"qubes-connected-ips": "10.137.0.5"}.get
    plan = plan_init(PARAMS, True, FakeKernel(), SETTINGS, None, xenstore, DNS)
    t = targets(plan.steps)
    add = t.index(SetElement(4, "connected", "10.137.0.5/32"))
    assert t.index(base_ruleset(True)) < add < t.index(Sysctl("net/ipv4/ip_forward", "1"))


def test_init_without_virtual_resolvers_plans_no_dns_rules_and_says_so() -> None:
    plan = plan_init(NetvmParams(gateway=IPv4Address("10.137.0.1")), True, FakeKernel(), SETTINGS, None, None, None)
    assert not [t for t in targets(plan.steps) if isinstance(t, Ruleset) and t.what == "dns"]
    assert any("no virtual DNS" in n for n in plan.notes)


def test_init_with_xenstore_down_still_plans_the_firewall() -> None:
    plan = plan_init(PARAMS, True, FakeKernel(), SETTINGS, None, xenstore_down, DNS)
    assert plan.steps[0] == Step("ensure", base_ruleset(True))


def test_init_applied_twice_changes_nothing_the_second_time() -> None:
    k = FakeKernel()
    plan = plan_init(PARAMS, True, k, SETTINGS, None, None, DNS)
    apply_all_or_nothing(plan.steps, k, "init")
    assert apply_all_or_nothing(plan_init(PARAMS, True, k, SETTINGS, None, None, DNS).steps, k, "init").changed == ()


def test_stop_switches_forwarding_off_and_counts_the_changes() -> None:
    k = FakeKernel()
    apply_all_or_nothing(plan_init(PARAMS, True, k, SETTINGS, None, None, DNS).steps, k, "init")
    assert stop(k, True) == 2
    assert (k.namespaces[None]["net/ipv4/ip_forward"], k.namespaces[None]["net/ipv6/conf/all/forwarding"]) == ("0", "0")
    assert stop(k, True) == 0


def test_netvm_params_refuse_a_broken_conf() -> None:
    with pytest.raises(InvalidInput, match="bad value"):
        netvm_params(Settings(conf_error="bad value"), None, None)


def test_netvm_params_with_xenstore_down_have_ipv6_off_and_no_gateway() -> None:
    params = netvm_params(SETTINGS, None, xenstore_down)
    assert (params.gateway, params.ipv6, params.virtual_dns) == (None, False, ())


def test_unreadable_netvm_params_still_drop_dns_to_qubes_virtual_resolvers() -> None:
    from vif_hotplug.core.plan_dns import plan_guard_ruleset

    guard = dns_ruleset(netvm_params(SETTINGS, None, xenstore_down), None)
    assert guard == plan_guard_ruleset([IPv4Address("10.139.1.1"), IPv4Address("10.139.1.2")])


def test_no_virtual_resolvers_means_no_dns_ruleset() -> None:
    assert dns_ruleset(NetvmParams(gateway=IPv4Address("10.137.0.1")), None) is None


def test_dns_ruleset_follows_the_given_resolv_conf(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 192.0.2.53\n")
    assert dns_ruleset(PARAMS, str(conf)) == DNS


def test_unreadable_upstreams_leave_dns1_and_dns2_rejected(tmp_path: Path) -> None:
    assert dns_ruleset(PARAMS, str(tmp_path / "absent.conf")) == plan_dns_ruleset(PARAMS.virtual_dns, ())
