"""``vif-hotplug connected-ips``: bring the ``connected`` sets up to date with their source.

The sets hold the addresses of every VM that uses this netvm, running or
not (:mod:`vif_hotplug.core.plan_connected`); ``init``, ``reconcile`` and
this command compare them with their source in full. A hotplug event
compares the source with the one the sets were last brought up to
(a file in the state directory) and lists the sets
only when it changed: listing them costs as much as there are VMs, and an
event must not. ``--watch`` keeps them up to date until SIGTERM/SIGINT, for
a netvm whose source (QubesDB) changes while no VM starts or stops: at each
QubesDB watch event where Qubes' ``qubesdb`` module watches
``/connected-ips`` (no timer then), else by reading the sources every
:data:`WATCH_INTERVAL` seconds. (The resident agent applies a QubesDB change
itself: :mod:`.qubesdb_watch`.)
"""

from __future__ import annotations

import json
import logging
import select

from ..core.errors import HotplugError, InvalidInput
from ..core.firewall import Family
from ..core.netvm_params import Connected, Reader, resolve_connected
from ..core.plan_base import families_of
from ..core.plan_connected import connected_steps
from ..kernel.locks import file_lock
from ..kernel.sysctl import kernel_has_ipv6
from .applier import apply_all_or_nothing
from .ports import HotplugHost
from .settings import Settings
from .stop import StopOnSignal

log = logging.getLogger(__name__)

WATCH_INTERVAL = 2.0


def source_text(connected: Connected, families: tuple[Family, ...]) -> str:
    """The connected addresses as the state file records them (see :meth:`HotplugHost.connected_synced`)."""
    return json.dumps({"ipv4": [str(a) for a in connected.ipv4], "ipv6": [str(a) for a in connected.ipv6],
                       "families": list(families)}, sort_keys=True)


def update_connected(settings: Settings, host: HotplugHost, qubesdb: Reader | None, xenstore: Reader | None) -> int:
    """Changes made to the ``connected`` sets (0 when no source lists any). Raises ``HotplugError``."""
    if settings.conf_error is not None:
        raise InvalidInput(settings.conf_error)
    connected = resolve_connected(settings.conf, qubesdb, xenstore)
    if connected is None:
        log.info("no source lists connected addresses: the sets stay as they are")
        return 0
    families = families_of(kernel_has_ipv6())
    with file_lock(settings.hotplug_lock, settings.lock_timeout, "hotplug lock"):
        present = [e for f in families for e in host.elements(f, "connected")]
        steps = connected_steps(connected, present, families)
        changed = len(apply_all_or_nothing(steps, host, "connected-ips").changed)
        host.record_connected(source_text(connected, families))
        return changed


def watch_connected(settings: Settings, host: HotplugHost, qubesdb: Reader | None, xenstore: Reader | None) -> int:
    """:func:`update_connected` now and whenever the source may have changed (see the module); 0 when stopped.

    Each round reads QubesDB anew (``qubesdb``'s ``renewed()``).
    """
    from ..xen.qubesdb import QubesDBReader

    changes = qubesdb.changes() if isinstance(qubesdb, QubesDBReader) else None
    failure: str | None = None
    with StopOnSignal() as stop:
        while not stop.requested:
            reader = qubesdb.renewed() if isinstance(qubesdb, QubesDBReader) else qubesdb
            try:
                update_connected(settings, host, reader, xenstore)
                failure = None
            except HotplugError as exc:
                if str(exc) != failure:
                    log.error("%s (retrying every %gs)", exc, WATCH_INTERVAL)
                failure = str(exc)
            if changes is not None and failure is None:
                changes.wait(stop.fd, None, WATCH_INTERVAL)
            else:
                select.select([stop.fd], [], [], WATCH_INTERVAL)
    return 0
