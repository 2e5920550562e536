"""A stand-in qubesdb-daemon for tests and benchmarks: the real one needs Qubes' dom0 on a vchan.

It serves the local-socket protocol of qubes-core-qubesdb (``include/qubesdb.h``
message types, ``daemon/db-cmds.c`` handlers, ``daemon/db-core.c`` database
and watches) to the stand-in module ``tests/standin_qubesdb/qubesdb.py``
(and to its fake ``qubesdb-read``). What it keeps of the real daemon:

* one request is handled at a time, whole (the daemon is a single-threaded
  select loop): a watch event never lands inside another answer;
* paths: '/' first, shorter than 64 bytes, only ``[A-Za-z0-9_-/.:@]``
  (``verify_path``); a value has no NUL and fewer than 3072 bytes; a
  written path does not end with '/' (``qubesdb_insert``);
* ``multiread`` and ``list`` match a plain string prefix, in path order;
  ``rm`` of a path ending with '/' removes everything under it;
* a watch on a path ending with '/' matches every path below it, otherwise
  the exact path (``qubesdb_add_watch``: ``cmp_len``); each matching watch
  fires once per write or rm, after the answer to the request that made it
  (``handle_write``/``handle_rm``), with the path written or removed, to
  every client that holds it; a client's watches end with its connection
  (``handle_client_disconnect``);
* what dom0 writes arrives over the vchan: :meth:`write`/:meth:`rm` here,
  firing the same watches.

Test controls: :meth:`stop` (every client sees its connection closed) and
:meth:`start` again (:meth:`restart`: the same database, no watches);
:attr:`hang` (requests are read and never answered); :attr:`delay` (seconds
before each answer, so that calls of several threads would overlap);
:attr:`on_request` (called with each request's type and path before it is
handled: a test changes keys there, so a watch event reaches the client
while it waits for an answer); :attr:`client_changes` (writes and removals
made by clients, to prove a command changed nothing).

``python3 tests/qubesdb_daemon.py --socket PATH KEY=VALUE...`` serves until SIGTERM.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

STANDIN_DIR = Path(__file__).resolve().parent / "standin_qubesdb"

(CMD_READ, CMD_WRITE, CMD_MULTIREAD, CMD_LIST, CMD_RM, CMD_WATCH, CMD_UNWATCH, RESP_OK, RESP_ERROR_NOENT,
 RESP_ERROR, RESP_READ, RESP_MULTIREAD, RESP_LIST, RESP_WATCH) = range(14)
MAX_DATA = 3072
MAX_PATH = 64
HDR = struct.Struct("=B64s3xI")
_PATH_CHARS = re.compile(r"[A-Za-z0-9_\-/.:@]*")


def _hdr(kind: int, path: str, data_len: int = 0) -> bytes:
    return HDR.pack(kind, path.encode(), data_len)


def valid_path(path: str) -> bool:
    return path.startswith("/") and len(path.encode()) < MAX_PATH and _PATH_CHARS.fullmatch(path) is not None


class _Client:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.send_lock = threading.Lock()

    def send(self, data: bytes) -> None:
        with self.send_lock:
            try:
                self.sock.sendall(data)
            except OSError:
                pass  # the client went away; its handler thread ends on its own


class StandinQubesDB:
    """A qubesdb-daemon on ``path``, in threads of this process."""

    def __init__(self, path: str, entries: dict[str, str | bytes] | None = None) -> None:
        self.path = path
        self.entries: dict[str, bytes] = {}
        self._lock = threading.RLock()
        self._watches: list[tuple[_Client, str]] = []
        self._clients: list[_Client] = []
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._unhang = threading.Event()
        self._unhang.set()
        self.delay = 0.0
        self.on_request: Callable[[int, str], None] | None = None
        self.client_changes: list[str] = []
        self.requests = 0
        for key, value in (entries or {}).items():
            self.entries[key] = value.encode() if isinstance(value, str) else value

    # --- test controls ---------------------------------------------------------------------------

    @property
    def hang(self) -> bool:
        return not self._unhang.is_set()

    @hang.setter
    def hang(self, value: bool) -> None:
        if value:
            self._unhang.clear()
        else:
            self._unhang.set()

    def start(self) -> StandinQubesDB:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        listener.bind(self.path)
        listener.listen(64)
        self._listener = listener
        self._spawn(self._accept, listener)
        return self

    def stop(self) -> None:
        """Close the socket and every connection (clients see EOF: DisconnectedError)."""
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        with self._lock:
            clients, self._clients = self._clients, []
            self._watches.clear()
        for c in clients:
            try:
                c.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._unhang.set()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def restart(self) -> None:
        self.stop()
        self.start()

    def write(self, path: str, value: str | bytes) -> None:
        """What dom0 writes (over the vchan in Qubes): stored, then every matching watch fires."""
        data = value.encode() if isinstance(value, str) else value
        assert valid_path(path) and not path.endswith("/") and b"\0" not in data and len(data) < MAX_DATA
        with self._lock:
            self.entries[path] = data
            self._fire(path)

    def rm(self, path: str) -> None:
        with self._lock:
            if self._remove(path):
                self._fire(path)

    def watch_count(self) -> int:
        with self._lock:
            return len(self._watches)

    # --- the daemon ----------------------------------------------------------------------------

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True, name="standin-qubesdb")
        t.start()
        self._threads.append(t)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            client = _Client(sock)
            with self._lock:
                if self._listener is not listener:
                    sock.close()
                    return
                self._clients.append(client)
            self._spawn(self._serve, client)

    def _recv_exact(self, sock: socket.socket, size: int) -> bytes | None:
        data = b""
        while len(data) < size:
            try:
                chunk = sock.recv(size - len(data))
            except OSError:
                return None
            if not chunk:
                return None
            data += chunk
        return data

    def _serve(self, client: _Client) -> None:
        try:
            while True:
                raw = self._recv_exact(client.sock, HDR.size)
                if raw is None:
                    return
                kind, path_raw, data_len = HDR.unpack(raw)
                path = path_raw.split(b"\0", 1)[0].decode("ascii", "replace")
                data = self._recv_exact(client.sock, data_len) if data_len else b""
                if data is None:
                    return
                self._unhang.wait()
                if self._listener is None:
                    return
                if self.delay:
                    time.sleep(self.delay)
                with self._lock:
                    self.requests += 1
                    if self.on_request is not None:
                        self.on_request(kind, path)
                    self._handle(client, kind, path, data)
        finally:
            with self._lock:
                self._watches = [(c, p) for c, p in self._watches if c is not client]
                if client in self._clients:
                    self._clients.remove(client)
            client.sock.close()

    def _handle(self, client: _Client, kind: int, path: str, data: bytes) -> None:
        if not valid_path(path) or len(data) >= MAX_DATA:
            client.send(_hdr(RESP_ERROR, path))
            return
        if kind == CMD_READ:
            value = self.entries.get(path)
            if value is None:
                client.send(_hdr(RESP_ERROR_NOENT, path))
            else:
                client.send(_hdr(RESP_READ, path, len(value)) + value)
        elif kind in (CMD_MULTIREAD, CMD_LIST):
            resp = RESP_MULTIREAD if kind == CMD_MULTIREAD else RESP_LIST
            out = b""
            for key in sorted(k for k in self.entries if k.startswith(path)):
                value = self.entries[key] if kind == CMD_MULTIREAD else b""
                out += _hdr(resp, key, len(value)) + value
            client.send(out + _hdr(resp, ""))
        elif kind == CMD_WRITE:
            if path.endswith("/") or b"\0" in data:
                client.send(_hdr(RESP_ERROR, path))
                return
            self.entries[path] = data
            self.client_changes.append(f"write {path}")
            client.send(_hdr(RESP_OK, path))
            self._fire(path)
        elif kind == CMD_RM:
            if self._remove(path):
                self.client_changes.append(f"rm {path}")
                client.send(_hdr(RESP_OK, path))
                self._fire(path)
            else:
                client.send(_hdr(RESP_ERROR_NOENT, path))
        elif kind == CMD_WATCH:
            self._watches.append((client, path))
            client.send(_hdr(RESP_OK, path))
        elif kind == CMD_UNWATCH:
            for i, (c, p) in enumerate(self._watches):
                if c is client and p == path:
                    del self._watches[i]
                    client.send(_hdr(RESP_OK, path))
                    break
            else:
                client.send(_hdr(RESP_ERROR_NOENT, path))
        else:
            client.send(_hdr(RESP_ERROR, path))

    def _remove(self, path: str) -> bool:
        gone = [k for k in self.entries if (k.startswith(path) if path.endswith("/") else k == path)]
        for k in gone:
            del self.entries[k]
        return bool(gone)

    def _fire(self, path: str) -> None:
        for client, watched in list(self._watches):
            if path.startswith(watched) if watched.endswith("/") else path == watched:
                client.send(_hdr(RESP_WATCH, path))


def import_standin(socket_path: str, strict: bool = False) -> ModuleType:
    """The stand-in ``qubesdb`` module, freshly imported from :data:`STANDIN_DIR` and pointed at
    ``socket_path``; :func:`forget_standin` undoes it (sys.path and sys.modules)."""
    forget_standin()
    sys.path.insert(0, str(STANDIN_DIR))
    module = importlib.import_module("qubesdb")
    assert module.__file__ is not None and module.__file__.startswith(str(STANDIN_DIR)), module.__file__
    module.SOCKET = socket_path
    module.STRICT = strict
    return module


def forget_standin() -> None:
    while str(STANDIN_DIR) in sys.path:
        sys.path.remove(str(STANDIN_DIR))
    sys.modules.pop("qubesdb", None)


def tools_dir(where: Path) -> Path:
    """A tools directory (``VIF_HOTPLUG_TOOLS_DIR``: root's, writable by root alone) holding the fake
    ``qubesdb-read`` and the stand-in module it imports."""
    where.mkdir(mode=0o755, parents=True, exist_ok=True)
    for name in ("qubesdb-read", "qubesdb.py"):
        shutil.copy(STANDIN_DIR / name, where / name)
    (where / "qubesdb-read").chmod(0o755)
    where.chmod(0o755)
    return where


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(description="a stand-in qubesdb-daemon (tests and benchmarks)")
    p.add_argument("--socket", required=True)
    p.add_argument("entries", nargs="*", metavar="KEY=VALUE")
    args = p.parse_args(argv)
    daemon = StandinQubesDB(args.socket, dict(e.split("=", 1) for e in args.entries)).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print("ready", flush=True)
    while not stop.wait(1.0):
        pass
    daemon.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
