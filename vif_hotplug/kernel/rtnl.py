"""A minimal rtnetlink client: the link, address, route and neighbour requests of a hotplug event.

Why not pyroute2 here: measured on this project's machine, pyroute2 0.9.7
spends 0.7-1.1 ms per request (an asyncio loop per call and a full decode of
every attribute), and an online event makes about fifteen of them; the same
request on a plain netlink socket takes 0.02-0.04 ms (README, Performance).
pyroute2 stays for what is rare or richer (namespaces, veth pairs, ipset
creation and listing); the netfilter side of an event is :mod:`.nfnl`.

Messages follow ``linux/rtnetlink.h``; only the attributes this package
reads are parsed. The transport is :mod:`.nlsock`'s.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import ip_address, ip_interface, ip_network

from .nlsock import NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NetlinkError, NetlinkSocket, RawSocket
from .nlsock import attr as _attr
from .nlsock import attrs as _attrs
from .nlsock import cstr as _str
from .nlsock import u32 as _u32

RTM_NEWLINK, RTM_GETLINK, RTM_SETLINK = 16, 18, 19
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 28, 29, 30

IFLA_IFNAME, IFLA_LINK, IFLA_LINKINFO, IFLA_IFALIAS, IFLA_GROUP = 3, 5, 18, 20, 27
IFLA_NET_NS_FD, IFLA_EXT_MASK, IFLA_LINK_NETNSID = 28, 29, 37
IFLA_INFO_KIND = 1
RTEXT_FILTER_SKIP_STATS = 1 << 3
IFF_UP = 0x1

IFA_ADDRESS, IFA_LOCAL = 1, 2
IFA_F_NODAD = 0x02
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY = 1, 4, 5, 6
RT_TABLE_MAIN = 254
RTPROT_BOOT, RTPROT_STATIC = 3, 4
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK, RT_SCOPE_HOST = 0, 253, 254
RTN_UNICAST, RTN_LOCAL = 1, 2
RTM_F_FIB_MATCH = 0x2000
NDA_DST, NDA_LLADDR = 1, 2
NUD_PERMANENT = 0x80

_IFINFOMSG = struct.Struct("=BxHiII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTMSG = struct.Struct("=BBBBBBBBI")
_NDMSG = struct.Struct("=BxxxiHBB")
#: Requests that change nothing, safe to send again when answers were lost.
_READS = frozenset({RTM_GETLINK, RTM_GETADDR, RTM_GETROUTE, RTM_GETNEIGH})


def _family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _packed(addr: str) -> bytes:
    return ip_address(addr).packed


@dataclass(frozen=True, slots=True)
class Link:
    index: int
    name: str
    up: bool
    group: int
    alias: str | None
    kind: str | None
    #: ifindex of the peer (veth) and whether it lives in another namespace.
    peer_index: int | None
    peer_elsewhere: bool


@dataclass(frozen=True, slots=True)
class RouteInfo:
    dst_len: int
    oif: int | None
    type: int
    #: ``RT_SCOPE_LINK`` (253) for a destination on the device's own link (no gateway).
    scope: int = 0


class Rtnl(NetlinkSocket):
    """One rtnetlink socket, opened on first use in the namespace current then.

    Strict dump checking when the kernel has it (Linux 4.20): the address
    and route dumps of one interface are then filtered by the kernel; on an
    older kernel they carry the whole table and are filtered here (the
    decoders check index, table and output interface either way).
    """

    def __init__(self, opener: Callable[[int], RawSocket] | None = None) -> None:
        super().__init__(socket.NETLINK_ROUTE, strict=True, opener=opener)

    def _request(self, kind: int, flags: int, body: bytes) -> list[tuple[int, bytes]]:
        return self.request(kind, flags, body, read_only=kind in _READS)

    # --- links -----------------------------------------------------------------------

    @staticmethod
    def _parse_link(payload: bytes) -> Link:
        _, _, index, flags, _ = _IFINFOMSG.unpack_from(payload)
        name, group, alias, kind, peer, elsewhere = "", 0, None, None, None, False
        for t, v in _attrs(payload, _IFINFOMSG.size):
            if t == IFLA_IFNAME:
                name = v.rstrip(b"\0").decode(errors="replace")
            elif t == IFLA_GROUP:
                group = struct.unpack_from("=I", v)[0]
            elif t == IFLA_IFALIAS:
                alias = v.rstrip(b"\0").decode(errors="replace") or None
            elif t == IFLA_LINK:
                peer = struct.unpack_from("=i", v)[0]
            elif t == IFLA_LINK_NETNSID:
                elsewhere = True
            elif t == IFLA_LINKINFO:
                for it, iv in _attrs(v):
                    if it == IFLA_INFO_KIND:
                        kind = iv.rstrip(b"\0").decode(errors="replace")
        return Link(index, name, bool(flags & IFF_UP), group, alias, kind, peer, elsewhere)

    def link(self, name: str | None = None, index: int = 0) -> Link | None:
        """The link called ``name`` (or with ``index``); ``None`` when there is none."""
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, 0, 0) + _attr(IFLA_EXT_MASK, _u32(RTEXT_FILTER_SKIP_STATS))
        if name is not None:
            body += _attr(IFLA_IFNAME, _str(name))
        try:
            replies = self._request(RTM_GETLINK, 0, body)
        except NetlinkError as exc:
            if exc.errno in (errno.ENODEV, errno.EINVAL, errno.ERANGE):  # a name the kernel cannot hold
                return None
            raise
        return self._parse_link(replies[0][1]) if replies else None

    def links(self) -> list[Link]:
        """Every link (a dump: only for rare paths, it grows with the number of devices)."""
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + _attr(IFLA_EXT_MASK, _u32(RTEXT_FILTER_SKIP_STATS))
        return [self._parse_link(p) for t, p in self._request(RTM_GETLINK, NLM_F_DUMP, body) if t == RTM_NEWLINK]

    def set_link(
        self, index: int, *, up: bool | None = None, group: int | None = None, name: str | None = None,
        alias: str | None = None, netns_fd: int | None = None,
    ) -> None:
        flags = change = 0
        if up is not None:
            flags, change = (IFF_UP if up else 0), IFF_UP
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, flags, change)
        if group is not None:
            body += _attr(IFLA_GROUP, _u32(group))
        if name is not None:
            body += _attr(IFLA_IFNAME, _str(name))
        if alias is not None:
            body += _attr(IFLA_IFALIAS, _str(alias) if alias else b"")
        if netns_fd is not None:
            body += _attr(IFLA_NET_NS_FD, _u32(netns_fd))
        self._request(RTM_SETLINK, 0, body)

    # --- addresses ---------------------------------------------------------------------

    def address(self, op: str, index: int, address: str, scope: int = RT_SCOPE_UNIVERSE) -> None:
        """``op`` ``add`` (exclusive: EEXIST when present) or ``del`` ``address`` (``a.b.c.d/len``)."""
        iface = ip_interface(address)
        raw = iface.ip.packed
        # No duplicate address detection: the address is the netvm's own on
        # a point-to-point link, usable the moment the event reports
        # "connected" (DAD would hold it back a second or two, and a VM
        # answering the probe could disable its own gateway).
        flags = IFA_F_NODAD if iface.version == 6 else 0
        body = _IFADDRMSG.pack(_family(str(iface.ip)), iface.network.prefixlen, flags, scope, index)
        body += _attr(IFA_LOCAL, raw) + _attr(IFA_ADDRESS, raw)
        if op == "add":
            self._request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body)
        else:
            self._request(RTM_DELADDR, 0, body)

    def addresses(self, index: int) -> set[str]:
        """``address/prefixlen`` of every address on ``index`` (a dump the kernel filters when strict)."""
        body = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, index)
        out: set[str] = set()
        for kind, payload in self._request(RTM_GETADDR, NLM_F_DUMP, body):
            _, prefixlen, _, _, found = _IFADDRMSG.unpack_from(payload)
            if kind != RTM_NEWADDR or found != index:
                continue
            addr = {t: v for t, v in _attrs(payload, _IFADDRMSG.size)}
            raw = addr.get(IFA_LOCAL) or addr.get(IFA_ADDRESS)
            if raw is not None:
                out.add(f"{ip_address(raw)}/{prefixlen}")
        return out

    # --- routes ------------------------------------------------------------------------

    def route(
        self, op: str, destination: str, oif: int, metric: int = 0, gateway: str | None = None,
        scope: int | None = None,
    ) -> None:
        """``op`` ``add`` (exclusive) or ``del`` a route in the main table."""
        net = ip_network(destination)
        family = socket.AF_INET6 if net.version == 6 else socket.AF_INET
        if scope is None:
            scope = RT_SCOPE_UNIVERSE
        kind = RTN_UNICAST
        body = _RTMSG.pack(family, net.prefixlen, 0, 0, RT_TABLE_MAIN, RTPROT_STATIC if op == "add" else 0,
                           scope if op == "add" else RT_SCOPE_UNIVERSE, kind if op == "add" else 0, 0)
        if net.prefixlen:
            body += _attr(RTA_DST, net.network_address.packed)
        body += _attr(RTA_OIF, _u32(oif))
        if metric:
            body += _attr(RTA_PRIORITY, _u32(metric))
        if gateway is not None:
            body += _attr(RTA_GATEWAY, _packed(gateway))
        if op == "add":
            self._request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, body)
        else:
            self._request(RTM_DELROUTE, 0, body)

    def routes(self, oif: int, family: int) -> list[tuple[str, int]]:
        """(destination/prefix, metric) of the main table's routes through ``oif``.

        A dump the kernel filters by table and interface under strict
        checking, so it costs one vif's worth of messages whatever the
        number of VMs; without it (before Linux 4.20) the whole routing
        table comes and is filtered here.
        """
        body = _RTMSG.pack(family, 0, 0, 0, RT_TABLE_MAIN, 0, 0, 0, 0) + _attr(RTA_OIF, _u32(oif))
        out: list[tuple[str, int]] = []
        for kind, payload in self._request(RTM_GETROUTE, NLM_F_DUMP, body):
            fam, dst_len, _, _, table, _, _, _, _ = _RTMSG.unpack_from(payload)
            if kind != RTM_NEWROUTE or table != RT_TABLE_MAIN:
                continue
            dst, metric, found_oif = None, 0, None
            for t, v in _attrs(payload, _RTMSG.size):
                if t == RTA_DST:
                    dst = ip_address(v)
                elif t == RTA_PRIORITY:
                    metric = struct.unpack_from("=I", v)[0]
                elif t == RTA_OIF:
                    found_oif = struct.unpack_from("=I", v)[0]
            if found_oif != oif:
                continue
            if dst is None:
                dst = ip_address("::" if fam == socket.AF_INET6 else "0.0.0.0")
            out.append((f"{dst}/{dst_len}", metric))
        return out

    def route_lookup(self, address: str, oif: int | None = None, fib_match: bool = True) -> RouteInfo | None:
        """The route the kernel would use for ``address`` (through ``oif`` if given).

        With ``fib_match`` the answer is the routing table entry itself (its
        prefix length tells a host route from a wider one). ``None`` when no
        route matches.
        """
        family = _family(address)
        body = _RTMSG.pack(family, 128 if family == socket.AF_INET6 else 32, 0, 0, 0, 0, 0, 0,
                           RTM_F_FIB_MATCH if fib_match else 0)
        body += _attr(RTA_DST, _packed(address))
        if oif is not None:
            body += _attr(RTA_OIF, _u32(oif))
        try:
            replies = self._request(RTM_GETROUTE, 0, body)
        except NetlinkError as exc:
            if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENOENT, errno.ESRCH, errno.ENODEV):
                return None
            raise
        if not replies:
            return None
        payload = replies[0][1]
        _, dst_len, _, _, _, _, scope, rtype, _ = _RTMSG.unpack_from(payload)
        found_oif = None
        for t, v in _attrs(payload, _RTMSG.size):
            if t == RTA_OIF:
                found_oif = struct.unpack_from("=I", v)[0]
        return RouteInfo(dst_len, found_oif, rtype, scope)

    # --- neighbours ----------------------------------------------------------------------

    def neighbour(self, index: int, address: str) -> tuple[str, int] | None:
        """(lladdr, NUD state) of ``address`` on ``index``, or ``None``."""
        body = _NDMSG.pack(_family(address), index, 0, 0, 0) + _attr(NDA_DST, _packed(address))
        try:
            replies = self._request(RTM_GETNEIGH, 0, body)
        except NetlinkError as exc:
            if exc.errno in (errno.ENOENT, errno.ENODEV):
                return None
            raise
        if not replies:
            return None
        payload = replies[0][1]
        _, _, state, _, _ = _NDMSG.unpack_from(payload)
        mac = ""
        for t, v in _attrs(payload, _NDMSG.size):
            if t == NDA_LLADDR:
                mac = ":".join(f"{b:02x}" for b in v)
        return mac, state

    def set_neighbour(self, op: str, index: int, address: str, mac: str = "") -> None:
        """``op`` ``replace`` (a permanent entry) or ``del``."""
        if op == "replace":
            body = _NDMSG.pack(_family(address), index, NUD_PERMANENT, 0, 0)
            body += _attr(NDA_DST, _packed(address)) + _attr(NDA_LLADDR, bytes.fromhex(mac.replace(":", "")))
            self._request(RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE, body)
        else:
            body = _NDMSG.pack(_family(address), index, 0, 0, 0) + _attr(NDA_DST, _packed(address))
            self._request(RTM_DELNEIGH, 0, body)
