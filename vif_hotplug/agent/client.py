"""The thin client: hand a command to the resident agent, stream its answer, exit with its code.

Standard library only, and only the cheap parts of it: this file is also
run on its own (``python3 -I -S .../agent/client.py PROG ARGS...``, as the
``/etc/xen/scripts`` wrapper does) so that a hotplug event costs one bare
interpreter start and one socket round trip. When the agent cannot take
the command (no socket, refused, not root's, or it dies mid-command), the
work is done in this process instead (:func:`main` runs the full entry
point); every command is idempotent, so a repeat after a half-done attempt
is safe.

Wire format (:data:`PROTOCOL`): the client sends one JSON object and a
newline, ``{"v", "prog", "argv", "env"}``; the agent answers with JSON
lines ``{"err": line}`` (for stderr), ``{"out": text}`` (for stdout) and
finally ``{"exit": code}``.
"""

from __future__ import annotations

import json
import os
import socket
import sys

PROTOCOL = 1
DEFAULT_STATE_DIR = "/run/vif-hotplug"
#: Longest an agent may take for one command before the client does it itself
#: (the agent's own locks give up after 30 s).
TIMEOUT = 90.0
#: Commands the agent serves; everything else always runs in-process.
PROGS = ("vif-route-qubes", "qubes-setup-dnat-to-ns", "vif-hotplug")


def socket_path(env: os._Environ[str] | dict[str, str]) -> str:
    state = env.get("VIF_HOTPLUG_STATE_DIR") or DEFAULT_STATE_DIR
    return env.get("VIF_HOTPLUG_AGENT_SOCKET") or os.path.join(state, "agent.sock")


def via_agent(prog: str, argv: list[str], env: os._Environ[str] | dict[str, str]) -> int | None:
    """The agent's exit code for ``prog argv``, or ``None`` when it could not do the command."""
    if env.get("VIF_HOTPLUG_AGENT") == "off":
        return None
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError:
        return None
    try:
        sock.settimeout(TIMEOUT)
        try:
            sock.connect(socket_path(env))
        except OSError:
            return None  # no agent, refused, or not ours to use: do it here
        request = {"v": PROTOCOL, "prog": prog, "argv": list(argv), "env": dict(env)}
        try:
            sock.sendall(json.dumps(request).encode() + b"\n")
            sock.shutdown(socket.SHUT_WR)
            return _relay(sock.makefile("rb"))
        except (OSError, ValueError):
            return None
    finally:
        sock.close()


def _relay(stream: object) -> int | None:
    """Copy the agent's lines to stderr/stdout until its exit code; ``None`` if it went away first."""
    for raw in stream:  # type: ignore[attr-defined]
        msg = json.loads(raw)
        if "err" in msg:
            sys.stderr.write(msg["err"] + "\n")
            sys.stderr.flush()
        elif "out" in msg:
            sys.stdout.write(msg["out"])
            sys.stdout.flush()
        elif "exit" in msg:
            return int(msg["exit"])
    return None


def main() -> None:
    """``client.py PROG ARGS...``: the agent's answer, else the full entry point in a new interpreter."""
    prog, argv = sys.argv[1], sys.argv[2:]
    code = via_agent(prog, argv, os.environ) if prog in PROGS else None
    if code is not None:
        sys.exit(code)
    module = {"vif-route-qubes": "vif_hotplug.vif_route", "qubes-setup-dnat-to-ns": "vif_hotplug.setup_dnat_to_ns"}
    env = dict(os.environ, VIF_HOTPLUG_AGENT="off")  # asked already
    target = module.get(prog, "vif_hotplug.cli")
    os.execve(sys.executable, [sys.executable, "-I", "-m", target, *argv], env)


if __name__ == "__main__":
    main()
