"""pyroute2's exceptions, translated into this package's :class:`~.nlsock.NetlinkError` at one boundary.

Every call into pyroute2 (namespaces and veth pairs in :mod:`.netns`, set
creation and listing in :mod:`.ipset`) runs inside :func:`pyroute2_errors`,
so what leaves the kernel adapters is one error type whichever netlink
stack answered: :class:`~.nlsock.NetlinkError` (an ``OSError``), which the
adapters turn into :class:`~vif_hotplug.core.errors.KernelError`.

Only public names of pyroute2 are used, present in 0.7.2 (Debian 12) and
0.9 alike: ``pyroute2.netlink.exceptions.NetlinkError`` (``code``; its
message is the kernel's extended ACK, or pyroute2's own words for ipset's
codes), ``NetlinkDumpInterrupted`` (``code`` -1) and ``NetlinkDecodeError``.
ipset's errors (``IPSetError`` and the internal classes under it) derive
from ``NetlinkError`` in both.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator

from .nlsock import DumpInterrupted, NetlinkError, error_text


def translated(code: int, detail: object = None) -> NetlinkError:
    """Our error for pyroute2's ``code`` and message, the message kept when it says more than the errno's text.

    pyroute2 does not tell the kernel's words from its own, so they go into
    the text only, not ``kernel_message``.
    """
    if code <= 0:  # pyroute2 marks some failures of its own with -1
        code = errno.EPROTO
    base = error_text(code)
    said = str(detail) if detail else ""
    return NetlinkError(code, base if said in ("", base) else f"{base}: {said}")


@contextlib.contextmanager
def pyroute2_errors() -> Iterator[None]:
    """Run pyroute2 calls; its netlink exceptions leave as :class:`NetlinkError` (other OSErrors unchanged)."""
    from pyroute2.netlink.exceptions import NetlinkDecodeError, NetlinkDumpInterrupted
    from pyroute2.netlink.exceptions import NetlinkError as PyNetlinkError

    try:
        yield
    except NetlinkDumpInterrupted as exc:
        raise DumpInterrupted(errno.EINTR, "the netlink dump was interrupted by concurrent changes") from exc
    except PyNetlinkError as exc:
        args = exc.args
        raise translated(int(exc.code), args[1] if len(args) > 1 else None) from exc
    except NetlinkDecodeError as exc:
        raise NetlinkError(errno.EPROTO, f"pyroute2 could not decode the answer: {exc.exception}") from exc
