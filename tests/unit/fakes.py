"""Fakes that behave like the kernel and XenStore, for the applier and hotplug tests.

:class:`FakeKernel` keeps links, routes, addresses, neighbours, sysctls, named
network namespaces, firewall tables and set elements in memory and answers
the way the kernel adapters of :mod:`vif_hotplug.kernel` do:

* adding what is there already returns ``False`` (EEXIST is success),
  removing what is absent returns ``False``;
* settings return their previous value when they change something, else ``None``;
* a missing device is :class:`DeviceGone` for adds and settings, and "nothing
  to remove" for removals (routes, addresses and neighbours die with it);
* a route needs its device up (ENETDOWN), and a device going down loses its
  routes, as in Linux;
* a set element needs its set (the anti-spoofing ruleset) to exist;
* a device moved between namespaces arrives down, without addresses, routes
  or neighbours, with that namespace's default sysctls.

Tests assert on :meth:`FakeKernel.state`, never on the order of calls.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from ipaddress import ip_address, ip_network
from typing import Any

from vif_hotplug.core.errors import DeviceGone, KernelError, XenStoreUnavailable
from vif_hotplug.core.firewall import Chain, Family, Hook, Rule, Ruleset, SetElement, SetName
from vif_hotplug.core.handlers import ActionOps, EnsureOps, Handlers, ObjectOps, SettingOps
from vif_hotplug.core.model import (
    RESTORED_SYSCTLS,
    VIF_GROUP,
    AddressRelease,
    AddressRoute,
    ConntrackPurge,
    DeviceAddress,
    HardeningHold,
    KernelModule,
    LinkFacts,
    LinkGroup,
    LinkNetns,
    LinkRename,
    LinkState,
    Neighbour,
    Netns,
    Route,
    Sysctl,
    Veth,
)
from vif_hotplug.core.plan_base import base_ruleset
from vif_hotplug.core.plan_nat import nat_netns
from vif_hotplug.kernel.hardening import HardeningHolds

Netname = str | None
#: Per-interface keys every fake link has (``conf/<dev>/...``).
LINK_SYSCTLS = (*RESTORED_SYSCTLS, "ipv6/disable_ipv6")
GLOBAL_SYSCTLS = {
    "net/ipv4/ip_forward": "0",
    # conf/all as a stock kernel has it (net/ipv4/devinet.c ipv4_devconf, net/ipv6/addrconf.c ipv6_devconf).
    "net/ipv4/conf/all/accept_source_route": "0",
    "net/ipv4/conf/all/accept_redirects": "1",
    "net/ipv4/conf/all/secure_redirects": "1",
    "net/ipv4/conf/all/send_redirects": "1",
    "net/ipv6/conf/all/accept_source_route": "0",
    "net/ipv6/conf/all/accept_dad": "0",
    "net/ipv6/conf/all/forwarding": "0",
    "net/ipv6/conf/all/disable_ipv6": "0",
    "net/ipv6/conf/default/disable_ipv6": "0",
}
#: What ``conf/default`` holds on a stock Debian kernel for the keys plans touch.
KERNEL_DEFAULTS = {
    **{k: "0" for k in LINK_SYSCTLS},
    "ipv4/accept_redirects": "1",
    "ipv4/secure_redirects": "1",
    "ipv4/send_redirects": "1",
    "ipv4/accept_source_route": "0",
    "ipv6/accept_redirects": "1",
    "ipv6/accept_ra": "1",
    "ipv6/accept_dad": "1",
    "ipv6/autoconf": "1",
}


@dataclass
class FakeLink:
    name: str
    up: bool = False
    group: int = 0
    alias: str | None = None
    kind: str = "netback"
    #: For a veth: (namespace, name) of its peer.
    peer: tuple[Netname, str] | None = None
    sysctls: dict[str, str] = field(default_factory=dict)


@dataclass
class FakeTable:
    sets: set[str] = field(default_factory=set)
    #: chain name -> (rules, hook, kind)
    chains: dict[str, tuple[tuple[Rule, ...], Hook | None, str]] = field(default_factory=dict)


Matcher = Callable[[str, object], bool]


class FakeKernel:
    """A netvm's kernel in memory, with the applier's handler table and the hotplug facts."""

    def __init__(self, *, ipv6_in_kernel: bool = True, defaults: dict[str, str] | None = None) -> None:
        self.ipv6_in_kernel = ipv6_in_kernel
        self.connected_source: str | None = None
        self.defaults = dict(KERNEL_DEFAULTS if defaults is None else defaults)
        self.namespaces: dict[Netname, dict[str, str]] = {None: self._globals()}
        self.links: dict[tuple[Netname, str], FakeLink] = {}
        self.routes: dict[tuple[Netname, str, str, int], Route] = {}
        self.addresses: set[tuple[Netname, str, str]] = set()
        self.neighbours: dict[tuple[Netname, str, str], str] = {}
        self.tables: dict[tuple[Netname, Family, str], FakeTable] = {}
        self.set_elements: set[SetElement] = set()
        #: Addresses with conntrack entries, and the purges done (not part of :meth:`state`).
        self.conntrack: set[str] = set()
        self.purged: list[str] = []
        #: This host's own addresses (its uplink's, say), and the networks on its non-VM links.
        self.local: set[str] = set()
        self.uplink_networks: dict[str, str] = {}
        #: Kernel modules this kernel has that nothing loaded yet, and those loaded since.
        self.loadable_modules: set[str] = set()
        self.loaded_modules: list[str] = []
        self._failures: list[tuple[Matcher, BaseException]] = []
        #: The hardening record (the state file a real host keeps), as text.
        self.hardening_record: str | None = None
        self._holds = HardeningHolds(self, lambda key: self.namespaces[None].get(key),
                                     lambda key, value: self._set_sysctl(Sysctl(key, value)), self.exists)
        self.handlers: Handlers = {
            Sysctl: SettingOps(self._set_sysctl, self._current_sysctl),
            LinkGroup: SettingOps(self._set_group, self._current_group),
            LinkState: SettingOps(self._set_state, self._current_state),
            LinkRename: SettingOps(self._rename, self._renamed),
            Neighbour: ObjectOps(self._add_neighbour, self._remove_neighbour, self._neighbour_present),
            Route: ObjectOps(self._add_route, self._remove_route, self._route_present),
            DeviceAddress: ObjectOps(self._add_address, self._remove_address, self._address_present),
            Netns: ObjectOps(self._add_netns, self._remove_netns, self._netns_present),
            LinkNetns: ObjectOps(self._move_in, self._move_out, self._moved),
            Veth: ObjectOps(self._add_veth, self._remove_veth, self._veth_present),
            SetElement: ObjectOps(self._add_element, self._remove_element, self.element_present),
            Ruleset: EnsureOps(self._ensure, self._drift),
            ConntrackPurge: ActionOps(self._purge),
            AddressRelease: ActionOps(self._release),
            KernelModule: ActionOps(lambda m: self.loaded_modules.append(m.name)),
            HardeningHold: ObjectOps(self._add_hold, self._remove_hold, self._holds.present),
        }

    # --- the hardening record (kernel.hardening.Record) -------------------------------------

    def read(self) -> str | None:
        return self.hardening_record

    def write(self, text: str | None) -> None:
        self.hardening_record = text

    def _add_hold(self, h: HardeningHold) -> bool:
        self._maybe_fail("add", h)
        return self._holds.add(h)

    def _remove_hold(self, h: HardeningHold) -> bool:
        self._maybe_fail("remove", h)
        return self._holds.remove(h)

    # --- building a scene ----------------------------------------------------------------

    def _globals(self) -> dict[str, str]:
        keys = GLOBAL_SYSCTLS if self.ipv6_in_kernel else {k: v for k, v in GLOBAL_SYSCTLS.items() if "ipv6" not in k}
        return dict(keys)

    def _link_sysctls(self) -> dict[str, str]:
        return {k: self.defaults.get(k, "0") for k in LINK_SYSCTLS if self.ipv6_in_kernel or not k.startswith("ipv6")}

    def add_link(self, name: str, *, netns: Netname = None, up: bool = False, group: int = 0,
                 alias: str | None = None, kind: str = "netback") -> FakeLink:
        link = FakeLink(name, up, group, alias, kind, None, self._link_sysctls())
        self.links[(netns, name)] = link
        return link

    def link(self, name: str, netns: Netname = None) -> FakeLink:
        return self.links[(netns, name)]

    def init_firewall(self, ipv6: bool = True) -> None:
        """What ``vif-hotplug init`` leaves: the whole base ruleset."""
        self._ensure(base_ruleset(ipv6, self.ipv6_in_kernel))

    def fail(self, op: str, match: object, exc: BaseException | None = None) -> None:
        """Make ``op`` (``add``, ``remove``, ``set``, ``ensure``, ``run``) fail on targets
        equal to ``match``, of type ``match``, or for which ``match(target)`` holds."""

        def matcher(o: str, target: object) -> bool:
            if o != op:
                return False
            if isinstance(match, type):
                return isinstance(target, match)
            if callable(match) and not isinstance(match, (Rule, Ruleset)):
                return bool(match(target))
            return target == match

        self._failures.append((matcher, exc if exc is not None else KernelError(f"injected {op} failure")))

    def _maybe_fail(self, op: str, target: object) -> None:
        for matcher, exc in self._failures:
            if matcher(op, target):
                raise exc

    def state(self) -> dict[str, Any]:
        """Everything an event may change (not conntrack entries, which no rollback brings back)."""
        return copy.deepcopy({
            "namespaces": self.namespaces,
            "links": self.links,
            "routes": self.routes,
            "addresses": self.addresses,
            "neighbours": self.neighbours,
            "tables": {k: (sorted(t.sets), t.chains) for k, t in self.tables.items()},
            "elements": self.set_elements,
            "hardening": self.hardening_record,
        })

    def elements_of(self, dev: str) -> set[SetElement]:
        return {e for e in self.set_elements if e.dev == dev}

    def routes_of(self, dev: str, netns: Netname = None) -> set[str]:
        return {k[2] for k in self.routes if k[0] == netns and k[1] == dev}

    def addresses_of(self, dev: str, netns: Netname = None) -> set[str]:
        return {a for n, d, a in self.addresses if n == netns and d == dev}

    # --- facts (app.ports.HotplugHost) -------------------------------------------------------------

    def exists(self, dev: str) -> bool:
        return (None, dev) in self.links

    def alias(self, dev: str) -> str | None:
        link = self.links.get((None, dev))
        return None if link is None else link.alias

    def link_facts(self, dev: str, defaults_wanted: bool = True) -> LinkFacts:
        link = self.links.get((None, dev))
        disabled = not self.ipv6_in_kernel or self.namespaces[None].get("net/ipv6/conf/all/disable_ipv6") == "1"
        if link is not None and link.sysctls.get("ipv6/disable_ipv6") == "1":
            disabled = True
        facts = LinkFacts(link is not None, disabled, self.ipv6_in_kernel, nat_netns(dev) in self.namespaces,
                          link.group if link is not None else 0)
        if not defaults_wanted:
            return facts
        return replace(facts, sysctl_defaults=tuple((k, self.defaults.get(k, "0")) for k in RESTORED_SYSCTLS))

    def find_by_alias(self, alias: str) -> str | None:
        for (netns, name), link in sorted(self.links.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
            if netns is None and link.alias == alias:
                return name
        return None

    def local_addresses(self, addresses: list[str]) -> frozenset[str]:
        return frozenset(a for a in addresses if a in self.local)

    def address_routes(self, addresses: list[str]) -> tuple[AddressRoute, ...]:
        """As the kernel's route lookup: local addresses, else the longest matching route (a
        route added on a device is on its link; :attr:`uplink_networks` are non-VM links' networks)."""
        out = []
        for addr in addresses:
            if addr in self.local:
                out.append(AddressRoute(addr, local=True))
                continue
            candidates = [(ip_network(r.destination).prefixlen, r.dev) for (netns, _, _, _), r in self.routes.items()
                          if netns is None and ip_address(addr) in ip_network(r.destination)]
            candidates += [(ip_network(net).prefixlen, dev) for net, dev in self.uplink_networks.items()
                           if ip_address(addr) in ip_network(net)]
            if not candidates:
                out.append(AddressRoute(addr))
                continue
            prefix, dev = max(candidates)
            link = self.links.get((None, dev))
            out.append(AddressRoute(addr, False, dev, link.alias if link else None,
                                    link is not None and link.group == 2, True, prefix))
        return tuple(out)

    def module_loadable(self, name: str) -> bool:
        return name in self.loadable_modules and name not in self.loaded_modules

    def device_elements(self, dev: str) -> list[SetElement]:
        return sorted(e for e in self.set_elements if e.set == "allowed" and e.dev == dev)

    def element_present(self, element: SetElement) -> bool:
        return element in self.set_elements

    def elements(self, family: Family, set_name: SetName) -> list[SetElement]:
        return sorted(e for e in self.set_elements if e.family == family and e.set == set_name)

    def connected_synced(self) -> str | None:
        return self.connected_source

    def record_connected(self, source: str | None) -> None:
        self.connected_source = source

    def group_members(self, group: int) -> list[str]:
        return sorted(name for (netns, name), link in self.links.items() if netns is None and link.group == group)

    def vif_devices(self) -> list[tuple[str, str | None]]:
        return sorted((name, link.alias) for (netns, name), link in self.links.items() if netns is None)

    # --- links ------------------------------------------------------------------------------

    def _need(self, dev: str, netns: Netname, what: object) -> FakeLink:
        link = self.links.get((netns, dev))
        if link is None:
            raise DeviceGone(f"cannot apply {what}: device {dev} does not exist")
        return link

    def _drop_link_objects(self, netns: Netname, dev: str) -> None:
        for key in [k for k in self.routes if k[0] == netns and k[1] == dev]:
            del self.routes[key]
        self.addresses = {a for a in self.addresses if (a[0], a[1]) != (netns, dev)}
        for key in [k for k in self.neighbours if (k[0], k[1]) == (netns, dev)]:
            del self.neighbours[key]

    def _set_group(self, g: LinkGroup) -> LinkGroup | None:
        self._maybe_fail("set", g)
        link = self._need(g.dev, g.netns, g)
        if link.group == g.group:
            return None
        old, link.group = link.group, g.group
        return LinkGroup(g.dev, old, g.netns)

    def _current_group(self, g: LinkGroup) -> LinkGroup | None:
        link = self.links.get((g.netns, g.dev))
        return None if link is None else LinkGroup(g.dev, link.group, g.netns)

    def _set_state(self, s: LinkState) -> LinkState | None:
        self._maybe_fail("set", s)
        link = self._need(s.dev, s.netns, s)
        if link.up == s.up:
            return None
        old, link.up = link.up, s.up
        if not s.up:  # Linux flushes a device's routes when it goes down
            for key in [k for k in self.routes if k[0] == s.netns and k[1] == s.dev]:
                del self.routes[key]
        return LinkState(s.dev, old, s.netns)

    def _current_state(self, s: LinkState) -> LinkState | None:
        link = self.links.get((s.netns, s.dev))
        return None if link is None else LinkState(s.dev, link.up, s.netns)

    def _rename(self, r: LinkRename) -> LinkRename | None:
        self._maybe_fail("set", r)
        old, new = self.links.get((None, r.dev)), self.links.get((None, r.new_name))
        if old is None and new is not None:
            return None
        if new is not None:
            raise KernelError(f"cannot rename {r.dev} to {r.new_name}: a device of that name exists")
        link = self._need(r.dev, None, r)
        link.up = False
        self._drop_link_objects(None, r.dev)
        del self.links[(None, r.dev)]
        link.name = r.new_name
        link.alias = None if re.fullmatch(r"vif[0-9]+\.[0-9]+", r.new_name) else r.dev
        self.links[(None, r.new_name)] = link
        return LinkRename(r.new_name, r.dev)

    def _renamed(self, r: LinkRename) -> LinkRename | None:
        if (None, r.new_name) in self.links and (None, r.dev) not in self.links:
            return r
        return LinkRename(r.dev, r.dev) if (None, r.dev) in self.links else None

    # --- sysctls ----------------------------------------------------------------------------

    def _sysctl_slot(self, s: Sysctl) -> tuple[dict[str, str], str] | None:
        parts = s.key.split("/")
        if s.netns not in self.namespaces:
            raise KernelError(f"cannot set {s}: no netns {s.netns}")
        if s.dev is not None:
            link = self.links.get((s.netns, s.dev))
            if link is None:
                raise DeviceGone(f"cannot set {s}: device {s.dev} does not exist")
            key = f"{parts[1]}/{parts[4]}"
            return (link.sysctls, key) if key in link.sysctls else None
        table = self.namespaces[s.netns]
        return (table, s.key) if s.key in table else None

    def _set_sysctl(self, s: Sysctl) -> Sysctl | None:
        self._maybe_fail("set", s)
        slot = self._sysctl_slot(s)
        if slot is None:
            raise KernelError(f"cannot set {s}: /proc/sys/{s.key} does not exist")
        table, key = slot
        old = table[key]
        if old == s.value:
            return None
        table[key] = s.value
        return s.with_value(old)

    def _current_sysctl(self, s: Sysctl) -> Sysctl | None:
        try:
            slot = self._sysctl_slot(s)
        except KernelError:
            return None
        return None if slot is None else s.with_value(slot[0][slot[1]])

    # --- routes, addresses, neighbours ----------------------------------------------------------

    @staticmethod
    def _route_key(r: Route) -> tuple[Netname, str, str, int]:
        return (r.netns, r.dev, str(ip_network(r.destination)), r.metric)

    def _route_present(self, r: Route) -> bool:
        return self._route_key(r) in self.routes

    def _add_route(self, r: Route) -> bool:
        self._maybe_fail("add", r)
        link = self._need(r.dev, r.netns, r)
        if self._route_present(r):
            return False
        if not link.up:
            raise KernelError(f"cannot add {r}: Network is down")
        netns, _, dest, metric = self._route_key(r)
        if any(k[0] == netns and k[2] == dest and k[3] == metric for k in self.routes):
            raise KernelError(f"cannot add {r}: {dest} metric {metric} is routed elsewhere")
        self.routes[self._route_key(r)] = r
        return True

    def _remove_route(self, r: Route) -> bool:
        self._maybe_fail("remove", r)
        return self.routes.pop(self._route_key(r), None) is not None

    def _address_present(self, a: DeviceAddress) -> bool:
        return (a.netns, a.dev, a.address) in self.addresses

    def _add_address(self, a: DeviceAddress) -> bool:
        self._maybe_fail("add", a)
        self._need(a.dev, a.netns, a)
        if self._address_present(a):
            return False
        self.addresses.add((a.netns, a.dev, a.address))
        return True

    def _remove_address(self, a: DeviceAddress) -> bool:
        self._maybe_fail("remove", a)
        if not self._address_present(a):
            return False
        self.addresses.discard((a.netns, a.dev, a.address))
        return True

    def _neighbour_present(self, n: Neighbour) -> bool:
        return self.neighbours.get((n.netns, n.dev, n.address)) == n.mac

    def _add_neighbour(self, n: Neighbour) -> bool:
        self._maybe_fail("add", n)
        self._need(n.dev, n.netns, n)
        if self._neighbour_present(n):
            return False
        self.neighbours[(n.netns, n.dev, n.address)] = n.mac
        return True

    def _remove_neighbour(self, n: Neighbour) -> bool:
        self._maybe_fail("remove", n)
        return self.neighbours.pop((n.netns, n.dev, n.address), None) is not None

    # --- namespaces and veths --------------------------------------------------------------------

    def _netns_present(self, n: Netns) -> bool:
        return n.name in self.namespaces

    def _add_netns(self, n: Netns) -> bool:
        self._maybe_fail("add", n)
        if n.name in self.namespaces:
            return False
        self.namespaces[n.name] = self._globals()
        return True

    def _remove_netns(self, n: Netns) -> bool:
        self._maybe_fail("remove", n)
        if n.name not in self.namespaces:
            return False
        del self.namespaces[n.name]
        for key in [k for k in self.links if k[0] == n.name]:
            self._drop_link_objects(n.name, key[1])
            del self.links[key]
        for tkey in [k for k in self.tables if k[0] == n.name]:
            del self.tables[tkey]
        return True

    def _moved(self, m: LinkNetns) -> bool:
        return (m.target, m.dev) in self.links

    def _move(self, link: FakeLink, src: Netname, dst: Netname) -> None:
        self._drop_link_objects(src, link.name)
        del self.links[(src, link.name)]
        link.up = False
        link.sysctls = self._link_sysctls()
        self.links[(dst, link.name)] = link

    def _move_in(self, m: LinkNetns) -> bool:
        self._maybe_fail("add", m)
        if self._moved(m):
            return False
        if m.target not in self.namespaces:
            raise KernelError(f"cannot move {m.dev} into netns {m.target}: no such namespace")
        self._move(self._need(m.dev, None, m), None, m.target)
        return True

    def _move_out(self, m: LinkNetns) -> bool:
        self._maybe_fail("remove", m)
        link = self.links.get((m.target, m.dev))
        if link is None:
            return False
        if (None, m.dev) in self.links:
            raise KernelError(f"cannot move {m.dev} back from netns {m.target}: a device of that name is here")
        self._move(link, m.target, None)
        return True

    def _veth_present(self, v: Veth) -> bool:
        link = self.links.get((None, v.dev))
        return link is not None and link.kind == "veth" and link.peer == (v.peer_netns, v.peer)

    def _add_veth(self, v: Veth) -> bool:
        self._maybe_fail("add", v)
        if self._veth_present(v):
            return False
        if (None, v.dev) in self.links:
            raise KernelError(f"cannot add {v}: a device named {v.dev} is still here")
        if v.peer_netns not in self.namespaces:
            raise KernelError(f"cannot add {v}: no netns {v.peer_netns}")
        self.add_link(v.dev, kind="veth").peer = (v.peer_netns, v.peer)
        self.add_link(v.peer, netns=v.peer_netns, kind="veth").peer = (None, v.dev)
        return True

    def _remove_veth(self, v: Veth) -> bool:
        self._maybe_fail("remove", v)
        if not self._veth_present(v):
            return False
        for netns, name in ((None, v.dev), (v.peer_netns, v.peer)):
            self._drop_link_objects(netns, name)
            self.links.pop((netns, name), None)
        return True

    # --- firewall --------------------------------------------------------------------------------

    def _ensure(self, rs: Ruleset) -> bool:
        self._maybe_fail("ensure", rs)
        if rs.netns not in self.namespaces:
            raise KernelError(f"cannot ensure {rs}: no netns {rs.netns}")
        changed = False
        for t in rs.tables:
            key = (rs.netns, t.family, t.name)
            if key not in self.tables:
                self.tables[key] = FakeTable()
                changed = True
            table = self.tables[key]
            for s in t.sets:
                if s not in table.sets:
                    table.sets.add(s)
                    changed = True
            for c in t.chains:
                changed |= self._ensure_chain(table, c)
        return changed

    @staticmethod
    def _ensure_chain(table: FakeTable, c: Chain) -> bool:
        have = table.chains.get(c.name)
        if c.kind == "absent":
            return table.chains.pop(c.name, None) is not None
        if c.kind == "reserved":
            if have is None:
                table.chains[c.name] = ((), c.hook, "reserved")
                return True
            return False
        want = (c.rules, c.hook, c.kind)
        if have == want:
            return False
        table.chains[c.name] = want
        return True

    def _drift(self, rs: Ruleset) -> list[str]:
        out: list[str] = []
        for t in rs.tables:
            table = self.tables.get((rs.netns, t.family, t.name))
            where = f"{t.family} {t.name}"
            if table is None:
                out.append(f"table {where} missing")
                continue
            out += [f"set {where} {s} missing" for s in t.sets if s not in table.sets]
            for c in t.chains:
                have = table.chains.get(c.name)
                if c.kind == "absent" and have is not None:
                    out.append(f"chain {where} {c.name} should not exist")
                elif c.kind == "reserved" and have is None:
                    out.append(f"chain {where} {c.name} missing")
                elif c.kind in ("owned", "replaced") and have != (c.rules, c.hook, c.kind):
                    out.append(f"chain {where} {c.name} differs")
        return out

    def _set_exists(self, e: SetElement) -> bool:
        table = self.tables.get((None, e.family, "qubes"))
        return table is not None and e.set in table.sets

    def _add_element(self, e: SetElement) -> bool:
        self._maybe_fail("add", e)
        if not self._set_exists(e):
            raise KernelError(f"cannot add {e}: set does not exist")
        if e in self.set_elements:
            return False
        self.set_elements.add(e)
        return True

    def _remove_element(self, e: SetElement) -> bool:
        self._maybe_fail("remove", e)
        if e not in self.set_elements:
            return False
        self.set_elements.discard(e)
        return True

    # --- actions -----------------------------------------------------------------------------------

    def _purge(self, p: ConntrackPurge) -> None:
        self._maybe_fail("run", p)
        for address in p.addresses:
            self.purged.append(address)
            self.conntrack.discard(address)

    def _routed_elsewhere(self, network: str, dev: str) -> bool:
        dest = str(ip_network(network))
        for netns, other, d, _ in self.routes:
            link = self.links.get((netns, other))
            if netns is None and d == dest and other != dev and link is not None and link.group == VIF_GROUP:
                return True
        return False

    def _release(self, r: AddressRelease) -> None:
        self._maybe_fail("run", r)
        if self._routed_elsewhere(r.network, r.dev):
            return
        self.set_elements.discard(SetElement(r.family, "downstream", r.network))
        net = ip_network(r.network)
        if net.prefixlen == net.max_prefixlen:
            self._purge(ConntrackPurge((str(net.network_address),)))


class FakeXenStore:
    """A XenStore as a dict of relative paths; ``None`` for a missing key.

    ``fail_writes`` names paths whose write fails as an unreachable store
    would; ``down`` makes every request fail.
    """

    def __init__(self, data: dict[str, str] | None = None) -> None:
        self.data: dict[str, str] = dict(data or {})
        self.fail_writes: set[str] = set()
        self.down = False
        self.writes: list[tuple[str, str]] = []

    def read(self, path: str) -> str | None:
        if self.down:
            raise XenStoreUnavailable("XenStore at /fake: did not answer within 5s")
        return self.data.get(path)

    def write(self, path: str, value: str) -> None:
        if self.down or path in self.fail_writes:
            raise XenStoreUnavailable("XenStore at /fake: connection closed before the reply")
        self.data[path] = value
        self.writes.append((path, value))

    def directory(self, path: str) -> list[str]:
        prefix = path.rstrip("/") + "/"
        return sorted({k[len(prefix):].split("/")[0] for k in self.data if k.startswith(prefix)})
