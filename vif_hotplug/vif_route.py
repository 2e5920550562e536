"""``vif-route-qubes``: routed hotplug of one VM interface (entry point).

Parses argv and env, wires XenStore and the kernel host, maps errors to
exit codes and to ``hotplug-status``. The work itself is in
:mod:`vif_hotplug.hotplug`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence

from .errors import HotplugError, InvalidInput, XenStoreUnavailable
from .xenstore_env import parse_invocation

log = logging.getLogger(__name__)

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
entries, permanent neighbour entries, /32 and /128 host routes with metric
32752-domid, the gateway address on the vif; then report hotplug-status to
XenStore and run the user hooks. add/remove (used for emulated tap devices) are a
successful no-op. A VM whose address is mapped (it sees another address than
the one routed here) gets a NAT namespace <vif>-nat in between. Idempotent:
online twice or offline twice changes nothing. Never needs eth0."""

EPILOG = """\
environment: XENBUS_PATH, vif (toolstack form); XENSTORED_PATH (XenStore
socket; default /var/run/xenstored/socket, else /dev/xen/xenbus);
VIF_HOTPLUG_CONF (netvm.conf, default /etc/vif-hotplug/netvm.conf);
VIF_HOTPLUG_HOOKS_DIR (default /rw/config/network-hooks.d);
VIF_HOTPLUG_LOCK (default /run/vif-hotplug.lock); XTABLES_LOCKFILE.
exit status: 0 success (or nothing to do), 1 error (one line on stderr;
hotplug-status=error and hotplug-error written when XenStore is reachable),
2 usage error."""


def build_parser(prog: str = "vif-route-qubes") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, usage=USAGE, description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-v", "--verbose", action="store_true", help="print the plan and log every step to stderr")
    p.add_argument("-n", "--dry-run", action="store_true", help="print the plan and change nothing")
    p.add_argument("command", choices=("online", "offline", "add", "remove"), help=argparse.SUPPRESS)
    p.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    return p


def _report_invalid(env: Mapping[str, str], message: str) -> None:
    """Tell the toolstack about bad input when we know where (a valid XENBUS_PATH)."""
    from .validation import parse_xenbus_path
    from .xenstore_client import XenStore
    from .xenstore_env import report_error

    try:
        path = parse_xenbus_path(env.get("XENBUS_PATH", "")).xenbus_path
    except InvalidInput:
        return
    try:
        with XenStore(env) as xs:
            report_error(xs, path, message)
    except HotplugError as exc:
        log.debug("cannot report to XenStore: %s", exc)


def run(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None, prog: str = "vif-route-qubes") -> int:
    """The whole command; returns the exit status (never calls ``sys.exit``)."""
    from .hotplug_log import configure

    env = dict(os.environ if env is None else env)
    # Intermixed: the toolstack puts key=value words after the command, a
    # person may put options anywhere.
    try:
        ns = build_parser(prog).parse_intermixed_args(argv)
    except SystemExit as exc:  # argparse "exits" after --help (0) and on usage errors (2)
        return exc.code if isinstance(exc.code, int) else 2
    configure(prog, ns.verbose)
    try:
        event = parse_invocation([ns.command, *ns.args], env)
    except InvalidInput as exc:
        log.error("%s: %s", env.get("vif") or "-", exc)
        if not ns.dry_run:
            _report_invalid(env, str(exc))
        return 1
    from .hotplug_log import tag_lines

    tag_lines(event.dev)
    if event.command in ("add", "remove") or event.type_if != "vif":
        log.info("%s: %s type_if=%s: nothing to do", event.dev, event.command, event.type_if)
        return 0

    from .hotplug import handle_event, run_hooks
    from .system import KernelHost
    from .xenstore_client import XenStore
    from .xenstore_env import report_connected, report_error

    host = KernelHost()
    try:
        with XenStore(env) as xs:
            try:
                outcome = handle_event(event, xs, env, host, dry_run=ns.dry_run)
            except XenStoreUnavailable:
                raise
            except Exception as exc:
                if not isinstance(exc, HotplugError):
                    log.debug("%s: unexpected failure", event.dev, exc_info=True)
                    exc = HotplugError(f"internal error: {type(exc).__name__}: {exc}")
                log.error("%s: %s failed: %s", event.dev, event.command, exc)
                if not ns.dry_run:
                    report_error(xs, event.xenbus_path, str(exc))
                return 1
            if ns.verbose or ns.dry_run:
                print("\n".join(outcome.plan.lines()))
            if event.command == "online" and not ns.dry_run:
                report_connected(xs, event.xenbus_path)
            # After the status: the toolstack waits on it with a deadline,
            # and a slow hook must not make the VM's start fail.
            run_hooks(outcome, host)
            log.info(
                "%s: %s done, %d change(s)%s", outcome.plan.dev, event.command, len(outcome.changed),
                " (dry run)" if ns.dry_run else "",
            )
    except XenStoreUnavailable as exc:
        log.error("%s: %s", event.dev, exc)
        return 1
    finally:
        host.close()
    return 0


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
