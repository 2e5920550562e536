"""Test-only fault injection: ``VIF_HOTPLUG_FAULT=[agent:]COMMAND:WHEN:INDEX``.

The reliability tests kill a process at a known point of an event to prove
that the next event, or ``reconcile``, repairs whatever it left. The spec
names the command (``online``, ``offline``, ``init``, ``reconcile``), ``before`` or
``after`` and the index of a step in the command's plan (as ``--dry-run``
numbers them from 0); with the ``agent:`` prefix only the resident agent
obeys it, without it only a process doing the work itself. The process
kills itself with SIGKILL there, as a crash or the OOM killer would: no
``finally`` runs, no lock is released but by the kernel.

This module is the only reader of that spec (it comes in through
:class:`~vif_hotplug.app.settings.Settings`, never from ``os.environ``).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

from ..core.model import Step
from .applier import StepHook


def fault_hook(spec: str | None, command: str, in_agent: bool) -> StepHook | None:
    """The applier hook that kills this process at ``spec``'s point, or ``None``."""
    if not spec:
        return None
    parts = spec.split(":")
    agent = parts[0] == "agent"
    if agent:
        parts = parts[1:]
    if len(parts) != 3 or agent != in_agent or parts[0] != command or parts[1] not in ("before", "after"):
        return None
    try:
        index = int(parts[2])
    except ValueError:
        return None
    when = parts[1]
    kill: Callable[[], None] = lambda: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731

    def hook(at: str, i: int, step: Step) -> None:
        if at == when and i == index:
            kill()

    return hook
