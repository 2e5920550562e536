"""Holds a private mount namespace in which the double's FUSE file is mounted; stdlib only, run as a script.

``python3 holder.py --fuse-fd N --file PATH`` mounts the FUSE connection of
descriptor ``N`` on the existing regular file ``PATH``;
``--dev STAGING`` instead builds a private ``/dev`` (a tmpfs in the empty
directory ``STAGING`` with every node of the real ``/dev``, its directories
bound in) holding ``xen/xenbus``, and moves it over ``/dev``. Either way only
this namespace sees the mount: the host's mount table never changes.

Mounts propagate from the host into the namespace (a slave), so network
namespaces created later are visible to processes entered into it. The
holder prints ``ready`` once the mount is in place and exits at EOF on
stdin (its parent closed the pipe, or died); the namespace, and the mount
with it, goes when the last process in it has left.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import stat
import sys

CLONE_NEWNS = 0x00020000
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_SLAVE = 0x80000

_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    rc = _libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(), ctypes.c_ulong(flags),
                     data and data.encode())
    _check(rc, f"mount {target}")


def private_dev(staging: str) -> str:
    """A copy of /dev with ``xen/xenbus`` added, mounted at ``staging``; the file to mount on."""
    mount("tmpfs", staging, "tmpfs", MS_NOSUID, "mode=755")
    for entry in os.scandir("/dev"):
        src, dst = entry.path, os.path.join(staging, entry.name)
        st = os.lstat(src)
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(src), dst)
        elif stat.S_ISDIR(st.st_mode):
            os.mkdir(dst, stat.S_IMODE(st.st_mode))
            mount(src, dst, None, MS_BIND | MS_REC)
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            os.mknod(dst, st.st_mode, st.st_rdev)
            os.chown(dst, st.st_uid, st.st_gid)
        else:  # a socket such as /dev/log, or a plain file: bind it over an empty one
            open(dst, "w").close()
            mount(src, dst, None, MS_BIND)
    os.mkdir(os.path.join(staging, "xen"), 0o755)
    target = os.path.join(staging, "xen", "xenbus")
    open(target, "w").close()
    return target


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--fuse-fd", type=int, required=True)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--file")
    where.add_argument("--dev", metavar="STAGING")
    args = p.parse_args()
    _check(_libc.unshare(CLONE_NEWNS), "unshare")
    mount(None, "/", None, MS_REC | MS_SLAVE)
    target = private_dev(args.dev) if args.dev else args.file
    # rootmode: the root of this filesystem is the one regular file itself.
    options = f"fd={args.fuse_fd},rootmode={stat.S_IFREG | 0o600:o},user_id=0,group_id=0,allow_other"
    mount("xenbus-double", target, "fuse.xenbus-double", MS_NOSUID | MS_NODEV | MS_NOEXEC, options)
    os.close(args.fuse_fd)
    if args.dev:
        mount(args.dev, "/dev", None, MS_MOVE)
        # A driver domain has no xenstored: nothing may find the daemon's socket here.
        for run in ("/run/xenstored", "/var/run/xenstored"):
            if os.path.isdir(run) and not os.path.islink(run):
                mount("tmpfs", run, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=755")
    print("ready", flush=True)
    sys.stdin.read()
    return 0


if __name__ == "__main__":
    sys.exit(main())
