"""The thin client: hand a command to the resident agent, stream its answer, exit with its code.

Only built-in modules a bare interpreter has (``sys``, ``posix``, ``time``),
the C module ``_socket`` and this package's import-free :mod:`vif_hotplug.registry`:
the ``/etc/xen/scripts`` wrapper and the tools on PATH import this module
under ``python3 -I -S`` with the package's directory put first on
``sys.path`` (so its byte code is cached). Measured on this project's
machine, ``import os`` alone costs a ``-S`` interpreter 3 ms
(``_collections_abc``), ``import socket`` or ``import json`` more than the
whole round trip to the agent.

When the agent cannot take the command (no socket, refused, a socket whose
server is not root, no answer within :data:`TIMEOUT`, or it dies
mid-command), the work is done without it (:func:`main` starts the full
entry point); every command is idempotent, so a repeat after a half-done
attempt is safe.

Wire format, both ways UTF-8 (values as the process got them, bytes):

* request: NUL-terminated words ``MAGIC, prog, len(argv), *argv,
  len(env), *("KEY=VALUE" ...), END``, then the client shuts its side. Only
  the variables of :data:`ENV_ALLOWED` are sent (the agent enforces the same
  list); ``END`` lets the agent refuse a request that was cut short;
* answer: lines ``E<text>`` (a line for stderr), ``O<text>`` (a line for
  stdout), and last ``X<code>``.
"""

import _socket
import posix
import sys
import time

from .. import registry

# Not typing's TYPE_CHECKING, nor ``from __future__ import annotations``:
# importing either costs more than this whole client. Annotations are quoted.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

    Env = Mapping[str, str] | Mapping[bytes, bytes]

MAGIC = "VIFHOTPLUG2"
END = "END"
DEFAULT_STATE_DIR = "/run/vif-hotplug"
#: How long the client waits for the agent's answer before it does the command
#: itself. libxl waits 40 s for ``hotplug-status`` (LIBXL_HOTPLUG_TIMEOUT):
#: this, plus the fallback's own lock wait (``settings.FALLBACK_LOCK_TIMEOUT``)
#: and XenStore deadline, stays inside it; the agent's own lock waits are
#: shorter than this (``settings.AGENT_LOCK_TIMEOUT``).
TIMEOUT = 10.0
CONNECT_TIMEOUT = 1.0

#: What the agent may learn of a client's environment: the toolstack's
#: variables and this package's own. ``PATH`` is not among them: the tools
#: the agent runs come from fixed paths, whoever asks.
ENV_ALLOWED = (
    # libxl / xl devd and Xen's udev rules (xen-hotplug-common.sh)
    "XENBUS_PATH", "XENBUS_TYPE", "XENBUS_BASE_PATH", "vif", "netdev", "script",
    # this package
    "XENSTORED_PATH", "VIF_HOTPLUG_CONF", "VIF_HOTPLUG_HOOKS_DIR", "VIF_HOTPLUG_LOCK", "VIF_HOTPLUG_STATE_DIR",
    "VIF_HOTPLUG_AGENT_SOCKET", "VIF_HOTPLUG_TOOLS_DIR", "XTABLES_LOCKFILE",
)
#: Longest request either side accepts (argv and environment).
MAX_REQUEST = 1 << 16

served = registry.served


def _get(env: "Env", name: "str") -> "str | None":
    value = env.get(name.encode()) if isinstance(next(iter(env), ""), bytes) else env.get(name)  # type: ignore[call-overload]
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return value


def socket_path(env: "Env") -> "str":
    state = _get(env, "VIF_HOTPLUG_STATE_DIR") or DEFAULT_STATE_DIR
    return _get(env, "VIF_HOTPLUG_AGENT_SOCKET") or state.rstrip("/") + "/agent.sock"


def encode_request(prog: "str", argv: "list[str]", env: "Env") -> "bytes":
    words = [w.encode("utf-8", "surrogateescape") for w in (MAGIC, prog, str(len(argv)), *argv)]
    pairs = []
    for name in ENV_ALLOWED:
        value = _get(env, name)
        if value is not None:
            pairs.append(f"{name}={value}".encode("utf-8", "surrogateescape"))
    words += [str(len(pairs)).encode(), *pairs, END.encode()]
    return b"".join(w + b"\0" for w in words)


def _server_is_root(sock: "_socket.socket") -> "bool":
    # The credentials of whoever made the listening socket (systemd for an
    # activated one): a socket another user put in our path gets nothing.
    raw = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
    return int.from_bytes(raw[4:8], sys.byteorder) == 0


def via_agent(prog: "str", argv: "list[str]", env: "Env") -> "int | None":
    """The agent's exit code for ``prog argv``, or ``None`` when it could not do the command."""
    if _get(env, "VIF_HOTPLUG_AGENT") == "off":
        return None
    try:
        request = encode_request(prog, argv, env)
    except UnicodeError:
        return None
    if len(request) > MAX_REQUEST:
        return None
    try:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    except OSError:
        return None
    try:
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(socket_path(env))
            if not _server_is_root(sock):
                return None
        except OSError:
            return None  # no agent, refused, or not ours to use: do it here
        try:
            sock.settimeout(TIMEOUT)
            sock.sendall(request)
            sock.shutdown(_socket.SHUT_WR)
            return _relay(sock, time.monotonic() + TIMEOUT)
        except (OSError, ValueError):
            return None
    finally:
        sock.close()


def _relay(sock: "_socket.socket", deadline: "float") -> "int | None":
    """Copy the agent's lines to stderr/stdout until its exit code; ``None`` if it went away or
    did not finish by ``deadline``."""
    pending = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        sock.settimeout(left)
        chunk = sock.recv(65536)
        if not chunk:
            return None
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for raw in lines:
            kind, text = raw[:1], raw[1:].decode("utf-8", "replace")
            if kind == b"E":
                sys.stderr.write(text + "\n")
                sys.stderr.flush()
            elif kind == b"O":
                sys.stdout.write(text + "\n")
                sys.stdout.flush()
            elif kind == b"X":
                return int(text)


def main() -> None:
    """``PROG ARGS...`` in ``sys.argv[1:]``: the agent's answer, else the full entry point in a new interpreter."""
    prog, argv = sys.argv[1], sys.argv[2:]
    env = posix.environ
    code = via_agent(prog, argv, env) if served(prog, argv) else None
    if code is not None:
        sys.exit(code)
    env = dict(env)
    env[b"VIF_HOTPLUG_AGENT"] = b"off"  # asked already
    posix.execve(sys.executable, [sys.executable, "-I", "-m", "vif_hotplug.entry", prog, *argv], env)


if __name__ == "__main__":
    main()
