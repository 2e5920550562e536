"""What the netvm as a whole should hold: the plan ``init`` applies and ``reconcile`` and ``status`` check.

The base firewall, the DNS rules for the upstreams read now, the connected
sets and the forwarding sysctls, planned from the netvm parameters. Shared
by :mod:`.init` (apply), :mod:`.reconcile` (restore) and :mod:`.status`
(compare), none of which imports another for it.
"""

from __future__ import annotations

import logging
from ipaddress import IPv4Address

from ..core.errors import HotplugError, InvalidInput, XenStoreUnavailable
from ..core.firewall import Ruleset
from ..core.model import NetvmParams, Plan, Step
from ..core.netvm_params import Reader, resolve_connected, resolve_params
from ..core.plan_base import families_of, plan_base
from ..core.plan_connected import connected_steps
from ..core.plan_dns import plan_dns_ruleset, plan_guard_ruleset
from .ports import HotplugHost
from .qubes_vm import in_qubes_vm
from .settings import Settings
from .upstreams import read_upstreams

log = logging.getLogger(__name__)


#: What ``netvm_params`` says when no source could be read (XenStore down).
UNAVAILABLE = "unavailable"
#: The virtual resolvers every Qubes netvm presents (qubes-core-admin's defaults): guarded
#: while the real ones cannot be read, so no query to them leaves as it is.
QUBES_VIRTUAL_DNS = (IPv4Address("10.139.1.1"), IPv4Address("10.139.1.2"))


def netvm_params(settings: Settings, qubesdb: Reader | None, xenstore: Reader | None) -> NetvmParams:
    """The netvm parameters for init: none at all means IPv6 off and no DNS rules; unreadable
    (XenStore down) means IPv6 off and the DNS guard on Qubes' virtual resolvers.

    Raises ``InvalidInput`` for a bad value in the source that has them.
    """
    if settings.conf_error is not None:
        raise InvalidInput(settings.conf_error)
    try:
        return resolve_params(settings.conf, qubesdb, xenstore)
    except XenStoreUnavailable as exc:
        log.warning("netvm parameters unavailable (%s): IPv6 treated as off, DNS to %s dropped", exc,
                    "/".join(map(str, QUBES_VIRTUAL_DNS)))
        return NetvmParams(source=UNAVAILABLE)


def dns_ruleset(params: NetvmParams, resolv_conf: str | None) -> Ruleset | None:
    """The DNS tool's rules for now, or DNS1/DNS2 only rejected when the upstreams cannot be read
    (and Qubes' DNS1/DNS2 when the netvm parameters themselves cannot)."""
    if params.source == UNAVAILABLE:
        return plan_guard_ruleset(QUBES_VIRTUAL_DNS)
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
    never forwarded out of the uplink as it is. In a Qubes VM forwarding is
    not planned at all: Qubes' network service turns it on once Qubes'
    firewall service has its per-VM drop policy in place.
    """
    base = plan_base(params.ipv6, ipv6_in_kernel, forwarding=not in_qubes_vm(settings))
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


