"""``vif-hotplug``: the umbrella command. Each subcommand parses, wires and maps to an exit code;
the work is in :mod:`vif_hotplug.app`. Each imports only what it needs."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .app.log_setup import LogControl
    from .app.runtime import Runtime
    from .app.settings import Settings

PROG = "vif-hotplug"
log = logging.getLogger("vif_hotplug.cli")

USAGE = """\
vif-hotplug COMMAND [ARGS...]

commands:
  route ARGS...        same as vif-route-qubes ARGS... (online/offline of one vif)
  dns ARGS...          same as qubes-setup-dnat-to-ns ARGS... (DNS DNAT; --watch)
  init [--backend B]   the netvm's base firewall, DNS guard and forwarding; then
                       the DNS rules and reconcile (idempotent)
  stop                 forwarding off (the init unit's stop)
  status [VIF...]      desired against actual state per vif (--json); exit 1 on drift
  reconcile            make the kernel match XenStore for every vif (--dry-run)
  connected-ips        bring the sets of connected VM addresses up to date (--watch)
  agent                the resident agent serving all of the above on a Unix socket
  lab ARGS...          run the whole system in network namespaces, no Xen needed
  xenstored --socket PATH
                       serve the XenStore wire protocol on a Unix socket

'vif-hotplug COMMAND --help' describes each command."""

Out = Callable[[str], None]
Command = Callable[[Sequence[str], Mapping[str, str], "Runtime", "LogControl", Out], int]


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so a command can run inside the agent."""

    def exit(self, status: int = 0, message: str | None = None) -> None:  # type: ignore[override]
        if message:
            sys.stderr.write(message)
        raise SystemExit(status)


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace | int:
    try:
        return parser.parse_args(list(argv))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2


def _common(p: argparse.ArgumentParser, backend: bool = True) -> None:
    p.add_argument("-v", "--verbose", action="store_true", help="log every change (and the plan) to stderr")
    if backend:
        p.add_argument("--backend", choices=("auto", "nftables", "iptables"),
                       help="firewall backend (default: netvm.conf [firewall] backend, else auto)")


def _settings(env: Mapping[str, str], backend: str | None) -> Settings:
    from .app.settings import settings_from_env

    return settings_from_env(env).with_backend(backend)


def _route(argv: Sequence[str], env: Mapping[str, str], runtime: Runtime, logs: LogControl, out: Out) -> int:
    from .vif_route import run

    code, after = run(argv, env, runtime, logs, out, prog=f"{PROG} route")
    if after is not None:
        after()
    return code


def _dns(argv: Sequence[str], env: Mapping[str, str], runtime: Runtime, logs: LogControl, out: Out) -> int:
    from .setup_dnat_to_ns import run

    return run(argv, env, runtime, logs, out, prog=f"{PROG} dns")


def _init(argv: Sequence[str], env: Mapping[str, str], runtime: Runtime, logs: LogControl, out: Out) -> int:
    from .app.backend_state import Marker, other, read_marker, write_marker
    from .app.dns import apply_dns
    from .app.faults import fault_hook
    from .app.init import apply_init, netvm_params, plan_init, run_dns_once
    from .app.runtime import plan_text
    from .core.errors import HotplugError, InvalidInput
    from .kernel.sysctl import kernel_has_ipv6

    p = _Parser(prog=f"{PROG} init", description=(
        "Set up the netvm: the firewall of current Qubes (anti-spoofing, NAT, input, forward; the "
        "administrator's custom-input/custom-forward chains created if missing, never edited), the DNS guard, "
        "the connected addresses and forwarding; then the DNS DNAT and reconcile. Idempotent. Switching "
        "--backend installs everything in the new backend before removing this package's objects from the "
        "old one."),
        epilog="environment: as vif-route-qubes. exit status: 0 success (changed or not), 1 error, 2 usage.")
    _common(p)
    p.add_argument("-n", "--dry-run", action="store_true", help="print the plan and change nothing")
    args = _parse(p, argv)
    if isinstance(args, int):
        return args
    if args.verbose:
        logs.verbose(logging.DEBUG)
    status = 0
    try:
        settings = _settings(env, args.backend)
    except InvalidInput as exc:
        log.error("%s", exc)
        return 1
    xs = runtime.xenstore(settings)
    qubesdb = runtime.qubesdb(settings)
    try:
        try:
            params = netvm_params(settings, qubesdb, xs.read)
        except InvalidInput as exc:
            log.error("%s: applying with IPv6 off", exc)
            from .core.model import NetvmParams

            params, status = NetvmParams(), 1
        host = runtime.host(settings)
        plan = plan_init(params, kernel_has_ipv6(), host, settings, qubesdb, xs.read)
        for note in plan.notes:
            log.info("%s", note)
        if args.dry_run or args.verbose:
            out("\n".join(plan_text(plan, host)))
        if args.dry_run:
            return status
        changes = len(apply_init(plan, host, fault_hook(settings.fault, "init", False)).changed)
        if params.virtual_dns:
            run_dns_once(lambda: apply_dns(settings, host, host.firewall.describe, params.virtual_dns, None))
        old = read_marker(settings)
        if (old is not None and old.backend != host.firewall.name) or old is None:
            former = runtime.host(settings, other(host.firewall.name)).firewall  # type: ignore[arg-type]
            if former.owns_state() and former.remove_all():
                log.info("removed this package's firewall objects from %s", former.name)
                changes += 1
        write_marker(settings, Marker(host.firewall.name, init=True))
        from .app.reconcile import reconcile

        changes += reconcile(settings, host, xs, qubesdb).changes
    except HotplugError as exc:
        log.error("%s", exc)
        return 1
    finally:
        xs.close()
    if changes:
        log.info("init applied: %d change(s)", changes)
    else:
        log.info("init already in place: nothing changed")
    return status


def _stop(argv: Sequence[str], env: Mapping[str, str], runtime: Runtime, logs: LogControl, out: Out) -> int:
    from .app.init import stop
    from .core.errors import HotplugError
    from .kernel.sysctl import kernel_has_ipv6

    p = _Parser(prog=f"{PROG} stop", description="Switch IPv4 and IPv6 forwarding off, as Qubes' network "
                "stop does (the firewall stays). exit status: 0 success, 1 error.")
    _common(p, backend=False)
    args = _parse(p, argv)
    if isinstance(args, int):
        return args
    if args.verbose:
        logs.verbose(logging.DEBUG)
    try:
        settings = _settings(env, None)
        changed = stop(runtime.host(settings), kernel_has_ipv6())
    except HotplugError as exc:
        log.error("%s", exc)
        return 1
    log.info("forwarding off (%d change(s))", changed)
    return 0


def _lab(argv: Sequence[str], env: Mapping[str, str], runtime: Runtime, logs: LogControl, out: Out) -> int:
    from .lab.runner import run

    return run(list(argv), env)


def _xenstored(argv: Sequence[str], env: Mapping[str, str], runtime: Runtime, logs: LogControl, out: Out) -> int:
    p = _Parser(
        prog=f"{PROG} xenstored",
        description="Serve the XenStore wire protocol (xs_wire.h) on a Unix socket, for machines without Xen. "
        "Clients: xenstore-utils with XENSTORED_PATH=PATH, vif-route-qubes.",
    )
    p.add_argument("--socket", required=True, metavar="PATH", help="Unix socket to listen on (replaced if stale)")
    args = _parse(p, argv)
    if isinstance(args, int):
        return args
    from .xen.xenstored import serve

    try:
        serve(args.socket)
    except OSError as exc:
        log.error("cannot serve on %s: %s", args.socket, exc.strerror or exc)
        return 1
    return 0


COMMANDS: dict[str, Command] = {
    "route": _route,
    "dns": _dns,
    "init": _init,
    "stop": _stop,
    "lab": _lab,
    "xenstored": _xenstored,
}
#: Commands the agent never serves: they run long or need this very process.
LOCAL_ONLY = frozenset({"lab", "xenstored", "agent"})


def run(argv: Sequence[str], env: Mapping[str, str], runtime: Runtime, logs: LogControl, out: Out) -> int:
    args = list(argv)
    if not args or args[0] in ("-h", "--help"):
        out(USAGE)
        return 0 if args else 2
    handler = COMMANDS.get(args[0])
    if handler is None:
        sys.stderr.write(f"vif-hotplug: unknown command {args[0]!r}\n\n{USAGE}\n")
        return 2
    return handler(args[1:], env, runtime, logs, out)


def run_here(argv: Sequence[str], env: Mapping[str, str]) -> int:
    from .app.log_setup import ProcessLogs
    from .app.runtime import Runtime

    ident = f"{PROG} {argv[0]}" if argv and argv[0] in COMMANDS else PROG
    runtime = Runtime()
    try:
        return run(argv, env, runtime, ProcessLogs(ident), print)
    finally:
        runtime.close()


def main() -> None:
    import os

    argv = sys.argv[1:]
    code = None
    if argv and argv[0] not in LOCAL_ONLY and "--watch" not in argv:
        from .agent.client import via_agent

        code = via_agent(PROG, argv, os.environ)
    sys.exit(code if code is not None else run_here(argv, os.environ))


if __name__ == "__main__":
    main()
