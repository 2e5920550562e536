"""Keeping the DNAT of the virtual resolvers in step with the uplink's real ones (the DNS use case).

Exit codes, which the NetworkManager hook and other callers rely on:
:data:`EXIT_CHANGED` the firewall changed (or a dry run printed the plan),
:data:`EXIT_UNCHANGED` everything was already in place (nothing committed),
:data:`EXIT_ERROR` error, explained in one line.

When the rules changed, conntrack entries addressed to a virtual resolver are
deleted: a UDP "connection" lives on after its rule is gone, so without this
a VM reusing a source port would keep reaching the previous upstream (for
example the LAN's resolver after a VPN came up). Qubes' firewall service is
then asked to reload (:func:`.qubes_vm.reload_firewall_service`), as Qubes'
own DNS script does: its per-VM ``specialtarget=dns`` rules accept what goes
to the nameservers in its ``dns-addr`` set, which it reads again only on
reload, so without it every VM allowed DNS only would lose name resolution
when the uplink's resolver changes (Qubes issue 10444).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import select
import time
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address

from ..core.errors import HotplugError, InvalidInput, KernelError
from ..core.firewall import Ruleset
from ..core.handlers import Host
from ..core.model import Step
from ..core.netvm_params import Reader, resolve_params
from ..core.plan_dns import pair_resolvers, plan_dns_ruleset
from ..core.resolvers import Upstreams
from ..kernel.locks import file_lock
from .applier import apply_all_or_nothing
from .qubes_vm import reload_firewall_service
from .settings import Settings
from .stop import StopOnSignal
from .upstreams import read_upstreams, watched_files
from .upstreams_record import record_upstreams

log = logging.getLogger(__name__)

EXIT_CHANGED = 0
EXIT_UNCHANGED = 100
EXIT_ERROR = 1

#: ``--watch`` re-reads the resolver files at least this often, even when no
#: inotify event came (a directory that did not exist yet cannot be watched).
WATCH_INTERVAL = 2.0
#: After an inotify event, let the writer finish before reading: a file
#: rewritten in place is briefly empty, which would mean "no upstream".
WATCH_SETTLE = 0.2

Out = Callable[[str], None]


def virtual_resolvers(settings: Settings, qubesdb: Reader | None, xenstore: Reader | None) -> tuple[IPv4Address, ...]:
    """DNS1/DNS2 from the netvm parameters. Raises ``InvalidInput`` when none is configured."""
    if settings.conf_error is not None:
        raise InvalidInput(settings.conf_error)
    params = resolve_params(settings.conf, qubesdb, xenstore)
    if not params.virtual_dns:
        raise InvalidInput(f"no virtual DNS resolvers configured (primary_dns/secondary_dns, from {params.source})")
    return params.virtual_dns


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


def summary_lines(virtual: Sequence[IPv4Address], upstreams: Upstreams) -> list[str]:
    """The pairing, as the comments ``-v`` and ``--dry-run`` print above the rules."""
    out = [f"# {_source_summary(upstreams)}"]
    mapped, unchanged = _pairs(virtual, upstreams)
    out += [f"# {v} -> {u}" for v, u in mapped]
    if unchanged:
        out.append(f"# {_chained_summary(unchanged)}")
    if not mapped and not unchanged:
        out.append(f"# no upstream: queries to {_addrs(virtual)} are rejected")
    return out


def apply_dns(
    settings: Settings, host: Host, describe: Callable[[Ruleset], list[str]], virtual: Sequence[IPv4Address],
    resolv_conf: str | None, *, show: Out | None = None, dry_run: bool = False,
) -> int:
    """Read the upstreams, plan, print if ``show``, apply unless ``dry_run``.

    Returns :data:`EXIT_CHANGED` or :data:`EXIT_UNCHANGED` (0 for a dry
    run). Idempotent; serialised with other runs by the DNS lock. When the
    rules changed, Qubes' firewall service is asked to reload (never when
    nothing changed, as Qubes' script exits 100 before it asks). Raises
    ``HotplugError``.
    """
    # A dry run reads only: no lock (not even its file) is taken.
    with contextlib.nullcontext() if dry_run else file_lock(settings.dns_lock, settings.lock_timeout, "DNS lock"):
        upstreams = read_upstreams(virtual, resolv_conf)
        ruleset = plan_dns_ruleset(virtual, upstreams.servers, chained_to=upstreams.virtual_listed)
        log.info("%s", _source_summary(upstreams))
        for line in ruleset.lines():
            log.debug("plan: %s", line)
        if show is not None:
            show("\n".join(summary_lines(virtual, upstreams) + describe(ruleset)))
        if dry_run:
            return EXIT_CHANGED
        changed = bool(apply_all_or_nothing([Step("ensure", ruleset)], host, "dns").changed)
        record_upstreams(settings, upstreams.servers)
        if not changed:
            log.info("DNS DNAT rules already in place")
            return EXIT_UNCHANGED
    mapped, unchanged = _pairs(virtual, upstreams)
    if mapped:
        log.info("DNS DNAT now %s", ", ".join(f"{v} -> {u}" for v, u in mapped))
    if unchanged:
        log.info("%s", _chained_summary(unchanged))
    if not mapped and not unchanged:
        log.warning("no upstream nameserver in %s: DNS queries to %s are rejected", upstreams.source, _addrs(virtual))
    forget_flows(virtual)
    reload_firewall_service(settings, "the DNS DNAT changed")
    return EXIT_CHANGED


def forget_flows(virtual: Sequence[IPv4Address]) -> None:
    """Delete conntrack entries to the virtual resolvers (their DNAT changed). Never raises."""
    from ..kernel.conntrack import purge_conntrack

    try:
        removed = purge_conntrack([str(addr) for addr in virtual])
        if removed:
            log.info("deleted %d conntrack entries to the virtual resolvers", removed)
    except KernelError as exc:
        # The rules are in place; only flows started before this run may
        # still reach the previous upstream until they time out.
        log.warning("%s", exc)


def _snapshot(files: Sequence[str]) -> tuple[tuple[str, str | None], ...]:
    out: list[tuple[str, str | None]] = []
    for f in files:
        try:
            with open(f, encoding="utf-8", errors="replace") as fh:
                out.append((f, fh.read()))
        except OSError as exc:
            out.append((f, None if exc.errno == errno.ENOENT else f"unreadable: {exc.strerror}"))
    return tuple(out)


def watch(
    settings: Settings, host: Host, describe: Callable[[Ruleset], list[str]], virtual: Sequence[IPv4Address],
    resolv_conf: str | None, *, show: Out | None = None,
) -> int:
    """Apply now and again whenever a resolver file's content changes, until SIGTERM/SIGINT.

    Wakes on inotify events and at least every :data:`WATCH_INTERVAL` seconds;
    re-applies only when the files' content differs from the last successful
    apply. A failed apply is logged once and retried at every wake until it
    succeeds. Returns :data:`EXIT_CHANGED` when stopped.
    """
    from ..kernel.inotify import Inotify

    files = watched_files(resolv_conf)
    log.info("watching %s", ", ".join(files))
    last: tuple[tuple[str, str | None], ...] | None = None
    failure: str | None = None
    use_inotify = True
    with StopOnSignal() as stop:
        while not stop.requested:
            ino: Inotify | None = None
            if use_inotify:
                try:
                    ino = Inotify()
                except OSError as exc:
                    log.warning("inotify unavailable (%s); polling every %gs", exc, WATCH_INTERVAL)
                    use_inotify = False
            try:
                # Arm the watches before reading, so a change made while we
                # read or apply still wakes the next wait.
                if ino is not None:
                    ino.watch(files)
                snap = _snapshot(files)
                if snap != last:
                    try:
                        apply_dns(settings, host, describe, virtual, resolv_conf, show=show)
                        last, failure = snap, None
                    except HotplugError as exc:
                        if str(exc) != failure:
                            log.error("%s (retrying every %gs)", exc, WATCH_INTERVAL)
                        failure = str(exc)
                    if failure is None:
                        continue
                fds = [stop.fd] + ([ino.fd] if ino is not None else [])
                ready, _, _ = select.select(fds, [], [], WATCH_INTERVAL)
                if ino is not None and ino.fd in ready and not stop.requested:
                    log.debug("woke: a resolver file changed (inotify)")
                    time.sleep(WATCH_SETTLE)
                elif not ready:
                    log.debug("woke: %gs passed (poll)", WATCH_INTERVAL)
            finally:
                if ino is not None:
                    ino.close()
    log.info("stopped watching")
    return EXIT_CHANGED
