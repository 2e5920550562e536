"""Run a function in a forked child and bring its result (or error) back.

Two kernel-facing quirks need a fresh process: entering another network
namespace without moving the caller's sockets, and python-iptables, whose
per-process state (table handles, libxtables' extension registry) must not
leak between namespaces or address families.
"""

from __future__ import annotations

import os
import pickle
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from ..core.errors import KernelError

T = TypeVar("T")


def call_in_child(fn: Callable[[], T], netns: str | None = None, what: str = "child") -> T:
    """``fn()`` in a forked child, inside network namespace ``netns`` if given.

    Returns what ``fn`` returned (it must pickle); any exception in the child
    becomes :class:`KernelError` here, prefixed with ``what``. The child
    never returns into the caller's code.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        payload: tuple[str, Any]
        try:
            if netns is not None:
                from .netns import enter_netns_for_good

                enter_netns_for_good(netns)
            _forget_iptc_handles()
            payload = ("ok", fn())
        except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
            payload = ("error", f"{what}: {str(exc) or type(exc).__name__}")
        try:
            os.write(write_end, pickle.dumps(payload))
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    try:
        kind, value = pickle.loads(data)
    except Exception as exc:
        raise KernelError(f"{what} died (wait status {status})") from exc
    if kind != "ok":
        raise KernelError(str(value))
    return value  # type: ignore[no-any-return]


def _forget_iptc_handles() -> None:
    # python-iptables keeps one handle per table name for the whole process
    # in the class attribute ``_cache`` of Table/Table6 and Chain (internal,
    # hence the upper version bound in setup.cfg); an inherited handle would
    # still talk to the parent's namespace and hold the parent's view.
    for module in ("iptc.ip4tc", "iptc.ip6tc"):
        iptc = sys.modules.get(module)
        if iptc is None:
            continue
        for name in ("Table", "Table6", "Chain"):
            cls = getattr(iptc, name, None)
            if cls is not None and hasattr(cls, "_cache"):
                cls._cache.clear()
