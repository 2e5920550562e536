"""Logging for the commands: library modules only get loggers, entry points choose where lines go.

Lines go to journald/syslog through ``/dev/log`` when it exists and to
``/var/log/xen/xen-hotplug.log`` when that directory exists, as Xen's own
scripts do; a missing destination is skipped, never an error. The user sees
warnings and errors (everything with ``-v``) as ``PROG: VIF: message``.

A command talks to its caller's log through :class:`LogControl`: a one-shot
process writes to its own stderr (:class:`ProcessLogs`); the resident agent
streams the same lines back to the client that asked (:mod:`vif_hotplug.agent`).
"""

from __future__ import annotations

import contextvars
import logging
import logging.handlers
import os
import sys
from collections.abc import Callable
from typing import Protocol

XEN_LOG = "/var/log/xen/xen-hotplug.log"


class LogControl(Protocol):
    def verbose(self, level: int) -> None:
        """Show records from ``level`` up to the user (``-v``)."""
        ...

    def tag(self, tag: str) -> None:
        """Start every line with ``tag:`` (the vif) from now on."""
        ...


def own_or_warning(record: logging.LogRecord) -> bool:
    # Libraries' chatter (pyroute2 logs every netlink message at DEBUG) is
    # not what -v is for.
    return record.levelno >= logging.WARNING or record.name.startswith("vif_hotplug")


def tagged(tag: str | None, message: str) -> str:
    if tag and not message.startswith(f"{tag}:"):
        return f"{tag}: {message}"
    return message


#: The vif (or other tag) of the event this thread works on, for the system log.
current_tag: contextvars.ContextVar[str | None] = contextvars.ContextVar("vif_hotplug_tag", default=None)


class _TagFormatter(logging.Formatter):
    def __init__(self, fmt: str, tag: Callable[[], str | None]) -> None:
        super().__init__(fmt)
        self._tag = tag

    def format(self, record: logging.LogRecord) -> str:
        record.message_tagged = tagged(self._tag(), record.getMessage())
        return super().format(record)


def system_handlers(ident: str) -> list[logging.Handler]:
    """syslog and Xen's hotplug log, where they exist; INFO and up, tagged by :data:`current_tag`."""
    out: list[logging.Handler] = []
    if os.path.exists("/dev/log"):
        try:
            syslog = logging.handlers.SysLogHandler(address="/dev/log")
            syslog.setFormatter(_TagFormatter(f"{ident}[{os.getpid()}]: %(message_tagged)s", current_tag.get))
            out.append(syslog)
        except OSError:
            pass
    if os.path.isdir(os.path.dirname(XEN_LOG)):
        try:
            fileh = logging.FileHandler(XEN_LOG)
            fileh.setFormatter(_TagFormatter(f"%(asctime)s {ident}[{os.getpid()}]: %(message_tagged)s",
                                             current_tag.get))
            out.append(fileh)
        except OSError:
            pass
    for h in out:
        h.setLevel(logging.INFO)
        h.addFilter(own_or_warning)
    return out


class ProcessLogs:
    """:class:`LogControl` of a one-shot process: stderr plus the system logs."""

    def __init__(self, ident: str, verbose: bool = False) -> None:
        root = logging.getLogger()
        for h in list(root.handlers):
            root.removeHandler(h)
        root.setLevel(logging.DEBUG)
        self._stderr = logging.StreamHandler(sys.stderr)
        self._stderr.setLevel(logging.DEBUG if verbose else logging.WARNING)
        self._stderr.setFormatter(_TagFormatter(f"{ident}: %(message_tagged)s", current_tag.get))
        self._stderr.addFilter(own_or_warning)
        root.addHandler(self._stderr)
        for h in system_handlers(ident):
            root.addHandler(h)

    def verbose(self, level: int) -> None:
        self._stderr.setLevel(level)

    def tag(self, tag: str) -> None:
        current_tag.set(tag)
