"""Side by side with Qubes' own services in one netvm (issue 19), on both backends, with real packets.

The netvm namespace runs this package beside a stand-in for Qubes' firewall
service (:mod:`.qubes_standin`: its tables ``ip``/``ip6 qubes-firewall``,
chains and priorities as ``qubesagent/firewall.py`` builds them, per-VM
rules from QubesDB-style rule strings). A root-owned tools directory holds
the stand-in's ``qubesdb-read`` (so the package knows it is in a Qubes VM)
and a ``systemctl`` that records its calls and performs the firewall
service's reload. As in a Qubes netvm, forwarding is turned on by the test
(Qubes' ``qubes-network.service``) only after the firewall service is up.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .conftest import Netns, NetnsFactory, entry_point, require_tool
from .hotplug_env import GATEWAY, UPLINK_NET, Netvm, running_netvm, udp_listen, udp_send, wait_for_line
from .qubes_standin import QubesDb, install_tools

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[2]
DNS1, DNS2 = "10.139.1.1", "10.139.1.2"
SERVER_A, SERVER_B = f"{UPLINK_NET}.53", f"{UPLINK_NET}.54"
ANSWER_A, ANSWER_B = "198.51.100.1", "198.51.100.2"
CONF = f"[netvm]\ngateway = {GATEWAY}\nprimary_dns = {DNS1}\nsecondary_dns = {DNS2}\n"
VM_IP, OTHER_IP = "10.137.0.5", "10.137.0.6"
ALLOWED_PORT, BLOCKED_PORT = 5000, 5001
RELOAD = "--no-block try-reload-or-restart qubes-firewall.service"
PATIENCE = 20.0


@dataclass
class QubesNetvm:
    """A netvm whose tools directory says "Qubes VM", with Qubes' firewall service beside us."""

    netvm: Netvm
    tools: Path
    db: QubesDb
    resolv: Path
    calls: Path
    servers: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {"VIF_HOTPLUG_TOOLS_DIR": str(self.tools)}

    def tool(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.netvm.tool(*args, env=self.env, check=check)

    def init(self) -> None:
        self.tool("init", "--resolv-conf", str(self.resolv))

    def hotplug(self, command: str, domid: int, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.netvm.hotplug(command, domid, env=self.env, check=check)

    def dns(self) -> int:
        proc = subprocess.run(
            ["nsenter", f"--net=/run/netns/{self.netvm.ns.name}", entry_point("qubes-setup-dnat-to-ns"),
             "--resolv-conf", str(self.resolv)],
            env={**_base_env(), **self.netvm.env, **self.env}, capture_output=True, text=True, timeout=120)
        return proc.returncode

    def firewall_service(self, command: str) -> None:
        """The stand-in, in the netvm's namespace: ``init`` (service start) or ``reload``."""
        self.netvm.ns.run("sh", "-c", f"cd {ROOT} && exec {sys.executable} -m tests.functional.qubes_standin "
                          f"--db {self.db.path} --resolv-conf {self.resolv} {command}")

    def service_tables(self) -> str:
        return self.netvm.ns.run(sys.executable, "-c", _TABLES).stdout

    def check_service(self, expected: str) -> None:
        """The stand-in's own checks: every VM interface named vif*, its tables as it left them."""
        proc = self.netvm.ns.run(sys.executable, "-c", _CHECK, input=expected, check=False)
        assert proc.returncode == 0, proc.stderr

    def qubes_network(self) -> None:
        """What Qubes' network service does after the firewall service started: forwarding on."""
        self.netvm.ns.run("sysctl", "-qw", "net.ipv4.ip_forward=1")

    def start_server(self, address: str, answer: str) -> None:
        up = self.netvm.uplink
        assert up is not None
        up.run("ip", "addr", "add", f"{address}/24", "dev", "wan0")
        self.servers.append(up.popen(
            [require_tool("dnsmasq"), "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
             "--pid-file=", "--port=53", f"--listen-address={address}", "--bind-interfaces",
             f"--address=/test.lab/{answer}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + PATIENCE
        probe = ["dig", "+short", "+tries=1", "+time=1", f"@{address}", "probe.test.lab"]
        while up.run(*probe, check=False).stdout.strip() != answer:
            assert time.monotonic() < deadline, f"dnsmasq on {address} did not start"
            time.sleep(0.1)


_TABLES = "from tests.functional.qubes_standin import FirewallService as F; print(F.tables(), end='')"
_CHECK = "import sys; from tests.functional.qubes_standin import FirewallService as F; F.check(sys.stdin.read())"


def _base_env() -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.fixture
def qubes(make_netns: NetnsFactory, backend: str) -> Iterator[QubesNetvm]:
    require_tool("nft")
    with running_netvm(make_netns, CONF, backend) as netvm:
        tools = Path(tempfile.mkdtemp(prefix="vhqt"))
        db = QubesDb(netvm.tmp / "qubesdb.json")
        resolv = netvm.tmp / "resolv.conf"
        resolv.write_text(f"nameserver {SERVER_A}\n")
        calls = netvm.tmp / "systemctl.log"
        install_tools(tools, db, resolv, calls)
        q = QubesNetvm(netvm, tools, db, resolv, calls)
        netvm.ns.env["PYTHONPATH"] = str(ROOT)
        try:
            yield q
        finally:
            for proc in q.servers:
                proc.terminate()
                proc.wait(timeout=PATIENCE)
            import shutil

            shutil.rmtree(tools, ignore_errors=True)


@pytest.fixture
def running(qubes: QubesNetvm) -> QubesNetvm:
    """Uplink, Qubes' firewall service started, this package's init, forwarding on, one VM online
    whose rules accept udp to the uplink's port 5000 and drop the rest."""
    qubes.netvm.add_uplink()
    qubes.netvm.ns.run("sysctl", "-qw", "net.ipv4.ip_forward=0")  # as at boot, before qubes-network
    qubes.db.set_rules(VM_IP, "drop", f"action=accept proto=udp dstports={ALLOWED_PORT}-{ALLOWED_PORT} "
                                      f"dst4={UPLINK_NET}.2/32")
    qubes.firewall_service("init")
    qubes.init()
    qubes.qubes_network()
    qubes.netvm.add_vm(4, [VM_IP])
    qubes.hotplug("online", 4)
    return qubes


def _filtered(q: QubesNetvm, vm: Netns, tag: str) -> tuple[bool, bool]:
    """(the allowed datagram arrived, the blocked one did): blocked is sent first, then the allowed
    one, which is waited for (it proves the path), so a blocked one that never came is known dropped."""
    up = q.netvm.uplink
    assert up is not None
    log = q.netvm.tmp / f"{tag}.log"
    listeners = [udp_listen(up, f"{UPLINK_NET}.2", port, log) for port in (ALLOWED_PORT, BLOCKED_PORT)]
    try:
        udp_send(vm, VM_IP, f"{UPLINK_NET}.2", BLOCKED_PORT, f"{tag}-blocked")
        udp_send(vm, VM_IP, f"{UPLINK_NET}.2", ALLOWED_PORT, f"{tag}-allowed")
        allowed = wait_for_line(log, f"{tag}-allowed")
        if not allowed:
            time.sleep(0.5)
    finally:
        for proc in listeners:
            proc.kill()
            proc.wait()
    text = log.read_text() if log.exists() else ""
    return allowed, f"{tag}-blocked" in text


# --- per-VM rules hold whatever this package does -----------------------------------------------------------


def test_the_firewall_services_per_vm_rules_filter_a_vm_brought_online(running: QubesNetvm) -> None:
    assert _filtered(running, running.netvm.vms[4].ns, "online") == (True, False)


@pytest.mark.parametrize("operation", ["init", "reconcile", "another vif online and offline", "switch backend"])
def test_per_vm_rules_still_hold_after(running: QubesNetvm, operation: str) -> None:
    tables = running.service_tables()
    if operation == "init":
        running.init()
    elif operation == "reconcile":
        running.tool("reconcile", "--resolv-conf", str(running.resolv))
    elif operation == "switch backend":
        other = "iptables" if running.netvm.fw_backend == "nftables" else "nftables"
        running.netvm.write_conf(CONF + f"\n[firewall]\nbackend = {other}\n")
        running.netvm.fw_backend = other
        running.init()
    else:
        running.netvm.add_vm(5, [OTHER_IP])
        running.hotplug("online", 5)
        running.hotplug("offline", 5)
    running.check_service(tables)
    assert _filtered(running, running.netvm.vms[4].ns, operation.replace(" ", "-")) == (True, False)


def test_offline_leaves_the_firewall_services_tables_as_they_were(running: QubesNetvm) -> None:
    tables = running.service_tables()
    running.hotplug("offline", 4)
    running.check_service(tables)


def test_status_does_not_take_the_firewall_services_tables_for_drift(running: QubesNetvm) -> None:
    proc = running.tool("status", "--resolv-conf", str(running.resolv), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_reload_of_the_firewall_service_leaves_this_packages_state_in_place(running: QubesNetvm) -> None:
    running.firewall_service("reload")
    assert running.tool("status", "--resolv-conf", str(running.resolv), check=False).returncode == 0


# --- DNS: the firewall service's dns-addr follows the uplink's resolver (Qubes issue 10444) ----------------


@pytest.fixture
def dns_only(qubes: QubesNetvm) -> QubesNetvm:
    """A VM whose rules allow DNS only (``specialtarget=dns``), resolving through DNS1 to server A."""
    for name in ("dig", "dnsmasq"):
        require_tool(name)
    qubes.netvm.add_uplink()
    qubes.netvm.ns.run("sysctl", "-qw", "net.ipv4.ip_forward=0")
    qubes.start_server(SERVER_A, ANSWER_A)
    qubes.start_server(SERVER_B, ANSWER_B)
    qubes.db.set_rules(VM_IP, "drop", "action=accept specialtarget=dns")
    qubes.firewall_service("init")
    qubes.init()
    qubes.qubes_network()
    qubes.netvm.add_vm(4, [VM_IP])
    qubes.hotplug("online", 4)
    return qubes


def _resolve(q: QubesNetvm) -> str:
    vm = q.netvm.vms[4].ns
    return vm.run("dig", "+short", "+tries=1", "+time=2", f"@{DNS1}", "name.test.lab", check=False).stdout.strip()


def test_a_vm_allowed_only_dns_resolves_through_the_virtual_resolver(dns_only: QubesNetvm) -> None:
    assert _resolve(dns_only) == ANSWER_A


def test_a_vm_allowed_only_dns_still_resolves_after_the_uplinks_resolver_changed(dns_only: QubesNetvm) -> None:
    dns_only.resolv.write_text(f"nameserver {SERVER_B}\n")
    assert dns_only.dns() == 0
    assert _resolve(dns_only) == ANSWER_B


def test_the_dns_tool_asks_systemd_to_reload_the_firewall_service_after_a_change(qubes: QubesNetvm) -> None:
    qubes.firewall_service("init")
    qubes.resolv.write_text(f"nameserver {SERVER_B}\n")
    assert qubes.dns() == 0
    assert qubes.calls.read_text().splitlines() == [RELOAD]


def test_the_dns_tool_asks_nothing_when_nothing_changed(qubes: QubesNetvm) -> None:
    qubes.firewall_service("init")
    qubes.dns()
    qubes.calls.unlink()
    assert qubes.dns() == 100
    assert not qubes.calls.exists()


def test_init_asks_systemd_to_reload_the_firewall_service_when_it_changed_the_dns_rules(qubes: QubesNetvm) -> None:
    qubes.firewall_service("init")
    qubes.init()
    assert RELOAD in qubes.calls.read_text().splitlines()


# --- a Qubes VM: vifname, forwarding -----------------------------------------------------------------------


def test_in_a_qubes_vm_a_vifname_outside_vif_star_is_refused(qubes: QubesNetvm) -> None:
    qubes.firewall_service("init")
    qubes.init()
    qubes.netvm.add_vm(4, [VM_IP], extra={"vifname": "work-vm"})
    proc = qubes.hotplug("online", 4, check=False)
    assert (proc.returncode, qubes.netvm.status(4)) == (1, "error")
    assert "'work-vm'" in proc.stderr and proc.stderr.strip().count("\n") == 0
    assert not qubes.netvm.ns.run("ip", "link", "show", "work-vm", check=False).returncode == 0


def test_in_a_qubes_vm_a_vifname_starting_with_vif_is_still_renamed(qubes: QubesNetvm) -> None:
    qubes.firewall_service("init")
    qubes.init()
    qubes.netvm.add_vm(4, [VM_IP], extra={"vifname": "vif-work"})
    qubes.hotplug("online", 4)
    qubes.check_service(qubes.service_tables())
    assert qubes.netvm.status(4) == "connected"


@pytest.mark.parametrize("key", ["net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding"])
def test_in_a_qubes_vm_init_leaves_forwarding_to_qubes_network_service(qubes: QubesNetvm, key: str) -> None:
    qubes.netvm.write_conf(CONF + "gateway6 = fd09:24ef:4179::a89:1\n")
    qubes.init()
    assert qubes.netvm.sysctl(key) == "0"


@pytest.mark.parametrize(("flag", "hardened"), [("1", True), ("0", False)], ids=["service 1", "service 0"])
def test_the_harden_service_flag_reads_as_qubes_init_reads_it(qubes: QubesNetvm, flag: str, hardened: bool) -> None:
    qubes.db.write("/qubes-service/harden-network-interfaces", flag)
    qubes.netvm.add_vm(4, [VM_IP])
    qubes.hotplug("online", 4)
    assert (qubes.netvm.sysctl("net/ipv4/conf/vif4.0/send_redirects") == "0") is hardened


# --- IPv6 off in Qubes, IPv6 on the LAN (Qubes issue 9903) -------------------------------------------------


@pytest.fixture
def ipv6_off(make_netns: NetnsFactory, backend: str) -> Iterator[Netvm]:
    with running_netvm(make_netns, CONF, backend) as netvm:
        up = netvm.add_uplink()
        # The harness forwards IPv6 in the netvm, which makes accept_ra=1 ignore routers.
        netvm.ns.run("sysctl", "-qw", "net.ipv6.conf.uplink0.accept_ra=2")
        netvm.tool("init")
        _wait_link_local(up, "wan0")
        yield netvm


def _wait_link_local(ns: Netns, dev: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while True:
        out = ns.run("ip", "-6", "addr", "show", "dev", dev, "scope", "link").stdout
        if "inet6 fe80" in out and "tentative" not in out:
            return
        assert time.monotonic() < deadline, f"no usable link-local address on {dev}: {out}"
        time.sleep(0.1)


_SEND_RA = """
import socket, struct, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
# RFC 4861 6.1.2: a router advertisement is only valid with hop limit 255.
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
# type 134, code 0, checksum (the kernel fills it in), cur hop limit 64, flags 0,
# router lifetime 1800 s, reachable time 0, retrans timer 0
s.sendto(struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 1800, 0, 0), ("ff02::1", 0, 0, socket.if_nametoindex(sys.argv[1])))
"""


def test_with_ipv6_off_the_netvm_still_answers_neighbour_solicitations_on_its_uplink(ipv6_off: Netvm) -> None:
    up = ipv6_off.uplink
    assert up is not None
    from vif_hotplug.lab.probe import command

    assert up.run(*command("ping", "fd00:2::1", "--wait", "3"), check=False).returncode == 0
    assert "lladdr" in up.run("ip", "-6", "neigh", "show", "fd00:2::1", "dev", "wan0").stdout


def test_with_ipv6_off_the_netvm_still_accepts_a_router_advertisement_on_its_uplink(ipv6_off: Netvm) -> None:
    up = ipv6_off.uplink
    assert up is not None
    up.run(sys.executable, "-c", _SEND_RA, "wan0")
    deadline = time.monotonic() + PATIENCE
    while "proto ra" not in ipv6_off.ns.run("ip", "-6", "route", "show", "default").stdout:
        assert time.monotonic() < deadline, "the router advertisement was not accepted"
        up.run(sys.executable, "-c", _SEND_RA, "wan0")
        time.sleep(0.5)


def test_with_ipv6_off_a_vm_still_gets_no_ipv6_through(ipv6_off: Netvm) -> None:
    up = ipv6_off.uplink
    assert up is not None
    vm = ipv6_off.add_vm(4, [VM_IP, "fd09:24ef:4179::a89:5"])
    ipv6_off.hotplug("online", 4)
    # Straight at the netvm's vif, whatever neighbour discovery would say: only the firewall decides.
    vm.ns.run("ip", "-6", "route", "replace", "default", "dev", "vmnic0")
    vm.ns.run("ip", "-6", "neigh", "replace", "fd00:2::2", "lladdr", "fe:ff:ff:ff:ff:ff", "dev", "vmnic0",
              "nud", "permanent")
    log = ipv6_off.tmp / "v6.log"
    listeners = [udp_listen(up, addr, 5000, log) for addr in ("fd00:2::2", f"{UPLINK_NET}.2")]
    try:
        udp_send(vm.ns, "fd09:24ef:4179::a89:5", "fd00:2::2", 5000, "ipv6")
        udp_send(vm.ns, VM_IP, f"{UPLINK_NET}.2", 5000, "ipv4-control")
        assert wait_for_line(log, "ipv4-control")
    finally:
        for proc in listeners:
            proc.kill()
            proc.wait()
    assert "ipv6" not in log.read_text().replace("ipv4-control", "")


# --- hardening that takes effect ----------------------------------------------------------------------------


HARDEN = CONF + "\n[hotplug]\nharden = true\n"


@pytest.fixture
def plain(make_netns: NetnsFactory, backend: str) -> Iterator[Netvm]:
    """A netvm (not a Qubes VM) with an uplink and init done."""
    with running_netvm(make_netns, CONF, backend) as netvm:
        netvm.add_uplink()
        netvm.tool("init")
        yield netvm


def _snmp(netvm: Netvm, group: str, name: str) -> int:
    """A counter of the netvm namespace's /proc/net/snmp (the kernel's own count of what it did)."""
    lines = [line.split() for line in netvm.ns.run("cat", "/proc/net/snmp").stdout.splitlines()
             if line.startswith(f"{group}:")]
    return int(dict(zip(lines[0][1:], lines[1][1:], strict=True))[name])


def _redirects_sent(netvm: Netvm) -> int:
    """How many ICMP redirects the netvm sends while VM 4 sends to its own second address through
    it (the netvm routes that address back out of the same vif: net/ipv4/route.c __mkroute_input
    marks such a packet for a redirect, ip_forward sends it when send_redirects is in effect)."""
    vm = netvm.add_vm(4, [VM_IP, "10.137.0.7"])
    netvm.hotplug("online", 4)
    vm.ns.run("ip", "addr", "del", "10.137.0.7/32", "dev", "vmnic0", check=False)
    before = _snmp(netvm, "Icmp", "OutRedirects")
    udp_send(vm.ns, VM_IP, "10.137.0.7", 9, "bounce")
    time.sleep(0.2)
    return _snmp(netvm, "Icmp", "OutRedirects") - before


def test_without_hardening_the_netvm_redirects_a_vm_bouncing_off_it(plain: Netvm) -> None:
    assert _redirects_sent(plain) > 0


def test_a_hardened_vif_sends_no_redirect_even_though_conf_all_said_send(plain: Netvm) -> None:
    # include/linux/inetdevice.h: IN_DEV_TX_REDIRECTS is conf/all OR the interface's.
    assert plain.sysctl("net/ipv4/conf/all/send_redirects") == "1"
    plain.write_conf(HARDEN)
    assert _redirects_sent(plain) == 0


def test_the_last_hardened_vif_going_offline_puts_conf_all_back(plain: Netvm) -> None:
    plain.write_conf(HARDEN)
    plain.add_vm(4, [VM_IP])
    plain.hotplug("online", 4)
    plain.hotplug("offline", 4)
    assert plain.sysctl("net/ipv4/conf/all/send_redirects") == "1"


_SEND_LSRR = """
import socket, sys
src, hop, dst, port, token = sys.argv[1:6]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((src, 0))
# Loose source route (RFC 791, type 131) through the netvm: Linux sends the
# datagram to the first hop and writes the destination into the option.
s.setsockopt(socket.IPPROTO_IP, socket.IP_OPTIONS, bytes([131, 7, 4]) + socket.inet_aton(hop))
s.sendto(token.encode(), (dst, int(port)))
"""


def _source_routed_forwarded(netvm: Netvm) -> int:
    """How many datagrams the netvm forwards when VM 4 sends one loose-source-routed through it
    (net/ipv4/ip_input.c ip_rcv_options drops it unless IN_DEV_SOURCE_ROUTE, all AND the vif's)."""
    # An administrator's choice the hardening must override.
    netvm.ns.run("sysctl", "-qw", "net.ipv4.conf.all.accept_source_route=1",
                 "net.ipv4.conf.default.accept_source_route=1")
    vm = netvm.add_vm(4, [VM_IP])
    netvm.hotplug("online", 4)
    before = _snmp(netvm, "Ip", "ForwDatagrams")
    vm.ns.run(sys.executable, "-c", _SEND_LSRR, VM_IP, GATEWAY, f"{UPLINK_NET}.2", "5002", "routed")
    time.sleep(0.2)
    return _snmp(netvm, "Ip", "ForwDatagrams") - before


def test_without_hardening_an_administrators_source_routing_is_honoured(plain: Netvm) -> None:
    assert _source_routed_forwarded(plain) == 1


def test_a_hardened_vif_drops_a_source_routed_packet(plain: Netvm) -> None:
    plain.write_conf(HARDEN)
    assert _source_routed_forwarded(plain) == 0
