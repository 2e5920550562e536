"""Which firewall backend holds this package's state in this network namespace, read without side effects.

A small marker file per network namespace in the state directory records
the backend that holds the state and whether ``init`` installed the base
firewall (:mod:`vif_hotplug.kernel.state_files` names it so that it can
only ever describe the namespace it was made in). :func:`resolve` reads it
beside the backend the settings choose and returns both as plain data; it
never writes. Moving the state when they differ is a use case of its own
(:mod:`vif_hotplug.app.switch`), run only by commands that change things.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from ..kernel.firewall_backend import BackendName, choose_backend
from ..kernel.state_files import atomic_write, state_file
from .settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Marker:
    backend: BackendName
    init: bool = False


@dataclass(frozen=True, slots=True)
class BackendView:
    """The configured backend beside the one holding the state, as one command found them."""

    #: What the settings choose (``None``: netvm.conf is broken and says nothing).
    configured: BackendName | None
    #: What the marker says holds the state (``None``: no marker yet).
    marker: Marker | None

    @property
    def in_use(self) -> BackendName:
        """The backend to look at and work in until a switch has run: the one holding the state."""
        if self.marker is not None:
            return self.marker.backend
        return self.configured or "nftables"

    @property
    def target(self) -> BackendName:
        """The backend a changing command works in (after a switch, if one is pending)."""
        return self.configured or self.in_use

    @property
    def pending(self) -> bool:
        """The configuration asks for another backend than the one holding the state."""
        return self.marker is not None and self.configured is not None and self.configured != self.marker.backend

    @property
    def init(self) -> bool:
        return self.marker is not None and self.marker.init


def marker_path(settings: Settings) -> str:
    return state_file(settings.state_dir, "backend")


def read_marker(settings: Settings) -> Marker | None:
    try:
        with open(marker_path(settings), encoding="utf-8") as f:
            raw = json.load(f)
        backend: BackendName = "iptables" if raw["backend"] == "iptables" else "nftables"
        return Marker(backend, bool(raw.get("init", False)))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_marker(settings: Settings, marker: Marker) -> None:
    path = marker_path(settings)
    try:
        atomic_write(path, json.dumps({"backend": marker.backend, "init": marker.init}))
    except OSError as exc:
        log.warning("cannot record the firewall backend in %s: %s", path, exc.strerror)


def note_in_use(settings: Settings, backend: BackendName) -> None:
    """A changing command changed state in ``backend``: record it when nothing recorded a backend yet."""
    if read_marker(settings) is None:
        write_marker(settings, Marker(backend))


def resolve(settings: Settings) -> BackendView:
    """The backends as plain data. Reads the marker and the host's ``iptables``; changes nothing.

    A broken netvm.conf says nothing about the backend: commands then use
    the one that holds the state, so an offline still finds its elements.
    """
    marker = read_marker(settings)
    configured = None if settings.conf_error is not None else choose_backend(settings.backend_choice, settings.path)
    view = BackendView(configured, marker)
    log.debug("firewall backend: %s (configured: %s, holding the state: %s)", view.target,
              settings.backend_choice, marker.backend if marker else "none recorded")
    return view


def other(name: BackendName) -> BackendName:
    return "iptables" if name == "nftables" else "nftables"
