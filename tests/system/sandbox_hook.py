"""A network hook (``HOOK online|offline VIF TYPE ADDRESS``) that reports the sandbox it runs in.

The agent runs hooks as its own children, so they inherit what its unit
gives it: capability bounding set, no-new-privileges, the seccomp filters
(address families, namespaces, system calls, personality, W^X, set-user-ID
bits), its UTS namespace, the umask, and its mount and network namespaces.
This hook tries what each option forbids (and, as a control, what it
allows) and writes the outcome as ``/run/ci-hooks/VIF.json``; the test
outside the container asserts on it. Standard library only: it runs with
the container's ``/usr/bin/python3``.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import socket
import sys
from collections.abc import Callable

OUT = "/run/ci-hooks"
CLONE_NEWNET = 0x40000000
CLONE_NEWUTS = 0x04000000
SYS_SWAPON = 167  # x86_64 (arch/x86/entry/syscalls/syscall_64.tbl)
PER_LINUX32 = 0x0008
AF_PACKET = 17

libc = ctypes.CDLL(None, use_errno=True)


def outcome(attempt: Callable[[], object]) -> str:
    """``ok`` or the errno name the attempt failed with."""
    try:
        result = attempt()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    if isinstance(result, int) and result < 0:
        return errno.errorcode.get(ctypes.get_errno(), "?")
    return "ok"


def in_child(attempt: Callable[[], object]) -> str:
    """:func:`outcome` in a forked child (namespace changes stay there)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        os.write(write, outcome(attempt).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as f:
        return f.read()


def sock(family: int, kind: int, proto: int = 0) -> None:
    socket.socket(family, kind, proto).close()


def mmap_wx() -> None:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC).close()


def suid_file() -> None:
    path = os.path.join(OUT, "suid-probe")
    with open(path, "w"):
        pass
    try:
        os.chmod(path, 0o4755)
    finally:
        os.unlink(path)


def umask_now() -> str:
    old = os.umask(0o077)
    os.umask(old)
    return oct(old)


def status() -> dict[str, str]:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
    return {k: fields[k].strip() for k in ("CapBnd", "CapEff", "NoNewPrivs", "Seccomp")}


def safe(value: Callable[[], object]) -> object:
    """``value()``, or the exception it raised as text: one probe must not hide the others."""
    try:
        return value()
    except Exception as exc:  # noqa: BLE001 - recorded for the test, which fails on it
        return f"error: {type(exc).__name__}: {exc}"


def main() -> None:
    _command, vif = sys.argv[1], sys.argv[2]
    os.makedirs(OUT, exist_ok=True)
    probes: dict[str, Callable[[], object]] = {
        "argv": lambda: sys.argv[1:],
        "status": status,
        "af_packet": lambda: outcome(lambda: sock(AF_PACKET, socket.SOCK_RAW)),
        "af_netlink": lambda: outcome(lambda: sock(socket.AF_NETLINK, socket.SOCK_RAW, 0)),
        "af_inet": lambda: outcome(lambda: sock(socket.AF_INET, socket.SOCK_DGRAM)),
        "unshare_net": lambda: in_child(lambda: libc.unshare(CLONE_NEWNET)),
        "unshare_uts": lambda: in_child(lambda: libc.unshare(CLONE_NEWUTS)),
        "swapon": lambda: outcome(lambda: libc.syscall(SYS_SWAPON, b"/nonexistent", 0)),
        "personality_linux32": lambda: in_child(lambda: libc.personality(PER_LINUX32)),
        "mmap_write_exec": lambda: outcome(mmap_wx),
        "chmod_suid": lambda: outcome(suid_file),
        "sethostname": lambda: in_child(lambda: libc.sethostname(b"ci-hook", 7)),
        "umask": umask_now,
        # Compared outside with the probe's own (its unit has no namespaces of its own).
        "mnt_ns": lambda: os.readlink("/proc/self/ns/mnt"),
        "net_ns": lambda: os.readlink("/proc/self/ns/net"),
    }
    report = {name: safe(probe) for name, probe in probes.items()}
    tmp = os.path.join(OUT, f".{vif}.tmp")
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1, sort_keys=True)
    os.rename(tmp, os.path.join(OUT, f"{vif}.json"))


if __name__ == "__main__":
    main()
