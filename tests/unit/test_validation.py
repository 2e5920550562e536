"""Parsers of every outside value (core.validation): names, paths, addresses, MACs."""

from __future__ import annotations

from ipaddress import ip_network

import pytest

from vif_hotplug.core.errors import InvalidInput
from vif_hotplug.core.validation import (
    VifId,
    parse_address,
    parse_ifname,
    parse_ipv4,
    parse_ipv6,
    parse_mac,
    parse_vif_name,
    parse_vm_addresses,
    parse_xenbus_path,
)


@pytest.mark.parametrize(
    ("name", "vif"),
    [("vif0.0", VifId(0, 0)), ("vif4.0", VifId(4, 0)), ("vif32752.3", VifId(32752, 3)), ("vif12.10", VifId(12, 10))],
)
def test_well_formed_vif_names_parse(name: str, vif: VifId) -> None:
    assert parse_vif_name(name) == vif


@pytest.mark.parametrize(
    "name",
    [
        "eth0", "vif", "vif4", "vif4.", "vif.0", "vif04.0", "vif4.00", "vif32753.0", "vif99999.0", "vif4.0;reboot",
        "vif4.0 ", " vif4.0", "vif4.0\n", "vif$(id).0", "vif1.123456", "vif-4.0", "vif4.0-emu", "",
        "vif12345.123456",
    ],
)
def test_malformed_vif_names_are_rejected_naming_the_value(name: str) -> None:
    with pytest.raises(InvalidInput) as err:
        parse_vif_name(name)
    assert repr(name[:20])[1:-1][:8] in str(err.value)
    assert "\n" not in str(err.value)


def test_domid_above_32752_names_the_limit() -> None:
    with pytest.raises(InvalidInput, match="32752"):
        parse_vif_name("vif32753.0")


@pytest.mark.parametrize(
    ("path", "vif"),
    [("backend/vif/4/0", VifId(4, 0)), ("/local/domain/0/backend/vif/7/1", VifId(7, 1))],
)
def test_xenbus_paths_give_domid_and_devid(path: str, vif: VifId) -> None:
    assert parse_xenbus_path(path) == vif


@pytest.mark.parametrize("path", ["", "backend/vbd/4/0", "backend/vif/04/0", "backend/vif/4", "backend/vif/40000/0"])
def test_bad_xenbus_paths_are_rejected(path: str) -> None:
    with pytest.raises(InvalidInput, match="XENBUS_PATH"):
        parse_xenbus_path(path)


@pytest.mark.parametrize("text", ["10.137.0.300", "abc", "10.0.0.1 -j ACCEPT", "10.0.0.0/33", "10.0.0.1/24",
                                  "127.0.0.1", "0.0.0.0", "224.0.0.1", "10.0.0.1;ls", "fe80::1%eth0", "fe80::1",
                                  "169.254.0.7", "255.255.255.255", "128.0.0.0/1", "10.0.0.0/8", "8000::/1",
                                  "fd00::/47", "ff02::1", "::1", "::", "10.137.0.5 bogus"])
def test_unparsable_vm_addresses_are_rejected(text: str) -> None:
    with pytest.raises(InvalidInput, match="invalid ip"):
        parse_vm_addresses(text)


@pytest.mark.parametrize("text", ["", "   ", "\t\n"], ids=["empty", "blanks", "whitespace"])
def test_empty_ip_is_a_vm_without_addresses(text: str) -> None:
    assert parse_vm_addresses(text) == ()


@pytest.mark.parametrize("text", ["10.137.0.0/16", "fd09::/48", "10.137.0.5/32", "fd09::5/128"])
def test_networks_up_to_the_widest_allowed_are_accepted(text: str) -> None:
    assert parse_vm_addresses(text) == (ip_network(text),)


def test_a_long_bad_value_is_shortened_in_the_message() -> None:
    with pytest.raises(InvalidInput) as err:
        parse_vm_addresses("x" * 500)
    assert len(str(err.value)) < 200


def test_vm_addresses_keep_order_and_drop_duplicates() -> None:
    assert parse_vm_addresses("10.137.0.5 fd09:24ef:4179::a89:5 10.137.0.5 10.137.1.0/24") == (
        ip_network("10.137.0.5/32"), ip_network("fd09:24ef:4179::a89:5/128"), ip_network("10.137.1.0/24"),
    )


@pytest.mark.parametrize(
    "mac",
    ["00:16:3e:5e:6c", "00:16:3e:5e:6c:0g", "00-16-3e-5e-6c-00", "", "00:16:3e:5e:6c:00:11", " 00:16:3e:5e:6c:00"],
)
def test_bad_macs_are_rejected(mac: str) -> None:
    with pytest.raises(InvalidInput, match="invalid MAC"):
        parse_mac(mac)


@pytest.mark.parametrize(
    ("mac", "why"),
    [
        ("ff:ff:ff:ff:ff:ff", "broadcast"),
        ("01:00:5e:00:00:01", "multicast"),
        ("33:33:00:00:00:01", "multicast"),
        ("03:16:3e:5e:6c:00", "multicast"),
        ("00:00:00:00:00:00", "all zero"),
    ],
    ids=["broadcast", "ipv4 multicast", "ipv6 multicast", "group bit", "all zero"],
)
def test_macs_that_are_not_one_stations_are_refused(mac: str, why: str) -> None:
    with pytest.raises(InvalidInput, match=why):
        parse_mac(mac)


@pytest.mark.parametrize("mac", ["00:16:3e:5e:6c:00", "02:00:00:00:00:01", "fe:ff:ff:ff:ff:fe"])
def test_unicast_macs_are_accepted(mac: str) -> None:
    assert parse_mac(mac) == mac


def test_macs_are_normalised_to_lower_case() -> None:
    assert parse_mac("00:16:3E:5E:6C:0A") == "00:16:3e:5e:6c:0a"


@pytest.mark.parametrize("name", ["eth0;x", "a b", "-rf", "x" * 16, "", "a/b", "$(x)"])
def test_unsafe_interface_names_are_rejected(name: str) -> None:
    with pytest.raises(InvalidInput):
        parse_ifname(name)


@pytest.mark.parametrize("name", ["vif4.0", "work-vm", "eth0", "a", "x" * 15, "_x.y-z"])
def test_safe_interface_names_are_accepted(name: str) -> None:
    assert parse_ifname(name) == name


@pytest.mark.parametrize(
    ("text", "parse", "needle"),
    [
        ("10.0.0.1/32", parse_address, "10.0.0.1/32"),
        ("10.0.0.1 ", parse_address, "10.0.0.1 "),
        ("fd09::1", parse_ipv4, "not an IPv4"),
        ("10.0.0.1", parse_ipv6, "not an IPv6"),
        ("0x0a.0.0.1", parse_address, "0x0a"),
    ],
    ids=["prefix", "trailing blank", "ipv6 for ipv4", "ipv4 for ipv6", "hex"],
)
def test_bad_single_addresses_are_named(text: str, parse: object, needle: str) -> None:
    with pytest.raises(InvalidInput) as err:
        parse(text, "gateway")  # type: ignore[operator]
    assert needle in str(err.value) and "gateway" in str(err.value)


def test_vif_id_gives_name_and_xenbus_path() -> None:
    assert (VifId(4, 1).name, VifId(4, 1).xenbus_path) == ("vif4.1", "backend/vif/4/1")
