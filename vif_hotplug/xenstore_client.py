"""XenStore access through pyxs, with a deadline on every request.

pyxs waits forever for a reply: a xenstored that accepted the connection and
then hung would hang every VM start. Each request here waits at most
``timeout`` seconds and then fails with :class:`XenStoreUnavailable`.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from .errors import XenStoreUnavailable

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 5.0
_SOCKET_CANDIDATES = ("/var/run/xenstored/socket", "/run/xenstored/socket")
_XENBUS = "/dev/xen/xenbus"


def xenstore_endpoint(env: Mapping[str, str]) -> tuple[str, str]:
    """(``"unix"`` | ``"xenbus"``, path): ``XENSTORED_PATH``, the daemon socket, the xenbus device."""
    if env.get("XENSTORED_PATH"):
        return "unix", env["XENSTORED_PATH"]
    for path in _SOCKET_CANDIDATES:
        if os.path.exists(path):
            return "unix", path
    return "xenbus", _XENBUS


class XenStore:
    """A connected XenStore client. Use as a context manager.

    Paths may be relative (resolved by xenstored against this domain's home).
    Values are ``str``; a missing key reads as ``None``.
    """

    def __init__(self, env: Mapping[str, str], timeout: float = DEFAULT_TIMEOUT) -> None:
        self._kind, self._path = xenstore_endpoint(env)
        self._timeout = timeout
        self._client: Any = None

    def __enter__(self) -> XenStore:
        self.connect()
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def connect(self) -> None:
        try:
            import pyxs
            from pyxs.client import Router
            from pyxs.connection import UnixSocketConnection, XenBusConnection
        except ImportError as exc:  # pragma: no cover - dependency missing
            raise XenStoreUnavailable(f"pyxs is not installed: {exc}") from exc

        timeout = self._timeout
        path = self._path

        class _Reply:
            """pyxs' reply slot, with a deadline instead of an endless wait."""

            __slots__ = ("event", "target")

            def __init__(self) -> None:
                self.event = threading.Event()
                self.target: Any = None

            def set(self, target: Any) -> None:
                self.target = target
                self.event.set()

            def get(self) -> Any:
                if not self.event.wait(timeout):
                    raise XenStoreUnavailable(f"XenStore at {path} did not answer within {timeout:g}s")
                return self.target

        class _TimedRouter(Router):  # type: ignore[misc]
            # Router.send creates its RVar inline; this is the only hook to
            # put a deadline on replies without forking pyxs.
            def send(self, packet: Any) -> Any:
                with self.send_lock:
                    self.rvars[packet.rq_id] = reply = _Reply()
                    self.connection.send(packet)
                    return reply

        try:
            conn = UnixSocketConnection(path) if self._kind == "unix" else XenBusConnection(path)
            router = _TimedRouter(conn)
            client = pyxs.Client(router=router)
            self._connect_with_deadline(client)
        except XenStoreUnavailable:
            raise
        except Exception as exc:  # pyxs raises its own ConnectionError, OSError, ...
            raise XenStoreUnavailable(f"cannot connect to XenStore at {path}: {exc}") from exc
        self._client = client

    def _connect_with_deadline(self, client: Any) -> None:
        # Router.start() spins until its thread reports connected; bound it.
        done = threading.Event()
        failure: list[BaseException] = []

        def start() -> None:
            try:
                client.connect()
            except BaseException as exc:  # noqa: BLE001 - re-raised in caller
                failure.append(exc)
            finally:
                done.set()

        t = threading.Thread(target=start, daemon=True)
        t.start()
        if not done.wait(self._timeout):
            raise XenStoreUnavailable(f"cannot connect to XenStore at {self._path}: timed out")
        if failure:
            raise failure[0]

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:
                log.debug("closing XenStore connection failed", exc_info=True)

    def _call(self, what: str, path: str, fn: Any, *args: Any) -> Any:
        if self._client is None:
            raise XenStoreUnavailable("XenStore is not connected")
        try:
            return fn(path.encode(), *args)
        except XenStoreUnavailable:
            raise
        except Exception as exc:
            code = getattr(exc, "args", (None,))[0]
            if isinstance(code, int) and code == errno.ENOENT:
                raise KeyError(path) from exc
            raise XenStoreUnavailable(f"XenStore {what} {path} failed: {exc}") from exc

    def read(self, path: str) -> str | None:
        try:
            raw = self._call("read", path, self._client.read)
        except KeyError:
            return None
        try:
            return str(raw.decode("utf-8"))
        except UnicodeDecodeError:
            # Keep going with a value validation will reject and name.
            return str(raw.decode("utf-8", "backslashreplace"))

    def write(self, path: str, value: str) -> None:
        self._call("write", path, self._client.write, value.encode())
