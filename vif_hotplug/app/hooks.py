"""User hooks: executables in a directory, run as ``hook command vif type [addr]``.

As in Qubes, a hook's failure is logged and otherwise ignored: hooks are the
administrator's extension point, not part of what makes a vif work.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time

from ..core.model import Hooks

log = logging.getLogger(__name__)

#: All hooks of one event together get this long; the rest are skipped.
HOOKS_BUDGET = 30.0


def hook_programs(directory: str) -> list[str]:
    """Executable regular files in ``directory``, in name order."""
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    out = []
    for name in names:
        path = os.path.join(directory, name)
        if name.startswith(".") or not os.path.isfile(path) or not os.access(path, os.X_OK):
            continue
        out.append(path)
    return out


def run_hooks(h: Hooks, budget: float = HOOKS_BUDGET) -> None:
    """Run every hook once per address (once without one for a VM without addresses),
    within ``budget`` seconds in all. Never raises.

    Output goes to /dev/null rather than a pipe: a hook that leaves a
    daemon behind would otherwise hold the pipe open and us with it.
    """
    deadline = time.monotonic() + budget
    for prog in hook_programs(h.directory):
        for addr in h.addresses or ("",):
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("%s: hooks took over %gs: %s %s and later ones skipped", h.dev, budget, prog, addr)
                return
            argv = [prog, h.command, h.dev, h.vif_type] + ([addr] if addr else [])
            try:
                code = subprocess.run(
                    argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    timeout=left,
                ).returncode
            except (OSError, subprocess.TimeoutExpired) as exc:
                log.warning("%s: hook %s %s failed: %s", h.dev, prog, addr, exc)
                continue
            if code != 0:
                log.warning("%s: hook %s %s exited %d", h.dev, prog, addr, code)
            else:
                log.info("%s: hook %s %s ok", h.dev, prog, addr)
