"""Mapped ("visible") addresses: the per-vif NAT namespace, as plain steps. Pure.

In Qubes a VM normally sees the address this netvm routes for it. With the
``net.fake-ip`` feature (QubesDB ``/mapped-ip/<ip>/visible-ip`` and
``visible-gateway``) it is told another address and gateway instead, so its
real address and this netvm's own address stay hidden from it. Qubes then
puts a small namespace ``<vif>-nat`` between the two (``vif-qubes-nat.sh``)::

    VM eth0 <-> <vif> | <vif>-nat namespace | <vif>-p <-> <vif> (veth) | netvm

The netback interface moves into the namespace; a veth pair takes its name
in the netvm, so everything else (routes, anti-spoofing, neighbours) is the
ordinary plan for that name with the real address. Inside, the visible
address and the real one are translated both ways, and the visible gateway
to the netvm's gateway both ways. Only the first IPv4 address is mapped;
IPv6 is off in the namespace, so such a VM gets none.
"""

from __future__ import annotations

from dataclasses import dataclass

from .firewall import (
    PRIORITY,
    Addr,
    Chain,
    Dnat,
    Drop,
    Hook,
    IfName,
    Ruleset,
    Snat,
    Table,
    rule,
)
from .model import (
    NETBACK_MAC,
    DeviceAddress,
    LinkNetns,
    LinkState,
    Neighbour,
    Netns,
    Route,
    Step,
    Sysctl,
    Veth,
)

NAT_TABLE = "qubes-nat"


@dataclass(frozen=True, slots=True)
class NatNamespace:
    """What the namespace of one mapped vif translates."""

    dev: str
    real_ip: str
    visible_ip: str
    #: The netvm's gateway as this VM sees it, and as it really is.
    visible_gateway: str
    gateway: str
    vm_mac: str

    @property
    def netns(self) -> str:
        return nat_netns(self.dev)

    @property
    def peer(self) -> str:
        return nat_peer(self.dev)


def nat_netns(dev: str) -> str:
    return f"{dev}-nat"


def nat_peer(dev: str) -> str:
    return f"{dev}-p"


def nat_ruleset(n: NatNamespace) -> Ruleset:
    """The firewall inside the namespace."""
    vm, up = IfName("in", n.dev), IfName("in", n.peer)
    prerouting = [rule(up, Addr("dst", f"{n.real_ip}/32"), verdict=Dnat(n.visible_ip))]
    postrouting = [rule(IfName("out", n.peer), Addr("src", f"{n.visible_ip}/32"), verdict=Snat(n.real_ip))]
    if n.visible_gateway != n.gateway:
        prerouting.append(rule(vm, Addr("dst", f"{n.visible_gateway}/32"), verdict=Dnat(n.gateway)))
        postrouting.append(
            rule(IfName("out", n.dev), Addr("src", f"{n.gateway}/32"), verdict=Snat(n.visible_gateway))
        )
    table = Table(
        4,
        NAT_TABLE,
        (
            Chain(
                "antispoof",
                (rule(vm, Addr("src", f"{n.visible_ip}/32", negate=True), verdict=Drop()),),
                Hook("prerouting", "filter", PRIORITY["raw"]),
            ),
            Chain("dnat", tuple(prerouting), Hook("prerouting", "nat", PRIORITY["dstnat"])),
            Chain("snat", tuple(postrouting), Hook("postrouting", "nat", PRIORITY["srcnat"])),
        ),
    )
    return Ruleset("nat", (table,), netns=n.netns)


def plan_nat_online(n: NatNamespace) -> tuple[Step, ...]:
    """Build the namespace and move the vif in, before anything else touches ``dev``.

    Each step undoes on its own, in reverse: a failure midway takes the vif
    back out before the namespace goes.
    """
    ns = n.netns
    steps = [
        Step("add", Netns(ns)),
        # The kernel takes a device down when it changes namespace: no step for that,
        # so a repeat (our veth has the name by then) does not bounce the link.
        Step("add", LinkNetns(n.dev, ns)),
        # Our end keeps netback's MAC (a VM's gateway MAC); the peer inside
        # has the VM's, so this netvm's neighbour entry for the VM holds.
        Step("add", Veth(n.dev, NETBACK_MAC, n.peer, n.vm_mac, ns)),
        Step("set", Sysctl("net/ipv4/ip_forward", "1", ns)),
    ]
    steps += [
        Step("set", Sysctl(f"net/ipv6/conf/{scope}/disable_ipv6", "1", ns))
        for scope in ("all", "default", n.dev, n.peer)
    ]
    steps += [
        Step("set", LinkState(n.dev, True, ns)),
        Step("set", LinkState(n.peer, True, ns)),
        Step("add", DeviceAddress(n.dev, f"{n.visible_gateway}/32", ns, scope="host")),
        Step("add", DeviceAddress(n.peer, f"{n.real_ip}/32", ns, scope="host")),
        Step("add", Route(n.dev, f"{n.visible_ip}/32", netns=ns, scope="link")),
        Step("add", Route(n.peer, f"{n.gateway}/32", netns=ns, scope="link")),
        Step("add", Route(n.peer, "0.0.0.0/0", netns=ns, gateway=n.gateway)),
        Step("add", Neighbour(n.dev, n.visible_ip, n.vm_mac, ns)),
        Step("add", Neighbour(n.peer, n.gateway, NETBACK_MAC, ns)),
        Step("ensure", nat_ruleset(n)),
    ]
    return tuple(steps)


def plan_nat_offline(dev: str) -> tuple[Step, ...]:
    """Undo :func:`plan_nat_online`: our veth goes, the vif comes back, the namespace goes."""
    ns = nat_netns(dev)
    return (
        Step("remove", Veth(dev, "", nat_peer(dev), "", ns)),
        Step("remove", LinkNetns(dev, ns)),
        Step("remove", Netns(ns)),
    )
