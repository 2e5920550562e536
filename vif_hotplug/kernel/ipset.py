"""Kernel ip sets (no ``ipset`` binary): the iptables backend's sets.

A hotplug event's requests (add, delete, test one member; does a set
exist) go through :mod:`.nfnl`; creating, destroying and listing sets,
which are rare, through pyroute2's ipset API (the same calls in 0.7.2 and
0.9). Both stacks' errors arrive as :class:`~.nlsock.NetlinkError` (pyroute2's
translated by :func:`.pyroute2_errors.pyroute2_errors`), whose ``errno`` is
an errno or one of ipset's codes above 4096; every failure leaves here as
:class:`KernelError` naming the set.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

from ..core.errors import KernelError
from .nfnl import Nfnl
from .pyroute2_errors import pyroute2_errors
from .set_dump import ipset_members


def _family(fam: int) -> int:
    return socket.AF_INET6 if fam == 6 else socket.AF_INET


def _text(exc: OSError) -> str:
    return exc.strerror or str(exc)


Entry = tuple[str, str | None]
"""(network, interface or None)."""


class IpSets:
    """One ipset netlink socket in the caller's namespace, opened on first use."""

    def __init__(self) -> None:
        self._ipset: Any = None
        self._nfnl = Nfnl()

    def _sock(self) -> Any:
        if self._ipset is None:
            from pyroute2 import IPSet

            # pyroute2 0.7 asks the kernel for its ipset protocol version here.
            with pyroute2_errors():
                self._ipset = IPSet()
        return self._ipset

    def close(self) -> None:
        sock, self._ipset = self._ipset, None
        if sock is not None:
            sock.close()
        self._nfnl.close()

    def ensure_set(self, name: str, stype: str, fam: int) -> None:
        """Create the set unless an identical one exists (the kernel checks type and family)."""
        try:
            with pyroute2_errors():
                self._sock().create(name, stype=stype, family=_family(fam), exclusive=False)
        except OSError as exc:
            raise KernelError(f"cannot create set {name} ({stype}): {_text(exc)}") from exc

    def exists(self, name: str) -> bool:
        try:
            return self._nfnl.ipset_exists(name)
        except OSError as exc:
            raise KernelError(f"cannot read set {name}: {_text(exc)}") from exc

    def destroy(self, name: str) -> bool:
        try:
            with pyroute2_errors():
                self._sock().destroy(name)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise KernelError(f"cannot destroy set {name}: {_text(exc)}") from exc
        return True

    def _member(self, op: str, name: str, fam: int, e: Entry) -> bool:
        network, dev = e
        try:
            return self._nfnl.ipset_element(op, name, fam, network, dev)
        except OSError as exc:
            if op != "add" and exc.errno == errno.ENOENT:  # no such set: no such member
                return False
            what = {"add": "add", "del": "remove", "test": "test"}[op]
            raise KernelError(f"cannot {what} {e} in {name}: {_text(exc)}") from exc

    def add(self, name: str, fam: int, e: Entry) -> bool:
        return self._member("add", name, fam, e)

    def remove(self, name: str, fam: int, e: Entry) -> bool:
        return self._member("del", name, fam, e)

    def test(self, name: str, fam: int, e: Entry) -> bool:
        return self._member("test", name, fam, e)

    def members(self, name: str, dev: str | None = None) -> list[Entry]:
        """Every member of set ``name`` (naming ``dev``; empty if the set does not exist): one netlink dump."""
        try:
            return ipset_members(self._nfnl, name, dev)
        except OSError as exc:
            raise KernelError(f"cannot list set {name}: {_text(exc)}") from exc
