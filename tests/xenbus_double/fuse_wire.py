"""The part of the FUSE kernel protocol a one-file filesystem needs (``include/uapi/linux/fuse.h``, 7.38).

Requests are read from ``/dev/fuse`` whole, one per ``read()``: a
``fuse_in_header`` then the opcode's argument struct. Replies are written
whole, one per ``write()``: a ``fuse_out_header`` (``error`` a negated errno,
``unique`` the request's) then the reply struct. A notification is a
"reply" with ``unique`` 0 and the notify code in ``error``. No I/O here.
"""

from __future__ import annotations

import enum
import stat
import struct
from dataclasses import dataclass
from typing import Final

#: fuse.h: the kernel refuses a read of /dev/fuse into a smaller buffer (FUSE_MIN_READ_BUFFER).
MIN_READ_BUFFER: Final = 8192
ROOT_ID: Final = 1
KERNEL_MAJOR: Final = 7
KERNEL_MINOR: Final = 38


class Opcode(enum.IntEnum):
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    ACCESS = 34
    INTERRUPT = 36
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    BATCH_FORGET = 42
    LSEEK = 46


#: Requests the kernel expects no reply to.
NO_REPLY: Final = frozenset({Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.INTERRUPT})

# fuse_open_out.open_flags
FOPEN_DIRECT_IO: Final = 1 << 0  # bypass the page cache: every read()/write() reaches us with its size
FOPEN_NONSEEKABLE: Final = 1 << 2
FOPEN_STREAM: Final = 1 << 4  # no file position at all, like the driver's stream_open()
FOPEN_PARALLEL_DIRECT_WRITES: Final = 1 << 6  # writes of different open files do not wait for each other

# fuse_poll_in.flags, and the notify code of a poll wakeup
POLL_SCHEDULE_NOTIFY: Final = 1 << 0
NOTIFY_POLL: Final = 1

IN_HEADER: Final = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid total_extlen padding
OUT_HEADER: Final = struct.Struct("<IiQ")  # len error unique
INIT_IN: Final = struct.Struct("<IIII")  # major minor max_readahead flags (flags2 and the rest ignored)
# major minor max_readahead flags max_background congestion_threshold max_write time_gran max_pages
# map_alignment flags2 unused[7]
INIT_OUT: Final = struct.Struct("<IIIIHHIIHHI28x")
ATTR: Final = struct.Struct("<QQQQQQIIIIIIIIII")
ATTR_OUT: Final = struct.Struct("<QII")  # attr_valid attr_valid_nsec dummy, then ATTR
OPEN_IN: Final = struct.Struct("<II")  # flags open_flags
OPEN_OUT: Final = struct.Struct("<QII")  # fh open_flags padding
READ_IN: Final = struct.Struct("<QQIIQII")  # fh offset size read_flags lock_owner flags padding
WRITE_IN: Final = struct.Struct("<QQIIQII")  # fh offset size write_flags lock_owner flags padding
WRITE_OUT: Final = struct.Struct("<II")  # size padding
RELEASE_IN: Final = struct.Struct("<QIIQ")  # fh flags release_flags lock_owner
INTERRUPT_IN: Final = struct.Struct("<Q")  # unique
POLL_IN: Final = struct.Struct("<QQII")  # fh kh flags events
POLL_OUT: Final = struct.Struct("<II")  # revents padding
NOTIFY_POLL_WAKEUP: Final = struct.Struct("<Q")  # kh
STATFS_OUT_SIZE: Final = 80


@dataclass(frozen=True, slots=True)
class Request:
    opcode: int
    unique: int
    nodeid: int
    pid: int
    body: bytes


def parse_request(data: bytes) -> Request:
    length, opcode, unique, nodeid, _uid, _gid, pid, _extlen, _pad = IN_HEADER.unpack_from(data)
    return Request(opcode, unique, nodeid, pid, bytes(data[IN_HEADER.size:length]))


def reply(unique: int, payload: bytes = b"", error: int = 0) -> bytes:
    """A reply: ``error`` is a positive errno (sent negated), with no payload then."""
    if error:
        return OUT_HEADER.pack(OUT_HEADER.size, -error, unique)
    return OUT_HEADER.pack(OUT_HEADER.size + len(payload), 0, unique) + payload


def poll_wakeup(kh: int) -> bytes:
    """FUSE_NOTIFY_POLL: the kernel wakes whoever polls the file with handle ``kh`` and asks again."""
    body = NOTIFY_POLL_WAKEUP.pack(kh)
    return OUT_HEADER.pack(OUT_HEADER.size + len(body), NOTIFY_POLL, 0) + body


def init_reply(body: bytes, max_write: int) -> bytes:
    major, minor, max_readahead, _flags = INIT_IN.unpack_from(body)
    if major != KERNEL_MAJOR:
        raise ValueError(f"FUSE protocol {major}.{minor}, this filesystem speaks {KERNEL_MAJOR}")
    # No feature flags: no caching, no async reads, nothing a character device would not do either.
    return INIT_OUT.pack(KERNEL_MAJOR, min(minor, KERNEL_MINOR), max_readahead, 0, 16, 12, max_write, 1, 0, 0, 0)


#: The size the file claims: FUSE serializes direct writes that reach past the end of a file (an exclusive
#: inode lock, fuse_dio_wr_exclusive_lock), and a write the double holds would then hold up every other
#: open file's writes, which the driver never does (its lock is per open file, msgbuffer_mutex).
FILE_SIZE: Final = 1 << 62


def file_attr(mode: int, now: int) -> bytes:
    """``fuse_attr_out`` of the one regular file (the root itself), valid for a second."""
    attr = ATTR.pack(ROOT_ID, FILE_SIZE, 0, now, now, now, 0, 0, 0, stat.S_IFREG | mode, 1, 0, 0, 0, 4096, 0)
    return ATTR_OUT.pack(1, 0, 0) + attr
