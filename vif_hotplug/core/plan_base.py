"""The netvm's firewall, as current Qubes lays it out (``../shared/README.md`` §7). Pure.

Per family, in table ``qubes``:

* anti-spoofing (:func:`antispoof_ruleset`; every ``online`` ensures it):
  ``prerouting`` (raw priority) sends packets from VM interfaces (group 2)
  to ``antispoof``, which accepts (interface, source) pairs in ``allowed``
  and drops the rest; a packet from an interface named like a vif outside
  group 2 is dropped; any other packet with a source in ``downstream`` or
  ``connected`` is dropped. ``downstream-out`` drops packets that would
  leave through a non-VM interface towards a ``downstream`` or ``connected``
  address (a VM's address is never routed out of the uplink: not while its
  route is missing, not during its offline, not while it is switched off).
  Per-vif work only adds and removes set elements.
* the rest (:func:`base_ruleset`; ``init``): ``postrouting`` (NAT at every
  hop: accept towards VMs and ``lo``, masquerade the rest), ``input``
  (policy drop) and ``forward`` (policy accept: only new connections
  *towards* VMs are dropped, so containers, VPNs and hotspots inside the
  netvm keep working), both jumping first to the administrator's
  ``custom-input`` / ``custom-forward``, which are created when missing and
  never edited.

Established traffic is accepted after the fewest checks: ``forward`` and
``input`` test conntrack state right after the administrator's chain, and
the anti-spoofing chains are a set lookup each. What each check costs a
forwarded packet, measured, and why none of them runs after a conntrack
shortcut: ``docs/performance.md``. A set lookup costs about ten address
comparisons (``benchmarks/ablate_throughput.py``, calibration rows): a rule
list of two to four comparisons, as the DNS guard's, is cheaper than one
lookup in a set of them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .firewall import (
    PRIORITY,
    SET_NAMES,
    Accept,
    Addr,
    Chain,
    CtState,
    DPort,
    Drop,
    Family,
    FlowOffload,
    FlowtableDevice,
    Goto,
    Hook,
    IcmpType,
    IfGroup,
    IfName,
    InSet,
    Jump,
    Masquerade,
    Proto,
    Reject,
    Ruleset,
    Table,
    merge,
    rule,
)
from .model import VIF_GROUP, Step, Sysctl

TABLE = "qubes"
CUSTOM_INPUT = "custom-input"
CUSTOM_FORWARD = "custom-forward"
#: Qubes 4.0's reserved nat chain for the administrator's port forwards; the
#: iptables layout keeps it, the nftables layout of current Qubes has none.
SERVICES = "services"

#: ICMPv6 router advertisement and redirect (RFC 4861): a VM must not become
#: the netvm's router or redirect its traffic.
ICMP6_ROUTER_ADVERTISEMENT = 134
ICMP6_REDIRECT = 137
DHCP_CLIENT_PORT = 68
DHCP6_CLIENT_PORT = 546
LINK_LOCAL6 = "fe80::/64"

FROM_VM = IfGroup("in", VIF_GROUP)
TO_VM = IfGroup("out", VIF_GROUP)
#: netback's names (``vifD.N``; a trailing ``*`` is a prefix match in every backend).
VIF_NAMES = "vif*"
FROM_LO = IfName("in", "lo", by_index=True)
TO_LO = IfName("out", "lo", by_index=True)
INVALID = rule(CtState(("invalid",)), verdict=Drop(), counter=True)
ESTABLISHED = rule(CtState(("established", "related")), verdict=Accept())


def families_of(ipv6_in_kernel: bool) -> tuple[Family, ...]:
    return (4, 6) if ipv6_in_kernel else (4,)


def antispoof_table(family: Family) -> Table:
    return Table(
        family,
        TABLE,
        chains=(
            Chain(
                "prerouting",
                (
                    rule(FROM_VM, verdict=Goto("antispoof")),
                    # A VM interface that left group 2 while still up (a failed
                    # link-down) must not pass as an uplink.
                    rule(IfName("in", VIF_NAMES), verdict=Drop(), counter=True),
                    rule(InSet("downstream"), verdict=Drop(), counter=True),
                    rule(InSet("connected"), verdict=Drop(), counter=True),
                ),
                Hook("prerouting", "filter", PRIORITY["raw"]),
            ),
            Chain("antispoof", (rule(InSet("allowed"), verdict=Accept()), rule(verdict=Drop(), counter=True))),
            Chain(
                "downstream-out",
                (
                    # Towards a VM interface first: the replies to every VM's connections
                    # leave after one comparison (an accept ends only this chain).
                    rule(TO_VM, verdict=Accept()),
                    # Towards a VM's address only through a VM interface: not out of the
                    # uplink while its route is missing or going (offline), nor for a
                    # switched-off VM of this netvm (connected).
                    rule(InSet("downstream", "dst"), verdict=Drop(), counter=True),
                    rule(InSet("connected", "dst"), verdict=Drop(), counter=True),
                ),
                Hook("postrouting", "filter", PRIORITY["raw"]),
            ),
        ),
        sets=SET_NAMES,
    )


def antispoof_ruleset(families: tuple[Family, ...]) -> Ruleset:
    """The constant anti-spoofing chains and sets every vif relies on."""
    return Ruleset("antispoof", tuple(antispoof_table(f) for f in families))


def _postrouting() -> Chain:
    return Chain(
        "postrouting",
        (rule(TO_VM, verdict=Accept()), rule(TO_LO, verdict=Accept()), rule(verdict=Masquerade())),
        Hook("postrouting", "nat", PRIORITY["srcnat"]),
    )


def _forward() -> Chain:
    return Chain(
        "forward",
        (rule(verdict=Jump(CUSTOM_FORWARD)), INVALID, ESTABLISHED, rule(TO_VM, verdict=Drop(), counter=True)),
        Hook("forward", "filter", PRIORITY["filter"]),
    )


def _input4() -> Chain:
    return Chain(
        "input",
        (
            rule(verdict=Jump(CUSTOM_INPUT)),
            INVALID,
            # A VM's DHCP traffic: nothing here serves it.
            rule(FROM_VM, DPort("udp", DHCP_CLIENT_PORT), verdict=Drop(), counter=True),
            ESTABLISHED,
            rule(FROM_VM, Proto("icmp"), verdict=Accept()),
            rule(FROM_LO, verdict=Accept()),
            rule(FROM_VM, verdict=Reject("icmp-host-prohibited"), counter=True),
            rule(counter=True),
        ),
        Hook("input", "filter", PRIORITY["filter"], "drop"),
    )


def _icmpv6() -> Chain:
    return Chain(
        "_icmpv6",
        (
            rule(Proto("icmpv6", negate=True), verdict=Reject("icmp6-adm-prohibited"), counter=True),
            rule(IcmpType((ICMP6_ROUTER_ADVERTISEMENT, ICMP6_REDIRECT)), verdict=Drop(), counter=True),
            rule(verdict=Accept()),
        ),
    )


def _input6() -> Chain:
    return Chain(
        "input",
        (
            rule(verdict=Jump(CUSTOM_INPUT)),
            INVALID,
            ESTABLISHED,
            rule(FROM_VM, verdict=Goto("_icmpv6")),
            rule(FROM_LO, verdict=Accept()),
            # DHCPv6 replies to the netvm's own uplink client: the request went
            # to a multicast group, so conntrack never sees them as replies.
            rule(Addr("src", LINK_LOCAL6), Addr("dst", LINK_LOCAL6), DPort("udp", DHCP6_CLIENT_PORT),
                 verdict=Accept()),
            rule(Proto("icmpv6"), verdict=Accept()),
            rule(counter=True),
        ),
        Hook("input", "filter", PRIORITY["filter"], "drop"),
    )


def _reserved() -> tuple[Chain, ...]:
    return (
        Chain(CUSTOM_INPUT, kind="reserved"),
        Chain(CUSTOM_FORWARD, kind="reserved"),
        Chain(SERVICES, hook=Hook("prerouting", "nat", PRIORITY["dstnat"] + 1), kind="reserved"),
    )


def _open_table(family: Family) -> Table:
    """A family this netvm forwards and NATs."""
    chains = [*_reserved(), _postrouting(), _forward()]
    if family == 4:
        chains.append(_input4())
    else:
        chains += [_icmpv6(), _input6()]
    return Table(family, TABLE, tuple(chains))


def _closed_input6() -> Chain:
    """IPv6 off: the netvm's own IPv6 on its other interfaces as with it on, nothing from VMs.

    Current Qubes loads its whole ``qubes-ipv6.nft`` whether or not the netvm
    forwards IPv6 (``network/qubes-iptables`` compares ``$ipt`` with
    ``ip6tables`` where it passes ``ipv6``, so ``qubes-ipv6-disabled.nft`` is
    never chosen): a sys-net whose uplink has native IPv6 keeps neighbour
    discovery, router advertisements and its DHCPv6 client there (Qubes issue
    9903). Only what comes from VM interfaces is dropped here, before the
    conntrack shortcut, so no VM reaches the netvm over IPv6 at all.
    """
    return Chain(
        "input",
        (
            rule(verdict=Jump(CUSTOM_INPUT)),
            INVALID,
            rule(FROM_VM, verdict=Drop(), counter=True),
            ESTABLISHED,
            rule(FROM_LO, verdict=Accept()),
            rule(Addr("src", LINK_LOCAL6), Addr("dst", LINK_LOCAL6), DPort("udp", DHCP6_CLIENT_PORT),
                 verdict=Accept()),
            rule(Proto("icmpv6"), verdict=Accept()),
            rule(counter=True),
        ),
        Hook("input", "filter", PRIORITY["filter"], "drop"),
    )


def _closed_table6() -> Table:
    """IPv6 off: nothing is forwarded and VMs reach nothing; the netvm's own uplink IPv6 works."""
    return Table(
        6,
        TABLE,
        (
            Chain(CUSTOM_INPUT, kind="reserved"),
            _closed_input6(),
            Chain("forward", (rule(counter=True),), Hook("forward", "filter", PRIORITY["filter"], "drop")),
            # Left from a time IPv6 was on: gone, so nothing is NATed or special-cased.
            Chain("postrouting", kind="absent"),
            Chain("_icmpv6", kind="absent"),
        ),
    )


def base_ruleset(ipv6: bool, ipv6_in_kernel: bool = True) -> Ruleset:
    """The whole firewall ``init`` installs: anti-spoofing plus NAT, input and forward.

    ``ipv6``: the netvm forwards IPv6; when off, ip6 forwarding is dropped,
    nothing from a VM interface is accepted, and the netvm's own IPv6 on its
    other interfaces is filtered as with IPv6 on. ``ipv6_in_kernel``: when false nothing
    ip6 is planned (the kernel has no ip6 firewall).
    """
    parts = [antispoof_ruleset(families_of(ipv6_in_kernel)), Ruleset("", (_open_table(4),))]
    if ipv6_in_kernel:
        parts.append(Ruleset("", (_open_table(6) if ipv6 else _closed_table6(),)))
    return merge("base", *parts)


@dataclass(frozen=True, slots=True)
class BasePlan:
    steps: tuple[Step, ...]
    notes: tuple[str, ...] = ()


def plan_base(ipv6: bool, ipv6_in_kernel: bool = True, forwarding: bool = True) -> BasePlan:
    """Firewall first (fail closed), then forwarding on.

    IPv6 forwarding is only ever switched on here, never off: with IPv6 off
    the ip6 forward policy already drops everything, and the sysctl may
    matter to something else on this machine (``stop`` switches it off).

    ``forwarding`` false (a Qubes VM): the sysctls are left to Qubes'
    ``qubes-network.service`` (``network-proxy-setup.sh``), which systemd
    starts after ``qubes-firewall.service`` (``Before=qubes-network.service``
    in the firewall's unit), so no VM is forwarded before the firewall
    service's per-VM drop policy exists.
    """
    steps = [Step("ensure", base_ruleset(ipv6, ipv6_in_kernel))]
    notes: list[str] = []
    if forwarding:
        steps.append(Step("set", Sysctl("net/ipv4/ip_forward", "1")))
    else:
        notes.append("forwarding left to Qubes' qubes-network.service (it starts after qubes-firewall.service)")
    if not ipv6_in_kernel:
        notes.append("the kernel has no IPv6: nothing ip6 planned")
    elif ipv6 and forwarding:
        steps.append(Step("set", Sysctl("net/ipv6/conf/all/forwarding", "1")))
    elif not ipv6:
        notes.append("netvm IPv6 is off: ip6 forwarding dropped, nothing from VMs, the netvm's own IPv6 "
                     "elsewhere as current Qubes")
    return BasePlan(tuple(steps), tuple(notes))


#: Current Qubes' flow offload (qubes-core-agent-linux ``network/vif-route-qubes``, at every
#: online): table ``inet qubes-nat-accel``, flowtable ``qubes-accel`` at ingress, and chain
#: ``qubes-accel`` at forward priority filter + 5 ("run after other filter hooks"), offloading TCP
#: and UDP from VM interfaces (group 2) out of group 1, the group Qubes' ``network/setup-ip``
#: gives the netvm's own uplink ``eth0``. Qubes' chain also ends with a ``counter`` of every
#: forwarded packet, which nothing reads: left out.
ACCEL_TABLE = "qubes-nat-accel"
ACCEL_FLOWTABLE = "qubes-accel"
UPLINK_GROUP = 1


def flow_offload(devices: Iterable[str]) -> FlowOffload:
    """The flowtable over ``devices`` (sorted, each once) and the chain that offloads VM-to-uplink flows."""
    return FlowOffload(ACCEL_TABLE, ACCEL_FLOWTABLE, tuple(sorted(set(devices))), VIF_GROUP, UPLINK_GROUP,
                       PRIORITY["filter"] + 5)


def flowtable_device(dev: str) -> FlowtableDevice:
    return FlowtableDevice(dev, ACCEL_TABLE, ACCEL_FLOWTABLE)


@dataclass(frozen=True, slots=True)
class OffloadPlan:
    """What ``init`` does about flow offload: the step (``None``: nothing) and the line it logs once."""

    step: Step | None
    note: str


def plan_flow_offload(missing: str | None, vifs: Iterable[str], uplinks: Iterable[str]) -> OffloadPlan:
    """Flow offload over the VM interfaces and uplinks there are now, when the kernel has flowtables.

    ``missing`` is why the kernel cannot have one (``None``: it can). Only
    these two groups' interfaces are hooked: a flowtable's ingress hook
    costs every packet of its device something, and only flows from group 2
    out of group 1 are offloaded. Vifs that come later are added by their
    online (:func:`flowtable_device`).
    """
    if missing is not None:
        return OffloadPlan(None, f"no flow offload: {missing}; every packet takes the netfilter path")
    devices = [*vifs, *uplinks]
    return OffloadPlan(Step("ensure", flow_offload(devices)),
                       f"flow offload: flowtable inet {ACCEL_TABLE} {ACCEL_FLOWTABLE} over {len(set(devices))} "
                       f"interface(s) for TCP/UDP from group {VIF_GROUP} out of group {UPLINK_GROUP}")


def plan_stop(ipv6_in_kernel: bool = True) -> tuple[Step, ...]:
    """What stopping the netvm's networking does: forwarding off, as Qubes' network stop does."""
    steps = [Step("set", Sysctl("net/ipv4/ip_forward", "0"))]
    if ipv6_in_kernel:
        steps.append(Step("set", Sysctl("net/ipv6/conf/all/forwarding", "0")))
    return tuple(steps)

