"""inotify through libc (no extra dependency): a wake-up hint for watchers, never trusted alone."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from types import TracebackType
from typing import Any

# linux/inotify.h
_IN_MODIFY = 0x002
_IN_ATTRIB = 0x004
_IN_CLOSE_WRITE = 0x008
_IN_MOVED_FROM = 0x040
_IN_MOVED_TO = 0x080
_IN_CREATE = 0x100
_IN_DELETE = 0x200
_IN_DELETE_SELF = 0x400
_IN_MOVE_SELF = 0x800
_WATCH_MASK = (
    _IN_MODIFY | _IN_ATTRIB | _IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE
    | _IN_DELETE_SELF | _IN_MOVE_SELF
)


class Inotify:
    """A one-shot inotify instance: used to wake up early, never trusted alone.

    Watches each file (which follows a symlink and sees in-place writes, also
    through ``ip netns exec``'s bind mount) and its directory and its target's
    directory (resolv.conf is usually replaced by a rename).
    """

    def __init__(self) -> None:
        self._libc: Any = ctypes.CDLL(None, use_errno=True)
        self._libc.inotify_add_watch.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
        fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self.fd: int = fd

    def watch(self, files: Sequence[str]) -> None:
        paths: list[str] = []
        for f in files:
            paths += [f, os.path.dirname(f) or ".", os.path.dirname(os.path.realpath(f))]
        for path in dict.fromkeys(paths):
            # Missing paths fail with ENOENT; the periodic re-read covers them.
            self._libc.inotify_add_watch(self.fd, os.fsencode(path), _WATCH_MASK)

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> Inotify:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
