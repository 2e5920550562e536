"""What the use cases need of XenStore, and an event's reads with one wait for all their replies.

:class:`~vif_hotplug.xen.xenstore_client.XenStore` implements both
protocols; unit tests use a dictionary.
"""

from __future__ import annotations

from typing import Protocol


class XenStorePort(Protocol):
    """What hotplug needs of XenStore (``None`` for a missing key)."""

    def read(self, path: str) -> str | None: ...

    def write(self, path: str, value: str) -> None: ...


def read_all(xs: XenStorePort, paths: list[str]) -> list[str | None]:
    """Every path's value, with one wait for all the replies when the client has ``read_many``.

    On xenstored's socket that is one round trip; on the xenbus device one
    ``write`` per request, then the replies (one round trip on Linux 4.11+,
    whose driver queues requests; one per request before, where ``write``
    itself waits for the answer). docs/xenstore.md, Pipelining.
    """
    many = getattr(xs, "read_many", None)
    if many is not None:
        return list(many(paths))
    return [xs.read(p) for p in paths]


class Prefetched:
    """``xs`` with ``paths`` read ahead together (:func:`read_all`): an event's reads cost one wait, not one each.

    Reads of other paths, and writes, go to ``xs``. For one event: the
    values are as they were when it started.
    """

    def __init__(self, xs: XenStorePort, paths: list[str]) -> None:
        self._xs = xs
        self._values = dict(zip(paths, read_all(xs, paths), strict=True))

    def read(self, path: str) -> str | None:
        if path in self._values:
            return self._values[path]
        return self._xs.read(path)

    def write(self, path: str, value: str) -> None:
        self._xs.write(path, value)


class XenStoreTree(XenStorePort, Protocol):
    """XenStore as ``reconcile`` and ``status`` see it: every vif's backend directory."""

    def directory(self, path: str) -> list[str]: ...
