"""The one main of the console scripts: ask the agent once when it serves the command, else run it here.

``vif-route-qubes``, ``qubes-setup-dnat-to-ns`` and ``vif-hotplug`` are
three names of the commands in :mod:`vif_hotplug.registry`; :func:`dispatch`
runs one of them in this process (the agent calls it too, for the requests
it serves), :func:`run_here` does so with this process's own logs and
runtime, and ``python3 -m vif_hotplug.entry PROG ARGS...`` is where the
thin client goes when the agent cannot answer.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from . import registry
from .agent.client import served, via_agent

if TYPE_CHECKING:
    from .app.log_setup import LogControl
    from .app.runtime import Runtime

log = logging.getLogger("vif_hotplug.entry")

After = Callable[[], None]
#: A command's exit status and what to run once the caller has it (hooks), if anything.
Answer = tuple[int, After | None]
Out = Callable[[str], None]
Runner = Callable[[Sequence[str], Mapping[str, str], "Runtime", "LogControl", Out, str], Answer]


def usage() -> str:
    width = max(len(c.name) for c in registry.COMMANDS) + 2
    lines = [f"{registry.UMBRELLA} COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {c.name.ljust(width)} {c.summary}" for c in registry.COMMANDS]
    lines += ["", f"'{registry.UMBRELLA} COMMAND --help' describes each command."]
    return "\n".join(lines)


def _runner(command: registry.Command) -> Runner | None:
    module, _, function = command.runner.partition(":")
    try:
        return getattr(importlib.import_module(module), function)  # type: ignore[no-any-return]
    except ModuleNotFoundError as exc:
        if command.part == "lab" and (exc.name or "").startswith("vif_hotplug.lab"):
            return None
        raise


def dispatch(
    prog: str, argv: Sequence[str], env: Mapping[str, str], runtime: Runtime, logs: LogControl, out: Out,
) -> Answer:
    """Run ``prog argv`` here: its exit status and what is left to run after answering."""
    args = list(argv)
    if prog == registry.UMBRELLA and (not args or args[0] in ("-h", "--help")):
        out(usage())
        return (0 if args else 2), None
    command, rest = registry.command_of(prog, args)
    if command is None:
        shown = args[0] if prog == registry.UMBRELLA else prog
        log.error("unknown command %s", ascii(shown[:64]))
        return 2, None
    runner = _runner(command)
    if runner is None:
        log.error("%s %s: the lab is not installed (package vif-hotplug-lab)", registry.UMBRELLA, command.name)
        return 2, None
    name = f"{registry.UMBRELLA} {command.name}" if prog == registry.UMBRELLA else prog
    return runner(rest, env, runtime, logs, out, name)


def run_here(prog: str, argv: Sequence[str], env: Mapping[str, str]) -> int:
    """The command in this process: logs to stderr and the system log, hooks after the answer."""
    from .app.log_setup import ProcessLogs
    from .app.runtime import Runtime

    command, _ = registry.command_of(prog, list(argv))
    logs = ProcessLogs(registry.ident(command))
    runtime = Runtime()
    try:
        code, after = dispatch(prog, argv, env, runtime, logs, print)
    finally:
        runtime.close()
    if after is not None:
        # After the status: the toolstack waits on it with a deadline, and a
        # slow hook must not make the VM's start fail.
        after()
    return code


def main_of(prog: str) -> None:
    argv = sys.argv[1:]
    code = via_agent(prog, argv, os.environ) if served(prog, argv) else None
    sys.exit(code if code is not None else run_here(prog, argv, os.environ))


def vif_route_qubes() -> None:
    """Console script ``vif-route-qubes``."""
    main_of("vif-route-qubes")


def qubes_setup_dnat_to_ns() -> None:
    """Console script ``qubes-setup-dnat-to-ns``."""
    main_of("qubes-setup-dnat-to-ns")


def vif_hotplug() -> None:
    """Console script ``vif-hotplug``."""
    main_of(registry.UMBRELLA)


if __name__ == "__main__":
    # The thin client's fallback: it asked the agent already.
    if len(sys.argv) < 2:
        sys.exit(2)
    sys.exit(run_here(sys.argv[1], sys.argv[2:], os.environ))
