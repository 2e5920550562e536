"""``vif-hotplug status``: the desired state of every vif beside the kernel's, drift marked per object.

The desired state is what the events would make of XenStore and the netvm
parameters: the very plans ``online`` (and ``init``) apply, checked object
by object (:func:`vif_hotplug.app.applier.check_all`) without changing
anything. Vifs are those XenStore lists under ``backend/vif`` and the VM
interfaces (group 2) the kernel has.
"""

from __future__ import annotations

import contextlib
import logging
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

from ..core.errors import HotplugError, InvalidInput
from ..core.firewall import Ruleset
from ..core.model import VIF_GROUP, Step
from ..core.netvm_params import Reader, resolve_params
from ..core.plan_base import base_ruleset
from ..core.plan_dns import plan_dns_ruleset
from ..core.validation import VifId
from ..xen.xenstore_port import XenStoreTree
from ..xenstore_env import HotplugEvent
from .applier import check_all
from .hotplug import handle_event
from .ports import NetvmHost
from .reconcile import xenstore_vifs
from .settings import Settings
from .upstreams import read_upstreams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ObjectState:
    object: str
    ok: bool
    detail: str = ""


@dataclass
class VifStatus:
    vif: str
    #: What XenStore says: ``online``, ``offline`` or ``unknown`` (no backend entry).
    xenstore: str
    objects: list[ObjectState] = field(default_factory=list)

    @property
    def drift(self) -> bool:
        return any(not o.ok for o in self.objects)


@dataclass
class Status:
    backend: str
    vifs: list[VifStatus] = field(default_factory=list)
    netvm: list[ObjectState] = field(default_factory=list)

    @property
    def drift(self) -> bool:
        return any(v.drift for v in self.vifs) or any(not o.ok for o in self.netvm)

    def as_dict(self) -> dict[str, object]:
        def objs(items: list[ObjectState]) -> list[dict[str, object]]:
            return [{"object": o.object, "ok": o.ok, "detail": o.detail} for o in items]

        return {
            "backend": self.backend,
            "drift": self.drift,
            "netvm": objs(self.netvm),
            "vifs": {v.vif: {"xenstore": v.xenstore, "drift": v.drift, "objects": objs(v.objects)} for v in self.vifs},
        }

    def lines(self) -> list[str]:
        out = [f"firewall backend: {self.backend}"]
        for o in self.netvm:
            out.append(f"{'ok   ' if o.ok else 'DRIFT'}  netvm  {o.object}{'' if o.ok else ': ' + o.detail}")
        for v in self.vifs:
            out.append(f"{v.vif} (XenStore: {v.xenstore}): {'DRIFT' if v.drift else 'ok'}")
            for o in v.objects:
                out.append(f"  {'ok   ' if o.ok else 'DRIFT'}  {o.object}{'' if o.ok else ': ' + o.detail}")
        return out


def _states(steps: tuple[Step, ...] | list[Step], host: NetvmHost) -> list[ObjectState]:
    return [ObjectState(str(step), detail is None, detail or "") for step, detail in check_all(list(steps), host)]


def status(
    settings: Settings, host: NetvmHost, backend: str, xs: XenStoreTree, qubesdb: Reader | None, *, init: bool,
    only: list[str] | None = None, resolv_conf: str | None = None,
) -> Status:
    """Everything, or only the vifs named in ``only``. Raises ``XenStoreUnavailable`` when XenStore is down.

    ``init``: whether ``init`` ran on this netvm (then its firewall and the
    DNS rules are part of the desired state).
    """
    from ..kernel.sysctl import kernel_has_ipv6

    result = Status(backend)
    seen: set[str] = set()
    for vif in xenstore_vifs(xs):
        online = xs.read(f"{vif.xenbus_path}/online") == "1"
        name = xs.read(f"{vif.xenbus_path}/vifname") or vif.name
        if only and vif.name not in only and name not in only:
            continue
        seen |= {vif.name, name}
        result.vifs.append(_vif_status(settings, host, xs, qubesdb, vif, name, online))
    for dev in host.group_members(VIF_GROUP):
        if dev in seen or (only and dev not in only):
            continue
        result.vifs.append(VifStatus(dev, "unknown", [ObjectState(f"link {dev} group {VIF_GROUP}", False,
                                                                  "a VM interface no vif in XenStore accounts for")]))
    if not only:
        result.netvm = _netvm_status(settings, host, xs, qubesdb, init, kernel_has_ipv6(), resolv_conf)
    return result


def _vif_status(
    settings: Settings, host: NetvmHost, xs: XenStoreTree, qubesdb: Reader | None, vif: VifId, name: str,
    online: bool,
) -> VifStatus:
    exists = host.exists(name)
    state = VifStatus(name, "online" if online else "offline")
    if not online:
        if exists:
            # What offline would still change: a half-done offline shows here.
            outcome = handle_event(HotplugEvent("offline", vif, vif.name), settings, host, xs, qubesdb, _no_lock,
                                   dry_run=True)
            if outcome.plan is not None:
                state.objects += _states(outcome.plan.steps, host)
        return state
    if not exists:
        state.objects.append(ObjectState(f"link {name}", False, "device missing"))
        return state
    outcome = handle_event(HotplugEvent("online", vif, vif.name), settings, host, xs, qubesdb, _no_lock,
                           dry_run=True)
    if outcome.plan is None:
        state.objects.append(ObjectState("plan", False, outcome.error or "cannot plan"))
        return state
    state.objects += _states(outcome.plan.steps, host)
    return state


def _netvm_status(
    settings: Settings, host: NetvmHost, xs: XenStoreTree, qubesdb: Reader | None, init: bool, ipv6_in_kernel: bool,
    resolv_conf: str | None,
) -> list[ObjectState]:
    out: list[ObjectState] = []
    try:
        params = resolve_params(settings.conf, qubesdb, xs.read) if settings.conf_error is None else None
    except InvalidInput as exc:
        return [ObjectState("netvm parameters", False, str(exc))]
    if init and params is not None:
        out += _states([Step("ensure", base_ruleset(params.ipv6, ipv6_in_kernel))], host)
    if init and params is not None and params.virtual_dns:
        try:
            upstreams = read_upstreams(params.virtual_dns, resolv_conf)
            dns: Ruleset = plan_dns_ruleset(params.virtual_dns, upstreams.servers,
                                            chained_to=upstreams.virtual_listed)
            out += _states([Step("ensure", dns)], host)
        except HotplugError as exc:
            out.append(ObjectState("firewall dns", False, f"upstreams unknown: {exc}"))
    return out


def _no_lock() -> AbstractContextManager[None]:
    # Planning only reads: status never waits for a running event.
    return contextlib.nullcontext()
