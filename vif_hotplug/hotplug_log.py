"""Logging set-up for the entry points (library modules only get loggers).

Lines go to journald/syslog through ``/dev/log`` when it exists and to
``/var/log/xen/xen-hotplug.log`` when that directory exists, as Xen's own
scripts do; a missing destination is skipped, never an error. stderr gets
warnings and errors (everything with ``-v``).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys

XEN_LOG = "/var/log/xen/xen-hotplug.log"


def configure(ident: str, verbose: bool = False) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)

    stderr = logging.StreamHandler(sys.stderr)
    stderr.setLevel(logging.DEBUG if verbose else logging.WARNING)
    stderr.setFormatter(logging.Formatter(f"{ident}: %(message)s"))
    root.addHandler(stderr)

    if os.path.exists("/dev/log"):
        try:
            syslog = logging.handlers.SysLogHandler(address="/dev/log")
            syslog.setFormatter(logging.Formatter(f"{ident}[{os.getpid()}]: %(message)s"))
            syslog.setLevel(logging.INFO)
            root.addHandler(syslog)
        except OSError:
            pass
    if os.path.isdir(os.path.dirname(XEN_LOG)):
        try:
            fileh = logging.FileHandler(XEN_LOG)
            fileh.setFormatter(logging.Formatter(f"%(asctime)s {ident}[{os.getpid()}]: %(message)s"))
            fileh.setLevel(logging.INFO)
            root.addHandler(fileh)
        except OSError:
            pass
    for handler in root.handlers:
        handler.addFilter(_own_or_warning)


def _own_or_warning(record: logging.LogRecord) -> bool:
    # Libraries' chatter (pyroute2 logs every netlink message at DEBUG and
    # resets its logger's level when imported) is not what -v is for.
    return record.levelno >= logging.WARNING or record.name.startswith("vif_hotplug")


class _Tag(logging.Filter):
    def __init__(self, tag: str) -> None:
        super().__init__()
        self._tag = tag

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if not msg.startswith(f"{self._tag}:"):
            record.msg, record.args = f"{self._tag}: {msg}", None
        return True


def tag_lines(tag: str) -> None:
    """Make every line the configured handlers emit start with ``tag:`` (the vif)."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(_Tag(tag))


def set_stderr_level(level: int) -> None:
    """Show records from ``level`` up on stderr (``-v`` decided after :func:`configure`)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) is sys.stderr:
            handler.setLevel(level)
    logging.getLogger().setLevel(min(logging.getLogger().level, level))
