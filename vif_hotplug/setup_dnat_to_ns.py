"""``qubes-setup-dnat-to-ns``: point the virtual resolvers at today's real ones (entry point).

Parses argv and the environment and wires the DNS use case
(:mod:`vif_hotplug.app.dns`) to the firewall backend; the agent serves it
when it runs. Exit 0 rules changed, 100 nothing changed, 1 error.
"""

from __future__ import annotations

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
        prog=prog, allow_abbrev=False,
        description="Map the virtual DNS resolvers (DNS1/DNS2) onto the uplink's nameservers with DNAT "
        "(nftables chains dnat-dns and dns-guard of table ip qubes, or iptables PR-QBS and QBS-DNS).",
        epilog="Exit status: 0 rules changed, 100 nothing changed, 1 error.",
    )
    add_arguments(parser)
    return parser


def run(
    argv: Sequence[str], env: Mapping[str, str], runtime: Runtime, logs: LogControl, out: Callable[[str], None],
    prog: str = PROG,
) -> tuple[int, None]:
    """The whole command: (exit code, nothing to run after). Never calls ``sys.exit``."""
    import logging

    from .app.backend_state import note_in_use, resolve
    from .app.dns import EXIT_CHANGED, EXIT_ERROR, apply_dns, virtual_resolvers, watch
    from .app.switch import settle_backend
    from .core.errors import HotplugError

    log = logging.getLogger("vif_hotplug.dns")
    try:
        args = build_parser(prog).parse_args(list(argv))
    except _UsageError as exc:
        log.error("%s", exc)
        return EXIT_ERROR, None
    except SystemExit as exc:  # --help prints, then "exits"
        return (exc.code if isinstance(exc.code, int) else EXIT_ERROR), None
    if args.verbose:
        logs.verbose(logging.INFO if args.verbose == 1 else logging.DEBUG)
    try:
        settings = runtime.settings(env, args.backend)
        xs = runtime.xenstore(settings)
        try:
            virtual = virtual_resolvers(settings, runtime.qubesdb(settings), xs.read)
        finally:
            xs.close()
        backend = resolve(settings).in_use if args.dry_run else settle_backend(settings, runtime)
        host = runtime.host(settings, backend, read_only=args.dry_run)
        show = out if args.verbose or args.dry_run else None
        if args.watch:
            return watch(settings, host, host.firewall.describe, virtual, args.resolv_conf, show=show), None
        code = apply_dns(settings, host, host.firewall.describe, virtual, args.resolv_conf, show=show,
                         dry_run=args.dry_run)
        if code == EXIT_CHANGED and not args.dry_run:
            note_in_use(settings, backend)
        return code, None
    except HotplugError as exc:
        log.error("%s", exc)
        return EXIT_ERROR, None


def main() -> None:
    """Console script ``qubes-setup-dnat-to-ns`` (also :func:`vif_hotplug.entry.qubes_setup_dnat_to_ns`)."""
    from .entry import qubes_setup_dnat_to_ns

    qubes_setup_dnat_to_ns()


if __name__ == "__main__":
    main()
