"""The handles one process keeps open: kernel hosts, XenStore, QubesDB; and how long it waits for locks.

A one-shot command builds one :class:`Runtime` and closes it; the resident
agent keeps one for its whole life and gets the same handles back for every
event with the same settings (different settings, as tests give, get their
own). Nothing connects until first used, and nothing here decides or
changes which firewall backend is used: commands resolve that
(:mod:`.backend_state`) and pass it in.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import TYPE_CHECKING

from ..core.model import Plan
from ..core.netvm_params import Reader
from .ports import Lock
from .settings import FALLBACK_LOCK_TIMEOUT, Settings, settings_from_env

if TYPE_CHECKING:
    from ..kernel.firewall_backend import BackendName
    from ..kernel.host import KernelHost
    from ..xen.qubesdb import QubesDBCache
    from ..xen.xenstore_client import XenStore


class Runtime:
    """``lock_timeout``: how long this process's commands wait for any lock (the agent's are
    shorter than its clients' patience, a fallback's fit libxl's deadline). ``role``: ``agent``
    in the resident agent, ``local`` in a process doing its own command."""

    def __init__(self, lock_timeout: float = FALLBACK_LOCK_TIMEOUT, role: str = "local") -> None:
        self.lock_timeout = lock_timeout
        self.role = role
        self._hosts: dict[tuple[str, str, str, str, bool], KernelHost] = {}
        self._lock = threading.Lock()
        self._qubesdb: QubesDBCache | None = None
        self._qubesdb_looked = False

    def settings(self, env: Mapping[str, str], backend: str | None = None) -> Settings:
        """The command's settings: its environment and netvm.conf, ``--backend`` if given, this
        process's lock patience. Raises ``InvalidInput``."""
        return replace(settings_from_env(env).with_backend(backend), lock_timeout=self.lock_timeout)

    def host(self, settings: Settings, backend: BackendName, read_only: bool = False) -> KernelHost:
        """The kernel host whose firewall is ``backend``; ``read_only`` for a command that must not
        write even the state directory (the rulesets it finds complete are remembered in memory)."""
        from ..kernel.firewall_backend import open_backend
        from ..kernel.host import KernelHost
        from ..kernel.state_files import netns_key, records_trusted, state_file

        # Per namespace too: a state record names the namespace it describes.
        key = (backend, settings.xtables_lock, settings.nftables_lock, netns_key(), read_only)
        with self._lock:
            host = self._hosts.get(key)
            if host is None:
                # Without namespace cookies a record cannot tell a reused inode from its own
                # namespace: the rulesets found complete are then remembered in memory only.
                persist = records_trusted() and not read_only
                verified = state_file(settings.state_dir, f"verified-{backend}") if persist else None
                host = KernelHost(open_backend(backend, settings.xtables_lock, settings.nftables_lock,
                                               settings.lock_timeout, verified),
                                  connected_memo=state_file(settings.state_dir, f"connected-{backend}"),
                                  tools_path=settings.path,
                                  hardening_record=state_file(settings.state_dir, "hardening"))
                self._hosts[key] = host
            return host

    @staticmethod
    def hotplug_lock(settings: Settings) -> Lock:
        """The lock every change to a vif's state is made under."""
        from ..kernel.locks import file_lock

        def lock() -> AbstractContextManager[None]:
            return file_lock(settings.hotplug_lock, settings.lock_timeout, "hotplug lock")

        return lock

    @staticmethod
    def xenstore(settings: Settings) -> XenStore:
        """A XenStore connection for one command or event (it connects on first request)."""
        from ..xen.xenstore_client import XenStore, default_endpoint

        return XenStore(default_endpoint(settings.xenstore_path), settings.xenstore_timeout)

    def qubesdb_cache(self) -> QubesDBCache | None:
        """This process's one connection to QubesDB, when Qubes' ``qubesdb`` module imports (it connects
        at first use); ``None`` without the module."""
        from ..xen.qubesdb import QubesDBCache, import_qubesdb

        with self._lock:
            if not self._qubesdb_looked:
                self._qubesdb_looked = True
                module = import_qubesdb()
                self._qubesdb = QubesDBCache(module) if module is not None else None
            return self._qubesdb

    def qubesdb(self, settings: Settings) -> Reader | None:
        """QubesDB for one command: through Qubes' module when it imports, else ``qubesdb-read`` when
        installed (one run for the command's keys), else ``None``."""
        from ..xen.qubesdb import CommandReader, SnapshotReader

        cache = self.qubesdb_cache()
        if cache is not None:
            return SnapshotReader(cache)
        return CommandReader(settings.qubesdb_read) if settings.qubesdb_read else None

    def close(self) -> None:
        with self._lock:
            for host in self._hosts.values():
                host.close()
            self._hosts.clear()
            if self._qubesdb is not None:
                self._qubesdb.close()
            self._qubesdb, self._qubesdb_looked = None, False


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
