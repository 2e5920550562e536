"""The handles one process keeps open: kernel host, firewall backend, XenStore, QubesDB.

A one-shot command builds one :class:`Runtime` and closes it; the resident
agent keeps one for its whole life and gets the same handles back for every
event with the same settings (different settings, as tests give, get their
own). Nothing connects until first used.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from ..core.model import Plan
from ..core.netvm_params import Reader
from .settings import Settings

if TYPE_CHECKING:
    from ..kernel.firewall_backend import BackendName
    from ..kernel.host import KernelHost
    from ..xen.xenstore_client import XenStore

log = logging.getLogger(__name__)


class Runtime:
    def __init__(self) -> None:
        self._hosts: dict[tuple[str, str, str], KernelHost] = {}
        self._lock = threading.Lock()

    def backend_name(self, settings: Settings) -> BackendName:
        """The backend to use now (see :func:`vif_hotplug.app.backend_state.resolve_backend`)."""
        from .backend_state import resolve_backend

        name = resolve_backend(settings, self)
        log.debug("firewall backend: %s (configured: %s)", name, settings.backend_choice)
        return name

    def host(self, settings: Settings, backend: BackendName | None = None) -> KernelHost:
        """The kernel host whose firewall is ``backend`` (default: the one settings choose)."""
        from ..kernel.firewall_backend import open_backend
        from ..kernel.host import KernelHost

        name = backend or self.backend_name(settings)
        key = (name, settings.xtables_lock, settings.nftables_lock)
        with self._lock:
            host = self._hosts.get(key)
            if host is None:
                host = KernelHost(open_backend(name, settings.xtables_lock, settings.nftables_lock,
                                               settings.lock_timeout, settings.netns_state("verified", name)),
                                  connected_memo=settings.netns_state("connected", name))
                self._hosts[key] = host
            return host

    @staticmethod
    def xenstore(settings: Settings) -> XenStore:
        """A XenStore connection for one command or event (it connects on first request)."""
        from ..xen.xenstore_client import XenStore, default_endpoint

        endpoint = ("unix", settings.xenstore_path) if settings.xenstore_path else default_endpoint()
        return XenStore(endpoint, settings.xenstore_timeout)

    @staticmethod
    def qubesdb(settings: Settings) -> Reader | None:
        from ..xen.qubesdb import qubesdb_reader

        return qubesdb_reader(settings.qubesdb_read)

    def close(self) -> None:
        with self._lock:
            for host in self._hosts.values():
                host.close()
            self._hosts.clear()


def plan_text(plan: Plan, host: KernelHost | None = None) -> list[str]:
    """What ``-v`` and ``--dry-run`` print: every step, firewall rules in the backend's own syntax."""
    from ..core.firewall import Ruleset

    out: list[str] = []
    for step in plan.steps:
        if step.op == "ensure" and host is not None and isinstance(step.target, Ruleset):
            where = f" (netns {step.target.netns})" if step.target.netns else ""
            out.append(f"firewall {step.target.what}{where}, {host.firewall.name}:")
            out += [f"  {line}" for line in host.firewall.describe(step.target)]
        else:
            out += step.lines()
    if plan.hooks is not None:
        out.append(str(plan.hooks))
    return out + [f"note: {n}" for n in plan.notes]
