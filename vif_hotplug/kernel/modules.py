"""Kernel modules a netvm needs: ``xen-netback`` makes the vifs.

Qubes' network-proxy-setup.sh loads it before networking starts; a driver
domain whose kernel has it as a module that nothing loaded yet would create
no vif at all. Built in, already loaded, or not in this kernel at all (a
machine without Xen, as here): nothing to do.
"""

from __future__ import annotations

import os
import subprocess
from typing import Literal

from ..core.errors import KernelError

ModuleState = Literal["loaded", "loadable", "absent"]
MODPROBE_TIMEOUT = 10.0


def module_state(name: str, sys_module: str = "/sys/module", modules_root: str = "/lib/modules",
                 release: str | None = None) -> ModuleState:
    """``loaded`` (or built in: both appear under /sys/module), ``loadable`` (listed in modules.dep
    of the running kernel), else ``absent``."""
    if os.path.isdir(os.path.join(sys_module, name.replace("-", "_"))):
        return "loaded"
    release = release or os.uname().release
    wanted = {f"{name}.ko", f"{name.replace('-', '_')}.ko"}
    try:
        with open(os.path.join(modules_root, release, "modules.builtin"), encoding="utf-8", errors="replace") as f:
            if any(os.path.basename(line.strip()) in wanted for line in f):
                return "loaded"
    except OSError:
        pass
    try:
        with open(os.path.join(modules_root, release, "modules.dep"), encoding="utf-8", errors="replace") as f:
            for line in f:
                module = os.path.basename(line.partition(":")[0])
                if module.split(".ko")[0] + ".ko" in wanted:
                    return "loadable"
    except OSError:
        pass
    return "absent"


def load_module(name: str, modprobe: str | None) -> None:
    """``modprobe NAME``. Raises ``KernelError`` with modprobe's own words."""
    if modprobe is None:
        raise KernelError(f"cannot load kernel module {name}: no modprobe (Debian package kmod)")
    try:
        proc = subprocess.run([modprobe, "--", name], capture_output=True, text=True, timeout=MODPROBE_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KernelError(f"cannot load kernel module {name}: {exc}") from None
    if proc.returncode != 0:
        first = (proc.stderr.strip().splitlines() or [f"modprobe exited {proc.returncode}"])[0]
        raise KernelError(f"cannot load kernel module {name}: {first}")
