"""A digest of legacy xtables tables as the kernel holds them, without python-iptables.

``getsockopt(IPT_SO_GET_INFO / IPT_SO_GET_ENTRIES)`` is how every xtables
tool reads a table; the entries come back as one blob. The digest covers
the blob with each rule's packet and byte counters zeroed (traffic moves
them, not rule changes): equal digests, equal rules. Reading costs a few
microseconds per table, against tens of milliseconds for loading and
decoding the tables through python-iptables.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import socket
import struct
from collections.abc import Iterable

SOL_IP, SOL_IPV6 = 0, 41
SO_GET_INFO, SO_GET_ENTRIES = 64, 65  # IPT_ and IP6T_ alike
_GETINFO = struct.Struct("=32sI5I5III")
_NAME_SIZE = struct.Struct("=32sI4x")  # struct ipt_get_entries: the entries are 8-aligned
#: Offsets in ``struct ipt_entry`` / ``ip6t_entry``: next_offset, counters.
_LAYOUT = {4: (90, 96), 6: (142, 152)}
_COUNTERS = 16

_libc: ctypes.CDLL | None = None


def _getsockopt(fd: int, level: int, opt: int, data: bytes) -> bytes:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(data, len(data))
    size = ctypes.c_uint32(len(data))
    if _libc.getsockopt(fd, level, opt, buf, ctypes.byref(size)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return buf.raw[: size.value]


def _table_blob(sock: socket.socket, family: int, table: str) -> bytes:
    level = SOL_IPV6 if family == 6 else SOL_IP
    name = table.encode()
    info = _getsockopt(sock.fileno(), level, SO_GET_INFO, _GETINFO.pack(name, 0, *([0] * 10), 0, 0))
    fields = _GETINFO.unpack(info)
    size = fields[-1]
    entries = _getsockopt(sock.fileno(), level, SO_GET_ENTRIES, _NAME_SIZE.pack(name, size) + b"\0" * size)
    blob = bytearray(entries[_NAME_SIZE.size :])
    next_at, counters_at = _LAYOUT[family]
    offset = 0
    while offset + counters_at + _COUNTERS <= len(blob):
        blob[offset + counters_at : offset + counters_at + _COUNTERS] = bytes(_COUNTERS)
        (step,) = struct.unpack_from("=H", blob, offset + next_at)
        if step == 0:
            break
        offset += step
    return b"".join(struct.pack("=I", x) for x in fields[1:-2]) + bytes(blob)


def tables_digest(tables: Iterable[tuple[int, str]]) -> str:
    """One digest over the (family, table) pairs; a table the kernel lacks counts as absent."""
    digest = hashlib.sha256()
    socks: dict[int, socket.socket] = {}
    try:
        for family, table in tables:
            digest.update(f"{family}:{table}:".encode())
            sock = socks.get(family)
            if sock is None:
                sock = socks[family] = socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET,
                                                     socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.IPPROTO_RAW)
            try:
                digest.update(_table_blob(sock, family, table))
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENOPROTOOPT):
                    raise
                digest.update(b"absent")
    finally:
        for sock in socks.values():
            sock.close()
    return digest.hexdigest()
