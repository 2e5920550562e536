"""``qubes-setup-dnat-to-ns``: point the virtual resolvers at today's real ones (entry point).

Parses argv and the environment and wires the DNS use case
(:mod:`vif_hotplug.app.dns`) to the firewall backend; the agent serves it
when it runs. Exit 0 rules changed, 100 nothing changed, 1 error.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    import argparse

    from .app.log_setup import LogControl
    from .app.runtime import Runtime

PROG = "qubes-setup-dnat-to-ns"


class _UsageError(Exception):
    pass


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This tool's options (also the umbrella's ``vif-hotplug dns``)."""
    parser.add_argument(
        "-v", "--verbose", action="count", default=0,
        help="print the computed rules; log each step (twice: debug)",
    )
    parser.add_argument(
        "--resolv-conf", metavar="PATH",
        help="read upstream nameservers from PATH only (default: systemd-resolved, else /etc/resolv.conf)",
    )
    parser.add_argument("--backend", choices=("auto", "nftables", "iptables"),
                        help="firewall backend (default: netvm.conf [firewall] backend, else auto)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the computed rules and change nothing")
    mode.add_argument(
        "--watch", action="store_true",
        help="stay running and re-apply whenever the resolver files change; stop on SIGTERM/SIGINT",
    )


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The command line parser; usage errors raise instead of exiting (the agent runs it too)."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:
            raise _UsageError(f"{message} (see --help)")

    parser = Parser(
        prog=prog,
        description="Map the virtual DNS resolvers (DNS1/DNS2) onto the uplink's nameservers with DNAT "
        "(nftables chains dnat-dns and dns-guard of table ip qubes, or iptables PR-QBS and QBS-DNS).",
        epilog="Exit status: 0 rules changed, 100 nothing changed, 1 error.",
    )
    add_arguments(parser)
    return parser


def run(
    argv: Sequence[str], env: Mapping[str, str], runtime: Runtime, logs: LogControl, out: Callable[[str], None],
    prog: str = PROG,
) -> int:
    """The whole command; returns the exit code (never calls ``sys.exit``)."""
    import logging

    from .app.dns import EXIT_ERROR, apply_dns, virtual_resolvers, watch
    from .app.settings import settings_from_env
    from .core.errors import HotplugError

    log = logging.getLogger("vif_hotplug.dns")
    try:
        args = build_parser(prog).parse_args(list(argv))
    except _UsageError as exc:
        log.error("%s", exc)
        return EXIT_ERROR
    except SystemExit as exc:  # --help prints, then "exits"
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    if args.verbose:
        logs.verbose(logging.INFO if args.verbose == 1 else logging.DEBUG)
    try:
        settings = settings_from_env(env).with_backend(args.backend)
        xs = runtime.xenstore(settings)
        try:
            virtual = virtual_resolvers(settings, runtime.qubesdb(settings), xs.read)
        finally:
            xs.close()
        host = runtime.host(settings)
        show = out if args.verbose or args.dry_run else None
        if args.watch:
            return watch(settings, host, host.firewall.describe, virtual, args.resolv_conf, show=show)
        return apply_dns(settings, host, host.firewall.describe, virtual, args.resolv_conf, show=show,
                         dry_run=args.dry_run)
    except HotplugError as exc:
        log.error("%s", exc)
        return EXIT_ERROR


def run_here(argv: Sequence[str], env: Mapping[str, str], prog: str = PROG) -> int:
    from .app.log_setup import ProcessLogs
    from .app.runtime import Runtime

    runtime = Runtime()
    try:
        return run(argv, env, runtime, ProcessLogs(prog), print, prog)
    finally:
        runtime.close()


def main() -> None:
    """Console script ``qubes-setup-dnat-to-ns``."""
    import os

    from .agent.client import via_agent

    argv = sys.argv[1:]
    code = None if "--watch" in argv else via_agent(PROG, argv, os.environ)
    sys.exit(code if code is not None else run_here(argv, os.environ))


if __name__ == "__main__":
    main()
