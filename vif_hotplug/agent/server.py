"""``vif-hotplug agent``: one resident process serving every hotplug event, DNS run and status.

It keeps what costs a one-shot process most (the interpreter and its
imports, libnftables or python-iptables, open netlink and XenStore
connections, the rulesets it found complete) and answers the thin
client (:mod:`vif_hotplug.agent.client`) over a Unix socket: the client
sends argv and the allowed part of the toolstack's environment, the agent
runs the very function the command would run in-process
(:func:`vif_hotplug.entry.dispatch`, so exit codes, ``hotplug-status``,
``hotplug-error``, hooks and log lines are the same), streams the log lines
back and ends with the exit code.

* Access: the socket is mode 0600 in a 0700 directory, and every request's
  peer credentials are checked: uid 0 only.
* Requests: read off the accepting thread, each within
  :data:`REQUEST_TIMEOUT` in all, at most :data:`MAX_REQUEST` bytes, ending
  with the protocol's end marker (a request cut short is refused, never run
  with part of its environment); at most :data:`MAX_PENDING` taken at once
  (the next client is told to do the work itself). Only the variables of
  :data:`~vif_hotplug.agent.client.ENV_ALLOWED` are honoured.
* Order: requests for the same vif (or the same command) run one after the
  other in arrival order; others run side by side, serialised only where
  the kernel work must be (the hotplug lock and the backends' locks).
* A client that goes away mid-event does not cancel it; a request that
  fails or is garbage gets an error answer and the agent keeps serving;
  ``accept`` failing (out of descriptors) is logged and retried.
* Hooks run after the client has its exit code, outside any lock, with
  their deadline; the next request of the same vif waits for them, as it
  would for Qubes' bash script, requests of other vifs do not.
* At start, without delaying the first request: the state moved to the
  configured firewall backend if that changed, then ``reconcile``, so a
  driver domain whose agent starts late does not leave its VMs without
  network. One vif that cannot be brought up is logged; the others are.
* systemd socket activation (``LISTEN_FDS``) or a socket of its own.
"""

from __future__ import annotations

import contextvars
import errno
import logging
import os
import queue
import select
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import registry
from ..app.log_setup import current_ident, current_tag, own_or_warning, stderr_is_the_journal, system_handlers, tagged
from ..app.runtime import Runtime
from ..app.settings import AGENT_LOCK_TIMEOUT
from ..core.errors import HotplugError
from .client import END, ENV_ALLOWED, MAGIC, MAX_REQUEST

if TYPE_CHECKING:
    from ..app.qubesdb_watch import QubesDBWatcher

log = logging.getLogger(__name__)

#: How long a client may take to send its whole request.
REQUEST_TIMEOUT = 5.0
#: Requests taken and not yet answered; beyond this, clients do the work themselves.
MAX_PENDING = 256
#: Threads reading requests (a slow client holds one for at most REQUEST_TIMEOUT).
READERS = 8
SD_LISTEN_FDS_START = 3
#: On SIGTERM, how long requests already taken may still run.
STOP_TIMEOUT = 30.0
#: After ``accept`` failed for want of resources, wait this long before trying again.
ACCEPT_BACKOFF = 0.1
_SO_PEERCRED = struct.Struct("3i")
_ALLOWED = frozenset(ENV_ALLOWED)


Send = Callable[[str, str], None]
"""``send(kind, line)``: one answer line to the client (``E`` stderr, ``O`` stdout, ``X`` exit code)."""


@dataclass
class _Sink:
    """Where one request's log lines and output go: its client's socket."""

    send: Send
    ident: str
    level: int = logging.WARNING
    tag: str | None = None


_sink: contextvars.ContextVar[_Sink | None] = contextvars.ContextVar("vif_hotplug_sink", default=None)


class _SinkHandler(logging.Handler):
    """Sends a record to the client of the request being served in this thread, formatted as in-process."""

    def emit(self, record: logging.LogRecord) -> None:
        sink = _sink.get()
        if sink is None or record.levelno < sink.level or not own_or_warning(record):
            return
        try:
            for line in tagged(sink.tag, record.getMessage()).split("\n"):
                sink.send("E", f"{sink.ident}: {line}")
        except Exception:  # noqa: BLE001 - a log line must never break the request
            pass


class _OwnLogs:
    """:class:`~vif_hotplug.app.log_setup.LogControl` of a request the agent makes itself: its own logs."""

    def verbose(self, level: int) -> None:
        pass

    def tag(self, tag: str) -> None:
        current_tag.set(tag)


class _RequestLogs:
    """:class:`~vif_hotplug.app.log_setup.LogControl` of one request."""

    def __init__(self, sink: _Sink) -> None:
        self._sink = sink

    def verbose(self, level: int) -> None:
        self._sink.level = level

    def tag(self, tag: str) -> None:
        self._sink.tag = tag
        current_tag.set(tag)


def configure_logging() -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(logging.DEBUG)
    root.addHandler(_SinkHandler())
    # The system log names each line's tool (vif-route-qubes, qubes-setup-dnat-to-ns,
    # vif-hotplug), as a process of its own would: current_ident is set per request.
    for h in system_handlers(registry.UMBRELLA):
        root.addHandler(h)
    stderr = logging.StreamHandler()
    stderr.setLevel(logging.INFO)
    stderr.addFilter(lambda r: _sink.get() is None and own_or_warning(r))
    stderr.setFormatter(logging.Formatter(f"{registry.UMBRELLA} agent: %(message)s"))
    if not stderr_is_the_journal():
        root.addHandler(stderr)


def _order_key(prog: str, argv: Sequence[str], env: Mapping[str, str]) -> str:
    """Requests with the same key run in arrival order: one vif's events, or one command."""
    command, rest = registry.command_of(prog, list(argv))
    if command is not None and command.name == "route":
        for word in rest:
            if word.startswith("vif") and "." in word:
                return word
        return env.get("XENBUS_PATH") or env.get("vif") or "route"
    return command.name if command is not None else prog


class _Lanes:
    """Work queued per key, run in arrival order per key, keys side by side on a pool of threads.

    A fixed pool, not a thread per key: pyroute2 keeps a netlink socket per
    thread that uses it (ipset creation, namespaces), so short-lived threads
    would leave one socket behind each.
    """

    WORKERS = 32

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: dict[str, queue.Queue[Callable[[], None]]] = {}
        self._pending = 0
        self._pool = ThreadPoolExecutor(max_workers=self.WORKERS, thread_name_prefix="lane")

    def submit(self, key: str, job: Callable[[], None], limit: int | None = None) -> bool:
        """Queue ``job`` behind ``key``'s; ``False`` (not queued) when ``limit`` jobs are pending."""
        with self._lock:
            if limit is not None and self._pending >= limit:
                return False
            self._pending += 1
            q = self._queues.get(key)
            if q is not None:
                q.put(job)
                return True
            q = queue.Queue()
            q.put(job)
            self._queues[key] = q
        self._pool.submit(self._drain, key, q)
        return True

    def _drain(self, key: str, q: queue.Queue[Callable[[], None]]) -> None:
        while True:
            with self._lock:
                try:
                    job = q.get_nowait()
                except queue.Empty:
                    del self._queues[key]
                    return
            try:
                job()
            except Exception:
                log.exception("request failed")
            finally:
                with self._lock:
                    self._pending -= 1

    def busy(self) -> int:
        with self._lock:
            return len(self._queues)


class Agent:
    def __init__(self, env: Mapping[str, str], runtime: Runtime | None = None) -> None:
        self.env = {k: v for k, v in env.items() if k in _ALLOWED}
        self.runtime = runtime or Runtime(lock_timeout=AGENT_LOCK_TIMEOUT, role="agent")
        self.lanes = _Lanes()
        self._readers = ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="reader")

    # --- one request ------------------------------------------------------------------------

    def handle(self, conn: socket.socket) -> None:
        """Take one connection: its request is read and checked on a reader thread."""
        self._readers.submit(self._take, conn)

    def _take(self, conn: socket.socket) -> None:
        try:
            uid = _peer_uid(conn)
            raw = _read_request(conn, time.monotonic() + REQUEST_TIMEOUT)
        except OSError as exc:
            log.debug("client went away before its request: %s", exc)
            conn.close()
            return
        send = _sender(conn)
        if uid != 0:
            log.warning("refused a request from uid %d: only root may use the agent", uid)
            send("E", f"{registry.UMBRELLA} agent: refused: only root may use the agent")
            send("X", "1")
            conn.close()
            return
        try:
            prog, argv, env = decode_request(raw)
        except ValueError as exc:
            send("E", f"{registry.UMBRELLA} agent: bad request: {exc}")
            send("X", "2")
            conn.close()
            return
        if not self.lanes.submit(_order_key(prog, argv, env), lambda: self._serve(conn, send, prog, argv, env),
                                 limit=MAX_PENDING):
            log.warning("%d requests pending: a client does its work itself", MAX_PENDING)
            conn.close()  # no exit code: the client falls back

    def _serve(self, conn: socket.socket, send: Send, prog: str, argv: list[str], env: dict[str, str]) -> None:
        from ..entry import dispatch

        command, _ = registry.command_of(prog, argv)
        sink = _Sink(send, f"{registry.UMBRELLA} {command.name}" if prog == registry.UMBRELLA and command
                     else prog)
        tokens = (_sink.set(sink), current_tag.set(None), current_ident.set(registry.ident(command)))
        after: Callable[[], None] | None = None
        try:
            if not registry.served(prog, argv):
                log.error("%s %s: not served by the agent", prog[:64], " ".join(argv[:1])[:64])
                code = 2
            else:
                code, after = dispatch(prog, argv, env, self.runtime, _RequestLogs(sink),
                                       lambda text: _out(send, text))
        except Exception as exc:  # answer, whatever went wrong
            log.exception("%s failed", prog)
            send("E", f"{sink.ident}: internal error: {type(exc).__name__}: {exc}")
            code = 1
        finally:
            _sink.reset(tokens[0])
            current_tag.reset(tokens[1])
            current_ident.reset(tokens[2])
        send("X", str(code))
        conn.close()
        if after is not None:
            # The client has its answer; the next event of this vif waits for
            # these hooks (as it would for the bash script), others do not.
            token = current_ident.set(registry.ident(command))
            try:
                after()
            finally:
                current_ident.reset(token)

    def internal(self, prog: str, argv: list[str], extra_env: dict[str, str], still_wanted: Callable[[], bool]) -> None:
        """Queue ``prog argv`` as a client's request would be queued, for the agent's own reasons (a QubesDB
        watch), with the agent's environment and ``extra_env``; it runs if ``still_wanted()`` when its turn
        comes. Logged as any request; nobody waits for the answer."""
        from ..entry import dispatch

        env = {**self.env, **extra_env}
        command, _ = registry.command_of(prog, argv)

        def job() -> None:
            tokens = (current_tag.set(None), current_ident.set(registry.ident(command)))
            try:
                if still_wanted():
                    _, after = dispatch(prog, argv, env, self.runtime, _OwnLogs(), lambda text: None)
                    if after is not None:
                        after()
            except HotplugError as exc:
                log.error("%s %s: %s", prog, " ".join(argv), exc)
            finally:
                current_tag.reset(tokens[0])
                current_ident.reset(tokens[1])

        self.lanes.submit(_order_key(prog, argv, env), job)

    def watch_qubesdb(self) -> QubesDBWatcher | None:
        """Start applying what changes in QubesDB (:mod:`vif_hotplug.app.qubesdb_watch`), where Qubes' module
        imports."""
        from ..app.qubesdb_watch import QubesDBWatcher

        cache = self.runtime.qubesdb_cache()
        if cache is None:
            return None
        settings = self.runtime.settings(self.env)
        watcher = QubesDBWatcher(cache, lambda: self.runtime.xenstore(settings), self.internal)
        watcher.start()
        return watcher

    def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the requests already taken."""
        deadline = time.monotonic() + timeout
        while self.lanes.busy() and time.monotonic() < deadline:
            time.sleep(0.05)

    # --- the loop ------------------------------------------------------------------------------

    def start_up(self) -> None:
        """Move the state to the configured backend if that changed, then bring every vif XenStore lists
        as online, and whose device exists, to its desired state. Never raises."""
        from ..app.backend_state import resolve
        from ..app.reconcile import reconcile
        from ..app.switch import settle_backend
        from ..kernel.state_files import prune

        token = current_ident.set(registry.UMBRELLA)
        try:
            settings = self.runtime.settings(self.env)
            prune(settings.state_dir)
            backend = settle_backend(settings, self.runtime)
            host = self.runtime.host(settings, backend)
            xs = self.runtime.xenstore(settings)
            try:
                result = reconcile(settings, host, xs, self.runtime.qubesdb(settings),
                                   lock=self.runtime.hotplug_lock(settings), base=resolve(settings).init)
            finally:
                xs.close()
        except Exception as exc:  # noqa: BLE001 - the agent serves events whatever start-up met
            log.warning("start-up reconcile skipped: %s: %s", type(exc).__name__, exc)
            return
        finally:
            current_ident.reset(token)
        for error in result.errors:
            log.warning("start-up reconcile: %s", error)
        log.info("start-up reconcile: %d change(s) for %d vif(s)", result.changes, len(result.online))

    def serve(self, listener: socket.socket, stop_fd: int, stopping: Callable[[], bool]) -> None:
        listener.setblocking(False)
        while not stopping():
            ready, _, _ = select.select([listener.fileno(), stop_fd], [], [])
            if listener.fileno() not in ready:
                continue
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            except OSError as exc:
                # EMFILE, ENFILE, ENOBUFS, ENOMEM: the pending connection stays
                # queued; try again once something was released.
                log.warning("cannot accept a connection: %s", os.strerror(exc.errno or errno.EIO))
                time.sleep(ACCEPT_BACKOFF)
                continue
            conn.setblocking(True)
            self.handle(conn)

    def close(self) -> None:
        self._readers.shutdown(wait=False, cancel_futures=True)
        self.runtime.close()


def _peer_uid(conn: socket.socket) -> int:
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _SO_PEERCRED.size)
    _pid, uid, _gid = _SO_PEERCRED.unpack(raw)
    return int(uid)


def _read_request(conn: socket.socket, deadline: float) -> bytes:
    """Everything the client sends up to its shutdown, by ``deadline`` and at most :data:`MAX_REQUEST` bytes."""
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise OSError(errno.ETIMEDOUT, "request not complete in time")
        conn.settimeout(left)
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
        if len(data) > MAX_REQUEST:
            raise OSError(errno.EMSGSIZE, "request too long")


def decode_request(raw: bytes) -> tuple[str, list[str], dict[str, str]]:
    """(prog, argv, env) of a request (:mod:`.client` documents the format); ``ValueError`` if it is not one.

    Variables outside the allowed list are dropped.
    """
    words = raw.decode("utf-8", "surrogateescape").split("\0")
    if len(words) < 6 or words[0] != MAGIC or words[-1] != "":
        raise ValueError("not a request of this protocol")
    words.pop()
    if words[-1] != END:
        raise ValueError("request cut short")
    prog, count = words[1], words[2]
    if not count.isdigit() or 3 + int(count) >= len(words) - 1:
        raise ValueError("malformed argument count")
    argv = words[3:3 + int(count)]
    rest = words[3 + int(count):-1]
    if not rest or not rest[0].isdigit() or int(rest[0]) != len(rest) - 1:
        raise ValueError("malformed environment")
    env: dict[str, str] = {}
    for item in rest[1:]:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError("malformed environment")
        if key in _ALLOWED:
            env[key] = value
    return prog, argv, env


def _out(send: Send, text: str) -> None:
    for line in text.split("\n"):
        send("O", line)


def _sender(conn: socket.socket) -> Send:
    lock = threading.Lock()
    gone = False

    def send(kind: str, line: str) -> None:
        nonlocal gone
        if gone:
            return
        try:
            with lock:
                conn.settimeout(REQUEST_TIMEOUT)
                conn.sendall((kind + line.replace("\n", " ") + "\n").encode("utf-8", "replace"))
        except OSError:
            gone = True  # the client left (or stopped reading): the work goes on without it

    return send


def listening_socket(path: str, env: Mapping[str, str]) -> socket.socket:
    """The socket systemd passed (``LISTEN_FDS``), or a new one at ``path``: mode 0600 in a 0700 directory."""
    if env.get("LISTEN_PID") == str(os.getpid()) and env.get("LISTEN_FDS") == "1":
        return socket.socket(fileno=SD_LISTEN_FDS_START)
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(128)
    return sock


def run_agent(env: Mapping[str, str], socket_path: str, start_up: bool = True) -> int:
    """Serve until SIGTERM/SIGINT; 0 when stopped, 1 when the socket cannot be had."""
    from ..app.stop import StopOnSignal

    configure_logging()
    try:
        listener = listening_socket(socket_path, env)
    except OSError as exc:
        log.error("cannot listen on %s: %s", socket_path, exc.strerror or exc)
        return 1
    agent = Agent(env)
    log.info("serving on %s", socket_path)
    watcher = agent.watch_qubesdb()
    with StopOnSignal() as stop:
        if start_up:
            # A lane of its own: events are served at once, each waiting only
            # for the hotplug lock, which reconcile holds per pass.
            agent.lanes.submit("start-up", agent.start_up)
        try:
            agent.serve(listener, stop.fd, lambda: stop.requested)
        finally:
            listener.close()
            if watcher is not None:
                watcher.stop()
            agent.drain(STOP_TIMEOUT)
            if env.get("LISTEN_PID") != str(os.getpid()):
                try:
                    os.unlink(socket_path)
                except OSError:
                    pass
    log.info("stopped")
    agent.close()
    return 0
