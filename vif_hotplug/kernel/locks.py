"""File locks with a deadline, shared by every process that edits shared state."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Iterator

from ..core.errors import KernelError


@contextlib.contextmanager
def file_lock(path: str, timeout: float, what: str = "lock") -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path``, waiting up to ``timeout`` seconds.

    ``flock`` is released by the kernel when the process dies, so a crashed
    holder never wedges later hotplug runs. Raises ``KernelError`` on timeout.
    """
    try:
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise KernelError(f"cannot open {what} {path}: {exc.strerror}") from exc
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                    raise KernelError(f"{what} {path} still busy after {timeout:g}s") from exc
                time.sleep(0.005)
        yield
    finally:
        os.close(fd)
