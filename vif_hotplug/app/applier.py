"""The one applier: order, rollback and state checks for every command's steps.

Steps are dispatched by the type of their target through a table of
handlers (:class:`Handlers`) the host provides; the applier owns what the
operations mean:

* ``add``/``remove`` an object; the inverse is the opposite operation;
* ``set`` a setting; the adapter returns the previous value, which undoes it;
* ``ensure`` a firewall ruleset (idempotent, shared by every vif, so never
  undone: rolling back a firewall would reopen what it closed);
* ``run`` an action without an inverse (a conntrack purge).

:func:`apply_all_or_nothing` (online, init) undoes, in reverse, every change
this run made when a step fails, so a failure leaves no partial state.
:func:`apply_best_effort` (offline) keeps going after a failure so as much
as possible is removed, treats a vanished device as "already gone", and
raises the first failure at the end. :func:`check` compares each step with
the kernel without changing anything (``status``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from ..core.errors import DeviceGone, HotplugError, KernelError
from ..core.handlers import ActionOps, EnsureOps, Host, ObjectOps, Ops, SettingOps, StepHook
from ..core.model import LinkState, Step

log = logging.getLogger(__name__)

def _ops(step: Step, host: Host) -> Ops:
    try:
        return host.handlers[type(step.target)]
    except KeyError:
        raise KernelError(f"no handler for {type(step.target).__name__}") from None


def _execute(step: Step, host: Host) -> tuple[bool, Step | None]:
    """Run one step: (changed, the step that would undo it).

    Any exception an adapter let through becomes ``KernelError``: a failure
    is a failure, whatever library raised it, and must trigger the rollback.
    """
    try:
        return _dispatch(step, _ops(step, host))
    except HotplugError:
        raise
    except Exception as exc:
        raise KernelError(f"{step}: {type(exc).__name__}: {exc}") from exc


def _dispatch(step: Step, ops: Ops) -> tuple[bool, Step | None]:
    t = step.target
    if step.op == "add" and isinstance(ops, ObjectOps):
        return (True, Step("remove", t)) if ops.add(t) else (False, None)
    if step.op == "remove" and isinstance(ops, ObjectOps):
        return (True, Step("add", t)) if ops.remove(t) else (False, None)
    if step.op == "set" and isinstance(ops, SettingOps):
        old = ops.set(t)
        return (True, Step("set", old)) if old is not None else (False, None)
    if step.op == "ensure" and isinstance(ops, EnsureOps):
        return ops.ensure(t), None
    if step.op == "run" and isinstance(ops, ActionOps):
        ops.run(t)
        return False, None
    raise KernelError(f"cannot {step.op} {type(t).__name__}")


@dataclass(frozen=True, slots=True)
class Applied:
    """What one all-or-nothing run changed, and the steps that would undo it."""

    changed: tuple[Step, ...]
    undo: tuple[Step, ...]


def apply_all_or_nothing(steps: Sequence[Step], host: Host, tag: str, on_step: StepHook | None = None) -> Applied:
    """Apply ``steps`` in order; on failure undo this run's changes and re-raise.

    Returns what changed (nothing when all was in place) and how to undo it,
    for a caller whose own next step (reporting) may still fail. ``tag``
    (the vif) starts every log line.
    """
    undo: list[Step] = []
    changed: list[Step] = []
    for index, step in enumerate(steps):
        if on_step is not None:
            on_step("before", index, step)
        try:
            did, inverse = _execute(step, host)
        except HotplugError as exc:
            log.error("%s: %s failed: %s; undoing %d change(s)", tag, step, exc, len(undo))
            rollback(undo, host, tag)
            raise
        if did:
            log.info("%s: %s", tag, step)
            changed.append(step)
        if inverse is not None:
            undo.append(inverse)
        if on_step is not None:
            on_step("after", index, step)
    return Applied(tuple(changed), tuple(undo))


def _takes_down(step: Step) -> str | None:
    """The device whose link ``step`` takes down, if it does."""
    t = step.target
    return t.dev if step.op == "set" and isinstance(t, LinkState) and not t.up and t.netns is None else None


def rollback(undo: Sequence[Step], host: Host, tag: str) -> None:
    """Apply the inverse steps ``undo`` in reverse order; failures are logged, not raised.

    Stops at a link-down that fails (the device is still there): what was
    undone before it is gone, and what would come after it (the vif's group,
    its ``allowed`` elements) stays, so an interface that is still up keeps
    its anti-spoofing.
    """
    for step in reversed(undo):
        try:
            _execute(step, host)
            log.info("%s: undo: %s", tag, step)
        except DeviceGone:
            log.debug("%s: undo %s: device gone, nothing to do", tag, step)
        except HotplugError as exc:
            log.error("%s: undo %s failed: %s", tag, step, exc)
            if _takes_down(step) is not None:
                log.error("%s: %s is still up: its anti-spoofing stays, the rest of the undo is left", tag,
                          _takes_down(step))
                return


def apply_best_effort(steps: Sequence[Step], host: Host, tag: str, on_step: StepHook | None = None) -> list[Step]:
    """Apply every step of a removal plan; raise the first real failure at the end.

    A step that ``requires_down`` a device whose link-down failed in this run
    is skipped (and the failure raised): see :class:`~vif_hotplug.core.model.Step`.
    """
    changed: list[Step] = []
    first: HotplugError | None = None
    still_up: set[str] = set()
    for index, step in enumerate(steps):
        if on_step is not None:
            on_step("before", index, step)
        if step.requires_down is not None and step.requires_down in still_up:
            log.error("%s: %s skipped: %s is still up", tag, step, step.requires_down)
        else:
            try:
                if _execute(step, host)[0]:
                    log.info("%s: %s", tag, step)
                    changed.append(step)
            except DeviceGone:
                log.debug("%s: %s: device gone, nothing to do", tag, step)
            except HotplugError as exc:
                log.error("%s: %s failed: %s", tag, step, exc)
                first = first or exc
                down = _takes_down(step)
                if down is not None:
                    still_up.add(down)
        if on_step is not None:
            on_step("after", index, step)
    if first is not None:
        raise first
    return changed


@dataclass(frozen=True, slots=True)
class Drift:
    """One step whose object is not as the step wants it."""

    step: Step
    detail: str

    def __str__(self) -> str:
        return f"{self.step}: {self.detail}"


def _setting_key(step: Step) -> tuple[object, ...] | None:
    """What a ``set`` step sets (a later step for the same key decides the final value)."""
    t = step.target
    if step.op != "set":
        return None
    dev = getattr(t, "dev", None) if not hasattr(t, "key") else t.key
    return (type(t), dev, getattr(t, "netns", None))


def check_all(steps: Sequence[Step], host: Host) -> list[tuple[Step, str | None]]:
    """Every lasting step with what differs in the kernel (``None``: as wanted). Changes nothing.

    ``run`` steps (purges) leave no state to compare. A setting a plan sets
    twice (a link down before it moves, up after) is judged by its last value.
    """
    last: dict[tuple[object, ...], int] = {}
    for i, step in enumerate(steps):
        key = _setting_key(step)
        if key is not None:
            last[key] = i
    out: list[tuple[Step, str | None]] = []
    for i, step in enumerate(steps):
        key = _setting_key(step)
        if step.op == "run" or (key is not None and last[key] != i):
            continue
        try:
            detail = _check_one(step, _ops(step, host))
        except DeviceGone:
            detail = "device missing"
        except HotplugError as exc:
            detail = f"cannot read: {exc}"
        out.append((step, detail))
    return out


def check(steps: Sequence[Step], host: Host) -> list[Drift]:
    """Steps whose desired state the kernel does not hold (see :func:`check_all`)."""
    return [Drift(step, detail) for step, detail in check_all(steps, host) if detail is not None]


def _check_one(step: Step, ops: Ops) -> str | None:
    t = step.target
    if isinstance(ops, ObjectOps):
        present = ops.present(t)
        if step.op == "add" and not present:
            return "missing"
        if step.op == "remove" and present:
            return "still present"
        return None
    if isinstance(ops, SettingOps):
        now = ops.current(t)
        if now is None:
            return "missing"
        return None if now == t else f"is {now}"
    if isinstance(ops, EnsureOps):
        problems = ops.drift(t)
        return "; ".join(problems) if problems else None
    return None
