"""Netvm parameters: config text, value validation, first source wins."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest

from vif_hotplug.errors import InvalidInput
from vif_hotplug.netvm_params import load_local_settings, load_netvm_params, parse_netvm_conf

CONF = "[netvm]\ngateway = 10.137.0.1\ngateway6 = fd09::1\nprimary_dns = 10.139.1.1\nsecondary_dns = 10.139.1.2\n"


def test_config_gives_all_addresses_and_ipv6_on_with_gateway6() -> None:
    p = parse_netvm_conf(CONF)
    assert p is not None
    assert (p.gateway, p.gateway6, p.primary_dns, p.secondary_dns) == (
        IPv4Address("10.137.0.1"), IPv6Address("fd09::1"), IPv4Address("10.139.1.1"), IPv4Address("10.139.1.2"),
    )
    assert p.ipv6


def test_ipv6_zero_overrides_gateway6() -> None:
    p = parse_netvm_conf(CONF + "ipv6 = 0\n")
    assert p is not None and not p.ipv6


def test_config_without_netvm_section_is_not_a_source() -> None:
    assert parse_netvm_conf("[hotplug]\nhooks_dir = /x\n") is None


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[netvm]\ngateway = 10.137.0.300\n", "10.137.0.300"),
        ("[netvm]\ngateway = fd09::1\n", "not an IPv4"),
        ("[netvm]\ngateway6 = 10.0.0.1\n", "not an IPv6"),
        ("[netvm]\nprimary_dns = 1.2.3.4 -j ACCEPT\n", "primary_dns"),
        ("[netvm]\nipv6 = yes\n", "'yes'"),
        ("[netvm]\ngatway = 10.0.0.1\n", "gatway"),
        ("garbage without section\n", "invalid config"),
    ],
)
def test_bad_config_values_are_named(text: str, needle: str) -> None:
    with pytest.raises(InvalidInput) as err:
        parse_netvm_conf(text)
    assert needle in str(err.value)


def test_config_file_wins_and_xenstore_is_not_needed(tmp_path: Path) -> None:
    conf = tmp_path / "netvm.conf"
    conf.write_text(CONF)

    def fail() -> object:
        raise AssertionError("XenStore must not be consulted")

    p = load_netvm_params({"VIF_HOTPLUG_CONF": str(conf), "PATH": str(tmp_path)}, connect=fail)  # type: ignore[arg-type]
    assert p.source == str(conf)


def test_missing_config_and_no_other_source_gives_empty_params(tmp_path: Path) -> None:
    p = load_netvm_params({"VIF_HOTPLUG_CONF": str(tmp_path / "none.conf"), "PATH": str(tmp_path)})
    assert p.gateway is None and not p.ipv6


def test_hooks_dir_from_config_and_env(tmp_path: Path) -> None:
    conf = tmp_path / "netvm.conf"
    conf.write_text("[hotplug]\nhooks_dir = /etc/hooks.d\n")
    assert load_local_settings({"VIF_HOTPLUG_CONF": str(conf)}).hooks_dir == "/etc/hooks.d"
    assert load_local_settings({"VIF_HOTPLUG_CONF": str(conf), "VIF_HOTPLUG_HOOKS_DIR": "/x"}).hooks_dir == "/x"


def test_mapped_ip_from_config_with_and_without_visible_gateway() -> None:
    from vif_hotplug.netvm_params import parse_mapped

    text = "[mapped-ip]\n10.137.0.50 = 10.138.0.2 10.138.0.1\n10.137.0.51 = 10.138.0.3\n"
    assert parse_mapped(text, "10.137.0.50") == (IPv4Address("10.138.0.2"), IPv4Address("10.138.0.1"))
    assert parse_mapped(text, "10.137.0.51") == (IPv4Address("10.138.0.3"), None)
    assert parse_mapped(text, "10.137.0.52") is None


@pytest.mark.parametrize("value", ["10.138.0.300", "10.138.0.2 10.138.0.1 extra", "fd00::1", ""])
def test_bad_mapped_ip_values_are_named(value: str) -> None:
    from vif_hotplug.netvm_params import parse_mapped

    with pytest.raises(InvalidInput, match=r"10\.137\.0\.50"):
        parse_mapped(f"[mapped-ip]\n10.137.0.50 = {value}\n", "10.137.0.50")


def test_an_address_mapped_onto_itself_is_not_mapped(tmp_path: Path) -> None:
    from vif_hotplug.netvm_params import load_mapped

    conf = tmp_path / "netvm.conf"
    conf.write_text("[mapped-ip]\n10.137.0.50 = 10.137.0.50\n")
    assert load_mapped({"VIF_HOTPLUG_CONF": str(conf)}, "10.137.0.50") is None
