"""The thin client: hand a command to the resident agent, stream its answer, exit with its code.

Only built-in modules a bare interpreter has (``sys``, ``posix``) and the C
module ``_socket``: this file is also installed on its own, as the module
``vif_hotplug_client`` in ``PREFIX/libexec``, which the ``/etc/xen/scripts``
wrapper and the tools on PATH import under ``python3 -I -S`` (imported, so
its byte code is cached). Measured on this project's machine, ``import os``
alone costs a ``-S`` interpreter 3 ms (``_collections_abc``), ``import
socket`` or ``import json`` more than the whole round trip to the agent.
When the agent cannot take the command (no socket, refused, not root's, or
it dies mid-command), the work is done without it (:func:`main` starts the
full entry point); every command is idempotent, so a repeat after a
half-done attempt is safe.

Wire format (:data:`MAGIC`), both ways UTF-8 (the environment as the
process got it, bytes):

* request: NUL-terminated strings ``MAGIC, prog, len(argv), *argv,
  *("KEY=VALUE" for the environment)``, then the client shuts its side;
* answer: lines ``E<text>`` (a line for stderr), ``O<text>`` (a line for
  stdout), and last ``X<code>``.
"""

import _socket
import posix
import sys

# Not typing's TYPE_CHECKING, nor ``from __future__ import annotations``:
# importing either costs more than this whole client. Annotations are quoted.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

    Env = Mapping[str, str] | Mapping[bytes, bytes]

MAGIC = "VIFHOTPLUG1"
DEFAULT_STATE_DIR = "/run/vif-hotplug"
#: Longest an agent may take for one command before the client does it itself
#: (the agent's own locks give up after 30 s).
TIMEOUT = 90.0
#: Commands the agent serves; everything else always runs in-process.
PROGS = ("vif-route-qubes", "qubes-setup-dnat-to-ns", "vif-hotplug")
#: ``vif-hotplug`` commands that run where they are started (the agent itself, the lab, a XenStore).
LOCAL_ONLY = ("lab", "xenstored", "agent")


def served(prog: str, argv: "list[str]") -> bool:
    """Whether the agent does ``prog argv`` (never a long-running ``--watch`` or a local-only command)."""
    if prog not in PROGS or "--watch" in argv:
        return False
    return prog != "vif-hotplug" or (bool(argv) and argv[0] not in LOCAL_ONLY)


def _get(env: "Env", name: str) -> "str | None":
    value = env.get(name.encode()) if isinstance(next(iter(env), ""), bytes) else env.get(name)  # type: ignore[call-overload]
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return value


def socket_path(env: "Env") -> str:
    state = _get(env, "VIF_HOTPLUG_STATE_DIR") or DEFAULT_STATE_DIR
    return _get(env, "VIF_HOTPLUG_AGENT_SOCKET") or state.rstrip("/") + "/agent.sock"


def encode_request(prog: str, argv: "list[str]", env: "Env") -> bytes:
    words = [w.encode("utf-8", "surrogateescape") for w in (MAGIC, prog, str(len(argv)), *argv)]
    for k, v in env.items():
        if isinstance(k, bytes) and isinstance(v, bytes):
            words.append(k + b"=" + v)
        elif isinstance(k, str) and isinstance(v, str):
            words.append(f"{k}={v}".encode("utf-8", "surrogateescape"))
    return b"".join(w + b"\0" for w in words)


def via_agent(prog: str, argv: "list[str]", env: "Env") -> "int | None":
    """The agent's exit code for ``prog argv``, or ``None`` when it could not do the command."""
    if _get(env, "VIF_HOTPLUG_AGENT") == "off":
        return None
    try:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    except OSError:
        return None
    try:
        sock.settimeout(TIMEOUT)
        try:
            sock.connect(socket_path(env))
        except OSError:
            return None  # no agent, refused, or not ours to use: do it here
        try:
            sock.sendall(encode_request(prog, argv, env))
            sock.shutdown(_socket.SHUT_WR)
            return _relay(sock)
        except (OSError, ValueError):
            return None
    finally:
        sock.close()


def _relay(sock: "_socket.socket") -> "int | None":
    """Copy the agent's lines to stderr/stdout until its exit code; ``None`` if it went away first."""
    pending = b""
    while True:
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
    module = {"vif-route-qubes": "vif_hotplug.vif_route", "qubes-setup-dnat-to-ns": "vif_hotplug.setup_dnat_to_ns"}
    env = dict(env)
    env[b"VIF_HOTPLUG_AGENT"] = b"off"  # asked already
    posix.execve(sys.executable, [sys.executable, "-I", "-m", module.get(prog, "vif_hotplug.cli"), *argv], env)


if __name__ == "__main__":
    main()
