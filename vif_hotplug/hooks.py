"""User hooks: executables in a directory, run as ``hook command vif type addr``.

As in Qubes, a hook's failure is logged and otherwise ignored: hooks are the
administrator's extension point, not part of what makes a vif work.
"""

from __future__ import annotations

import logging
import os
import subprocess

from .model import Hooks

log = logging.getLogger(__name__)

HOOK_TIMEOUT = 30.0


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


def run_hooks(h: Hooks) -> None:
    """Run every hook once per address. Never raises for a hook's failure."""
    for prog in hook_programs(h.directory):
        for addr in h.addresses:
            argv = [prog, h.command, h.dev, h.vif_type, addr]
            try:
                proc = subprocess.run(
                    argv, capture_output=True, text=True, timeout=HOOK_TIMEOUT, stdin=subprocess.DEVNULL
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                log.warning("%s: hook %s failed: %s", h.dev, prog, exc)
                continue
            if proc.returncode != 0:
                err = (proc.stderr.strip().splitlines() or [""])[-1]
                log.warning("%s: hook %s %s exited %d %s", h.dev, prog, addr, proc.returncode, err)
            else:
                log.info("%s: hook %s %s ok", h.dev, prog, addr)
