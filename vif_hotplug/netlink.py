"""Thin adapter over pyroute2: links, addresses, routes, neighbours, sysctls, conntrack.

Every method is idempotent and says whether it changed anything. Kernel
errors are translated here, at one boundary: "exists" on add and "not there"
on delete are success; a missing device is :class:`DeviceGone`; anything else
is :class:`KernelError` naming the object.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
from ipaddress import ip_interface, ip_network
from typing import Any

from .errors import DeviceGone, KernelError
from .model import DeviceAddress, LinkFacts, LinkGroup, LinkRename, LinkState, Neighbour, Route, Sysctl
from .sysctl import kernel_has_ipv6, swap_sysctl

log = logging.getLogger(__name__)

NUD_PERMANENT = 0x80
IFF_UP = 0x1
#: "Not there" answers to a delete, per object kind (ESRCH: routes,
#: EADDRNOTAVAIL: addresses, ENOENT: neighbours).
_GONE = {errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL}


def _sysctl_path(family: str, dev: str, name: str) -> str:
    return f"/proc/sys/net/{family}/conf/{dev}/{name}"


class Netlink:
    """One rtnetlink socket in the caller's network namespace. Close it when done."""

    def __init__(self) -> None:
        from pyroute2 import IPRoute

        self._ipr: Any = IPRoute()

    def close(self) -> None:
        self._ipr.close()

    # --- facts ----------------------------------------------------------

    def index(self, dev: str) -> int | None:
        found = self._ipr.link_lookup(ifname=dev)
        return int(found[0]) if found else None

    def _require(self, dev: str) -> int:
        idx = self.index(dev)
        if idx is None:
            raise DeviceGone(f"device {dev} does not exist")
        return idx

    def link_facts(self, dev: str) -> LinkFacts:
        exists = self.index(dev) is not None
        in_kernel = kernel_has_ipv6()
        disabled = not in_kernel
        if in_kernel:
            for scope in ("all", dev):
                try:
                    with open(_sysctl_path("ipv6", scope, "disable_ipv6")) as f:
                        disabled = disabled or f.read().strip() == "1"
                except OSError:
                    pass
        defaults = []
        for key in ("ipv4/proxy_arp", "ipv6/proxy_ndp"):
            family, name = key.split("/")
            try:
                with open(_sysctl_path(family, "default", name)) as f:
                    defaults.append((key, f.read().strip()))
            except OSError:
                defaults.append((key, "0"))
        return LinkFacts(
            exists=exists,
            ipv6_disabled=disabled,
            ipv6_in_kernel=in_kernel,
            sysctl_defaults=tuple(defaults),
        )

    # --- settings: return the previous value when changed, else None ----

    def set_sysctl(self, s: Sysctl) -> Sysctl | None:
        path = _sysctl_path(s.family, s.dev, s.name)
        try:
            old = swap_sysctl(path, s.value)
        except FileNotFoundError:
            raise DeviceGone(f"cannot set {s}: {path} does not exist") from None
        except OSError as exc:
            raise KernelError(f"cannot set {s}: {exc.strerror}") from exc
        return None if old is None else Sysctl(s.family, s.dev, s.name, old)

    def _link(self, dev: str) -> Any:
        return self._ipr.get_links(self._require(dev))[0]

    def _set_link(self, what: object, dev: str, **kw: Any) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            self._ipr.link("set", index=self._require(dev), **kw)
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                raise DeviceGone(f"cannot set {what}: device {dev} is gone") from exc
            raise KernelError(f"cannot set {what}: {os.strerror(exc.code)}") from exc

    def set_group(self, g: LinkGroup) -> LinkGroup | None:
        old = int(self._link(g.dev).get_attr("IFLA_GROUP") or 0)
        if old == g.group:
            return None
        self._set_link(g, g.dev, group=g.group)
        return LinkGroup(g.dev, old)

    def set_state(self, s: LinkState) -> LinkState | None:
        up = bool(self._link(s.dev)["flags"] & IFF_UP)
        if up == s.up:
            return None
        self._set_link(s, s.dev, state="up" if s.up else "down")
        return LinkState(s.dev, up)

    def rename(self, r: LinkRename) -> LinkRename | None:
        if self.index(r.new_name) is not None and self.index(r.dev) is None:
            return None  # already renamed
        if self.index(r.new_name) is not None:
            raise KernelError(f"cannot rename {r.dev} to {r.new_name}: a device of that name exists")
        if self._link(r.dev)["flags"] & IFF_UP:
            self._set_link(r, r.dev, state="down")  # the kernel renames only down links
        self._set_link(r, r.dev, ifname=r.new_name)
        # The alias remembers netback's name: offline finds the device by it
        # even when XenStore no longer says what it was renamed to, and a
        # vifname is never taken for some unrelated device of that name.
        back_to_netback_name = re.fullmatch(r"vif[0-9]+\.[0-9]+", r.new_name) is not None
        self._set_link(r, r.new_name, ifalias="" if back_to_netback_name else r.dev)
        return LinkRename(r.new_name, r.dev)

    def alias(self, dev: str) -> str | None:
        idx = self.index(dev)
        if idx is None:
            return None
        return str(self._ipr.get_links(idx)[0].get_attr("IFLA_IFALIAS") or "") or None

    def find_by_alias(self, alias: str) -> str | None:
        """Name of the device whose alias is ``alias`` (a renamed vif), if any."""
        for link in self._ipr.get_links():
            if link.get_attr("IFLA_IFALIAS") == alias:
                return str(link.get_attr("IFLA_IFNAME"))
        return None

    # --- objects: add/remove return whether they changed anything --------

    def _call(self, what: object, op: str, fn: Any, *args: Any, **kw: Any) -> bool:
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            fn(*args, **kw)
            return True
        except NetlinkError as exc:
            if op == "add" and exc.code == errno.EEXIST:
                return False
            if op == "remove" and exc.code in _GONE:
                return False
            if exc.code == errno.ENODEV:
                raise DeviceGone(f"cannot {op} {what}: device is gone") from exc
            raise KernelError(f"cannot {op} {what}: {os.strerror(exc.code)}") from exc

    def _routes(self, r: Route, idx: int) -> list[tuple[str, int, int]]:
        net = ip_network(r.destination)
        family = socket.AF_INET6 if net.version == 6 else socket.AF_INET
        out = []
        for msg in self._ipr.route("dump", family=family, oif=idx):
            out.append((str(msg.get_attr("RTA_DST")), int(msg["dst_len"]), int(msg.get_attr("RTA_PRIORITY") or 0)))
        return out

    def add_route(self, r: Route) -> bool:
        idx = self._require(r.dev)
        net = ip_network(r.destination)
        if (str(net.network_address), net.prefixlen, r.metric) in self._routes(r, idx):
            return False
        if not self._call(r, "add", self._ipr.route, "add", dst=r.destination, oif=idx, priority=r.metric):
            # Same destination and metric through another device: not ours to claim.
            raise KernelError(f"cannot add {r}: {r.destination} metric {r.metric} is routed elsewhere")
        return True

    def remove_route(self, r: Route) -> bool:
        idx = self.index(r.dev)
        if idx is None:
            return False  # routes die with their device
        return self._call(r, "remove", self._ipr.route, "del", dst=r.destination, oif=idx, priority=r.metric)

    def add_address(self, a: DeviceAddress) -> bool:
        iface = ip_interface(a.address)
        return self._call(
            a, "add", self._ipr.addr, "add", index=self._require(a.dev), address=str(iface.ip),
            prefixlen=iface.network.prefixlen,
        )

    def remove_address(self, a: DeviceAddress) -> bool:
        idx = self.index(a.dev)
        if idx is None:
            return False
        iface = ip_interface(a.address)
        return self._call(
            a, "remove", self._ipr.addr, "del", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen
        )

    def _neighbour(self, n: Neighbour, idx: int) -> tuple[str, int] | None:
        for msg in self._ipr.get_neighbours(ifindex=idx, dst=n.address):
            if str(msg.get_attr("NDA_DST")) == n.address:
                return str(msg.get_attr("NDA_LLADDR") or ""), int(msg["state"])
        return None

    def add_neighbour(self, n: Neighbour) -> bool:
        idx = self._require(n.dev)
        if self._neighbour(n, idx) == (n.mac, NUD_PERMANENT):
            return False
        self._call(
            n, "add", self._ipr.neigh, "replace", dst=n.address, lladdr=n.mac, ifindex=idx, state=NUD_PERMANENT
        )
        return True

    def remove_neighbour(self, n: Neighbour) -> bool:
        idx = self.index(n.dev)
        if idx is None or self._neighbour(n, idx) is None:
            return False
        return self._call(n, "remove", self._ipr.neigh, "del", dst=n.address, ifindex=idx)
