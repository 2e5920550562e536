"""Stand-in for Qubes' ``qubesdb`` Python module, for tests only (never on the product's path).

Qubes' module (qubes-core-qubesdb ``python/qubesdb.c``) wraps the C client
library (``client/qdb-client.c``), which talks to the VM's qubesdb-daemon
over a Unix socket with the wire format of ``include/qubesdb.h``. This
module speaks that same format to the stand-in daemon of
``tests/qubesdb_daemon.py`` and keeps the library's rules, each cited:

* ``QubesDB()`` connects at once; failing, it raises ``Error`` from errno
  (``qdbhandle_init``: ``PyErr_SetFromErrno(qdb_error)``).
* ``read`` -> bytes or ``None`` when absent; ``multiread(prefix)`` -> {path:
  bytes}; ``list(prefix)`` -> paths; ``write``; ``rm`` (absent is fine);
  ``watch``/``unwatch``; ``read_watch`` -> the path that fired, blocking;
  ``watch_fd``; ``close``. Errors: ``DisconnectedError`` for EPIPE (the
  daemon went away), ``OSError`` for EINTR, ``Error`` (a RuntimeError) for
  the rest, errno in ``args[0]`` (``none()`` in qubesdb.c).
* Watch events that arrive while a call waits for its answer are kept
  inside the library, newest first, and returned by the next ``read_watch``
  before anything is read from the socket; they do NOT make ``watch_fd``
  readable (``get_response`` reads them off the socket into
  ``watch_list``; ``qdb_read_watch`` pops that list first).
* ``read_watch`` with nothing queued reads one header from the socket:
  EOF is EPIPE, a socket set non-blocking with nothing there is EAGAIN
  (``qdb_read_watch``), anything but a watch event is a broken protocol
  (an ``assert`` there: the real library aborts the process).
* After the daemon closed the connection, the next call reconnects
  silently but does NOT register the watches again (``send_command_to_daemon``
  and ``qdb_watch_fd``: "FIXME: register watches again").
* One connection carries one request and its answer at a time: there is no
  locking in the library, and two calls at once mix their answers. Here a
  call made while another is in progress on the same connection fails,
  makes the other fail too, and poisons the connection ("corrupted"); each
  such violation is recorded (:data:`VIOLATIONS`, and a line in the file
  ``<socket>.violations`` for a test to read from another process).
* Strict mode (``QUBESDB_STANDIN_STRICT=1`` in this process's environment,
  or :data:`STRICT`): a call made from a thread where SIGTERM is not
  blocked is a violation too. An interrupted call corrupts the protocol
  state (EINTR half-way through an answer), which is why Qubes' own
  firewall service blocks its signals around every call.

The daemon's socket: ``QUBESDB_STANDIN_SOCKET`` in this process's
environment, or :data:`SOCKET` (the real one is fixed,
``/var/run/qubes/qubesdb.sock``, ``QDB_DAEMON_LOCAL_PATH``).
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import struct
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

SOCKET = os.environ.get("QUBESDB_STANDIN_SOCKET", "/var/run/qubes/qubesdb.sock")
STRICT = os.environ.get("QUBESDB_STANDIN_STRICT") == "1"
VIOLATIONS: list[str] = []

# include/qubesdb.h: enum qdb_msg, QDB_MAX_DATA, QDB_MAX_PATH, struct qdb_hdr
# (uint8_t type; char path[64]; uint32_t data_len: 72 bytes with its padding).
(CMD_READ, CMD_WRITE, CMD_MULTIREAD, CMD_LIST, CMD_RM, CMD_WATCH, CMD_UNWATCH, RESP_OK, RESP_ERROR_NOENT,
 RESP_ERROR, RESP_READ, RESP_MULTIREAD, RESP_LIST, RESP_WATCH) = range(14)
MAX_DATA = 3072
MAX_PATH = 64
HDR = struct.Struct("=B64s3xI")
T = TypeVar("T")


class Error(RuntimeError):
    """qubesdb.Error: a RuntimeError, errno in args[0]."""


class DisconnectedError(Error):
    """qubesdb.DisconnectedError: the connection to the daemon broke (EPIPE)."""


def _error(code: int, what: str = "") -> Error:
    return Error(code, what or os.strerror(code))


def _violation(message: str) -> None:
    VIOLATIONS.append(message)
    print(f"qubesdb stand-in: VIOLATION: {message}", file=sys.stderr, flush=True)
    try:
        with open(SOCKET + ".violations", "a") as f:
            f.write(message + "\n")
    except OSError:
        pass


def _pack(kind: int, path: str, data_len: int = 0) -> bytes:
    return HDR.pack(kind, path.encode(), data_len)


def _unpack(raw: bytes) -> tuple[int, str, int]:
    kind, path, data_len = HDR.unpack(raw)
    return kind, path.split(b"\0", 1)[0].decode(), data_len


def _check_path(path: str) -> None:
    # parse_handle_path (qubesdb.c): no NUL; verify_path (qdb-client.c): '/' first, shorter than QDB_MAX_PATH.
    if not isinstance(path, str):
        raise TypeError("path must be str")
    if "\0" in path:
        raise TypeError("null byte in path")
    if not path.startswith("/") or len(path.encode()) >= MAX_PATH:
        raise _error(errno.EINVAL)


class QubesDB:
    """One connection to the daemon (qdb_open)."""

    def __init__(self, vmname: str | None = None) -> None:
        if vmname is not None:
            raise _error(errno.ENOENT, "the stand-in serves the local daemon only")
        self._sock: socket.socket | None = None
        self._connected = False
        self._closed = False
        self._queue: list[str] = []
        self._busy = threading.Lock()
        self._corrupt: str | None = None
        code = self._connect()
        if code:
            raise _error(code)
        self._connected = True

    # --- the library's plumbing (qdb-client.c) -------------------------------------------------

    def _connect(self) -> int:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(SOCKET)
        except OSError as exc:
            sock.close()
            return exc.errno or errno.EIO
        self._sock = sock
        return 0

    def _send(self, kind: int, path: str, data: bytes = b"") -> None:
        """send_command_to_daemon: reconnect when the last answer saw EOF, or once on EPIPE; never re-watch."""
        if not self._connected:
            if self._connect():
                raise DisconnectedError("QubesDB disconnected")
            self._connected = True
        assert self._sock is not None
        message = _pack(kind, path, len(data)) + data
        try:
            self._sock.sendall(message)
        except BrokenPipeError:
            self._sock.close()
            if self._connect():
                self._connected = False
                raise DisconnectedError("QubesDB disconnected") from None
            self._sock.sendall(message)
        except OSError as exc:
            raise _error(exc.errno or errno.EIO) from None

    def _recv(self, size: int) -> bytes:
        assert self._sock is not None
        try:
            return self._sock.recv(size)
        except BlockingIOError:
            raise _error(errno.EAGAIN) from None
        except OSError as exc:
            raise _error(exc.errno or errno.EIO) from None

    def _response(self) -> tuple[int, str, int]:
        """get_response: watch events before the answer go to the front of the internal list."""
        while True:
            raw = self._recv(HDR.size)
            if not raw:
                self._connected = False
                assert self._sock is not None
                self._sock.close()
                raise DisconnectedError("QubesDB disconnected")
            if len(raw) < HDR.size:
                raise _error(errno.EIO, "partial header")
            kind, path, data_len = _unpack(raw)
            if kind != RESP_WATCH:
                return kind, path, data_len
            self._queue.insert(0, path)

    def _data(self, size: int) -> bytes:
        out = b""
        while len(out) < size:
            chunk = self._recv(size - len(out))
            if not chunk:
                raise _error(errno.EIO, "connection closed in the middle of a value")
            out += chunk
        return out

    # --- one call at a time ----------------------------------------------------------------------

    def _enter(self, name: str) -> None:
        if self._closed:
            raise _error(errno.EINVAL)  # qdbhandle(): the handle was closed
        if not self._busy.acquire(blocking=False):
            self._corrupt = f"{name}() called while another call was in progress on the same connection"
            _violation(self._corrupt)
            raise _error(errno.EPROTO, f"stand-in: {self._corrupt}")
        if STRICT and signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, []):
            self._corrupt = f"{name}() called from a thread with SIGTERM unblocked (it can interrupt the call)"
            _violation(self._corrupt)
            self._busy.release()
            raise _error(errno.EPROTO, f"stand-in: {self._corrupt}")
        if self._corrupt is not None:
            self._busy.release()
            raise _error(errno.EPROTO, f"stand-in: connection corrupted: {self._corrupt}")

    def _leave(self) -> None:
        corrupt = self._corrupt
        self._busy.release()
        if corrupt is not None:
            raise _error(errno.EPROTO, f"stand-in: connection corrupted: {corrupt}")

    def _call(self, name: str, fn: Callable[[], T]) -> T:
        self._enter(name)
        try:
            result = fn()
        except BaseException:
            self._busy.release()
            raise
        self._leave()
        return result

    # --- the API (qubesdb.c) ------------------------------------------------------------------------

    def read(self, path: str) -> bytes | None:
        _check_path(path)

        def run() -> bytes | None:
            self._send(CMD_READ, path)
            kind, _, size = self._response()
            if kind == RESP_ERROR_NOENT:
                return None
            if kind != RESP_READ:
                raise _error(errno.EIO)
            return self._data(size)

        return self._call("read", run)

    def multiread(self, path: str) -> dict[str, bytes]:
        _check_path(path)

        def run() -> dict[str, bytes]:
            self._send(CMD_MULTIREAD, path)
            out: dict[str, bytes] = {}
            while True:
                kind, key, size = self._response()
                if kind != RESP_MULTIREAD:
                    raise _error(errno.EIO)
                if not key:
                    return out
                out[key] = self._data(size)

        return self._call("multiread", run)

    def list(self, path: str) -> list[str]:
        _check_path(path)

        def run() -> list[str]:
            self._send(CMD_LIST, path)
            out: list[str] = []
            while True:
                kind, key, _ = self._response()
                if kind != RESP_LIST:
                    raise _error(errno.EIO)
                if not key:
                    return out
                out.append(key)

        return self._call("list", run)

    def write(self, path: str, value: str | bytes) -> None:
        _check_path(path)
        data = value.encode() if isinstance(value, str) else bytes(value)

        def run() -> None:
            if len(data) > MAX_DATA:
                raise _error(errno.EINVAL)
            self._send(CMD_WRITE, path, data)
            kind, _, _ = self._response()
            if kind != RESP_OK:
                raise _error(errno.EIO)

        self._call("write", run)

    def _simple(self, name: str, kind: int, path: str) -> None:
        _check_path(path)

        def run() -> None:
            self._send(kind, path)
            answer, _, _ = self._response()
            # qdb__simple_cmd: NOENT is success.
            if answer not in (RESP_OK, RESP_ERROR_NOENT):
                raise _error(errno.EIO)

        self._call(name, run)

    def rm(self, path: str) -> None:
        self._simple("rm", CMD_RM, path)

    def watch(self, path: str) -> None:
        self._simple("watch", CMD_WATCH, path)

    def unwatch(self, path: str) -> None:
        self._simple("unwatch", CMD_UNWATCH, path)

    def read_watch(self) -> str:
        def run() -> str:
            if self._queue:
                return self._queue.pop(0)
            raw = self._recv(HDR.size)
            if not raw:
                raise DisconnectedError("QubesDB disconnected")
            if len(raw) < HDR.size:
                raise _error(errno.EIO, "partial header")
            kind, path, _ = _unpack(raw)
            if kind != RESP_WATCH:
                # qdb_read_watch asserts: the real library aborts the whole process here.
                self._corrupt = f"read_watch() read an answer of type {kind}, not a watch event"
                _violation(self._corrupt)
                raise _error(errno.EPROTO, f"stand-in: {self._corrupt}")
            return path

        return self._call("read_watch", run)

    def watch_fd(self) -> int:
        if self._closed:
            raise _error(errno.EINVAL)
        if not self._connected:
            if self._connect():
                raise DisconnectedError("QubesDB disconnected")
            self._connected = True
        assert self._sock is not None
        return self._sock.fileno()

    def close(self) -> None:
        if self._closed:
            raise _error(errno.EINVAL)
        self._closed = True
        if self._connected and self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
        self._queue.clear()
