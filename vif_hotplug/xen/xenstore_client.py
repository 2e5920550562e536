"""A synchronous XenStore client on the wire protocol of :mod:`.xs_wire`, with a deadline on every request.

Why not pyxs: its client runs a router thread per connection, waits for a
reply forever (a hung xenstored would hang every VM start), and when the
store answers a request with a wrong request id or closes the connection,
the router thread prints its traceback to stderr before the caller learns
anything; it also costs an extra thread and ~10 ms of imports per event
(README, Performance). Here a request is written, then its reply read as it
arrives, until the reply with its request id is complete or the deadline
passes: every failure is one :class:`XenStoreUnavailable` line.

Two transports speak the protocol (docs/xenstore.md):

* xenstored's Unix socket, a byte stream: requests may be written back to
  back in one ``send`` (pipelining), the daemon reads them in order.
* The kernel's xenbus device (``/dev/xen/xenbus``; ``/proc/xen/xenbus``
  where xenfs is mounted the old way), which a driver domain without a local
  daemon uses. Linux's ``drivers/xen/xenbus/xenbus_dev_frontend.c`` acts on
  one message per ``write()`` and silently drops whatever followed it in the
  same call, never reports the device writable to ``poll``, and on kernels
  before 4.11 answers inside ``write()`` (it blocks until xenstored replied).
  So every message is its own ``write()``, made on a thread of the
  connection (:class:`_Writer`) while the caller waits with its deadline;
  replies are read as ``poll`` reports them readable.

Which endpoint, in libxenstore's order (``xs_open``): ``XENSTORED_PATH``
(a socket, or else a device, by ``stat`` as ``get_handle`` decides), the
daemon's socket, the xenbus device.
"""

from __future__ import annotations

import os
import select
import socket
import stat
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING

from ..core.errors import XenStoreUnavailable
from .xs_wire import (
    HEADER_SIZE,
    XENSTORE_PAYLOAD_MAX,
    Decoder,
    Message,
    Op,
    PayloadTooLarge,
    WireError,
    encode,
    join_args,
    parse_error_payload,
)

if TYPE_CHECKING:
    import queue

DEFAULT_TIMEOUT = 5.0
_SOCKET_CANDIDATES = ("/var/run/xenstored/socket", "/run/xenstored/socket")
XENBUS_DEVICE = "/dev/xen/xenbus"
#: Where xenfs mounted the old way puts it (libxenstore's xs_domain_dev falls back to it).
XENBUS_PROC = "/proc/xen/xenbus"
_READ = 65536
#: xenbus_dev_frontend.c buffers a request in ``char buffer[XENSTORE_PAYLOAD_MAX]``, header included.
_DEVICE_MESSAGE_MAX = XENSTORE_PAYLOAD_MAX
_SOCKET_MESSAGE_MAX = HEADER_SIZE + XENSTORE_PAYLOAD_MAX
#: How many times a directory listing restarts because it changed while being paged, before giving up.
_PAGING_RESTARTS = 8
#: Names of one directory listing at most (a payload per page: 16 MiB of names).
_PAGES_MAX = 4096

Endpoint = tuple[str, str]


def default_endpoint(xenstored_path: str | None = None, exists: Callable[[str], bool] = os.path.exists) -> Endpoint:
    """Where XenStore is: ``XENSTORED_PATH`` if given, else the daemon's socket, else the xenbus device.

    ``("path", p)`` for ``XENSTORED_PATH`` (socket or device, decided at
    connect), ``("unix", p)`` for the daemon, ``("xenbus", p)`` for the device:
    ``/dev/xen/xenbus``, or ``/proc/xen/xenbus`` when only that exists.
    """
    if xenstored_path:
        return "path", xenstored_path
    for path in _SOCKET_CANDIDATES:
        if exists(path):
            return "unix", path
    if not exists(XENBUS_DEVICE) and exists(XENBUS_PROC):
        return "xenbus", XENBUS_PROC
    return "xenbus", XENBUS_DEVICE


# Plain slotted classes, not dataclasses: this module is on every event's import path.
class _Refused:
    """An ``XS_ERROR`` reply: the errno name xenstored gave."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


_Reply = bytes | _Refused


class _Job:
    """Messages for the writer thread, and how their writing ended."""

    __slots__ = ("done", "error", "messages")

    def __init__(self, messages: list[bytes]) -> None:
        self.messages = messages
        self.done = threading.Event()
        self.error: OSError | None = None


class _Writer:
    """Writes a device connection's requests on a thread of its own, one message per ``write()``.

    On kernels before 4.11 the device's ``write()`` returns only once
    xenstored answered, and ``poll`` cannot bound a ``write`` already under
    way: the caller waits for the thread with its own deadline instead, so a
    store that hangs inside ``write()`` fails like any other. The thread
    owns a duplicate of the descriptor: however long it stays stuck, it never
    writes to a number the closed connection gave back.
    """

    def __init__(self, fd: int) -> None:
        import queue  # only a device connection needs it

        self._fd = os.dup(fd)
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="xenbus-writer", daemon=True)
        self._thread.start()

    def write(self, messages: list[bytes], deadline: float) -> bool:
        """Write ``messages`` in order; False when the deadline passed first. Raises the write's OSError."""
        job = _Job(messages)
        self._jobs.put(job)
        if not job.done.wait(max(0.0, deadline - time.monotonic())):
            return False
        if job.error is not None:
            raise job.error
        return True

    def close(self) -> None:
        self._jobs.put(None)

    def _run(self) -> None:
        try:
            while (job := self._jobs.get()) is not None:
                try:
                    for message in job.messages:
                        view = memoryview(message)
                        while view:
                            # The driver keeps a partial message until it is complete: finish
                            # this one, and never let two share a write.
                            view = view[os.write(self._fd, view):]
                except OSError as exc:
                    job.error = exc
                job.done.set()
        finally:
            _close_quietly(self._fd)


def _close_quietly(fd: int) -> None:
    # Closing a device whose store went away can report that (FUSE says ENOTCONN); it is closed anyway.
    try:
        os.close(fd)
    except OSError:
        pass


class XenStore:
    """A XenStore connection, opened by :meth:`connect` (or ``with``), or by the first request.

    Paths may be relative (resolved by xenstored against this domain's home).
    Values are ``str``; a missing key reads as ``None``. Every failure, a
    deadline passed included, raises :class:`XenStoreUnavailable`; so does
    every error reply to a write (only reads, listings and removals know
    what "absent" means).
    """

    def __init__(self, endpoint: Endpoint, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._kind, self.path = endpoint
        self._timeout = timeout
        self._fd: int | None = None
        self._sock: socket.socket | None = None
        self._writer: _Writer | None = None
        self._max_message = _SOCKET_MESSAGE_MAX
        self._decoder = Decoder()
        self._req_id = 0

    def __enter__(self) -> XenStore:
        self.connect()
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._fd is not None

    @property
    def transport(self) -> str:
        """``"socket"`` or ``"device"`` once connected (``XENSTORED_PATH`` may name either), else ``""``."""
        if self._fd is None:
            return ""
        return "device" if self._writer is not None else "socket"

    def connect(self) -> None:
        if self._fd is not None:
            return
        try:
            if self._is_socket():
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
                sock.settimeout(self._timeout)
                try:
                    sock.connect(self.path)
                except BaseException:
                    sock.close()
                    raise
                sock.setblocking(False)
                self._sock, self._fd, self._max_message = sock, sock.fileno(), _SOCKET_MESSAGE_MAX
            else:
                # O_NONBLOCK governs reads only: the driver's write never says EAGAIN.
                fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
                try:
                    self._writer = _Writer(fd)
                except RuntimeError as exc:  # no thread to be had
                    os.close(fd)
                    raise XenStoreUnavailable(f"cannot connect to XenStore at {self.path}: {exc}") from None
                except BaseException:
                    os.close(fd)
                    raise
                self._fd, self._max_message = fd, _DEVICE_MESSAGE_MAX
        except TimeoutError:
            raise XenStoreUnavailable(f"cannot connect to XenStore at {self.path}: timed out") from None
        except OSError as exc:
            raise XenStoreUnavailable(f"cannot connect to XenStore at {self.path}: {exc.strerror or exc}") from None
        self._decoder = Decoder()

    def _is_socket(self) -> bool:
        if self._kind == "unix":
            return True
        if self._kind == "xenbus":
            return False
        # XENSTORED_PATH: libxenstore's get_handle connects to a socket, opens anything else.
        try:
            return stat.S_ISSOCK(os.stat(self.path).st_mode)
        except OSError:
            return True  # the connect names the missing path

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._sock is not None:
            self._sock.close()
        elif self._fd is not None:
            _close_quietly(self._fd)
        self._sock, self._fd, self._writer = None, None, None

    def _fail(self, message: str) -> XenStoreUnavailable:
        # The stream is out of step (or gone): no later request may trust it.
        self.close()
        return XenStoreUnavailable(f"XenStore at {self.path}: {message}")

    # -- the exchange ----------------------------------------------------------------

    def request(self, op: Op, *args: bytes, raw_tail: bytes | None = None) -> bytes:
        """Send one request and return its reply payload; any error reply (ENOENT too) is one line.

        ``raw_tail`` follows the NUL-terminated ``args`` as is (a written value
        carries no terminator).
        """
        reply = self._exchange([(op, join_args(*args) + (raw_tail or b""))])[0]
        if isinstance(reply, _Refused):
            raise XenStoreUnavailable(f"XenStore {op.name.lower()} failed: {reply.name}")
        return reply

    def _exchange(self, requests: list[tuple[Op, bytes]]) -> list[_Reply]:
        """Send every request, then take their replies, which come in request order.

        One wait for all of them: on the socket the requests go in one
        ``send``, on the device one ``write`` each (docs/xenstore.md, Pipelining).
        """
        self.connect()
        assert self._fd is not None
        ids: list[int] = []
        messages: list[bytes] = []
        for op, payload in requests:
            self._req_id = (self._req_id + 1) & 0xFFFFFFFF
            ids.append(self._req_id)
            try:
                wire = encode(Message(op, self._req_id, 0, payload))
            except PayloadTooLarge:
                wire = b""
            if not wire or len(wire) > self._max_message:
                raise XenStoreUnavailable(
                    f"XenStore {op.name.lower()} request of {HEADER_SIZE + len(payload)} bytes is larger than "
                    f"{self.path} takes ({self._max_message})")
            messages.append(wire)
        deadline = time.monotonic() + self._timeout
        out: list[_Reply] = []
        try:
            self._send(messages, deadline)
            while len(out) < len(requests):
                message = self._decoder.next_message()
                if message is None:
                    self._wait(select.POLLIN, deadline)
                    try:
                        chunk = os.read(self._fd, _READ)
                    except (BlockingIOError, InterruptedError):
                        continue  # poll's readiness was spurious: wait again, within the deadline
                    if not chunk:
                        raise self._fail("connection closed before the reply")
                    self._decoder.feed(chunk)
                    continue
                if message.type == Op.WATCH_EVENT:
                    continue  # not ours to handle here
                op, req_id = requests[len(out)][0], ids[len(out)]
                if message.req_id != req_id:
                    raise self._fail(f"reply to request {message.req_id} while waiting for {req_id}")
                if message.type == Op.ERROR:
                    out.append(_Refused(parse_error_payload(message.payload)))
                elif message.type != op:
                    raise self._fail(f"answered {op.name} with message type {message.type}")
                else:
                    out.append(message.payload)
            return out
        except WireError as exc:
            raise self._fail(f"malformed reply: {exc}") from None
        except OSError as exc:
            raise self._fail(str(exc.strerror or exc)) from None

    def _send(self, messages: list[bytes], deadline: float) -> None:
        assert self._fd is not None
        if self._writer is not None:
            if not self._writer.write(messages, deadline):
                raise self._fail(f"did not answer within {self._timeout:g}s")
            return
        data = b"".join(messages)
        while data:
            self._wait(select.POLLOUT, deadline)
            try:
                data = data[os.write(self._fd, data):]
            except (BlockingIOError, InterruptedError):
                continue

    def _wait(self, event: int, deadline: float) -> None:
        assert self._fd is not None
        poller = select.poll()
        poller.register(self._fd, event)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._fail(f"did not answer within {self._timeout:g}s")
            if poller.poll(left * 1000):
                return

    # -- operations ----------------------------------------------------------------------

    @staticmethod
    def _value(path: str, reply: _Reply) -> str | None:
        if isinstance(reply, _Refused):
            if reply.name == "ENOENT":
                return None
            raise XenStoreUnavailable(f"XenStore read {path} failed: {reply.name}")
        # Keep going with a value validation will reject and name.
        return reply.decode("utf-8", "backslashreplace")

    def read(self, path: str) -> str | None:
        return self._value(path, self._exchange([(Op.READ, join_args(path.encode()))])[0])

    def read_many(self, paths: list[str]) -> list[str | None]:
        """:meth:`read` of every path with one wait for all the replies."""
        replies = self._exchange([(Op.READ, join_args(p.encode())) for p in paths])
        return [self._value(p, r) for p, r in zip(paths, replies, strict=True)]

    def write(self, path: str, value: str) -> None:
        """Write ``value`` at ``path``; every error reply, ENOENT included, is :class:`XenStoreUnavailable`."""
        reply = self._exchange([(Op.WRITE, join_args(path.encode()) + value.encode())])[0]
        if isinstance(reply, _Refused):
            raise XenStoreUnavailable(f"XenStore write {path} failed: {reply.name}")

    def remove(self, path: str) -> None:
        """Remove ``path`` and everything below it; nothing to do when it is absent."""
        reply = self._exchange([(Op.RM, join_args(path.encode()))])[0]
        if isinstance(reply, _Refused) and reply.name != "ENOENT":
            raise XenStoreUnavailable(f"XenStore rm {path} failed: {reply.name}")

    def directory(self, path: str) -> list[str]:
        """Child names of ``path`` (empty when it does not exist).

        A listing longer than one payload is answered E2BIG; it is then read
        in pages with ``DIRECTORY_PART`` (Xen 4.9+), as libxenstore's
        ``xs_directory`` does.
        """
        reply = self._exchange([(Op.DIRECTORY, join_args(path.encode()))])[0]
        if isinstance(reply, _Refused):
            if reply.name == "ENOENT":
                return []
            if reply.name != "E2BIG":
                raise XenStoreUnavailable(f"XenStore directory {path} failed: {reply.name}")
            listing = self._directory_part(path)
        else:
            listing = reply
        return [n.decode("utf-8", "backslashreplace") for n in listing.split(b"\0") if n]

    def _directory_part(self, path: str) -> bytes:
        """The NUL-separated listing of ``path``, page by page.

        A page is the node's generation, NUL, then whole names from byte
        ``offset`` of the listing; the last page ends with one more NUL. A
        generation that moved means the directory changed under us: start
        over from offset 0 (xs.c, ``xs_directory_part``).
        """
        restarts = 0
        while True:
            listing, generation, pages = b"", None, 0
            while True:
                reply = self._exchange([(Op.DIRECTORY_PART, join_args(path.encode(), str(len(listing)).encode()))])[0]
                if isinstance(reply, _Refused):
                    if reply.name == "ENOENT":
                        return b""
                    if reply.name in ("ENOSYS", "EINVAL"):
                        raise XenStoreUnavailable(
                            f"XenStore directory {path} failed: E2BIG (too many entries for one reply, "
                            f"and the store cannot page them: DIRECTORY_PART answered {reply.name})")
                    raise XenStoreUnavailable(f"XenStore directory {path} failed: {reply.name}")
                page_generation, nul, names = reply.partition(b"\0")
                if not nul:
                    raise self._fail("malformed reply: directory page without a generation")
                if generation is None:
                    generation = page_generation
                elif page_generation != generation:
                    break
                listing += names
                if listing == b"\0" or listing.endswith(b"\0\0"):
                    return listing[:-1]
                pages += 1
                if not names or pages > _PAGES_MAX:
                    raise self._fail(f"malformed reply: directory page {pages} of {path} adds nothing or too much")
            restarts += 1
            if restarts > _PAGING_RESTARTS:
                raise XenStoreUnavailable(f"XenStore directory {path} failed: it kept changing while being listed")
