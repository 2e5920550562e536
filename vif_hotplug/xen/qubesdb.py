"""QubesDB: Qubes' own ``qubesdb`` module where it imports, else ``qubesdb-read``; no I/O at import.

In a Qubes VM the netvm's parameters, the connected and mapped addresses
and the services are QubesDB keys (:data:`WATCHED`), served by a local
qubesdb-daemon. Two ways to read them:

* **Qubes' module** (``python3-qubesdb``: qubes-core-qubesdb
  ``python/qubesdb.c`` over ``client/qdb-client.c``), through
  :class:`QubesDBCache`: one connection, every key read at once, watched,
  and read again on a watch event. The resident agent keeps one for its
  whole life, so an event starts no process and reads nothing unless
  QubesDB changed; a one-shot process opens one for its command.
* **``qubesdb-read``** (``client/qubesdb-cmd.c``), through
  :class:`CommandReader`: one run of ``qubesdb-read -f -q -- KEYS...`` for
  all the keys a command reads (``-f`` prints ``path = value``, a missing
  key prints nothing and makes the exit status 2; 1 before qubes-core-qubesdb 4.1.13).

Values are text as ``qubesdb-read`` prints them (bytes outside 0x20..0x7f
as ``\\xNN``, :func:`shown`), whichever way they were read, so both give the
same parameters, and the same error naming a bad value.

A QubesDB daemon that cannot be reached is no QubesDB: every key reads as
absent, so the next source (XenStore) is used, as ``qubesdb-read -q``
reports it (nothing printed). One that errs, or does not answer within
:data:`TIMEOUT`, is :class:`QubesDBError`: one line, never a hang.

Rules of Qubes' library this module is built around (each cited where used):

* One connection carries one request and its answer at a time; nothing in
  the library locks, and an interrupted call (EINTR half-way through an
  answer) corrupts its state. Every call of a connection is made by one
  thread of its own, which never takes a signal (:class:`_Worker`).
* Watch events that arrive while a call waits for its answer are kept
  inside the library and returned first by ``read_watch``; they do not make
  ``watch_fd`` readable. After every read this module empties that queue
  with the socket set non-blocking (``read_watch`` then fails with EAGAIN
  instead of waiting) and reads again if anything fired, so the queue is
  always empty between operations and a pending event always shows as a
  readable socket (:meth:`_Connection.settle`).
* After the daemon closed a connection the library reconnects on the next
  call but registers no watch again: a new socket under the same handle
  (another inode) is treated as a broken connection and replaced.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import queue
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from types import ModuleType
from typing import Any, TypeVar

from ..core.errors import HotplugError
from ..core.netvm_params import CONNECTED_QUBESDB, HARDEN_SERVICE, QUBES_NAMES, mapped_keys

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Deadline of one operation (connect, or read everything again), and of one ``qubesdb-read`` run.
TIMEOUT = 5.0
#: Where Debian's ``python3-qubesdb`` puts the module: a virtualenv without the system's
#: site-packages (install.sh makes one) still finds it there.
SYSTEM_SITE = "/usr/lib/python3/dist-packages"

#: Exact keys watched (qubesdb-daemon ``qubesdb_add_watch``: a path not ending with '/' matches itself only;
#: it may not exist yet).
NETVM_KEYS = ("/qubes-netvm-gateway", "/qubes-netvm-gateway6", "/qubes-netvm-primary-dns",
              "/qubes-netvm-secondary-dns", "/qubes-netvm-network")
IP_PREFIX = "/qubes-ip"
IP_KEYS = ("/qubes-ip", "/qubes-ip6")
CONNECTED_KEYS = ("/connected-ips", "/connected-ips6")
#: Watched trees (a path ending with '/' matches every key below it).
TREES = ("/mapped-ip/", "/qubes-service/")
WATCHED = (*NETVM_KEYS, *IP_KEYS, *CONNECTED_KEYS, *TREES)
#: What one read of everything asks for: ``multiread`` matches a plain string prefix
#: (daemon ``handle_multiread``), so "/qubes-ip" also brings any other "/qubes-ip*" key.
READS = ("/qubes-netvm-", IP_PREFIX, "/connected-ips", *TREES)
#: A command reads these (and a mapped vif's two keys): ``qubesdb-read`` is asked for them in one run.
COMMAND_KEYS = (*(f"/{q}" for q in QUBES_NAMES.values()), *CONNECTED_QUBESDB.values(), HARDEN_SERVICE)
#: Rounds of "read everything, then see whether anything fired meanwhile" before giving up for now.
MAX_ROUNDS = 8
#: Signals a call must never be interrupted by: every asynchronous one (a fault's stays deliverable).
_BLOCKED = signal.valid_signals() - {
    signal.SIGKILL, signal.SIGSTOP, signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL,
    signal.SIGTRAP, signal.SIGSYS, signal.SIGABRT,
}


class QubesDBError(HotplugError):
    """QubesDB erred or did not answer in time."""


def covered(key: str) -> bool:
    """Whether ``key`` is one of the keys this package reads and watches."""
    return (key in NETVM_KEYS or key in CONNECTED_KEYS or key.startswith(IP_PREFIX)
            or any(key.startswith(t) for t in TREES))


def shown(value: bytes) -> str:
    """A value as ``qubesdb-read`` prints it (``encode_and_print_value``): bytes outside 0x20..0x7f as
    ``\\xNN``; it stops at a NUL (``strlen``), which the daemon never stores anyway."""
    value = value.split(b"\0", 1)[0]
    if all(0x20 <= b < 0x80 for b in value):
        return value.decode("ascii")
    return "".join(chr(b) if 0x20 <= b < 0x80 else f"\\x{b:02x}" for b in value)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every covered key QubesDB held at one moment (text as :func:`shown`)."""

    values: Mapping[str, str] = field(default_factory=dict)

    def read(self, key: str) -> str | None:
        """``key``'s value, ``None`` when absent. Raises ``ValueError`` for a key this package does not
        watch (its value here could be older than the last change)."""
        if not covered(key):
            raise ValueError(f"QubesDB key {key!r} is not one this package reads")
        return self.values.get(key)

    @staticmethod
    def of(raw: Mapping[str, bytes]) -> Snapshot:
        return Snapshot({k: shown(v) for k, v in sorted(raw.items()) if covered(k)})


def import_qubesdb() -> ModuleType | None:
    """Qubes' module: importable here, or Debian's ``python3-qubesdb`` in :data:`SYSTEM_SITE` (loaded alone,
    not the rest of the system's packages); ``None`` when neither exists."""
    try:
        return importlib.import_module("qubesdb")
    except ImportError:
        pass
    from importlib import machinery, util

    for suffix in machinery.EXTENSION_SUFFIXES:
        path = os.path.join(SYSTEM_SITE, f"qubesdb{suffix}")
        if not os.path.exists(path):
            continue
        spec = util.spec_from_file_location("qubesdb", path)
        if spec is None or spec.loader is None:
            continue
        try:
            module = util.module_from_spec(spec)
            spec.loader.exec_module(module)
        except ImportError as exc:
            log.warning("cannot load %s: %s", path, exc)
            return None
        sys.modules["qubesdb"] = module
        return module
    return None


# --- one connection --------------------------------------------------------------------------


class _Broken(Exception):
    """The connection cannot be trusted any more (an error, no answer in time, a silent reconnect)."""


class _Unreachable(Exception):
    """No daemon to connect to."""


class _Worker:
    """The one thread that makes every call of one connection.

    It blocks every asynchronous signal for its whole life, so no call is
    ever interrupted (Qubes' firewall service blocks its signals around
    every call for that reason; the kernel hands a process's signal to a
    thread that does not block it). A call that does not return by its
    deadline is abandoned: the caller gets :class:`_Broken` and the thread
    ends whenever the call does.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        threading.Thread(target=self._loop, name="qubesdb", daemon=True).start()

    def _loop(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, _BLOCKED)
        while (job := self._jobs.get()) is not None:
            job()

    def run(self, fn: Callable[[], T], deadline: float) -> T:
        done = threading.Event()
        box: list[tuple[bool, Any]] = []

        def job() -> None:
            try:
                box.append((True, fn()))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                box.append((False, exc))
            finally:
                done.set()

        self._jobs.put(job)
        if not done.wait(max(0.0, deadline - time.monotonic())):
            raise _Broken("no answer in time")
        ok, value = box[0]
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    def stop(self, last: Callable[[], None]) -> None:
        self._jobs.put(last)
        self._jobs.put(None)


class _Connection:
    """One handle of Qubes' module, its worker, its watches and the values it last read."""

    def __init__(self, module: ModuleType, db: Any, worker: _Worker) -> None:
        self.module = module
        self.db = db
        self.worker = worker
        self.watched: set[str] = set()
        self.snapshot = Snapshot()
        #: More may have changed than the last read saw (it gave up after MAX_ROUNDS).
        self.dirty = False
        # Set in the worker: the library's descriptor, the socket's inode, and a duplicate of
        # our own (for select, and to shut the socket down under a call that hangs).
        self.fd = -1
        self.ino = 0
        self.sock: socket.socket | None = None

    @staticmethod
    def open(module: ModuleType, deadline: float) -> _Connection:
        """Connect, watch every key, read everything. Raises ``_Unreachable``, ``_Broken``."""
        worker = _Worker()
        made: list[Any] = []

        def connect() -> Any:
            made.append(module.QubesDB())
            return made[0]

        try:
            db = worker.run(connect, deadline)
        except (module.Error, OSError) as exc:  # qdbhandle_init: PyErr_SetFromErrno(qdb_error)
            worker.stop(lambda: None)
            raise _Unreachable(_reason(exc)) from None
        except _Broken:
            # Connected late, if at all: the handle is closed once the worker gets to it.
            def close_late() -> None:
                for handle in made:
                    try:
                        handle.close()
                    except Exception:  # noqa: BLE001 - it is being thrown away
                        pass

            worker.stop(close_late)
            raise
        conn = _Connection(module, db, worker)
        try:
            conn.snapshot = worker.run(conn._start, deadline)
        except BaseException:
            conn.abandon()
            raise
        return conn

    # Everything below runs in the worker thread.

    def _start(self) -> Snapshot:
        self.fd = self._call(self.db.watch_fd)
        self.ino = os.fstat(self.fd).st_ino
        self.sock = socket.socket(fileno=os.dup(self.fd))
        for key in WATCHED:
            self._call(self.db.watch, key)
            self.watched.add(key)
        return self._settle()

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return fn(*args)
        except self.module.Error as exc:  # DisconnectedError is one too
            raise _Broken(_reason(exc)) from None
        except OSError as exc:  # EINTR (qubesdb.c none()): cannot happen here, the worker blocks signals
            raise _Broken(_reason(exc)) from None

    def _same_socket(self) -> None:
        # The library reconnects by itself after the daemon closed the connection, and then
        # holds no watch (qdb-client.c send_command_to_daemon, qdb_watch_fd: "FIXME: register
        # watches again"): a socket that is not the one we watched on is a broken connection.
        fd = self._call(self.db.watch_fd)
        if fd != self.fd or os.fstat(fd).st_ino != self.ino:
            raise _Broken("QubesDB reconnected without its watches")

    def _drain(self) -> int:
        """Take every watch event there is, queued in the library or waiting on the socket, without
        waiting: the number taken. With the socket non-blocking, ``read_watch`` with nothing queued
        fails with EAGAIN instead of waiting (qdb-client.c ``qdb_read_watch``: one ``read``)."""
        self._same_socket()
        taken = 0
        os.set_blocking(self.fd, False)
        try:
            while True:
                try:
                    self.db.read_watch()
                except self.module.DisconnectedError as exc:
                    raise _Broken(_reason(exc)) from None
                except self.module.Error as exc:
                    if exc.args and exc.args[0] in (errno.EAGAIN, errno.EWOULDBLOCK):
                        return taken
                    raise _Broken(_reason(exc)) from None
                taken += 1
        finally:
            os.set_blocking(self.fd, True)

    def _settle(self) -> Snapshot:
        """Read everything until a read is followed by no watch event: then it is QubesDB as it is.

        Every change to a watched key fires an event; one that came during a read
        is in the library's queue or on the socket, and the drain after the read
        takes it, so a read followed by an empty drain saw every change before it.
        """
        self._drain()
        for _ in range(MAX_ROUNDS):
            raw: dict[str, bytes] = {}
            for prefix in READS:
                raw.update(self._call(self.db.multiread, prefix))
            snapshot = Snapshot.of(raw)
            # "/qubes-ip*" keys beyond the two always watched: watched once seen, read once more.
            new = [k for k in snapshot.values if k.startswith(IP_PREFIX) and k not in self.watched]
            for key in new:
                self._call(self.db.watch, key)
                self.watched.add(key)
            if not self._drain() and not new:
                self.dirty = False
                return snapshot
        self.dirty = True
        return snapshot

    # In the caller's thread, under the cache's lock.

    def readable(self) -> bool:
        """A watch event (or the daemon's EOF) is waiting on the socket. The library's queue is empty
        between operations (every one ends with a drain), so nothing can be waiting anywhere else."""
        assert self.sock is not None
        return bool(select.select([self.sock], [], [], 0)[0])

    def settle(self, deadline: float) -> Snapshot:
        self.snapshot = self.worker.run(self._settle, deadline)
        return self.snapshot

    def abandon(self) -> None:
        """Shut the socket down (a call stuck on it returns), close the handle once the worker is free."""
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()

        def close() -> None:
            try:
                self.db.close()
            except Exception:  # noqa: BLE001 - it is being thrown away
                pass

        self.worker.stop(close)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError | RuntimeError) and len(exc.args) >= 2 and isinstance(exc.args[0], int):
        return f"{exc.args[1]} ({errno.errorcode.get(exc.args[0], exc.args[0])})"
    return str(exc) or type(exc).__name__


# --- the process's QubesDB -------------------------------------------------------------------


class QubesDBCache:
    """QubesDB through Qubes' module: one watched connection for the whole process, and its values.

    :meth:`snapshot` gives QubesDB as of now: it processes any watch event
    already delivered before answering (an event that fired before the
    call is never missed), and costs one ``select`` when none is. Callers
    in any thread; one operation at a time. :meth:`wait` lets a watcher
    sleep until something may have changed.
    """

    def __init__(self, module: ModuleType, timeout: float = TIMEOUT) -> None:
        self.module = module
        self.timeout = timeout
        self._lock = threading.Lock()
        self._conn: _Connection | None = None
        self._closed = False
        self._unreachable: str | None = None
        #: The first values anyone was given (a watcher's starting point), and the latest.
        self.first: Snapshot | None = None
        self.latest: Snapshot | None = None
        #: Readable after the values changed, whoever read them.
        self._changed_r, self._changed_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def snapshot(self) -> Snapshot | None:
        """The watched keys as QubesDB holds them now; ``None`` when no daemon can be reached (then
        QubesDB is not a source). Raises :class:`QubesDBError` when it errs or does not answer
        within the deadline (the connection is then replaced at the next call)."""
        with self._lock:
            if self._closed:
                raise QubesDBError("QubesDB: connection closed")
            deadline = time.monotonic() + self.timeout
            failure = "no answer in time"
            for _ in range(2):  # a connection found broken is replaced once, within the same deadline
                if time.monotonic() >= deadline:
                    break
                try:
                    if self._conn is None:
                        self._conn = _Connection.open(self.module, deadline)
                        if self._unreachable is not None:
                            log.warning("QubesDB reachable again")
                        self._unreachable = None
                    elif self._conn.dirty or self._conn.readable():
                        self._conn.settle(deadline)
                    self._publish(self._conn.snapshot)
                    return self._conn.snapshot
                except _Unreachable as exc:
                    if self._unreachable is None:
                        log.warning("QubesDB cannot be reached (%s): netvm.conf and XenStore only", exc)
                    self._unreachable = str(exc)
                    return None
                except _Broken as exc:
                    failure = str(exc)
                    log.debug("QubesDB connection broken: %s", failure)
                    self._drop()
            if failure == "no answer in time":
                raise QubesDBError(f"QubesDB did not answer within {self.timeout:g}s")
            raise QubesDBError(f"QubesDB: {failure}")

    def _publish(self, snapshot: Snapshot) -> None:
        if self.first is None:
            self.first = snapshot
        if snapshot != self.latest:
            self.latest = snapshot
            try:
                os.write(self._changed_w, b"x")
            except BlockingIOError:
                pass

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abandon()

    def wait(self, stop_fd: int, idle: float | None, retry: float = 2.0) -> bool:
        """Sleep until a watch event may be waiting, the values changed, or ``stop_fd`` is readable
        (``False`` then); at most ``idle`` seconds, or ``retry`` while QubesDB cannot be reached."""
        with self._lock:
            conn = self._conn
            fd = os.dup(conn.sock.fileno()) if conn is not None and conn.sock is not None else None
        timeout = idle if fd is not None else retry
        try:
            ready, _, _ = select.select([stop_fd, self._changed_r, *([fd] if fd is not None else [])], [], [],
                                       timeout)
        finally:
            if fd is not None:
                os.close(fd)
        try:
            while os.read(self._changed_r, 64):
                pass
        except BlockingIOError:
            pass
        return stop_fd not in ready

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._drop()
            os.close(self._changed_r)
            os.close(self._changed_w)


# --- qubesdb-read ------------------------------------------------------------------------------


def read_with_command(exe: str, keys: Sequence[str], timeout: float = TIMEOUT) -> dict[str, str | None]:
    """``keys`` in one run of ``qubesdb-read -f -q``; a key it did not print is absent. Raises
    :class:`QubesDBError` when it cannot run, does not finish in time, or exits otherwise than 0, 1 or 2."""
    import subprocess

    keys = list(dict.fromkeys(keys))
    try:
        proc = subprocess.run([exe, "-f", "-q", "--", *keys], stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise QubesDBError(f"qubesdb-read did not answer within {timeout:g}s") from None
    except OSError as exc:
        raise QubesDBError(f"cannot run {exe}: {exc.strerror or exc}") from None
    # 0: every key read. 2: some absent, nothing else wrong (qubes-core-qubesdb since "CLI tools:
    # distinguish 'no such entry' and 'error'", 4.1.13); 1: some read failed, or no daemon to connect to, and
    # before that change also an absent key. In every case a key it printed is one it read.
    if proc.returncode not in (0, 1, 2):
        raise QubesDBError(f"qubesdb-read exited with status {proc.returncode}")
    wanted = set(keys)
    found: dict[str, str] = {}
    for line in proc.stdout.decode("ascii", "replace").split("\n"):
        key, sep, value = line.partition(" = ")
        if sep and key in wanted:
            found[key] = value
    return {k: found.get(k) for k in keys}


# --- readers: the core's ``Reader`` for one command ----------------------------------------------


class QubesDBReader:
    """A ``Reader`` (``reader(key) -> value | None``) of QubesDB for one command: what it reads is as
    QubesDB was at its first read, for every key (one command sees one QubesDB)."""

    def __call__(self, key: str) -> str | None:
        raise NotImplementedError

    def prefetch(self, keys: Sequence[str]) -> None:
        """Keys the command will read besides :data:`COMMAND_KEYS` (read together with them)."""

    def renewed(self) -> QubesDBReader:
        """A reader of the same QubesDB that will read it again (for a loop's next round)."""
        raise NotImplementedError

    def changes(self) -> QubesDBCache | None:
        """What to wait on for QubesDB to change, when it can be watched."""
        return None


class SnapshotReader(QubesDBReader):
    """Through the process's :class:`QubesDBCache`: one snapshot, taken at the first read."""

    def __init__(self, cache: QubesDBCache) -> None:
        self._cache = cache
        self._taken = False
        self._snapshot: Snapshot | None = None

    def __call__(self, key: str) -> str | None:
        if not self._taken:
            self._snapshot = self._cache.snapshot()
            self._taken = True
        return self._snapshot.read(key) if self._snapshot is not None else None

    def renewed(self) -> SnapshotReader:
        return SnapshotReader(self._cache)

    def changes(self) -> QubesDBCache:
        return self._cache


class CommandReader(QubesDBReader):
    """Through ``qubesdb-read``: every key the command reads in one run at its first read."""

    def __init__(self, exe: str, timeout: float = TIMEOUT) -> None:
        self._exe = exe
        self._timeout = timeout
        self._values: dict[str, str | None] = {}
        self._wanted: list[str] = list(COMMAND_KEYS)

    def prefetch(self, keys: Sequence[str]) -> None:
        self._wanted += [k for k in keys if k not in self._values]

    def __call__(self, key: str) -> str | None:
        if key not in self._values:
            wanted = [k for k in dict.fromkeys([*self._wanted, key]) if k not in self._values]
            self._values.update(read_with_command(self._exe, wanted, self._timeout))
            self._wanted = []
        return self._values[key]

    def renewed(self) -> CommandReader:
        return CommandReader(self._exe, self._timeout)


def prefetch_mapped(reader: object, real_ip: IPv4Address) -> None:
    """Tell ``reader`` (when it is a :class:`QubesDBReader`) that the mapping of ``real_ip`` will be read."""
    if isinstance(reader, QubesDBReader):
        reader.prefetch(mapped_keys(real_ip))
