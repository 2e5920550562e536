"""``vif-hotplug``'s own commands: each parses, wires and maps to an exit code; the work is in
:mod:`vif_hotplug.app`. The table of commands is :mod:`vif_hotplug.registry`; the umbrella's
dispatch and usage are :mod:`vif_hotplug.entry`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, TypeVar

from .core.errors import HotplugError, XenStoreUnavailable

if TYPE_CHECKING:
    from .app.log_setup import LogControl
    from .app.runtime import Runtime
    from .entry import Answer

log = logging.getLogger("vif_hotplug.cli")

Out = Callable[[str], None]
T = TypeVar("T")

ENVIRONMENT = "environment: as vif-route-qubes."


def _parser(prog: str, description: str, epilog: str, backend: bool = True) -> argparse.ArgumentParser:
    # No abbreviations: "--w" must not be taken for "--watch" here while the
    # client, matching whole words, hands the command to the agent.
    p = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog, allow_abbrev=False)
    p.add_argument("-v", "--verbose", action="store_true", help="log every change (and the plan) to stderr")
    if backend:
        p.add_argument("--backend", choices=("auto", "nftables", "iptables"),
                       help="firewall backend (default: netvm.conf [firewall] backend, else auto)")
    return p


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str], logs: LogControl) -> argparse.Namespace | int:
    """The parsed options (``-v`` already applied to the logs), or argparse's exit code."""
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    if getattr(args, "verbose", False):
        logs.verbose(logging.DEBUG)
    return args


def _guard(work: Callable[[], int], failure: int = 1, xenstore_failure: int | None = None) -> int:
    """``work()``'s exit status; a ``HotplugError`` is one line on stderr and ``failure``."""
    try:
        return work()
    except XenStoreUnavailable as exc:
        if xenstore_failure is None:
            log.error("%s", exc)
            return failure
        log.error("cannot tell: %s", exc)
        return xenstore_failure
    except HotplugError as exc:
        log.error("%s", exc)
        return failure


def run_init(argv: Sequence[str], env: Mapping[str, str], runtime: Runtime, logs: LogControl, out: Out,
             prog: str) -> Answer:
    from .app.faults import fault_hook
    from .app.init import initialize
    from .app.runtime import plan_text
    from .kernel.firewall_backend import choose_backend

    p = _parser(prog, (
        "Set up the netvm: the firewall of current Qubes (anti-spoofing, NAT, input, forward; the "
        "administrator's custom-input/custom-forward chains created if missing, never edited), the DNS guard, "
        "the connected addresses and forwarding; then reconcile and the DNS DNAT. Idempotent. Switching "
        "--backend installs everything in the new backend before removing this package's objects from the "
        "old one."), f"{ENVIRONMENT} exit status: 0 success (changed or not), 1 error, 2 usage.")
    p.add_argument("-n", "--dry-run", action="store_true", help="print the plan and change nothing")
    p.add_argument("--resolv-conf", metavar="PATH",
                   help="upstream nameservers from PATH only (default: as qubes-setup-dnat-to-ns)")
    args = _parse(p, argv, logs)
    if isinstance(args, int):
        return args, None

    def work() -> int:
        settings = runtime.settings(env, args.backend)
        # init is itself the switch: it installs in the chosen backend and removes from the other.
        backend = choose_backend(settings.backend_choice, settings.path)
        result = initialize(settings, runtime, backend, runtime.hotplug_lock(settings), dry_run=args.dry_run,
                            on_step=fault_hook(settings, "init", runtime), resolv_conf=args.resolv_conf)
        if args.dry_run or args.verbose:
            out("\n".join(plan_text(result.plan, runtime.host(settings, backend, read_only=args.dry_run))))
        if not args.dry_run:
            log.info("init applied: %d change(s)" if result.changes else "init already in place: nothing changed",
                     *([result.changes] if result.changes else []))
        return 0

    return _guard(work), None


def run_stop(argv: Sequence[str], env: Mapping[str, str], runtime: Runtime, logs: LogControl, out: Out,
             prog: str) -> Answer:
    from .app.backend_state import resolve
    from .app.init import stop
    from .kernel.sysctl import kernel_has_ipv6

    p = _parser(prog, "Switch IPv4 and IPv6 forwarding off, as Qubes' network stop does (the firewall stays).",
                "exit status: 0 success, 1 error.", backend=False)
    args = _parse(p, argv, logs)
    if isinstance(args, int):
        return args, None

    def work() -> int:
        settings = runtime.settings(env)
        # Forwarding only: stopping the netvm is no time to move its firewall.
        changed = stop(runtime.host(settings, resolve(settings).in_use), kernel_has_ipv6())
        log.info("forwarding off (%d change(s))", changed)
        return 0

    return _guard(work), None


def run_connected_ips(argv: Sequence[str], env: Mapping[str, str], runtime: Runtime, logs: LogControl, out: Out,
                      prog: str) -> Answer:
    from .app.backend_state import note_in_use, resolve
    from .app.connected import update_connected, watch_connected

    p = _parser(prog, (
        "Make the connected sets (addresses of every VM using this netvm, running or not: netvm.conf "
        "connected_ips/connected_ips6, else QubesDB /connected-ips, else XenStore qubes-connected-ips) hold "
        "exactly what their source lists."), "exit status: 0 success, 1 error.")
    p.add_argument("--watch", action="store_true", help="keep them up to date until SIGTERM/SIGINT")
    args = _parse(p, argv, logs)
    if isinstance(args, int):
        return args, None

    def work() -> int:
        settings = runtime.settings(env, args.backend)
        # The sets of the backend holding the state: moving it is for init and the events.
        backend = resolve(settings).in_use
        host = runtime.host(settings, backend)
        xs = runtime.xenstore(settings)
        try:
            run = watch_connected if args.watch else update_connected
            changes = run(settings, host, runtime.qubesdb(settings), xs.read)
        finally:
            xs.close()
        if changes:
            note_in_use(settings, backend)
        log.info("connected addresses: %d change(s)", changes)
        return 0

    return _guard(work), None


def run_status(argv: Sequence[str], env: Mapping[str, str], runtime: Runtime, logs: LogControl, out: Out,
               prog: str) -> Answer:
    import json

    from .app.backend_state import resolve
    from .app.status import status

    p = _parser(prog, (
        "Show, for every vif XenStore lists under backend/vif or the kernel has in interface group 2 (or only the "
        "named ones), the desired state (from XenStore and the netvm parameters) beside the actual one: link, "
        "group, addresses, routes, neighbours, sysctls, set elements, NAT namespace; and the netvm's firewall and "
        "DNS rules when init ran. Changes nothing."),
        "exit status: 0 everything matches, 1 drift, 2 cannot tell (XenStore down, usage error).")
    p.add_argument("vifs", nargs="*", metavar="VIF", help="only these vifs")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--resolv-conf", metavar="PATH", help="upstream nameservers from PATH (as the DNS tool)")
    args = _parse(p, argv, logs)
    if isinstance(args, int):
        return args, None

    def work() -> int:
        settings = runtime.settings(env, args.backend)
        view = resolve(settings)
        if view.pending:
            log.warning("netvm.conf asks for the %s backend; the state is in %s until a changing command moves it",
                        view.target, view.in_use)
        host = runtime.host(settings, view.in_use, read_only=True)
        xs = runtime.xenstore(settings)
        try:
            result = status(settings, host, view.in_use, xs, runtime.qubesdb(settings), init=view.init,
                            only=args.vifs or None, resolv_conf=args.resolv_conf)
        finally:
            xs.close()
        out(json.dumps(result.as_dict(), indent=2) if args.json else "\n".join(result.lines()))
        return 1 if result.drift else 0

    return _guard(work, failure=2, xenstore_failure=2), None


def run_reconcile(argv: Sequence[str], env: Mapping[str, str], runtime: Runtime, logs: LogControl, out: Out,
                  prog: str) -> Answer:
    from .app.backend_state import note_in_use, resolve
    from .app.faults import fault_hook
    from .app.reconcile import reconcile
    from .app.runtime import plan_text
    from .app.switch import settle_backend

    p = _parser(prog, (
        "Make the kernel match XenStore for every vif at once: restore what is missing for vifs that are online "
        "in XenStore and whose device exists, remove what this package owns for vifs that are gone (and the "
        "netvm's firewall when init ran). Only objects this package owns; idempotent."),
        "exit status: 0 success (changed or not), 1 error, 2 usage.")
    p.add_argument("-n", "--dry-run", action="store_true", help="print what would change and change nothing")
    p.add_argument("--resolv-conf", metavar="PATH",
                   help="the DNS rules' upstreams from PATH (as init --resolv-conf) instead of the system's")
    args = _parse(p, argv, logs)
    if isinstance(args, int):
        return args, None

    def work() -> int:
        settings = runtime.settings(env, args.backend)
        backend = resolve(settings).in_use if args.dry_run else settle_backend(settings, runtime)
        host = runtime.host(settings, backend, read_only=args.dry_run)
        xs = runtime.xenstore(settings)
        try:
            result = reconcile(settings, host, xs, runtime.qubesdb(settings), lock=runtime.hotplug_lock(settings),
                               dry_run=args.dry_run, base=resolve(settings).init, resolv_conf=args.resolv_conf,
                               on_step=fault_hook(settings, "reconcile", runtime))
        finally:
            xs.close()
        if args.dry_run or args.verbose:
            out("\n".join(line for plan in result.plans for line in plan_text(plan, host)))
        for error in result.errors:
            log.error("%s", error)
        if result.changes and not args.dry_run:
            note_in_use(settings, backend)
        log.info("reconcile: %d change(s), %d vif(s) online, %d removal(s)", result.changes, len(result.online),
                 len(result.removed))
        return 1 if result.errors else 0

    return _guard(work), None


def run_agent(argv: Sequence[str], env: Mapping[str, str], runtime: Runtime, logs: LogControl, out: Out,
              prog: str) -> Answer:
    from .core.errors import InvalidInput

    p = argparse.ArgumentParser(prog=prog, allow_abbrev=False, description=(
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
        return args, None
    try:
        settings = runtime.settings(env)
    except InvalidInput as exc:
        log.error("%s", exc)
        return 1, None
    from .agent.server import run_agent as serve

    return serve(env, args.socket or settings.agent_socket, start_up=not args.no_start_up), None


def main() -> None:
    """``python3 -m vif_hotplug.cli``: the umbrella command."""
    from .entry import vif_hotplug

    vif_hotplug()


if __name__ == "__main__":
    main()
    sys.exit(0)
