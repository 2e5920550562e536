"""Which firewall backend holds this package's state, and moving it to the other one.

A small marker file per network namespace (firewall state is per namespace)
in the state directory records the backend that was last used and whether
``init`` installed the base firewall. An event compares it with the
backend the settings choose (one ``open``, no firewall library loaded);
only when they differ does it switch: the whole state is installed in the
new backend first (``init`` and ``reconcile``), then what this package owns
in the old one is removed, so no VM can spoof in between.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .settings import Settings

if TYPE_CHECKING:
    from ..kernel.firewall_backend import BackendName
    from .runtime import Runtime

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Marker:
    backend: str
    init: bool = False


def marker_path(settings: Settings) -> str:
    netns = os.stat("/proc/thread-self/ns/net").st_ino
    return os.path.join(settings.state_dir, f"backend-{netns}.json")


def read_marker(settings: Settings) -> Marker | None:
    try:
        with open(marker_path(settings), encoding="utf-8") as f:
            raw = json.load(f)
        return Marker(str(raw["backend"]), bool(raw.get("init", False)))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_marker(settings: Settings, marker: Marker) -> None:
    path = marker_path(settings)
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump({"backend": marker.backend, "init": marker.init}, f)
        os.replace(path + ".tmp", path)
    except OSError as exc:
        log.warning("cannot record the firewall backend in %s: %s", path, exc.strerror)


def other(name: str) -> BackendName:
    return "iptables" if name == "nftables" else "nftables"


def resolve_backend(settings: Settings, runtime: Runtime) -> BackendName:
    """The backend an event uses, moving this package's state there first if the configuration changed.

    A broken netvm.conf says nothing about the backend: the event then uses
    the one that holds the state, so an offline still finds its elements.
    """
    from ..kernel.firewall_backend import choose_backend

    marker = read_marker(settings)
    if marker is not None and settings.conf_error is not None:
        return "iptables" if marker.backend == "iptables" else "nftables"
    chosen = choose_backend(settings.backend_choice, settings.path)
    if marker is None:
        write_marker(settings, Marker(chosen))
    elif marker.backend != chosen:
        log.warning("firewall backend changed from %s to %s: moving this package's state", marker.backend, chosen)
        switch(settings, runtime, chosen, marker)
    return chosen


def switch(settings: Settings, runtime: Runtime, chosen: BackendName, marker: Marker) -> None:
    """Install the state in ``chosen``, then remove it from the other backend."""
    if marker.init:
        from .init import initialize

        initialize(settings, runtime, chosen)
        return
    from .reconcile import reconcile

    xs = runtime.xenstore(settings)
    try:
        host = runtime.host(settings, chosen)
        host.record_connected(None)  # compared in full: the sets may be new
        reconcile(settings, host, xs, runtime.qubesdb(settings))
    finally:
        xs.close()
    former = runtime.host(settings, other(chosen))
    if former.firewall.owns_state():
        former.firewall.remove_all()
    former.record_connected(None)
    write_marker(settings, Marker(chosen))
