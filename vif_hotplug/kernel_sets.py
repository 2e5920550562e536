"""Thin adapter over pyroute2's ipset netlink API (no ``ipset`` binary)."""

from __future__ import annotations

import errno
import logging
import os
import socket
from typing import Any

from .errors import KernelError
from .model import SetEntry

log = logging.getLogger(__name__)

#: ipset's own error code for "element already added" on add and "element
#: not added" on delete (IPSET_ERR_EXIST in linux/netfilter/ipset/ip_set.h).
IPSET_ERR_EXIST = 4103


def _family(fam: int) -> int:
    return socket.AF_INET6 if fam == 6 else socket.AF_INET


def _describe(code: int) -> str:
    return os.strerror(code) if code < 4096 else f"ipset error {code}"


class KernelSets:
    """One ipset netlink socket in the caller's namespace. Close it when done."""

    def __init__(self) -> None:
        from pyroute2 import IPSet

        self._ipset: Any = IPSet()

    def close(self) -> None:
        self._ipset.close()

    def ensure_set(self, name: str, stype: str, fam: int) -> None:
        """Create the set unless an identical one exists (the kernel checks type and family)."""
        from pyroute2.ipset import _IPSetError

        try:
            self._ipset.create(name, stype=stype, family=_family(fam), exclusive=False)
        except _IPSetError as exc:
            raise KernelError(f"cannot create set {name} ({stype}): {_describe(exc.code)}") from exc

    def _entry(self, e: SetEntry) -> tuple[Any, str]:
        if e.dev is None:
            return e.network, "net"
        return (e.network, e.dev), "net,iface"

    def add(self, e: SetEntry) -> bool:
        from pyroute2.ipset import _IPSetError

        entry, etype = self._entry(e)
        try:
            self._ipset.add(e.set_name, entry, family=_family(e.family), etype=etype, exclusive=True)
            return True
        except _IPSetError as exc:
            if exc.code == IPSET_ERR_EXIST:
                return False
            raise KernelError(f"cannot add {e}: {_describe(exc.code)}") from exc

    def remove(self, e: SetEntry) -> bool:
        from pyroute2.ipset import _IPSetError

        entry, etype = self._entry(e)
        try:
            self._ipset.delete(e.set_name, entry, family=_family(e.family), etype=etype)
            return True
        except _IPSetError as exc:
            if exc.code in (IPSET_ERR_EXIST, errno.ENOENT):
                return False
            raise KernelError(f"cannot remove {e}: {_describe(exc.code)}") from exc

    def members(self, name: str) -> list[SetEntry]:
        """Current members of set ``name`` (empty if the set does not exist)."""
        from pyroute2.ipset import _IPSetError

        out: list[SetEntry] = []
        try:
            for msg in self._ipset.list(name):
                adt = msg.get_attr("IPSET_ATTR_ADT")
                if not adt:
                    continue
                for data in adt.get_attrs("IPSET_ATTR_DATA"):
                    ip = data.get_attr("IPSET_ATTR_IP_FROM")
                    addr = ip.get_attr("IPSET_ATTR_IPADDR_IPV4") or ip.get_attr("IPSET_ATTR_IPADDR_IPV6")
                    cidr = data.get_attr("IPSET_ATTR_CIDR")
                    if cidr is None:
                        cidr = 128 if ":" in str(addr) else 32
                    out.append(SetEntry(name, f"{addr}/{cidr}", data.get_attr("IPSET_ATTR_IFACE")))
        except _IPSetError as exc:
            if exc.code == errno.ENOENT:
                return []
            raise KernelError(f"cannot list set {name}: {_describe(exc.code)}") from exc
        return out
