"""Netvm parameters (core.netvm_params): netvm.conf text, value validation, which source wins."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

import pytest

from vif_hotplug.core.errors import InvalidInput
from vif_hotplug.core.model import NetvmParams
from vif_hotplug.core.netvm_params import (
    Connected,
    Reader,
    parse_conf,
    resolve_connected,
    resolve_harden,
    resolve_mapped,
    resolve_params,
    service_enabled,
)
from vif_hotplug.core.plan_vif import Mapped

CONF = "[netvm]\ngateway = 10.137.0.1\ngateway6 = fd09::1\nprimary_dns = 10.139.1.1\nsecondary_dns = 10.139.1.2\n"
QUBESDB = {
    "/qubes-netvm-gateway": "10.137.1.1",
    "/qubes-netvm-primary-dns": "10.139.1.1",
    "/connected-ips": "10.137.1.5 10.137.1.6",
    "/connected-ips6": "fd09::1:5",
}
XENSTORE = {
    "qubes-netvm-gateway": "10.137.2.1",
    "qubes-netvm-secondary-dns": "10.139.1.2",
    "qubes-connected-ips": "10.137.2.5",
    "qubes-connected-ips6": "fd09::2:5",
}


def reader(values: dict[str, str]) -> Reader:
    return values.get


def refuse(key: str) -> str | None:
    raise AssertionError(f"{key} must not be read")


# --- parse_conf ---------------------------------------------------------------------------------


def test_conf_gives_all_addresses_and_ipv6_on_with_gateway6() -> None:
    p = parse_conf(CONF).params
    assert p is not None
    assert (p.gateway, p.gateway6, p.primary_dns, p.secondary_dns) == (
        IPv4Address("10.137.0.1"), IPv6Address("fd09::1"), IPv4Address("10.139.1.1"), IPv4Address("10.139.1.2"),
    )
    assert p.ipv6


@pytest.mark.parametrize(("value", "ipv6"), [("0", False), ("1", True)])
def test_ipv6_key_overrides_gateway6(value: str, ipv6: bool) -> None:
    p = parse_conf(CONF + f"ipv6 = {value}\n").params
    assert p is not None and p.ipv6 is ipv6


def test_ipv6_on_without_gateway6_is_still_off() -> None:
    p = parse_conf("[netvm]\ngateway = 10.137.0.1\nipv6 = 1\n").params
    assert p is not None and not p.ipv6


def test_conf_without_netvm_section_has_no_params() -> None:
    assert parse_conf("[hotplug]\nhooks_dir = /x\n").params is None


def test_conf_reads_hotplug_firewall_and_connected_settings() -> None:
    conf = parse_conf(
        "[netvm]\nconnected_ips = 10.137.0.5 10.137.0.6 10.137.0.5\nconnected_ips6 = fd09::5\n"
        "[hotplug]\nhooks_dir = /etc/hooks.d\nharden = yes\n[firewall]\nbackend = iptables\n",
        "/etc/vif-hotplug/netvm.conf",
    )
    assert (conf.origin, conf.hooks_dir, conf.harden, conf.backend) == (
        "/etc/vif-hotplug/netvm.conf", "/etc/hooks.d", True, "iptables",
    )
    assert conf.connected4 == (IPv4Address("10.137.0.5"), IPv4Address("10.137.0.6"))
    assert conf.connected6 == (IPv6Address("fd09::5"),)


def test_empty_conf_says_nothing() -> None:
    conf = parse_conf("")
    assert (conf.params, conf.connected4, conf.hooks_dir, conf.harden, conf.backend, conf.mapped) == (
        None, None, None, None, None, (),
    )


def test_mapped_ip_with_and_without_visible_gateway() -> None:
    conf = parse_conf("[mapped-ip]\n10.137.0.50 = 10.138.0.2 10.138.0.1\n10.137.0.51 = 10.138.0.3\n")
    assert dict(conf.mapped) == {
        "10.137.0.50": Mapped(IPv4Address("10.137.0.50"), IPv4Address("10.138.0.2"), IPv4Address("10.138.0.1")),
        "10.137.0.51": Mapped(IPv4Address("10.137.0.51"), IPv4Address("10.138.0.3")),
    }


BAD_CONF = [
    ("gateway not an address", "[netvm]\ngateway = 10.137.0.300\n", "10.137.0.300"),
    ("gateway is ipv6", "[netvm]\ngateway = fd09::1\n", "not an IPv4"),
    ("gateway6 is ipv4", "[netvm]\ngateway6 = 10.0.0.1\n", "not an IPv6"),
    ("dns with shell", "[netvm]\nprimary_dns = 1.2.3.4 -j ACCEPT\n", "primary_dns"),
    ("ipv6 not 0 or 1", "[netvm]\nipv6 = yes\n", "'yes'"),
    ("unknown netvm key", "[netvm]\ngatway = 10.0.0.1\n", "gatway"),
    ("connected not an address", "[netvm]\nconnected_ips = 10.0.0.1 nope\n", "nope"),
    ("connected6 is ipv4", "[netvm]\nconnected_ips6 = 10.0.0.1\n", "not an IPv6"),
    ("relative hooks_dir", "[hotplug]\nhooks_dir = hooks.d\n", "hooks.d"),
    ("harden not a boolean", "[hotplug]\nharden = maybe\n", "'maybe'"),
    ("unknown backend", "[firewall]\nbackend = pf\n", "'pf'"),
    ("mapped visible not an address", "[mapped-ip]\n10.137.0.50 = 10.138.0.300\n", "10.137.0.50"),
    ("mapped with three words", "[mapped-ip]\n10.137.0.50 = 10.138.0.2 10.138.0.1 x\n", "10.137.0.50"),
    ("mapped visible is ipv6", "[mapped-ip]\n10.137.0.50 = fd00::1\n", "10.137.0.50"),
    ("mapped with no value", "[mapped-ip]\n10.137.0.50 =\n", "10.137.0.50"),
    ("mapped real is not an address", "[mapped-ip]\nhost = 10.138.0.2\n", "host"),
    ("no section header", "garbage without section\n", "invalid config"),
    ("duplicate key", "[netvm]\ngateway = 10.0.0.1\ngateway = 10.0.0.2\n", "invalid config"),
]


@pytest.mark.parametrize(("text", "needle"), [pytest.param(*r[1:], id=r[0]) for r in BAD_CONF])
def test_bad_conf_values_are_named_in_one_line(text: str, needle: str) -> None:
    with pytest.raises(InvalidInput) as err:
        parse_conf(text, "netvm.conf")
    assert needle in str(err.value) and "\n" not in str(err.value)


# --- resolve_params: conf > QubesDB > XenStore ------------------------------------------------------


def test_conf_with_a_gateway_wins_and_nothing_else_is_read() -> None:
    p = resolve_params(parse_conf(CONF, "/etc/netvm.conf"), refuse, refuse)
    assert (p.gateway, p.source) == (IPv4Address("10.137.0.1"), "/etc/netvm.conf")


def test_conf_with_only_a_dns_still_wins() -> None:
    p = resolve_params(parse_conf("[netvm]\nprimary_dns = 10.139.1.1\n"), refuse, refuse)
    assert (p.gateway, p.primary_dns) == (None, IPv4Address("10.139.1.1"))


def test_qubesdb_wins_over_xenstore_when_conf_has_no_gateway() -> None:
    p = resolve_params(parse_conf("[netvm]\nipv6 = 0\n"), reader(QUBESDB), refuse)
    assert (p.gateway, p.secondary_dns, p.source) == (IPv4Address("10.137.1.1"), None, "QubesDB")


def test_xenstore_is_used_when_neither_conf_nor_qubesdb_has_parameters() -> None:
    p = resolve_params(None, reader({}), reader(XENSTORE))
    assert (p.gateway, p.secondary_dns, p.source) == (IPv4Address("10.137.2.1"), IPv4Address("10.139.1.2"), "XenStore")


def test_no_source_at_all_gives_empty_parameters() -> None:
    assert resolve_params(None, None, None) == NetvmParams()


def test_a_bad_value_in_the_winning_source_is_named() -> None:
    with pytest.raises(InvalidInput, match="gateway in XenStore"):
        resolve_params(None, None, reader({"qubes-netvm-gateway": "10.0.0.999"}))


def test_a_bad_value_in_a_losing_source_is_not_read() -> None:
    p = resolve_params(None, reader(QUBESDB), reader({"qubes-netvm-gateway": "garbage"}))
    assert p.source == "QubesDB"


def test_blank_values_count_as_absent() -> None:
    p = resolve_params(None, reader({"/qubes-netvm-gateway": "  "}), reader(XENSTORE))
    assert p.source == "XenStore"


# --- resolve_connected: per family, first source that has the key ------------------------------------


def test_connected_addresses_come_from_qubesdb_before_xenstore() -> None:
    c = resolve_connected(None, reader(QUBESDB), reader(XENSTORE))
    assert c == Connected((IPv4Address("10.137.1.5"), IPv4Address("10.137.1.6")), (IPv6Address("fd09::1:5"),),
                          "QubesDB")


def test_connected_addresses_come_from_xenstore_when_qubesdb_has_none() -> None:
    c = resolve_connected(None, reader({}), reader(XENSTORE))
    assert c == Connected((IPv4Address("10.137.2.5"),), (IPv6Address("fd09::2:5"),), "XenStore")


def test_each_family_takes_the_first_source_that_has_it() -> None:
    conf = parse_conf("[netvm]\nconnected_ips = 10.137.0.5\n", "netvm.conf")
    c = resolve_connected(conf, reader({"/connected-ips": "10.137.1.5"}), reader(XENSTORE))
    assert c == Connected((IPv4Address("10.137.0.5"),), (IPv6Address("fd09::2:5"),), "XenStore+netvm.conf")


def test_an_empty_connected_key_means_no_connected_address() -> None:
    c = resolve_connected(None, reader({"/connected-ips": ""}), reader(XENSTORE))
    assert c is not None and c.ipv4 == ()


def test_no_connected_key_anywhere_is_none() -> None:
    assert resolve_connected(parse_conf(CONF), reader({}), reader({})) is None


def test_a_bad_connected_address_is_named_with_its_source() -> None:
    with pytest.raises(InvalidInput, match="QubesDB"):
        resolve_connected(None, reader({"/connected-ips": "10.0.0.1 nope"}), None)


# --- resolve_mapped and resolve_harden ----------------------------------------------------------------

REAL = IPv4Address("10.137.0.50")


def test_mapping_from_conf_wins_over_qubesdb() -> None:
    conf = parse_conf("[mapped-ip]\n10.137.0.50 = 10.138.0.2\n")
    assert resolve_mapped(conf, refuse, REAL) == Mapped(REAL, IPv4Address("10.138.0.2"))


def test_mapping_from_qubesdb_with_visible_gateway() -> None:
    db = {"/mapped-ip/10.137.0.50/visible-ip": "10.138.0.2", "/mapped-ip/10.137.0.50/visible-gateway": "10.138.0.1"}
    assert resolve_mapped(None, reader(db), REAL) == Mapped(REAL, IPv4Address("10.138.0.2"), IPv4Address("10.138.0.1"))


def test_an_unmapped_address_has_no_mapping() -> None:
    assert resolve_mapped(parse_conf("[mapped-ip]\n10.137.0.51 = 10.138.0.2\n"), reader({}), REAL) is None


@pytest.mark.parametrize(
    ("conf", "db"),
    [("[mapped-ip]\n10.137.0.50 = 10.137.0.50\n", {}), ("", {"/mapped-ip/10.137.0.50/visible-ip": "10.137.0.50"})],
    ids=["conf", "QubesDB"],
)
def test_an_address_mapped_onto_itself_is_not_mapped(conf: str, db: dict[str, str]) -> None:
    assert resolve_mapped(parse_conf(conf), reader(db), REAL) is None


def test_a_bad_visible_address_in_qubesdb_is_named() -> None:
    with pytest.raises(InvalidInput, match="QubesDB visible-ip"):
        resolve_mapped(None, reader({"/mapped-ip/10.137.0.50/visible-ip": "nope"}), REAL)


@pytest.mark.parametrize(
    ("conf", "db", "harden"),
    [
        ("[hotplug]\nharden = false\n", {"/qubes-service/harden-network-interfaces": "1"}, False),
        ("[hotplug]\nharden = true\n", {"/qubes-service/harden-network-interfaces": "0"}, True),
        ("", {"/qubes-service/harden-network-interfaces": "1"}, True),
        ("", {}, False),
    ],
    ids=["conf off wins", "conf on wins", "qubes service on", "nothing"],
)
def test_harden_follows_conf_then_the_qubes_service(conf: str, db: dict[str, str], harden: bool) -> None:
    assert resolve_harden(parse_conf(conf), reader(db)) is harden


def test_no_qubesdb_means_no_hardening() -> None:
    assert resolve_harden(None, None) is False


@pytest.mark.parametrize("value", ["0", "", "yes", "true", "10", " 1"], ids=repr)
def test_a_qubes_service_flag_other_than_1_is_off(value: str) -> None:
    # Qubes' init (vm-systemd/qubes-sysinit.sh) turns a service on for "1" only.
    assert service_enabled(reader({"/qubes-service/harden-network-interfaces": value}),
                           "harden-network-interfaces") is False


def test_a_qubes_service_flag_of_1_is_on() -> None:
    assert service_enabled(reader({"/qubes-service/harden-network-interfaces": "1"}),
                           "harden-network-interfaces") is True


def test_hardening_is_off_when_qubesdb_says_0() -> None:
    assert resolve_harden(None, reader({"/qubes-service/harden-network-interfaces": "0"})) is False


# --- NetvmParams ------------------------------------------------------------------------------------------


def test_virtual_dns_drops_duplicates_and_absent_values() -> None:
    p = NetvmParams(primary_dns=IPv4Address("10.139.1.1"), secondary_dns=IPv4Address("10.139.1.1"))
    assert p.virtual_dns == (IPv4Address("10.139.1.1"),)


def test_own_addresses_are_gateways_and_virtual_dns() -> None:
    p = parse_conf(CONF).params
    assert p is not None and {str(a) for a in p.own_addresses} == {"10.137.0.1", "fd09::1", "10.139.1.1", "10.139.1.2"}


def test_a_comment_after_a_value_is_a_comment_as_the_conffile_shows_it() -> None:
    from vif_hotplug.core.netvm_params import parse_conf

    conf = parse_conf("[netvm]\ngateway = 10.137.0.1   # the netvm's own address\n")
    assert conf.params is not None and str(conf.params.gateway) == "10.137.0.1"
