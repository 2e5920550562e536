"""``vif-hotplug agent``: one resident process serving every hotplug event, DNS run and status.

It keeps what costs a one-shot process most (the interpreter and its
imports, libnftables or python-iptables, open netlink and XenStore
connections, the rulesets it found complete) and answers the thin
client (:mod:`vif_hotplug.agent.client`) over a Unix socket: the client
sends argv and the toolstack's environment, the agent runs the very entry
point function the command would run in-process (so exit codes,
``hotplug-status``, ``hotplug-error``, hooks and log lines are the same),
streams the log lines back and ends with the exit code.

* Access: the socket is mode 0600 in a 0700 directory, and every request's
  peer credentials are checked: uid 0 only.
* Order: requests for the same vif (or the same command) run one after the
  other in arrival order; others run side by side, serialised only where
  the kernel work must be (the hotplug lock and the backends' locks).
* A client that goes away mid-event does not cancel it; a request that
  fails or is garbage gets an error answer and the agent keeps serving.
* Hooks run after the client has its exit code, outside any lock, with
  their deadline; the next request of the same vif waits for them, as it
  would for Qubes' bash script, requests of other vifs do not.
* On start, ``reconcile``: a driver domain whose agent starts late does
  not leave its VMs without network.
* systemd socket activation (``LISTEN_FDS``) or a socket of its own.
"""

from __future__ import annotations

import contextvars
import logging
import os
import queue
import select
import socket
import stat
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..app.log_setup import current_tag, own_or_warning, system_handlers, tagged
from ..app.runtime import Runtime
from .client import MAGIC

log = logging.getLogger(__name__)

#: The longest request the agent reads (argv and environment).
MAX_REQUEST = 1 << 20
#: How long a client may take to send its request.
REQUEST_TIMEOUT = 5.0
SD_LISTEN_FDS_START = 3
#: On SIGTERM, how long requests already taken may still run.
STOP_TIMEOUT = 30.0
_SO_PEERCRED = struct.Struct("3i")


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
    for h in system_handlers("vif-hotplug agent"):
        root.addHandler(h)
    stderr = logging.StreamHandler()
    stderr.setLevel(logging.INFO)
    stderr.addFilter(lambda r: _sink.get() is None and own_or_warning(r))
    stderr.setFormatter(logging.Formatter("vif-hotplug agent: %(message)s"))
    root.addHandler(stderr)


def _order_key(prog: str, argv: Sequence[str], env: Mapping[str, str]) -> str:
    """Requests with the same key run in arrival order: one vif's events, or one command."""
    if prog == "vif-route-qubes" or argv[:1] == ["route"]:
        for word in argv:
            if word.startswith("vif") and "." in word:
                return word
        return env.get("XENBUS_PATH") or env.get("vif") or "route"
    return f"{prog} {argv[0] if argv else ''}"


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
        self._pool = ThreadPoolExecutor(max_workers=self.WORKERS, thread_name_prefix="lane")

    def submit(self, key: str, job: Callable[[], None]) -> None:
        with self._lock:
            q = self._queues.get(key)
            if q is not None:
                q.put(job)
                return
            q = queue.Queue()
            q.put(job)
            self._queues[key] = q
        self._pool.submit(self._drain, key, q)

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

    def busy(self) -> int:
        with self._lock:
            return len(self._queues)


class Agent:
    def __init__(self, env: Mapping[str, str], runtime: Runtime | None = None) -> None:
        self.env = dict(env)
        self.runtime = runtime or Runtime()
        self.lanes = _Lanes()

    # --- one request ------------------------------------------------------------------------

    def handle(self, conn: socket.socket) -> None:
        """Read, check and queue one request (in the accepting thread: it must not block long)."""
        try:
            uid = _peer_uid(conn)
            conn.settimeout(REQUEST_TIMEOUT)
            raw = _read_request(conn)
        except OSError as exc:
            log.debug("client went away before its request: %s", exc)
            conn.close()
            return
        send = _sender(conn)
        if uid != 0:
            log.warning("refused a request from uid %d: only root may use the agent", uid)
            send("E", "vif-hotplug agent: refused: only root may use the agent")
            send("X", "1")
            conn.close()
            return
        try:
            prog, argv, env = decode_request(raw)
        except ValueError as exc:
            send("E", f"vif-hotplug agent: bad request: {exc}")
            send("X", "2")
            conn.close()
            return
        self.lanes.submit(_order_key(prog, argv, env), lambda: self._serve(conn, send, prog, argv, env))

    def _serve(self, conn: socket.socket, send: Send, prog: str, argv: list[str], env: dict[str, str]) -> None:
        sink = _Sink(send, prog if prog != "vif-hotplug" else _ident(argv))
        token = _sink.set(sink)
        tag_token = current_tag.set(None)
        after: Callable[[], None] | None = None
        try:
            code, after = self._dispatch(prog, argv, env, _RequestLogs(sink), lambda text: _out(send, text))
        except Exception as exc:  # answer, whatever went wrong
            log.exception("%s failed", prog)
            send("E", f"{sink.ident}: internal error: {type(exc).__name__}: {exc}")
            code = 1
        finally:
            _sink.reset(token)
            current_tag.reset(tag_token)
        send("X", str(code))
        conn.close()
        if after is not None:
            # The client has its answer; the next event of this vif waits for
            # these hooks (as it would for the bash script), others do not.
            after()

    def _dispatch(self, prog: str, argv: list[str], env: dict[str, str], logs: _RequestLogs,
                  out: Callable[[str], None]) -> tuple[int, Callable[[], None] | None]:
        if prog == "vif-route-qubes":
            from ..vif_route import run

            return run(argv, env, self.runtime, logs, out, in_agent=True)
        if prog == "qubes-setup-dnat-to-ns" and "--watch" not in argv:
            from ..setup_dnat_to_ns import run as dns

            return dns(argv, env, self.runtime, logs, out), None
        if prog == "vif-hotplug":
            from ..cli import run as cli
            from .client import served

            if argv[:1] == ["route"]:
                from ..vif_route import run

                return run(argv[1:], env, self.runtime, logs, out, prog="vif-hotplug route", in_agent=True)
            if not served(prog, argv):
                logging.getLogger(__name__).error("vif-hotplug %s: not served by the agent", " ".join(argv[:1]))
                return 2, None
            return cli(argv, env, self.runtime, logs, out), None
        logging.getLogger(__name__).error("%s: not served by the agent", prog[:64])
        return 2, None

    def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the requests already taken."""
        import time

        deadline = time.monotonic() + timeout
        while self.lanes.busy() and time.monotonic() < deadline:
            time.sleep(0.05)

    # --- the loop ------------------------------------------------------------------------------

    def start_up(self) -> None:
        """Bring every vif XenStore lists as online, and whose device exists, to its desired state."""
        from ..app.backend_state import read_marker
        from ..app.reconcile import reconcile
        from ..app.settings import settings_from_env
        from ..core.errors import HotplugError

        try:
            settings = settings_from_env(self.env)
            host = self.runtime.host(settings)
            xs = self.runtime.xenstore(settings)
            try:
                marker = read_marker(settings)
                result = reconcile(settings, host, xs, self.runtime.qubesdb(settings),
                                   base=bool(marker and marker.init))
            finally:
                xs.close()
        except HotplugError as exc:
            log.warning("start-up reconcile skipped: %s", exc)
            return
        log.info("start-up reconcile: %d change(s) for %d vif(s)", result.changes, len(result.online))

    def serve(self, listener: socket.socket, stop_fd: int, stopping: Callable[[], bool]) -> None:
        listener.setblocking(False)
        while not stopping():
            ready, _, _ = select.select([listener.fileno(), stop_fd], [], [])
            if listener.fileno() in ready:
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    continue
                conn.setblocking(True)
                self.handle(conn)


def _ident(argv: Sequence[str]) -> str:
    from ..cli import COMMANDS

    return f"vif-hotplug {argv[0]}" if argv and argv[0] in COMMANDS else "vif-hotplug"


def _peer_uid(conn: socket.socket) -> int:
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _SO_PEERCRED.size)
    _pid, uid, _gid = _SO_PEERCRED.unpack(raw)
    return int(uid)


def _read_request(conn: socket.socket) -> bytes:
    """Everything the client sends, up to its shutdown (or :data:`MAX_REQUEST` bytes)."""
    data = b""
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
        if len(data) > MAX_REQUEST:
            raise OSError("request too long")


def decode_request(raw: bytes) -> tuple[str, list[str], dict[str, str]]:
    """(prog, argv, env) of a request (:mod:`.client` documents the format); ``ValueError`` if it is not one."""
    words = raw.decode("utf-8", "surrogateescape").split("\0")
    if len(words) < 4 or words[0] != MAGIC or words[-1] != "":
        raise ValueError("not a request of this protocol")
    prog, count = words[1], words[2]
    if not count.isdigit() or 3 + int(count) > len(words) - 1:
        raise ValueError("malformed argument count")
    argv = words[3:3 + int(count)]
    env: dict[str, str] = {}
    for item in words[3 + int(count):-1]:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError("malformed environment")
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
                conn.sendall((kind + line.replace("\n", " ") + "\n").encode("utf-8", "replace"))
        except OSError:
            gone = True  # the client left: the work goes on without it

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
    with StopOnSignal() as stop:
        if start_up:
            agent.start_up()
        try:
            agent.serve(listener, stop.fd, lambda: stop.requested)
        finally:
            listener.close()
            agent.drain(STOP_TIMEOUT)
            if env.get("LISTEN_PID") != str(os.getpid()):
                try:
                    os.unlink(socket_path)
                except OSError:
                    pass
    log.info("stopped")
    agent.runtime.close()
    return 0
