"""``vif-hotplug init``: what a network-providing domain needs before any vif (the init use case).

In order, each step idempotent:

1. the whole firewall (:func:`vif_hotplug.core.plan_base.base_ruleset`),
   the DNS rules (so no VM's query leaks out of the uplink before the first
   resolver is known) and the connected addresses, then forwarding on:
   firewall first, fail closed.
   The DNS rules are the DNS tool's, for the upstreams read now (DNS1/DNS2
   only rejected when they cannot be read);
2. ``reconcile``: every vif XenStore lists as online and whose device exists
   is brought to its desired state, and what this package holds for vifs
   that are gone is removed, so a netvm that restarts its networking comes
   back whole;
3. when the firewall backend changed, this package's objects in the other
   backend removed, only now that the new anti-spoofing is in place.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..core.errors import HotplugError, InvalidInput, XenStoreUnavailable
from ..core.firewall import Ruleset
from ..core.model import NetvmParams, Plan, Step
from ..core.netvm_params import Reader, resolve_connected, resolve_params
from ..core.plan_base import families_of, plan_base, plan_stop
from ..core.plan_connected import connected_steps
from ..core.plan_dns import plan_dns_ruleset, plan_guard_ruleset
from .applier import Applied, StepHook, apply_all_or_nothing
from .backend_state import Marker, other, read_marker, write_marker
from .dns import forget_flows
from .ports import HotplugHost
from .settings import Settings
from .upstreams import read_upstreams

if TYPE_CHECKING:
    from ..kernel.firewall_backend import BackendName
    from .runtime import Runtime

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


def dns_ruleset(params: NetvmParams, resolv_conf: str | None) -> Ruleset | None:
    """The DNS tool's rules for now, or DNS1/DNS2 only rejected when the upstreams cannot be read."""
    if not params.virtual_dns:
        return None
    try:
        upstreams = read_upstreams(params.virtual_dns, resolv_conf)
    except HotplugError as exc:
        log.warning("%s: DNS1/DNS2 rejected until qubes-setup-dnat-to-ns succeeds", exc)
        return plan_guard_ruleset(params.virtual_dns)
    return plan_dns_ruleset(params.virtual_dns, upstreams.servers, chained_to=upstreams.virtual_listed)


def plan_init(
    params: NetvmParams, ipv6_in_kernel: bool, host: HotplugHost, settings: Settings, qubesdb: Reader | None,
    xenstore: Reader | None, dns: Ruleset | None,
) -> Plan:
    """The firewall, the DNS rules, the connected sets and the forwarding sysctls, in order.

    The DNS rules go in before forwarding does: a VM's query to DNS1/DNS2 is
    never forwarded out of the uplink as it is.
    """
    base = plan_base(params.ipv6, ipv6_in_kernel)
    steps = list(base.steps)
    notes = list(base.notes)
    if dns is not None:
        steps.insert(1, Step("ensure", dns))
    else:
        notes.append("no virtual DNS resolvers configured: no DNS rules")
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


@dataclass(frozen=True, slots=True)
class InitResult:
    changes: int
    plan: Plan


def initialize(
    settings: Settings, runtime: Runtime, backend: BackendName, *, dry_run: bool = False,
    on_step: StepHook | None = None, resolv_conf: str | None = None,
) -> InitResult:
    """The whole of ``init`` on firewall ``backend`` (see the module docstring).

    Raises ``HotplugError``; bad netvm parameters (a broken netvm.conf) are
    ``InvalidInput`` before anything is changed: a netvm without ``init``
    forwards nothing, which is the safe side.
    """
    from ..kernel.sysctl import kernel_has_ipv6
    from .reconcile import reconcile

    xs = runtime.xenstore(settings)
    qubesdb = runtime.qubesdb(settings)
    try:
        params = netvm_params(settings, qubesdb, xs.read)
        host = runtime.host(settings, backend)
        plan = plan_init(params, kernel_has_ipv6(), host, settings, qubesdb, xs.read,
                         dns_ruleset(params, resolv_conf))
        for note in plan.notes:
            log.info("%s", note)
        if dry_run:
            return InitResult(0, plan)
        applied = apply_init(plan, host, on_step)
        host.record_connected(None)  # the next event compares the connected sets in full again
        changes = len(applied.changed)
        if any(s.target.what == "dns" for s in applied.changed if isinstance(s.target, Ruleset)):
            forget_flows(params.virtual_dns)
        changes += reconcile(settings, host, xs, qubesdb).changes
        # Only now that the new anti-spoofing holds every vif: the old one goes.
        former = runtime.host(settings, other(backend))
        old = read_marker(settings)
        if (old is None or old.backend != backend) and former.firewall.owns_state() and former.firewall.remove_all():
            log.info("removed this package's firewall objects from %s", former.firewall.name)
            changes += 1
        former.record_connected(None)
        write_marker(settings, Marker(backend, init=True))
    finally:
        xs.close()
    return InitResult(changes, plan)
