"""One hotplug event, as a library call: read inputs, plan, apply.

No ``sys.exit``, no global state: a resident agent can call
:func:`handle_event` for event after event with its own XenStore connection
and host.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from .antispoof import ALLOWED
from .applier import apply_all_or_nothing, apply_best_effort
from .errors import InvalidInput, KernelError
from .locks import file_lock
from .mapped_nat import netns_exists
from .model import Hooks, IPNetwork, NatNamespace, NetvmParams, Plan, Step
from .netvm_params import DEFAULT_HOOKS_DIR, load_local_settings, load_mapped, load_netvm_params, read_conf
from .planner import merge_networks, plan_offline, plan_online
from .validation import parse_vm_addresses
from .xenstore_env import BackendConfig, HotplugEvent, read_backend

if TYPE_CHECKING:
    from .netlink import Netlink
    from .system import KernelHost
    from .xenstore_client import XenStore

log = logging.getLogger(__name__)

DEFAULT_LOCK = "/run/vif-hotplug.lock"
LOCK_TIMEOUT = 60.0


@dataclass(frozen=True)
class Outcome:
    plan: Plan
    changed: tuple[Step, ...]
    applied: bool

    @property
    def hooks(self) -> tuple[Hooks, ...]:
        """Hooks still to run: only when this event changed something (a repeat is quiet)."""
        if not (self.applied and self.changed):
            return ()
        return tuple(s.target for s in self.plan.steps if isinstance(s.target, Hooks))


def lock_path(env: Mapping[str, str]) -> str:
    return env.get("VIF_HOTPLUG_LOCK") or DEFAULT_LOCK


def handle_event(
    event: HotplugEvent, xs: XenStore, env: Mapping[str, str], host: KernelHost, dry_run: bool = False
) -> Outcome:
    """Bring one vif online or take it offline (hooks excepted: see :func:`run_hooks`). Idempotent.

    Everything read from XenStore is validated before the kernel is touched.
    Online is all-or-nothing; offline removes whatever it can and touches
    only this vif's objects. Raises ``HotplugError`` subclasses.
    """
    online = event.command == "online"
    if online:
        backend = read_backend(xs, event.xenbus_path, require=True)
        conf = read_conf(env)
        netvm = load_netvm_params(env, xenstore=xs, conf=conf)
        hooks_dir = load_local_settings(env, conf).hooks_dir
    else:
        backend, conf, netvm, hooks_dir = _offline_inputs(event, xs, env)
    # Serialise with other hotplug runs: offline decides which downstream
    # addresses are still used by another vif, which must not race an online.
    with file_lock(lock_path(env), LOCK_TIMEOUT, "hotplug lock"):
        nl = host.netlink
        if event.dev != event.vif.name and event.dev != backend.vifname and nl.alias(event.dev) != event.vif.name:
            # Only ever act on this vif: a name from the environment must be
            # netback's, the configured vifname, or a device renamed from it.
            raise InvalidInput(f"invalid vif {event.dev!r}: neither {event.vif.name} nor its vifname")
        if online:
            vm = backend.vm
            if vm is None:  # read_backend(require=True) already refuses this
                raise InvalidInput(f"{event.xenbus_path}/ip is missing")
            dev = backend.vifname or event.dev
            rename_from = None
            if dev != event.dev:
                if nl.index(event.dev) is not None:
                    rename_from = event.dev
                elif nl.index(dev) is not None and nl.alias(dev) != event.dev:
                    raise InvalidInput(f"invalid vifname {dev!r}: another device already has that name")
            facts = nl.link_facts(rename_from or dev)
            if not facts.exists:
                raise KernelError(f"device {dev} does not exist")
            mapped = load_mapped(env, str(vm.ipv4[0].network_address), conf) if vm.ipv4 else None
            allowed, _ = _set_networks(host, dev, facts.ipv6_in_kernel)
            plan = plan_online(
                dev, event.vif.domid, vm, netvm, facts, rename_from, hooks_dir, mapped,
                already_allowed=frozenset(str(n) for n in allowed),
            )
        else:
            dev = _offline_device(nl, event.dev, backend.vifname)
            facts = replace(nl.link_facts(dev), nat_namespace=netns_exists(NatNamespace(dev).netns))
            mine, elsewhere = _set_networks(host, dev, facts.ipv6_in_kernel)
            known = backend.vm.networks if backend.vm else ()
            networks = merge_networks(known, mine)
            vif_type = backend.vm.vif_type if backend.vm else "vif"
            plan = plan_offline(dev, event.vif.domid, networks, netvm, facts, elsewhere, vif_type, hooks_dir)
        for note in plan.notes:
            log.warning("%s: %s", dev, note)
        for line in plan.lines():
            log.debug("%s: plan: %s", dev, line)
        if dry_run:
            return Outcome(plan, (), applied=False)
        # Hooks are the administrator's and may be slow: the caller runs them
        # (run_hooks) after the lock is released and the status reported.
        kernel_part = replace(plan, steps=tuple(s for s in plan.steps if not isinstance(s.target, Hooks)))
        apply = apply_all_or_nothing if online else apply_best_effort
        changed = apply(kernel_part, host)
    return Outcome(plan, tuple(changed), applied=True)


def run_hooks(outcome: Outcome, host: KernelHost) -> None:
    """Run the user hooks of an applied event (none when it changed nothing). Never raises."""
    for hooks in outcome.hooks:
        host.run(hooks)


def _offline_inputs(
    event: HotplugEvent, xs: XenStore, env: Mapping[str, str]
) -> tuple[BackendConfig, tuple[str, str] | None, NetvmParams, str]:
    """Offline's inputs; a bad value is logged, not fatal.

    Offline must clean up whatever a bad value cannot stop being in the
    kernel: the set members name this vif, so they are found without it.
    """
    try:
        backend = read_backend(xs, event.xenbus_path, require=False)
    except InvalidInput as exc:
        log.warning("%s: %s; removing what the kernel holds for this vif", event.dev, exc)
        backend = BackendConfig(None, None)
    conf: tuple[str, str] | None = None
    netvm = NetvmParams()
    hooks_dir = DEFAULT_HOOKS_DIR
    try:
        conf = read_conf(env)
        netvm = load_netvm_params(env, xenstore=xs, conf=conf)
        hooks_dir = load_local_settings(env, conf).hooks_dir
    except InvalidInput as exc:
        log.warning("%s: %s; gateway addresses unknown, the rest is removed", event.dev, exc)
    return backend, conf, netvm, hooks_dir


def _offline_device(nl: Netlink, given: str, vifname: str | None) -> str:
    """The device to take offline: the vifname, netback's name, or the one renamed from it."""
    for candidate in (vifname, given):
        if candidate is not None and nl.index(candidate) is not None:
            return candidate
    return nl.find_by_alias(given) or vifname or given


def _set_networks(host: KernelHost, dev: str, ipv6: bool) -> tuple[tuple[IPNetwork, ...], frozenset[str]]:
    """Networks the allowed sets hold for ``dev``, and those held for any other vif."""
    mine: list[IPNetwork] = []
    elsewhere: set[str] = set()
    families = (4, 6) if ipv6 else (4,)
    for fam in families:
        for entry in host.sets.members(ALLOWED[fam]):
            if entry.dev == dev:
                mine += parse_vm_addresses(entry.network)
            else:
                elsewhere.add(entry.network)
    return tuple(mine), frozenset(elsewhere)
