"""A plain netlink socket: requests, dumps and batches with their answers, no library.

Shared by the rtnetlink client (:mod:`.rtnl`) and the netfilter one
(:mod:`.nfnl`). Messages follow ``linux/netlink.h``. Every request asks for
an ACK and waits for the answers carrying its own sequence number, so a
late answer to an earlier, abandoned request is skipped. Errors come back
as :class:`NetlinkError` with the kernel's errno (ipset's own codes are
above 4096) and the kernel's own words when it gave them (extended ACK).

What the kernel can do to an answer, and what happens here
(``net/netlink/af_netlink.c``):

* A dump whose objects changed while it ran carries ``NLM_F_DUMP_INTR``
  (``nl_dump_check_consistent``): it is read to its end, then redone, at
  most :data:`ATTEMPTS` times, then :class:`DumpInterrupted`.
* A datagram larger than the receive buffer: ``recv`` with ``MSG_TRUNC``
  returns its real length, so a cut one is never taken for whole; the
  buffer grows to fit, what is left of the answer is read, and a read-only
  request is redone (a change is answered by an ACK of a few dozen bytes,
  never cut).
* ``ENOBUFS``: the receive queue overflowed and an answer was dropped
  (``netlink_overrun``). The kernel answers a request while ``send`` runs
  and a dump's next part while ``recv`` runs, so what is queued then is all
  there will be: it is read without blocking; if the request's last answer
  (ACK, error or DONE) is among it, nothing of ours was lost; otherwise a
  read-only request is redone and a change fails with ``ENOBUFS``, its
  outcome unknown.
* ``NETLINK_GET_STRICT_CHK`` (Linux 4.20): without it the kernel ignores a
  dump request's header fields and sends the whole table; :attr:`strict`
  says which, and the decoders filter in userspace either way.
  ``NETLINK_CAP_ACK`` (4.3) and ``NETLINK_EXT_ACK`` (4.12) are asked for
  too; a kernel without them answers errors without text.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP_INTR = 0x10
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_DUMP = 0x300
#: Flags of an NLMSG_ERROR: the echoed request is its header only; TLVs follow.
NLM_F_CAPPED = 0x100
NLM_F_ACK_TLVS = 0x200
NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE, NLMSG_OVERRUN = 1, 2, 3, 4
NLA_F_NESTED = 0x8000
NLA_F_NET_BYTEORDER = 0x4000
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
#: The kernel filters dumps by the request's header fields (interface index):
#: an address listing of one vif stays one vif's worth of messages.
NETLINK_GET_STRICT_CHK = 12
#: Extended ACK attributes (``enum nlmsgerr_attrs``).
NLMSGERR_ATTR_MSG, NLMSGERR_ATTR_OFFS, NLMSGERR_ATTR_MISS_TYPE = 1, 2, 5

NLMSGHDR = struct.Struct("=IHHII")
RTA = struct.Struct("=HH")
_I32 = struct.Struct("=i")
_U32 = struct.Struct("=I")
#: The kernel sizes a dump's datagrams after the largest read it has seen,
#: up to 32 KiB; twice that leaves room for any single answer of ours.
RECV_BUFFER = 65536
#: How many times a request is sent before an interrupted dump or lost
#: answers become an error.
ATTEMPTS = 4
#: Plain ints: or-ing socket's IntFlag members costs microseconds a call.
_MSG_TRUNC, _MSG_DONTWAIT = int(socket.MSG_TRUNC), int(socket.MSG_DONTWAIT)

Message = tuple[int, int, bytes]
"""(type, flags, payload) of a request; NLM_F_REQUEST is added."""

#: ipset's own error codes (``linux/netfilter/ipset/ip_set.h``, ``ip_set_hash.h``).
_IPSET_ERRORS = {
    4097: "protocol version not supported",
    4098: "set type not supported",
    4099: "maximal number of sets reached",
    4100: "set in use by a kernel component",
    4101: "second set missing or its name taken",
    4102: "set types do not match",
    4103: "element already in the set, or not in it",
    4104: "invalid CIDR",
    4105: "invalid netmask",
    4106: "family not supported by the set type",
    4107: "set created without timeout support",
    4108: "set referenced",
    4109: "IPv4 address expected",
    4110: "IPv6 address expected",
    4111: "set created without counters",
    4112: "comment too long",
    4113: "invalid markmask",
    4114: "set created without skbinfo",
    4352: "set is full",
}


def error_text(code: int) -> str:
    """The text of an errno, or of one of ipset's codes above 4096."""
    if code < 4096:
        return os.strerror(code)
    what = _IPSET_ERRORS.get(code)
    return f"ipset error {code}" + (f" ({what})" if what else "")


class NetlinkError(OSError):
    """The kernel refused a request; ``errno`` is its error, ``strerror`` its text.

    ``kernel_message`` is what the kernel said in its extended ACK (also
    part of ``strerror``), ``None`` when it said nothing.
    """

    def __init__(self, code: int, text: str, *, kernel_message: str | None = None) -> None:
        super().__init__(code, text)
        self.kernel_message = kernel_message


class DumpInterrupted(NetlinkError):
    """A dump was interrupted by concurrent changes every time it was tried."""


class RawSocket(Protocol):
    """What :class:`NetlinkSocket` needs of a socket (``socket.socket``, or a test's fake)."""

    def setsockopt(self, level: int, option: int, value: int, /) -> None: ...
    def bind(self, address: tuple[int, int], /) -> None: ...
    def send(self, data: bytes, /) -> int: ...
    def recv_into(self, buffer: bytearray, nbytes: int = 0, flags: int = 0, /) -> int: ...
    def close(self) -> None: ...


def _kernel_socket(protocol: int) -> RawSocket:
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)


def attr(kind: int, value: bytes) -> bytes:
    length = RTA.size + len(value)
    return RTA.pack(length, kind) + value + b"\0" * (-length % 4)


def nested(kind: int, *parts: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(parts))


def cstr(value: str) -> bytes:
    return value.encode() + b"\0"


def u32(value: int) -> bytes:
    return _U32.pack(value)


def attrs(data: bytes, offset: int = 0) -> Iterator[tuple[int, bytes]]:
    """(type without flags, value) of each attribute from ``offset`` on; stops at a malformed one."""
    end = len(data)
    while offset + 4 <= end:
        length, kind = RTA.unpack_from(data, offset)
        if length < 4 or offset + length > end:
            return
        yield kind & 0x3FFF, data[offset + 4 : offset + length]
        offset += (length + 3) & ~3


def messages(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """(type, flags, sequence number, payload) of each message of a datagram.

    Raises :class:`NetlinkError` (``EPROTO``) on a length that does not fit.
    """
    offset, end = 0, len(data)
    while offset + NLMSGHDR.size <= end:
        length, mtype, mflags, mseq, _ = NLMSGHDR.unpack_from(data, offset)
        if length < NLMSGHDR.size or offset + length > end:
            raise NetlinkError(errno.EPROTO, f"malformed netlink answer: a message of {length} bytes "
                                             f"at offset {offset} of a {len(data)}-byte datagram")
        yield mtype, mflags, mseq, data[offset + NLMSGHDR.size : offset + length]
        offset += (length + 3) & ~3


def error_code(payload: bytes) -> int:
    """The errno of an NLMSG_ERROR or NLMSG_DONE payload (0: success; the kernel sends it negated)."""
    if len(payload) < _I32.size:
        return 0
    value: int = _I32.unpack_from(payload)[0]
    return -value if value < 0 else value


def error_detail(kind: int, flags: int, payload: bytes, request: bytes | None = None) -> tuple[str | None, str]:
    """The kernel's message and a note on the attribute it blamed, from an error's or DONE's TLVs.

    An NLMSG_ERROR echoes the request after its errno: the header only when
    ``NLM_F_CAPPED``, else the whole message (its length in that header); a
    DONE has its errno alone. ``NLMSGERR_ATTR_OFFS`` is the blamed
    attribute's offset in ``request`` (the whole message as sent).
    """
    if not flags & NLM_F_ACK_TLVS:
        return None, ""
    start = _I32.size
    if kind == NLMSG_ERROR:
        if len(payload) < start + NLMSGHDR.size:
            return None, ""
        echoed = NLMSGHDR.unpack_from(payload, start)[0]
        start += NLMSGHDR.size if flags & NLM_F_CAPPED else (echoed + 3) & ~3
    tlv = dict(attrs(payload, start))
    raw = tlv.get(NLMSGERR_ATTR_MSG, b"")
    message = raw.split(b"\0", 1)[0].decode(errors="replace") or None
    notes = []
    offs = tlv.get(NLMSGERR_ATTR_OFFS)
    if offs is not None and len(offs) >= 4:
        at = _U32.unpack_from(offs)[0]
        if request is not None and NLMSGHDR.size <= at and at + RTA.size <= len(request):
            notes.append(f"attribute type {RTA.unpack_from(request, at)[1] & 0x3FFF}")
        else:
            notes.append(f"attribute at offset {at}")
    miss = tlv.get(NLMSGERR_ATTR_MISS_TYPE)
    if miss is not None and len(miss) >= 4:
        notes.append(f"missing attribute type {_U32.unpack_from(miss)[0]}")
    return message, f" ({'; '.join(notes)})" if notes else ""


def kernel_error(code: int, kind: int, flags: int, payload: bytes, request: bytes | None = None) -> NetlinkError:
    """The :class:`NetlinkError` of an answer carrying ``code``: errno text, then the kernel's words."""
    message, note = error_detail(kind, flags, payload, request)
    text = error_text(code) + (f": {message}" if message else "") + note
    return NetlinkError(code, text, kernel_message=message)


class _Incomplete(Exception):
    """The answers to one sending are not whole: ``code`` and why."""

    def __init__(self, code: int, why: str) -> None:
        super().__init__(code, why)
        self.code = code
        self.why = why


class NetlinkSocket:
    """One netlink socket of ``protocol``, opened on first use in the namespace current then.

    Thread-safe: requests are serialised. ``close`` releases the socket.
    ``opener`` makes the socket (a test's fake; default: a kernel socket).
    """

    def __init__(self, protocol: int, strict: bool = False,
                 opener: Callable[[int], RawSocket] | None = None) -> None:
        self._protocol = protocol
        self._want_strict = strict
        self._opener = opener or _kernel_socket
        self._sock: RawSocket | None = None
        self._seq = 0
        self._lock = threading.Lock()
        self._buf = bytearray(RECV_BUFFER)
        #: Whether the kernel filters dumps by the request's header (strict checking is on).
        self.strict = False

    def open(self) -> None:
        if self._sock is not None:
            return
        sock = self._opener(self._protocol)
        try:
            # Errors echo only the request's header, and carry the kernel's text.
            for option in (NETLINK_CAP_ACK, NETLINK_EXT_ACK):
                _option(sock, option)
            self.strict = self._want_strict and _option(sock, NETLINK_GET_STRICT_CHK)
            sock.bind((0, 0))
        except BaseException:
            sock.close()
            raise
        self._sock = sock

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def request(self, kind: int, flags: int, body: bytes, *, read_only: bool = False) -> list[tuple[int, bytes]]:
        """Send one request; return its answer messages as (type, payload). Raises NetlinkError.

        A dump, or a request said to be ``read_only``, is sent again when its
        answers were interrupted or lost; a change never is.
        """
        return self.transact([(kind, flags, body)], 0, read_only=read_only)

    def transact(self, messages: Sequence[Message], answer: int, *, read_only: bool = False) -> list[tuple[int, bytes]]:
        """Send ``messages`` in one datagram (a batch); return the answers to ``messages[answer]``.

        Only that message asks for an ACK; an error on any of them (a
        batch the kernel refused as a whole) is raised.
        """
        # NLM_F_DUMP's bits are also REPLACE|EXCL, which no change combines.
        again = read_only or any(flags & NLM_F_DUMP == NLM_F_DUMP for _, flags, _ in messages)
        with self._lock:
            self.open()
            for _ in range(ATTEMPTS):
                try:
                    return self._once(messages, answer)
                except _Incomplete as exc:
                    problem = exc
                    if not again:
                        raise NetlinkError(exc.code, f"{exc.why}; the request's outcome is unknown") from None
        cls = DumpInterrupted if problem.code == errno.EINTR else NetlinkError
        raise cls(problem.code, f"{problem.why}, {ATTEMPTS} times in a row")

    def _once(self, batch: Sequence[Message], answer: int) -> list[tuple[int, bytes]]:
        assert self._sock is not None
        first = self._seq + 1
        self._seq = (self._seq + len(batch)) & 0xFFFFFFFF
        sent: dict[int, bytes] = {}
        for i, (kind, flags, body) in enumerate(batch):
            seq = (first + i) & 0xFFFFFFFF
            flags |= NLM_F_REQUEST | (NLM_F_ACK if i == answer else 0)
            sent[seq] = NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, flags, seq, 0) + body
        self._sock.send(b"".join(sent.values()))
        return self._answers(sent, (first + answer) & 0xFFFFFFFF)

    def _answers(self, sent: dict[int, bytes], want: int) -> list[tuple[int, bytes]]:
        """The answers to ``want`` up to its ACK or DONE; raises _Incomplete when they are not whole."""
        assert self._sock is not None
        out: list[tuple[int, bytes]] = []
        interrupted = False
        lost: _Incomplete | None = None
        wait = 0  # MSG_DONTWAIT once everything still to come is already queued
        while True:
            try:
                n = self._sock.recv_into(self._buf, 0, _MSG_TRUNC | wait)
            except BlockingIOError:
                raise lost or _Incomplete(errno.ENOBUFS, "netlink answers were lost (receive queue overflow)") from None
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                wait = _MSG_DONTWAIT
                continue
            if n > len(self._buf):
                seq = NLMSGHDR.unpack_from(self._buf)[3] if n >= NLMSGHDR.size else want
                size = len(self._buf)
                self._buf = bytearray((n + 4095) & ~4095)
                if seq in sent:
                    lost = _Incomplete(errno.EMSGSIZE, f"a netlink answer of {n} bytes did not fit "
                                                       f"the {size}-byte receive buffer")
                    wait = _MSG_DONTWAIT
                continue
            for mtype, mflags, mseq, payload in messages(bytes(memoryview(self._buf)[:n])):
                if mseq not in sent:
                    continue  # a late answer to an earlier, abandoned request
                if mtype == NLMSG_ERROR:
                    code = error_code(payload)
                    if code:
                        raise kernel_error(code, mtype, mflags, payload, sent[mseq])
                    if mseq == want:
                        return self._whole(out, interrupted, lost)
                    continue
                if mseq != want:
                    continue
                if mflags & NLM_F_DUMP_INTR:
                    interrupted = True
                if mtype == NLMSG_DONE:
                    # A dump that failed part way says so here, not in an NLMSG_ERROR.
                    code = error_code(payload)
                    if code:
                        raise kernel_error(code, mtype, mflags, payload, sent[mseq])
                    return self._whole(out, interrupted, lost)
                if mtype == NLMSG_OVERRUN:
                    lost = _Incomplete(errno.ENOBUFS, "the kernel dropped netlink answers (overrun)")
                elif mtype != NLMSG_NOOP:
                    # A single answer is followed by the ACK we asked for, a dump by DONE.
                    out.append((mtype, payload))

    @staticmethod
    def _whole(out: list[tuple[int, bytes]], interrupted: bool, lost: _Incomplete | None) -> list[tuple[int, bytes]]:
        if lost is not None:
            raise lost
        if interrupted:
            raise _Incomplete(errno.EINTR, "the netlink dump was interrupted by concurrent changes")
        return out


def _option(sock: RawSocket, option: int) -> bool:
    """Turn a netlink socket option on; ``False`` when the kernel does not know it (ENOPROTOOPT)."""
    try:
        sock.setsockopt(SOL_NETLINK, option, 1)
    except OSError as exc:
        if exc.errno != errno.ENOPROTOOPT:
            raise
        return False
    return True
