"""``vif-route-qubes``: routed hotplug of one VM interface (entry point).

The resident agent does the work when it runs (:mod:`vif_hotplug.agent`);
otherwise this process does it (:mod:`vif_hotplug.entry`). Either way
:func:`run` parses argv and the environment, wires XenStore and the kernel,
and calls :func:`vif_hotplug.app.hotplug.handle_event`, which owns the event.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app.log_setup import LogControl
    from .app.runtime import Runtime

PROG = "vif-route-qubes"

USAGE = """\
%(prog)s [-v] [--dry-run] COMMAND [VIF] [KEY=VALUE ...]

toolstack / udev form (libxl, xl devd, Xen's udev rules):
  XENBUS_PATH=backend/vif/<domid>/<devid> vif=vif<domid>.<devid> %(prog)s online type_if=vif
by hand:
  %(prog)s online vif4.0        (XenStore path backend/vif/4/0 is derived)
"""

DESCRIPTION = """\
Configure (online) or deconfigure (offline) the backend interface of one VM
in a routed Xen driver domain: proxy ARP, conntrack purge, anti-spoofing set
elements, permanent neighbour entries, /32 and /128 host routes with metric
32752-domid, the gateway address on the vif; then report hotplug-status to
XenStore and run the user hooks. add/remove (used for emulated tap devices)
are a successful no-op. A VM without addresses (empty ip) gets its vif up
and passes nothing. A VM whose address is mapped (it sees another address
than the one routed here) gets a NAT namespace <vif>-nat in between.
Idempotent: online twice or offline twice changes nothing. Never needs eth0.
The resident agent (vif-hotplug agent) does the work when it runs."""

EPILOG = """\
environment: XENBUS_PATH, vif (toolstack form); XENSTORED_PATH (XenStore
socket; default /var/run/xenstored/socket, else /dev/xen/xenbus);
VIF_HOTPLUG_CONF (netvm.conf, default /etc/vif-hotplug/netvm.conf);
VIF_HOTPLUG_HOOKS_DIR (default /rw/config/network-hooks.d);
VIF_HOTPLUG_LOCK (default /run/vif-hotplug.lock); VIF_HOTPLUG_STATE_DIR;
VIF_HOTPLUG_AGENT_SOCKET; XTABLES_LOCKFILE.
exit status: 0 success (or nothing to do), 1 error (one line on stderr;
hotplug-status=error and hotplug-error written when XenStore is reachable),
2 usage error."""


#: Parsers built once per program name (a resident agent parses every event);
#: parse_intermixed_args changes the parser while it works: one parse at a time.
_PARSERS: dict[str, object] = {}
_PARSING = threading.Lock()


def _parse(prog: str, argv: Sequence[str]) -> object:
    with _PARSING:
        parser = _PARSERS.get(prog)
        if parser is None:
            parser = _PARSERS[prog] = _parser(prog)
        # Intermixed: the toolstack puts key=value words after the command,
        # a person may put options anywhere.
        return parser.parse_intermixed_args(list(argv))  # type: ignore[attr-defined]


def _parser(prog: str) -> object:
    import argparse

    p = argparse.ArgumentParser(
        prog=prog, usage=USAGE, description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
    )
    p.add_argument("-v", "--verbose", action="store_true", help="print the plan and log every step to stderr")
    p.add_argument("-n", "--dry-run", action="store_true", help="print the plan and change nothing")
    p.add_argument("command", choices=("online", "offline", "add", "remove"), help=argparse.SUPPRESS)
    p.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    return p


def run(
    argv: Sequence[str], env: Mapping[str, str], runtime: Runtime, logs: LogControl,
    out: Callable[[str], None], prog: str = PROG,
) -> tuple[int, Callable[[], None] | None]:
    """The whole command: (exit status, the hooks to run once the caller has answered, if any).

    Never calls ``sys.exit``; argparse's exits become return codes. A dry run
    changes nothing: the backend holding the state is planned against, and no
    marker or lock file is written.
    """
    import logging

    from .app.backend_state import note_in_use, resolve
    from .app.faults import fault_hook
    from .app.hotplug import handle_event
    from .app.runtime import plan_text
    from .app.switch import settle_backend
    from .core.errors import HotplugError, InvalidInput
    from .xenstore_env import parse_invocation, report_error

    log = logging.getLogger("vif_hotplug.vif_route")
    try:
        ns: Any = _parse(prog, argv)
    except SystemExit as exc:  # argparse "exits" after --help (0) and on usage errors (2)
        return (exc.code if isinstance(exc.code, int) else 2), None
    if ns.verbose:
        logs.verbose(logging.DEBUG)
    try:
        settings = runtime.settings(env)
        event = parse_invocation([ns.command, *ns.args], env)
    except InvalidInput as exc:
        log.error("%s: %s", _shown(env.get("vif") or "-"), exc)
        if not ns.dry_run:
            _report_invalid(env, runtime, str(exc))
        return 1, None
    logs.tag(event.dev)
    if event.command not in ("online", "offline") or event.type_if != "vif":
        log.info("%s: %s type_if=%s: nothing to do", event.dev, event.command, event.type_if)
        return 0, None
    xs = runtime.xenstore(settings)
    try:
        try:
            backend = resolve(settings).in_use if ns.dry_run else settle_backend(settings, runtime)
        except HotplugError as exc:
            log.error("%s: %s failed: %s", event.dev, event.command, exc)
            if not ns.dry_run:
                try:
                    report_error(xs, event.xenbus_path, str(exc))
                except HotplugError:
                    pass
            return 1, None
        host = runtime.host(settings, backend, read_only=ns.dry_run)
        outcome = handle_event(
            event, settings, host, xs, runtime.qubesdb(settings), runtime.hotplug_lock(settings),
            dry_run=ns.dry_run, on_step=fault_hook(settings, event.command, runtime),
        )
    finally:
        xs.close()
    if outcome.changed and not ns.dry_run:
        note_in_use(settings, backend)
    if outcome.plan is not None and (ns.verbose or ns.dry_run):
        out("\n".join(plan_text(outcome.plan, host)))
    hooks = outcome.hooks
    if hooks is None or ns.dry_run:
        return outcome.exit_code, None

    def run_hooks() -> None:
        from .app.hooks import run_hooks as run_them

        run_them(hooks)

    return outcome.exit_code, run_hooks


def _shown(value: str) -> str:
    """An unvalidated name as a log prefix: as is if plainly printable, else escaped (one line, encodable)."""
    if value.isascii() and value.isprintable() and " " not in value and len(value) <= 32:
        return value
    return ascii(value)


def _report_invalid(env: Mapping[str, str], runtime: Runtime, message: str) -> None:
    """Tell the toolstack about bad input when we know where (a valid XENBUS_PATH)."""
    import logging

    from .app.settings import Settings
    from .core.errors import HotplugError, InvalidInput
    from .core.validation import parse_xenbus_path
    from .xenstore_env import report_error

    try:
        path = parse_xenbus_path(env.get("XENBUS_PATH", "")).xenbus_path
    except InvalidInput:
        return
    try:
        with runtime.xenstore(Settings(xenstore_path=env.get("XENSTORED_PATH") or None)) as xs:
            report_error(xs, path, message)
    except HotplugError as exc:
        logging.getLogger("vif_hotplug.vif_route").debug("cannot report to XenStore: %s", exc)


def main() -> None:
    """Console script ``vif-route-qubes`` (also :func:`vif_hotplug.entry.vif_route_qubes`)."""
    from .entry import vif_route_qubes

    vif_route_qubes()


if __name__ == "__main__":
    main()
