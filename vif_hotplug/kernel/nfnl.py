"""The netfilter netlink requests of a hotplug event: set elements, the nftables generation, conntrack.

Why not a library here: an event's firewall work is a handful of one-key
requests, and the libraries answer them slowly or in ways that grow with
the number of VMs (measured on this project's machine, README,
Performance): libnftables fetches a whole set before a ``get element``
(7.7 ms with 1000 elements, 0.05 ms here), pyroute2 spends most of a
millisecond per request, and a conntrack purge through it cost 40-55 ms.
Rulesets, listings and set creation stay with libnftables, python-iptables
and pyroute2.

Messages follow ``linux/netfilter/nfnetlink.h``, ``nf_tables.h``,
``nfnetlink_conntrack.h`` and ``ipset/ip_set.h``; the transport is
:mod:`.nlsock`'s.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Callable, Sequence
from ipaddress import ip_address, ip_network

from .nlsock import (
    NLA_F_NET_BYTEORDER,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NetlinkError,
    NetlinkSocket,
    RawSocket,
    attr,
    attrs,
    cstr,
    nested,
)

NETLINK_NETFILTER = 12
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFNL_SUBSYS_CTNETLINK, NFNL_SUBSYS_IPSET, NFNL_SUBSYS_NFTABLES = 1, 6, 10
NFPROTO_UNSPEC, NFPROTO_IPV4, NFPROTO_IPV6 = 0, 2, 10

NFT_MSG_NEWSETELEM, NFT_MSG_GETSETELEM, NFT_MSG_DELSETELEM, NFT_MSG_GETGEN = 12, 13, 14, 16
NFTA_GEN_ID = 1
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM, NFTA_SET_ELEM_KEY, NFTA_DATA_VALUE = 1, 1, 1
IFNAMSIZ = 16

IPCTNL_MSG_CT_GET, IPCTNL_MSG_CT_DELETE = 1, 2
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_TUPLE_IP, CTA_ID, CTA_ZONE = 1, 2, 1, 12, 18
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
_CTA_IP_ADDRESSES = frozenset({CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST})

IPSET_CMD_ADD, IPSET_CMD_DEL, IPSET_CMD_TEST, IPSET_CMD_HEADER = 9, 10, 11, 12
IPSET_ATTR_PROTOCOL, IPSET_ATTR_SETNAME, IPSET_ATTR_DATA = 1, 2, 7
IPSET_ATTR_IP, IPSET_ATTR_CIDR, IPSET_ATTR_IFACE = 1, 3, 23
IPSET_ATTR_IPADDR_IPV4, IPSET_ATTR_IPADDR_IPV6 = 1, 2
IPSET_PROTOCOL = 7
#: ipset's "already added" on add, "not added" on delete and test.
IPSET_ERR_EXIST = 4103

_NFGENMSG = struct.Struct("=BBH")
_CONNTRACK_COUNT = "/proc/sys/net/netfilter/nf_conntrack_count"


def _nfgen(family: int, res_id: int = 0) -> bytes:
    return _NFGENMSG.pack(family, 0, socket.htons(res_id))


def _nfproto(family: int) -> int:
    return NFPROTO_IPV6 if family == 6 else NFPROTO_IPV4


def _tuple_addresses(tuple_attr: bytes) -> set[bytes]:
    """The packed source and destination addresses of a conntrack tuple attribute."""
    for t, v in attrs(tuple_attr):
        if t == CTA_TUPLE_IP:
            return {addr for kind, addr in attrs(v) if kind in _CTA_IP_ADDRESSES}
    return set()


def nft_key(address: str, dev: str | None = None) -> bytes:
    """An element key as nftables lays it out: ``ifname . addr`` is the name padded to IFNAMSIZ, then the address."""
    raw = ip_address(address).packed
    if dev is None:
        return raw
    name = dev.encode()
    if len(name) >= IFNAMSIZ:
        raise ValueError(f"interface name too long: {dev!r}")
    return name.ljust(IFNAMSIZ, b"\0") + raw


class Nfnl(NetlinkSocket):
    """One netfilter netlink socket, opened on first use in the namespace current then."""

    def __init__(self, opener: Callable[[int], RawSocket] | None = None) -> None:
        super().__init__(NETLINK_NETFILTER, opener=opener)

    # --- nf_tables ---------------------------------------------------------------------

    def nft_genid(self) -> int:
        """The ruleset generation: every committed transaction adds one."""
        kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN
        for _, payload in self.request(kind, 0, _nfgen(NFPROTO_UNSPEC), read_only=True):
            for t, v in attrs(payload, _NFGENMSG.size):
                if t == NFTA_GEN_ID:
                    return int(struct.unpack(">I", v[:4])[0])
        raise NetlinkError(errno.EPROTO, "no generation in the answer")

    def nft_element(self, op: str, family: int, table: str, set_name: str, key: bytes) -> bool:
        """``get``: whether ``key`` is in the set; ``add``/``del``: whether it changed (one transaction).

        A missing set or table is ``ENOENT``: no element for ``get`` and
        ``del``, an error for ``add``.
        """
        body = (_nfgen(_nfproto(family)) + attr(NFTA_SET_ELEM_LIST_TABLE, cstr(table))
                + attr(NFTA_SET_ELEM_LIST_SET, cstr(set_name))
                + nested(NFTA_SET_ELEM_LIST_ELEMENTS,
                         nested(NFTA_LIST_ELEM, nested(NFTA_SET_ELEM_KEY, attr(NFTA_DATA_VALUE, key)))))
        try:
            if op == "get":
                self.request((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM, 0, body, read_only=True)
                return True
            kind, flags = ((NFT_MSG_NEWSETELEM, NLM_F_CREATE | NLM_F_EXCL) if op == "add" else (NFT_MSG_DELSETELEM, 0))
            batch = _nfgen(NFPROTO_UNSPEC, NFNL_SUBSYS_NFTABLES)
            self.transact([(NFNL_MSG_BATCH_BEGIN, 0, batch), ((NFNL_SUBSYS_NFTABLES << 8) | kind, flags, body),
                           (NFNL_MSG_BATCH_END, 0, batch)], 1)
            return True
        except NetlinkError as exc:
            if (op == "add" and exc.errno == errno.EEXIST) or (op != "add" and exc.errno == errno.ENOENT):
                return False
            raise

    # --- conntrack -----------------------------------------------------------------------

    def conntrack_purge(self, addresses: Sequence[str]) -> int:
        """Delete the entries with one of ``addresses`` in their original or reply tuple; how many went.

        One unfiltered dump for all of them: the kernel walks its whole
        conntrack hash for every dump, filtered or not (about 6 ms with
        262144 buckets on this project's machine), so four filtered dumps
        per address cost far more than reading this namespace's entries
        once. Skipped when the namespace tracks nothing at all.
        """
        try:
            with open(_CONNTRACK_COUNT, "rb") as f:
                if int(f.read()) == 0:
                    return 0
        except (OSError, ValueError):
            return 0  # no conntrack in this kernel or namespace: nothing to purge
        wanted = {ip_address(a).packed for a in addresses}
        if not wanted:
            return 0
        doomed: dict[tuple[int, bytes, bytes], bytes] = {}
        for _, payload in self.request((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET, NLM_F_DUMP,
                                       _nfgen(NFPROTO_UNSPEC)):
            # Cheap test first: an address's bytes somewhere in the message.
            if not any(w in payload for w in wanted):
                continue
            entry = dict(attrs(payload, _NFGENMSG.size))
            orig = entry.get(CTA_TUPLE_ORIG)
            if orig is None:
                continue
            if not (_tuple_addresses(orig) | _tuple_addresses(entry.get(CTA_TUPLE_REPLY, b""))) & wanted:
                continue
            doomed[(payload[0], orig, entry.get(CTA_ZONE, b""))] = entry.get(CTA_ID, b"")
        removed = 0
        for (family, orig, zone), ident in doomed.items():
            body = _nfgen(family) + nested(CTA_TUPLE_ORIG, orig)
            if zone:
                body += attr(CTA_ZONE, zone)
            if ident:
                body += attr(CTA_ID, ident)
            try:
                self.request((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE, 0, body)
                removed += 1
            except NetlinkError as exc:
                if exc.errno != errno.ENOENT:  # expired meanwhile
                    raise
        return removed

    # --- ipset ---------------------------------------------------------------------------

    def ipset_element(self, op: str, name: str, family: int, network: str, iface: str | None = None) -> bool:
        """``test``: whether the set holds it; ``add``/``del``: whether it changed. ``ENOENT``: no such set."""
        net = ip_network(network)
        which = IPSET_ATTR_IPADDR_IPV6 if net.version == 6 else IPSET_ATTR_IPADDR_IPV4
        data = nested(IPSET_ATTR_IP, attr(which | NLA_F_NET_BYTEORDER, net.network_address.packed))
        data += attr(IPSET_ATTR_CIDR, bytes([net.prefixlen]))
        if iface is not None:
            data += attr(IPSET_ATTR_IFACE, cstr(iface))
        body = (_nfgen(_nfproto(family)) + attr(IPSET_ATTR_PROTOCOL, bytes([IPSET_PROTOCOL]))
                + attr(IPSET_ATTR_SETNAME, cstr(name)) + nested(IPSET_ATTR_DATA, data))
        cmd = {"add": IPSET_CMD_ADD, "del": IPSET_CMD_DEL, "test": IPSET_CMD_TEST}[op]
        try:
            # EXCL: an add of a member or a delete of a non-member says so.
            self.request((NFNL_SUBSYS_IPSET << 8) | cmd, NLM_F_EXCL if op != "test" else 0, body,
                         read_only=op == "test")
            return True
        except NetlinkError as exc:
            if exc.errno == IPSET_ERR_EXIST:
                return False
            raise

    def ipset_exists(self, name: str) -> bool:
        body = (_nfgen(NFPROTO_UNSPEC) + attr(IPSET_ATTR_PROTOCOL, bytes([IPSET_PROTOCOL]))
                + attr(IPSET_ATTR_SETNAME, cstr(name)))
        try:
            self.request((NFNL_SUBSYS_IPSET << 8) | IPSET_CMD_HEADER, 0, body, read_only=True)
        except NetlinkError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True
