"""The upstream nameservers the DNS rules were last pointed at, remembered for ``online``'s checks.

A VM must not be given the address of one of the netvm's upstream
resolvers (its DNS queries through DNS1/DNS2 would come back to it, and
the netvm's own lookups would be routed to it). Reading the upstreams as
the DNS tool does can start a process (``busctl``); an event reads this
record instead, which the DNS tool and ``init`` write whenever they apply
the DNS rules. Per network namespace (:mod:`vif_hotplug.kernel.state_files`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from ipaddress import IPv4Address

from ..kernel.state_files import atomic_write, state_file
from .settings import Settings

log = logging.getLogger(__name__)


def record_upstreams(settings: Settings, servers: Sequence[IPv4Address]) -> None:
    """Remember ``servers`` (never fails the caller: the rules are what matters)."""
    path = state_file(settings.state_dir, "upstreams")
    try:
        atomic_write(path, json.dumps([str(a) for a in servers]))
    except OSError as exc:
        log.debug("cannot record the upstream nameservers in %s: %s", path, exc.strerror)


def read_recorded_upstreams(settings: Settings) -> list[str]:
    """The servers last recorded here (none when nothing was recorded)."""
    try:
        with open(state_file(settings.state_dir, "upstreams"), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return []
    return [str(a) for a in data] if isinstance(data, list) else []
