"""Plain data: hotplug inputs and the desired kernel objects a plan is made of.

Everything here is a frozen dataclass that compares and sorts by value, so
plans compare equal whatever order their inputs came in and can be printed
for ``--dry-run`` without touching the system.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Literal

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

#: Highest domid Xen hands out to a guest (DOMID_FIRST_RESERVED - 1) and the
#: base of the route metric: later domains get lower metrics and so win when
#: a restarted VM briefly owns an address twice.
MAX_DOMID = 32752

#: Interface group of VM interfaces (Qubes 4.2 uses 2 for vifs, 1 for uplinks).
#: The anti-spoofing rules match on it, so a ``vifname`` rename does not
#: open a hole the way an ``-i vif+`` wildcard would.
VIF_GROUP = 2
DEFAULT_GROUP = 0


def route_metric(domid: int) -> int:
    return MAX_DOMID - domid


@dataclass(frozen=True, order=True)
class VmNetwork:
    """What XenStore says about the VM behind one vif (already validated)."""

    networks: tuple[IPNetwork, ...]
    mac: str
    vif_type: str = "vif"

    @property
    def ipv4(self) -> tuple[IPv4Network, ...]:
        return tuple(n for n in self.networks if isinstance(n, IPv4Network))

    @property
    def ipv6(self) -> tuple[IPv6Network, ...]:
        return tuple(n for n in self.networks if isinstance(n, IPv6Network))


@dataclass(frozen=True)
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
        return tuple(a for a in (self.primary_dns, self.secondary_dns) if a is not None)


@dataclass(frozen=True)
class LinkFacts:
    """What the kernel says about the vif right now; gathered before planning."""

    exists: bool
    #: IPv6 off on this interface (``disable_ipv6``) or in the whole kernel.
    ipv6_disabled: bool = False
    #: The kernel has IPv6 at all (``ipv6.disable=1`` removes it, and ip6tables with it).
    ipv6_in_kernel: bool = True
    #: A NAT namespace for this vif exists (it has a mapped address).
    nat_namespace: bool = False
    #: Values a freshly created interface gets (``conf/default``); offline
    #: restores them so the device ends as netback created it.
    sysctl_defaults: tuple[tuple[str, str], ...] = (("ipv4/proxy_arp", "0"), ("ipv6/proxy_ndp", "0"))

    def default(self, key: str) -> str:
        return dict(self.sysctl_defaults).get(key, "0")


# --- desired objects -----------------------------------------------------


@dataclass(frozen=True, order=True)
class Sysctl:
    """``/proc/sys/net/<family>/conf/<dev>/<name>``."""

    family: Literal["ipv4", "ipv6"]
    dev: str
    name: str
    value: str

    @property
    def key(self) -> str:
        return f"{self.family}/{self.name}"

    def __str__(self) -> str:
        return f"sysctl net.{self.family}.conf.{self.dev}.{self.name}={self.value}"


@dataclass(frozen=True, order=True)
class LinkRename:
    dev: str
    new_name: str

    def __str__(self) -> str:
        return f"link {self.dev} rename to {self.new_name}"


@dataclass(frozen=True, order=True)
class LinkGroup:
    dev: str
    group: int

    def __str__(self) -> str:
        return f"link {self.dev} group {self.group}"


@dataclass(frozen=True, order=True)
class LinkState:
    dev: str
    up: bool

    def __str__(self) -> str:
        return f"link {self.dev} {'up' if self.up else 'down'}"


@dataclass(frozen=True, order=True)
class Neighbour:
    """Permanent neighbour entry: pins the VM's MAC (no ARP/NDP poisoning)."""

    dev: str
    address: str
    mac: str

    def __str__(self) -> str:
        return f"neighbour {self.address} lladdr {self.mac} dev {self.dev} permanent"


@dataclass(frozen=True, order=True)
class Route:
    dev: str
    destination: str
    metric: int

    def __str__(self) -> str:
        return f"route {self.destination} dev {self.dev} metric {self.metric}"


@dataclass(frozen=True, order=True)
class DeviceAddress:
    dev: str
    address: str  # "10.137.0.1/32"

    def __str__(self) -> str:
        return f"address {self.address} dev {self.dev}"


@dataclass(frozen=True, order=True)
class SetEntry:
    """Member of a kernel ip set: ``(network, dev)`` or just ``network``."""

    set_name: str
    network: str
    dev: str | None = None

    @property
    def family(self) -> int:
        return 6 if ":" in self.network else 4

    def __str__(self) -> str:
        member = f"{self.network},{self.dev}" if self.dev else self.network
        return f"set {self.set_name} member {member}"


@dataclass(frozen=True, order=True)
class AntispoofBase:
    """The constant sets and raw-table rules every vif relies on."""

    families: tuple[int, ...] = (4, 6)

    def __str__(self) -> str:
        fams = ",".join(f"ipv{f}" for f in self.families)
        return f"anti-spoofing sets and raw rules ({fams})"


@dataclass(frozen=True, order=True)
class ConntrackPurge:
    address: str

    def __str__(self) -> str:
        return f"conntrack entries from or to {self.address} purged"


@dataclass(frozen=True, order=True)
class Hooks:
    command: str
    dev: str
    vif_type: str
    addresses: tuple[str, ...]
    directory: str

    def __str__(self) -> str:
        return f"hooks in {self.directory}: {self.command} {self.dev} {self.vif_type} {' '.join(self.addresses)}"


@dataclass(frozen=True, order=True)
class NatNamespace:
    """The per-vif NAT namespace of a VM with a mapped ("visible") address.

    Only ``dev`` identifies it; the addresses describe what it translates
    (empty when unknown, as for an offline after the parameters went away).
    """

    dev: str
    real_ip: str = ""
    visible_ip: str = ""
    visible_gateway: str = ""
    gateway: str = ""
    vm_mac: str = ""

    @property
    def netns(self) -> str:
        return f"{self.dev}-nat"

    @property
    def peer(self) -> str:
        return f"{self.dev}-p"

    def __str__(self) -> str:
        if not self.real_ip:
            return f"NAT namespace {self.netns}"
        return (
            f"NAT namespace {self.netns}: VM's {self.visible_ip} (gateway {self.visible_gateway}) "
            f"is {self.real_ip} (gateway {self.gateway}) here"
        )


Settable = Sysctl | LinkGroup | LinkState | LinkRename
Removable = Neighbour | Route | DeviceAddress | SetEntry | NatNamespace
Runnable = AntispoofBase | ConntrackPurge | Hooks
Target = Settable | Removable | Runnable

Op = Literal["add", "remove", "set", "run"]


@dataclass(frozen=True)
class Step:
    op: Op
    target: Target

    def __str__(self) -> str:
        if self.op in ("set", "run"):
            return str(self.target)
        return f"{self.op} {self.target}"


@dataclass(frozen=True)
class Plan:
    command: str
    dev: str
    steps: tuple[Step, ...]
    #: Things deliberately left out (e.g. IPv6 disabled), logged once.
    notes: tuple[str, ...] = field(default=())

    def lines(self) -> list[str]:
        return [str(s) for s in self.steps] + [f"note: {n}" for n in self.notes]
