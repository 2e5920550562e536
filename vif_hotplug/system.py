"""The real :class:`~vif_hotplug.applier.Host`: kernel adapters behind one dispatch.

Adapters are opened on first use, so a dry run or a plan that needs no
firewall change never loads python-iptables.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .antispoof import antispoof_ruleset, set_specs
from .conntrack import purge_conntrack
from .hooks import run_hooks
from .model import (
    AntispoofBase,
    ConntrackPurge,
    DeviceAddress,
    Hooks,
    LinkGroup,
    LinkRename,
    LinkState,
    NatNamespace,
    Neighbour,
    Removable,
    Route,
    Runnable,
    SetEntry,
    Settable,
    Sysctl,
)

if TYPE_CHECKING:
    from .firewall import Firewall
    from .kernel_sets import KernelSets
    from .netlink import Netlink


class KernelHost:
    """Applies plan steps to the kernel of the caller's network namespace."""

    def __init__(self, firewall: Firewall | None = None) -> None:
        self._firewall = firewall
        self._netlink: Netlink | None = None
        self._sets: KernelSets | None = None

    @property
    def netlink(self) -> Netlink:
        if self._netlink is None:
            from .netlink import Netlink

            self._netlink = Netlink()
        return self._netlink

    @property
    def sets(self) -> KernelSets:
        if self._sets is None:
            from .kernel_sets import KernelSets

            self._sets = KernelSets()
        return self._sets

    @property
    def firewall(self) -> Firewall:
        if self._firewall is None:
            from .iptables_backend import IptablesFirewall

            self._firewall = IptablesFirewall()
        return self._firewall

    def close(self) -> None:
        if self._netlink is not None:
            self._netlink.close()
        if self._sets is not None:
            self._sets.close()

    def add(self, target: Removable) -> bool:
        if isinstance(target, SetEntry):
            return self.sets.add(target)
        if isinstance(target, Neighbour):
            return self.netlink.add_neighbour(target)
        if isinstance(target, Route):
            return self.netlink.add_route(target)
        if isinstance(target, DeviceAddress):
            return self.netlink.add_address(target)
        if isinstance(target, NatNamespace):
            from .mapped_nat import create

            return create(target)
        raise TypeError(target)

    def remove(self, target: Removable) -> bool:
        if isinstance(target, SetEntry):
            return self.sets.remove(target)
        if isinstance(target, Neighbour):
            return self.netlink.remove_neighbour(target)
        if isinstance(target, Route):
            return self.netlink.remove_route(target)
        if isinstance(target, DeviceAddress):
            return self.netlink.remove_address(target)
        if isinstance(target, NatNamespace):
            from .mapped_nat import destroy

            return destroy(target)
        raise TypeError(target)

    def set(self, target: Settable) -> Settable | None:
        if isinstance(target, Sysctl):
            return self.netlink.set_sysctl(target)
        if isinstance(target, LinkGroup):
            return self.netlink.set_group(target)
        if isinstance(target, LinkState):
            return self.netlink.set_state(target)
        if isinstance(target, LinkRename):
            return self.netlink.rename(target)
        raise TypeError(target)

    def run(self, target: Runnable) -> None:
        if isinstance(target, AntispoofBase):
            for name, stype, fam in set_specs(target.families):
                self.sets.ensure_set(name, stype, fam)
            self.firewall.sync(antispoof_ruleset(target.families))
        elif isinstance(target, ConntrackPurge):
            purge_conntrack(target.address)
        elif isinstance(target, Hooks):
            run_hooks(target)
        else:
            raise TypeError(target)
