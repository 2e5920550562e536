"""``vif-hotplug init``: what a network-providing domain needs before any vif (the init use case).

In order, each step idempotent:

1. the whole firewall (:func:`vif_hotplug.core.plan_base.base_ruleset`),
   the DNS guard for DNS1/DNS2 (so no VM's query leaks out of the uplink
   before the first resolver is known) and the connected addresses, then
   forwarding on: firewall first, fail closed;
2. the DNS tool's logic once (upstreams read, DNAT in place);
3. when the firewall backend changed, this package's objects in the other
   backend removed, only now that the new anti-spoofing is in place;
4. ``reconcile``: every vif XenStore lists as online and whose device exists
   is brought to its desired state, and what this package holds for vifs
   that are gone is removed, so a netvm that restarts its networking comes
   back whole.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..core.errors import HotplugError, InvalidInput, XenStoreUnavailable
from ..core.model import NetvmParams, Plan, Step
from ..core.netvm_params import Reader, resolve_connected, resolve_params
from ..core.plan_base import families_of, plan_base, plan_stop
from ..core.plan_connected import connected_steps
from ..core.plan_dns import plan_guard_ruleset
from .applier import Applied, StepHook, apply_all_or_nothing
from .ports import HotplugHost
from .settings import Settings

log = logging.getLogger(__name__)


def netvm_params(settings: Settings, qubesdb: Reader | None, xenstore: Reader | None) -> NetvmParams:
    """The netvm parameters for init: none at all (or XenStore down) means IPv6 off and no DNS guard.

    Raises ``InvalidInput`` for a bad value in the source that has them.
    """
    if settings.conf_error is not None:
        raise InvalidInput(settings.conf_error)
    try:
        return resolve_params(settings.conf, qubesdb, xenstore)
    except XenStoreUnavailable as exc:
        log.warning("netvm parameters unavailable (%s): IPv6 treated as off", exc)
        return NetvmParams()


def plan_init(
    params: NetvmParams, ipv6_in_kernel: bool, host: HotplugHost, settings: Settings, qubesdb: Reader | None,
    xenstore: Reader | None,
) -> Plan:
    """The firewall, the DNS guard, the connected sets and the forwarding sysctls, in order."""
    base = plan_base(params.ipv6, ipv6_in_kernel)
    steps = list(base.steps)
    notes = list(base.notes)
    if params.virtual_dns:
        # Before forwarding goes on (the sysctls come last in ``base``).
        steps.insert(1, Step("ensure", plan_guard_ruleset(params.virtual_dns)))
    else:
        notes.append("no virtual DNS resolvers configured: no DNS guard")
    try:
        connected = resolve_connected(settings.conf, qubesdb, xenstore)
    except XenStoreUnavailable:
        connected = None
    if connected is not None:
        families = families_of(ipv6_in_kernel)
        present = [e for f in families for e in host.elements(f, "connected")]
        steps[1:1] = connected_steps(connected, present, families)
    return Plan("init", "init", tuple(steps), tuple(notes))


def apply_init(plan: Plan, host: HotplugHost, on_step: StepHook | None = None) -> Applied:
    return apply_all_or_nothing(plan.steps, host, "init", on_step)


def stop(host: HotplugHost, ipv6_in_kernel: bool) -> int:
    """Forwarding off, as Qubes' network stop does; the number of changes."""
    return len(apply_all_or_nothing(plan_stop(ipv6_in_kernel), host, "stop").changed)


def run_dns_once(apply: Callable[[], int]) -> None:
    """The DNS tool's logic after init; its failure leaves the guard in place and is only logged."""
    try:
        apply()
    except HotplugError as exc:
        log.warning("DNS DNAT not set up: %s (DNS1/DNS2 stay rejected until qubes-setup-dnat-to-ns succeeds)", exc)
