"""``vif-hotplug init``: what a network-providing domain needs before any vif (the init use case).

In order, each step idempotent:

1. the whole firewall (:func:`vif_hotplug.core.plan_base.base_ruleset`),
   the DNS rules (so no VM's query leaks out of the uplink before the first
   resolver is known) and the connected addresses, then forwarding on:
   firewall first, fail closed.
   The DNS rules are the DNS tool's, for the upstreams read now (DNS1/DNS2
   only rejected when they cannot be read); when they changed, Qubes'
   firewall service is asked to reload, as after the DNS tool. In a Qubes
   VM forwarding is left to Qubes' network service, which systemd starts
   after Qubes' firewall service;
2. ``reconcile``: every vif XenStore lists as online and whose device exists
   is brought to its desired state, and what this package holds for vifs
   that are gone is removed, so a netvm that restarts its networking comes
   back whole;
3. when the firewall backend changed, this package's objects in the other
   backend removed, only now that the new anti-spoofing is in place.

Last in step 1, flow offload: where the kernel can have a flowtable (a probe
that changes nothing), current Qubes' ``inet qubes-nat-accel`` over the VM
interfaces and uplinks; where it cannot, one log line
(:mod:`vif_hotplug.app.offload`).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ..core.firewall import Ruleset
from ..core.handlers import StepHook
from ..core.model import KernelModule, Plan, Step
from ..core.plan_base import plan_stop
from ..core.plan_dns import dnat_targets
from . import offload
from .applier import Applied, apply_all_or_nothing
from .backend_state import Marker, other, read_marker, write_marker
from .dns import forget_flows
from .netvm_plan import dns_ruleset, netvm_params, plan_init
from .ports import HotplugHost, Lock
from .qubes_vm import reload_firewall_service
from .reconcile import reconcile
from .settings import Settings
from .upstreams_record import record_upstreams

if TYPE_CHECKING:
    from ..kernel.firewall_backend import BackendName
    from .runtime import Runtime

log = logging.getLogger(__name__)

#: The driver that makes the vifs (Qubes' network-proxy-setup.sh loads it too).
NETBACK = "xen-netback"


def apply_init(plan: Plan, host: HotplugHost, on_step: StepHook | None = None) -> Applied:
    return apply_all_or_nothing(plan.steps, host, "init", on_step)


def stop(host: HotplugHost, ipv6_in_kernel: bool) -> int:
    """Forwarding off, as Qubes' network stop does; the number of changes."""
    return len(apply_all_or_nothing(plan_stop(ipv6_in_kernel), host, "stop").changed)


@dataclass(frozen=True, slots=True)
class InitResult:
    changes: int
    plan: Plan


def initialize(
    settings: Settings, runtime: Runtime, backend: BackendName, lock: Lock, *, dry_run: bool = False,
    on_step: StepHook | None = None, resolv_conf: str | None = None,
) -> InitResult:
    """The whole of ``init`` on firewall ``backend`` (see the module docstring), under ``lock``
    (the hotplug lock, or a no-op when the caller holds it already).

    Raises ``HotplugError``; bad netvm parameters (a broken netvm.conf) are
    ``InvalidInput`` before anything is changed: a netvm without ``init``
    forwards nothing, which is the safe side. ``dry_run`` plans and changes
    nothing, the state directory included.
    """
    from ..kernel.state_files import prune
    from ..kernel.sysctl import kernel_has_ipv6

    xs = runtime.xenstore(settings)
    qubesdb = runtime.qubesdb(settings)
    try:
        params = netvm_params(settings, qubesdb, xs.read)
        host = runtime.host(settings, backend, read_only=dry_run)
        plan = plan_init(params, kernel_has_ipv6(), host, settings, qubesdb, xs.read,
                         dns_ruleset(params, resolv_conf))
        if host.module_loadable(NETBACK):
            # After the firewall: the vifs netback makes are born into it.
            plan = replace(plan, steps=(*plan.steps, Step("run", KernelModule(NETBACK))))
        accel = offload.plan_for_init(host)
        plan = replace(plan, steps=(*plan.steps, accel.step) if accel.step is not None else plan.steps,
                       notes=(*plan.notes, accel.note))
        for note in plan.notes:
            log.info("%s", note)
        if dry_run:
            return InitResult(0, plan)
        with lock():
            prune(settings.state_dir)
            firewall = replace(plan, steps=plan.steps[:-1]) if accel.step is not None else plan
            applied = apply_init(firewall, host, on_step)
            # Flow offload only speeds up what the firewall accepted: its failure fails nothing.
            # Recorded before reconcile, so the vifs it brings online join the flowtable.
            offload.record(settings, accel.step is not None and offload.install(accel.step, host))
            host.record_connected(None)  # the next event compares the connected sets in full again
            changes = len(applied.changed)
            if any(s.target.what == "dns" for s in applied.changed if isinstance(s.target, Ruleset)):
                forget_flows(params.virtual_dns)
                reload_firewall_service(settings, "init changed the DNS rules")
            for step in plan.steps:
                if isinstance(step.target, Ruleset) and step.target.what == "dns":
                    record_upstreams(settings, dnat_targets(step.target))
            changes += reconcile(settings, host, xs, qubesdb, lock=contextlib.nullcontext).changes
            # Only now that the new anti-spoofing holds every vif: the old one goes.
            former = runtime.host(settings, other(backend))
            old = read_marker(settings)
            if (old is None or old.backend != backend) and former.firewall.owns_state() \
                    and former.firewall.remove_all():
                log.info("removed this package's firewall objects from %s", former.firewall.name)
                changes += 1
            former.record_connected(None)
            write_marker(settings, Marker(backend, init=True))
    finally:
        xs.close()
    return InitResult(changes, plan)

