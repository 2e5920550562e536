"""Upstream nameserver lists: resolv.conf and systemd-resolved parsers, source order."""

from __future__ import annotations

import json
import stat
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from vif_hotplug.app.upstreams import read_upstreams, watched_files
from vif_hotplug.core.errors import InvalidInput
from vif_hotplug.core.resolvers import Upstreams, parse_resolv_conf, parse_resolved_dns

DNS1 = IPv4Address("10.139.1.1")
DNS2 = IPv4Address("10.139.1.2")
VIRTUAL = (DNS1, DNS2)


def ips(*texts: str) -> tuple[IPv4Address, ...]:
    return tuple(IPv4Address(t) for t in texts)


def cases(table: list[tuple[Any, ...]]) -> list[Any]:
    """``(id, *values)`` rows as pytest params, so each row passes or fails on its own."""
    return [pytest.param(*row[1:], id=row[0]) for row in table]


# --- resolv.conf -----------------------------------------------------------

RESOLV_CONF_CASES = [
    ("empty file", "", ()),
    ("zero upstreams, only other keywords", "search lan\noptions edns0\n", ()),
    ("one upstream", "nameserver 192.0.2.53\n", ips("192.0.2.53")),
    ("two upstreams in order", "nameserver 192.0.2.54\nnameserver 192.0.2.53\n", ips("192.0.2.54", "192.0.2.53")),
    (
        "three upstreams all kept",
        "nameserver 192.0.2.1\nnameserver 192.0.2.2\nnameserver 192.0.2.3\n",
        ips("192.0.2.1", "192.0.2.2", "192.0.2.3"),
    ),
    ("hash comment", "# nameserver 192.0.2.9\nnameserver 192.0.2.53\n", ips("192.0.2.53")),
    ("semicolon comment", "; nameserver 192.0.2.9\nnameserver 192.0.2.53\n", ips("192.0.2.53")),
    ("comment after the address", "nameserver 192.0.2.53 # primary\n", ips("192.0.2.53")),
    ("garbage line", "garbage ===\nnameserver 192.0.2.53\n", ips("192.0.2.53")),
    ("nameserver with no address", "nameserver\nnameserver \n", ()),
    ("nameserver with a word", "nameserver dns.example\n", ()),
    ("address with a prefix length", "nameserver 192.0.2.53/24\n", ()),
    ("address with leading zeros", "nameserver 192.0.2.053\n", ()),
    ("keyword glued to the address", "search lab.test\nnameserver192.0.2.53\n", ()),
    ("keyword in upper case", "search lab.test\nNAMESERVER 192.0.2.53\n", ()),
    ("indented keyword", "  nameserver 192.0.2.53\n", ()),
    ("tab after keyword", "nameserver\t192.0.2.53\n", ips("192.0.2.53")),
    ("CRLF line ends", "nameserver 192.0.2.53\r\nnameserver 192.0.2.54\r\n", ips("192.0.2.53", "192.0.2.54")),
    ("IPv6 only", "nameserver 2001:db8::53\nnameserver fe80::1%eth0\n", ()),
    ("IPv6 first, IPv4 kept", "nameserver 2001:db8::53\nnameserver 192.0.2.53\n", ips("192.0.2.53")),
    ("resolved stub only", "nameserver 127.0.0.53\noptions edns0 trust-ad\n", ()),
    ("other loopback", "nameserver 127.0.0.1\nnameserver 192.0.2.53\n", ips("192.0.2.53")),
    ("unspecified address", "nameserver 0.0.0.0\n", ()),
    ("multicast address", "nameserver 224.0.0.251\n", ()),
    ("broadcast address", "nameserver 255.255.255.255\n", ()),
    ("link-local resolver kept", "nameserver 169.254.169.253\n", ips("169.254.169.253")),
    ("virtual resolver listed as upstream", "nameserver 10.139.1.1\nnameserver 192.0.2.53\n", ips("192.0.2.53")),
    ("only virtual resolvers listed", "nameserver 10.139.1.1\nnameserver 10.139.1.2\n", ()),
    ("duplicate dropped, order kept", "nameserver 192.0.2.53\nnameserver 192.0.2.53\nnameserver 192.0.2.54\n",
     ips("192.0.2.53", "192.0.2.54")),
]


@pytest.mark.parametrize(("text", "expected"), cases(RESOLV_CONF_CASES))
def test_parse_resolv_conf(text: str, expected: tuple[IPv4Address, ...]) -> None:
    assert parse_resolv_conf(text, VIRTUAL).servers == expected


def test_parse_resolv_conf_without_virtual_resolvers_keeps_private_addresses() -> None:
    assert parse_resolv_conf("nameserver 10.139.1.1\n").servers == ips("10.139.1.1")


RESOLV_CONF_VIRTUAL_CASES = [
    ("chained source: both virtual resolvers", f"nameserver {DNS1}\nnameserver {DNS2}\n", (), VIRTUAL),
    ("chained source: order kept", f"nameserver {DNS2}\nnameserver {DNS1}\n", (), (DNS2, DNS1)),
    ("chained source: only one", f"nameserver {DNS1}\n", (), (DNS1,)),
    ("chained source: duplicate counts once", f"nameserver {DNS1}\nnameserver {DNS1}\n", (), (DNS1,)),
    (
        "chained source with a real upstream",
        f"nameserver {DNS1}\nnameserver 192.0.2.53\nnameserver {DNS2}\n",
        ips("192.0.2.53"),
        VIRTUAL,
    ),
    ("no upstream at all", "nameserver 127.0.0.53\n", (), ()),
    ("real upstreams only", "nameserver 192.0.2.53\n", ips("192.0.2.53"), ()),
    ("commented virtual resolver", f"# nameserver {DNS1}\n", (), ()),
    ("other address of the same subnet is a real upstream", "nameserver 10.139.1.3\n", ips("10.139.1.3"), ()),
]


@pytest.mark.parametrize(("text", "servers", "virtual_listed"), cases(RESOLV_CONF_VIRTUAL_CASES))
def test_parse_resolv_conf_sets_virtual_resolvers_apart(
    text: str, servers: tuple[IPv4Address, ...], virtual_listed: tuple[IPv4Address, ...]
) -> None:
    parsed = parse_resolv_conf(text, VIRTUAL)
    assert (parsed.servers, parsed.virtual_listed) == (servers, virtual_listed)


def test_parse_resolv_conf_labels_result_with_source() -> None:
    assert parse_resolv_conf("", VIRTUAL, "/x/resolv.conf").source == "/x/resolv.conf"


# --- systemd-resolved D-Bus property --------------------------------------


def busctl_json(*entries: tuple[int, int, list[int]]) -> str:
    return json.dumps({"type": "a(iiay)", "data": [list(e) for e in entries]})


V6 = [0x20, 0x01, 0x0D, 0xB8] + [0] * 11 + [0x53]

RESOLVED_CASES = [
    ("no servers", busctl_json(), ()),
    ("one global", busctl_json((0, 2, [192, 0, 2, 53])), ips("192.0.2.53")),
    (
        "two globals in order",
        busctl_json((0, 2, [192, 0, 2, 54]), (0, 2, [192, 0, 2, 53])),
        ips("192.0.2.54", "192.0.2.53"),
    ),
    (
        "three globals",
        busctl_json((0, 2, [192, 0, 2, 1]), (0, 2, [192, 0, 2, 2]), (0, 2, [192, 0, 2, 3])),
        ips("192.0.2.1", "192.0.2.2", "192.0.2.3"),
    ),
    (
        "globals win over per-link",
        busctl_json((3, 2, [198, 51, 100, 1]), (0, 2, [192, 0, 2, 53])),
        ips("192.0.2.53"),
    ),
    (
        "per-link when no global",
        busctl_json((3, 2, [198, 51, 100, 1]), (4, 2, [198, 51, 100, 2])),
        ips("198.51.100.1", "198.51.100.2"),
    ),
    (
        "IPv6-only globals fall back to per-link IPv4",
        busctl_json((0, 10, V6), (3, 2, [198, 51, 100, 1])),
        ips("198.51.100.1"),
    ),
    ("IPv6 only", busctl_json((0, 10, V6), (2, 10, V6)), ()),
    ("stub address skipped", busctl_json((0, 2, [127, 0, 0, 53]), (0, 2, [192, 0, 2, 53])), ips("192.0.2.53")),
    (
        "virtual resolver skipped",
        busctl_json((0, 2, [10, 139, 1, 2]), (0, 2, [192, 0, 2, 53])),
        ips("192.0.2.53"),
    ),
    ("entry too short skipped", json.dumps({"type": "a(iiay)", "data": [[0, 2]]}), ()),
    ("address of wrong length skipped", busctl_json((0, 2, [192, 0, 2])), ()),
    ("byte out of range skipped", busctl_json((0, 2, [192, 0, 2, 256])), ()),
    ("non-numeric ifindex skipped", json.dumps({"type": "a(iiay)", "data": [["0", 2, [192, 0, 2, 53]]]}), ()),
    ("boolean bytes skipped", json.dumps({"type": "a(iiay)", "data": [[0, 2, [True, 0, 2, 53]]]}), ()),
    ("extra whitespace around JSON", "\n  " + busctl_json((0, 2, [192, 0, 2, 53])) + "\n", ips("192.0.2.53")),
]


@pytest.mark.parametrize(("text", "expected"), cases(RESOLVED_CASES))
def test_parse_resolved_dns(text: str, expected: tuple[IPv4Address, ...]) -> None:
    assert parse_resolved_dns(text, VIRTUAL).servers == expected


RESOLVED_VIRTUAL_CASES = [
    (
        "chained: virtual resolvers per link",
        busctl_json((2, 2, [10, 139, 1, 1]), (2, 2, [10, 139, 1, 2])),
        (),
        VIRTUAL,
    ),
    ("chained: virtual resolver global", busctl_json((0, 2, [10, 139, 1, 2])), (), (DNS2,)),
    (
        "globals listed before per-link",
        busctl_json((2, 2, [10, 139, 1, 1]), (0, 2, [10, 139, 1, 2])),
        (),
        (DNS2, DNS1),
    ),
    (
        "chained with a real per-link upstream",
        busctl_json((0, 2, [10, 139, 1, 1]), (2, 2, [192, 0, 2, 53])),
        ips("192.0.2.53"),
        (DNS1,),
    ),
    ("no upstream at all", busctl_json((0, 2, [127, 0, 0, 53])), (), ()),
]


@pytest.mark.parametrize(("text", "servers", "virtual_listed"), cases(RESOLVED_VIRTUAL_CASES))
def test_parse_resolved_dns_sets_virtual_resolvers_apart(
    text: str, servers: tuple[IPv4Address, ...], virtual_listed: tuple[IPv4Address, ...]
) -> None:
    parsed = parse_resolved_dns(text, VIRTUAL)
    assert (parsed.servers, parsed.virtual_listed) == (servers, virtual_listed)


BAD_RESOLVED = [
    ("empty output", ""),
    ("not JSON", "a(iiay) 1 0 2 4 192 0 2 53"),
    ("JSON list", "[]"),
    ("no data", '{"type": "a(iiay)"}'),
    ("data not a list", '{"type": "a(iiay)", "data": 5}'),
    ("wrong property type", '{"type": "a(iiayqs)", "data": []}'),
]


@pytest.mark.parametrize("text", cases(BAD_RESOLVED))
def test_parse_resolved_dns_rejects_malformed_document(text: str) -> None:
    with pytest.raises(InvalidInput):
        parse_resolved_dns(text, VIRTUAL)


# --- choosing the source ----------------------------------------------------


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """Stand-ins for /etc/resolv.conf and resolved's runtime dir (not created)."""
    return {"etc": tmp_path / "etc-resolv.conf", "resolved": tmp_path / "resolve"}


def fake_busctl(tmp_path: Path, stdout: str, rc: int = 0) -> str:
    path = tmp_path / "busctl"
    (tmp_path / "busctl.out").write_text(stdout)
    path.write_text(f"#!/bin/sh\ncat '{tmp_path / 'busctl.out'}'\nexit {rc}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def read(files: dict[str, Path], busctl: str = "/nonexistent/busctl", resolv_conf: str | None = None) -> Upstreams:
    return read_upstreams(
        VIRTUAL, resolv_conf, etc_resolv_conf=str(files["etc"]), resolved_dir=str(files["resolved"]), busctl=busctl
    )


def with_resolved(files: dict[str, Path], resolv_conf: str | None) -> None:
    files["resolved"].mkdir()
    if resolv_conf is not None:
        (files["resolved"] / "resolv.conf").write_text(resolv_conf)


def test_etc_resolv_conf_is_used_without_resolved(files: dict[str, Path]) -> None:
    files["etc"].write_text("nameserver 192.0.2.53\n")
    assert read(files) == Upstreams(ips("192.0.2.53"), str(files["etc"]))


def test_missing_etc_resolv_conf_means_no_upstream(files: dict[str, Path]) -> None:
    assert read(files) == Upstreams((), str(files["etc"]), ())


def test_chained_etc_resolv_conf_lists_virtual_resolvers(files: dict[str, Path]) -> None:
    files["etc"].write_text(f"nameserver {DNS1}\nnameserver {DNS2}\n")
    assert read(files) == Upstreams((), str(files["etc"]), VIRTUAL)


def test_chained_resolved_dbus_answer_lists_virtual_resolvers(files: dict[str, Path], tmp_path: Path) -> None:
    with_resolved(files, "nameserver 198.51.100.1\n")
    busctl = fake_busctl(tmp_path, busctl_json((2, 2, [10, 139, 1, 1]), (2, 2, [10, 139, 1, 2])))
    assert read(files, busctl) == Upstreams((), "systemd-resolved (D-Bus)", VIRTUAL)


def test_resolved_dbus_answer_wins_over_files(files: dict[str, Path], tmp_path: Path) -> None:
    files["etc"].write_text("nameserver 127.0.0.53\n")
    with_resolved(files, "nameserver 198.51.100.1\n")
    busctl = fake_busctl(tmp_path, busctl_json((0, 2, [192, 0, 2, 53])))
    assert read(files, busctl).servers == ips("192.0.2.53")


def test_resolved_file_is_used_when_dbus_is_unavailable(files: dict[str, Path], tmp_path: Path) -> None:
    files["etc"].write_text("nameserver 127.0.0.53\n")
    with_resolved(files, "# resolved's upstreams\nnameserver 198.51.100.1\n")
    busctl = fake_busctl(tmp_path, "", rc=1)
    assert read(files, busctl) == Upstreams(ips("198.51.100.1"), str(files["resolved"] / "resolv.conf"))


def test_resolved_file_is_used_when_busctl_is_missing(files: dict[str, Path]) -> None:
    files["etc"].write_text("nameserver 127.0.0.53\n")
    with_resolved(files, "nameserver 198.51.100.1\n")
    assert read(files).servers == ips("198.51.100.1")


def test_resolved_file_is_used_when_dbus_answer_is_garbage(files: dict[str, Path], tmp_path: Path) -> None:
    with_resolved(files, "nameserver 198.51.100.1\n")
    busctl = fake_busctl(tmp_path, "Failed to get property\n")
    assert read(files, busctl).servers == ips("198.51.100.1")


def test_empty_resolved_answer_means_no_upstream(files: dict[str, Path], tmp_path: Path) -> None:
    files["etc"].write_text("nameserver 192.0.2.53\n")
    with_resolved(files, "nameserver 198.51.100.1\n")
    busctl = fake_busctl(tmp_path, busctl_json())
    assert read(files, busctl).servers == ()


def test_etc_resolv_conf_is_used_when_resolved_dir_has_no_file(files: dict[str, Path]) -> None:
    files["etc"].write_text("nameserver 192.0.2.53\n")
    with_resolved(files, None)
    assert read(files).servers == ips("192.0.2.53")


def test_explicit_resolv_conf_wins_over_resolved(files: dict[str, Path], tmp_path: Path) -> None:
    with_resolved(files, "nameserver 198.51.100.1\n")
    explicit = tmp_path / "given.conf"
    explicit.write_text("nameserver 192.0.2.99\n")
    busctl = fake_busctl(tmp_path, busctl_json((0, 2, [192, 0, 2, 53])))
    assert read(files, busctl, str(explicit)) == Upstreams(ips("192.0.2.99"), str(explicit))


def test_missing_explicit_resolv_conf_is_an_error(files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="does not exist"):
        read(files, resolv_conf=str(tmp_path / "absent.conf"))


def test_unreadable_resolv_conf_is_an_error(files: dict[str, Path]) -> None:
    files["etc"].mkdir()  # reading a directory fails even for root
    with pytest.raises(InvalidInput, match="cannot read"):
        read(files)


def test_watched_files_are_the_explicit_file_only() -> None:
    assert watched_files("/tmp/x.conf") == ("/tmp/x.conf",)


def test_watched_files_default_to_both_resolver_files() -> None:
    assert watched_files() == ("/etc/resolv.conf", "/run/systemd/resolve/resolv.conf")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("\x00\x01binary\xff", "line 1"),
        ("nameserver 192.0.2.1\n\x7fELF\x02\x01\n", "line 2"),
        ("<html><body>captive portal</body></html>\n", "<html>"),
        ("this is not\na resolver file\n", "this is not"),
        ("nameserver 192.0.2.1\ufffd\n", "line 1"),
    ],
)
def test_a_file_that_is_not_a_resolv_conf_is_an_error_naming_the_line(text: str, needle: str) -> None:
    with pytest.raises(InvalidInput) as err:
        parse_resolv_conf(text, (), "/etc/resolv.conf")
    assert needle in str(err.value) and "/etc/resolv.conf" in str(err.value)


@pytest.mark.parametrize("text", ["", "# only a comment\n", "\n\n", "search lab.test\n", "nameserver\n"])
def test_empty_or_keyword_only_files_are_not_garbage(text: str) -> None:
    assert parse_resolv_conf(text).servers == ()
