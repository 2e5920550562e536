"""Attacks on the netvm, with real packets: spoofed sources, ARP/NDP poisoning, VM to VM, VM to the netvm.

Every test sends the attack, then a control packet over the same path that
must arrive (so the path worked and whatever was dropped before it is known
gone), and asserts with a capture (tcpdump's kernel-side count, filtered on
the attack's UDP source port 4444) or a listener's log that nothing of the
attack arrived.

Forged frames are built here byte by byte and sent from the VM's side of
its veth through an ``AF_PACKET`` socket, so no source address is
impossible (``0.0.0.0``, broadcast, multicast, foreign link-local) and the
VM's own routing never gets a say. The crafting itself is proven by
controls built the same way with the VM's genuine source, which must
arrive. The uplink forges VM addresses with ``IP_TRANSPARENT`` sockets.

Two topologies per backend, each built once per module (building one costs
seconds; the tests do not change it): ``bare`` (events only, no ``init``:
the anti-spoofing layer alone) and ``initialized`` (after ``vif-hotplug
init``: the input and forward firewall). Reverse-path filtering is off in
the netvm (as in a fresh namespace), so the kernel's own martian checks
are the only other defence in play.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import BACKENDS, Netns, NetnsFactory, require_root
from .hotplug_env import (
    GATEWAY,
    GATEWAY6,
    NETBACK_MAC,
    UPLINK6_NET,
    UPLINK_NET,
    VM6_NET,
    Netvm,
    capture,
    running_netvm,
    udp_listen,
    udp_send,
    wait_for_line,
)

pytestmark = pytest.mark.netns

DNS1, DNS2 = "10.139.1.1", "10.139.1.2"
OFFLINE4, OFFLINE6 = "10.137.0.77", f"{VM6_NET}::77"
CONF = (f"[netvm]\ngateway = {GATEWAY}\ngateway6 = {GATEWAY6}\nprimary_dns = {DNS1}\nsecondary_dns = {DNS2}\n"
        f"connected_ips = {OFFLINE4}\nconnected_ips6 = {OFFLINE6}\n")
UP4, UP6 = f"{UPLINK_NET}.2", f"{UPLINK6_NET}::2"
NETVM_UP4 = f"{UPLINK_NET}.1"
FORGED_PORT = 4444  # UDP source port of every attack datagram: what the captures count
CONTROL_PORT = 4445


@dataclass(frozen=True)
class Guest:
    """A VM of the topology: its vif, namespace, addresses and MAC."""

    domid: int
    ns: Netns
    ip4: str
    ip6: str | None

    @property
    def vif(self) -> str:
        return f"vif{self.domid}.0"

    @property
    def mac(self) -> str:
        return f"00:16:3e:5e:6c:{self.domid:02x}"


@dataclass
class Topology:
    netvm: Netvm
    uplink: Netns
    a: Guest  # dual stack: the attacker
    b: Guest  # dual stack: the victim
    c: Guest  # IPv4 only
    ports: Iterator[int]

    def port(self) -> int:
        """A UDP port no earlier test of this topology listened on."""
        return next(self.ports)


def _build(factory: NetnsFactory, backend: str, init: bool) -> Iterator[Topology]:
    with running_netvm(factory, CONF, backend) as netvm:
        for key in ("all", "default"):
            netvm.ns.run("sysctl", "-qw", f"net.ipv4.conf.{key}.rp_filter=0")
        up = netvm.add_uplink()
        guests = []
        for domid, ip4, ip6 in ((4, "10.137.0.5", f"{VM6_NET}::5"), (6, "10.137.0.6", f"{VM6_NET}::6"),
                                (8, "10.137.0.8", None)):
            vm = netvm.add_vm(domid, [ip4, *([ip6] if ip6 else [])])
            guests.append(Guest(domid, vm.ns, ip4, ip6))
        if init:
            netvm.tool("init")
        for g in guests:
            netvm.hotplug("online", g.domid)
        yield Topology(netvm, up, *guests, ports=iter(range(5100, 6000)))


@pytest.fixture(scope="module", params=BACKENDS)
def module_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def bare(module_backend: str) -> Iterator[Topology]:
    """Three online VMs and an uplink; no ``init`` (anti-spoofing alone)."""
    require_root()
    factory = NetnsFactory()
    try:
        yield from _build(factory, module_backend, init=False)
    finally:
        factory.cleanup()


@pytest.fixture(scope="module")
def initialized(module_backend: str) -> Iterator[Topology]:
    """The same after ``vif-hotplug init``."""
    require_root()
    factory = NetnsFactory()
    try:
        yield from _build(factory, module_backend, init=True)
    finally:
        factory.cleanup()


# --- frames, built byte by byte ----------------------------------------------------------------


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _ether(dst: str, src: str, ethertype: int, payload: bytes) -> bytes:
    return _mac(dst) + _mac(src) + struct.pack("!H", ethertype) + payload


def ipv4_udp(src_mac: str, src: str, dst: str, sport: int, dport: int, text: str, dst_mac: str = NETBACK_MAC) -> bytes:
    data = text.encode()
    udp = struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data  # checksum 0: none (IPv4 allows it)
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, socket.IPPROTO_UDP, 0,
                         socket.inet_aton(src), socket.inet_aton(dst))
    header = header[:10] + struct.pack("!H", _csum(header)) + header[12:]
    return _ether(dst_mac, src_mac, 0x0800, header + udp)


def _ipv6(src: str, dst: str, next_header: int, payload: bytes, hop_limit: int = 64) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), next_header, hop_limit,
                       socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)) + payload


def _l4_csum6(src: str, dst: str, proto: int, segment: bytes) -> int:
    pseudo = (socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
              + struct.pack("!I3xB", len(segment), proto))
    return _csum(pseudo + segment)


def ipv6_udp(src_mac: str, src: str, dst: str, sport: int, dport: int, text: str, dst_mac: str = NETBACK_MAC) -> bytes:
    data = text.encode()
    udp = struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data
    udp = udp[:6] + struct.pack("!H", _l4_csum6(src, dst, socket.IPPROTO_UDP, udp) or 0xFFFF) + udp[8:]
    return _ether(dst_mac, src_mac, 0x86DD, _ipv6(src, dst, socket.IPPROTO_UDP, udp))


def arp(op: int, sender_mac: str, sender_ip: str, target_mac: str, target_ip: str,
        dst_mac: str = "ff:ff:ff:ff:ff:ff") -> bytes:
    body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, op, _mac(sender_mac), socket.inet_aton(sender_ip),
                       _mac(target_mac), socket.inet_aton(target_ip))
    return _ether(dst_mac, sender_mac, 0x0806, body)


def _icmp6(src_mac: str, src: str, dst: str, dst_mac: str, icmp: bytes) -> bytes:
    icmp = icmp[:2] + struct.pack("!H", _l4_csum6(src, dst, socket.IPPROTO_ICMPV6, icmp)) + icmp[4:]
    return _ether(dst_mac, src_mac, 0x86DD, _ipv6(src, dst, socket.IPPROTO_ICMPV6, icmp, hop_limit=255))


def neighbour_advert(src_mac: str, src: str, target: str, override: bool = True) -> bytes:
    """An unsolicited NA to all nodes, claiming ``target`` is at ``src_mac``."""
    flags = 0x20000000 if override else 0  # R=0, S=0 (unsolicited), O as asked
    icmp = (struct.pack("!BBHI", 136, 0, 0, flags) + socket.inet_pton(socket.AF_INET6, target)
            + struct.pack("!BB", 2, 1) + _mac(src_mac))
    return _icmp6(src_mac, src, "ff02::1", "33:33:00:00:00:01", icmp)


def neighbour_solicit(src_mac: str, src: str, target: str) -> bytes:
    group = ipaddress.IPv6Address("ff02::1:ff00:0") + (int(ipaddress.IPv6Address(target)) & 0xFFFFFF)
    dst_mac = "33:33:" + ":".join(f"{b:02x}" for b in group.packed[-4:])
    icmp = (struct.pack("!BBHI", 135, 0, 0, 0) + socket.inet_pton(socket.AF_INET6, target)
            + struct.pack("!BB", 1, 1) + _mac(src_mac))
    return _icmp6(src_mac, src, str(group), dst_mac, icmp)


def link_local(mac: str) -> str:
    """The EUI-64 link-local address the kernel derives from ``mac``."""
    b = bytearray(_mac(mac))
    b[0] ^= 2
    return str(ipaddress.IPv6Address(b"\xfe\x80" + b"\0" * 6 + bytes(b[:3]) + b"\xff\xfe" + bytes(b[3:])))


_SEND_FRAMES = """
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((sys.argv[1], 0))
for frame in sys.argv[2:]:
    s.send(bytes.fromhex(frame))
"""

_SEND_TRANSPARENT = """
import socket, sys
src, dst, port, text = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
v6 = ":" in dst
s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6 if v6 else socket.IPPROTO_IP, 75 if v6 else 19, 1)  # IPV6_/IP_TRANSPARENT
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((src, int(sys.argv[5])))
s.sendto(text.encode(), (dst, port))
"""


def send_frames(g: Guest, *frames: bytes) -> None:
    """Put ``frames`` on the wire of ``g``'s side of its veth, as they are."""
    g.ns.run(sys.executable, "-c", _SEND_FRAMES, "vmnic0", *(f.hex() for f in frames))


def send_transparent(ns: Netns, src: str, dst: str, port: int, text: str, sport: int = FORGED_PORT) -> None:
    """One UDP datagram from any source address (no address added anywhere)."""
    ns.run(sys.executable, "-c", _SEND_TRANSPARENT, src, dst, str(port), text, str(sport))


def _udp(v6: bool) -> Callable[..., bytes]:
    return ipv6_udp if v6 else ipv4_udp


def attack_and_control(
    listen_ns: Netns, listen_addr: str, port: int, log: Path, capture_ns: Netns | None, capture_dev: str,
    attack: Callable[[], object], control: Callable[[], object], control_text: str,
) -> tuple[str, list[str]]:
    """(tcpdump's summary of attack datagrams on ``capture_dev``, what the listener got).

    The attack runs first, then the control, which must reach the listener.
    Without ``capture_ns`` the summary is empty (the listener's log is the count).
    """
    listener = udp_listen(listen_ns, listen_addr, port, log)
    try:
        def both() -> None:
            attack()
            control()
            assert wait_for_line(log, control_text), f"control {control_text!r} never arrived at {listen_addr}"

        if capture_ns is None:
            both()
            summary = ""
        else:
            summary = capture(capture_ns, capture_dev, f"udp and src port {FORGED_PORT}", both)
    finally:
        listener.kill()
        listener.wait()
    return summary, log.read_text().splitlines()


def nothing_captured(summary: str) -> bool:
    return "0 packets captured" in summary and "0 packets received by filter" in summary


def forged_then_control_to_the_uplink(
    t: Topology, g: Guest, dst: str, port: int, forged: bytes, control: bytes,
) -> tuple[str, list[str]]:
    """:func:`attack_and_control` for frames ``g`` sends towards ``dst`` on the uplink: ``forged`` twice,
    then ``control``."""
    return attack_and_control(t.uplink, dst, port, t.netvm.tmp / f"s{port}.log", t.uplink, "wan0",
                              lambda: send_frames(g, forged, forged), lambda: send_frames(g, control), "control")


# --- the crafting is sound (controls for everything below) -------------------------------------


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_a_crafted_frame_with_the_vms_own_source_reaches_the_uplink(bare: Topology, v6: bool) -> None:
    t, g = bare, bare.a
    port, src, dst = t.port(), (g.ip6 if v6 else g.ip4), (UP6 if v6 else UP4)
    assert src is not None
    frame = _udp(v6)(g.mac, src, dst, FORGED_PORT, port, "crafted")
    summary, got = attack_and_control(t.uplink, dst, port, t.netvm.tmp / f"craft{port}.log", t.uplink, "wan0",
                                      lambda: None, lambda: send_frames(g, frame), "crafted")
    assert got == [f"{src} crafted"]
    assert "1 packet captured" in summary


# --- spoofed sources from a VM ------------------------------------------------------------------

SPOOFED4 = {
    "another VM's address": "10.137.0.6",
    "a free VM address": "10.137.0.99",
    "the gateway": GATEWAY,
    "the netvm's uplink address": NETVM_UP4,
    "the uplink's own address": UP4,
    "0.0.0.0": "0.0.0.0",
    "the VM range's broadcast": "10.137.255.255",
    "the limited broadcast": "255.255.255.255",
    "a multicast group": "224.0.0.1",
    "a DNS resolver": DNS1,
}


@pytest.mark.parametrize("source", list(SPOOFED4.values()), ids=list(SPOOFED4))
def test_a_vm_cannot_send_from_a_forged_ipv4_source(bare: Topology, source: str) -> None:
    t, g = bare, bare.a
    port = t.port()
    forged = ipv4_udp(g.mac, source, UP4, FORGED_PORT, port, "forged")
    control = ipv4_udp(g.mac, g.ip4, UP4, CONTROL_PORT, port, "control")
    summary, got = forged_then_control_to_the_uplink(t, g, UP4, port, forged, control)
    assert nothing_captured(summary), summary
    assert got == [f"{g.ip4} control"]


SPOOFED6 = {
    "another VM's address": f"{VM6_NET}::6",
    "a free VM address": f"{VM6_NET}::99",
    "the gateway": GATEWAY6,
    "the netvm's uplink address": f"{UPLINK6_NET}::1",
    "unspecified": "::",
    "a multicast group": "ff02::1",
}


@pytest.mark.parametrize("source", list(SPOOFED6.values()), ids=list(SPOOFED6))
def test_a_vm_cannot_send_from_a_forged_ipv6_source(bare: Topology, source: str) -> None:
    t, g = bare, bare.a
    assert g.ip6 is not None
    port = t.port()
    forged = ipv6_udp(g.mac, source, UP6, FORGED_PORT, port, "forged")
    control = ipv6_udp(g.mac, g.ip6, UP6, CONTROL_PORT, port, "control")
    summary, got = forged_then_control_to_the_uplink(t, g, UP6, port, forged, control)
    assert nothing_captured(summary), summary
    assert got == [f"{g.ip6} control"]


IPV6_OF_AN_IPV4_ONLY_VM = {
    "an address of its range": f"{VM6_NET}::8",
    "another VM's address": f"{VM6_NET}::6",
    "its link-local address": link_local("00:16:3e:5e:6c:08"),
}


@pytest.mark.parametrize("source", list(IPV6_OF_AN_IPV4_ONLY_VM.values()), ids=list(IPV6_OF_AN_IPV4_ONLY_VM))
def test_an_ipv4_only_vm_passes_no_ipv6_at_all(bare: Topology, source: str) -> None:
    t, g = bare, bare.c
    port = t.port()
    forged = ipv6_udp(g.mac, source, UP6, FORGED_PORT, port, "forged")
    control = ipv4_udp(g.mac, g.ip4, UP4, CONTROL_PORT, port, "control")
    summary, got = forged_then_control_to_the_uplink(t, g, UP4, port, forged, control)
    assert nothing_captured(summary), summary
    assert got == [f"{g.ip4} control"]


FOREIGN_LINK_LOCAL = {
    "another VM's link-local": link_local("00:16:3e:5e:6c:06"),
    "the netvm's link-local": link_local(NETBACK_MAC),
    "a made-up link-local": "fe80::bad:1",
}


@pytest.mark.parametrize("source", list(FOREIGN_LINK_LOCAL.values()), ids=list(FOREIGN_LINK_LOCAL))
@pytest.mark.parametrize("target", ["gateway6", "vif-link-local"])
def test_a_vm_cannot_reach_the_netvm_from_a_link_local_source_not_its_own(
    bare: Topology, source: str, target: str,
) -> None:
    t, g = bare, bare.a
    assert g.ip6 is not None
    port = t.port()
    dst = GATEWAY6 if target == "gateway6" else link_local(NETBACK_MAC)
    log = t.netvm.tmp / f"ll{port}.log"
    forged = ipv6_udp(g.mac, source, dst, FORGED_PORT, port, "forged")
    # The control: the VM's own global address, to the gateway (the vif's link-local needs a link-local source).
    control = ipv6_udp(g.mac, g.ip6, GATEWAY6, CONTROL_PORT, port, "control")
    _, got = attack_and_control(t.netvm.ns, "::", port, log, None, "",
                                      lambda: send_frames(g, forged, forged), lambda: send_frames(g, control),
                                      "control")
    assert [line for line in got if line.endswith("forged")] == []
    assert got == [f"{g.ip6} control"]


# --- VM addresses forged from the uplink ---------------------------------------------------------

FROM_UPLINK = {
    "another online VM": ("10.137.0.5", "b4"),
    "the target VM itself": ("10.137.0.6", "b4"),
    "an IPv4-only VM": ("10.137.0.8", "b4"),
    "a connected VM that is offline": (OFFLINE4, "b4"),
    "another online VM, IPv6": (f"{VM6_NET}::5", "b6"),
    "the target VM itself, IPv6": (f"{VM6_NET}::6", "b6"),
    "a connected VM that is offline, IPv6": (OFFLINE6, "b6"),
}


@pytest.mark.parametrize(("source", "target"), list(FROM_UPLINK.values()), ids=list(FROM_UPLINK))
def test_the_uplink_cannot_send_from_a_vm_address(bare: Topology, source: str, target: str) -> None:
    t, b = bare, bare.b
    v6 = target == "b6"
    dst = b.ip6 if v6 else b.ip4
    assert dst is not None
    port = t.port()
    summary, got = attack_and_control(
        b.ns, dst, port, t.netvm.tmp / f"u{port}.log", t.netvm.ns, b.vif,
        lambda: [send_transparent(t.uplink, source, dst, port, "forged") for _ in range(2)],
        lambda: udp_send(t.uplink, UP6 if v6 else UP4, dst, port, "control"), "control",
    )
    assert nothing_captured(summary), summary
    assert got == [f"{UP6 if v6 else UP4} control"]


# --- ARP and NDP poisoning --------------------------------------------------------------------


def _neighbours(netvm: Netvm, addr: str) -> list[str]:
    """Every neighbour entry of ``addr`` on any device, with its state (the sort keeps it comparable)."""
    fam = "-6" if ":" in addr else "-4"
    return sorted(netvm.ns.run("ip", fam, "neigh", "show", "to", addr).stdout.splitlines())


def _forget_learned(netvm: Netvm, addr: str) -> None:
    """Drop what an earlier test of the shared topology taught the netvm about ``addr`` (never a permanent entry)."""
    fam = "-6" if ":" in addr else "-4"
    for _ in range(4):
        learned = [line.split() for line in netvm.ns.run("ip", fam, "neigh", "show", "to", addr, "nud", "all")
                   .stdout.splitlines() if "PERMANENT" not in line.split()]
        if not learned:
            return
        for words in learned:
            netvm.ns.run("ip", fam, "neigh", "del", addr, "dev", words[words.index("dev") + 1], check=False)
        time.sleep(PROXY_DELAY)  # a request still queued for a proxy answer teaches it again meanwhile
    raise AssertionError(f"cannot make the netvm forget {addr}: {learned}")


ATTACKER_MAC = "00:16:3e:ba:d0:01"
#: Longer than the kernel's proxy_delay (0.8 s by default): a request for another vif's address is
#: answered, and its sender learned, only after a random delay up to that.
PROXY_DELAY = 1.0
ARP_CLAIMS = {"another VM's address": "10.137.0.6", "the gateway": GATEWAY}


@pytest.mark.parametrize("claimed", list(ARP_CLAIMS.values()), ids=list(ARP_CLAIMS))
@pytest.mark.parametrize("form", ["request", "reply"])
@pytest.mark.parametrize("mac", ["own", "made-up"])
def test_a_gratuitous_arp_from_a_vm_changes_no_neighbour_entry(
    bare: Topology, claimed: str, form: str, mac: str,
) -> None:
    t, g = bare, bare.a
    sender = g.mac if mac == "own" else ATTACKER_MAC
    _forget_learned(t.netvm, claimed)
    before = _neighbours(t.netvm, claimed)
    op, target_mac = (1, "00:00:00:00:00:00") if form == "request" else (2, "ff:ff:ff:ff:ff:ff")
    send_frames(g, *[arp(op, sender, claimed, target_mac, claimed)] * 3)
    time.sleep(PROXY_DELAY)
    assert _neighbours(t.netvm, claimed) == before


def test_a_crafted_arp_request_for_the_gateway_is_answered(bare: Topology) -> None:
    """Control for the ARP tests: the same crafting, a genuine question, gets its answer."""
    g = bare.a
    summary = capture(g.ns, "vmnic0", f"arp and arp[6:2] == 2 and src host {GATEWAY}", lambda: (
        send_frames(g, arp(1, g.mac, g.ip4, "00:00:00:00:00:00", GATEWAY)), time.sleep(0.3)))
    assert "0 packets captured" not in summary, summary


NDP_CLAIMS = {"another VM's address": f"{VM6_NET}::6", "the gateway": GATEWAY6}


@pytest.mark.parametrize("claimed", list(NDP_CLAIMS.values()), ids=list(NDP_CLAIMS))
@pytest.mark.parametrize("source", ["own", "link-local"])
def test_an_unsolicited_neighbour_advertisement_from_a_vm_changes_no_neighbour_entry(
    bare: Topology, claimed: str, source: str,
) -> None:
    t, g = bare, bare.a
    assert g.ip6 is not None
    src = g.ip6 if source == "own" else link_local(g.mac)
    _forget_learned(t.netvm, claimed)
    before = _neighbours(t.netvm, claimed)
    send_frames(g, *[neighbour_advert(g.mac, src, claimed)] * 3)
    time.sleep(PROXY_DELAY)
    assert _neighbours(t.netvm, claimed) == before


def test_a_crafted_neighbour_solicitation_for_the_gateway_is_answered(bare: Topology) -> None:
    """Control for the NDP tests: the same ICMPv6 crafting, a genuine question, gets its answer."""
    g = bare.a
    assert g.ip6 is not None
    summary = capture(g.ns, "vmnic0", "icmp6 and ip6[40] == 136", lambda: (
        send_frames(g, neighbour_solicit(g.mac, g.ip6, GATEWAY6)), time.sleep(0.3)))
    assert "0 packets captured" not in summary, summary


# --- VM to VM, VM to the netvm (after init) -------------------------------------------------------


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_vm_to_vm_traffic_is_dropped(initialized: Topology, v6: bool) -> None:
    t, a, b = initialized, initialized.a, initialized.b
    dst, src = (b.ip6, a.ip6) if v6 else (b.ip4, a.ip4)
    assert dst is not None and src is not None
    port = t.port()
    summary, got = attack_and_control(
        b.ns, dst, port, t.netvm.tmp / f"v{port}.log", t.netvm.ns, b.vif,
        lambda: send_frames(a, *[_udp(v6)(a.mac, src, dst, FORGED_PORT, port, "vm-to-vm")] * 2),
        lambda: udp_send(t.netvm.ns, GATEWAY6 if v6 else GATEWAY, dst, port, "control"), "control",
    )
    assert nothing_captured(summary), summary
    assert got == [f"{GATEWAY6 if v6 else GATEWAY} control"]


_TCP_LISTEN = """
import socket, sys
addr, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((addr, port))
s.listen(8)
print("ready", flush=True)
while True:
    c, peer = s.accept()
    with open(path, "a") as f:
        f.write(f"{peer[0]}\\n")
    c.close()
"""

_TCP_CONNECT = """
import socket, sys
addr, port = sys.argv[1], int(sys.argv[2])
try:
    socket.create_connection((addr, port), timeout=2).close()
    print("connected")
except OSError as exc:
    print(f"failed: {exc}")
"""

NETVM_ADDRESSES = {"gateway": GATEWAY, "uplink address": NETVM_UP4, "gateway6": GATEWAY6, "DNS1": DNS1}


def _ping(g: Guest, host: str) -> bool:
    proc = g.ns.run(sys.executable, "-m", "vif_hotplug.lab.probe", "ping", host, "--wait", "3", check=False)
    return proc.returncode == 0


@pytest.mark.parametrize("addr", list(NETVM_ADDRESSES.values()), ids=list(NETVM_ADDRESSES))
def test_a_vm_gets_nothing_through_to_a_udp_port_of_the_netvm(initialized: Topology, addr: str) -> None:
    t, a = initialized, initialized.a
    port = t.port()
    log = t.netvm.tmp / f"in{port}.log"
    if addr == DNS1:
        t.netvm.ns.run("ip", "addr", "add", f"{DNS1}/32", "dev", "lo")  # as if the netvm ran a resolver there
    listener = udp_listen(t.netvm.ns, addr, port, log)
    try:
        udp_send(a.ns, a.ip6 if ":" in addr else a.ip4, addr, port, "to-netvm")
        # Control: ICMP from the same VM to the netvm is answered (the path works).
        assert _ping(a, GATEWAY6 if ":" in addr else GATEWAY)
        time.sleep(0.2)
    finally:
        listener.kill()
        listener.wait()
        if addr == DNS1:
            t.netvm.ns.run("ip", "addr", "del", f"{DNS1}/32", "dev", "lo")
    assert not log.exists() or log.read_text() == ""


@pytest.mark.parametrize("addr", [GATEWAY, NETVM_UP4, GATEWAY6], ids=["gateway", "uplink address", "gateway6"])
def test_a_vm_cannot_open_a_tcp_connection_to_the_netvm(initialized: Topology, addr: str) -> None:
    t, a = initialized, initialized.a
    port = t.port()
    log = t.netvm.tmp / f"tcp{port}.log"
    listener = t.netvm.ns.popen([sys.executable, "-c", _TCP_LISTEN, addr, str(port), str(log)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
        result = a.ns.run(sys.executable, "-c", _TCP_CONNECT, addr, str(port)).stdout.strip()
        assert _ping(a, GATEWAY6 if ":" in addr else GATEWAY)
    finally:
        listener.kill()
        listener.wait()
    assert result.startswith("failed"), result
    assert not log.exists() or log.read_text() == ""
