"""One hotplug event, as a library call: read inputs, plan, apply.

No ``sys.exit``, no global state: a resident agent can call
:func:`handle_event` for event after event with its own XenStore connection
and host.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace

from .antispoof import ALLOWED
from .applier import apply_all_or_nothing, apply_best_effort
from .errors import InvalidInput, KernelError
from .locks import file_lock
from .mapped_nat import netns_exists
from .model import Hooks, IPNetwork, NatNamespace, Plan, Step
from .netvm_params import load_local_settings, load_mapped, load_netvm_params, read_conf
from .planner import merge_networks, plan_offline, plan_online
from .system import KernelHost
from .validation import parse_vm_addresses
from .xenstore_client import XenStore
from .xenstore_env import HotplugEvent, read_backend

log = logging.getLogger(__name__)

DEFAULT_LOCK = "/run/vif-hotplug.lock"
LOCK_TIMEOUT = 60.0


@dataclass(frozen=True)
class Outcome:
    plan: Plan
    changed: tuple[Step, ...]
    applied: bool


def lock_path(env: Mapping[str, str]) -> str:
    return env.get("VIF_HOTPLUG_LOCK") or DEFAULT_LOCK


def handle_event(
    event: HotplugEvent, xs: XenStore, env: Mapping[str, str], host: KernelHost, dry_run: bool = False
) -> Outcome:
    """Bring one vif online or take it offline. Idempotent.

    Everything read from XenStore is validated before the kernel is touched.
    Online is all-or-nothing; offline removes whatever it can and touches
    only this vif's objects. Raises ``HotplugError`` subclasses.
    """
    online = event.command == "online"
    backend = read_backend(xs, event.xenbus_path, require=online)
    conf = read_conf(env)
    netvm = load_netvm_params(env, xenstore=xs, conf=conf)
    hooks_dir = load_local_settings(env, conf).hooks_dir
    dev = backend.vifname or event.dev
    # Serialise with other hotplug runs: offline decides which downstream
    # addresses are still used by another vif, which must not race an online.
    with file_lock(lock_path(env), LOCK_TIMEOUT, "hotplug lock"):
        if online:
            if backend.vm is None:  # read_backend(require=True) already refuses this
                raise InvalidInput(f"{event.xenbus_path}/ip is missing")
            rename_from = event.dev if dev != event.dev and host.netlink.index(event.dev) is not None else None
            facts = host.netlink.link_facts(rename_from or dev)
            if not facts.exists:
                raise KernelError(f"device {dev} does not exist")
            vm = backend.vm
            mapped = load_mapped(env, str(vm.ipv4[0].network_address), conf) if vm.ipv4 else None
            plan = plan_online(dev, event.vif.domid, vm, netvm, facts, rename_from, hooks_dir, mapped)
        else:
            if host.netlink.index(dev) is None and host.netlink.index(event.dev) is not None:
                dev = event.dev
            facts = replace(host.netlink.link_facts(dev), nat_namespace=netns_exists(NatNamespace(dev).netns))
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
        # Hooks are the administrator's and may be slow: they run after the
        # lock is released, so they never hold up other VMs' hotplug.
        hooks = [s for s in plan.steps if isinstance(s.target, Hooks)]
        kernel_part = replace(plan, steps=tuple(s for s in plan.steps if s not in hooks))
        apply = apply_all_or_nothing if online else apply_best_effort
        changed = apply(kernel_part, host)
    for step in hooks:
        host.run(step.target)  # type: ignore[arg-type]
    return Outcome(plan, tuple(changed), applied=True)


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
