"""``vif-hotplug``: the umbrella command. Each subcommand parses, wires and maps to an exit code;
the work is in :mod:`vif_hotplug.app`. Each imports only what it needs."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse

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


def _Parser(**kw: object) -> argparse.ArgumentParser:
    import argparse

    return argparse.ArgumentParser(**kw)  # type: ignore[arg-type]


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str], logs: LogControl) -> argparse.Namespace | int:
    """The parsed options (``-v`` already applied to the logs), or argparse's exit code."""
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    if getattr(args, "verbose", False):
        logs.verbose(logging.DEBUG)
    return args


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
    from .app.faults import fault_hook
    from .app.init import initialize
    from .app.runtime import plan_text
    from .core.errors import HotplugError, InvalidInput
    from .kernel.firewall_backend import choose_backend

    p = _Parser(prog=f"{PROG} init", description=(
        "Set up the netvm: the firewall of current Qubes (anti-spoofing, NAT, input, forward; the "
        "administrator's custom-input/custom-forward chains created if missing, never edited), the DNS guard, "
        "the connected addresses and forwarding; then reconcile and the DNS DNAT. Idempotent. Switching "
        "--backend installs everything in the new backend before removing this package's objects from the "
        "old one."),
        epilog="environment: as vif-route-qubes. exit status: 0 success (changed or not), 1 error, 2 usage.")
    _common(p)
    p.add_argument("-n", "--dry-run", action="store_true", help="print the plan and change nothing")
    p.add_argument("--resolv-conf", metavar="PATH",
                   help="upstream nameservers from PATH only (default: as qubes-setup-dnat-to-ns)")
    args = _parse(p, argv, logs)
    if isinstance(args, int):
        return args
    try:
        settings = _settings(env, args.backend)
        # Not Runtime.backend_name: init itself moves the state from the other backend.
        backend = choose_backend(settings.backend_choice, settings.path)
        result = initialize(settings, runtime, backend, dry_run=args.dry_run,
                            on_step=fault_hook(settings.fault, "init", False), resolv_conf=args.resolv_conf)
    except (HotplugError, InvalidInput) as exc:
        log.error("%s", exc)
        return 1
    if args.dry_run or args.verbose:
        out("\n".join(plan_text(result.plan, runtime.host(settings, backend))))
    if args.dry_run:
        return 0
    if result.changes:
        log.info("init applied: %d change(s)", result.changes)
    else:
        log.info("init already in place: nothing changed")
    return 0


def _stop(argv: Sequence[str], env: Mapping[str, str], runtime: Runtime, logs: LogControl, out: Out) -> int:
    from .app.init import stop
    from .core.errors import HotplugError
    from .kernel.sysctl import kernel_has_ipv6

    p = _Parser(prog=f"{PROG} stop", description="Switch IPv4 and IPv6 forwarding off, as Qubes' network "
                "stop does (the firewall stays). exit status: 0 success, 1 error.")
    _common(p, backend=False)
    args = _parse(p, argv, logs)
    if isinstance(args, int):
        return args
    try:
        settings = _settings(env, None)
        changed = stop(runtime.host(settings), kernel_has_ipv6())
    except HotplugError as exc:
        log.error("%s", exc)
        return 1
    log.info("forwarding off (%d change(s))", changed)
    return 0


def _connected_ips(argv: Sequence[str], env: Mapping[str, str], runtime: Runtime, logs: LogControl, out: Out) -> int:
    from .app.connected import update_connected, watch_connected
    from .core.errors import HotplugError

    p = _Parser(prog=f"{PROG} connected-ips", description=(
        "Make the connected sets (addresses of every VM using this netvm, running or not: netvm.conf "
        "connected_ips/connected_ips6, else QubesDB /connected-ips, else XenStore qubes-connected-ips) hold "
        "exactly what their source lists. exit status: 0 success, 1 error."))
    _common(p)
    p.add_argument("--watch", action="store_true", help="keep them up to date until SIGTERM/SIGINT")
    args = _parse(p, argv, logs)
    if isinstance(args, int):
        return args
    try:
        settings = _settings(env, args.backend)
        host = runtime.host(settings)
        xs = runtime.xenstore(settings)
        try:
            run = watch_connected if args.watch else update_connected
            changes = run(settings, host, runtime.qubesdb(settings), xs.read)
        finally:
            xs.close()
    except HotplugError as exc:
        log.error("%s", exc)
        return 1
    log.info("connected addresses: %d change(s)", changes)
    return 0


def _status(argv: Sequence[str], env: Mapping[str, str], runtime: Runtime, logs: LogControl, out: Out) -> int:
    import json

    from .app.backend_state import read_marker
    from .app.status import status
    from .core.errors import HotplugError, XenStoreUnavailable

    p = _Parser(prog=f"{PROG} status", description=(
        "Show, for every vif XenStore lists under backend/vif or the kernel has in interface group 2 (or only the "
        "named ones), the desired state (from XenStore and the netvm parameters) beside the actual one: link, "
        "group, addresses, routes, neighbours, sysctls, set elements, NAT namespace; and the netvm's firewall and "
        "DNS rules when init ran. Changes nothing."),
        epilog="exit status: 0 everything matches, 1 drift, 2 cannot tell (XenStore down, usage error).")
    _common(p)
    p.add_argument("vifs", nargs="*", metavar="VIF", help="only these vifs")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--resolv-conf", metavar="PATH", help="upstream nameservers from PATH (as the DNS tool)")
    args = _parse(p, argv, logs)
    if isinstance(args, int):
        return args
    try:
        settings = _settings(env, args.backend)
        backend = runtime.backend_name(settings)
        host = runtime.host(settings, backend)
        marker = read_marker(settings)
        xs = runtime.xenstore(settings)
        try:
            result = status(settings, host, backend, xs, runtime.qubesdb(settings), init=bool(marker and marker.init),
                            only=args.vifs or None, resolv_conf=args.resolv_conf)
        finally:
            xs.close()
    except XenStoreUnavailable as exc:
        log.error("cannot tell: %s", exc)
        return 2
    except HotplugError as exc:
        log.error("%s", exc)
        return 2
    out(json.dumps(result.as_dict(), indent=2) if args.json else "\n".join(result.lines()))
    return 1 if result.drift else 0


def _reconcile(argv: Sequence[str], env: Mapping[str, str], runtime: Runtime, logs: LogControl, out: Out) -> int:
    from .app.backend_state import read_marker
    from .app.reconcile import reconcile
    from .app.runtime import plan_text
    from .core.errors import HotplugError

    p = _Parser(prog=f"{PROG} reconcile", description=(
        "Make the kernel match XenStore for every vif at once: restore what is missing for vifs that are online "
        "in XenStore and whose device exists, remove what this package owns for vifs that are gone (and the "
        "netvm's firewall when init ran). Only objects this package owns; idempotent."),
        epilog="exit status: 0 success (changed or not), 1 error, 2 usage.")
    _common(p)
    p.add_argument("-n", "--dry-run", action="store_true", help="print what would change and change nothing")
    p.add_argument("--resolv-conf", metavar="PATH",
                   help="the DNS rules' upstreams from PATH (as init --resolv-conf) instead of the system's")
    args = _parse(p, argv, logs)
    if isinstance(args, int):
        return args
    try:
        settings = _settings(env, args.backend)
        host = runtime.host(settings)
        xs = runtime.xenstore(settings)
        try:
            marker = read_marker(settings)
            result = reconcile(settings, host, xs, runtime.qubesdb(settings), dry_run=args.dry_run,
                               base=bool(marker and marker.init), resolv_conf=args.resolv_conf)
        finally:
            xs.close()
    except HotplugError as exc:
        log.error("%s", exc)
        return 1
    if args.dry_run or args.verbose:
        out("\n".join(line for plan in result.plans for line in plan_text(plan, host)))
    for error in result.errors:
        log.error("%s", error)
    log.info("reconcile: %d change(s), %d vif(s) online, %d removal(s)", result.changes, len(result.online),
             len(result.removed))
    return 1 if result.errors else 0


def _agent(argv: Sequence[str], env: Mapping[str, str], runtime: Runtime, logs: LogControl, out: Out) -> int:
    from .core.errors import InvalidInput

    p = _Parser(prog=f"{PROG} agent", description=(
        "Serve hotplug events, DNS runs, init, status and reconcile to the thin clients (vif-route-qubes, "
        "qubes-setup-dnat-to-ns, vif-hotplug and the /etc/xen/scripts wrapper try it first) over a Unix socket, "
        "root only. At start it reconciles every vif. Runs until SIGTERM/SIGINT; systemd socket activation is "
        "supported (vif-hotplug-agent.socket)."),
        epilog="environment: as vif-route-qubes; VIF_HOTPLUG_AGENT_SOCKET (default /run/vif-hotplug/agent.sock). "
        "exit status: 0 stopped, 1 cannot listen, 2 usage.")
    p.add_argument("--socket", metavar="PATH", help="listen here (default: VIF_HOTPLUG_AGENT_SOCKET)")
    p.add_argument("--no-start-up", action="store_true", help="do not reconcile at start")
    args = _parse(p, argv, logs)
    if isinstance(args, int):
        return args
    try:
        settings = _settings(env, None)
    except InvalidInput as exc:
        log.error("%s", exc)
        return 1
    from .agent.server import run_agent

    return run_agent(env, args.socket or settings.agent_socket, start_up=not args.no_start_up)


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
    args = _parse(p, argv, logs)
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
    "connected-ips": _connected_ips,
    "status": _status,
    "reconcile": _reconcile,
    "agent": _agent,
    "lab": _lab,
    "xenstored": _xenstored,
}


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
    from .agent.client import served, via_agent

    if served(PROG, argv):
        code = via_agent(PROG, argv, os.environ)
    sys.exit(code if code is not None else run_here(argv, os.environ))


if __name__ == "__main__":
    main()
