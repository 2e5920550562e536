"""User hooks: executables in a directory, run as ``hook command vif type [addr]``.

As in Qubes, a hook's failure is logged and otherwise ignored: hooks are the
administrator's extension point, not part of what makes a vif work.
"""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import time

from ..core.model import Hooks
from .settings import DEFAULT_PATH

log = logging.getLogger(__name__)

#: All hooks of one event together get this long; the rest are skipped.
HOOKS_BUDGET = 30.0


def _trusted(st: os.stat_result) -> bool:
    # Root's alone: a hook runs as root, so whoever may change it or put one
    # beside it may run anything as root.
    return st.st_uid == 0 and not st.st_mode & 0o022


def hook_programs(directory: str) -> list[str]:
    """Executable regular files in ``directory``, in name order, that only root can change.

    The directory itself must be owned by root and writable by root alone;
    so must each hook. A symlink counts as the file it points to (which must
    pass the same test); one to anything else is skipped. Everything skipped
    is named in a warning.
    """
    try:
        st = os.stat(directory)
    except OSError:
        return []
    if not stat.S_ISDIR(st.st_mode) or not _trusted(st):
        log.warning("hooks directory %s skipped: not a directory owned and writable by root alone", directory)
        return []
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    out = []
    for name in names:
        path = os.path.join(directory, name)
        if name.startswith("."):
            continue
        try:
            target = os.stat(path)  # a symlink's target
        except OSError:
            continue
        if not stat.S_ISREG(target.st_mode) or not target.st_mode & 0o111:
            continue
        if not _trusted(target):
            log.warning("hook %s skipped: not owned and writable by root alone", path)
            continue
        out.append(path)
    return out


#: What every hook gets, however the event ran (in the agent or in a process of the toolstack's).
HOOK_ENV = {"PATH": DEFAULT_PATH, "LC_ALL": "C"}


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
                    timeout=left, env={**HOOK_ENV, "vif": h.dev, **dict(h.environment)}, cwd="/",
                ).returncode
            except (OSError, subprocess.TimeoutExpired) as exc:
                log.warning("%s: hook %s %s failed: %s", h.dev, prog, addr, exc)
                continue
            if code != 0:
                log.warning("%s: hook %s %s exited %d", h.dev, prog, addr, code)
            else:
                log.info("%s: hook %s %s ok", h.dev, prog, addr)
