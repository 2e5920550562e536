"""One hotplug event as a library call: read, validate, plan, apply, report.

:func:`handle_event` owns the whole event, ``hotplug-status`` included, and
returns the hooks still to run; the entry point and the resident agent are
two thin callers of it. No ``sys.exit``, no global state.

Everything read from XenStore is validated before the kernel is touched.
Online is all-or-nothing, reporting included: when ``connected`` cannot be
written, what the event changed is undone. Offline removes whatever it can
and touches only this vif's objects.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

from ..core.errors import HotplugError, InvalidInput, KernelError, XenStoreUnavailable
from ..core.firewall import Family, SetElement
from ..core.handlers import StepHook
from ..core.model import VIF_GROUP, AddressRoute, Hooks, IPNetwork, NetvmParams, Plan, Step
from ..core.netvm_params import (
    CONNECTED_XENSTORE,
    QUBES_NAMES,
    Connected,
    Reader,
    resolve_connected,
    resolve_harden,
    resolve_mapped,
    resolve_params,
)
from ..core.plan_base import families_of
from ..core.plan_connected import connected_steps
from ..core.plan_vif import OfflineInputs, OnlineInputs, plan_offline, plan_online
from ..core.validation import VifId, parse_vif_name, parse_vm_addresses
from ..xen.qubesdb import QubesDBError, prefetch_mapped
from ..xen.xenstore_port import Prefetched, XenStorePort
from ..xenstore_env import (
    BACKEND_KEYS,
    BackendConfig,
    HotplugEvent,
    names_this_script,
    read_backend,
    report_connected,
    report_error,
)
from . import offload
from .applier import apply_all_or_nothing, apply_best_effort, rollback
from .connected import source_text
from .ports import HotplugHost, Lock
from .qubes_vm import check_vifname, in_qubes_vm
from .settings import Settings
from .upstreams_record import read_recorded_upstreams

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Outcome:
    """How an event ended: the exit code the toolstack sees, and what to run next."""

    exit_code: int
    dev: str
    plan: Plan | None = None
    changed: tuple[Step, ...] = ()
    error: str | None = None

    #: What the hooks see of the event besides their arguments (see :class:`Hooks`).
    hook_environment: tuple[tuple[str, str], ...] = ()

    @property
    def hooks(self) -> Hooks | None:
        """The hooks to run now: only when this event changed something (a repeat is quiet)."""
        if self.exit_code != 0 or not self.changed or self.plan is None or self.plan.hooks is None:
            return None
        return replace(self.plan.hooks, environment=self.hook_environment)


def _family(net: IPNetwork) -> Family:
    return 6 if net.version == 6 else 4


def handle_event(
    event: HotplugEvent,
    settings: Settings,
    host: HotplugHost,
    xs: XenStorePort,
    qubesdb: Reader | None,
    lock: Lock,
    *,
    dry_run: bool = False,
    on_step: StepHook | None = None,
) -> Outcome:
    """Bring one vif online or take it offline. Idempotent; never raises.

    A failure is one line in ``error``, ``hotplug-error`` and
    ``hotplug-status = error`` written when XenStore is reachable, exit code 1.
    """
    if event.command in ("add", "remove") or event.type_if != "vif":
        log.info("%s: %s type_if=%s: nothing to do", event.dev, event.command, event.type_if)
        return Outcome(0, event.dev)
    try:
        if event.trigger == "udev" and not names_this_script(xs.read(f"{event.xenbus_path}/script")):
            log.debug("%s: %s from udev for a vif whose script is another one: not ours", event.dev, event.command)
            return Outcome(0, event.dev)
        if event.command == "online":
            return _online(event, settings, host, xs, qubesdb, lock, dry_run, on_step)
        return _offline(event, settings, host, xs, qubesdb, lock, dry_run, on_step)
    except XenStoreUnavailable as exc:
        log.error("%s: %s", event.dev, exc)
        return Outcome(1, event.dev, error=str(exc))
    except HotplugError as exc:
        error = str(exc)
    except Exception as exc:
        log.debug("%s: unexpected failure", event.dev, exc_info=True)
        error = f"internal error: {type(exc).__name__}: {exc}"
    log.error("%s: %s failed: %s", event.dev, event.command, error)
    if not dry_run:
        try:
            report_error(xs, event.xenbus_path, error)
        except XenStoreUnavailable as exc:
            log.error("%s: cannot report the failure: %s", event.dev, exc)
    return Outcome(1, event.dev, error=error)


def _prefetched(xs: XenStorePort, event: HotplugEvent) -> XenStorePort:
    """Every key an event may read, asked for at once (the netvm's keys only matter when
    netvm.conf and QubesDB lack them, but cost nothing extra in the same round trip)."""
    keys = [f"{event.xenbus_path}/{k}" for k in BACKEND_KEYS]
    return Prefetched(xs, keys + list(QUBES_NAMES.values()) + list(CONNECTED_XENSTORE.values()))


def _check_identity(event: HotplugEvent, backend: BackendConfig, host: HotplugHost) -> None:
    # Only ever act on this vif: a name from the environment must be
    # netback's, the configured vifname, or a device renamed from it.
    if event.dev not in (event.vif.name, backend.vifname) and host.alias(event.dev) != event.vif.name:
        raise InvalidInput(f"invalid vif {event.dev!r}: neither {event.vif.name} nor its vifname")


def _online(
    event: HotplugEvent, settings: Settings, host: HotplugHost, xs: XenStorePort, qubesdb: Reader | None,
    lock: Lock, dry_run: bool, on_step: StepHook | None,
) -> Outcome:
    xs = _prefetched(xs, event)
    backend = read_backend(xs, event.xenbus_path, require=True)
    vm = backend.vm
    assert vm is not None  # read_backend(require=True) raises instead
    if backend.vifname is not None and in_qubes_vm(settings):
        check_vifname(backend.vifname)
    if settings.conf_error is not None:
        raise InvalidInput(settings.conf_error)
    if vm.ipv4:  # read with the rest: one qubesdb-read run for the whole event
        prefetch_mapped(qubesdb, vm.ipv4[0].network_address)
    netvm = resolve_params(settings.conf, qubesdb, xs.read)
    connected = resolve_connected(settings.conf, qubesdb, xs.read)
    harden = resolve_harden(settings.conf, qubesdb)
    mapped = resolve_mapped(settings.conf, qubesdb, vm.ipv4[0].network_address) if vm.ipv4 else None
    with lock():
        _check_identity(event, backend, host)
        dev = backend.vifname or event.dev
        rename_from = None
        if dev != event.dev:
            if host.exists(event.dev):
                rename_from = event.dev
            elif host.exists(dev) and host.alias(dev) != event.dev:
                raise InvalidInput(f"invalid vifname {dev!r}: another device already has that name")
        facts = host.link_facts(rename_from or dev, defaults_wanted=False)
        if not facts.exists:
            raise KernelError(f"device {dev} does not exist")
        already = frozenset(
            str(n) for n in vm.networks if host.element_present(SetElement(_family(n), "allowed", str(n), dev))
        )
        routes = host.address_routes([str(n.network_address) for n in vm.networks])
        _refuse_others_addresses(event, dev, vm.networks, routes, host, xs, settings)
        # A device not yet in group 2 comes up for a new VM: whatever allowed elements
        # its name still has are a previous VM's (an offline that never finished).
        stale = tuple(host.device_elements(dev)) if facts.group != VIF_GROUP else ()
        hosts = frozenset(r.address for r in routes if r.local)
        plan = plan_online(OnlineInputs(
            dev, event.vif.domid, vm, netvm, facts, settings.hooks_dir, rename_from, mapped, already,
            hosts, harden, stale,
        ))
        plan = offload.with_device(plan, settings, dev, fresh=facts.group != VIF_GROUP)
        plan, synced = _with_connected(plan, connected, host, facts.ipv6_in_kernel)
        _log_plan(plan)
        if dry_run:
            return Outcome(0, dev, plan)
        applied = apply_all_or_nothing(plan.steps, host, dev, on_step)
        try:
            report_connected(xs, event.xenbus_path)
        except XenStoreUnavailable as exc:
            # The toolstack cannot learn that the vif works: it must not work. One line says both.
            rollback(applied.undo, host, dev)
            undone = len(applied.undo)
            raise XenStoreUnavailable(f"cannot report connected ({exc}): {undone} change(s) undone") from None
        if synced is not None:
            synced()
    log.info("%s: online done, %d change(s)", dev, len(applied.changed))
    return Outcome(0, dev, plan, applied.changed, hook_environment=_hook_environment(event, settings))


def _offline(
    event: HotplugEvent, settings: Settings, host: HotplugHost, xs: XenStorePort, qubesdb: Reader | None,
    lock: Lock, dry_run: bool, on_step: StepHook | None,
) -> Outcome:
    # Offline must clean up whatever a bad value cannot stop being in the
    # kernel: this vif's set elements name it, so they are found without it.
    xs = _prefetched(xs, event)
    try:
        backend = read_backend(xs, event.xenbus_path, require=False)
    except InvalidInput as exc:
        log.warning("%s: %s; removing what the kernel holds for this vif", event.dev, exc)
        backend = BackendConfig(None, None)
    netvm, harden, connected = NetvmParams(), False, None  # type: NetvmParams, bool, Connected | None
    try:
        if settings.conf_error is not None:
            raise InvalidInput(settings.conf_error)
        netvm = resolve_params(settings.conf, qubesdb, xs.read)
        harden = resolve_harden(settings.conf, qubesdb)
        connected = resolve_connected(settings.conf, qubesdb, xs.read)
    except (InvalidInput, QubesDBError) as exc:
        log.warning("%s: %s; gateway addresses unknown, the rest is removed", event.dev, exc)
    with lock():
        _check_identity(event, backend, host)
        dev = _offline_device(host, event, backend.vifname)
        facts = host.link_facts(dev)
        # What XenStore lists now and what the kernel still allows this device: an ``ip``
        # that changed, or an earlier offline that never finished, leaves nothing behind.
        held = tuple(net for e in host.device_elements(dev) for net in _networks_of(e.network))
        networks = tuple(dict.fromkeys((backend.vm.networks if backend.vm is not None else ()) + held))
        vif_type = backend.vm.vif_type if backend.vm is not None else "vif"
        plan = plan_offline(OfflineInputs(
            dev, event.vif.domid, networks, netvm, facts, settings.hooks_dir, vif_type, harden,
        ))
        plan = offload.without_device(plan, settings, dev, exists=facts.exists)
        plan, synced = _with_connected(plan, connected, host, facts.ipv6_in_kernel)
        _log_plan(plan)
        if dry_run:
            return Outcome(0, dev, plan)
        changed = apply_best_effort(plan.steps, host, dev, on_step)
        if synced is not None:
            synced()
    log.info("%s: offline done, %d change(s)", dev, len(changed))
    return Outcome(0, dev, plan, tuple(changed), hook_environment=_hook_environment(event, settings))


def _hook_environment(event: HotplugEvent, settings: Settings) -> tuple[tuple[str, str], ...]:
    """The event's toolstack variables, as Qubes' script had them when it ran its hooks."""
    env = [("XENBUS_PATH", event.xenbus_path)]
    if settings.xenstore_path:
        env.append(("XENSTORED_PATH", settings.xenstore_path))
    return tuple(env)


def _offline_device(host: HotplugHost, event: HotplugEvent, vifname: str | None) -> str:
    """The device to take offline: the vifname, netback's name, or the one renamed from it.

    Only a device whose identity is this vif's: netback's name, or a device
    renamed from it (its alias keeps netback's name). A ``vifname`` that names
    any other device (the uplink, another VM's vif) is not followed.
    """
    own = event.vif.name
    for candidate in (vifname, event.dev):
        if candidate is None or not host.exists(candidate):
            continue
        if candidate == own or host.alias(candidate) == own:
            return candidate
        log.warning("%s: %s is not this vif's device: left alone", own, candidate)
    found = host.find_by_alias(own)
    if found is not None:
        return found
    # Gone: only what outlives the device (its set elements) is left, under the name it had.
    return vifname if vifname is not None and not host.exists(vifname) else own


def _networks_of(network: str) -> tuple[IPNetwork, ...]:
    try:
        return parse_vm_addresses(network)
    except InvalidInput:
        return ()


def _refuse_others_addresses(
    event: HotplugEvent, dev: str, networks: tuple[IPNetwork, ...], routes: tuple[AddressRoute, ...],
    host: HotplugHost, xs: XenStorePort, settings: Settings,
) -> None:
    """Refuse a VM address that already belongs elsewhere: another online vif's (or inside its
    network), on a network of the netvm's own links (the LAN's router), or an upstream resolver.

    One route lookup per address: the common case costs nothing more. A vif
    that XenStore no longer marks online (a VM being restarted under a new
    domid) does not count: its address is released with its offline.
    """
    upstreams = set(read_recorded_upstreams(settings))
    for net, route in zip(networks, routes, strict=True):
        shown = f"invalid ip {net}"
        if route.local:
            continue  # the planner names the netvm's own addresses
        if str(net.network_address) in upstreams:
            raise InvalidInput(f"{shown}: an upstream nameserver of this netvm")
        if route.dev is not None and route.vm_interface and route.dev != dev and route.alias != event.vif.name:
            other = _vif_of_device(route.dev, route.alias)
            if other is None or xs.read(f"{other.xenbus_path}/online") == "1":
                whose = other.name if other is not None else route.dev
                raise InvalidInput(f"{shown}: already routed to {route.dev} ({whose} is online)")
        elif route.dev is not None and not route.vm_interface and route.on_link and route.prefixlen > 0:
            raise InvalidInput(f"{shown}: on the network of {route.dev}, a link of this netvm's own")
    wide = [n for n in networks if n.prefixlen < n.max_prefixlen]
    if wide:
        mine = set(networks)
        for family in sorted({_family(n) for n in wide}):
            for e in host.elements(family, "downstream"):
                for held in _networks_of(e.network):
                    if held in mine:
                        continue
                    for net in wide:
                        if held.version == net.version and held.subnet_of(net):  # type: ignore[arg-type]
                            raise InvalidInput(f"invalid ip {net}: covers {held}, another VM's address")


def _vif_of_device(name: str, alias: str | None) -> VifId | None:
    for candidate in (name, alias):
        if candidate is None:
            continue
        try:
            return parse_vif_name(candidate)
        except InvalidInput:
            continue
    return None


def _with_connected(
    plan: Plan, connected: Connected | None, host: HotplugHost, ipv6_in_kernel: bool,
) -> tuple[Plan, Callable[[], None] | None]:
    """``plan`` followed by what brings the connected sets up to date, and what records that once applied.

    Nothing when no source has them, or when the source is the one the sets
    were last brought up to (the sets are listed only when it changed).
    """
    if connected is None:
        return plan, None
    families = families_of(ipv6_in_kernel)
    text = source_text(connected, families)
    if host.connected_synced() == text:
        return plan, None
    present = [e for family in families for e in host.elements(family, "connected")]
    extra = connected_steps(connected, present, families)
    plan = Plan(plan.command, plan.dev, plan.steps + extra, plan.notes, plan.hooks) if extra else plan
    return plan, lambda: host.record_connected(text)


def _log_plan(plan: Plan) -> None:
    for note in plan.notes:
        log.warning("%s: %s", plan.dev, note)
    # One record: the formatters start each of its lines with the vif.
    log.debug("%s", _PlanLines(plan))


class _PlanLines:
    """The plan as debug lines, formatted only if a handler wants them."""

    def __init__(self, plan: Plan) -> None:
        self._plan = plan

    def __str__(self) -> str:
        return "\n".join(f"{self._plan.dev}: plan: {line}" for line in self._plan.lines())
