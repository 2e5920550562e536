"""The lab's network, as data: names, addresses and the commands that build it.

Everything here is pure (no process runs, no file is touched):

* :func:`plan_topology` picks names and addresses (:func:`make_vm` one VM);
* :func:`uplink_commands`, :func:`netvm_commands`, :func:`vif_commands` and
  :func:`vm_commands` turn them into ``(namespace, argv)`` steps;
* :func:`netvm_xenstore_entries` / :func:`vm_xenstore_entries` say what
  dom0 and libxl would have written to XenStore, :func:`netvm_conf` the
  lab's netvm.conf, :func:`tool_env` / :func:`hotplug_env` the environment
  the package's tools get (all their state in one private directory).

:mod:`vif_hotplug.lab.runner` runs the steps; a test harness can run the
same ones. Every step names the namespace it runs in and none ever runs in
the caller's: links are created inside a namespace with the peer sent
straight into another one.

Shape (one uplink, one netvm, N VMs; all private to the lab's namespaces)::

    uplink ns                     netvm ns                        VM ns (one per VM)
    lan0 192.0.2.1/24   <-veth->  uplink0 192.0.2.2/24
         192.0.2.53 resolver A    vif11.0 fe:ff:ff:ff:ff:ff <-veth-> eth0 10.137.0.11/32
         192.0.2.54 resolver B    vif12.0 ...                        eth0 10.137.0.12/32
         probe server :7007

Addresses: VMs in Qubes' 10.137.0.0/24 with gateway 10.137.0.1 and virtual
resolvers 10.139.1.1/2; the uplink in TEST-NET-1 (RFC 5737); DNS answers in
TEST-NET-3; IPv6 in ULA space (RFC 4193), VMs numbered like Qubes does
(``fd09:24ef:4179::`` + the IPv4 address in hex).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

#: Namespace names start with this, then the lab id: ``vhlab-1a2b3c-net``.
PREFIX = "vhlab"
FIRST_DOMID = 11
MAX_VMS = 50

GATEWAY = IPv4Address("10.137.0.1")
DNS1 = IPv4Address("10.139.1.1")
DNS2 = IPv4Address("10.139.1.2")
UPLINK_PEER = IPv4Address("192.0.2.1")
NETVM_UPLINK = IPv4Address("192.0.2.2")
UPLINK_PREFIXLEN = 24
RESOLVER_A = IPv4Address("192.0.2.53")
RESOLVER_B = IPv4Address("192.0.2.54")
TEST_NAME = "lab.test"
ANSWER_A = IPv4Address("203.0.113.1")
ANSWER_B = IPv4Address("203.0.113.2")

GATEWAY6 = IPv6Address("fd09:24ef:4179::a89:1")
VM6_PREFIX = "fd09:24ef:4179::/64"
UPLINK6_PEER = IPv6Address("fd00:192:0:2::1")
NETVM_UPLINK6 = IPv6Address("fd00:192:0:2::2")
UPLINK6_PREFIXLEN = 64

VM4_NET = "10.137.0.0/24"
PROBE_PORT = 7007
#: netback's fixed MAC on the backend end of every vif.
NETBACK_MAC = "fe:ff:ff:ff:ff:ff"
UPLINK_DEV = "uplink0"  # deliberately not eth0: nothing may depend on that name
UPLINK_PEER_DEV = "lan0"
VM_DEV = "eth0"
VIF_SCRIPT = "/etc/xen/scripts/vif-route-qubes"
#: The netvm is domain 0 of the lab's XenStore; paths below are absolute.
NETVM_HOME = "/local/domain/0"

Step = tuple[str, tuple[str, ...]]
"""``(namespace, argv)``: run ``argv`` inside ``namespace``."""


@dataclass(frozen=True, order=True)
class Vm:
    domid: int
    ns: str
    ipv4: IPv4Address
    #: The address XenStore gives the VM; ``None`` for an IPv4-only VM.
    ipv6: IPv6Address | None
    #: The address the VM puts on itself: ``ipv6``, or for an IPv4-only VM in
    #: an IPv6 lab one it tries anyway (the netvm must not let it through).
    ipv6_self: IPv6Address | None
    mac: str

    @property
    def vif(self) -> str:
        """netback's name for the backend interface."""
        return f"vif{self.domid}.0"

    @property
    def name(self) -> str:
        return f"vm{self.domid}"

    @property
    def xenbus_path(self) -> str:
        """The backend directory relative to the netvm's home (libxl's ``XENBUS_PATH``)."""
        return f"backend/vif/{self.domid}/0"

    @property
    def xenstore_ip(self) -> str:
        return " ".join(str(a) for a in (self.ipv4, self.ipv6) if a is not None)


@dataclass(frozen=True)
class Topology:
    lab_id: str
    ipv6: bool
    uplink_ns: str
    netvm_ns: str
    vms: tuple[Vm, ...]

    @property
    def namespaces(self) -> tuple[str, ...]:
        """Every namespace, in creation order (delete in reverse)."""
        return (self.uplink_ns, self.netvm_ns, *(vm.ns for vm in self.vms))


def vm_ipv4(domid: int) -> IPv4Address:
    return IPv4Address(f"10.137.0.{domid}")


def vm_ipv6(ipv4: IPv4Address) -> IPv6Address:
    """Qubes' scheme: the IPv4 address as the last 32 bits of ``fd09:24ef:4179::/64``."""
    return IPv6Address(int(IPv6Address("fd09:24ef:4179::")) | int(ipv4))


def make_vm(domid: int, ns: str, *, ipv6: bool = False, ipv6_in_xenstore: bool = True) -> Vm:
    """One VM (domid 1..254) in namespace ``ns``, addressed as Qubes numbers it.

    ``ipv6``: the VM configures an IPv6 address; ``ipv6_in_xenstore``: the
    netvm is told about it (false makes an IPv4-only VM that tries anyway).
    """
    if not 1 <= domid <= 254:
        raise ValueError(f"domid {domid} out of range 1..254")
    v4 = vm_ipv4(domid)
    v6 = vm_ipv6(v4) if ipv6 else None
    return Vm(domid=domid, ns=ns, ipv4=v4, ipv6=v6 if ipv6_in_xenstore else None, ipv6_self=v6,
              mac=f"00:16:3e:5e:6c:{domid:02x}")


def plan_topology(lab_id: str, vms: int, ipv6: bool) -> Topology:
    """Names and addresses of a lab with ``vms`` VMs.

    With ``ipv6`` every VM but the last gets an IPv6 address in XenStore; the
    last stays IPv4-only to prove that it gets no IPv6 through. Raises
    ``ValueError`` for a VM count out of range (``1..MAX_VMS``, at least 2
    with ``ipv6``).
    """
    low = 2 if ipv6 else 1
    if not low <= vms <= MAX_VMS:
        raise ValueError(f"--vms must be between {low} and {MAX_VMS}{' with --ipv6' if ipv6 else ''}")
    base = f"{PREFIX}-{lab_id}"
    out = tuple(
        make_vm(FIRST_DOMID + i, f"{base}-vm{FIRST_DOMID + i}", ipv6=ipv6, ipv6_in_xenstore=i < vms - 1)
        for i in range(vms)
    )
    return Topology(lab_id, ipv6, f"{base}-up", f"{base}-net", out)


def resolv_conf(servers: tuple[IPv4Address, ...]) -> str:
    return "".join(f"nameserver {s}\n" for s in servers)


def _ip(*args: str) -> tuple[str, ...]:
    return ("ip", *args)


def uplink_commands(topo: Topology) -> list[Step]:
    """The uplink: the router the netvm's default route points at, and its servers' addresses.

    It also routes the VM ranges back through the netvm, as an attacker on
    the netvm's LAN could, so forged packets have a way in to be dropped.
    Runs after :func:`netvm_commands` (which creates ``lan0`` in here).
    """
    ns, dev = topo.uplink_ns, UPLINK_PEER_DEV
    steps: list[Step] = [(ns, _ip("link", "set", "lo", "up"))]
    for addr in (UPLINK_PEER, RESOLVER_A, RESOLVER_B):
        steps.append((ns, _ip("addr", "add", f"{addr}/{UPLINK_PREFIXLEN}", "dev", dev)))
    if topo.ipv6:
        steps.append((ns, _ip("-6", "addr", "add", f"{UPLINK6_PEER}/{UPLINK6_PREFIXLEN}", "dev", dev, "nodad")))
    steps.append((ns, _ip("link", "set", dev, "up")))
    steps.append((ns, _ip("route", "add", VM4_NET, "via", str(NETVM_UPLINK))))
    if topo.ipv6:
        steps.append((ns, _ip("-6", "route", "add", VM6_PREFIX, "via", str(NETVM_UPLINK6))))
    return steps


def netvm_commands(topo: Topology) -> list[Step]:
    """The netvm before any VM: ``lo``, its uplink ``uplink0`` and default routes.

    The vifs come later, one per VM start (:func:`vif_commands`), as in a
    driver domain that boots before its VMs.
    """
    ns = topo.netvm_ns
    steps: list[Step] = [
        (ns, _ip("link", "set", "lo", "up")),
        (ns, _ip("link", "add", UPLINK_DEV, "type", "veth", "peer", "name", UPLINK_PEER_DEV, "netns", topo.uplink_ns)),
        (ns, _ip("addr", "add", f"{NETVM_UPLINK}/{UPLINK_PREFIXLEN}", "dev", UPLINK_DEV)),
    ]
    if topo.ipv6:
        steps.append((ns, _ip("-6", "addr", "add", f"{NETVM_UPLINK6}/{UPLINK6_PREFIXLEN}", "dev", UPLINK_DEV, "nodad")))
    steps.append((ns, _ip("link", "set", UPLINK_DEV, "up")))
    steps.append((ns, _ip("route", "add", "default", "via", str(UPLINK_PEER))))
    if topo.ipv6:
        steps.append((ns, _ip("-6", "route", "add", "default", "via", str(UPLINK6_PEER))))
    return steps


def backend_link_commands(netvm_ns: str, vif: str, vm_mac: str, vm_ns: str, vm_dev: str = VM_DEV) -> list[Step]:
    """What netback does when a VM starts: ``vif`` with netback's fixed MAC, the VM's end in the VM.

    The vif stays down, as netback leaves it: bringing it up is the hotplug
    script's job. The peer is created straight in the VM's namespace, so no
    device ever exists in the caller's.
    """
    return [
        (netvm_ns, _ip("link", "add", vif, "address", NETBACK_MAC, "type", "veth",
                       "peer", "name", vm_dev, "address", vm_mac, "netns", vm_ns)),
    ]


def vif_commands(netvm_ns: str, vm: Vm) -> list[Step]:
    return backend_link_commands(netvm_ns, vm.vif, vm.mac, vm.ns)


def guest_commands(
    ns: str, addresses: Sequence[str], gateway: str = str(GATEWAY), gateway6: str = str(GATEWAY6),
    dev: str = VM_DEV,
) -> list[Step]:
    """A VM configures itself as a Qubes VM does: host addresses, the gateway pinned to netback's MAC,
    an on-link default route (IPv6 likewise when it has an IPv6 address)."""
    steps: list[Step] = [(ns, _ip("link", "set", "lo", "up"))]
    for addr in addresses:
        prefix = 128 if ":" in addr else 32
        extra = ("nodad",) if ":" in addr else ()
        steps.append((ns, _ip("addr", "add", f"{addr}/{prefix}", "dev", dev, *extra)))
    steps.append((ns, _ip("link", "set", dev, "up")))
    if any(":" not in a for a in addresses):
        steps += [
            (ns, _ip("neigh", "replace", gateway, "lladdr", NETBACK_MAC, "dev", dev, "nud", "permanent")),
            (ns, _ip("route", "add", "default", "via", gateway, "dev", dev, "onlink")),
        ]
    if any(":" in a for a in addresses):
        steps += [
            (ns, _ip("-6", "neigh", "replace", gateway6, "lladdr", NETBACK_MAC, "dev", dev, "nud", "permanent")),
            (ns, _ip("-6", "route", "add", "default", "via", gateway6, "dev", dev, "onlink")),
        ]
    return steps


def vm_commands(vm: Vm) -> list[Step]:
    """A lab VM configures itself (with the IPv6 address it tries even when XenStore gives none)."""
    addresses = [str(vm.ipv4)] + ([str(vm.ipv6_self)] if vm.ipv6_self is not None else [])
    return guest_commands(vm.ns, addresses)


def netvm_params(ipv6: bool) -> dict[str, str]:
    """The netvm parameters, keyed as the ``qubes-netvm-*`` XenStore names."""
    out = {
        "qubes-netvm-gateway": str(GATEWAY),
        "qubes-netvm-primary-dns": str(DNS1),
        "qubes-netvm-secondary-dns": str(DNS2),
    }
    if ipv6:
        out["qubes-netvm-gateway6"] = str(GATEWAY6)
    return out


def netvm_conf(ipv6: bool, hooks_dir: str, backend: str, with_params: bool) -> str:
    """The lab's netvm.conf: a private hooks dir, the firewall backend, the parameters only if asked.

    Without ``[netvm]`` the tools fall through to XenStore, which is the path
    the lab means to exercise. ``with_params`` is for hosts with QubesDB,
    which comes before XenStore and would hand the tools the host's values.
    """
    text = f"[hotplug]\nhooks_dir = {hooks_dir}\n\n[firewall]\nbackend = {backend}\n"
    if with_params:
        keys = {"qubes-netvm-gateway": "gateway", "qubes-netvm-gateway6": "gateway6",
                "qubes-netvm-primary-dns": "primary_dns", "qubes-netvm-secondary-dns": "secondary_dns"}
        text += "\n[netvm]\n" + "".join(f"{keys[k]} = {v}\n" for k, v in netvm_params(ipv6).items())
    return text


def netvm_xenstore_entries(ipv6: bool) -> list[tuple[str, str]]:
    """What dom0 writes for the netvm itself: its parameters under its home."""
    return [(f"{NETVM_HOME}/{k}", v) for k, v in netvm_params(ipv6).items()]


def vm_xenstore_entries(vm: Vm, name: str) -> list[tuple[str, str]]:
    """What libxl writes when ``vm`` (domain ``name``) starts: frontend and backend of its vif."""
    be = f"{NETVM_HOME}/{vm.xenbus_path}"
    fe = f"/local/domain/{vm.domid}/device/vif/0"
    return [
        (f"/local/domain/{vm.domid}/name", name),
        (f"{fe}/backend", be),
        (f"{fe}/backend-id", "0"),
        (f"{fe}/handle", "0"),
        (f"{fe}/mac", vm.mac),
        (f"{be}/frontend", fe),
        (f"{be}/frontend-id", str(vm.domid)),
        (f"{be}/online", "1"),
        (f"{be}/state", "2"),  # XenbusStateInitWait: the backend waits for hotplug
        (f"{be}/script", VIF_SCRIPT),
        (f"{be}/mac", vm.mac),
        (f"{be}/ip", vm.xenstore_ip),
        (f"{be}/type", "vif"),
        (f"{be}/handle", "0"),
    ]


@dataclass(frozen=True)
class LabPaths:
    """Files of one lab run, all under its private temporary directory."""

    tmpdir: str

    @property
    def xenstore_socket(self) -> str:
        return f"{self.tmpdir}/xenstored.socket"

    @property
    def conf(self) -> str:
        return f"{self.tmpdir}/netvm.conf"

    @property
    def hooks_dir(self) -> str:
        return f"{self.tmpdir}/hooks.d"

    @property
    def state_dir(self) -> str:
        """The tools' runtime state (backend marker, nftables and DNS locks, agent socket)."""
        return f"{self.tmpdir}/state"

    @property
    def hotplug_lock(self) -> str:
        return f"{self.tmpdir}/hotplug.lock"

    @property
    def xtables_lock(self) -> str:
        return f"{self.tmpdir}/xtables.lock"


def tool_overrides(paths: LabPaths) -> dict[str, str]:
    """What every tool of this package the lab runs gets on top of the caller's environment.

    All its state in the lab's tmpdir, and never a resident agent (which
    would serve the command from the host's namespace with its own state).
    """
    return {
        "XENSTORED_PATH": paths.xenstore_socket,
        "VIF_HOTPLUG_CONF": paths.conf,
        "VIF_HOTPLUG_LOCK": paths.hotplug_lock,
        "VIF_HOTPLUG_STATE_DIR": paths.state_dir,
        "VIF_HOTPLUG_AGENT": "off",
        "XTABLES_LOCKFILE": paths.xtables_lock,
    }


def tool_env(paths: LabPaths, base: Mapping[str, str]) -> dict[str, str]:
    """``base`` with :func:`tool_overrides` applied."""
    env = dict(base)
    env.update(tool_overrides(paths))
    return env


def hotplug_env(vm: Vm, paths: LabPaths, base: Mapping[str, str]) -> dict[str, str]:
    """The environment libxl / ``xl devd`` gives a vif script (README §1), pointed at the lab."""
    env = tool_env(paths, base)
    env.update(
        script=VIF_SCRIPT,
        XENBUS_TYPE="vif",
        XENBUS_PATH=vm.xenbus_path,
        XENBUS_BASE_PATH="backend",
        vif=vm.vif,
        netdev="",
    )
    return env
