"""A netlink socket that answers with what the real kernel answered: the fixtures of tests/unit/data/netlink.

Each fixture (made by ``tests/capture_netlink.py``, see its docstring to
recapture) holds, per request the product sent, the datagrams the kernel
sent back and the errors its receives returned. :class:`ReplaySocket`
stands in for the kernel socket through ``NetlinkSocket(opener=...)``. It
keeps the rules of a real netlink socket that the answers depend on, and
fails the test loudly (``AssertionError``) where the product breaks one:

* The answers carry the request's sequence number (``netlink_ack`` and the
  dump callbacks copy ``nlmsg_seq``): captured numbers are rewritten to the
  ones sent, by position in the datagram.
* A message without ``NLM_F_REQUEST`` is not a request: the kernel only
  acks it (``netlink_rcv_skb``). Lengths must add up to the datagram
  (``netlink_rcv_skb`` drops the rest). The replay also wants the type and
  flags the capture sent, or its answers would be another request's.
* ``recv`` with ``MSG_TRUNC`` returns the datagram's real length and
  copies what fits; the rest is gone (``netlink_recvmsg``).
* A pending socket error (``ENOBUFS`` after an overrun) is returned by the
  next receive, once, before any queued datagram (``sock_error`` in
  ``__skb_try_recv_datagram``).
* ``MSG_DONTWAIT`` on an empty queue is ``EAGAIN``; a blocking receive on
  an empty queue never returns (nothing more will come: the kernel answers
  while ``send`` runs): here an ``AssertionError``.
* A socket runs one dump at a time: a dump request while an earlier one is
  still being read is refused with ``EBUSY`` (``netlink_dump_start``); a
  product that does so is failed here.
* The answers depend on the socket options (capped and extended ACKs,
  strict checking): the product must set those the capture had, and an
  option the capture refused is refused again (``ENOPROTOOPT``).
"""

from __future__ import annotations

import base64
import errno
import json
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATA = Path(__file__).parent / "data" / "netlink"
HDR = struct.Struct("=IHHII")
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_DONE = 3
SOL_NETLINK = 270
OPTIONS = {"NETLINK_CAP_ACK": 10, "NETLINK_EXT_ACK": 11, "NETLINK_GET_STRICT_CHK": 12}

Received = bytes | str
"""A datagram, or the name of the errno a receive returned."""


@dataclass
class Exchange:
    sent: bytes
    received: list[Received]


@dataclass
class Fixture:
    name: str
    about: str
    socket_options: list[str]
    refused_options: list[str]
    exchanges: list[Exchange]

    def datagrams(self, exchange: int = 0) -> list[bytes]:
        return [d for d in self.exchanges[exchange].received if isinstance(d, bytes)]

    def messages(self, exchange: int = 0) -> Iterator[tuple[int, int, int, bytes]]:
        """(type, flags, sequence number, whole message) of each message the kernel sent."""
        for data in self.datagrams(exchange):
            offset = 0
            while offset + HDR.size <= len(data):
                length, mtype, flags, seq, _ = HDR.unpack_from(data, offset)
                yield mtype, flags, seq, data[offset : offset + length]
                offset += (length + 3) & ~3


def load(name: str) -> Fixture:
    doc: dict[str, Any] = json.loads((DATA / f"{name}.json").read_text())
    exchanges = [
        Exchange(base64.b64decode(ex["sent"]),
                 [base64.b64decode(r) if isinstance(r, str) else r["error"] for r in ex["received"]])
        for ex in doc["exchanges"]
    ]
    return Fixture(name, doc["about"], doc["socket_options"], doc["refused_options"], exchanges)


def _messages(data: bytes) -> list[tuple[int, int, int, int]]:
    """(offset, type, flags, seq) of each message of a datagram the product sent; checks the lengths."""
    out = []
    offset = 0
    while offset < len(data):
        assert offset + HDR.size <= len(data), f"{len(data) - offset} stray bytes after the last message"
        length, mtype, flags, seq, _ = HDR.unpack_from(data, offset)
        assert HDR.size <= length <= len(data) - offset, f"message length {length} does not fit the datagram"
        out.append((offset, mtype, flags, seq))
        offset += (length + 3) & ~3
    return out


def _renumber(data: bytes, seqs: dict[int, int]) -> bytes:
    out = bytearray(data)
    offset = 0
    while offset + HDR.size <= len(out):
        length, mtype, flags, seq, pid = HDR.unpack_from(out, offset)
        if seq in seqs:
            HDR.pack_into(out, offset, length, mtype, flags, seqs[seq], pid)
        offset += (max(length, HDR.size) + 3) & ~3
    return bytes(out)


@dataclass
class ReplaySocket:
    """Answers the n-th request with the n-th captured exchange (the last one again with ``repeat``)."""

    fixture: Fixture
    repeat: bool = False
    #: Extra datagrams queued before the answers of the given request (by index): late answers.
    early: dict[int, list[bytes]] = field(default_factory=dict)
    sent: list[bytes] = field(default_factory=list)
    options: list[str] = field(default_factory=list)
    bound: bool = False
    closed: bool = False
    _queue: list[Received] = field(default_factory=list)
    _dump_unread: bool = False

    def setsockopt(self, level: int, option: int, value: int, /) -> None:
        assert level == SOL_NETLINK and value == 1
        name = {v: k for k, v in OPTIONS.items()}[option]
        if name in self.fixture.refused_options:
            raise OSError(errno.ENOPROTOOPT, os.strerror(errno.ENOPROTOOPT))
        self.options.append(name)

    def bind(self, address: tuple[int, int], /) -> None:
        self.bound = True

    def send(self, data: bytes, /) -> int:
        assert not self.closed
        assert sorted(self.options) == sorted(self.fixture.socket_options), (
            f"socket options {self.options}, but {self.fixture.name} was captured with {self.fixture.socket_options}")
        index = len(self.sent)
        if index >= len(self.fixture.exchanges) and not self.repeat:
            raise AssertionError(f"request {index + 1} sent, {self.fixture.name} holds {len(self.fixture.exchanges)}")
        exchange = self.fixture.exchanges[min(index, len(self.fixture.exchanges) - 1)]
        mine, theirs = _messages(data), _messages(exchange.sent)
        assert [(t, f) for _, t, f, _ in mine] == [(t, f) for _, t, f, _ in theirs], (
            f"request {index + 1} is not the one {self.fixture.name} answered")
        assert all(f & NLM_F_REQUEST for _, _, f, _ in mine), "a message without NLM_F_REQUEST is only acked"
        is_dump = any(f & NLM_F_DUMP == NLM_F_DUMP for _, _, f, _ in mine)
        assert not (is_dump and self._dump_unread), "a dump started before the last one was read: EBUSY"
        self.sent.append(data)
        seqs = {old[3]: new[3] for old, new in zip(theirs, mine, strict=True)}
        self._queue += self.early.get(index, [])
        self._queue += [_renumber(d, seqs) if isinstance(d, bytes) else d for d in exchange.received]
        self._dump_unread = is_dump
        return len(data)

    def recv_into(self, buffer: bytearray, nbytes: int = 0, flags: int = 0, /) -> int:
        assert not self.closed
        if self._queue and isinstance(self._queue[0], str):
            name = self._queue.pop(0)
            assert isinstance(name, str)
            code = getattr(errno, name)
            raise OSError(code, os.strerror(code))
        if not self._queue:
            if flags & socket.MSG_DONTWAIT:
                raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
            raise AssertionError("a blocking receive with nothing queued: the real socket would wait forever")
        data = self._queue.pop(0)
        assert isinstance(data, bytes)
        if not any(isinstance(d, bytes) for d in self._queue):
            self._dump_unread = False
        size = nbytes or len(buffer)
        buffer[: min(size, len(data))] = data[:size]
        return len(data) if flags & socket.MSG_TRUNC else min(size, len(data))

    def close(self) -> None:
        self.closed = True


def opener(sock: ReplaySocket) -> Any:
    def open_(protocol: int) -> ReplaySocket:
        return sock

    return open_


@dataclass
class AckingSocket:
    """Answers every request with the kernel's ACK alone (the datagram of ``addr_add_ack``, renumbered).

    For tests of what the product sends: a read then finds nothing, a change succeeds.
    """

    sent: list[bytes] = field(default_factory=list)
    _queue: list[bytes] = field(default_factory=list)

    def setsockopt(self, level: int, option: int, value: int, /) -> None:
        pass

    def bind(self, address: tuple[int, int], /) -> None:
        pass

    def send(self, data: bytes, /) -> int:
        self.sent.append(data)
        ack = load("addr_add_ack").datagrams()[0]
        # The ACK goes to the message that asked for it (netlink_rcv_skb: NLM_F_ACK).
        wanted = [seq for _, _, flags, seq in _messages(data) if flags & 0x4]
        assert len(wanted) == 1, "exactly one message of a request asks for the ACK"
        self._queue.append(_renumber(ack, {HDR.unpack_from(ack)[3]: wanted[0]}))
        return len(data)

    def recv_into(self, buffer: bytearray, nbytes: int = 0, flags: int = 0, /) -> int:
        if not self._queue:
            if flags & socket.MSG_DONTWAIT:
                raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
            raise AssertionError("a blocking receive with nothing queued: the real socket would wait forever")
        data = self._queue.pop(0)
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        pass
