"""Mapped ("visible") addresses: a per-vif NAT namespace between VM and netvm.

When the address a VM believes it has (``visible-ip``, e.g. the same
10.138.x.y for every disposable VM) differs from the one this netvm routes
(XenStore ``ip``), Qubes puts a small namespace ``<vif>-nat`` in between::

    VM eth0 <-> <vif> | <vif>-nat namespace | <vif>-p <-> <vif> (veth) | netvm

The netback interface moves into the namespace; a veth pair takes its name
in the netvm, so everything else (routes, anti-spoofing, neighbours) is the
ordinary plan for that name with the real address. Inside, the real address
and the visible one are translated both ways, and the visible gateway both
ways to the real one. Only the first IPv4 address is mapped; IPv6 is off in
the namespace, so such a VM gets none.

Work inside the namespace happens in a forked child that entered it: the
caller's sockets, and python-iptables' per-process table cache, stay bound
to the caller's namespace.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import TypeVar

from .errors import DeviceGone, KernelError
from .firewall import ChainSpec, Hook, Rule, Ruleset
from .forked import call_in_child
from .model import NatNamespace
from .netlink import NUD_PERMANENT
from .sysctl import swap_sysctl

T = TypeVar("T")

NETBACK_MAC = "fe:ff:ff:ff:ff:ff"
RT_SCOPE_LINK = 253
RT_SCOPE_HOST = 254
NETNS_DIR = "/run/netns"


def nat_ruleset(n: NatNamespace) -> Ruleset:
    """The firewall inside the namespace. Pure."""
    prerouting = [f"-i {n.peer} -d {n.real_ip}/32 -j DNAT --to-destination {n.visible_ip}"]
    postrouting = [f"-o {n.peer} -s {n.visible_ip}/32 -j SNAT --to-source {n.real_ip}"]
    if n.visible_gateway != n.gateway:
        prerouting.append(f"-i {n.dev} -d {n.visible_gateway}/32 -j DNAT --to-destination {n.gateway}")
        postrouting.append(f"-o {n.dev} -s {n.gateway}/32 -j SNAT --to-source {n.visible_gateway}")
    return Ruleset(
        chains=(
            ChainSpec(4, "raw", "QBS-NAT-ANTISPOOF", (Rule(f"-i {n.dev} ! -s {n.visible_ip}/32 -j DROP"),)),
            ChainSpec(4, "nat", "QBS-NAT-PRE", tuple(Rule(r) for r in prerouting)),
            ChainSpec(4, "nat", "QBS-NAT-POST", tuple(Rule(r) for r in postrouting)),
        ),
        hooks=(
            Hook(4, "raw", "PREROUTING", Rule("-j QBS-NAT-ANTISPOOF")),
            Hook(4, "nat", "PREROUTING", Rule("-j QBS-NAT-PRE")),
            Hook(4, "nat", "POSTROUTING", Rule("-j QBS-NAT-POST")),
        ),
    )


def netns_exists(name: str) -> bool:
    return os.path.exists(os.path.join(NETNS_DIR, name))


def call_in_netns(name: str, fn: Callable[[int], T]) -> T:
    """``fn(caller_ns_fd)`` in a forked child inside namespace ``name``.

    The fd of the caller's namespace lets the child move devices back.
    Raises :class:`KernelError` for anything that fails in the child.
    """
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        return call_in_child(lambda: fn(home), netns=name, what=f"in namespace {name}")
    finally:
        os.close(home)


def _configure_inside(n: NatNamespace) -> None:
    """Addresses, routes, neighbours, sysctls and firewall inside the namespace (child only)."""
    from pyroute2 import IPRoute

    from .iptables_backend import IptablesFirewall

    swap_sysctl("/proc/sys/net/ipv4/ip_forward", "1")
    for scope in ("all", "default", n.dev, n.peer):
        if os.path.exists(f"/proc/sys/net/ipv6/conf/{scope}/disable_ipv6"):
            swap_sysctl(f"/proc/sys/net/ipv6/conf/{scope}/disable_ipv6", "1")
    with IPRoute() as ipr:
        vm_side = ipr.link_lookup(ifname=n.dev)[0]
        up_side = ipr.link_lookup(ifname=n.peer)[0]
        ipr.link("set", index=vm_side, state="up")
        ipr.link("set", index=up_side, state="up")
        ipr.addr("replace", index=vm_side, address=n.visible_gateway, prefixlen=32, scope=RT_SCOPE_HOST)
        ipr.addr("replace", index=up_side, address=n.real_ip, prefixlen=32, scope=RT_SCOPE_HOST)
        ipr.route("replace", dst=f"{n.visible_ip}/32", oif=vm_side, scope=RT_SCOPE_LINK)
        ipr.route("replace", dst=f"{n.gateway}/32", oif=up_side, scope=RT_SCOPE_LINK)
        ipr.route("replace", dst="0.0.0.0/0", gateway=n.gateway, oif=up_side)
        ipr.neigh("replace", dst=n.visible_ip, lladdr=n.vm_mac, ifindex=vm_side, state=NUD_PERMANENT)
        ipr.neigh("replace", dst=n.gateway, lladdr=NETBACK_MAC, ifindex=up_side, state=NUD_PERMANENT)
    IptablesFirewall().sync(nat_ruleset(n))


def _index_inside(name: str) -> int | None:
    """Child: ifindex of ``name`` in the namespace, or ``None``."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        return int(found[0]) if found else None


def _both_inside(n: NatNamespace) -> bool:
    """Child: the vif and our veth peer are both in the namespace."""
    return _index_inside(n.dev) is not None and _index_inside(n.peer) is not None


def _configured(n: NatNamespace) -> bool:
    return call_in_netns(n.netns, lambda home: _both_inside(n))


def create(n: NatNamespace) -> bool:
    """Build the namespace and move the vif in; ``False`` if it is already in place.

    Raises ``DeviceGone`` when the vif is missing, ``KernelError`` otherwise;
    a half-built namespace is torn down before the error is raised.
    """
    from pyroute2 import IPRoute, netns
    from pyroute2.netlink.exceptions import NetlinkError

    if netns_exists(n.netns):
        if _configured(n):
            return False
        destroy(n)  # a leftover from a crash: start clean
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=n.dev)
        if not found:
            raise DeviceGone(f"cannot build {n}: device {n.dev} does not exist")
        try:
            netns.create(n.netns)
            ipr.link("set", index=found[0], state="down")
            ipr.link("set", index=found[0], net_ns_fd=n.netns)
            ipr.link(
                "add", ifname=n.dev, kind="veth", address=NETBACK_MAC,
                peer={"ifname": n.peer, "address": n.vm_mac, "net_ns_fd": n.netns},
            )
        except (NetlinkError, OSError) as exc:
            destroy(n)
            raise KernelError(f"cannot build {n}: {exc}") from exc
    try:
        call_in_netns(n.netns, lambda home: _configure_inside(n))
    except KernelError:
        destroy(n)
        raise
    return True


def _evacuate(n: NatNamespace, home_fd: int) -> bool:
    """Child: move the netback vif back to the caller's namespace; ``True`` if it was there."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=n.dev)
        if not found:
            return False
        ipr.link("set", index=found[0], state="down")
        ipr.link("set", index=found[0], net_ns_fd=home_fd)
        return True


def destroy(n: NatNamespace) -> bool:
    """Undo :func:`create`: the vif back where it was, veth and namespace gone. Idempotent."""
    from pyroute2 import IPRoute, netns
    from pyroute2.netlink.exceptions import NetlinkError

    if not netns_exists(n.netns):
        return False
    peer = call_in_netns(n.netns, lambda home: _index_inside(n.peer))
    with IPRoute() as ipr:
        # While the vif is inside, our veth end carries its name here; only
        # the one whose peer is in the namespace is ours to delete.
        for idx in ipr.link_lookup(ifname=n.dev):
            link = ipr.get_links(idx)[0]
            ours = link.get_attr("IFLA_LINK") == peer and link.get_attr("IFLA_LINK_NETNSID") is not None
            if peer is not None and ours:
                try:
                    ipr.link("del", index=idx)
                except NetlinkError as exc:
                    if exc.code != errno.ENODEV:
                        raise KernelError(f"cannot remove {n}: {exc}") from exc
    call_in_netns(n.netns, lambda home: _evacuate(n, home))
    try:
        netns.remove(n.netns)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise KernelError(f"cannot remove namespace {n.netns}: {exc}") from exc
    return True
