"""Opt-in IPv6 in vif-route-qubes: same guarantees as IPv4, and no IPv6 where it is off."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .conftest import NetnsFactory
from .hotplug_env import GATEWAY, GATEWAY6, UPLINK6_NET, Netvm, received, running_netvm

CONF6 = f"""[netvm]
gateway = {GATEWAY}
gateway6 = {GATEWAY6}
primary_dns = 10.139.1.1
secondary_dns = 10.139.1.2
"""
VM6 = "fd09:24ef:4179::a89:5"


@pytest.fixture
def netvm6(make_netns: NetnsFactory, backend: str, with_agent: bool) -> Iterator[Netvm]:
    with running_netvm(make_netns, CONF6, backend, with_agent) as env:
        yield env


def test_dual_stack_online_adds_ipv6_route_neighbour_gateway_and_set_entry(netvm6: Netvm) -> None:
    netvm6.add_vm(4, ["10.137.0.5", VM6], mac="00:16:3e:5e:6c:00")
    netvm6.hotplug("online", 4)
    ns = netvm6.ns
    assert f"{VM6} dev vif4.0 proto static metric 32748" in ns.run("ip", "-6", "route").stdout
    assert f"inet6 {GATEWAY6}/128" in ns.run("ip", "addr", "show", "vif4.0").stdout
    assert f"{VM6} lladdr 00:16:3e:5e:6c:00 PERMANENT" in ns.run("ip", "-6", "neigh", "show", "dev", "vif4.0").stdout
    assert ns.run("cat", "/proc/sys/net/ipv6/conf/vif4.0/proxy_ndp").stdout.strip() == "1"
    assert netvm6.members(6, "allowed") == [f"vif4.0 . {VM6}"]
    assert netvm6.members(6, "downstream") == [VM6]


def test_the_ipv6_gateway_is_usable_as_soon_as_online_reports(netvm6: Netvm) -> None:
    netvm6.add_vm(4, ["10.137.0.5", VM6])
    netvm6.hotplug("online", 4)
    # No duplicate address detection on the vif: not "tentative", whatever the vif's accept_dad says.
    shown = netvm6.ns.run("ip", "-6", "addr", "show", "dev", "vif4.0").stdout
    line = next(x for x in shown.splitlines() if f"{GATEWAY6}/128" in x)
    assert "tentative" not in line and "dadfailed" not in line


def test_dual_stack_online_twice_changes_nothing(netvm6: Netvm) -> None:
    netvm6.add_vm(4, ["10.137.0.5", VM6])
    netvm6.hotplug("online", 4)
    first = netvm6.dump()
    netvm6.hotplug("online", 4)
    assert netvm6.dump() == first


def test_dual_stack_offline_returns_to_prior_state(netvm6: Netvm) -> None:
    netvm6.add_vm(9, ["10.137.0.9", "fd09:24ef:4179::a89:9"])
    netvm6.hotplug("online", 9)
    netvm6.hotplug("offline", 9)
    netvm6.add_vm(4, ["10.137.0.5", VM6])
    before = netvm6.dump()
    netvm6.hotplug("online", 4)
    netvm6.hotplug("offline", 4)
    assert netvm6.dump() == before


def test_ipv4_only_vif_gets_no_ipv6_gateway_even_with_gateway6_set(netvm6: Netvm) -> None:
    netvm6.add_vm(4, ["10.137.0.5"])
    netvm6.hotplug("online", 4)
    assert "inet6 " + GATEWAY6 not in netvm6.ns.run("ip", "addr", "show", "vif4.0").stdout
    assert netvm6.ns.run("cat", "/proc/sys/net/ipv6/conf/vif4.0/proxy_ndp").stdout.strip() == "0"


def test_link_local_gateway6_is_not_put_on_the_vif(netvm6: Netvm) -> None:
    netvm6.write_conf(CONF6.replace(GATEWAY6, "fe80::fcff:ffff:feff:ffff"))
    netvm6.add_vm(4, ["10.137.0.5", VM6])
    netvm6.hotplug("online", 4)
    assert "fe80::fcff:ffff:feff:ffff/128" not in netvm6.ns.run("ip", "addr", "show", "vif4.0").stdout
    assert f"{VM6} dev vif4.0" in netvm6.ns.run("ip", "-6", "route").stdout


def test_ipv6_disabled_on_the_interface_keeps_ipv4_and_logs_the_skip_once(netvm6: Netvm) -> None:
    netvm6.add_vm(4, ["10.137.0.5", VM6])
    netvm6.ns.run("sysctl", "-qw", "net.ipv6.conf.vif4/0.disable_ipv6=1")
    proc = netvm6.hotplug("online", 4)
    assert "10.137.0.5 dev vif4.0" in netvm6.ns.run("ip", "route").stdout
    assert VM6 not in netvm6.ns.run("ip", "-6", "route").stdout
    assert netvm6.members(6, "allowed") == []
    assert len([line for line in proc.stderr.splitlines() if "IPv6 disabled" in line]) == 1
    assert netvm6.status(4) == "connected"


def test_ipv6_disabled_in_the_namespace_keeps_ipv4(netvm6: Netvm) -> None:
    netvm6.add_vm(4, ["10.137.0.5", VM6])
    netvm6.ns.run("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
    netvm6.hotplug("online", 4)
    assert "10.137.0.5 dev vif4.0" in netvm6.ns.run("ip", "route").stdout
    assert netvm6.status(4) == "connected"


def test_offline_removes_ipv6_state_after_ipv6_was_disabled(netvm6: Netvm) -> None:
    netvm6.add_vm(4, ["10.137.0.5", VM6])
    netvm6.hotplug("online", 4)
    netvm6.ns.run("sysctl", "-qw", "net.ipv6.conf.vif4/0.disable_ipv6=1")
    assert netvm6.hotplug("offline", 4).returncode == 0
    assert netvm6.members(6, "allowed") == []
    assert netvm6.members(6, "downstream") == []


def test_offline_after_the_link_vanished_removes_ipv6_set_members(netvm6: Netvm) -> None:
    netvm6.add_vm(4, ["10.137.0.5", VM6])
    netvm6.hotplug("online", 4)
    netvm6.ns.run("ip", "link", "del", "vif4.0")
    assert netvm6.hotplug("offline", 4).returncode == 0
    assert netvm6.members(6, "allowed") == []


def test_vm_ipv6_with_own_source_is_forwarded_and_forged_source_dropped(netvm6: Netvm) -> None:
    up = netvm6.add_uplink()
    vm = netvm6.add_vm(4, ["10.137.0.5", VM6])
    netvm6.hotplug("online", 4)
    vm.ns.run("ip", "addr", "add", "fd09:24ef:4179::bad/128", "dev", "lo")
    got = received(up, f"{UPLINK6_NET}::2", netvm6.tmp / "uplink6.log",
                   [(vm.ns, "fd09:24ef:4179::bad", "forged"), (vm.ns, VM6, "genuine")])
    assert got == [f"{VM6} genuine"]


def test_ipv4_only_vif_passes_no_ipv6_at_all(netvm6: Netvm) -> None:
    up = netvm6.add_uplink()
    vm = netvm6.add_vm(4, ["10.137.0.5"])
    netvm6.hotplug("online", 4)
    # The VM gives itself an IPv6 address and route anyway: nothing may pass.
    vm.ns.run("ip", "addr", "add", "fd09:24ef:4179::a89:77/128", "dev", "vmnic0", "nodad")
    vm.ns.run("ip", "-6", "neigh", "replace", GATEWAY6, "lladdr", "fe:ff:ff:ff:ff:ff", "dev", "vmnic0", "nud",
              "permanent")
    vm.ns.run("ip", "-6", "route", "add", "default", "via", GATEWAY6, "dev", "vmnic0", "onlink")
    got = received(up, f"{UPLINK6_NET}::2", netvm6.tmp / "uplink6.log",
                   [(vm.ns, "fd09:24ef:4179::a89:77", "sneaky"), (up, f"{UPLINK6_NET}::2", "marker")])
    assert "sneaky" not in "\n".join(got)


def test_a_vm_ipv6_address_forged_from_the_uplink_is_dropped(netvm6: Netvm) -> None:
    up = netvm6.add_uplink()
    netvm6.add_vm(4, ["10.137.0.5", VM6])
    target = netvm6.add_vm(6, ["10.137.0.6", "fd09:24ef:4179::a89:6"])
    netvm6.hotplug("online", 4)
    netvm6.hotplug("online", 6)
    up.run("ip", "addr", "add", f"{VM6}/128", "dev", "lo")
    got = received(target.ns, "fd09:24ef:4179::a89:6", netvm6.tmp / "vm6.log",
                   [(up, VM6, "forged"), (up, f"{UPLINK6_NET}::2", "genuine")])
    assert got == [f"{UPLINK6_NET}::2 genuine"]


def test_every_address_is_routed_and_allowed_not_only_the_first_of_each_family(netvm6: Netvm) -> None:
    extra = ["10.137.0.5", "10.137.0.55", VM6, "fd09:24ef:4179::a89:55"]
    netvm6.add_vm(4, extra)
    netvm6.hotplug("online", 4)
    routes = netvm6.ns.run("ip", "route").stdout + netvm6.ns.run("ip", "-6", "route").stdout
    for addr in extra:
        assert f"{addr} dev vif4.0 proto static metric 32748" in routes
    assert netvm6.members(4, "allowed") == ["vif4.0 . 10.137.0.5", "vif4.0 . 10.137.0.55"]
    assert netvm6.members(6, "allowed") == [f"vif4.0 . {VM6}", "vif4.0 . fd09:24ef:4179::a89:55"]
    # One gateway per family, whatever the number of addresses.
    addrs = netvm6.ns.run("ip", "-o", "addr", "show", "vif4.0").stdout
    assert addrs.count(f"{GATEWAY}/32") == 1 and addrs.count(f"{GATEWAY6}/128") == 1
