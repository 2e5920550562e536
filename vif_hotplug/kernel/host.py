"""The real host: kernel adapters behind the applier's dispatch table, and the facts planners need.

Everything opens on first use, so a dry run, or a plan that needs no
firewall change, loads no firewall library and opens no socket it does not
need.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from dataclasses import replace
from ipaddress import ip_network

from ..core.firewall import Family, FlowOffload, FlowtableDevice, Ruleset, SetElement, SetName
from ..core.handlers import ActionOps, EnsureOps, Handlers, ObjectOps, SettingOps
from ..core.model import (
    DEFAULT_GROUP,
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
from ..core.plan_base import families_of
from ..core.plan_nat import nat_netns
from .conntrack import purge_conntrack
from .firewall_backend import FirewallBackend
from .hardening import FileRecord, HardeningHolds
from .modules import load_module, module_state
from .netlink import Links
from .netns import Namespaces, RtnlFactory, netns_exists
from .nfnl import Nfnl
from .rtnl import RTN_LOCAL, Link, Rtnl
from .sysctl import PROC_SYS, Sysctls, kernel_has_ipv6, read_sysctl

log = logging.getLogger(__name__)

#: ``rtm_scope`` of a route to a destination on the device's own link (linux/rtnetlink.h).
RT_SCOPE_LINK = 253


class KernelHost:
    """Applies plan steps to the kernel of the caller's network namespace (and named ones)."""

    def __init__(self, firewall: FirewallBackend, proc_sys: str = PROC_SYS, connected_memo: str | None = None,
                 tools_path: str | None = None, hardening_record: str | None = None) -> None:
        self.firewall = firewall
        #: Where the tools this host runs (``modprobe``) are looked up.
        self._tools_path = tools_path
        #: A file holding what the connected sets were last brought up to.
        self._connected_memo = connected_memo
        self._proc_sys = proc_sys
        self._rtnl = Rtnl()
        self._nfnl = Nfnl()
        self._rtnl_in = RtnlFactory()
        links = Links(self.rtnl)
        sysctls = Sysctls(proc_sys)
        ns = Namespaces(self._rtnl, self._rtnl_in)
        fw = firewall
        holds = HardeningHolds(FileRecord(hardening_record), lambda key: read_sysctl(key, None, proc_sys),
                               lambda key, value: sysctls.set(Sysctl(key, value)), self.exists)
        self.handlers: Handlers = {
            Sysctl: SettingOps(sysctls.set, sysctls.current),
            LinkGroup: SettingOps(links.set_group, links.group),
            LinkState: SettingOps(links.set_state, links.state),
            LinkRename: SettingOps(links.rename, links.renamed),
            Neighbour: ObjectOps(links.add_neighbour, links.remove_neighbour, links.neighbour_present),
            Route: ObjectOps(links.add_route, links.remove_route, links.route_present),
            DeviceAddress: ObjectOps(links.add_address, links.remove_address, links.address_present),
            Netns: ObjectOps(ns.add_netns, ns.remove_netns, ns.netns_present),
            LinkNetns: ObjectOps(ns.move_in, ns.move_out, ns.link_moved),
            Veth: ObjectOps(ns.add_veth, ns.remove_veth, ns.veth_present),
            SetElement: ObjectOps(fw.add_element, fw.remove_element, fw.element_present),
            Ruleset: EnsureOps(fw.ensure, fw.drift),
            FlowOffload: EnsureOps(fw.ensure_offload, fw.offload_drift),
            FlowtableDevice: ObjectOps(fw.add_flow_device, fw.remove_flow_device, fw.flow_device_present),
            ConntrackPurge: ActionOps(lambda p: self._purge(p.addresses)),
            AddressRelease: ActionOps(self._release),
            KernelModule: ActionOps(lambda m: load_module(m.name, shutil.which("modprobe", path=self._tools_path))),
            HardeningHold: ObjectOps(holds.add, holds.remove, holds.present),
        }

    def rtnl(self, netns: str | None) -> Rtnl:
        return self._rtnl if netns is None else self._rtnl_in(netns)

    def close(self) -> None:
        self._rtnl.close()
        self._nfnl.close()
        self._rtnl_in.close()
        self.firewall.close()

    # --- facts ---------------------------------------------------------------------------

    def link(self, dev: str) -> Link | None:
        return self._rtnl.link(dev)

    def exists(self, dev: str) -> bool:
        return self._rtnl.link(dev) is not None

    def alias(self, dev: str) -> str | None:
        link = self._rtnl.link(dev)
        return None if link is None else link.alias

    def link_facts(self, dev: str, defaults_wanted: bool = True) -> LinkFacts:
        """What planning needs to know of ``dev``; ``defaults`` (what offline restores) costs 14 reads."""
        link = self._rtnl.link(dev)
        exists = link is not None
        in_kernel = kernel_has_ipv6(self._proc_sys)
        disabled = not in_kernel
        if in_kernel:
            for scope in ("all", dev):
                disabled = disabled or read_sysctl(f"net/ipv6/conf/{scope}/disable_ipv6", None, self._proc_sys) == "1"
        defaults = []
        for key in RESTORED_SYSCTLS if defaults_wanted else ():
            family, name = key.split("/")
            value = read_sysctl(f"net/{family}/conf/default/{name}", None, self._proc_sys)
            defaults.append((key, value if value is not None else "0"))
        facts = LinkFacts(exists, disabled, in_kernel, netns_exists(nat_netns(dev)),
                          link.group if link is not None else DEFAULT_GROUP)
        return replace(facts, sysctl_defaults=tuple(defaults)) if defaults_wanted else facts

    def group_members(self, group: int) -> list[str]:
        return sorted(link.name for link in self._rtnl.links() if link.group == group)

    def vif_devices(self) -> list[tuple[str, str | None]]:
        return sorted((link.name, link.alias) for link in self._rtnl.links())

    def find_by_alias(self, alias: str) -> str | None:
        """The device whose alias is ``alias`` (a renamed vif). A dump: rare paths only."""
        for link in self._rtnl.links():
            if link.alias == alias:
                return link.name
        return None

    def local_addresses(self, addresses: list[str]) -> frozenset[str]:
        """Those of ``addresses`` that are this host's own (one route lookup each)."""
        return frozenset(r.address for r in self.address_routes(addresses) if r.local)

    def address_routes(self, addresses: list[str]) -> tuple[AddressRoute, ...]:
        """Where each of ``addresses`` would go now (two route lookups each, whatever the number of VMs)."""
        out = []
        for addr in addresses:
            if (local := self._rtnl.route_lookup(addr, fib_match=False)) is not None and local.type == RTN_LOCAL:
                out.append(AddressRoute(addr, local=True))
                continue
            found = self._rtnl.route_lookup(addr)
            link = self._rtnl.link(index=found.oif) if found is not None and found.oif is not None else None
            if found is None or link is None:
                out.append(AddressRoute(addr))
                continue
            out.append(AddressRoute(addr, False, link.name, link.alias, link.group == VIF_GROUP,
                                    found.scope == RT_SCOPE_LINK, found.dst_len))
        return tuple(out)

    def flow_offload_missing(self) -> str | None:
        """Why this firewall cannot offload flows (``None``: it can): a probe that changes nothing."""
        return self.firewall.flow_offload_missing()

    @staticmethod
    def module_loadable(name: str) -> bool:
        """Whether kernel module ``name`` is in this kernel as a module that nothing loaded yet."""
        return module_state(name) == "loadable"

    def device_elements(self, dev: str) -> list[SetElement]:
        """The ``allowed`` elements naming ``dev`` (a listing of the sets: first online and offline only)."""
        return [e for f in families_of(kernel_has_ipv6(self._proc_sys))
                for e in self.firewall.elements(f, "allowed", dev) if e.dev == dev]

    def routed_elsewhere(self, network: str, dev: str) -> bool:
        """Whether another VM interface routes exactly ``network`` (one route lookup)."""
        net = ip_network(network)
        found = self._rtnl.route_lookup(str(net.network_address))
        if found is None or found.oif is None or found.dst_len != net.prefixlen:
            return False
        link = self._rtnl.link(index=found.oif)
        return link is not None and link.name != dev and link.group == VIF_GROUP

    def element_present(self, element: SetElement) -> bool:
        return self.firewall.element_present(element)

    def elements(self, family: Family, set_name: SetName) -> list[SetElement]:
        return self.firewall.elements(family, set_name)

    def connected_synced(self) -> str | None:
        if self._connected_memo is None:
            return None
        try:
            with open(self._connected_memo, encoding="utf-8") as f:
                return f.read()
        except OSError:
            return None

    def record_connected(self, source: str | None) -> None:
        path = self._connected_memo
        if path is None:
            return
        try:
            if source is None:
                os.unlink(path)
                return
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(source)
            os.replace(tmp, path)
        except OSError as exc:
            log.debug("cannot record the connected addresses in %s: %s", path, exc.strerror)

    # --- actions -------------------------------------------------------------------------

    def _purge(self, addresses: tuple[str, ...]) -> None:
        removed = purge_conntrack(addresses, self._nfnl)
        if removed:
            log.debug("%d conntrack entries of %s purged", removed, ", ".join(addresses))

    def _release(self, r: AddressRelease) -> None:
        if self.routed_elsewhere(r.network, r.dev):
            log.info("%s: %s is routed to another vif: its downstream element and connections stay", r.dev, r.network)
            return
        if self.firewall.remove_element(SetElement(r.family, "downstream", r.network)):
            log.info("%s: remove %s", r.dev, SetElement(r.family, "downstream", r.network))
        net = ip_network(r.network)
        if net.prefixlen == net.max_prefixlen:
            self._purge((str(net.network_address),))
