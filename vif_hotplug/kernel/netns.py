"""Named network namespaces, and devices moving between them.

``setns(2)`` with ``CLONE_NEWNET`` moves only the calling thread, so
:func:`thread_netns` can enter a namespace for a few calls (sockets and
``/proc/sys/net`` files opened inside stay bound to it) without disturbing
other threads of a resident agent. It returns through
``/proc/thread-self/ns/net``: ``/proc/self`` would name the main thread's.

Creating and removing namespaces and veth pairs goes through pyroute2
(rare, and its veth request is richer); its errors are translated by
:func:`.pyroute2_errors.pyroute2_errors`, and every failure leaves here as
:class:`KernelError` naming the object.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from typing import Any

from ..core.errors import DeviceGone, KernelError
from ..core.model import LinkNetns, Netns, Veth
from .nlsock import NetlinkError
from .pyroute2_errors import pyroute2_errors
from .rtnl import Rtnl

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000

_libc: Any = None


def _setns(fd: int) -> None:
    import ctypes  # only when a namespace is entered: 5 ms a one-shot event need not pay

    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def enter_netns_for_good(name: str) -> None:
    """Move this thread into namespace ``name`` and stay (a forked child's only thread)."""
    fd = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(fd)
    finally:
        os.close(fd)


def netns_path(name: str) -> str:
    return os.path.join(NETNS_DIR, name)


def netns_exists(name: str) -> bool:
    return os.path.exists(netns_path(name))


@contextlib.contextmanager
def thread_netns(name: str | None) -> Iterator[None]:
    """Run the body with this thread inside namespace ``name`` (``None``: stay).

    Raises :class:`KernelError` when the namespace does not exist.
    """
    if name is None:
        yield
        return
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            target = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise KernelError(f"cannot enter netns {name}: {exc.strerror}") from exc
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)


class Namespaces:
    """Adapters for :class:`Netns`, :class:`LinkNetns` and :class:`Veth` objects.

    ``rtnl(name)`` gives the rtnetlink socket of a namespace (``None``: ours).
    """

    def __init__(self, rtnl: Rtnl, rtnl_in: RtnlFactory) -> None:
        self._rtnl = rtnl
        self._rtnl_in = rtnl_in

    # --- Netns --------------------------------------------------------------------

    def netns_present(self, n: Netns) -> bool:
        return netns_exists(n.name)

    def add_netns(self, n: Netns) -> bool:
        if netns_exists(n.name):
            return False
        from pyroute2 import netns

        try:
            # pyroute2 0.7 re-raises whatever its child process raised; 0.9 its own errors.
            with pyroute2_errors():
                netns.create(n.name)
        except OSError as exc:
            raise KernelError(f"cannot create {n}: {exc.strerror or exc}") from exc
        return True

    def remove_netns(self, n: Netns) -> bool:
        """Remove the namespace; a device of ours still inside is moved back first."""
        if not netns_exists(n.name):
            return False
        from pyroute2 import netns

        self._rtnl_in.forget(n.name)
        try:
            with pyroute2_errors():
                netns.remove(n.name)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise KernelError(f"cannot remove {n}: {exc.strerror or exc}") from exc
        return True

    # --- LinkNetns: a device of ours moved into a namespace ---------------------------

    def link_moved(self, m: LinkNetns) -> bool:
        """A device called ``dev`` is inside (our veth's peer there is named otherwise)."""
        return netns_exists(m.target) and self._rtnl_in(m.target).link(m.dev) is not None

    def move_in(self, m: LinkNetns) -> bool:
        if self.link_moved(m):
            return False
        link = self._rtnl.link(m.dev)
        if link is None:
            raise DeviceGone(f"cannot move {m.dev} into netns {m.target}: no such device")
        fd = os.open(netns_path(m.target), os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._rtnl.set_link(link.index, netns_fd=fd)
        except NetlinkError as exc:
            raise KernelError(f"cannot move {m.dev} into netns {m.target}: {exc.strerror}") from exc
        finally:
            os.close(fd)
        return True

    def move_out(self, m: LinkNetns) -> bool:
        """Bring ``dev`` back from the namespace (it arrives down, without addresses)."""
        if not netns_exists(m.target):
            return False
        inner = self._rtnl_in(m.target)
        link = inner.link(m.dev)
        if link is None:
            return False
        if self._rtnl.link(m.dev) is not None:
            raise KernelError(f"cannot move {m.dev} back from netns {m.target}: a device of that name is here")
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            inner.set_link(link.index, up=False)
            inner.set_link(link.index, netns_fd=home)
        except NetlinkError as exc:
            raise KernelError(f"cannot move {m.dev} back from netns {m.target}: {exc.strerror}") from exc
        finally:
            os.close(home)
        return True

    # --- Veth: our end here, the peer in the namespace ---------------------------------

    def veth_present(self, v: Veth) -> bool:
        link = self._rtnl.link(v.dev)
        if link is None or link.kind != "veth" or not link.peer_elsewhere or not netns_exists(v.peer_netns):
            return False
        peer = self._rtnl_in(v.peer_netns).link(v.peer)
        return peer is not None and peer.index == link.peer_index

    def add_veth(self, v: Veth) -> bool:
        if self.veth_present(v):
            return False
        if self._rtnl.link(v.dev) is not None:
            raise KernelError(f"cannot add {v}: a device named {v.dev} is still here")
        from pyroute2 import IPRoute

        try:
            # ext_ack: a refusal carries the kernel's reason (an option in 0.7.2 and 0.9 alike).
            with pyroute2_errors(), IPRoute(ext_ack=True) as ipr:
                ipr.link(
                    "add", ifname=v.dev, kind="veth", address=v.mac,
                    peer={"ifname": v.peer, "address": v.peer_mac, "net_ns_fd": v.peer_netns},
                )
        except OSError as exc:
            raise KernelError(f"cannot add {v}: {exc.strerror or exc}") from exc
        return True

    def remove_veth(self, v: Veth) -> bool:
        """Delete our end (the peer goes with it), only if it is the veth into that namespace."""
        if not self.veth_present(v):
            return False
        link = self._rtnl.link(v.dev)
        if link is None:
            return False
        from pyroute2 import IPRoute

        try:
            with pyroute2_errors(), IPRoute(ext_ack=True) as ipr:
                ipr.link("del", index=link.index)
        except OSError as exc:
            if exc.errno != errno.ENODEV:
                raise KernelError(f"cannot remove {v}: {exc.strerror or exc}") from exc
        return True


class RtnlFactory:
    """rtnetlink sockets per namespace, each opened inside its namespace on first use."""

    def __init__(self) -> None:
        self._socks: dict[str, Rtnl] = {}

    def __call__(self, name: str) -> Rtnl:
        sock = self._socks.get(name)
        if sock is None:
            sock = Rtnl()
            with thread_netns(name):
                sock.open()
            self._socks[name] = sock
        return sock

    def forget(self, name: str) -> None:
        sock = self._socks.pop(name, None)
        if sock is not None:
            sock.close()

    def close(self) -> None:
        for name in list(self._socks):
            self.forget(name)
