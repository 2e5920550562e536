"""``vif-hotplug``: the umbrella command. Each subcommand imports only what it needs."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

USAGE = """\
vif-hotplug COMMAND [ARGS...]

commands:
  route ARGS...        same as vif-route-qubes ARGS... (online/offline of one vif)
  dns ARGS...          same as qubes-setup-dnat-to-ns ARGS... (DNS DNAT; --watch)
  init ARGS...         set up the netvm base ruleset once (idempotent)
  lab ARGS...          run the whole system in network namespaces, no Xen needed
  xenstored --socket PATH
                       serve the XenStore wire protocol on a Unix socket

'vif-hotplug COMMAND --help' describes each command."""


def _route(argv: Sequence[str]) -> int:
    from .vif_route import run

    return run(list(argv), prog="vif-hotplug route")


def _dns(argv: Sequence[str]) -> int:
    from .hotplug_log import configure
    from .setup_dnat_to_ns import run

    configure("vif-hotplug dns")
    return run(list(argv), prog="vif-hotplug dns")


def _init(argv: Sequence[str]) -> int:
    from .base_ruleset import run

    return run(list(argv))


def _lab(argv: Sequence[str]) -> int:
    from .lab import run

    return run(list(argv))


def _xenstored(argv: Sequence[str]) -> int:
    import argparse
    import logging

    p = argparse.ArgumentParser(
        prog="vif-hotplug xenstored",
        description="Serve the XenStore wire protocol (xs_wire.h) on a Unix socket, for machines without Xen. "
        "Clients: xenstore-utils with XENSTORED_PATH=PATH, pyxs, vif-route-qubes.",
    )
    p.add_argument("--socket", required=True, metavar="PATH", help="Unix socket to listen on (replaced if stale)")
    ns = p.parse_args(list(argv))
    from .hotplug_log import configure
    from .xenstored import serve

    configure("vif-hotplug xenstored")
    try:
        serve(ns.socket)
    except OSError as exc:
        logging.getLogger("vif_hotplug.xenstored").error("cannot serve on %s: %s", ns.socket, exc.strerror or exc)
        return 1
    return 0


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "route": _route,
    "dns": _dns,
    "init": _init,
    "lab": _lab,
    "xenstored": _xenstored,
}


def run(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    handler = COMMANDS.get(args[0])
    if handler is None:
        print(f"vif-hotplug: unknown command {args[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return handler(args[1:])


def main() -> None:
    sys.exit(run())
