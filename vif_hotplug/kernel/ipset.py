"""Kernel ip sets through pyroute2's ipset netlink API (no ``ipset`` binary): the iptables backend's sets.

pyroute2 reports ipset's own errors as ``pyroute2.ipset._IPSetError`` (an
internal class, hence the upper version bound on pyroute2 in setup.cfg); its
``code`` is an errno or one of ipset's codes above 4096.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

from ..core.errors import KernelError

#: ipset's own error code for "element already added" on add and "element
#: not added" on delete (IPSET_ERR_EXIST in linux/netfilter/ipset/ip_set.h).
IPSET_ERR_EXIST = 4103


def _family(fam: int) -> int:
    return socket.AF_INET6 if fam == 6 else socket.AF_INET


def _describe(code: int) -> str:
    return os.strerror(code) if code < 4096 else f"ipset error {code}"


Entry = tuple[str, str | None]
"""(network, interface or None)."""


class IpSets:
    """One ipset netlink socket in the caller's namespace, opened on first use."""

    def __init__(self) -> None:
        self._ipset: Any = None

    def _sock(self) -> Any:
        if self._ipset is None:
            from pyroute2 import IPSet

            self._ipset = IPSet()
        return self._ipset

    def close(self) -> None:
        sock, self._ipset = self._ipset, None
        if sock is not None:
            sock.close()

    @staticmethod
    def _error() -> type[Exception]:
        from pyroute2.ipset import _IPSetError

        return _IPSetError  # type: ignore[no-any-return]

    def ensure_set(self, name: str, stype: str, fam: int) -> None:
        """Create the set unless an identical one exists (the kernel checks type and family)."""
        try:
            self._sock().create(name, stype=stype, family=_family(fam), exclusive=False)
        except self._error() as exc:
            raise KernelError(f"cannot create set {name} ({stype}): {_describe(exc.code)}") from exc  # type: ignore[attr-defined]

    def exists(self, name: str) -> bool:
        try:
            list(self._sock().headers(name))  # a generator: the request goes out when consumed
        except self._error() as exc:
            if exc.code == errno.ENOENT:  # type: ignore[attr-defined]
                return False
            raise KernelError(f"cannot read set {name}: {_describe(exc.code)}") from exc  # type: ignore[attr-defined]
        return True

    def destroy(self, name: str) -> bool:
        try:
            self._sock().destroy(name)
        except self._error() as exc:
            if exc.code == errno.ENOENT:  # type: ignore[attr-defined]
                return False
            raise KernelError(f"cannot destroy set {name}: {_describe(exc.code)}") from exc  # type: ignore[attr-defined]
        return True

    @staticmethod
    def _entry(e: Entry) -> tuple[Any, str]:
        network, dev = e
        return (network, "net") if dev is None else ((network, dev), "net,iface")

    def add(self, name: str, fam: int, e: Entry) -> bool:
        entry, etype = self._entry(e)
        try:
            self._sock().add(name, entry, family=_family(fam), etype=etype, exclusive=True)
            return True
        except self._error() as exc:
            if exc.code == IPSET_ERR_EXIST:  # type: ignore[attr-defined]
                return False
            raise KernelError(f"cannot add {e} to {name}: {_describe(exc.code)}") from exc  # type: ignore[attr-defined]

    def remove(self, name: str, fam: int, e: Entry) -> bool:
        entry, etype = self._entry(e)
        try:
            self._sock().delete(name, entry, family=_family(fam), etype=etype)
            return True
        except self._error() as exc:
            if exc.code in (IPSET_ERR_EXIST, errno.ENOENT):  # type: ignore[attr-defined]
                return False
            raise KernelError(f"cannot remove {e} from {name}: {_describe(exc.code)}") from exc  # type: ignore[attr-defined]

    def test(self, name: str, fam: int, e: Entry) -> bool:
        entry, etype = self._entry(e)
        try:
            return bool(self._sock().test(name, entry, family=_family(fam), etype=etype))
        except self._error() as exc:
            if exc.code in (IPSET_ERR_EXIST, errno.ENOENT):  # type: ignore[attr-defined]
                return False
            raise KernelError(f"cannot test {e} in {name}: {_describe(exc.code)}") from exc  # type: ignore[attr-defined]

    def members(self, name: str) -> list[Entry]:
        """Every member of set ``name`` (empty if the set does not exist)."""
        out: list[Entry] = []
        try:
            for msg in list(self._sock().list(name)):
                adt = msg.get_attr("IPSET_ATTR_ADT")
                if not adt:
                    continue
                for data in adt.get_attrs("IPSET_ATTR_DATA"):
                    ip = data.get_attr("IPSET_ATTR_IP_FROM")
                    addr = ip.get_attr("IPSET_ATTR_IPADDR_IPV4") or ip.get_attr("IPSET_ATTR_IPADDR_IPV6")
                    cidr = data.get_attr("IPSET_ATTR_CIDR")
                    if cidr is None:
                        cidr = 128 if ":" in str(addr) else 32
                    out.append((f"{addr}/{cidr}", data.get_attr("IPSET_ATTR_IFACE")))
        except self._error() as exc:
            if exc.code == errno.ENOENT:  # type: ignore[attr-defined]
                return []
            raise KernelError(f"cannot list set {name}: {_describe(exc.code)}") from exc  # type: ignore[attr-defined]
        return out
