"""Stopping long-running commands cleanly on SIGTERM and SIGINT."""

from __future__ import annotations

import os
import signal
from types import FrameType, TracebackType
from typing import Any


class StopOnSignal:
    """SIGTERM/SIGINT set :attr:`requested` and make :attr:`fd` readable; the current work finishes first.

    The one way this package's long-running commands (``--watch``, the
    agent, the embedded xenstored) stop: a ``select``/``poll`` on ``fd`` wakes
    at once, and a loop checks :attr:`requested`.
    """

    _SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self.fd, self._wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        try:
            os.write(self._wfd, b"x")
        except BlockingIOError:
            pass

    def __enter__(self) -> StopOnSignal:
        for sig in self._SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        os.close(self.fd)
        os.close(self._wfd)
