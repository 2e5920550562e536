"""QubesDB, read through ``qubesdb-read`` when this domain has it (a Qubes VM)."""

from __future__ import annotations

import subprocess

from ..core.netvm_params import Reader

TIMEOUT = 5.0


def qubesdb_reader(exe: str | None) -> Reader | None:
    """A reader of QubesDB keys through ``exe`` (``qubesdb-read``), or ``None`` without it.

    A key that cannot be read (absent, or QubesDB down) reads as ``None``.
    """
    if exe is None:
        return None
    path = exe

    def read(key: str) -> str | None:
        try:
            proc = subprocess.run([path, "--", key], capture_output=True, text=True, timeout=TIMEOUT)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout.rstrip("\n") if proc.returncode == 0 else None

    return read
