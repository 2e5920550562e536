"""Pure functions from one vif's inputs to the plan of its online or offline. No I/O.

The order of steps is the contract users know from Qubes' vif-route-qubes:
anti-spoofing is in place before the link goes up, and the gateway address
appears last, when everything it depends on exists. Plans do not depend on
the order addresses came in: networks are sorted first.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Network

from .errors import InvalidInput
from .firewall import Family, SetElement
from .model import (
    DEFAULT_GROUP,
    VIF_GROUP,
    AddressRelease,
    ConntrackPurge,
    DeviceAddress,
    HardeningHold,
    Hooks,
    IPNetwork,
    LinkFacts,
    LinkGroup,
    LinkRename,
    LinkState,
    Neighbour,
    NetvmParams,
    Plan,
    Route,
    Step,
    VmNetwork,
    dev_sysctl,
    route_metric,
)
from .plan_base import antispoof_ruleset, families_of
from .plan_nat import NatNamespace, nat_peer, plan_nat_offline, plan_nat_online
from .validation import IFNAMSIZ

#: Interface hardening (Qubes' ``harden-network-interfaces`` service).
HARDEN4 = (
    ("ipv4/accept_source_route", "0"),
    ("ipv4/accept_redirects", "0"),
    ("ipv4/secure_redirects", "0"),
    ("ipv4/send_redirects", "0"),
    ("ipv4/drop_unicast_in_l2_multicast", "1"),
)
HARDEN6 = (
    ("ipv6/accept_source_route", "-1"),
    ("ipv6/accept_redirects", "0"),
    ("ipv6/accept_ra", "0"),
    ("ipv6/accept_dad", "0"),
    ("ipv6/autoconf", "0"),
    ("ipv6/drop_unicast_in_l2_multicast", "1"),
)
#: The hardening keys whose ``conf/all`` value the kernel combines with the
#: interface's, set there too (as current Qubes does: its vif script runs
#: systemd-sysctl on 81-qubes.conf.optional with the prefixes
#: net/ipv{4,6}/conf/all besides the vif's). From include/linux/inetdevice.h:
#: send_redirects and secure_redirects are all OR interface (IN_DEV_ORCONF),
#: so the vif's 0 alone changes nothing while all is 1 (the kernel's
#: default); accept_redirects is all AND interface while the interface
#: forwards, all OR interface while it does not (IN_DEV_RX_REDIRECTS);
#: accept_source_route is all AND interface (IN_DEV_SOURCE_ROUTE). IPv6:
#: accept_source_route is min(all, interface) (net/ipv6/exthdrs.c
#: ipv6_rthdr_rcv), and duplicate address detection runs when either
#: accept_dad is 1 or more (net/ipv6/addrconf.c addrconf_dad_begin; Qubes'
#: file sets all.accept_dad=0 as "must be set system-wide"). The other keys
#: are read per interface only (drop_unicast_in_l2_multicast is all OR
#: interface, which the vif's 1 already wins).
HARDEN_ALL4 = (
    ("ipv4/accept_source_route", "0"),
    ("ipv4/accept_redirects", "0"),
    ("ipv4/secure_redirects", "0"),
    ("ipv4/send_redirects", "0"),
)
HARDEN_ALL6 = (
    ("ipv6/accept_source_route", "-1"),
    ("ipv6/accept_dad", "0"),
)
#: Current Qubes sets this on every interface: a VM must not claim addresses by unsolicited NA.
ALWAYS6 = (("ipv6/drop_unsolicited_na", "1"),)
#: The IPv4 counterpart: with proxy ARP on, the kernel learns the sender of
#: every request it answers, so a VM's gratuitous ARP naming another VM's
#: address would put that address, with the VM's MAC, in the netvm's
#: neighbour table (routing still uses the permanent entry on the right vif,
#: but nothing a VM claims belongs there).
ALWAYS4 = (("ipv4/drop_gratuitous_arp", "1"),)


@dataclass(frozen=True, slots=True)
class Mapped:
    """A VM that sees ``visible`` (and ``visible_gateway``) instead of its real address ``real``."""

    real: IPv4Address
    visible: IPv4Address
    visible_gateway: IPv4Address | None = None


@dataclass(frozen=True, slots=True)
class OnlineInputs:
    """Everything ``online`` of one vif depends on, already validated.

    ``dev`` is the final interface name (``vifname`` if set); ``rename_from``
    the name netback gave it when a rename is due. ``already_allowed`` holds
    the networks this vif's ``allowed`` elements have already: their
    conntrack entries belong to the running VM and are kept.
    ``local_addresses`` are the VM's addresses the kernel says belong to
    this netvm itself (its uplink address, say): refused.
    """

    dev: str
    domid: int
    vm: VmNetwork
    netvm: NetvmParams
    link: LinkFacts
    hooks_dir: str
    rename_from: str | None = None
    mapped: Mapped | None = None
    already_allowed: frozenset[str] = frozenset()
    local_addresses: frozenset[str] = frozenset()
    harden: bool = False
    #: ``allowed`` elements of this device that this VM does not want (left by a
    #: previous VM on a device of the same name): removed before the link goes up.
    stale: tuple[SetElement, ...] = ()


@dataclass(frozen=True, slots=True)
class OfflineInputs:
    """Everything ``offline`` of one vif depends on.

    ``networks`` are the VM's addresses: those XenStore lists and those this
    device's ``allowed`` elements hold (an ``ip`` that changed, or an earlier
    offline that did not finish, leaves no address behind).
    """

    dev: str
    domid: int
    networks: tuple[IPNetwork, ...]
    netvm: NetvmParams
    link: LinkFacts
    hooks_dir: str
    vif_type: str = "vif"
    harden: bool = False


def _is_host(net: IPNetwork) -> bool:
    return net.prefixlen == net.max_prefixlen


def _sorted(nets: tuple[IPNetwork, ...]) -> tuple[IPNetwork, ...]:
    return tuple(sorted(dict.fromkeys(nets), key=lambda n: (n.version, n)))


def _family(net: IPNetwork) -> Family:
    return 6 if net.version == 6 else 4


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


def _hardening_hold(dev: str, ipv6_in_kernel: bool) -> HardeningHold:
    keys = HARDEN_ALL4 + (HARDEN_ALL6 if ipv6_in_kernel else ())
    return HardeningHold(dev, tuple((f"net/{k.replace('/', '/conf/all/', 1)}", v) for k, v in keys))


def _check(i: OnlineInputs) -> None:
    if i.vm.ipv4 and i.netvm.gateway is None:
        raise InvalidInput("no netvm gateway configured (netvm.conf, QubesDB or XenStore qubes-netvm-gateway)")
    for net in i.vm.networks:
        if any(a in net for a in i.netvm.own_addresses):
            raise InvalidInput(f"invalid ip {net}: overlaps this netvm's own gateway or DNS addresses")
        if _is_host(net) and str(net.network_address) in i.local_addresses:
            raise InvalidInput(f"invalid ip {net}: an address of this netvm itself")


def _nat(i: OnlineInputs) -> NatNamespace | None:
    m = i.mapped
    if m is None or i.netvm.gateway is None or IPv4Network(m.real) not in i.vm.ipv4:
        return None
    nat = NatNamespace(
        i.dev, str(m.real), str(m.visible), str(m.visible_gateway or i.netvm.gateway), str(i.netvm.gateway), i.vm.mac
    )
    if len(nat_peer(i.dev)) >= IFNAMSIZ:
        raise InvalidInput(f"invalid vif {i.dev!r}: too long for a NAT namespace peer ({nat.peer})")
    return nat


def plan_online(i: OnlineInputs) -> Plan:
    """Everything ``online`` brings up for one vif, in order.

    Raises ``InvalidInput`` when the netvm has no IPv4 gateway for a VM with
    IPv4 addresses, or a VM address is one of the netvm's own.
    """
    _check(i)
    dev, link = i.dev, i.link
    vm = VmNetwork(_sorted(i.vm.networks), i.vm.mac, i.vm.vif_type)
    notes: list[str] = []
    nat = _nat(i)
    if nat is not None:
        real = IPv4Network(nat.real_ip)
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
    ipv6_on_link = link.ipv6_in_kernel and not link.ipv6_disabled

    steps: list[Step] = []
    if i.rename_from is not None and i.rename_from != dev:
        steps.append(Step("set", LinkRename(i.rename_from, dev)))
    if nat is not None:
        steps += plan_nat_online(nat)
    steps.append(Step("set", dev_sysctl("ipv4/proxy_arp", dev, "1")))
    sysctls = list(ALWAYS4) + (list(HARDEN4) if i.harden else [])
    if link.ipv6_in_kernel:
        sysctls += list(ALWAYS6) + (list(HARDEN6) if i.harden and ipv6_on_link else [])
    steps += [Step("set", dev_sysctl(k, dev, v)) for k, v in sysctls]
    if i.harden:
        steps.append(Step("add", _hardening_hold(dev, link.ipv6_in_kernel)))
    fresh = tuple(str(n.network_address) for n in hosts if str(n) not in i.already_allowed)
    if fresh:
        steps.append(Step("run", ConntrackPurge(fresh)))
    steps.append(Step("ensure", antispoof_ruleset(families_of(link.ipv6_in_kernel))))
    wanted = {SetElement(_family(n), "allowed", str(n), dev) for n in nets}
    for e in sorted(set(i.stale) - wanted):
        steps.append(Step("remove", e))
        steps.append(Step("run", AddressRelease(e.family, e.network, dev)))
    steps.append(Step("set", LinkGroup(dev, VIF_GROUP)))
    steps += [Step("add", SetElement(_family(n), "allowed", str(n), dev)) for n in nets]
    steps += [Step("add", SetElement(_family(n), "downstream", str(n))) for n in nets]
    steps += [Step("add", Neighbour(dev, str(n.network_address), vm.mac)) for n in hosts]
    steps.append(Step("set", LinkState(dev, True)))
    steps += [Step("add", Route(dev, str(n), route_metric(i.domid))) for n in nets]
    if vm.ipv4 and i.netvm.gateway is not None:
        steps.append(Step("add", DeviceAddress(dev, f"{i.netvm.gateway}/32")))
    why_not = _gateway6_applies(v6, i.netvm, link)
    if why_not is None and i.netvm.gateway6 is not None:
        steps.append(Step("set", dev_sysctl("ipv6/proxy_ndp", dev, "1")))
        steps.append(Step("add", DeviceAddress(dev, f"{i.netvm.gateway6}/128")))
    elif i.netvm.gateway6 is not None and v6:
        notes.append(f"IPv6 gateway not added: {why_not}")
    hooks = Hooks("online", dev, vm.vif_type, tuple(str(n.network_address) for n in nets), i.hooks_dir)
    return Plan("online", dev, tuple(steps), tuple(notes), hooks)


def plan_offline(i: OfflineInputs) -> Plan:
    """Everything ``offline`` removes for one vif, whatever is still there.

    IPv6 objects are listed whether or not IPv6 is enabled now: removing
    what is absent is a no-op. When the device is gone, only what outlives
    it (set elements, conntrack entries) is listed.
    """
    dev, link, netvm = i.dev, i.link, i.netvm
    networks = _sorted(i.networks)
    hosts = [n for n in networks if _is_host(n)]
    steps: list[Step] = []
    if link.exists:
        # Routes before the gateway address: the kernel flushes a device's
        # routes with its last IPv4 address, and says so by nothing.
        steps += [Step("remove", Route(dev, str(n), route_metric(i.domid))) for n in networks]
        if netvm.gateway6 is not None:
            steps.append(Step("remove", DeviceAddress(dev, f"{netvm.gateway6}/128")))
        if netvm.gateway is not None:
            steps.append(Step("remove", DeviceAddress(dev, f"{netvm.gateway}/32")))
        steps.append(Step("set", LinkState(dev, False)))
        steps += [Step("remove", Neighbour(dev, str(n.network_address), "00:00:00:00:00:00")) for n in hosts]
    # The anti-spoofing of a device that is still up stays: these two need its link down.
    down = dev if link.exists else None
    steps += [Step("remove", SetElement(_family(n), "allowed", str(n), dev), requires_down=down) for n in networks]
    if link.exists:
        steps.append(Step("set", LinkGroup(dev, DEFAULT_GROUP), requires_down=dev))
        keys = ["ipv4/proxy_arp"] + [k for k, _ in ALWAYS4] + ([k for k, _ in HARDEN4] if i.harden else [])
        if link.ipv6_in_kernel:
            keys += ["ipv6/proxy_ndp"] + [k for k, _ in ALWAYS6] + ([k for k, _ in HARDEN6] if i.harden else [])
        steps += [Step("set", dev_sysctl(k, dev, link.default(k))) for k in keys]
    # Whatever ``harden`` says now: a hold taken while it was on is let go too.
    steps.append(Step("remove", HardeningHold(dev)))
    # Last, so no packet of the VM re-creates a conntrack entry behind the purge.
    steps += [Step("run", AddressRelease(_family(n), str(n), dev)) for n in networks]
    if link.nat_namespace:
        steps += plan_nat_offline(dev)
    hooks = Hooks("offline", dev, i.vif_type, tuple(str(n.network_address) for n in networks), i.hooks_dir)
    return Plan("offline", dev, tuple(steps), hooks=hooks)
