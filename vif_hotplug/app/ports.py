"""What the use cases need from the outside world, as interfaces.

The kernel host (:class:`vif_hotplug.kernel.host.KernelHost`) and XenStore
(:class:`vif_hotplug.xen.xenstore_client.XenStore`) implement them; unit
tests use fakes that behave like the kernel.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol

from ..core.firewall import Family, SetElement, SetName
from ..core.handlers import Host
from ..core.model import AddressRoute, LinkFacts


class KernelFacts(Protocol):
    """Reads planners need. Each is one request, whatever the number of VMs,
    except :meth:`find_by_alias` and :meth:`elements` (rare paths)."""

    def exists(self, dev: str) -> bool: ...

    def alias(self, dev: str) -> str | None: ...

    def link_facts(self, dev: str, defaults_wanted: bool = True) -> LinkFacts: ...

    def find_by_alias(self, alias: str) -> str | None: ...

    def local_addresses(self, addresses: list[str]) -> frozenset[str]: ...

    def address_routes(self, addresses: list[str]) -> tuple[AddressRoute, ...]:
        """Where each address would be sent now (two route lookups each)."""
        ...

    def module_loadable(self, name: str) -> bool:
        """Whether kernel module ``name`` is a module of this kernel that nothing loaded yet."""
        ...

    def device_elements(self, dev: str) -> list[SetElement]:
        """The ``allowed`` elements naming ``dev`` (a listing: first online and offline only)."""
        ...

    def element_present(self, element: SetElement) -> bool: ...

    def elements(self, family: Family, set_name: SetName) -> list[SetElement]: ...

    def connected_synced(self) -> str | None:
        """The connected addresses the ``connected`` sets were last brought up to (``None``: unknown)."""
        ...

    def record_connected(self, source: str | None) -> None:
        """The ``connected`` sets now hold ``source`` (``None``: unknown, compare in full next time)."""
        ...


class HotplugHost(KernelFacts, Host, Protocol):
    """The kernel as one hotplug event sees it: facts to plan from, handlers to apply with."""


class NetvmHost(HotplugHost, Protocol):
    """The kernel as ``reconcile`` and ``status`` see it: every vif at once."""

    def group_members(self, group: int) -> list[str]:
        """Names of the links in interface ``group`` (a dump)."""
        ...

    def vif_devices(self) -> list[tuple[str, str | None]]:
        """(name, alias) of every link (a dump); the caller picks the VM interfaces."""
        ...


class Lock(Protocol):
    def __call__(self) -> AbstractContextManager[None]: ...
