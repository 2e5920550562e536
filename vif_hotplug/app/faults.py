"""Test-only fault injection: kill this process at a chosen step of a command.

The reliability tests kill a process at a known point of an event to prove
that the next event, or ``reconcile``, repairs whatever it left. Nothing a
caller sends can ask for it: the only trigger is :data:`FAULT_FILE`, at a
fixed path, which the test suite creates as root (a file that is not a
regular file owned by root and writable by root alone is ignored). It holds
JSON objects, one per line::

    {"state_dir": "/tmp/x/state", "command": "online", "when": "before", "index": 3, "where": "agent"}

``state_dir`` scopes the fault to the netvm whose settings name that state
directory (tests run many netvms side by side), ``command`` is ``online``,
``offline``, ``init`` or ``reconcile``, ``when`` ``before`` or ``after`` the
step with that index (as ``--dry-run`` numbers them from 0; ``reconcile``
numbers every step of its run in order), ``where`` ``agent`` (only the
resident agent obeys) or ``local`` (only a process doing the work itself).
The process kills itself with SIGKILL there, as a crash or the OOM killer
would: no ``finally`` runs, no lock is released but by the kernel.

Without the file (every production system) this costs one ``stat`` per command.
"""

from __future__ import annotations

import json
import os
import signal
import stat
from typing import TYPE_CHECKING

from ..core.handlers import StepHook
from ..core.model import Step
from .settings import Settings

if TYPE_CHECKING:
    from .runtime import Runtime

FAULT_FILE = "/run/vif-hotplug-faults.json"


def _trusted_lines(path: str) -> list[str]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return []
    with os.fdopen(fd, encoding="utf-8", errors="replace") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
            return []
        return f.read(65536).splitlines()


def fault_hook(settings: Settings, command: str, runtime: Runtime, path: str = FAULT_FILE) -> StepHook | None:
    """The applier hook that kills this process where the fault file says, or ``None``."""
    where = runtime.role
    for line in _trusted_lines(path):
        try:
            spec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(spec, dict):
            continue
        if (spec.get("state_dir") != settings.state_dir or spec.get("command") != command
                or spec.get("where", "local") != where or spec.get("when") not in ("before", "after")
                or not isinstance(spec.get("index"), int)):
            continue
        return _killer(str(spec["when"]), int(spec["index"]))
    return None


def _killer(when: str, index: int) -> StepHook:
    def hook(at: str, i: int, step: Step) -> None:
        if at == when and i == index:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook
