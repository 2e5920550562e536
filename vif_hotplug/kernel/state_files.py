"""Files of the state directory that describe one network namespace, and writing them safely.

Firewall state is per network namespace, so some records are too (the
backend marker, the rulesets found complete, the connected sets' source).
They are named after the namespace's *cookie* (``SO_NETNS_COOKIE``, Linux
5.14 and later): a 64-bit number the kernel hands out once per boot and
never again, unlike the namespace's inode number, which a new namespace
reuses as soon as the old one is gone (seen here after a day of test runs:
a fresh namespace found the marker and the verified rulesets of a dead one
and trusted them). The inode is in the name too, so that :func:`prune` can
tell records of namespaces that are gone without entering any namespace.

On a kernel without namespace cookies the name holds the inode only, and
:func:`records_trusted` says so: such a record cannot tell a reused inode
from its own namespace, so callers use it for nothing that would vouch for
the kernel's state.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import threading

log = logging.getLogger(__name__)

#: ``SO_NETNS_COOKIE`` from ``include/uapi/asm-generic/socket.h`` (Linux 5.14).
SO_NETNS_COOKIE = 71
_NAME = re.compile(r"(?P<what>[a-z]+(?:-[a-z]+)?)-(?P<ino>[0-9]+)-(?P<cookie>[0-9]+|x)\.json")

_cache = threading.local()


def _netns_inode() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def netns_cookie() -> int | None:
    """The cookie of the calling thread's network namespace, ``None`` on kernels without them."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            raw = s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
    except OSError:
        return None
    return int.from_bytes(raw, "little")


def netns_key() -> str:
    """``<inode>-<cookie>`` of the calling thread's namespace (``<inode>-x`` without cookies).

    Remembered per thread and inode: a thread that changes namespace (a NAT
    namespace's child) asks again.
    """
    ino = _netns_inode()
    known = getattr(_cache, "key", None)
    if known is not None and known[0] == ino:
        return str(known[1])
    cookie = netns_cookie()
    key = f"{ino}-{cookie if cookie is not None else 'x'}"
    _cache.key = (ino, key)
    return key


def records_trusted() -> bool:
    """Whether a record named by :func:`netns_key` can only be this namespace's own."""
    return not netns_key().endswith("-x")


def state_file(state_dir: str, what: str) -> str:
    """The record ``what`` (``backend``, ``verified-nftables`` ...) of the calling thread's namespace."""
    return os.path.join(state_dir, f"{what}-{netns_key()}.json")


def atomic_write(path: str, text: str, mode: int = 0o600) -> None:
    """Replace ``path`` with ``text`` at once: readers see the old or the new content, never a part.

    The temporary name is unique per call, so concurrent writers (agent
    threads, a fallback process) never share one. Raises ``OSError``.
    """
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def live_netns_inodes(proc: str = "/proc") -> set[int]:
    """Inodes of every network namespace something still holds: a process in it, an open
    descriptor of it, or a bind mount of it (``ip netns add`` and the like)."""
    out: set[int] = set()
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return out
    for pid in pids:
        try:
            out.add(os.stat(f"{proc}/{pid}/ns/net").st_ino)
        except OSError:
            pass
        try:
            fds = os.listdir(f"{proc}/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{proc}/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("net:["):
                out.add(int(target[5:-1]))
    try:
        with open(f"{proc}/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                # "... root mount-point ... - nsfs nsfs rw": the root field is "net:[INODE]".
                if " - nsfs " in line and len(fields) > 3 and fields[3].startswith("net:["):
                    out.add(int(fields[3][5:-1]))
    except OSError:
        pass
    return out


def prune(state_dir: str, live: set[int] | None = None) -> list[str]:
    """Remove the records of namespaces that are gone; the names removed.

    A record is gone when no live namespace has its inode, or when it has
    the calling thread's namespace's inode but another cookie (a namespace
    that died and whose inode this one reuses). Records of other live
    namespaces are kept whatever their cookie: only entering them could tell.
    """
    try:
        names = os.listdir(state_dir)
    except OSError:
        return []
    live = live_netns_inodes() if live is None else live
    own_ino, _, own_cookie = netns_key().partition("-")
    removed = []
    for name in names:
        m = _NAME.fullmatch(name)
        if m is None:
            continue
        ino = int(m["ino"])
        stale = ino not in live or (str(ino) == own_ino and m["cookie"] != own_cookie)
        if stale:
            try:
                os.unlink(os.path.join(state_dir, name))
                removed.append(name)
            except OSError:
                pass
    if removed:
        log.info("removed %d record(s) of network namespaces that are gone", len(removed))
    return removed
