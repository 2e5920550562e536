"""A synchronous XenStore client on the wire protocol of :mod:`.xs_wire`, with a deadline on every request.

Why not pyxs: its client runs a router thread per connection, waits for a
reply forever (a hung xenstored would hang every VM start), and when the
store answers a request with a wrong request id or closes the connection,
the router thread prints its traceback to stderr before the caller learns
anything; it also costs an extra thread and ~10 ms of imports per event
(README, Performance). Here one request is one write and blocking reads on
the same socket until the reply with its request id arrives, or the
deadline passes: every failure is one :class:`XenStoreUnavailable` line.

Both transports of a driver domain speak the same protocol: xenstored's
Unix socket, and the ``/dev/xen/xenbus`` device of a domain that has no
local daemon (a message per ``write``, replies per ``read``).
"""

from __future__ import annotations

import os
import select
import socket
import time
from types import TracebackType

from ..core.errors import XenStoreUnavailable
from .xs_wire import Decoder, Message, Op, WireError, encode, join_args, parse_error_payload

DEFAULT_TIMEOUT = 5.0
_SOCKET_CANDIDATES = ("/var/run/xenstored/socket", "/run/xenstored/socket")
XENBUS_DEVICE = "/dev/xen/xenbus"
_READ = 65536


def default_endpoint(exists: object = os.path.exists) -> tuple[str, str]:
    """(``"unix"`` | ``"xenbus"``, path): the daemon's socket if there is one, else the xenbus device."""
    for path in _SOCKET_CANDIDATES:
        if exists(path):  # type: ignore[operator]
            return "unix", path
    return "xenbus", XENBUS_DEVICE


class XenStore:
    """A XenStore connection, opened by :meth:`connect` (or ``with``).

    Paths may be relative (resolved by xenstored against this domain's home).
    Values are ``str``; a missing key reads as ``None``. Every failure, a
    deadline passed included, raises :class:`XenStoreUnavailable`.
    """

    def __init__(self, endpoint: tuple[str, str], timeout: float = DEFAULT_TIMEOUT) -> None:
        self._kind, self.path = endpoint
        self._timeout = timeout
        self._fd: int | None = None
        self._sock: socket.socket | None = None
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

    def connect(self) -> None:
        if self._fd is not None:
            return
        try:
            if self._kind == "unix":
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
                sock.settimeout(self._timeout)
                try:
                    sock.connect(self.path)
                except BaseException:
                    sock.close()
                    raise
                sock.setblocking(False)
                self._sock, self._fd = sock, sock.fileno()
            else:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        except TimeoutError:
            raise XenStoreUnavailable(f"cannot connect to XenStore at {self.path}: timed out") from None
        except OSError as exc:
            raise XenStoreUnavailable(f"cannot connect to XenStore at {self.path}: {exc.strerror or exc}") from None
        self._decoder = Decoder()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        elif self._fd is not None:
            os.close(self._fd)
        self._sock, self._fd = None, None

    def _fail(self, message: str) -> XenStoreUnavailable:
        # The stream is out of step (or gone): no later request may trust it.
        self.close()
        return XenStoreUnavailable(f"XenStore at {self.path}: {message}")

    def request(self, op: Op, *args: bytes, raw_tail: bytes | None = None) -> bytes:
        """Send one request and return its reply payload; ``KeyError`` for ENOENT.

        ``raw_tail`` follows the NUL-terminated ``args`` as is (a written value
        carries no terminator).
        """
        reply = self._exchange([(op, join_args(*args) + (raw_tail or b""))])[0]
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def _exchange(self, requests: list[tuple[Op, bytes]]) -> list[bytes | BaseException]:
        """Send every request at once, then take their replies, which come in order.

        One round trip for all of them; a reply is its payload, or the
        ``KeyError`` (ENOENT) / ``XenStoreUnavailable`` it stands for.
        """
        if self._fd is None:
            self.connect()
        assert self._fd is not None
        ids: list[int] = []
        data = b""
        for op, payload in requests:
            self._req_id = (self._req_id + 1) & 0xFFFFFFFF
            ids.append(self._req_id)
            data += encode(Message(op, self._req_id, 0, payload))
        deadline = time.monotonic() + self._timeout
        out: list[bytes | BaseException] = []
        try:
            while data:
                self._wait(select.POLLOUT, deadline)
                try:
                    data = data[os.write(self._fd, data):]
                except (BlockingIOError, InterruptedError):
                    continue  # poll's readiness was spurious: wait again, within the deadline
            while len(out) < len(requests):
                message = self._decoder.next_message()
                if message is None:
                    self._wait(select.POLLIN, deadline)
                    try:
                        chunk = os.read(self._fd, _READ)
                    except (BlockingIOError, InterruptedError):
                        continue
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
                    name = parse_error_payload(message.payload)
                    out.append(KeyError(name) if name == "ENOENT"
                               else XenStoreUnavailable(f"XenStore {op.name.lower()} failed: {name}"))
                elif message.type != op:
                    raise self._fail(f"answered {op.name} with message type {message.type}")
                else:
                    out.append(message.payload)
            return out
        except WireError as exc:
            raise self._fail(f"malformed reply: {exc}") from None
        except OSError as exc:
            raise self._fail(str(exc.strerror or exc)) from None

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

    def read(self, path: str) -> str | None:
        try:
            raw = self.request(Op.READ, path.encode())
        except KeyError:
            return None
        # Keep going with a value validation will reject and name.
        return raw.decode("utf-8", "backslashreplace")

    def read_many(self, paths: list[str]) -> list[str | None]:
        """:meth:`read` of every path in one round trip (requests pipelined)."""
        out: list[str | None] = []
        for reply in self._exchange([(Op.READ, join_args(p.encode())) for p in paths]):
            if isinstance(reply, KeyError):
                out.append(None)
            elif isinstance(reply, BaseException):
                raise reply
            else:
                out.append(reply.decode("utf-8", "backslashreplace"))
        return out

    def write(self, path: str, value: str) -> None:
        self.request(Op.WRITE, path.encode(), raw_tail=value.encode())

    def directory(self, path: str) -> list[str]:
        """Child names of ``path`` (empty when it does not exist)."""
        try:
            raw = self.request(Op.DIRECTORY, path.encode())
        except KeyError:
            return []
        return [n.decode("utf-8", "backslashreplace") for n in raw.split(b"\0") if n]

    def remove(self, path: str) -> None:
        try:
            self.request(Op.RM, path.encode())
        except KeyError:
            pass
