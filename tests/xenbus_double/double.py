"""A stand-in for Linux's xenbus device (``/dev/xen/xenbus``), served over FUSE with a xenstored behind it.

A driver domain reaches XenStore through the kernel's xenbus device; this
machine has no Xen, so this double plays the kernel's part: a FUSE
filesystem whose one file behaves as ``drivers/xen/xenbus/xenbus_dev_frontend.c``
(Linux 6.x, and the blocking ``write`` of kernels before 4.11 on request),
forwarding every request to a xenstored on a Unix socket (the embedded
:class:`vif_hotplug.lab.xenstored.XenStoreServer`, or a hostile test server)
the way the kernel forwards it over its ring: one connection per open file.

The rules it enforces (function names of xenbus_dev_frontend.c):

* ``xenbus_file_poll``: readable (POLLIN|POLLRDNORM) while a reply is
  queued, nothing otherwise; never writable.
* ``xenbus_file_write``: bytes are buffered until one complete message
  (16-byte header and ``len`` bytes) is there; that message is acted on and
  the buffer emptied (``u->len = 0``), so whatever followed it in the same
  ``write()`` is gone, yet ``write()`` returns the full length (``rc = len``).
  A write that would take the buffer past ``XENSTORE_PAYLOAD_MAX`` (4096)
  bytes fails with EINVAL and drops the partial message
  (``len > sizeof(u->u.buffer) - u->len``); a header declaring more than
  fits fails with E2BIG (``sizeof(u->u.msg) + u->u.msg.len > sizeof(u->u.buffer)``).
* Newer kernels queue the request and return (``xenbus_dev_request_and_reply``
  -> ``xenbus_dev_queue_reply``); older ones (before 4.11) answered inside
  ``write()``: ``blocking_write=True`` holds each write until its reply is
  queued.
* ``xenbus_file_read``: returns what is queued, up to the caller's size,
  across message boundaries; without O_NONBLOCK it waits for a reply, with
  it EAGAIN. ``read_limit`` cuts every read shorter still (beyond the
  driver, which returns all it has: it makes the client reassemble pieces).
* ``xenbus_file_open``: ENOENT when the domain has no XenStore event channel
  (``xen_store_evtchn == 0``): ``no_event_channel=True``.
* Replies reach the file only whole and only for a request it sent
  (``xenbus_comms.c`` ``process_msg`` matches each reply to a pending
  request by id and frees one nobody waits for); watch events pass.

Where a client breaks a rule the double does what the driver does (drop,
EINVAL, E2BIG) and also records it in :attr:`XenbusDouble.violations`,
which the tests check: the driver's silence must not hide a client bug.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from vif_hotplug.xen.xs_wire import HEADER_SIZE, XENSTORE_PAYLOAD_MAX, Decoder, Header, Op, WireError, encode

from . import fuse_wire as fw
from .fuse_wire import Opcode

log = logging.getLogger(__name__)

#: ``union { struct xsd_sockmsg msg; char buffer[XENSTORE_PAYLOAD_MAX]; } u``: header and payload together.
BUFFER_SIZE = XENSTORE_PAYLOAD_MAX
_POLLIN_RDNORM = 0x001 | 0x040  # POLLIN | POLLRDNORM
_MAX_WRITE = 128 * 1024
_HOLDER = Path(__file__).with_name("holder.py")


@dataclass(eq=False)
class _File:
    """One open of the device: ``struct xenbus_file_priv`` plus the connection standing for the kernel's ring."""

    fh: int
    backend: socket.socket | None
    decoder: Decoder = field(default_factory=Decoder)
    buffer: bytearray = field(default_factory=bytearray)  # u->u.buffer, u->len
    queued: bytearray = field(default_factory=bytearray)  # read_buffers
    reads: collections.deque[tuple[int, int]] = field(default_factory=collections.deque)  # (unique, size) waiting
    #: Request ids sent and not answered, in order; with blocking writes, the write waiting on each (its
    #: unique and size), or None.
    pending: collections.deque[tuple[int, tuple[int, int] | None]] = field(default_factory=collections.deque)
    kh: int | None = None  # the kernel's poll handle, to wake when a reply is queued


class XenbusDouble:
    """The xenbus device at :attr:`path`, backed by the xenstored listening on ``store``.

    :meth:`start` mounts it in a private mount namespace (never the host's):
    with ``dev=True`` at ``/dev/xen/xenbus`` of a private ``/dev``, for
    processes entered with ``nsenter --mount=`` :attr:`mount_ns`; otherwise
    on a file in a temporary directory. :attr:`path` reaches the file from
    the caller's own namespace, through ``/proc/PID/root``. Needs root.
    """

    def __init__(self, store: str, *, blocking_write: bool = False, read_limit: int | None = None,
                 no_event_channel: bool = False) -> None:
        self.store = store
        self.blocking_write = blocking_write
        self.read_limit = read_limit
        self.no_event_channel = no_event_channel
        #: Every rule a client broke: what it was and what the driver made of it.
        self.violations: list[str] = []
        self.requests = 0
        self._files: dict[int, _File] = {}
        self._by_backend: dict[socket.socket, _File] = {}
        self._next_fh = 1
        self._lock = threading.Lock()
        self._fuse_fd = -1
        self._wake_r, self._wake_w = -1, -1
        self._selector = selectors.DefaultSelector()
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._holder: subprocess.Popen[str] | None = None
        self._tmp: str | None = None
        self._inside = ""

    # -- lifecycle ---------------------------------------------------------

    @property
    def mount_ns(self) -> str:
        assert self._holder is not None
        return f"/proc/{self._holder.pid}/ns/mnt"

    @property
    def path(self) -> str:
        """The device from the caller's namespace."""
        assert self._holder is not None
        return f"/proc/{self._holder.pid}/root{self._inside}"

    def start(self, dev: bool = False) -> XenbusDouble:
        self._fuse_fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._tmp = tempfile.mkdtemp(prefix="xenbus-double-")
        if dev:
            staging = os.path.join(self._tmp, "dev")
            os.mkdir(staging)
            where, self._inside = ["--dev", staging], "/dev/xen/xenbus"
        else:
            self._inside = os.path.join(self._tmp, "xenbus")
            Path(self._inside).touch()
            where = ["--file", self._inside]
        self._holder = subprocess.Popen(
            [sys.executable, str(_HOLDER), "--fuse-fd", str(self._fuse_fd), *where],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            pass_fds=(self._fuse_fd,),
        )
        assert self._holder.stdout is not None
        if self._holder.stdout.readline().strip() != "ready":
            err = self._holder.stderr.read() if self._holder.stderr else ""
            self.stop()
            raise RuntimeError(f"the xenbus double did not mount: {err.strip()}")
        # Only now: /dev/fuse refuses reads (EPERM) until a mount owns it; the kernel's INIT waits meanwhile.
        for target in (self._serve_fuse, self._serve_backends):
            thread = threading.Thread(target=target, name=f"xenbus-double-{target.__name__}", daemon=True)
            thread.start()
            self._threads.append(thread)
        # The kernel made the root inode with size 0 and asks for attributes only when it needs them:
        # ask now, so it learns FILE_SIZE before the first write (see fuse_wire.FILE_SIZE).
        os.stat(self.path)
        return self

    def stop(self) -> None:
        """Unmount (the namespace goes with its holder) and abort every request still waiting. Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._holder is not None:
            with contextlib.suppress(OSError):
                if self._holder.stdin is not None:
                    self._holder.stdin.close()
            try:
                self._holder.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._holder.kill()
                self._holder.wait()
            for stream in (self._holder.stdout, self._holder.stderr):
                if stream is not None:
                    stream.close()
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
        for thread in self._threads:
            thread.join(timeout=10)
        # Closing the last descriptor of the connection aborts it: whatever still waits fails (ENOTCONN).
        for fd in (self._fuse_fd, self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._fuse_fd = self._wake_r = self._wake_w = -1
        for f in list(self._files.values()):
            if f.backend is not None:
                f.backend.close()
        self._files.clear()
        self._selector.close()
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                for name in ("xenbus", "dev"):
                    p = os.path.join(self._tmp, name)
                    if os.path.isdir(p):
                        os.rmdir(p)
                    elif os.path.exists(p):
                        os.unlink(p)
                os.rmdir(self._tmp)

    def __enter__(self) -> XenbusDouble:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # -- the FUSE side ---------------------------------------------------------

    def _send(self, data: bytes) -> None:
        try:
            os.write(self._fuse_fd, data)
        except OSError as exc:
            # ENOENT: the request was interrupted and is gone; ENODEV: unmounted meanwhile.
            log.debug("reply not taken: %s", exc)

    def _serve_fuse(self) -> None:
        buf_size = max(fw.MIN_READ_BUFFER, _MAX_WRITE + 4096)
        poller = selectors.DefaultSelector()
        poller.register(self._fuse_fd, selectors.EVENT_READ)
        poller.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stop.is_set():
                poller.select()
                try:
                    data = os.read(self._fuse_fd, buf_size)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    if exc.errno == errno.ENODEV:  # unmounted
                        return
                    raise
                request = fw.parse_request(data)
                with self._lock:
                    try:
                        answer = self._dispatch(request)
                    except Exception:  # a bug here must fail the call, not hang the file
                        log.exception("xenbus double: opcode %d failed", request.opcode)
                        answer = fw.reply(request.unique, error=errno.EIO)
                if answer is not None and request.opcode not in fw.NO_REPLY:
                    self._send(answer)
        finally:
            poller.close()

    def _dispatch(self, r: fw.Request) -> bytes | None:
        """The reply to ``r``, or None when it is held (a blocking read or write) or takes none."""
        op = r.opcode
        if op == Opcode.INIT:
            return fw.reply(r.unique, fw.init_reply(r.body, _MAX_WRITE))
        if op in (Opcode.GETATTR, Opcode.SETATTR):
            return fw.reply(r.unique, fw.file_attr(0o600, int(time.time())))
        if op == Opcode.OPEN:
            return self._open(r)
        if op == Opcode.READ:
            fh, _offset, size, _read_flags, _owner, flags, _pad = fw.READ_IN.unpack_from(r.body)
            return self._read(r.unique, self._files[fh], size, flags)
        if op == Opcode.WRITE:
            fh, _offset, size, _write_flags, _owner, _flags, _pad = fw.WRITE_IN.unpack_from(r.body)
            data = r.body[fw.WRITE_IN.size:fw.WRITE_IN.size + size]
            return self._write(r.unique, self._files[fh], data)
        if op == Opcode.POLL:
            fh, kh, flags, _events = fw.POLL_IN.unpack_from(r.body)
            f = self._files[fh]
            if flags & fw.POLL_SCHEDULE_NOTIFY:
                f.kh = kh
            # xenbus_file_poll: readable while something is queued, else nothing; never writable.
            return fw.reply(r.unique, fw.POLL_OUT.pack(_POLLIN_RDNORM if f.queued else 0, 0))
        if op == Opcode.INTERRUPT:
            self._interrupt(fw.INTERRUPT_IN.unpack_from(r.body)[0])
            return None
        if op == Opcode.RELEASE:
            self._release(fw.RELEASE_IN.unpack_from(r.body)[0])
            return fw.reply(r.unique)
        if op in (Opcode.FLUSH, Opcode.ACCESS):
            return fw.reply(r.unique)
        if op == Opcode.STATFS:
            return fw.reply(r.unique, bytes(fw.STATFS_OUT_SIZE))
        if op == Opcode.IOCTL:
            return fw.reply(r.unique, error=errno.ENOTTY)  # the frontend device has no ioctl
        if op in (Opcode.FORGET, Opcode.BATCH_FORGET):
            return None
        if op == Opcode.DESTROY:
            return fw.reply(r.unique)
        return fw.reply(r.unique, error=errno.ENOSYS)

    def _open(self, r: fw.Request) -> bytes:
        if self.no_event_channel:
            return fw.reply(r.unique, error=errno.ENOENT)  # xenbus_file_open: xen_store_evtchn == 0
        backend: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        assert backend is not None
        try:
            backend.connect(self.store)
            backend.setblocking(False)
        except OSError as exc:
            # The kernel's ring is there even when xenstored is not: requests just get no answer.
            log.debug("xenstored at %s unreachable: %s", self.store, exc)
            backend.close()
            backend = None
        f = _File(self._next_fh, backend)
        self._next_fh += 1
        self._files[f.fh] = f
        if backend is not None:
            self._by_backend[backend] = f
            # epoll: a descriptor added while the backend thread waits is waited on at once.
            self._selector.register(backend, selectors.EVENT_READ, f)
        flags = fw.FOPEN_DIRECT_IO | fw.FOPEN_NONSEEKABLE | fw.FOPEN_STREAM | fw.FOPEN_PARALLEL_DIRECT_WRITES
        return fw.reply(r.unique, fw.OPEN_OUT.pack(f.fh, flags, 0))

    def _release(self, fh: int) -> None:
        f = self._files.pop(fh, None)
        if f is not None and f.backend is not None:
            self._by_backend.pop(f.backend, None)
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(f.backend)
            f.backend.close()

    def _read(self, unique: int, f: _File, size: int, flags: int) -> bytes | None:
        if f.queued:
            return fw.reply(unique, self._take(f, size))
        if flags & os.O_NONBLOCK:
            return fw.reply(unique, error=errno.EAGAIN)
        f.reads.append((unique, size))  # wait_event_interruptible(u->read_waitq, ...)
        return None

    def _take(self, f: _File, size: int) -> bytes:
        n = min(size, len(f.queued), self.read_limit or size)
        data = bytes(f.queued[:n])
        del f.queued[:n]
        return data

    def _write(self, unique: int, f: _File, data: bytes) -> bytes | None:
        ok = fw.reply(unique, fw.WRITE_OUT.pack(len(data), 0))
        if not data:
            return ok
        if len(data) > BUFFER_SIZE - len(f.buffer):
            self.violations.append(f"write of {len(data)} bytes onto {len(f.buffer)} buffered: EINVAL")
            f.buffer.clear()  # "On error, dump existing buffer"
            return fw.reply(unique, error=errno.EINVAL)
        f.buffer += data
        if len(f.buffer) < HEADER_SIZE:
            return ok
        header = Header.unpack(bytes(f.buffer[:HEADER_SIZE]))
        if HEADER_SIZE + header.length > BUFFER_SIZE:
            self.violations.append(f"header declaring {header.length} bytes: E2BIG")
            f.buffer.clear()
            return fw.reply(unique, error=errno.E2BIG)
        end = HEADER_SIZE + header.length
        if len(f.buffer) < end:
            return ok
        message, rest = bytes(f.buffer[:end]), len(f.buffer) - end
        f.buffer.clear()  # "Buffered message consumed": bytes after the message go with it
        if rest:
            self.violations.append(f"{rest} byte(s) after the first message of a write dropped")
        self.requests += 1
        f.pending.append((header.req_id, (unique, len(data)) if self.blocking_write else None))
        if f.backend is not None:
            try:
                f.backend.sendall(message)
            except OSError as exc:
                log.debug("xenstored connection failed: %s", exc)
        return None if self.blocking_write else ok

    def _interrupt(self, unique: int) -> None:
        """A signal reached the caller of a request we hold: it ends with EINTR (or it is answered already)."""
        for f in self._files.values():
            for i, (waiting, _size) in enumerate(f.reads):
                if waiting == unique:
                    del f.reads[i]
                    self._send(fw.reply(unique, error=errno.EINTR))
                    return
            for i, (req_id, writer) in enumerate(f.pending):
                if writer is not None and writer[0] == unique:
                    f.pending[i] = (req_id, None)
                    self._send(fw.reply(unique, error=errno.EINTR))
                    return

    # -- the xenstored side ------------------------------------------------------

    def _serve_backends(self) -> None:
        while not self._stop.is_set():
            for key, _mask in self._selector.select():
                if key.data is None:
                    continue  # the stop wakeup, left in the pipe for the FUSE thread too
                self._on_backend(key.data)

    def _on_backend(self, f: _File) -> None:
        assert f.backend is not None
        try:
            data = f.backend.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        with self._lock:
            if f.fh not in self._files:
                return
            if not data:
                # xenstored gone: the kernel's requests stay unanswered, nothing reaches the file.
                self._selector.unregister(f.backend)
                return
            f.decoder.feed(data)
            try:
                for message in f.decoder:
                    self._deliver(f, message.type, message.req_id, encode(message))
            except WireError as exc:
                # process_msg refuses a header announcing more than a payload: the stream is lost.
                log.debug("xenstored sent garbage: %s", exc)
                self._selector.unregister(f.backend)

    def _deliver(self, f: _File, mtype: int, req_id: int, raw: bytes) -> None:
        writer: tuple[int, int] | None = None
        if mtype != Op.WATCH_EVENT:
            for i, (pending_id, waiting) in enumerate(f.pending):
                if pending_id == req_id:
                    del f.pending[i]
                    writer = waiting
                    break
            else:
                log.debug("reply to request %d nobody sent: dropped", req_id)
                return
        f.queued += raw
        while f.reads and f.queued:
            unique, size = f.reads.popleft()
            self._send(fw.reply(unique, self._take(f, size)))
        if writer is not None:  # the old kernel's write returns once the reply is queued
            self._send(fw.reply(writer[0], fw.WRITE_OUT.pack(writer[1], 0)))
        if f.queued and f.kh is not None:
            self._send(fw.poll_wakeup(f.kh))


@contextlib.contextmanager
def running_double(store: str, **options: object) -> Iterator[XenbusDouble]:
    double = XenbusDouble(store, **options)  # type: ignore[arg-type]
    double.start()
    try:
        yield double
    finally:
        double.stop()
