"""Flow offload (current Qubes' ``inet qubes-nat-accel``): planned by ``init``, followed by vif events.

``init`` asks the firewall whether the kernel can have a flowtable (a probe
that changes nothing), installs one over the VM interfaces and uplinks when
it can, logs why not when it cannot, and records the outcome in the state
directory (a file per network namespace, :mod:`vif_hotplug.kernel.state_files`).
An event only reads that record (one ``stat``), so an event on a kernel
without flowtables costs nothing more; where the flowtable is installed, the
first online of a device adds that one device and its offline removes it:
one request each, whatever the number of VMs.
"""

from __future__ import annotations

import logging
import os
from typing import Protocol

from ..core.errors import HotplugError, KernelError
from ..core.handlers import Host
from ..core.model import VIF_GROUP, Plan, Step
from ..core.plan_base import UPLINK_GROUP, OffloadPlan, flowtable_device, plan_flow_offload
from ..kernel.state_files import atomic_write, state_file
from .applier import apply_all_or_nothing
from .settings import Settings

log = logging.getLogger(__name__)

RECORD = "offload"


class _Facts(Protocol):
    """What :func:`plan_for_init` needs of the host (the kernel host, or a fake)."""

    def flow_offload_missing(self) -> str | None: ...

    def group_members(self, group: int) -> list[str]: ...


def plan_for_init(host: _Facts) -> OffloadPlan:
    """The flow offload step ``init`` appends (or none), and the line it logs once."""
    try:
        missing = host.flow_offload_missing()
    except KernelError as exc:
        missing = f"the flowtable probe failed ({exc})"
    if missing is not None:
        return plan_flow_offload(missing, (), ())
    return plan_flow_offload(None, host.group_members(VIF_GROUP), host.group_members(UPLINK_GROUP))


def install(step: Step, host: Host) -> bool:
    """Apply ``init``'s flow offload step; whether it is in place (a failure is logged, not raised)."""
    try:
        apply_all_or_nothing((step,), host, "init")
    except HotplugError as exc:
        log.warning("flow offload not installed: %s", exc)
        return False
    return True


def record_path(settings: Settings) -> str:
    return state_file(settings.state_dir, RECORD)


def installed(settings: Settings) -> bool:
    """Whether the last ``init`` of this namespace installed the flowtable."""
    return os.path.exists(record_path(settings))


def record(settings: Settings, is_installed: bool) -> None:
    path = record_path(settings)
    try:
        if is_installed:
            atomic_write(path, "{}")
        elif os.path.exists(path):
            os.unlink(path)
    except OSError as exc:
        log.warning("cannot record the flow offload state in %s: %s", path, exc.strerror)


def with_device(plan: Plan, settings: Settings, dev: str, *, fresh: bool) -> Plan:
    """``online`` of ``dev`` followed by its flowtable device, when the flowtable is installed and the
    device comes up for a VM now (``fresh``; a repeated online finds it hooked already, by its
    first online or by ``init``, which lists every VM interface)."""
    if not fresh or not installed(settings):
        return plan
    return Plan(plan.command, plan.dev, (*plan.steps, Step("add", flowtable_device(dev))), plan.notes, plan.hooks)


def without_device(plan: Plan, settings: Settings, dev: str, *, exists: bool) -> Plan:
    """``offline`` of ``dev`` followed by unhooking it (a device that is gone the kernel unhooked itself)."""
    if not exists or not installed(settings):
        return plan
    return Plan(plan.command, plan.dev, (*plan.steps, Step("remove", flowtable_device(dev))), plan.notes,
                plan.hooks)
