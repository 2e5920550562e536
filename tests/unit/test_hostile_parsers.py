"""Hostile input to every parser of outside values: a valid value or ``InvalidInput``, nothing else.

Each property feeds arbitrary text (or bytes, decoded the way the product's
reader decodes them) to one parser and accepts exactly two outcomes: a
value that satisfies the parser's documented contract, or
:class:`InvalidInput` whose message is one non-empty line. Any other
exception (``ValueError``, ``RecursionError``, ``KeyError`` ...) escaping a
parser would reach an entry point as a traceback, or worse, reach the
kernel. Runs are derandomized so CI sees the same examples every time.
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from vif_hotplug.core.errors import InvalidInput
from vif_hotplug.core.netvm_params import NetvmConf, parse_conf
from vif_hotplug.core.resolvers import Upstreams, parse_resolv_conf, parse_resolved_dns
from vif_hotplug.core.validation import (
    IFNAMSIZ,
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
from vif_hotplug.xenstore_env import BackendConfig, HotplugEvent, parse_invocation, read_backend

T = TypeVar("T")

HOSTILE = settings(max_examples=400, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

# --- strategies -------------------------------------------------------------------------------

#: Characters parsers of addresses, names and paths care about, mixed with anything at all.
_NEAR = "0123456789abcdefABCDEF.:/%-_ vif\t\n\r\x00\x0b\x0c\x1c\x85\u2028"
near_miss = st.text(alphabet=st.sampled_from(_NEAR), max_size=40)
anything = st.text(max_size=80)
text_or_near = st.one_of(anything, near_miss)
#: Bytes as a reader gets them, decoded as XenStore's client decodes values.
xs_bytes = st.binary(max_size=60).map(lambda b: b.decode("utf-8", "backslashreplace"))

ipv4_like = st.builds(lambda a, b, c, d: f"{a}.{b}.{c}.{d}", *[st.integers(-1, 300)] * 4)
ipv6_like = st.ip_addresses(v=6).map(str)
prefix = st.integers(-1, 130).map(lambda n: f"/{n}")
address_word = st.one_of(
    ipv4_like, ipv6_like, st.ip_addresses().map(str),
    st.tuples(st.one_of(ipv4_like, ipv6_like), prefix).map("".join), near_miss,
)
address_list = st.lists(address_word, max_size=5).map(" ".join)

vif_like = st.one_of(
    st.builds(lambda d, n: f"vif{d}.{n}", st.integers(-5, 10**7), st.integers(-5, 10**7)),
    st.builds(lambda d, n: f"vif{d}.{n}", st.text("0123456789", max_size=8), st.text("0123456789", max_size=8)),
    text_or_near,
)
xenbus_like = st.one_of(
    st.builds(lambda h, d, n: f"{h}backend/vif/{d}/{n}", st.sampled_from(["", "/local/domain/0/", "/local/domain/",
                                                                           "/local/domain/01/", "//", "../"]),
              st.one_of(st.integers(-1, 40000).map(str), near_miss), st.one_of(st.integers(-1, 10**6).map(str),
                                                                                near_miss)),
    text_or_near,
)
mac_like = st.one_of(
    st.lists(st.text("0123456789abcdefABCDEFgz", min_size=1, max_size=3), min_size=4, max_size=7).map(":".join),
    st.binary(min_size=6, max_size=6).map(lambda b: ":".join(f"{x:02x}" for x in b)),
    text_or_near,
)

# INI documents built from plausible pieces, so values reach the value parsers, not only configparser.
_SECTIONS = ["netvm", "hotplug", "firewall", "mapped-ip", "DEFAULT", "NETVM", "other", "", "netvm]", "[netvm"]
_KEYS = ["gateway", "gateway6", "primary_dns", "secondary_dns", "ipv6", "connected_ips", "connected_ips6",
         "hooks_dir", "harden", "backend", "10.137.0.50", "Gateway", "bogus", "", "=", "%(x)s"]
ini_value = st.one_of(address_list, st.sampled_from(["0", "1", "true", "no", "maybe", "nftables", "iptables", "auto",
                                                     "/rw/hooks", "rel/dir", "%(gateway)s", "", " "]), anything)
ini_line = st.one_of(
    st.sampled_from(_SECTIONS).map(lambda s: f"[{s}]"),
    st.tuples(st.sampled_from(_KEYS), st.sampled_from([" = ", "=", ": ", " "]), ini_value).map("".join),
    st.sampled_from(["# comment", "; comment", "  continuation", "\t10.0.0.1", ""]),
    anything,
)
ini_text = st.lists(ini_line, max_size=12).map("\n".join)

resolv_line = st.one_of(
    st.tuples(st.sampled_from(["nameserver ", "nameserver\t", "nameserver", " nameserver ", "NAMESERVER ",
                               "search ", "options ", "domain ", "#", ";"]), address_word).map("".join),
    anything,
)
resolv_text = st.lists(resolv_line, max_size=10).map("\n".join)
#: A file read with errors="replace", as the DNS tool reads resolv.conf.
resolv_bytes = st.binary(max_size=200).map(lambda b: b.decode("utf-8", "replace"))

json_value = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=20,
)
resolved_entry = st.one_of(
    st.tuples(st.integers(-2, 3), st.sampled_from([2, 10, 2.0, "2", True, None]),
              st.one_of(st.lists(st.integers(-2, 300), max_size=6), json_value)).map(list),
    json_value,
)
resolved_doc = st.one_of(
    st.fixed_dictionaries({"data": st.lists(resolved_entry, max_size=5)},
                          optional={"type": st.sampled_from(["a(iiay)", "a(iiayqs)", "", 7])}).map(json.dumps),
    json_value.map(json.dumps),
    anything,
)

env_keys = st.sampled_from(["XENBUS_PATH", "vif", "XENBUS_TYPE", "script", "netdev", "type_if"])
env_values = st.one_of(xenbus_like, vif_like, text_or_near).filter(lambda s: "\x00" not in s)
argv_word = st.one_of(
    st.sampled_from(["online", "offline", "add", "remove", "type_if=vif", "type_if=tap", "=", "a=b=c", "x=",
                     "--", "-v"]),
    vif_like, st.tuples(st.text(string.ascii_letters + "_0", max_size=4), st.just("="), text_or_near).map("".join),
    text_or_near,
)


# --- the contract ----------------------------------------------------------------------------


def outcome(parse: Callable[[], T]) -> T | None:
    """The parsed value, or ``None`` after checking the refusal is one non-empty line."""
    try:
        return parse()
    except InvalidInput as exc:
        message = str(exc)
        assert message.strip(), "InvalidInput without a message"
        assert len(message.splitlines()) == 1 and "\n" not in message and "\r" not in message, repr(message)
        return None


# --- core.validation ---------------------------------------------------------------------------


@HOSTILE
@given(vif_like)
def test_vif_name_parser_returns_a_canonical_vif_or_refuses(text: str) -> None:
    vif = outcome(lambda: parse_vif_name(text))
    if vif is not None:
        assert isinstance(vif, VifId) and vif.name == text
        assert 0 <= vif.domid <= 32752 and len(text) < IFNAMSIZ


@HOSTILE
@given(xenbus_like)
def test_xenbus_path_parser_returns_a_vif_or_refuses(text: str) -> None:
    vif = outcome(lambda: parse_xenbus_path(text))
    if vif is not None:
        assert text.endswith(vif.xenbus_path) and 0 <= vif.domid <= 32752


@HOSTILE
@given(st.one_of(text_or_near, xs_bytes))
@example("a" * 15)
@example("a" * 16)
def test_interface_name_parser_returns_a_short_plain_name_or_refuses(text: str) -> None:
    name = outcome(lambda: parse_ifname(text))
    if name is not None:
        assert name == text and 1 <= len(name) < IFNAMSIZ
        assert not set(name) & set("/ \t\n\r\x00:;$`'\"\\")


@HOSTILE
@given(st.one_of(mac_like, xs_bytes))
def test_mac_parser_returns_a_lowercase_unicast_mac_or_refuses(text: str) -> None:
    mac = outcome(lambda: parse_mac(text))
    if mac is not None:
        octets = mac.split(":")
        assert len(octets) == 6 and mac == text.lower() and all(len(o) == 2 for o in octets)
        assert not int(octets[0], 16) & 1 and mac != "00:00:00:00:00:00"


@HOSTILE
@given(st.one_of(address_word, xs_bytes))
def test_address_parser_returns_one_host_address_or_refuses(text: str) -> None:
    addr = outcome(lambda: parse_address(text))
    if addr is not None:
        assert isinstance(addr, IPv4Address | IPv6Address) and "/" not in text


@HOSTILE
@given(st.one_of(address_word, xs_bytes), st.sampled_from([4, 6]))
def test_family_parsers_return_an_address_of_their_family_or_refuse(text: str, family: int) -> None:
    parse = parse_ipv4 if family == 4 else parse_ipv6
    addr = outcome(lambda: parse(text, "gateway"))
    if addr is not None:
        assert addr.version == family


@HOSTILE
@given(st.one_of(address_list, xs_bytes, anything))
@example("0.0.0.0")
@example("255.255.255.255")
@example("::ffff:0.0.0.0")
@example("10.0.0.0/8")
@example("fe80::1")
def test_vm_address_parser_returns_narrow_unicast_networks_or_refuses(text: str) -> None:
    networks = outcome(lambda: parse_vm_addresses(text))
    if networks is not None:
        assert len(set(networks)) == len(networks)
        for net in networks:
            assert isinstance(net, IPv4Network | IPv6Network)
            assert net.prefixlen >= (16 if net.version == 4 else 48)
            assert not (net.is_multicast or net.is_loopback or net.is_link_local or net.network_address.is_unspecified)


# --- netvm.conf -----------------------------------------------------------------------------------


@HOSTILE
@given(st.one_of(ini_text, anything))
@example("[netvm]\ngateway = 10.137.0.1\n[netvm]\n")
@example("[mapped-ip]\n10.137.0.50 =\n")
@example("[netvm]\ngateway = 10.137.0.1\n  10.137.0.2\n")
@example("[DEFAULT]\ngateway = 10.137.0.1\n[netvm]\n")
@example("[netvm]\nipv6 = %(gateway)s\n")
def test_netvm_conf_parser_returns_a_validated_config_or_refuses(text: str) -> None:
    conf = outcome(lambda: parse_conf(text, "/etc/vif-hotplug/netvm.conf"))
    if conf is not None:
        assert isinstance(conf, NetvmConf)
        assert conf.backend in (None, "auto", "nftables", "iptables")
        assert conf.hooks_dir is None or conf.hooks_dir.startswith("/")
        if conf.params is not None:
            assert conf.params.gateway is None or conf.params.gateway.version == 4
            assert conf.params.gateway6 is None or conf.params.gateway6.version == 6


# --- resolvers -----------------------------------------------------------------------------------


def _check_upstreams(found: Upstreams | None, virtual: tuple[IPv4Address, ...]) -> None:
    if found is None:
        return
    assert all(isinstance(a, IPv4Address) for a in found.servers)
    assert len(set(found.servers)) == len(found.servers)
    assert not set(found.servers) & set(virtual)
    assert not any(a.is_loopback or a.is_unspecified or a.is_multicast for a in found.servers)
    assert set(found.virtual_listed) <= set(virtual)


VIRTUAL = (IPv4Address("10.139.1.1"), IPv4Address("10.139.1.2"))


@HOSTILE
@given(st.one_of(resolv_text, resolv_bytes, anything))
@example("nameserver 10.139.1.1\nnameserver 127.0.0.53\nnameserver 010.0.0.1\n")
@example("\x7fELF\x02\x01\x01")
def test_resolv_conf_parser_returns_usable_ipv4_upstreams_or_refuses(text: str) -> None:
    _check_upstreams(outcome(lambda: parse_resolv_conf(text, VIRTUAL, "resolv.conf")), VIRTUAL)


@HOSTILE
@given(resolved_doc)
@example('{"data": [[0, 2, [10, 139, 1, 1]], [3, 2, [192, 0, 2, 53]]]}')
def test_resolved_dns_parser_returns_usable_ipv4_upstreams_or_refuses(text: str) -> None:
    _check_upstreams(outcome(lambda: parse_resolved_dns(text, VIRTUAL)), VIRTUAL)


@pytest.mark.parametrize("where", ["top", "data"])
def test_resolved_dns_parser_refuses_deeply_nested_json(where: str) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    text = deep if where == "top" else '{"data": [' + deep + "]}"
    try:
        outcome(lambda: parse_resolved_dns(text, VIRTUAL))
    except RecursionError:
        pytest.fail("parse_resolved_dns let RecursionError out on JSON nested 100000 deep (json.loads)")


# --- the toolstack's invocation and XenStore ---------------------------------------------------


@HOSTILE
@given(st.lists(argv_word, max_size=5), st.dictionaries(env_keys, env_values, max_size=4))
def test_invocation_parser_returns_a_consistent_event_or_refuses(argv: list[str], env: dict[str, str]) -> None:
    event = outcome(lambda: parse_invocation(argv, env))
    if event is not None:
        assert isinstance(event, HotplugEvent) and event.command == argv[0]
        assert 0 <= event.vif.domid <= 32752
        assert event.dev == event.vif.name or parse_ifname(event.dev) == event.dev


class DictXenStore:
    """XenStore as a dict of relative paths; a missing key reads ``None``."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values = values

    def read(self, path: str) -> str | None:
        return self.values.get(path)

    def write(self, path: str, value: str) -> None:  # pragma: no cover - read_backend only reads
        raise AssertionError(f"read_backend wrote {path}")


BASE = "backend/vif/4/0"
optional = st.one_of(st.none(), st.just(""))


@HOSTILE
@given(
    st.one_of(optional, address_list, xs_bytes, anything),
    st.one_of(optional, mac_like, xs_bytes),
    st.one_of(optional, st.sampled_from(["vif", "ioemu", "vif-emu", "VIF"]), xs_bytes, anything),
    st.one_of(optional, st.sampled_from(["work-vm", "vif4.0", "eth0"]), xs_bytes, text_or_near),
    st.booleans(),
)
def test_backend_reader_returns_validated_keys_or_refuses(
    ip: str | None, mac: str | None, vif_type: str | None, vifname: str | None, require: bool,
) -> None:
    keys = {"ip": ip, "mac": mac, "type": vif_type, "vifname": vifname}
    xs = DictXenStore({f"{BASE}/{k}": v for k, v in keys.items() if v is not None})
    found: Any = outcome(lambda: read_backend(xs, BASE, require))
    if found is None:
        return
    assert isinstance(found, BackendConfig)
    assert found.vifname is None or parse_ifname(found.vifname) == found.vifname
    if require:
        assert found.vm is not None and found.vm.mac == parse_mac(mac or "")
    if found.vm is not None:
        assert found.vm.networks == parse_vm_addresses(ip or "")


@pytest.mark.parametrize("value", ["\udcff", "\x00", "a\x00b"])
def test_surrogates_and_nuls_from_a_reader_are_refused_as_names(value: str) -> None:
    assert outcome(lambda: parse_ifname(value)) is None
