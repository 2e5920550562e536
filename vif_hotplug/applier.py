"""Owns ordering and rollback: runs a plan's steps against a :class:`Host`.

``apply_all_or_nothing`` (online) undoes, in reverse, every change this run
made when a step fails, so a failed online leaves no partial state.
``apply_best_effort`` (offline) keeps going after a failure so as much as
possible is removed, treats a vanished device as "already gone", and raises
the first failure at the end.
"""

from __future__ import annotations

import logging
from typing import Protocol

from .errors import DeviceGone, HotplugError, KernelError
from .model import Plan, Removable, Runnable, Settable, Step

log = logging.getLogger(__name__)


class Host(Protocol):
    """What the applier needs from the system (kernel adapters or a fake)."""

    def add(self, target: Removable) -> bool:
        """Make ``target`` present; ``False`` if it already was."""
        ...

    def remove(self, target: Removable) -> bool:
        """Make ``target`` absent; ``False`` if it already was."""
        ...

    def set(self, target: Settable) -> Settable | None:
        """Apply a setting; return the previous one if it changed, else ``None``."""
        ...

    def run(self, target: Runnable) -> None:
        """Perform an action that has no inverse (idempotent ensure, purge, hooks)."""
        ...


def _execute(step: Step, host: Host) -> Step | None:
    """Run one step; return the step that would undo it, or ``None`` if nothing changed.

    Any exception an adapter let through becomes ``KernelError``: a failure
    is a failure, whatever library raised it, and must trigger the rollback.
    """
    try:
        return _dispatch(step, host)
    except HotplugError:
        raise
    except Exception as exc:
        raise KernelError(f"{type(exc).__name__}: {exc}") from exc


def _dispatch(step: Step, host: Host) -> Step | None:
    t = step.target
    if step.op == "add":
        return Step("remove", t) if host.add(t) else None  # type: ignore[arg-type]
    if step.op == "remove":
        return Step("add", t) if host.remove(t) else None  # type: ignore[arg-type]
    if step.op == "set":
        old = host.set(t)  # type: ignore[arg-type]
        return Step("set", old) if old is not None else None
    host.run(t)  # type: ignore[arg-type]
    return None


def apply_all_or_nothing(plan: Plan, host: Host) -> list[Step]:
    """Apply ``plan``; on failure undo this run's changes and re-raise.

    Returns the steps that changed something (empty when already applied).
    """
    undo: list[Step] = []
    changed: list[Step] = []
    for step in plan.steps:
        try:
            inverse = _execute(step, host)
        except HotplugError as exc:
            log.error("%s: %s failed: %s; undoing %d change(s)", plan.dev, step, exc, len(undo))
            _rollback(plan.dev, undo, host)
            raise
        if inverse is not None:
            log.info("%s: %s", plan.dev, step)
            undo.append(inverse)
            changed.append(step)
    return changed


def _rollback(dev: str, undo: list[Step], host: Host) -> None:
    for step in reversed(undo):
        try:
            _execute(step, host)
            log.info("%s: undo: %s", dev, step)
        except HotplugError as exc:
            log.error("%s: undo %s failed: %s", dev, step, exc)


def apply_best_effort(plan: Plan, host: Host) -> list[Step]:
    """Apply every step of a removal plan; raise the first real failure at the end."""
    changed: list[Step] = []
    first: HotplugError | None = None
    for step in plan.steps:
        try:
            if _execute(step, host) is not None:
                log.info("%s: %s", plan.dev, step)
                changed.append(step)
        except DeviceGone:
            log.debug("%s: %s: device gone, nothing to do", plan.dev, step)
        except HotplugError as exc:
            log.error("%s: %s failed: %s", plan.dev, step, exc)
            first = first or exc
    if first is not None:
        raise first
    return changed
