"""Pure functions from hotplug inputs to plans. No I/O, no clients.

The order of steps is the contract users know from Qubes' vif-route-qubes:
anti-spoofing is in place before the link goes up, and the gateway address
appears last, when everything it depends on exists.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Network

from .antispoof import ALLOWED, DOWNSTREAM
from .errors import InvalidInput
from .model import (
    DEFAULT_GROUP,
    VIF_GROUP,
    AntispoofBase,
    ConntrackPurge,
    DeviceAddress,
    Hooks,
    IPNetwork,
    LinkFacts,
    LinkGroup,
    LinkRename,
    LinkState,
    NatNamespace,
    Neighbour,
    NetvmParams,
    Plan,
    Route,
    SetEntry,
    Step,
    Sysctl,
    VmNetwork,
    route_metric,
)
from .netvm_params import DEFAULT_HOOKS_DIR
from .validation import IFNAMSIZ

#: (visible address, visible gateway or None for "same as the real one").
Mapped = tuple[IPv4Address, IPv4Address | None]


def _is_host(net: IPNetwork) -> bool:
    return net.prefixlen == net.max_prefixlen


def _families(link: LinkFacts) -> tuple[int, ...]:
    return (4, 6) if link.ipv6_in_kernel else (4,)


def _gateway6_applies(vm_v6: tuple[IPv6Network, ...], netvm: NetvmParams, link: LinkFacts) -> str | None:
    """Why the IPv6 gateway is not put on this vif, or ``None`` if it is."""
    if not netvm.ipv6 or netvm.gateway6 is None:
        return "netvm IPv6 is off"
    if netvm.gateway6.is_link_local:
        return f"gateway6 {netvm.gateway6} is link-local"
    if not vm_v6:
        return "the VM has no IPv6 address"
    if link.ipv6_disabled:
        return "IPv6 is disabled on the interface"
    return None


def plan_online(
    dev: str,
    domid: int,
    vm: VmNetwork,
    netvm: NetvmParams,
    link: LinkFacts,
    rename_from: str | None = None,
    hooks_dir: str = DEFAULT_HOOKS_DIR,
    mapped: Mapped | None = None,
    already_allowed: frozenset[str] = frozenset(),
) -> Plan:
    """Everything ``online`` brings up for one vif, in order.

    ``dev`` is the final interface name (``vifname`` if set); ``rename_from``
    the name netback gave it when a rename is due; ``mapped`` the (visible
    address, visible gateway) the VM believes in for its first IPv4 address;
    ``already_allowed`` the networks this vif's set members hold already:
    their conntrack entries belong to the running VM and are kept.
    Raises ``InvalidInput`` when the netvm has no IPv4 gateway for a VM with
    IPv4 addresses.
    """
    if vm.ipv4 and netvm.gateway is None:
        raise InvalidInput("no netvm gateway configured (netvm.conf, QubesDB or XenStore qubes-netvm-gateway)")
    ours = {a for a in (netvm.gateway, netvm.gateway6, *netvm.virtual_dns) if a is not None}
    for net in vm.networks:
        if any(a in net for a in ours):
            raise InvalidInput(f"invalid ip {net}: overlaps this netvm's own gateway or DNS addresses")
    metric = route_metric(domid)
    notes: list[str] = []
    nat: NatNamespace | None = None
    if mapped is not None and vm.ipv4 and netvm.gateway is not None and _is_host(vm.ipv4[0]):
        real = vm.ipv4[0]
        visible_ip, visible_gw = mapped
        nat = NatNamespace(
            dev, str(real.network_address), str(visible_ip), str(visible_gw or netvm.gateway), str(netvm.gateway),
            vm.mac,
        )
        if len(nat.peer) >= IFNAMSIZ:
            raise InvalidInput(f"invalid vif {dev!r}: too long for a NAT namespace peer ({nat.peer})")
        dropped = [str(n) for n in vm.networks if n != real]
        if dropped:
            notes.append(f"mapped address: only {real} is configured, not {' '.join(dropped)}")
        vm = VmNetwork((real,), vm.mac, vm.vif_type)
    v6 = vm.ipv6
    if v6 and link.ipv6_disabled:
        notes.append(f"IPv6 disabled on {dev}: {' '.join(map(str, v6))} not configured")
        v6 = ()
    nets: tuple[IPNetwork, ...] = vm.ipv4 + v6
    hosts = [n for n in nets if _is_host(n)]

    steps: list[Step] = []
    if rename_from is not None and rename_from != dev:
        steps.append(Step("set", LinkRename(rename_from, dev)))
    if nat is not None:
        steps.append(Step("add", nat))
    steps.append(Step("set", Sysctl("ipv4", dev, "proxy_arp", "1")))
    steps += [Step("run", ConntrackPurge(str(n.network_address))) for n in hosts if str(n) not in already_allowed]
    steps.append(Step("run", AntispoofBase(_families(link))))
    steps.append(Step("set", LinkGroup(dev, VIF_GROUP)))
    steps += [Step("add", SetEntry(ALLOWED[n.version], str(n), dev)) for n in nets]
    steps += [Step("add", SetEntry(DOWNSTREAM[n.version], str(n))) for n in nets]
    steps += [Step("add", Neighbour(dev, str(n.network_address), vm.mac)) for n in hosts]
    steps.append(Step("set", LinkState(dev, True)))
    steps += [Step("add", Route(dev, str(n), metric)) for n in nets]
    if vm.ipv4 and netvm.gateway is not None:
        steps.append(Step("add", DeviceAddress(dev, f"{netvm.gateway}/32")))
    why_not = _gateway6_applies(v6, netvm, link)
    if why_not is None and netvm.gateway6 is not None:
        steps.append(Step("set", Sysctl("ipv6", dev, "proxy_ndp", "1")))
        steps.append(Step("add", DeviceAddress(dev, f"{netvm.gateway6}/128")))
    elif netvm.gateway6 is not None and v6:
        notes.append(f"IPv6 gateway not added: {why_not}")
    addrs = tuple(str(n.network_address) for n in nets)
    steps.append(Step("run", Hooks("online", dev, vm.vif_type, addrs, hooks_dir)))
    return Plan("online", dev, tuple(steps), tuple(notes))


def plan_offline(
    dev: str,
    domid: int,
    networks: tuple[IPNetwork, ...],
    netvm: NetvmParams,
    link: LinkFacts,
    owned_elsewhere: frozenset[str] = frozenset(),
    vif_type: str = "vif",
    hooks_dir: str = DEFAULT_HOOKS_DIR,
) -> Plan:
    """Everything ``offline`` removes for one vif, whatever is still there.

    ``networks`` are the VM's addresses (from XenStore and from this vif's
    set members); ``owned_elsewhere`` are networks another vif still uses,
    which must stay in the downstream sets. IPv6 objects are listed whether
    or not IPv6 is enabled now: removing what is absent is a no-op.
    When the device is gone, only what outlives it (set members) is listed.
    """
    metric = route_metric(domid)
    hosts = [n for n in networks if _is_host(n)]
    steps: list[Step] = []
    if link.exists:
        if netvm.gateway6 is not None:
            steps.append(Step("remove", DeviceAddress(dev, f"{netvm.gateway6}/128")))
            if link.ipv6_in_kernel:
                steps.append(Step("set", Sysctl("ipv6", dev, "proxy_ndp", link.default("ipv6/proxy_ndp"))))
        if netvm.gateway is not None:
            steps.append(Step("remove", DeviceAddress(dev, f"{netvm.gateway}/32")))
        steps += [Step("remove", Route(dev, str(n), metric)) for n in networks]
        steps.append(Step("set", LinkState(dev, False)))
        steps += [Step("remove", Neighbour(dev, str(n.network_address), "00:00:00:00:00:00")) for n in hosts]
    steps += [Step("remove", SetEntry(ALLOWED[n.version], str(n), dev)) for n in networks]
    steps += [
        Step("remove", SetEntry(DOWNSTREAM[n.version], str(n))) for n in networks if str(n) not in owned_elsewhere
    ]
    if link.exists:
        steps.append(Step("set", LinkGroup(dev, DEFAULT_GROUP)))
        steps.append(Step("set", Sysctl("ipv4", dev, "proxy_arp", link.default("ipv4/proxy_arp"))))
    if link.nat_namespace:
        steps.append(Step("remove", NatNamespace(dev)))
    if networks:
        addrs = tuple(str(n.network_address) for n in networks)
        steps.append(Step("run", Hooks("offline", dev, vif_type, addrs, hooks_dir)))
    return Plan("offline", dev, tuple(steps))


def merge_networks(*groups: tuple[IPNetwork, ...]) -> tuple[IPNetwork, ...]:
    """Union keeping first-seen order (XenStore's order first)."""
    out: list[IPNetwork] = []
    for group in groups:
        out += [n for n in group if n not in out]
    return tuple(out)

