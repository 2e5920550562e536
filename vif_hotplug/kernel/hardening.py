"""The netvm-wide side of interface hardening: ``conf/all`` sysctls held by the vifs that need them.

Some hardening keys only take effect when ``conf/all`` says so too (see
``HARDEN_ALL4`` in :mod:`vif_hotplug.core.plan_vif`). They are the
netvm's, not one vif's, so they are held: the first hardened vif sets
them, recording the value each had, and when the last holder goes the
recorded values come back, only for keys still at the value this package
set (an administrator's later choice stays). The record is a state file of
the network namespace (:func:`vif_hotplug.kernel.state_files.state_file`),
written whole at every change; every change happens under the hotplug lock.

A holder whose device no longer exists (a VM destroyed without an
``offline``) stops holding at the next release, so the values still come
back once every hardened vif is gone.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ..core.errors import KernelError
from ..core.model import HardeningHold
from .state_files import atomic_write

log = logging.getLogger(__name__)


@dataclass
class _Record:
    holders: set[str] = field(default_factory=set)
    #: key -> (the value before this package changed it, the value it set)
    changed: dict[str, tuple[str, str]] = field(default_factory=dict)


def _parse(text: str) -> _Record:
    data = json.loads(text)
    holders = data.get("holders", [])
    changed = data.get("changed", {})
    if not isinstance(holders, list) or not isinstance(changed, dict):
        raise ValueError("unexpected layout")
    rec = _Record({str(h) for h in holders})
    for key, pair in changed.items():
        if not (isinstance(pair, list) and len(pair) == 2):
            raise ValueError(f"unexpected entry for {key}")
        rec.changed[str(key)] = (str(pair[0]), str(pair[1]))
    return rec


class Record(Protocol):
    """Where the holds are kept: the text of the record, ``None`` for none."""

    def read(self) -> str | None: ...

    def write(self, text: str | None) -> None: ...


class FileRecord:
    """A record in ``path`` (``None``: nowhere, so nothing is ever put back). Raises ``OSError``."""

    def __init__(self, path: str | None) -> None:
        self.path = path

    def read(self) -> str | None:
        if self.path is None:
            return None
        try:
            with open(self.path, encoding="utf-8") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def write(self, text: str | None) -> None:
        if self.path is None:
            return
        if text is not None:
            atomic_write(self.path, text)
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class HardeningHolds:
    """Applies :class:`~vif_hotplug.core.model.HardeningHold` steps (``ObjectOps``: add, remove, present).

    ``record``: where the holds are kept. ``read``/``write``: sysctls by key
    (``net/ipv4/conf/all/send_redirects``; ``read`` gives ``None`` for a key
    this kernel lacks). ``exists``: whether a device is here.
    """

    def __init__(
        self, record: Record, read: Callable[[str], str | None], write: Callable[[str, str], object],
        exists: Callable[[str], bool],
    ) -> None:
        self._record = record
        self._read = read
        self._write = write
        self._exists = exists

    def _load(self) -> _Record:
        try:
            text = self._record.read()
            return _Record() if text is None else _parse(text)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            # Unreadable: taken as "nothing recorded", which never puts a value back.
            log.warning("ignoring the hardening record: %s", exc)
            return _Record()

    def _save(self, rec: _Record) -> None:
        text = None
        if rec.holders or rec.changed:
            text = json.dumps({"holders": sorted(rec.holders),
                               "changed": {k: list(v) for k, v in sorted(rec.changed.items())}})
        try:
            self._record.write(text)
        except OSError as exc:
            raise KernelError(f"cannot record the hardening: {exc.strerror or exc}") from exc

    def add(self, hold: HardeningHold) -> bool:
        """``hold.dev`` holds ``hold.keys``: each set, what it was recorded the first time. Whether anything changed."""
        rec = self._load()
        writes = [(k, v, now) for k, v in hold.keys if (now := self._read(k)) is not None and now != v]
        if hold.dev in rec.holders and not writes:
            return False
        # Recorded before anything is written: a crash between the two leaves a
        # record whose "before" values are the ones still in place, which puts nothing wrong back.
        for key, value, now in writes:
            rec.changed[key] = (rec.changed[key][0] if key in rec.changed else now, value)
        rec.holders.add(hold.dev)
        self._save(rec)
        for key, value, now in writes:
            self._write(key, value)
            log.info("%s: sysctl %s=%s (was %s)", hold.dev, key.replace("/", "."), value, now)
        return True

    def remove(self, hold: HardeningHold) -> bool:
        """``hold.dev`` lets go; the last holder puts back what this package changed. Whether anything changed."""
        rec = self._load()
        if not rec.holders and not rec.changed:
            return False
        released = hold.dev in rec.holders
        rec.holders.discard(hold.dev)
        gone = {h for h in rec.holders if not self._exists(h)}
        if gone:
            log.info("%s: hardening holders gone without offline: %s", hold.dev, ", ".join(sorted(gone)))
            rec.holders -= gone
        if rec.holders:
            if released or gone:
                self._save(rec)
            return released
        restores = []
        for key, (was, set_to) in sorted(rec.changed.items()):
            now = self._read(key)
            if now == set_to:
                restores.append((key, was))
            else:
                log.info("%s: sysctl %s left at %s: changed since this package set %s",
                         hold.dev, key.replace("/", "."), now, set_to)
        for key, was in restores:
            self._write(key, was)
            log.info("%s: sysctl %s=%s (put back)", hold.dev, key.replace("/", "."), was)
        self._save(_Record())
        return released or bool(restores)

    def present(self, hold: HardeningHold) -> bool:
        """``hold.dev`` holds, and every key of ``hold.keys`` has its value."""
        if hold.dev not in self._load().holders:
            return False
        return all(self._read(k) in (v, None) for k, v in hold.keys)
