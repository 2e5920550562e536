"""Listing a set's elements over netfilter netlink: the ``allowed`` elements of one device, fast.

An offline (and the first online of a device) must find every ``allowed``
element naming its device, whatever XenStore says: that is a listing of
the whole set. Through libnftables it costs a JSON rendering of every
element (and memory that grows with every listing in a resident agent;
pyroute2's ipset listing likewise); here it is one netlink dump, decoded
only as far as the interface name of each element.

Layouts: ``linux/netfilter/nf_tables.h`` (``NFT_MSG_GETSETELEM`` dump: a
list of ``NFTA_LIST_ELEM``, each with ``NFTA_SET_ELEM_KEY`` and, for
interval sets, ``NFTA_SET_ELEM_KEY_END``; a concatenation's parts are each
padded to 4 bytes, an interface name is ``IFNAMSIZ`` bytes) and
``linux/netfilter/ipset/ip_set.h`` (``IPSET_CMD_LIST`` dump: ``IPSET_ATTR_ADT``
holding ``IPSET_ATTR_DATA`` entries with ``IPSET_ATTR_IP``,
``IPSET_ATTR_CIDR`` and ``IPSET_ATTR_IFACE``).
"""

from __future__ import annotations

import errno
import struct
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network

from .nfnl import (
    IFNAMSIZ,
    IPSET_ATTR_CIDR,
    IPSET_ATTR_DATA,
    IPSET_ATTR_IFACE,
    IPSET_ATTR_IP,
    IPSET_ATTR_IPADDR_IPV4,
    IPSET_ATTR_IPADDR_IPV6,
    IPSET_ATTR_PROTOCOL,
    IPSET_ATTR_SETNAME,
    IPSET_PROTOCOL,
    NFNL_SUBSYS_IPSET,
    NFNL_SUBSYS_NFTABLES,
    NFPROTO_IPV4,
    NFPROTO_IPV6,
    NFT_MSG_GETSETELEM,
    NFTA_DATA_VALUE,
    NFTA_LIST_ELEM,
    NFTA_SET_ELEM_KEY,
    NFTA_SET_ELEM_LIST_ELEMENTS,
    NFTA_SET_ELEM_LIST_SET,
    NFTA_SET_ELEM_LIST_TABLE,
    Nfnl,
)
from .nlsock import NLM_F_DUMP, NetlinkError, attr, attrs, cstr

NFTA_SET_ELEM_FLAGS, NFTA_SET_ELEM_KEY_END = 3, 10
NFT_SET_ELEM_INTERVAL_END = 0x1
IPSET_CMD_LIST = 7
IPSET_ATTR_ADT = 8
_NFGENMSG = struct.Struct("=BBH")

Member = tuple[str, str | None]
"""(network, interface name or None)."""


def _nfgen(family: int) -> bytes:
    return _NFGENMSG.pack(family, 0, 0)


def _value(data: bytes) -> bytes:
    for t, v in attrs(data):
        if t == NFTA_DATA_VALUE:
            return v
    return b""


def _split(key: bytes, family: int, with_ifname: bool) -> tuple[str | None, int]:
    """(interface name, address as an int) of an element key."""
    size = 16 if family == 6 else 4
    if with_ifname:
        name = key[:IFNAMSIZ].split(b"\0", 1)[0].decode("utf-8", "replace")
        raw = key[IFNAMSIZ:IFNAMSIZ + size]
    else:
        name, raw = None, key[:size]
    return name, int.from_bytes(raw, "big")


def _network(family: int, start: int, end: int | None) -> str:
    cls = IPv6Address if family == 6 else IPv4Address
    bits = 128 if family == 6 else 32
    if end is None or end == start:
        return f"{cls(start)}/{bits}"
    span = end - start + 1
    prefix = bits - (span.bit_length() - 1)
    return str(ip_network(f"{cls(start)}/{prefix}", strict=False))


def _padded(dev: str | None) -> bytes | None:
    """How ``dev`` appears in a dump: its name and the NUL after it (every element key pads it so)."""
    return dev.encode("utf-8", "surrogateescape") + b"\0" if dev is not None else None


def nft_members(nfnl: Nfnl, family: int, table: str, set_name: str, with_ifname: bool,
                dev: str | None = None) -> list[Member]:
    """Every element of an nftables set (empty when the set or table does not exist), or only those
    naming interface ``dev``: a reply, then an element, without its name is skipped unparsed, so a
    listing for one device among a thousand costs little more than the kernel's dump."""
    body = (_nfgen(NFPROTO_IPV6 if family == 6 else NFPROTO_IPV4) + attr(NFTA_SET_ELEM_LIST_TABLE, cstr(table))
            + attr(NFTA_SET_ELEM_LIST_SET, cstr(set_name)))
    try:
        replies = nfnl.request((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM, NLM_F_DUMP, body)
    except NetlinkError as exc:
        if exc.errno == errno.ENOENT:
            return []
        raise
    out: list[Member] = []
    # A plain interval set (rbtree) holds a network as two elements: its first
    # address, and one past its last flagged INTERVAL_END; a concatenation
    # (pipapo) holds one element with KEY_END, its last address.
    starts: list[tuple[int, str | None]] = []
    ends: list[int] = []
    wanted = _padded(dev) if with_ifname else None
    for _, payload in replies:
        if wanted is not None and wanted not in payload:
            continue
        for t, elements in attrs(payload, _NFGENMSG.size):
            if t != NFTA_SET_ELEM_LIST_ELEMENTS:
                continue
            for lt, element in attrs(elements):
                if lt != NFTA_LIST_ELEM or (wanted is not None and wanted not in element):
                    continue
                fields = dict(attrs(element))
                if NFTA_SET_ELEM_KEY not in fields:
                    continue
                flags = struct.unpack(">I", fields[NFTA_SET_ELEM_FLAGS][:4])[0] if NFTA_SET_ELEM_FLAGS in fields else 0
                name, key = _split(_value(fields[NFTA_SET_ELEM_KEY]), family, with_ifname)
                if wanted is not None and name != dev:
                    continue
                if flags & NFT_SET_ELEM_INTERVAL_END:
                    ends.append(key)
                elif NFTA_SET_ELEM_KEY_END in fields:
                    _, last = _split(_value(fields[NFTA_SET_ELEM_KEY_END]), family, with_ifname)
                    out.append((_network(family, key, last), name))
                else:
                    starts.append((key, name))
    if not ends:
        return out + [(_network(family, key, None), name) for key, name in starts]
    ends.sort()
    for key, name in sorted(starts, key=lambda s: s[0]):
        following = next((e for e in ends if e > key), None)
        out.append((_network(family, key, following - 1 if following is not None else None), name))
    return out


def ipset_members(nfnl: Nfnl, name: str, dev: str | None = None) -> list[Member]:
    """Every member of an ipset (empty when the set does not exist), or only those naming ``dev``."""
    body = (_nfgen(0) + attr(IPSET_ATTR_PROTOCOL, bytes([IPSET_PROTOCOL])) + attr(IPSET_ATTR_SETNAME, cstr(name)))
    try:
        replies = nfnl.request((NFNL_SUBSYS_IPSET << 8) | IPSET_CMD_LIST, NLM_F_DUMP, body)
    except NetlinkError as exc:
        if exc.errno == errno.ENOENT:
            return []
        raise
    out: list[Member] = []
    wanted = _padded(dev)
    for _, payload in replies:
        if wanted is not None and wanted not in payload:
            continue
        for t, adt in attrs(payload, _NFGENMSG.size):
            if t != IPSET_ATTR_ADT:
                continue
            for dt, data in attrs(adt):
                if dt != IPSET_ATTR_DATA or (wanted is not None and wanted not in data):
                    continue
                fields = dict(attrs(data))
                addr = None
                for at, raw in attrs(fields.get(IPSET_ATTR_IP, b"")):
                    if at in (IPSET_ATTR_IPADDR_IPV4, IPSET_ATTR_IPADDR_IPV6):
                        addr = ip_address(raw)
                if addr is None:
                    continue
                cidr = fields[IPSET_ATTR_CIDR][0] if IPSET_ATTR_CIDR in fields else addr.max_prefixlen
                iface = fields.get(IPSET_ATTR_IFACE)
                iname = iface.split(b"\0", 1)[0].decode("utf-8", "replace") if iface is not None else None
                if wanted is not None and iname != dev:
                    continue
                out.append((f"{addr}/{cidr}", iname))
    return out
