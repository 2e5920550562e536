"""Parsers for every value that comes from outside: argv, env, XenStore, config.

Each function takes text and returns a typed value or raises
:class:`InvalidInput` with a one-line message naming the value. Nothing read
from outside reaches netlink or iptables without passing through here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network

from .errors import InvalidInput
from .model import MAX_DOMID, IPAddress, IPNetwork

_NUM = r"(0|[1-9][0-9]{0,4})"
_VIF_RE = re.compile(rf"vif{_NUM}\.{_NUM}")
_BACKEND_RE = re.compile(rf"backend/vif/{_NUM}/{_NUM}")
# Linux allows almost any byte in a name; we accept a conservative subset
# that is also safe in logs, udev rules and iptables interface matches.
_IFNAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}")
_MAC_RE = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")
_ADDR_CHARS = re.compile(r"[0-9A-Fa-f.:/]+")
IFNAMSIZ = 16
#: Widest network a VM may be given (Xen allows networks in ``ip``).
MIN_PREFIX = {4: 16, 6: 48}


@dataclass(frozen=True, slots=True, order=True)
class VifId:
    domid: int
    devid: int

    @property
    def name(self) -> str:
        return f"vif{self.domid}.{self.devid}"

    @property
    def xenbus_path(self) -> str:
        return f"backend/vif/{self.domid}/{self.devid}"


def _check_domid(domid: int, shown: str, what: str = "vif") -> None:
    if domid > MAX_DOMID:
        raise InvalidInput(f"invalid {what} {shown!r}: domid {domid} is above {MAX_DOMID}")


def _show(text: str) -> str:
    return repr(text if len(text) <= 64 else text[:61] + "...")


def parse_vif_name(text: str) -> VifId:
    """``vif<domid>.<devid>`` without leading zeros, domid <= 32752."""
    m = _VIF_RE.fullmatch(text)
    if m is None:
        raise InvalidInput(f"invalid vif name {_show(text)}: expected vif<domid>.<devid>")
    vif = VifId(int(m.group(1)), int(m.group(2)))
    _check_domid(vif.domid, text)
    return vif


def parse_xenbus_path(text: str) -> VifId:
    """``backend/vif/<domid>/<devid>``, optionally absolute (``/local/domain/N/...``)."""
    rel = re.sub(r"^/local/domain/(0|[1-9][0-9]*)/", "", text)
    m = _BACKEND_RE.fullmatch(rel)
    if m is None:
        raise InvalidInput(f"invalid XENBUS_PATH {_show(text)}: expected backend/vif/<domid>/<devid>")
    vif = VifId(int(m.group(1)), int(m.group(2)))
    _check_domid(vif.domid, text, "XENBUS_PATH")
    return vif


def parse_ifname(text: str, what: str = "interface name") -> str:
    """A Linux interface name we are willing to handle (``vifname``, uplinks)."""
    if not _IFNAME_RE.fullmatch(text):
        raise InvalidInput(f"invalid {what} {_show(text)}")
    return text


def parse_mac(text: str) -> str:
    """A VM's unicast MAC; broadcast, multicast and all-zero MACs are refused.

    The permanent neighbour entry pins the VM's address to this MAC: a
    multicast or broadcast one would send the VM's traffic to every station.
    """
    if not _MAC_RE.fullmatch(text):
        raise InvalidInput(f"invalid MAC {_show(text)}: expected xx:xx:xx:xx:xx:xx")
    mac = text.lower()
    if mac == "00:00:00:00:00:00":
        raise InvalidInput(f"invalid MAC {_show(text)}: all zero")
    if int(mac[:2], 16) & 1:
        raise InvalidInput(f"invalid MAC {_show(text)}: multicast or broadcast")
    return mac


def parse_address(text: str, what: str = "address") -> IPAddress:
    """One host address, IPv4 or IPv6, no prefix."""
    if not _ADDR_CHARS.fullmatch(text) or "/" in text:
        raise InvalidInput(f"invalid {what} {_show(text)}")
    try:
        return ip_address(text)
    except ValueError:
        raise InvalidInput(f"invalid {what} {_show(text)}") from None


def parse_ipv4(text: str, what: str) -> IPv4Address:
    addr = parse_address(text, what)
    if not isinstance(addr, IPv4Address):
        raise InvalidInput(f"invalid {what} {_show(text)}: not an IPv4 address")
    return addr


def parse_ipv6(text: str, what: str) -> IPv6Address:
    addr = parse_address(text, what)
    if not isinstance(addr, IPv6Address):
        raise InvalidInput(f"invalid {what} {_show(text)}: not an IPv6 address")
    return addr


def parse_vm_addresses(text: str) -> tuple[IPNetwork, ...]:
    """XenStore ``ip``: space separated addresses (or networks, as Xen allows).

    Host addresses come back as /32 or /128 networks. Order is kept (the first
    address of each family is the VM's primary one); duplicates are dropped.
    An empty value is no address at all (a VM with no network access).
    """
    words = text.split()
    out: list[IPNetwork] = []
    for word in words:
        if not _ADDR_CHARS.fullmatch(word):
            raise InvalidInput(f"invalid ip {_show(text)}: bad address {_show(word)}")
        try:
            net = ip_network(word, strict=True)
        except ValueError:
            raise InvalidInput(f"invalid ip {_show(text)}: bad address {_show(word)}") from None
        if (
            net.network_address.is_unspecified or net.is_multicast or net.is_loopback or net.is_link_local
            or net.network_address == IPv4Address("255.255.255.255")
        ):
            raise InvalidInput(f"invalid ip {_show(text)}: {word} cannot be a VM address")
        if net.prefixlen < MIN_PREFIX[net.version]:
            # A VM's network goes into the downstream set, which drops it
            # when it comes from the uplink: a /1 would cut half the world off.
            raise InvalidInput(f"invalid ip {_show(text)}: {word} is wider than /{MIN_PREFIX[net.version]}")
        if net not in out:
            out.append(net)
    return tuple(out)
