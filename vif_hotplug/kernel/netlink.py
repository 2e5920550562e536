"""Links, addresses, routes and neighbours as plan objects, through :mod:`.rtnl`.

Every operation is idempotent and says whether it changed anything. Kernel
errors are translated here, at one boundary: "exists" on add and "not there"
on delete are success; a missing device is :class:`DeviceGone`; anything
else is :class:`KernelError` naming the object. Objects with a ``netns`` are
handled through a socket opened inside that namespace.
"""

from __future__ import annotations

import errno
import re
import socket
from collections.abc import Callable
from ipaddress import ip_network

from ..core.errors import DeviceGone, KernelError
from ..core.model import DeviceAddress, LinkGroup, LinkRename, LinkState, Neighbour, Route
from .nlsock import NetlinkError
from .rtnl import NUD_PERMANENT, RT_SCOPE_HOST, RT_SCOPE_LINK, Link, Rtnl

#: "Not there" answers to a delete (ESRCH: routes, EADDRNOTAVAIL: addresses, ENOENT: neighbours).
_GONE = {errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL}
_NETBACK_NAME = re.compile(r"vif[0-9]+\.[0-9]+")


def _fail(what: object, op: str, exc: NetlinkError) -> KernelError:
    if exc.errno == errno.ENODEV:
        return DeviceGone(f"cannot {op} {what}: device is gone")
    return KernelError(f"cannot {op} {what}: {exc.strerror}")


class Links:
    """Plan objects on rtnetlink. ``rtnl(netns)`` gives the socket of a namespace (``None``: ours)."""

    def __init__(self, rtnl: Callable[[str | None], Rtnl]) -> None:
        self._rtnl = rtnl

    def _link(self, dev: str, netns: str | None, what: object) -> Link:
        link = self._rtnl(netns).link(dev)
        if link is None:
            raise DeviceGone(f"cannot apply {what}: device {dev} does not exist")
        return link

    def _set(self, what: object, dev: str, netns: str | None, index: int, **kw: object) -> None:
        try:
            self._rtnl(netns).set_link(index, **kw)  # type: ignore[arg-type]
        except NetlinkError as exc:
            raise _fail(what, "set", exc) from exc

    # --- settings: return the previous value when changed, else None ----------------

    def set_group(self, g: LinkGroup) -> LinkGroup | None:
        link = self._link(g.dev, g.netns, g)
        if link.group == g.group:
            return None
        self._set(g, g.dev, g.netns, link.index, group=g.group)
        return LinkGroup(g.dev, link.group, g.netns)

    def group(self, g: LinkGroup) -> LinkGroup | None:
        link = self._rtnl(g.netns).link(g.dev)
        return None if link is None else LinkGroup(g.dev, link.group, g.netns)

    def set_state(self, s: LinkState) -> LinkState | None:
        link = self._link(s.dev, s.netns, s)
        if link.up == s.up:
            return None
        self._set(s, s.dev, s.netns, link.index, up=s.up)
        return LinkState(s.dev, link.up, s.netns)

    def state(self, s: LinkState) -> LinkState | None:
        link = self._rtnl(s.netns).link(s.dev)
        return None if link is None else LinkState(s.dev, link.up, s.netns)

    def rename(self, r: LinkRename) -> LinkRename | None:
        rtnl = self._rtnl(None)
        old, new = rtnl.link(r.dev), rtnl.link(r.new_name)
        if old is None and new is not None:
            return None  # already renamed
        if new is not None:
            raise KernelError(f"cannot rename {r.dev} to {r.new_name}: a device of that name exists")
        link = self._link(r.dev, None, r)
        if link.up:
            self._set(r, r.dev, None, link.index, up=False)  # the kernel renames only down links
        # The alias remembers netback's name: offline finds the device by it
        # even when XenStore no longer says what it was renamed to, and a
        # vifname is never taken for some unrelated device of that name.
        back = _NETBACK_NAME.fullmatch(r.new_name) is not None
        self._set(r, r.dev, None, link.index, name=r.new_name, alias="" if back else r.dev)
        return LinkRename(r.new_name, r.dev)

    def renamed(self, r: LinkRename) -> LinkRename | None:
        rtnl = self._rtnl(None)
        if rtnl.link(r.new_name) is not None and rtnl.link(r.dev) is None:
            return r
        return LinkRename(r.dev, r.dev) if rtnl.link(r.dev) is not None else None

    # --- objects ----------------------------------------------------------------------

    def _call(self, what: object, op: str, fn: Callable[[], None]) -> bool:
        try:
            fn()
            return True
        except NetlinkError as exc:
            if op == "add" and exc.errno == errno.EEXIST:
                return False
            if op == "remove" and exc.errno in _GONE:
                return False
            raise _fail(what, op, exc) from exc

    def route_present(self, r: Route) -> bool:
        link = self._rtnl(r.netns).link(r.dev)
        return link is not None and self._routed(r, link)

    def _routed(self, r: Route, link: Link) -> bool:
        net = ip_network(r.destination)
        family = socket.AF_INET6 if net.version == 6 else socket.AF_INET
        return (str(net), r.metric) in self._rtnl(r.netns).routes(link.index, family)

    def add_route(self, r: Route) -> bool:
        link = self._link(r.dev, r.netns, r)
        if self._routed(r, link):
            return False
        scope = RT_SCOPE_LINK if r.scope == "link" else None
        rtnl = self._rtnl(r.netns)
        if not self._call(r, "add", lambda: rtnl.route("add", r.destination, link.index, r.metric, r.gateway, scope)):
            # Same destination and metric through another device: not ours to claim.
            raise KernelError(f"cannot add {r}: {r.destination} metric {r.metric} is routed elsewhere")
        return True

    def remove_route(self, r: Route) -> bool:
        rtnl = self._rtnl(r.netns)
        link = rtnl.link(r.dev)
        if link is None:
            return False  # routes die with their device
        return self._call(r, "remove", lambda: rtnl.route("del", r.destination, link.index, r.metric, r.gateway))

    def address_present(self, a: DeviceAddress) -> bool:
        rtnl = self._rtnl(a.netns)
        link = rtnl.link(a.dev)
        return link is not None and a.address in rtnl.addresses(link.index)

    def add_address(self, a: DeviceAddress) -> bool:
        link = self._link(a.dev, a.netns, a)
        scope = RT_SCOPE_HOST if a.scope == "host" else 0
        rtnl = self._rtnl(a.netns)
        return self._call(a, "add", lambda: rtnl.address("add", link.index, a.address, scope))

    def remove_address(self, a: DeviceAddress) -> bool:
        rtnl = self._rtnl(a.netns)
        link = rtnl.link(a.dev)
        if link is None:
            return False
        return self._call(a, "remove", lambda: rtnl.address("del", link.index, a.address))

    def neighbour_present(self, n: Neighbour) -> bool:
        rtnl = self._rtnl(n.netns)
        link = rtnl.link(n.dev)
        return link is not None and rtnl.neighbour(link.index, n.address) == (n.mac, NUD_PERMANENT)

    def add_neighbour(self, n: Neighbour) -> bool:
        link = self._link(n.dev, n.netns, n)
        rtnl = self._rtnl(n.netns)
        if rtnl.neighbour(link.index, n.address) == (n.mac, NUD_PERMANENT):
            return False
        self._call(n, "add", lambda: rtnl.set_neighbour("replace", link.index, n.address, n.mac))
        return True

    def remove_neighbour(self, n: Neighbour) -> bool:
        rtnl = self._rtnl(n.netns)
        link = rtnl.link(n.dev)
        if link is None or rtnl.neighbour(link.index, n.address) is None:
            return False
        return self._call(n, "remove", lambda: rtnl.set_neighbour("del", link.index, n.address))
