"""Sysctls of the caller's network namespace (``/proc/sys/net`` follows the opener's namespace)."""

from __future__ import annotations


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
