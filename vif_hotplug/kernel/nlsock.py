"""A plain netlink socket: requests, dumps and batches with their answers, no library.

Shared by the rtnetlink client (:mod:`.rtnl`) and the netfilter one
(:mod:`.nfnl`). Messages follow ``linux/netlink.h``. Every request asks for
an ACK and waits for the answers carrying its own sequence number; errors
come back as :class:`NetlinkError` with the kernel's errno (ipset's own codes
are above 4096).
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Iterator, Sequence

NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLA_F_NESTED = 0x8000
NLA_F_NET_BYTEORDER = 0x4000
SOL_NETLINK = 270
#: The kernel filters dumps by the request's header fields (interface index):
#: an address listing of one vif stays one vif's worth of messages.
NETLINK_GET_STRICT_CHK = 12

NLMSGHDR = struct.Struct("=IHHII")
RTA = struct.Struct("=HH")
_RECV = 65536

Message = tuple[int, int, bytes]
"""(type, flags, payload) of a request; NLM_F_REQUEST is added."""


class NetlinkError(OSError):
    """The kernel refused a request; ``errno`` is its error."""


def attr(kind: int, value: bytes) -> bytes:
    length = RTA.size + len(value)
    return RTA.pack(length, kind) + value + b"\0" * (-length % 4)


def nested(kind: int, *parts: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(parts))


def cstr(value: str) -> bytes:
    return value.encode() + b"\0"


def u32(value: int) -> bytes:
    return struct.pack("=I", value)


def attrs(data: bytes, offset: int = 0) -> Iterator[tuple[int, bytes]]:
    """(type without flags, value) of each attribute from ``offset`` on."""
    while offset + RTA.size <= len(data):
        length, kind = RTA.unpack_from(data, offset)
        if length < RTA.size:
            return
        yield kind & 0x3FFF, data[offset + RTA.size : offset + length]
        offset += (length + 3) & ~3


class NetlinkSocket:
    """One netlink socket of ``protocol``, opened on first use in the namespace current then.

    Thread-safe: requests are serialised. ``close`` releases the socket.
    """

    def __init__(self, protocol: int, strict: bool = False) -> None:
        self._protocol = protocol
        self._strict = strict
        self._sock: socket.socket | None = None
        self._seq = 0
        self._lock = threading.Lock()

    def open(self) -> None:
        if self._sock is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, self._protocol)
            if self._strict:
                sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
            sock.bind((0, 0))
            self._sock = sock

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def request(self, kind: int, flags: int, body: bytes) -> list[tuple[int, bytes]]:
        """Send one request; return its answer messages as (type, payload). Raises NetlinkError."""
        return self.transact([(kind, flags, body)], 0)

    def transact(self, messages: Sequence[Message], answer: int) -> list[tuple[int, bytes]]:
        """Send ``messages`` in one datagram (a batch); return the answers to ``messages[answer]``.

        Only that message asks for an ACK; an error on any of them (a
        batch the kernel refused as a whole) is raised.
        """
        self.open()
        assert self._sock is not None
        with self._lock:
            first = self._seq + 1
            self._seq = (self._seq + len(messages)) & 0xFFFFFFFF
            data = b""
            for i, (kind, flags, body) in enumerate(messages):
                flags |= NLM_F_REQUEST | (NLM_F_ACK if i == answer else 0)
                data += NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, flags, (first + i) & 0xFFFFFFFF, 0) + body
            seqs = {(first + i) & 0xFFFFFFFF for i in range(len(messages))}
            want = (first + answer) & 0xFFFFFFFF
            self._sock.send(data)
            return self._answers(seqs, want)

    def _answers(self, seqs: set[int], want: int) -> list[tuple[int, bytes]]:
        assert self._sock is not None
        out: list[tuple[int, bytes]] = []
        while True:
            data = self._sock.recv(_RECV)
            offset = 0
            while offset + NLMSGHDR.size <= len(data):
                length, mtype, _, mseq, _ = NLMSGHDR.unpack_from(data, offset)
                payload = data[offset + NLMSGHDR.size : offset + length]
                offset += (length + 3) & ~3
                if mseq not in seqs:
                    continue  # a late answer to an earlier, abandoned request
                if mtype == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", payload)[0]
                    if code:
                        raise NetlinkError(code, os.strerror(code) if code < 4096 else f"error {code}")
                    if mseq == want:
                        return out
                    continue
                if mseq != want:
                    continue
                if mtype == NLMSG_DONE:
                    return out
                # A single answer is followed by the ACK we asked for, a dump by DONE.
                out.append((mtype, payload))
