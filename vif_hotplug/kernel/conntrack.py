"""Conntrack entries of an address, deleted through netlink (pyroute2), not a tool's output."""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

from ..core.errors import KernelError


def purge_conntrack(address: str) -> int:
    """Delete conntrack entries whose original or reply tuple has ``address``.

    Returns how many went. Entries that vanish meanwhile are not errors.
    """
    from pyroute2 import Conntrack
    from pyroute2.netlink.exceptions import NetlinkError
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    removed = 0
    try:
        ct = Conntrack(nfgen_family=family)
    except Exception as exc:  # NetlinkError, OSError: no conntrack netlink here
        raise KernelError(f"cannot open conntrack netlink for {address}: {exc}") from exc
    try:
        # Collect first: deleting while pyroute2's dump generator is open
        # closes its event loop under it.
        found: dict[str, Any] = {}
        for field in ("saddr", "daddr"):
            for which in ("tuple_orig", "tuple_reply"):
                flt = NFCTAttrTuple(family=family, **{field: address})
                for entry in list(ct.dump_entries(**{which: flt})):
                    found.setdefault(repr(entry.tuple_orig), entry)
        for entry in found.values():
            try:
                ct.delete(entry)
                removed += 1
            except NetlinkError as exc:
                if exc.code != errno.ENOENT:  # expired meanwhile
                    msg = f"cannot purge conntrack for {address}: {os.strerror(exc.code)}"
                    raise KernelError(msg) from exc
    except NetlinkError as exc:
        raise KernelError(f"cannot list conntrack for {address}: {os.strerror(exc.code)}") from exc
    finally:
        ct.close()
    return removed
