from __future__ import annotations

from ipaddress import ip_network

import pytest

from vif_hotplug.errors import InvalidInput
from vif_hotplug.validation import (
    VifId,
    parse_ifname,
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


@pytest.mark.parametrize("text", ["10.137.0.300", "abc", "10.0.0.1 -j ACCEPT", "", "   ", "10.0.0.0/33", "10.0.0.1/24",
                                  "127.0.0.1", "0.0.0.0", "224.0.0.1", "10.0.0.1;ls", "fe80::1%eth0", "fe80::1",
                                  "169.254.0.7", "255.255.255.255", "128.0.0.0/1", "10.0.0.0/8", "8000::/1"])
def test_unparsable_vm_addresses_are_rejected(text: str) -> None:
    with pytest.raises(InvalidInput, match="invalid ip"):
        parse_vm_addresses(text)


def test_vm_addresses_keep_order_and_drop_duplicates() -> None:
    assert parse_vm_addresses("10.137.0.5 fd09:24ef:4179::a89:5 10.137.0.5 10.137.1.0/24") == (
        ip_network("10.137.0.5/32"), ip_network("fd09:24ef:4179::a89:5/128"), ip_network("10.137.1.0/24"),
    )


@pytest.mark.parametrize(
    "mac", ["00:16:3e:5e:6c", "00:16:3e:5e:6c:0g", "00-16-3e-5e-6c-00", "", "00:16:3e:5e:6c:00:11"]
)
def test_bad_macs_are_rejected(mac: str) -> None:
    with pytest.raises(InvalidInput, match="invalid MAC"):
        parse_mac(mac)


def test_macs_are_normalised_to_lower_case() -> None:
    assert parse_mac("00:16:3E:5E:6C:0A") == "00:16:3e:5e:6c:0a"


@pytest.mark.parametrize("name", ["eth0;x", "a b", "-rf", "x" * 16, "", "a/b", "$(x)"])
def test_unsafe_interface_names_are_rejected(name: str) -> None:
    with pytest.raises(InvalidInput):
        parse_ifname(name)
