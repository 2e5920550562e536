"""Plain data: hotplug inputs, the kernel objects a plan is made of, and plans.

Everything here is a frozen, slotted dataclass that
compares by value, so plans can be compared in tests, printed for
``--dry-run`` and checked against the kernel by ``status`` without touching
anything.

A kernel object names the network namespace it lives in (``netns``; ``None``
is the caller's own): the NAT namespace of a mapped vif is built from the
same objects as the netvm itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from .firewall import FlowOffload, FlowtableDevice, Ruleset, SetElement

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

#: Highest domid Xen hands out to a guest (DOMID_FIRST_RESERVED - 1) and the
#: base of the route metric: later domains get lower metrics and so win when
#: a restarted VM briefly owns an address twice.
MAX_DOMID = 32752

#: Interface group of VM interfaces (Qubes 4.2 uses 2 for vifs, 1 for
#: uplinks). Firewall rules match on it, so a ``vifname`` rename does not
#: open a hole the way a ``vif+`` name wildcard would.
VIF_GROUP = 2
DEFAULT_GROUP = 0

#: netback's fixed MAC on the backend end of every vif (the VM's gateway MAC).
NETBACK_MAC = "fe:ff:ff:ff:ff:ff"


def route_metric(domid: int) -> int:
    return MAX_DOMID - domid


@dataclass(frozen=True, slots=True)
class VmNetwork:
    """What XenStore says about the VM behind one vif (already validated).

    ``networks`` is empty for a VM without addresses (``ip`` key empty):
    its vif comes up with nothing allowed, so every packet from it is dropped.
    """

    networks: tuple[IPNetwork, ...]
    mac: str
    vif_type: str = "vif"

    @property
    def ipv4(self) -> tuple[IPv4Network, ...]:
        return tuple(n for n in self.networks if isinstance(n, IPv4Network))

    @property
    def ipv6(self) -> tuple[IPv6Network, ...]:
        return tuple(n for n in self.networks if isinstance(n, IPv6Network))


@dataclass(frozen=True, slots=True)
class NetvmParams:
    """Addresses this driver domain presents to its VMs."""

    gateway: IPv4Address | None = None
    gateway6: IPv6Address | None = None
    primary_dns: IPv4Address | None = None
    secondary_dns: IPv4Address | None = None
    #: ``None`` means "on exactly when gateway6 is set".
    ipv6_override: bool | None = None
    source: str = "defaults"

    @property
    def ipv6(self) -> bool:
        if self.ipv6_override is not None:
            return self.ipv6_override and self.gateway6 is not None
        return self.gateway6 is not None

    @property
    def virtual_dns(self) -> tuple[IPv4Address, ...]:
        return tuple(dict.fromkeys(a for a in (self.primary_dns, self.secondary_dns) if a is not None))

    @property
    def own_addresses(self) -> tuple[IPAddress, ...]:
        return tuple(a for a in (self.gateway, self.gateway6, *self.virtual_dns) if a is not None)


#: Per-interface sysctls offline restores to what a new interface gets
#: (``conf/default``); every key a plan may change on a vif is here.
RESTORED_SYSCTLS: tuple[str, ...] = (
    "ipv4/proxy_arp",
    "ipv4/drop_gratuitous_arp",
    "ipv6/proxy_ndp",
    "ipv6/drop_unsolicited_na",
    "ipv4/accept_source_route",
    "ipv4/accept_redirects",
    "ipv4/secure_redirects",
    "ipv4/send_redirects",
    "ipv4/drop_unicast_in_l2_multicast",
    "ipv6/accept_source_route",
    "ipv6/accept_redirects",
    "ipv6/accept_ra",
    "ipv6/accept_dad",
    "ipv6/autoconf",
    "ipv6/drop_unicast_in_l2_multicast",
)


@dataclass(frozen=True, slots=True)
class LinkFacts:
    """What the kernel says about the vif right now; gathered before planning."""

    exists: bool
    #: IPv6 off on this interface (``disable_ipv6``) or in the whole kernel.
    ipv6_disabled: bool = False
    #: The kernel has IPv6 at all (``ipv6.disable=1`` removes it).
    ipv6_in_kernel: bool = True
    #: A NAT namespace for this vif exists (it has a mapped address).
    nat_namespace: bool = False
    #: The interface group the device is in now (a new netback device is in group 0).
    group: int = DEFAULT_GROUP
    #: ``conf/default`` values of :data:`RESTORED_SYSCTLS`, as ``("ipv4/proxy_arp", "0")``.
    sysctl_defaults: tuple[tuple[str, str], ...] = (("ipv4/proxy_arp", "0"), ("ipv6/proxy_ndp", "0"))

    def default(self, key: str) -> str:
        return dict(self.sysctl_defaults).get(key, "0")


@dataclass(frozen=True, slots=True)
class AddressRoute:
    """Where the kernel would send ``address`` now: what tells a VM address that is someone else's."""

    address: str
    #: The address is this netvm's own (a local route).
    local: bool = False
    #: The device of the matching route, its alias and whether it is a VM interface (group 2).
    dev: str | None = None
    alias: str | None = None
    vm_interface: bool = False
    #: The matching route has no gateway: ``address`` is on ``dev``'s own link.
    on_link: bool = False
    prefixlen: int = 0


# --- kernel objects ------------------------------------------------------------


def _in(netns: str | None) -> str:
    return f" (netns {netns})" if netns else ""


@dataclass(frozen=True, slots=True)
class Sysctl:
    """``/proc/sys/<key>``, e.g. ``net/ipv4/conf/vif4.0/proxy_arp``."""

    key: str
    value: str
    netns: str | None = None

    def with_value(self, value: str) -> Sysctl:
        return Sysctl(self.key, value, self.netns)

    @property
    def dev(self) -> str | None:
        """The interface of a per-interface key (``None`` for global ones)."""
        parts = self.key.split("/")
        if len(parts) == 5 and parts[0] == "net" and parts[2] == "conf" and parts[3] not in ("all", "default"):
            return parts[3]
        return None

    def __str__(self) -> str:
        return f"sysctl {self.key.replace('/', '.')}={self.value}{_in(self.netns)}"


@dataclass(frozen=True, slots=True)
class HardeningHold:
    """Vif ``dev`` holds the netvm-wide side of its hardening.

    Each ``(key, value)`` of ``keys`` (``net/ipv4/conf/all/send_redirects``,
    ``0``) is a ``conf/all`` sysctl the kernel combines with the interface's
    own: it is set while any vif holds it, and when the last holder lets go
    it is put back, only where this package changed it and nobody changed it
    since. A removal carries no keys: it puts back what was recorded.
    """

    dev: str
    keys: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        if not self.keys:
            return f"hardening hold of {self.dev} (conf/all put back when it is the last)"
        return f"hardening hold of {self.dev}: " + ", ".join(f"{k.replace('/', '.')}={v}" for k, v in self.keys)


def dev_sysctl(key: str, dev: str, value: str, netns: str | None = None) -> Sysctl:
    """``key`` as in :data:`RESTORED_SYSCTLS` (``ipv4/proxy_arp``) on interface ``dev``."""
    family, name = key.split("/")
    return Sysctl(f"net/{family}/conf/{dev}/{name}", value, netns)


@dataclass(frozen=True, slots=True)
class LinkRename:
    dev: str
    new_name: str

    def __str__(self) -> str:
        return f"link {self.dev} rename to {self.new_name}"


@dataclass(frozen=True, slots=True)
class LinkGroup:
    dev: str
    group: int
    netns: str | None = None

    def __str__(self) -> str:
        return f"link {self.dev} group {self.group}{_in(self.netns)}"


@dataclass(frozen=True, slots=True)
class LinkState:
    dev: str
    up: bool
    netns: str | None = None

    def __str__(self) -> str:
        return f"link {self.dev} {'up' if self.up else 'down'}{_in(self.netns)}"


@dataclass(frozen=True, slots=True)
class Neighbour:
    """Permanent neighbour entry: pins the VM's MAC (no ARP/NDP poisoning)."""

    dev: str
    address: str
    mac: str
    netns: str | None = None

    def __str__(self) -> str:
        return f"neighbour {self.address} lladdr {self.mac} dev {self.dev} permanent{_in(self.netns)}"


@dataclass(frozen=True, slots=True)
class Route:
    dev: str
    destination: str
    metric: int = 0
    netns: str | None = None
    gateway: str | None = None
    #: ``link`` for an on-link route; ``None`` lets the kernel choose.
    scope: Literal["link"] | None = None

    def __str__(self) -> str:
        via = f" via {self.gateway}" if self.gateway else ""
        scope = f" scope {self.scope}" if self.scope else ""
        metric = f" metric {self.metric}" if self.metric else ""
        return f"route {self.destination}{via} dev {self.dev}{metric}{scope}{_in(self.netns)}"


@dataclass(frozen=True, slots=True)
class DeviceAddress:
    dev: str
    address: str  # "10.137.0.1/32"
    netns: str | None = None
    #: ``host`` keeps the address off the wire (the NAT namespace's own ends).
    scope: Literal["host"] | None = None

    def __str__(self) -> str:
        scope = f" scope {self.scope}" if self.scope else ""
        return f"address {self.address} dev {self.dev}{scope}{_in(self.netns)}"


@dataclass(frozen=True, slots=True)
class Netns:
    """A named network namespace (``/run/netns/<name>``)."""

    name: str

    def __str__(self) -> str:
        return f"netns {self.name}"


@dataclass(frozen=True, slots=True)
class LinkNetns:
    """Device ``dev`` of the caller's namespace lives in namespace ``target`` (same name)."""

    dev: str
    target: str

    def __str__(self) -> str:
        return f"link {self.dev} moved into netns {self.target}"


@dataclass(frozen=True, slots=True)
class Veth:
    """A veth pair: ``dev`` here, ``peer`` in namespace ``peer_netns``."""

    dev: str
    mac: str
    peer: str
    peer_mac: str
    peer_netns: str

    def __str__(self) -> str:
        return f"veth {self.dev} ({self.mac}) peer {self.peer} ({self.peer_mac}) in netns {self.peer_netns}"


@dataclass(frozen=True, slots=True)
class ConntrackPurge:
    """Conntrack entries whose original or reply tuple has one of ``addresses`` are deleted.

    One step for all of an event's addresses: the kernel walks its whole
    conntrack table for every listing, so they are found in one pass."""

    addresses: tuple[str, ...]

    def __str__(self) -> str:
        return f"conntrack entries from or to {', '.join(self.addresses)} purged"


@dataclass(frozen=True, slots=True)
class AddressRelease:
    """``network`` left ``dev``: its ``downstream`` element and conntrack entries go,
    unless another VM interface still routes it (a restarted VM already on its
    new vif keeps both). Decided when applied, after this vif's routes are gone:
    one route lookup, whatever the number of VMs."""

    family: Literal[4, 6]
    network: str
    dev: str

    def __str__(self) -> str:
        return f"release {self.network} of {self.dev} (downstream element, conntrack) unless another vif routes it"


@dataclass(frozen=True, slots=True)
class KernelModule:
    """A kernel module to load (``modprobe``): planned only when the kernel has it and nothing loaded it."""

    name: str

    def __str__(self) -> str:
        return f"kernel module {self.name} loaded"


@dataclass(frozen=True, slots=True)
class Hooks:
    """The administrator's hook scripts for one event (run after the status is reported)."""

    command: str
    dev: str
    vif_type: str
    #: One run per address; empty means one run without an address argument.
    addresses: tuple[str, ...]
    directory: str
    #: The event's own variables the hooks see (``vif``, ``XENBUS_PATH``, ``XENSTORED_PATH``), beside
    #: a fixed ``PATH``; nothing else of whoever ran the event (:mod:`vif_hotplug.app.hooks`).
    environment: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        args = " ".join((self.command, self.dev, self.vif_type, *self.addresses))
        return f"hooks in {self.directory}: {args}"


Op = Literal["add", "remove", "set", "ensure", "run"]


@dataclass(frozen=True, slots=True)
class Step:
    """One change: ``add``/``remove`` an object, ``set`` a setting, ``ensure`` a
    firewall ruleset (idempotent, shared, never undone) or ``run`` an action.

    ``requires_down`` names a device whose link must be down (or gone) before
    this step may run: the steps that lift a VM interface's anti-spoofing
    (its ``allowed`` elements, its group) are skipped when taking the link
    down failed, so a VM is never left running without them.
    """

    op: Op
    target: (
        Sysctl | LinkGroup | LinkState | LinkRename | Neighbour | Route | DeviceAddress | Netns | LinkNetns | Veth
        | ConntrackPurge | AddressRelease | KernelModule | SetElement | Ruleset | HardeningHold | FlowOffload
        | FlowtableDevice
    )
    requires_down: str | None = None

    def __str__(self) -> str:
        """One line: the change, as logs show it."""
        if self.op == "ensure":
            return f"{self.target} ruleset in place"
        return self.lines()[0]

    def lines(self) -> list[str]:
        if self.op == "ensure":
            return list(self.target.lines())  # type: ignore[union-attr]
        if self.op in ("set", "run"):
            return [str(self.target)]
        return [f"{self.op} {self.target}"]


@dataclass(frozen=True, slots=True)
class Plan:
    command: str
    dev: str
    steps: tuple[Step, ...]
    #: Things deliberately left out (e.g. IPv6 disabled), logged once.
    notes: tuple[str, ...] = ()
    #: What runs after the status is reported, when the event changed something.
    hooks: Hooks | None = None

    def lines(self) -> list[str]:
        out = [line for s in self.steps for line in s.lines()]
        if self.hooks is not None:
            out.append(str(self.hooks))
        return out + [f"note: {n}" for n in self.notes]
