"""File locks with a deadline, shared by every process that edits shared state."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
import time
from collections.abc import Iterator

from ..core.errors import KernelError

#: Threads of one process (the agent's lanes) queue on a lock of their own
#: before the file lock, which has no waiting list: only one of them polls it.
_THREAD_LOCKS: dict[str, threading.Lock] = {}
_REGISTRY = threading.Lock()


def _forget_in_child() -> None:
    # A forked child has only the thread that forked: locks other threads held are not its.
    global _REGISTRY
    _THREAD_LOCKS.clear()
    _REGISTRY = threading.Lock()


os.register_at_fork(after_in_child=_forget_in_child)


def _thread_lock(path: str) -> threading.Lock:
    with _REGISTRY:
        lock = _THREAD_LOCKS.get(path)
        if lock is None:
            lock = _THREAD_LOCKS[path] = threading.Lock()
        return lock


@contextlib.contextmanager
def file_lock(path: str, timeout: float, what: str = "lock") -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path``, waiting up to ``timeout`` seconds.

    ``flock`` is released by the kernel when the process dies, so a crashed
    holder never wedges later hotplug runs. Raises ``KernelError`` on timeout.
    """
    deadline = time.monotonic() + timeout
    local = _thread_lock(path)
    if not local.acquire(timeout=max(timeout, 0.0)):
        raise KernelError(f"{what} {path} still busy after {timeout:g}s")
    try:
        try:
            os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
            fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise KernelError(f"cannot open {what} {path}: {exc.strerror}") from exc
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                        raise KernelError(f"{what} {path} still busy after {timeout:g}s") from exc
                    time.sleep(0.002)
            yield
        finally:
            os.close(fd)
    finally:
        local.release()
