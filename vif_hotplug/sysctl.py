"""Sysctls of the caller's network namespace (``/proc/sys/net`` follows the opener's namespace)."""

from __future__ import annotations

import os

PROC_SYS = "/proc/sys"


def swap_sysctl(path: str, value: str) -> str | None:
    """Write ``value`` to ``path`` unless it is already there.

    Returns the previous value when it changed, ``None`` when nothing was
    written. Raises ``OSError`` (``FileNotFoundError`` when the key, or its
    device, does not exist).
    """
    with open(path, encoding="ascii") as f:
        old = f.read().strip()
    if old == value:
        return None
    with open(path, "w", encoding="ascii") as f:
        f.write(value)
    return old


def kernel_has_ipv6(proc_sys: str = PROC_SYS) -> bool:
    """``ipv6.disable=1`` (or a kernel without IPv6) removes ``net/ipv6`` from /proc/sys."""
    return os.path.isdir(os.path.join(proc_sys, "net", "ipv6"))
