"""Waiting for something another process or thread makes true, with a deadline."""

from __future__ import annotations

import time
from collections.abc import Callable


def eventually(check: Callable[[], bool], seconds: float, interval: float = 0.05) -> bool:
    """Whether ``check`` holds within ``seconds`` (asked once more at the deadline)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(interval)
    return check()
