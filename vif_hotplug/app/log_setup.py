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
    """``message`` with every line starting ``tag:`` (a plan is logged as one multi-line record)."""
    if not tag:
        return message
    return "\n".join(line if line.startswith(f"{tag}:") else f"{tag}: {line}" for line in message.split("\n"))


#: The vif (or other tag) of the event this thread works on, for the system log.
current_tag: contextvars.ContextVar[str | None] = contextvars.ContextVar("vif_hotplug_tag", default=None)
#: The tool whose command this thread runs (the resident agent serves them all): the
#: identifier its system log lines carry, so ``journalctl -t vif-route-qubes`` finds them.
current_ident: contextvars.ContextVar[str | None] = contextvars.ContextVar("vif_hotplug_ident", default=None)


class _TagFormatter(logging.Formatter):
    """Every line of a record starts with the program, and the tag when there is one."""

    def __init__(self, prefix: str, tag: Callable[[], str | None], timestamp: bool = False) -> None:
        super().__init__()
        self._prefix = prefix
        self._tag = tag
        self._timestamp = timestamp

    def prefix(self) -> str:
        return self._prefix

    def format(self, record: logging.LogRecord) -> str:
        prefix = self.prefix()
        prefix = f"{self.formatTime(record)} {prefix}" if self._timestamp else prefix
        return "\n".join(prefix + line for line in tagged(self._tag(), record.getMessage()).split("\n"))


class _SystemFormatter(_TagFormatter):
    """``IDENT[PID]: `` as syslog wants it, the identifier of the tool this thread serves."""

    def __init__(self, ident: str, timestamp: bool = False) -> None:
        super().__init__(ident, current_tag.get, timestamp)
        self._ident = ident

    def prefix(self) -> str:
        return f"{current_ident.get() or self._ident}[{os.getpid()}]: "


def stderr_is_the_journal() -> bool:
    """Whether stderr is systemd's journal stream (``JOURNAL_STREAM``, systemd.exec(5)): then every
    line written there is in the journal already, beside the one sent to ``/dev/log``."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = stream.partition(":")
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return bool(stream) and dev == str(st.st_dev) and ino == str(st.st_ino)


def system_handlers(ident: str) -> list[logging.Handler]:
    """syslog and Xen's hotplug log, where they exist; INFO and up, tagged by :data:`current_tag`."""
    out: list[logging.Handler] = []
    if os.path.exists("/dev/log"):
        try:
            syslog = logging.handlers.SysLogHandler(address="/dev/log")
            syslog.setFormatter(_SystemFormatter(ident))
            out.append(syslog)
        except OSError:
            pass
    if os.path.isdir(os.path.dirname(XEN_LOG)):
        try:
            fileh = logging.FileHandler(XEN_LOG)
            fileh.setFormatter(_SystemFormatter(ident, timestamp=True))
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
        self._stderr.setFormatter(_TagFormatter(f"{ident}: ", current_tag.get))
        self._stderr.addFilter(own_or_warning)
        if not stderr_is_the_journal():
            # Under systemd the system log has these lines already: not twice.
            root.addHandler(self._stderr)
        for h in system_handlers(ident):
            root.addHandler(h)

    def verbose(self, level: int) -> None:
        self._stderr.setLevel(level)

    def tag(self, tag: str) -> None:
        current_tag.set(tag)
