"""``vif-hotplug reconcile``: make the kernel match XenStore for every vif at once.

* Every vif XenStore lists as online (``backend/vif/D/N/online`` = 1) whose
  device exists goes through the very ``online`` of a hotplug event
  (:func:`vif_hotplug.app.hotplug.handle_event`): whatever drifted (a
  flushed chain, a destroyed set, a deleted route or neighbour, a missing
  gateway address) is restored, and a driver domain that started after its
  VMs brings them up.
* What this package holds for vifs that are gone is removed: ``allowed``
  elements naming no such vif (with their ``downstream`` elements, unless
  another vif routes the address), ``downstream`` elements no vif allows,
  VM interfaces (group 2) XenStore does not list as online (through the
  ``offline`` of an event), and NAT namespaces of vifs that are gone.

Only objects this package owns are touched. Idempotent: a second run
changes nothing. The whole firewall of ``init`` is ensured too when
``init`` ran on this netvm.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

from ..core.errors import HotplugError, InvalidInput
from ..core.firewall import Family, Ruleset, SetElement
from ..core.handlers import StepHook
from ..core.model import AddressRelease, Plan, Step
from ..core.netvm_params import Reader
from ..core.plan_base import families_of
from ..core.plan_nat import plan_nat_offline
from ..core.validation import VifId, parse_vm_addresses, parse_xenbus_path
from ..kernel.netns import NETNS_DIR
from ..xen.xenstore_port import XenStoreTree
from ..xenstore_env import HotplugEvent
from .applier import apply_all_or_nothing, apply_best_effort, check_all
from .hooks import run_hooks
from .hotplug import handle_event
from .netvm_plan import dns_ruleset, netvm_params, plan_init
from .ports import Lock, NetvmHost
from .qubes_vm import reload_firewall_service
from .settings import Settings

log = logging.getLogger(__name__)

_NUM = r"(0|[1-9][0-9]{0,4})"
_VIF_NAME = re.compile(rf"vif{_NUM}\.{_NUM}")


@dataclass
class ReconcileResult:
    changes: int = 0
    online: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    plans: list[Plan] = field(default_factory=list)


def xenstore_vifs(xs: XenStoreTree) -> list[VifId]:
    """Every vif with a backend directory in XenStore (``backend/vif/D/N``)."""
    out: list[VifId] = []
    for domid in xs.directory("backend/vif"):
        for devid in xs.directory(f"backend/vif/{domid}"):
            try:
                out.append(parse_xenbus_path(f"backend/vif/{domid}/{devid}"))
            except InvalidInput:
                log.warning("ignoring backend/vif/%s/%s: not a vif", domid[:16], devid[:16])
    return sorted(out)


def online_vifs(xs: XenStoreTree) -> list[VifId]:
    """Every vif whose backend XenStore marks online (``backend/vif/D/N/online`` = 1)."""
    return [vif for vif in xenstore_vifs(xs) if xs.read(f"{vif.xenbus_path}/online") == "1"]


def reconcile(
    settings: Settings, host: NetvmHost, xs: XenStoreTree, qubesdb: Reader | None, *, lock: Lock,
    dry_run: bool = False, base: bool = False, resolv_conf: str | None = None, on_step: StepHook | None = None,
) -> ReconcileResult:
    """Bring every vif to its desired state and remove what belongs to vifs that are gone.

    All of it under ``lock`` (the hotplug lock; a no-op when the caller holds
    it), XenStore read inside it: a vif an event brings online meanwhile is
    never taken for a stray. A dry run takes no lock and changes nothing.

    ``base``: ``init`` ran on this netvm, so its firewall, DNS rules (their
    upstreams from ``resolv_conf``, default the system's) and forwarding are
    part of the desired state too. ``on_step`` sees every step of the run,
    numbered in the order they are applied (the order ``--dry-run`` lists them).
    """
    result = ReconcileResult()
    with contextlib.nullcontext() if dry_run else lock():
        _reconcile(settings, host, xs, qubesdb, dry_run, base, resolv_conf, result, _numbered(on_step))
    return result


def _numbered(hook: StepHook | None) -> StepHook | None:
    """``hook`` with the steps of all the run's plans numbered one after the other."""
    if hook is None:
        return None
    count = itertools.count()
    current = [-1]

    def numbered(at: str, index: int, step: Step) -> None:
        if at == "before":
            current[0] = next(count)
        hook(at, current[0], step)

    return numbered


def _reconcile(
    settings: Settings, host: NetvmHost, xs: XenStoreTree, qubesdb: Reader | None, dry_run: bool, base: bool,
    resolv_conf: str | None, result: ReconcileResult, on_step: StepHook | None,
) -> None:
    if not dry_run:
        host.record_connected(None)  # its first event compares the connected sets in full
    if base:
        _reconcile_base(settings, host, xs, qubesdb, dry_run, result, resolv_conf, on_step)
    held = contextlib.nullcontext
    wanted, elements = _bring_online(settings, host, xs, qubesdb, held, dry_run, result, on_step)
    steps = _gone_steps(host, wanted, elements)
    if steps:
        plan = Plan("reconcile", "reconcile", tuple(steps))
        result.plans.append(plan)
        result.removed += [s.lines()[0] for s in steps]
        if not dry_run:
            try:
                result.changes += len(apply_best_effort(steps, host, "reconcile", on_step))
            except HotplugError as exc:
                result.errors.append(str(exc))
    _take_strays_offline(settings, host, xs, qubesdb, held, dry_run, result, wanted, on_step)


def _bring_online(
    settings: Settings, host: NetvmHost, xs: XenStoreTree, qubesdb: Reader | None,
    lock: Callable[[], AbstractContextManager[None]], dry_run: bool, result: ReconcileResult,
    on_step: StepHook | None,
) -> tuple[set[str], set[SetElement]]:
    """Online every vif XenStore marks online whose device exists: (their devices, the allowed
    elements they want; other elements of theirs, left by an ``ip`` that changed, go)."""
    wanted: set[str] = set()
    elements: set[SetElement] = set()
    for vif in online_vifs(xs):
        dev = _device(host, xs, vif)
        if dev is None:
            continue
        outcome = handle_event(HotplugEvent("online", vif, vif.name), settings, host, xs, qubesdb, lock,
                               dry_run=dry_run, on_step=on_step)
        wanted.add(outcome.dev)
        if outcome.exit_code != 0:
            result.errors.append(f"{outcome.dev}: {outcome.error}")
            continue
        result.online.append(outcome.dev)
        if outcome.plan is not None:
            elements |= {s.target for s in outcome.plan.steps if isinstance(s.target, SetElement)}
        result.changes += len(outcome.changed)
        if outcome.plan is not None and dry_run:
            result.plans.append(outcome.plan)
        if outcome.hooks is not None and not dry_run:
            run_hooks(outcome.hooks)
    return wanted, elements


def _take_strays_offline(
    settings: Settings, host: NetvmHost, xs: XenStoreTree, qubesdb: Reader | None,
    lock: Callable[[], AbstractContextManager[None]], dry_run: bool, result: ReconcileResult, wanted: set[str],
    on_step: StepHook | None,
) -> None:
    """Offline every vif device here that no online vif wants."""
    for dev, stray in _stray_vifs(host, wanted):
        outcome = handle_event(HotplugEvent("offline", stray, dev), settings, host, xs, qubesdb, lock,
                               dry_run=dry_run, on_step=on_step)
        if outcome.changed or (dry_run and outcome.plan is not None and _would_change(outcome.plan, host)):
            result.removed.append(f"{dev}: offline ({len(outcome.changed)} change(s))")
            if dry_run and outcome.plan is not None:
                result.plans.append(outcome.plan)
        result.changes += len(outcome.changed)
        if outcome.exit_code != 0:
            result.errors.append(f"{dev}: {outcome.error}")


def _would_change(plan: Plan, host: NetvmHost) -> bool:
    return any(detail is not None for _, detail in check_all(list(plan.steps), host))


def _reconcile_base(
    settings: Settings, host: NetvmHost, xs: XenStoreTree, qubesdb: Reader | None, dry_run: bool,
    result: ReconcileResult, resolv_conf: str | None, on_step: StepHook | None,
) -> None:
    from ..kernel.sysctl import kernel_has_ipv6

    try:
        params = netvm_params(settings, qubesdb, xs.read)
        plan = plan_init(params, kernel_has_ipv6(), host, settings, qubesdb, xs.read, dns_ruleset(params, resolv_conf))
        result.plans.append(plan)
        if not dry_run:
            changed = apply_all_or_nothing(plan.steps, host, "reconcile", on_step).changed
            result.changes += len(changed)
            host.record_connected(None)  # the next event compares the connected sets in full again
            if any(isinstance(s.target, Ruleset) and s.target.what == "dns" for s in changed):
                # As after the DNS tool: Qubes' firewall service re-reads the resolvers.
                reload_firewall_service(settings, "reconcile restored the DNS rules")
    except HotplugError as exc:
        result.errors.append(f"netvm firewall: {exc}")


def _device(host: NetvmHost, xs: XenStoreTree, vif: VifId) -> str | None:
    """The vif's device here (its vifname or netback's name), or ``None``."""
    vifname = xs.read(f"{vif.xenbus_path}/vifname")
    for candidate in (vifname, vif.name):
        if candidate and host.exists(candidate):
            return candidate
    return None


def _vif_of(dev: str) -> VifId | None:
    m = _VIF_NAME.fullmatch(dev)
    return VifId(int(m.group(1)), int(m.group(2))) if m else None


def _gone_steps(host: NetvmHost, wanted: set[str], elements: set[SetElement]) -> list[Step]:
    """Set elements and NAT namespaces of vifs that are not online, and allowed elements no vif wants."""
    facts = host.link_facts("lo")
    steps: list[Step] = []
    allowed_nets: set[tuple[Family, str]] = set()
    planned = {e.dev for e in elements}  # a vif whose event failed keeps what it has
    for family in families_of(facts.ipv6_in_kernel):
        for e in host.elements(family, "allowed"):
            if e.dev in wanted and (e in elements or e.dev not in planned):
                allowed_nets.add((family, e.network))
                continue
            steps.append(Step("remove", e))
            for net in _networks(e.network):
                steps.append(Step("run", AddressRelease(family, net, e.dev or "")))
        for e in host.elements(family, "downstream"):
            if (family, e.network) not in allowed_nets and not any(
                isinstance(s.target, AddressRelease) and s.target.network == e.network for s in steps
            ):
                steps.append(Step("remove", SetElement(family, "downstream", e.network)))
    try:
        names = sorted(os.listdir(NETNS_DIR))
    except OSError:
        names = []
    for name in names:
        dev = name.removesuffix("-nat")
        if name.endswith("-nat") and dev != name and _vif_of(dev) is not None and dev not in wanted:
            steps += plan_nat_offline(dev)
    return steps


def _networks(network: str) -> list[str]:
    try:
        return [str(n) for n in parse_vm_addresses(network)]
    except InvalidInput:
        return []


def _stray_vifs(host: NetvmHost, wanted: set[str]) -> list[tuple[str, VifId]]:
    """VM interfaces here that no online vif accounts for, with their vif.

    Netback's names and devices renamed from them (the alias keeps the
    name): a vif half taken offline has left group 2 already but may still
    hold settings and addresses.
    """
    out = []
    for name, alias in host.vif_devices():
        vif = _vif_of(name) or (_vif_of(alias) if alias else None)
        if vif is not None and name not in wanted:
            out.append((name, vif))
    return out
