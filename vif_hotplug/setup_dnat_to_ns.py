"""``qubes-setup-dnat-to-ns``: point the virtual resolvers at today's real ones.

Thin shell around :mod:`vif_hotplug.resolvers` (where the upstream list comes
from) and :mod:`vif_hotplug.dns_rules` (what the firewall must hold): read the
virtual resolvers from the netvm parameters, read the upstreams, plan, apply
through :class:`~vif_hotplug.iptables_backend.IptablesFirewall`.

Exit codes, which the NetworkManager hook and other callers rely on:

* 0: the firewall changed (or ``--dry-run`` printed the plan, or ``--watch``
  was stopped by SIGTERM/SIGINT);
* 100: everything was already in place; nothing was committed;
* 1: error, explained in one line on stderr.

When the rules changed, conntrack entries addressed to a virtual resolver are
deleted: a UDP "connection" lives on after its rule is gone, so without this
a VM reusing a source port would keep reaching the previous upstream (for
example the LAN's resolver after a VPN came up).
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import logging
import os
import select
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from ipaddress import IPv4Address
from types import FrameType, TracebackType
from typing import Any, NoReturn

from .conntrack import purge_conntrack
from .dns_rules import pair_resolvers, plan_dns_ruleset
from .errors import HotplugError, InvalidInput, KernelError
from .firewall import Firewall, Ruleset
from .resolvers import Upstreams, read_upstreams, watched_files

log = logging.getLogger(__name__)

PROG = "qubes-setup-dnat-to-ns"
EXIT_CHANGED = 0
EXIT_UNCHANGED = 100
EXIT_ERROR = 1

#: ``--watch`` re-reads the resolver files at least this often, even when no
#: inotify event came (a directory that did not exist yet cannot be watched).
WATCH_INTERVAL = 2.0
#: After an inotify event, let the writer finish before reading: a file
#: rewritten in place is briefly empty, which would mean "no upstream".
WATCH_SETTLE = 0.2


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as exceptions instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise InvalidInput(f"{message} (see --help)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add this tool's options to ``parser`` (for an umbrella subcommand)."""
    parser.add_argument(
        "-v", "--verbose", action="count", default=0,
        help="print the computed rules; log each step (twice: debug)",
    )
    parser.add_argument(
        "--resolv-conf", metavar="PATH",
        help="read upstream nameservers from PATH only (default: systemd-resolved, else /etc/resolv.conf)",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the computed rules and change nothing")
    mode.add_argument(
        "--watch", action="store_true",
        help="stay running and re-apply whenever the resolver files change; stop on SIGTERM/SIGINT",
    )


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The complete command line parser; usage errors raise ``InvalidInput``."""
    parser = _Parser(
        prog=prog,
        description="Map the virtual DNS resolvers (DNS1/DNS2) onto the uplink's nameservers with DNAT.",
        epilog="Exit status: 0 rules changed, 100 nothing changed, 1 error.",
    )
    add_arguments(parser)
    return parser


def _addrs(addrs: Sequence[IPv4Address]) -> str:
    return ", ".join(map(str, addrs)) or "none"


def _pairs(
    virtual: Sequence[IPv4Address], upstreams: Upstreams
) -> tuple[list[tuple[IPv4Address, IPv4Address]], list[IPv4Address]]:
    """(DNATed pairs, virtual resolvers forwarded unchanged), as the planner pairs them."""
    pairs = pair_resolvers(virtual, upstreams.servers, upstreams.virtual_listed)
    return [(v, u) for v, u in pairs if v != u], [v for v, u in pairs if v == u]


def _source_summary(upstreams: Upstreams) -> str:
    text = f"upstream nameservers from {upstreams.source}: {_addrs(upstreams.servers)}"
    if upstreams.virtual_listed:
        text += f" (also lists this netvm's virtual resolvers {_addrs(upstreams.virtual_listed)})"
    return text


def _chained_summary(unchanged: Sequence[IPv4Address]) -> str:
    return f"chained: {'/'.join(map(str, unchanged))} forwarded unchanged to the upstream netvm"


def plan_lines(virtual: Sequence[IPv4Address], upstreams: Upstreams, ruleset: Ruleset) -> list[str]:
    """What ``-v`` and ``--dry-run`` print: the pairing as comments, then the rules."""
    out = [f"# {_source_summary(upstreams)}"]
    mapped, unchanged = _pairs(virtual, upstreams)
    out += [f"# {v} -> {u}" for v, u in mapped]
    if unchanged:
        out.append(f"# {_chained_summary(unchanged)}")
    if not mapped and not unchanged:
        out.append(f"# no upstream: queries to {_addrs(virtual)} are rejected")
    return out + ruleset.lines()


def _default_firewall() -> Firewall:
    from .iptables_backend import IptablesFirewall

    return IptablesFirewall()


def apply_once(
    virtual: Sequence[IPv4Address],
    resolv_conf: str | None,
    firewall: Firewall | None,
    *,
    show: bool = False,
) -> int:
    """Read the upstreams, plan, print if ``show``, and apply unless ``firewall`` is None.

    Returns :data:`EXIT_CHANGED` or :data:`EXIT_UNCHANGED` (also 0 for a dry
    run, where ``firewall`` is None). Idempotent. Raises ``HotplugError``.
    """
    upstreams = read_upstreams(virtual, resolv_conf)
    ruleset = plan_dns_ruleset(virtual, upstreams.servers, chained_to=upstreams.virtual_listed)
    mapped, unchanged = _pairs(virtual, upstreams)
    log.info("%s", _source_summary(upstreams))
    for line in ruleset.lines():
        log.debug("plan: %s", line)
    if show:
        print("\n".join(plan_lines(virtual, upstreams, ruleset)), flush=True)
    if firewall is None:
        return EXIT_CHANGED
    if not firewall.sync(ruleset):
        log.info("DNS DNAT rules already in place")
        return EXIT_UNCHANGED
    if mapped:
        log.info("DNS DNAT now %s", ", ".join(f"{v} -> {u}" for v, u in mapped))
    if unchanged:
        log.info("%s", _chained_summary(unchanged))
    if not mapped and not unchanged:
        log.warning(
            "no upstream nameserver in %s: DNS queries to %s are rejected",
            upstreams.source, ", ".join(map(str, virtual)),
        )
    try:
        removed = sum(purge_conntrack(str(addr)) for addr in virtual)
        if removed:
            log.info("deleted %d conntrack entries to the virtual resolvers", removed)
    except KernelError as exc:
        # The rules are in place; only flows started before this run may
        # still reach the previous upstream until they time out.
        log.warning("%s", exc)
    return EXIT_CHANGED


# --- --watch -------------------------------------------------------------

# linux/inotify.h
_IN_MODIFY = 0x002
_IN_ATTRIB = 0x004
_IN_CLOSE_WRITE = 0x008
_IN_MOVED_FROM = 0x040
_IN_MOVED_TO = 0x080
_IN_CREATE = 0x100
_IN_DELETE = 0x200
_IN_DELETE_SELF = 0x400
_IN_MOVE_SELF = 0x800
_WATCH_MASK = (
    _IN_MODIFY | _IN_ATTRIB | _IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE
    | _IN_DELETE_SELF | _IN_MOVE_SELF
)


class _Inotify:
    """A one-shot inotify instance: used to wake up early, never trusted alone.

    Watches each file (which follows a symlink and sees in-place writes, also
    through ``ip netns exec``'s bind mount) and its directory and its target's
    directory (resolv.conf is usually replaced by a rename).
    """

    def __init__(self) -> None:
        self._libc: Any = ctypes.CDLL(None, use_errno=True)
        self._libc.inotify_add_watch.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
        fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self.fd: int = fd

    def watch(self, files: Sequence[str]) -> None:
        paths: list[str] = []
        for f in files:
            paths += [f, os.path.dirname(f) or ".", os.path.dirname(os.path.realpath(f))]
        for path in dict.fromkeys(paths):
            # Missing paths fail with ENOENT; the periodic re-read covers them.
            self._libc.inotify_add_watch(self.fd, os.fsencode(path), _WATCH_MASK)

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> _Inotify:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class _StopOnSignal:
    """SIGTERM/SIGINT set a flag and wake the watcher; the current apply finishes first."""

    _SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self.fd, self._wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        try:
            os.write(self._wfd, b"x")
        except BlockingIOError:
            pass

    def __enter__(self) -> _StopOnSignal:
        for sig in self._SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        os.close(self.fd)
        os.close(self._wfd)


def _snapshot(files: Sequence[str]) -> tuple[tuple[str, str | None], ...]:
    out: list[tuple[str, str | None]] = []
    for f in files:
        try:
            with open(f, encoding="utf-8", errors="replace") as fh:
                out.append((f, fh.read()))
        except OSError as exc:
            out.append((f, None if exc.errno == errno.ENOENT else f"unreadable: {exc.strerror}"))
    return tuple(out)


def _open_inotify(warn: bool) -> _Inotify | None:
    try:
        return _Inotify()
    except OSError as exc:
        if warn:
            log.warning("inotify unavailable (%s); polling every %gs", exc, WATCH_INTERVAL)
        return None


def watch(
    virtual: Sequence[IPv4Address], resolv_conf: str | None, firewall: Firewall, *, show: bool = False
) -> int:
    """Apply now and again whenever a resolver file's content changes.

    Wakes on inotify events and at least every :data:`WATCH_INTERVAL` seconds;
    re-applies only when the files' content differs from the last successful
    apply (the apply itself is idempotent anyway). A failed apply is logged
    once and retried at every wake until it succeeds. Returns
    :data:`EXIT_CHANGED` when stopped by SIGTERM or SIGINT.
    """
    files = watched_files(resolv_conf)
    log.info("watching %s", ", ".join(files))
    last: tuple[tuple[str, str | None], ...] | None = None
    failure: str | None = None
    use_inotify = True
    with _StopOnSignal() as stop:
        while not stop.requested:
            ino = _open_inotify(warn=use_inotify) if use_inotify else None
            use_inotify = ino is not None
            try:
                # Arm the watches before reading, so a change made while we
                # read or apply still wakes the next wait.
                if ino is not None:
                    ino.watch(files)
                snap = _snapshot(files)
                if snap != last:
                    try:
                        apply_once(virtual, resolv_conf, firewall, show=show)
                        last, failure = snap, None
                    except HotplugError as exc:
                        # Keep ``last`` so the next wake retries; say it once.
                        if str(exc) != failure:
                            log.error("%s (retrying every %gs)", exc, WATCH_INTERVAL)
                        failure = str(exc)
                    if failure is None:
                        continue
                fds = [stop.fd] + ([ino.fd] if ino is not None else [])
                ready, _, _ = select.select(fds, [], [], WATCH_INTERVAL)
                if ino is not None and ino.fd in ready and not stop.requested:
                    time.sleep(WATCH_SETTLE)
            finally:
                if ino is not None:
                    ino.close()
    log.info("stopped watching")
    return EXIT_CHANGED


# --- entry points ----------------------------------------------------------


def _load_virtual_resolvers(env: Mapping[str, str]) -> tuple[IPv4Address, ...]:
    from .netvm_params import load_netvm_params
    from .xenstore_client import XenStore

    params = load_netvm_params(env, connect=lambda: XenStore(env))
    if not params.virtual_dns:
        raise InvalidInput(f"no virtual DNS resolvers configured (primary_dns/secondary_dns, from {params.source})")
    return params.virtual_dns


def execute(args: argparse.Namespace, firewall: Firewall | None = None, env: Mapping[str, str] | None = None) -> int:
    """Do what parsed ``args`` (from :func:`add_arguments`) ask; return the exit code.

    Never raises ``HotplugError``: it is logged as one line and gives
    :data:`EXIT_ERROR`. ``firewall`` defaults to the iptables backend.
    """
    if args.verbose:
        from .hotplug_log import set_stderr_level

        set_stderr_level(logging.INFO if args.verbose == 1 else logging.DEBUG)
    try:
        virtual = _load_virtual_resolvers(os.environ if env is None else env)
        if args.dry_run:
            return apply_once(virtual, args.resolv_conf, None, show=True)
        fw = firewall if firewall is not None else _default_firewall()
        if args.watch:
            return watch(virtual, args.resolv_conf, fw, show=args.verbose > 0)
        return apply_once(virtual, args.resolv_conf, fw, show=args.verbose > 0)
    except HotplugError as exc:
        log.error("%s", exc)
        return EXIT_ERROR


def run(argv: Sequence[str] | None = None, prog: str = PROG, env: Mapping[str, str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and execute; return the exit code.

    Never calls ``sys.exit``: ``--help`` returns 0, a usage error is one line
    on stderr and returns :data:`EXIT_ERROR`.
    """
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
    except InvalidInput as exc:
        log.error("%s", exc)
        return EXIT_ERROR
    except SystemExit as exc:  # --help and --version print, then "exit"
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    return execute(args, env=env)


def main() -> None:
    """Console script ``qubes-setup-dnat-to-ns``."""
    from .hotplug_log import configure

    configure(PROG)
    sys.exit(run())
