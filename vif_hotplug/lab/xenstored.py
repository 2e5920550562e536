"""An embedded XenStore daemon on a Unix socket, for hosts without a hypervisor.

It speaks the xenstored socket protocol (:mod:`vif_hotplug.xs_wire`), so
libxenstore tools (``xenstore-read`` & co. with ``XENSTORED_PATH``) and pyxs
work against it unchanged. Every client is treated as privileged dom0: its
relative paths resolve against ``/local/domain/0`` and permissions are stored
and reported but never enforced. The store lives in memory only.

One thread runs a :mod:`selectors` loop; all state belongs to that thread, so
nothing is locked. Only :meth:`XenStoreServer.shutdown` may be called from
another thread (or a signal handler).
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import socket
import stat
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from types import FrameType, TracebackType
from typing import Protocol, Self

from ..xen.xs_wire import (
    DEFAULT_PERMS,
    SPECIAL_WATCH_PATHS,
    XENSTORE_PAYLOAD_MAX,
    Decoder,
    Message,
    Op,
    PayloadTooLarge,
    Permission,
    WireError,
    XenStoreError,
    decode_path,
    domain_path,
    encode,
    error_payload,
    join_args,
    parse_domid,
    parse_perms,
    resolve_path,
    split_args,
)

log = logging.getLogger(__name__)

HOME = domain_path(0)
_OK = b"OK\0"
_MAX_TRANSACTIONS = 10  # per connection, xenstored's default quota
_MAX_OUTPUT = 16 * 1024 * 1024  # a client this far behind on reading is dropped
_RECV_SIZE = 65536


@dataclass
class _Node:
    value: bytes = b""
    perms: tuple[Permission, ...] = DEFAULT_PERMS
    # A dict, not a list: insertion-ordered like xenstored's child list, and
    # O(1) removal for directories with thousands of entries.
    children: dict[str, None] = field(default_factory=dict)
    gen: int = 0

    def copy(self) -> _Node:
        return _Node(self.value, self.perms, dict(self.children), self.gen)


@dataclass(frozen=True)
class _Change:
    """A modification to report to watches: ``path`` and the nodes an rm took with it."""

    path: str
    removed: frozenset[str] = frozenset()


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def _basename(path: str) -> str:
    return path.rsplit("/", 1)[1]


def _child(path: str, name: str) -> str:
    return f"/{name}" if path == "/" else f"{path}/{name}"


class _View(Protocol):
    """Node access for an operation: the live tree or a transaction's private view."""

    def get(self, path: str) -> _Node | None: ...

    def modify(self, path: str) -> _Node:
        """The existing node at ``path``, which the caller is about to change."""

    def create(self, path: str, node: _Node) -> None: ...

    def remove(self, path: str) -> None: ...


class _Tree:
    """The committed store: a flat path -> node map plus a generation counter.

    Every change stamps the node with a fresh generation, so "changed since
    generation G" is ``node.gen > G``; removals show up on the parent.
    """

    def __init__(self) -> None:
        self.nodes: dict[str, _Node] = {"/": _Node()}
        self.generation = 0

    def bump(self) -> int:
        self.generation += 1
        return self.generation

    def get(self, path: str) -> _Node | None:
        return self.nodes.get(path)

    def modify(self, path: str) -> _Node:
        node = self.nodes[path]
        node.gen = self.bump()
        return node

    def create(self, path: str, node: _Node) -> None:
        node.gen = self.bump()
        self.nodes[path] = node

    def remove(self, path: str) -> None:
        del self.nodes[path]


class _Transaction:
    """A private copy-on-write view over the tree, committed atomically or not at all.

    ``seen`` records the generation of every committed node the transaction
    looked at (``None``: absent). Commit is refused when any of them differs
    now or already differed from the snapshot at start; an absent node also
    records its ancestors, whose generations change when it is created.
    """

    def __init__(self, tree: _Tree) -> None:
        self.tree = tree
        self.start = tree.generation
        self.overlay: dict[str, _Node | None] = {}
        self.seen: dict[str, int | None] = {}
        self.changes: list[_Change] = []

    def get(self, path: str) -> _Node | None:
        if path in self.overlay:
            return self.overlay[path]
        node = self.tree.get(path)
        probe: str | None = path
        while probe is not None and probe not in self.seen:
            found = self.tree.get(probe)
            self.seen[probe] = None if found is None else found.gen
            probe = _parent(probe) if found is None and probe != "/" else None
        return node

    def modify(self, path: str) -> _Node:
        node = self.overlay.get(path)
        if node is None:
            base = self.get(path)
            assert base is not None, path
            node = self.overlay[path] = base.copy()
        return node

    def create(self, path: str, node: _Node) -> None:
        self.overlay[path] = node

    def remove(self, path: str) -> None:
        self.overlay[path] = None

    def conflicts(self) -> bool:
        for path, gen in self.seen.items():
            node = self.tree.get(path)
            if (None if node is None else node.gen) != gen or (gen is not None and gen > self.start):
                return True
        return False

    def commit(self) -> None:
        for path, node in self.overlay.items():
            if node is None:
                self.tree.nodes.pop(path, None)
            else:
                self.tree.create(path, node)


def _lookup(view: _View, path: str) -> _Node:
    node = view.get(path)
    if node is None:
        raise XenStoreError("ENOENT")
    return node


def _ensure(view: _View, path: str) -> bool:
    """Create ``path`` and missing ancestors with empty values; True if anything was created."""
    missing: list[str] = []
    while view.get(path) is None:
        missing.append(path)
        path = _parent(path)
    for path in reversed(missing):
        parent = view.modify(_parent(path))
        parent.children[_basename(path)] = None
        # New nodes inherit their parent's permissions, as xenstored does for dom0.
        view.create(path, _Node(perms=parent.perms))
    return bool(missing)


def _remove(view: _View, path: str) -> _Change | None:
    if path == "/":
        raise XenStoreError("EINVAL")
    if view.get(path) is None:
        _lookup(view, _parent(path))
        return None
    removed: list[str] = []
    stack = [path]
    while stack:
        current = stack.pop()
        removed.append(current)
        stack.extend(_child(current, name) for name in _lookup(view, current).children)
    for current in removed:
        view.remove(current)
    del view.modify(_parent(path)).children[_basename(path)]
    return _Change(path, frozenset(removed[1:]))


@dataclass(frozen=True)
class _Watch:
    path: str
    token: bytes
    relative: bool

    def report(self, change: _Change) -> str | None:
        """The path to put in an event for ``change``, or None if it does not concern this watch."""
        if change.path == self.path or change.path.startswith("/" if self.path == "/" else self.path + "/"):
            hit = change.path
        elif self.path in change.removed:
            hit = self.path
        else:
            return None
        return hit[len(HOME) + 1:] if self.relative else hit


@dataclass(eq=False)
class _Connection:
    sock: socket.socket
    decoder: Decoder = field(default_factory=Decoder)
    out: bytearray = field(default_factory=bytearray)
    watches: list[_Watch] = field(default_factory=list)
    transactions: dict[int, _Transaction] = field(default_factory=dict)
    closing: bool = False  # stop reading, flush, then close

    def send(self, message: Message) -> None:
        self.out += encode(message)


_Handler = Callable[[_Connection, Message, _View], bytes]


class XenStoreServer:
    """A XenStore daemon listening on ``socket_path`` (mode 0600).

    Run it with :meth:`serve_forever` in the current thread or
    :meth:`start_in_thread`; stop it with :meth:`shutdown`. Also a context
    manager that runs it in a thread. On stop, every connection is closed and
    the socket file removed.
    """

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self._tree = _Tree()
        self._conns: set[_Connection] = set()
        self._next_tx = 1
        self._deferred: list[Callable[[], None]] = []
        #: Test hook: (operation, absolute path) -> the error name to answer it with, as a real store
        #: may for its own reasons (a node removed meanwhile, a quota, permissions, an old xenstored
        #: without DIRECTORY_PART). See :meth:`answer_with_error`.
        self._refusals: dict[tuple[int, str], str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._selector: selectors.BaseSelector | None = None
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._handlers: dict[int, _Handler] = {
            Op.CONTROL: self._control,
            Op.DIRECTORY: self._directory,
            Op.DIRECTORY_PART: self._directory_part,
            Op.READ: self._read,
            Op.GET_PERMS: self._get_perms,
            Op.SET_PERMS: self._set_perms,
            Op.WRITE: self._write,
            Op.MKDIR: self._mkdir,
            Op.RM: self._rm,
            Op.WATCH: self._watch,
            Op.UNWATCH: self._unwatch,
            Op.RESET_WATCHES: self._reset_watches,
            Op.TRANSACTION_START: self._transaction_start,
            Op.TRANSACTION_END: self._transaction_end,
            Op.GET_DOMAIN_PATH: self._get_domain_path,
            Op.IS_DOMAIN_INTRODUCED: self._is_domain_introduced,
            Op.INTRODUCE: partial(self._domain_op, 3, "@introduceDomain"),
            Op.RELEASE: partial(self._domain_op, 1, "@releaseDomain"),
            Op.RESUME: partial(self._domain_op, 1, None),
            Op.SET_TARGET: partial(self._domain_op, 2, None),
        }

    # -- lifecycle ---------------------------------------------------------

    def listen(self) -> None:
        """Bind and listen now (idempotent); clients may connect once this returns."""
        if self._listener is not None:
            return
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Every client is dom0 here: bind in a private directory, restrict the
        # mode, then rename into place, so the socket is never reachable
        # with the umask's permissions.
        private = tempfile.mkdtemp(prefix=".xs-", dir=os.path.dirname(os.path.abspath(self.socket_path)))
        staging = os.path.join(private, "s")
        try:
            listener.bind(staging)
            os.chmod(staging, 0o600)
            os.rename(staging, self.socket_path)
            listener.listen(64)
        except BaseException:
            listener.close()
            raise
        finally:
            with contextlib.suppress(OSError):
                os.unlink(staging)
            os.rmdir(private)
        listener.setblocking(False)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(listener, selectors.EVENT_READ, "listener")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._listener = listener
        log.info("xenstored listening on %s", self.socket_path)

    def serve_forever(self) -> None:
        """Serve until :meth:`shutdown`; always releases the socket on return."""
        self.listen()
        assert self._selector is not None
        try:
            while not self._stop.is_set():
                for key, mask in self._selector.select():
                    if key.data == "listener":
                        self._accept()
                    elif isinstance(key.data, _Connection):
                        if mask & selectors.EVENT_READ and key.data in self._conns:
                            self._on_readable(key.data)
                        if mask & selectors.EVENT_WRITE and key.data in self._conns:
                            self._flush(key.data)
                for conn in list(self._conns):
                    if conn.out or conn.closing:
                        self._flush(conn)
        finally:
            self._close()

    def start_in_thread(self) -> threading.Thread:
        """Listen, then serve in a daemon thread; returns once clients can connect."""
        self.listen()
        self._thread = threading.Thread(target=self.serve_forever, name="xenstored", daemon=True)
        self._thread.start()
        return self._thread

    def shutdown(self) -> None:
        """Ask the loop to stop. Safe from any thread or a signal handler.

        When called from outside the thread :meth:`start_in_thread` made,
        also waits for that thread to finish.
        """
        self._stop.set()
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"\0")
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def answer_with_error(self, op: Op, path: str, name: str | None) -> None:
        """From now on answer ``op`` on the absolute ``path`` with the error ``name`` (None: normally again).

        Safe from another thread: the loop reads the table once per request.
        """
        error_payload(name or "EIO")  # refuse names xenstored would never send
        if name is None:
            self._refusals.pop((int(op), path), None)
        else:
            self._refusals[(int(op), path)] = name

    def __enter__(self) -> Self:
        self.start_in_thread()
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.shutdown()

    def _close(self) -> None:
        for conn in list(self._conns):
            self._drop(conn)
        for sock in (self._listener, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        if self._selector is not None:
            self._selector.close()
        if self._listener is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
        self._listener = self._wake_r = self._wake_w = self._selector = None
        log.info("xenstored on %s stopped", self.socket_path)

    # -- connections ---------------------------------------------------------

    def _accept(self) -> None:
        assert self._listener is not None and self._selector is not None
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        sock.setblocking(False)
        conn = _Connection(sock)
        self._conns.add(conn)
        self._selector.register(sock, selectors.EVENT_READ, conn)
        log.debug("client %d connected", sock.fileno())

    def _drop(self, conn: _Connection) -> None:
        if conn not in self._conns:
            return
        self._conns.discard(conn)
        log.debug("client %d gone (%d watches, %d transactions dropped)",
                  conn.sock.fileno(), len(conn.watches), len(conn.transactions))
        if self._selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(conn.sock)
        conn.sock.close()

    def _on_readable(self, conn: _Connection) -> None:
        try:
            data = conn.sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.debug("client read failed: %s", exc)
            data = b""
        if not data:
            self._drop(conn)
            return
        conn.decoder.feed(data)
        try:
            for message in conn.decoder:
                self._handle(conn, message)
        except PayloadTooLarge as exc:
            # The stream cannot be resynchronised past a bogus length.
            log.warning("client sent an oversized message, closing it: %s", exc)
            if exc.header is not None:
                conn.send(Message(Op.ERROR, exc.header.req_id, exc.header.tx_id, error_payload("E2BIG")))
            conn.closing = True

    def _flush(self, conn: _Connection) -> None:
        if conn.out:
            try:
                sent = conn.sock.send(conn.out)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                log.debug("client write failed: %s", exc)
                self._drop(conn)
                return
            del conn.out[:sent]
        if len(conn.out) > _MAX_OUTPUT:
            log.warning("client is not reading its replies or events, dropping it")
            self._drop(conn)
            return
        if conn.closing and not conn.out:
            self._drop(conn)
            return
        assert self._selector is not None
        events = (0 if conn.closing else selectors.EVENT_READ) | (selectors.EVENT_WRITE if conn.out else 0)
        if self._selector.get_key(conn.sock).events != events:
            self._selector.modify(conn.sock, events, conn)

    # -- requests ------------------------------------------------------------

    def _handle(self, conn: _Connection, msg: Message) -> None:
        """Reply to one request, then deliver the watch events it caused."""
        log.debug("request %s req_id=%d tx_id=%d, %d bytes",
                  msg.op.name if msg.op is not None else msg.type, msg.req_id, msg.tx_id, len(msg.payload))
        try:
            handler = self._handlers.get(msg.type)
            if handler is None:
                raise XenStoreError("ENOSYS")
            if self._refusals:
                self._refuse(msg)
            view: _View = self._tree
            if msg.tx_id:
                tx = conn.transactions.get(msg.tx_id)
                if tx is None:
                    raise XenStoreError("ENOENT")
                view = tx
            reply = Message(msg.type, msg.req_id, msg.tx_id, handler(conn, msg, view))
        except XenStoreError as exc:
            reply = Message(Op.ERROR, msg.req_id, msg.tx_id, exc.payload)
        except WireError as exc:
            log.debug("malformed request %r: %s", msg, exc)
            reply = Message(Op.ERROR, msg.req_id, msg.tx_id, error_payload("EINVAL"))
        except Exception:
            log.exception("request %r failed", msg)
            reply = Message(Op.ERROR, msg.req_id, msg.tx_id, error_payload("EIO"))
        if len(reply.payload) > XENSTORE_PAYLOAD_MAX:
            reply = Message(Op.ERROR, msg.req_id, msg.tx_id, error_payload("E2BIG"))
        conn.send(reply)
        deferred, self._deferred = self._deferred, []
        for action in deferred:
            action()

    def _refuse(self, msg: Message) -> None:
        raw_path = msg.payload.partition(b"\0")[0]
        try:
            path = self._path(raw_path)
        except WireError:
            return
        name = self._refusals.get((msg.type, path))
        if name is not None:
            raise XenStoreError(name)

    def _changed(self, view: _View, change: _Change | None) -> None:
        if change is None:
            return
        if isinstance(view, _Transaction):
            view.changes.append(change)
        else:
            self._deferred.append(partial(self._fire, change))

    def _fire(self, change: _Change) -> None:
        for conn in self._conns:
            for watch in conn.watches:
                reported = watch.report(change)
                if reported is not None:
                    self._event(conn, watch, reported)

    @staticmethod
    def _event(conn: _Connection, watch: _Watch, path: str) -> None:
        payload = join_args(path.encode(), watch.token)
        # A deep path plus a long token can outgrow a message; the client cannot be told.
        if len(payload) > XENSTORE_PAYLOAD_MAX:
            log.warning("dropping watch event for %s: %d bytes with its token", path, len(payload))
            return
        conn.send(Message(Op.WATCH_EVENT, 0, 0, payload))

    @staticmethod
    def _path(raw: bytes) -> str:
        return resolve_path(decode_path(raw), HOME)

    def _read(self, conn: _Connection, msg: Message, view: _View) -> bytes:
        [path] = split_args(msg.payload, 1)
        return _lookup(view, self._path(path)).value

    def _directory(self, conn: _Connection, msg: Message, view: _View) -> bytes:
        [path] = split_args(msg.payload, 1)
        listing = join_args(*(name.encode() for name in _lookup(view, self._path(path)).children))
        # xenstored's send_reply answers a payload over XENSTORE_PAYLOAD_MAX with E2BIG (a netvm's
        # backend/vif from ~800 domids on); clients then page with DIRECTORY_PART.
        if len(listing) > XENSTORE_PAYLOAD_MAX:
            raise XenStoreError("E2BIG")
        return listing

    def _directory_part(self, conn: _Connection, msg: Message, view: _View) -> bytes:
        """Generation, NUL, then whole child names from byte ``offset`` of the listing.

        The chunk that reaches the end of the listing carries one more NUL, so
        the client knows to stop; a changed generation tells it to restart.
        """
        path, offset_arg = split_args(msg.payload, 2)
        node = _lookup(view, self._path(path))
        if not offset_arg.isdigit():
            raise XenStoreError("EINVAL")
        offset = int(offset_arg)
        listing = join_args(*(name.encode() for name in node.children))
        gen = join_args(str(node.gen).encode())
        if offset >= len(listing):
            return gen + b"\0"
        room, end = XENSTORE_PAYLOAD_MAX - len(gen) - 1, offset
        while end < len(listing):
            following = listing.index(b"\0", end) + 1
            if following - offset > room:
                break
            end = following
        return gen + listing[offset:end] + (b"\0" if end == len(listing) else b"")

    def _get_perms(self, conn: _Connection, msg: Message, view: _View) -> bytes:
        [path] = split_args(msg.payload, 1)
        return join_args(*(str(perm).encode() for perm in _lookup(view, self._path(path)).perms))

    def _set_perms(self, conn: _Connection, msg: Message, view: _View) -> bytes:
        raw_path, *raw_perms = split_args(msg.payload, at_least=2)
        path, perms = self._path(raw_path), parse_perms(raw_perms)
        _lookup(view, path)
        view.modify(path).perms = perms
        self._changed(view, _Change(path))
        return _OK

    def _write(self, conn: _Connection, msg: Message, view: _View) -> bytes:
        raw_path, nul, value = msg.payload.partition(b"\0")
        if not nul:
            raise XenStoreError("EINVAL")
        path = self._path(raw_path)
        _ensure(view, path)
        view.modify(path).value = value
        self._changed(view, _Change(path))
        return _OK

    def _mkdir(self, conn: _Connection, msg: Message, view: _View) -> bytes:
        [raw_path] = split_args(msg.payload, 1)
        path = self._path(raw_path)
        if _ensure(view, path):
            self._changed(view, _Change(path))
        return _OK

    def _rm(self, conn: _Connection, msg: Message, view: _View) -> bytes:
        [raw_path] = split_args(msg.payload, 1)
        self._changed(view, _remove(view, self._path(raw_path)))
        return _OK

    @classmethod
    def _watch_args(cls, msg: Message) -> _Watch:
        raw_path, token = split_args(msg.payload, 2)
        path = decode_path(raw_path)
        if path.startswith("@"):
            if path not in SPECIAL_WATCH_PATHS:
                raise XenStoreError("EINVAL")
            return _Watch(path, token, relative=False)
        return _Watch(cls._path(raw_path), token, relative=not path.startswith("/"))

    def _watch(self, conn: _Connection, msg: Message, view: _View) -> bytes:
        watch = self._watch_args(msg)
        if any(w.path == watch.path and w.token == watch.token for w in conn.watches):
            raise XenStoreError("EEXIST")
        conn.watches.append(watch)
        # Fired once up front, as xenstored does, so clients need not read before waiting.
        reported = watch.path[len(HOME) + 1:] if watch.relative else watch.path
        self._deferred.append(partial(self._event, conn, watch, reported))
        return _OK

    def _unwatch(self, conn: _Connection, msg: Message, view: _View) -> bytes:
        target = self._watch_args(msg)
        for watch in conn.watches:
            if watch.path == target.path and watch.token == target.token:
                conn.watches.remove(watch)
                return _OK
        raise XenStoreError("ENOENT")

    def _reset_watches(self, conn: _Connection, msg: Message, view: _View) -> bytes:
        conn.watches.clear()
        conn.transactions.clear()
        return _OK

    def _transaction_start(self, conn: _Connection, msg: Message, view: _View) -> bytes:
        if isinstance(view, _Transaction):
            raise XenStoreError("EBUSY")
        if len(conn.transactions) >= _MAX_TRANSACTIONS:
            raise XenStoreError("ENOSPC")
        tx_id = self._next_tx
        self._next_tx = tx_id % 0xFFFFFFFF + 1  # never 0, which means "no transaction"
        conn.transactions[tx_id] = _Transaction(self._tree)
        return join_args(str(tx_id).encode())

    def _transaction_end(self, conn: _Connection, msg: Message, view: _View) -> bytes:
        [verdict] = split_args(msg.payload, 1)
        if not isinstance(view, _Transaction):
            raise XenStoreError("ENOENT")
        if verdict not in (b"T", b"F"):
            raise XenStoreError("EINVAL")
        del conn.transactions[msg.tx_id]
        if verdict == b"T":
            if view.conflicts():
                raise XenStoreError("EAGAIN")
            view.commit()
            for change in view.changes:
                self._changed(self._tree, change)
        return _OK

    def _get_domain_path(self, conn: _Connection, msg: Message, view: _View) -> bytes:
        [domid] = split_args(msg.payload, 1)
        return join_args(domain_path(parse_domid(domid)).encode())

    def _is_domain_introduced(self, conn: _Connection, msg: Message, view: _View) -> bytes:
        [domid] = split_args(msg.payload, 1)
        parse_domid(domid)
        return join_args(b"T")

    def _domain_op(self, nargs: int, special: str | None, conn: _Connection, msg: Message, view: _View) -> bytes:
        """INTRODUCE/RELEASE/RESUME/SET_TARGET: no real domains here, so only validate and acknowledge."""
        args = split_args(msg.payload, nargs)
        parse_domid(args[0])
        if special is not None:
            self._changed(self._tree, _Change(special))
        return _OK

    def _control(self, conn: _Connection, msg: Message, view: _View) -> bytes:
        command, *args = split_args(msg.payload)
        if command == b"print":
            log.info("client says: %s", b" ".join(args).decode("ascii", "replace"))
            return _OK
        raise XenStoreError("EINVAL")


def _remove_stale_socket(path: str) -> None:
    """Unlink ``path`` if it is a socket nobody listens on; refuse to touch anything else."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("removing stale socket %s", path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
    raise FileExistsError(f"a xenstored is already listening on {path}")


def serve(socket_path: str) -> None:
    """Run a daemon on ``socket_path`` in this (main) thread until SIGTERM or SIGINT."""
    _remove_stale_socket(socket_path)
    server = XenStoreServer(socket_path)

    def stop(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d, stopping", signum)
        server.shutdown()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.serve_forever()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_command(argv: Sequence[str], env: Mapping[str, str], runtime: object, logs: object,
                out: Callable[[str], None], prog: str) -> tuple[int, None]:
    """``vif-hotplug xenstored --socket PATH`` as the registry runs it (:mod:`vif_hotplug.registry`)."""
    import argparse

    p = argparse.ArgumentParser(
        prog=prog, allow_abbrev=False,
        description="Serve the XenStore wire protocol (xs_wire.h) on a Unix socket, for machines without Xen. "
        "Clients: xenstore-utils with XENSTORED_PATH=PATH, vif-route-qubes.",
    )
    p.add_argument("--socket", required=True, metavar="PATH", help="Unix socket to listen on (replaced if stale)")
    try:
        args = p.parse_args(list(argv))
    except SystemExit as exc:
        return (exc.code if isinstance(exc.code, int) else 2), None
    try:
        serve(args.socket)
    except OSError as exc:
        log.error("cannot serve on %s: %s", args.socket, exc.strerror or exc)
        return 1, None
    return 0, None
