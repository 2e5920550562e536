"""Where the uplink's real nameservers come from, as an ordered IPv4 list.

Two pure parsers turn text into an upstream list:

* :func:`parse_resolv_conf`: ``nameserver`` lines of a resolv.conf;
* :func:`parse_resolved_dns`: systemd-resolved's ``DNS`` D-Bus property as
  printed by ``busctl --json=short get-property``.

Both keep only IPv4 addresses that can be a remote resolver (no loopback such
as resolved's ``127.0.0.53`` stub, no ``0.0.0.0``, multicast or reserved
space), drop duplicates and keep the order, which is the order of preference.
This netvm's own virtual resolvers (``virtual``) are never real upstreams
(forwarding DNS1 to DNS1 is no mapping at all), so they are set apart in
:attr:`Upstreams.virtual_listed`: a netvm whose source names only them is
chained behind another netvm that serves those addresses (Qubes gives a
netvm such as sys-firewall the same DNS1/DNS2 as any other VM of sys-net).

:mod:`vif_hotplug.app.upstreams` reads the sources these parse.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address

from .errors import InvalidInput

#: The default source; a label for what :func:`parse_resolv_conf` parsed.
ETC_RESOLV_CONF = "/etc/resolv.conf"

_AF_INET = 2  # linux/socket.h; resolved reports address families numerically


@dataclass(frozen=True, slots=True)
class Upstreams:
    """What one source lists: real upstreams, and which of our virtual resolvers.

    ``servers`` are the real upstream nameservers in order of preference;
    ``virtual_listed`` the virtual resolvers of this netvm that the source
    also named, in its order (a chained netvm's only entries; what to make
    of them is :func:`vif_hotplug.dns_rules.plan_dns_ruleset`'s call). Both
    are free of duplicates.
    """

    servers: tuple[IPv4Address, ...]
    source: str
    virtual_listed: tuple[IPv4Address, ...] = ()


def _usable(addr: IPv4Address, virtual: Collection[IPv4Address]) -> bool:
    if addr in virtual:
        return False
    return not (addr.is_loopback or addr.is_unspecified or addr.is_multicast or addr.is_reserved)


def _keep(candidates: Iterable[IPv4Address], virtual: Collection[IPv4Address]) -> tuple[IPv4Address, ...]:
    out: list[IPv4Address] = []
    for addr in candidates:
        if _usable(addr, virtual) and addr not in out:
            out.append(addr)
    return tuple(out)


def _own(candidates: Iterable[IPv4Address], virtual: Collection[IPv4Address]) -> tuple[IPv4Address, ...]:
    return tuple(dict.fromkeys(addr for addr in candidates if addr in virtual))


def _ipv4(text: str) -> IPv4Address | None:
    # IPv4Address rejects leading zeros, signs and whitespace, so "010.0.0.1"
    # (which inet_aton would read as octal) is ignored rather than misread.
    try:
        return IPv4Address(text)
    except ValueError:
        return None


def parse_resolv_conf(
    text: str, virtual: Collection[IPv4Address] = (), source: str = ETC_RESOLV_CONF
) -> Upstreams:
    """IPv4 upstreams named by the ``nameserver`` lines of resolv.conf ``text``.

    Addresses in ``virtual`` go to ``virtual_listed`` instead of ``servers``;
    ``source`` labels the result and errors. Lines that are comments (``#``
    or ``;``), other keywords, ``nameserver`` without a valid IPv4 address
    (IPv6, garbage, nothing) are ignored. As in glibc's parser, the keyword
    must start the line and be followed by a blank, and anything after the
    address is ignored. A file that is not a resolv.conf at all (binary
    data, or not one line a resolver would recognise) raises
    :class:`InvalidInput` naming the first bad line: acting on it would turn
    a broken file into "no upstream" and cut every VM off.
    """
    _check_is_resolv_conf(text, source)
    found: list[IPv4Address] = []
    for line in text.splitlines():
        if not line.startswith(("nameserver ", "nameserver\t")):
            continue
        words = line.split()
        if len(words) < 2:
            continue
        addr = _ipv4(words[1])
        if addr is not None:
            found.append(addr)
    return Upstreams(_keep(found, virtual), source, _own(found, virtual))


_KEYWORDS = ("nameserver", "search", "domain", "options", "sortlist")


def _check_is_resolv_conf(text: str, source: str) -> None:
    meaningful = []
    for number, line in enumerate(text.splitlines(), 1):
        if any((ord(c) < 32 and c not in "\t\r\f") or c == "\ufffd" for c in line):
            raise InvalidInput(f"garbage in {source} line {number}: {line[:40]!r}")
        stripped = line.strip()
        if stripped and not stripped.startswith(("#", ";")):
            meaningful.append((number, stripped))
    if meaningful and not any(s.split()[0] in _KEYWORDS for _, s in meaningful):
        number, first = meaningful[0]
        raise InvalidInput(f"garbage in {source} line {number}: {first[:40]!r} (no resolv.conf keyword anywhere)")


def _resolved_entry(entry: object) -> tuple[int, IPv4Address] | None:
    """``[ifindex, family, [b0, b1, ...]]`` -> (ifindex, address) for IPv4."""
    if not isinstance(entry, list) or len(entry) != 3:
        return None
    ifindex, family, raw = entry
    if not isinstance(ifindex, int) or isinstance(ifindex, bool) or family != _AF_INET:
        return None
    if not isinstance(raw, list) or len(raw) != 4:
        return None
    if not all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= 255 for b in raw):
        return None
    return ifindex, IPv4Address(bytes(raw))


def parse_resolved_dns(
    text: str, virtual: Collection[IPv4Address] = (), source: str = "systemd-resolved (D-Bus)"
) -> Upstreams:
    """IPv4 upstreams from the ``busctl --json=short`` value of resolved's ``DNS``.

    The property has D-Bus type ``a(iiay)``: (ifindex, address family,
    address bytes), global servers with ifindex 0, per-link servers with the
    link's index. Usable global servers win when there is any; otherwise all
    per-link servers are used in the order resolved lists them. Addresses in
    ``virtual``, global or per-link, go to ``virtual_listed`` (globals
    first); they only matter when no real server is left anywhere. Malformed
    entries are skipped; ``source`` only labels the result. Raises :class:`InvalidInput` when ``text`` is not
    such a JSON document at all.
    """
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser's stack
        raise InvalidInput("systemd-resolved DNS property: not JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise InvalidInput("systemd-resolved DNS property: no data array")
    if doc.get("type", "a(iiay)") != "a(iiay)":
        raise InvalidInput(f"systemd-resolved DNS property: unexpected type {doc.get('type')!r}")
    entries = [e for e in (_resolved_entry(x) for x in doc["data"]) if e is not None]
    global_addrs = [a for i, a in entries if i == 0]
    link_addrs = [a for i, a in entries if i != 0]
    servers = _keep(global_addrs, virtual) or _keep(link_addrs, virtual)
    return Upstreams(servers, source, _own(global_addrs + link_addrs, virtual))
