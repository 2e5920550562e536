"""Moving this package's firewall state to the backend the configuration now asks for (the switch use case).

Run by ``init`` (itself a switch when ``--backend`` changed), by a changing
command that finds the configuration changed (:func:`settle_backend`), and
by the agent at start; never by a read-only command. Under the hotplug
lock, the marker read again inside it: of two events that find the same
change, the first switches and the second finds nothing to do.

The whole state is installed in the new backend first (``init`` when it
had run, else ``reconcile`` of every vif), then what this package owns in
the old one is removed, so no VM can spoof in between.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

from .backend_state import BackendView, Marker, other, resolve, write_marker
from .init import initialize
from .reconcile import reconcile
from .settings import Settings

if TYPE_CHECKING:
    from ..kernel.firewall_backend import BackendName
    from .runtime import Runtime

log = logging.getLogger(__name__)


def settle_backend(settings: Settings, runtime: Runtime) -> BackendName:
    """The backend a changing command works in, after moving the state there if that is pending."""
    view = resolve(settings)
    if not view.pending:
        return view.target
    with runtime.hotplug_lock(settings)():
        view = resolve(settings)
        if view.pending:
            switch(settings, runtime, view)
    return view.target


def switch(settings: Settings, runtime: Runtime, view: BackendView) -> None:
    """Install the state in ``view.target``, then remove it from the other backend. The caller holds
    the hotplug lock."""
    chosen = view.target
    log.warning("firewall backend changed from %s to %s: moving this package's state", view.in_use, chosen)
    if view.init:
        initialize(settings, runtime, chosen, contextlib.nullcontext)
        return
    xs = runtime.xenstore(settings)
    try:
        host = runtime.host(settings, chosen)
        host.record_connected(None)  # compared in full: the sets may be new
        reconcile(settings, host, xs, runtime.qubesdb(settings), lock=contextlib.nullcontext)
    finally:
        xs.close()
    former = runtime.host(settings, other(chosen))
    if former.firewall.owns_state():
        former.firewall.remove_all()
    former.record_connected(None)
    write_marker(settings, Marker(chosen))
