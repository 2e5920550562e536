"""Where the uplink's real nameservers come from right now: the sources the parsers of
:mod:`vif_hotplug.core.resolvers` read.

An explicit file (``--resolv-conf``), else systemd-resolved when its
runtime directory exists (D-Bus first, its ``resolv.conf`` when D-Bus does
not answer), else ``/etc/resolv.conf``.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Collection
from ipaddress import IPv4Address

from ..core.errors import InvalidInput
from ..core.resolvers import ETC_RESOLV_CONF, Upstreams, parse_resolv_conf, parse_resolved_dns

log = logging.getLogger(__name__)

#: systemd-resolved creates this directory when it starts (it lives on tmpfs,
#: so it only exists when resolved ran during this boot).
RESOLVED_RUNTIME_DIR = "/run/systemd/resolve"
#: resolved's own list of upstream servers in resolv.conf syntax (not the
#: stub file, which only names 127.0.0.53).
RESOLVED_RESOLV_CONF_NAME = "resolv.conf"
BUSCTL_TIMEOUT = 5.0


def query_resolved_dns(busctl: str = "busctl", timeout: float = BUSCTL_TIMEOUT) -> str | None:
    """Ask systemd-resolved for its ``DNS`` property; ``None`` if it cannot answer.

    Uses ``busctl`` so no D-Bus library is needed. ``--auto-start=no`` keeps
    a stopped resolved stopped: asking must not start a resolver. Touches
    nothing; never raises.
    """
    cmd = [
        busctl, "--json=short", "--auto-start=no", f"--timeout={max(1, int(timeout))}",
        "get-property", "org.freedesktop.resolve1", "/org/freedesktop/resolve1",
        "org.freedesktop.resolve1.Manager", "DNS",
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 1, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.info("systemd-resolved not reachable over D-Bus: %s", exc)
        return None
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or [f"busctl exited {proc.returncode}"])[0]
        log.info("systemd-resolved not reachable over D-Bus: %s", reason)
        return None
    return proc.stdout


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror}") from exc


def read_upstreams(
    virtual: Collection[IPv4Address],
    resolv_conf: str | None = None,
    *,
    etc_resolv_conf: str = ETC_RESOLV_CONF,
    resolved_dir: str = RESOLVED_RUNTIME_DIR,
    busctl: str = "busctl",
) -> Upstreams:
    """The uplink's upstream nameservers right now; ``virtual`` set apart.

    Sources, first that applies:

    1. ``resolv_conf`` when given (``--resolv-conf``); it must exist.
    2. systemd-resolved, when ``resolved_dir`` exists: its ``DNS`` property
       over D-Bus, or, when D-Bus does not answer, ``resolved_dir/resolv.conf``.
    3. ``etc_resolv_conf``; a missing file means no upstream.

    Read-only. Raises :class:`InvalidInput` when an explicit file is missing
    or a file cannot be read.
    """
    if resolv_conf is not None:
        text = _read_text(resolv_conf)
        if text is None:
            raise InvalidInput(f"resolv.conf {resolv_conf} does not exist")
        return parse_resolv_conf(text, virtual, resolv_conf)
    if os.path.isdir(resolved_dir):
        answer = query_resolved_dns(busctl)
        if answer is not None:
            try:
                return parse_resolved_dns(answer, virtual)
            except InvalidInput as exc:
                log.warning("ignoring systemd-resolved's answer: %s", exc)
        path = os.path.join(resolved_dir, RESOLVED_RESOLV_CONF_NAME)
        text = _read_text(path)
        if text is not None:
            return parse_resolv_conf(text, virtual, path)
    text = _read_text(etc_resolv_conf)
    if text is None:
        log.warning("%s does not exist: no upstream nameserver", etc_resolv_conf)
        return Upstreams((), etc_resolv_conf)
    return parse_resolv_conf(text, virtual, etc_resolv_conf)


def watched_files(resolv_conf: str | None = None) -> tuple[str, ...]:
    """Files whose change can change :func:`read_upstreams`' answer."""
    if resolv_conf is not None:
        return (resolv_conf,)
    return (ETC_RESOLV_CONF, os.path.join(RESOLVED_RUNTIME_DIR, RESOLVED_RESOLV_CONF_NAME))
