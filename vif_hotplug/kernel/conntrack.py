"""Conntrack entries of addresses, deleted through netfilter netlink (:mod:`.nfnl`), not a tool's output."""

from __future__ import annotations

from collections.abc import Sequence

from ..core.errors import KernelError
from .nfnl import Nfnl
from .nlsock import NetlinkError


def purge_conntrack(addresses: Sequence[str], nfnl: Nfnl | None = None) -> int:
    """Delete conntrack entries whose original or reply tuple has one of ``addresses``; how many went.

    Entries that vanish meanwhile are not errors. ``nfnl`` is a socket to
    reuse (a resident agent's); without it one is opened for the call.
    """
    sock = nfnl or Nfnl()
    try:
        return sock.conntrack_purge(addresses)
    except NetlinkError as exc:
        raise KernelError(f"cannot purge conntrack for {', '.join(addresses)}: {exc.strerror}") from exc
    except OSError as exc:
        raise KernelError(f"cannot open conntrack netlink for {', '.join(addresses)}: {exc.strerror}") from exc
    finally:
        if nfnl is None:
            sock.close()
