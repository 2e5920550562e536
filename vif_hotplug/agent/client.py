"""The thin client: hand a command to the resident agent, stream its answer, exit with its code.

Only what a bare interpreter has loaded already (``os``, ``sys``) and the C
module ``_socket``: this file is also run on its own (``python3 -I -S
.../vif-hotplug-client PROG ARGS...``, as the ``/etc/xen/scripts`` wrapper
does), and on this project's machine ``import socket`` or ``import json``
each cost more than the whole round trip to the agent. When the agent
cannot take the command (no socket, refused, not root's, or it dies
mid-command), the work is done without it (:func:`main` starts the full
entry point); every command is idempotent, so a repeat after a half-done
attempt is safe.

Wire format (:data:`MAGIC`), both ways UTF-8:

* request: NUL-terminated strings ``MAGIC, prog, len(argv), *argv,
  *("KEY=VALUE" for the environment)``, then the client shuts its side;
* answer: lines ``E<text>`` (a line for stderr), ``O<text>`` (a line for
  stdout), and last ``X<code>``.
"""

from __future__ import annotations

import _socket
import os
import sys

MAGIC = "VIFHOTPLUG1"
DEFAULT_STATE_DIR = "/run/vif-hotplug"
#: Longest an agent may take for one command before the client does it itself
#: (the agent's own locks give up after 30 s).
TIMEOUT = 90.0
#: Commands the agent serves; everything else always runs in-process.
PROGS = ("vif-route-qubes", "qubes-setup-dnat-to-ns", "vif-hotplug")


def socket_path(env: os._Environ[str] | dict[str, str]) -> str:
    state = env.get("VIF_HOTPLUG_STATE_DIR") or DEFAULT_STATE_DIR
    return env.get("VIF_HOTPLUG_AGENT_SOCKET") or os.path.join(state, "agent.sock")


def encode_request(prog: str, argv: list[str], env: os._Environ[str] | dict[str, str]) -> bytes:
    words = [MAGIC, prog, str(len(argv)), *argv, *(f"{k}={v}" for k, v in env.items())]
    return "".join(w + "\0" for w in words).encode("utf-8", "surrogateescape")


def via_agent(prog: str, argv: list[str], env: os._Environ[str] | dict[str, str]) -> int | None:
    """The agent's exit code for ``prog argv``, or ``None`` when it could not do the command."""
    if env.get("VIF_HOTPLUG_AGENT") == "off":
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


def _relay(sock: _socket.socket) -> int | None:
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
    """``client.py PROG ARGS...``: the agent's answer, else the full entry point in a new interpreter."""
    prog, argv = sys.argv[1], sys.argv[2:]
    code = via_agent(prog, argv, os.environ) if prog in PROGS else None
    if code is not None:
        sys.exit(code)
    module = {"vif-route-qubes": "vif_hotplug.vif_route", "qubes-setup-dnat-to-ns": "vif_hotplug.setup_dnat_to_ns"}
    env = dict(os.environ, VIF_HOTPLUG_AGENT="off")  # asked already
    os.execve(sys.executable, [sys.executable, "-I", "-m", module.get(prog, "vif_hotplug.cli"), *argv], env)


if __name__ == "__main__":
    main()
