"""Capture the kernel's netlink answers that tests/unit/data/netlink/*.json replay.

Run as root: ``.venv/bin/python tests/capture_netlink.py [OUTDIR]`` (default
``tests/unit/data/netlink``). The script moves itself into a fresh network
namespace (``unshare(CLONE_NEWNET)``, gone when it exits; the host's is
never touched), builds a small netvm there with ``ip``, ``nft``, ``ipset``
and a second namespace for a veth peer, then sends this package's own
requests (:class:`~vif_hotplug.kernel.rtnl.Rtnl`, :class:`~vif_hotplug.kernel.nfnl.Nfnl`)
through a recording socket: every datagram sent and received (and every
error a receive returned) goes into one JSON file per scenario, with the
kernel release and the socket options that were on. Some scenarios refuse
a socket option (``ENOPROTOOPT``) to get the answers of a kernel without
it: strict checking (before 4.20) or capped ACKs (before 4.3).

Recapture after changing an encoder (the replay checks that each request
has the captured type and flags) or to refresh the fixtures from a newer
kernel; the unit tests compare the decoders with pyroute2 on whatever was
captured, so they do not depend on the exact bytes.
"""

from __future__ import annotations

import base64
import ctypes
import errno
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vif_hotplug.kernel import nlsock  # noqa: E402
from vif_hotplug.kernel.nfnl import Nfnl, nft_key  # noqa: E402
from vif_hotplug.kernel.nlsock import NetlinkError, NetlinkSocket  # noqa: E402
from vif_hotplug.kernel.rtnl import RTM_GETROUTE, RTM_NEWROUTE, RTN_UNICAST, RTPROT_STATIC, Rtnl  # noqa: E402

CLONE_NEWNET = 0x40000000
OPTION_NAMES = {nlsock.NETLINK_CAP_ACK: "NETLINK_CAP_ACK", nlsock.NETLINK_EXT_ACK: "NETLINK_EXT_ACK",
                nlsock.NETLINK_GET_STRICT_CHK: "NETLINK_GET_STRICT_CHK"}


class Recorder:
    """A kernel netlink socket that keeps every exchange: what was sent, what came back."""

    def __init__(self, protocol: int, refuse: frozenset[int] = frozenset(), rcvbuf: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.refuse = refuse
        self.options: list[str] = []
        self.exchanges: list[dict[str, Any]] = []
        #: Called once, after the next datagram received (to change something in the middle of a dump).
        self.after_next: Callable[[], None] | None = None

    def setsockopt(self, level: int, option: int, value: int, /) -> None:
        if option in self.refuse:
            raise OSError(errno.ENOPROTOOPT, os.strerror(errno.ENOPROTOOPT))
        self.sock.setsockopt(level, option, value)
        self.options.append(OPTION_NAMES.get(option, str(option)))

    def bind(self, address: tuple[int, int], /) -> None:
        self.sock.bind(address)

    def send(self, data: bytes, /) -> int:
        self.exchanges.append({"sent": base64.b64encode(data).decode(), "received": []})
        return self.sock.send(data)

    def recv_into(self, buffer: bytearray, nbytes: int = 0, flags: int = 0, /) -> int:
        received = self.exchanges[-1]["received"]
        try:
            n = self.sock.recv_into(buffer, nbytes, flags)
        except BlockingIOError:
            raise
        except OSError as exc:
            received.append({"error": errno.errorcode[exc.errno or 0]})
            raise
        if n > len(buffer):
            raise SystemExit(f"a datagram of {n} bytes was cut to {len(buffer)}: capture with a larger buffer")
        received.append(base64.b64encode(bytes(buffer[:n])).decode())
        hook, self.after_next = self.after_next, None
        if hook is not None:
            hook()
        return n

    def close(self) -> None:
        self.sock.close()


def sh(script: str) -> None:
    subprocess.run(["sh", "-ec", script], check=True)


class Capture:
    def __init__(self, outdir: Path) -> None:
        self.outdir = outdir
        self.release = os.uname().release

    def run(self, name: str, about: str, make: Callable[[Callable[[int], Recorder]], NetlinkSocket],
            body: Callable[[Any, Recorder], object], refuse: frozenset[int] = frozenset(),
            rcvbuf: int | None = None) -> None:
        recorders: list[Recorder] = []

        def opener(protocol: int) -> Recorder:
            rec = Recorder(protocol, refuse, rcvbuf)
            recorders.append(rec)
            return rec

        sock = make(opener)
        sock.open()
        try:
            result = body(sock, recorders[0])
            outcome: object = {"returned": repr(result)}
        except NetlinkError as exc:
            outcome = {"raised": type(exc).__name__, "errno": errno.errorcode.get(exc.errno or 0), "text": exc.strerror}
        finally:
            sock.close()
        rec = recorders[0]
        doc = {
            "about": about,
            "kernel": self.release,
            "captured_by": "tests/capture_netlink.py",
            "socket_options": rec.options,
            "refused_options": sorted(OPTION_NAMES[o] for o in refuse),
            "receive_buffer": rcvbuf,
            "outcome_at_capture": outcome,
            "exchanges": rec.exchanges,
        }
        path = self.outdir / f"{name}.json"
        path.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"{path.name}: {len(rec.exchanges)} exchange(s), {outcome}")


NETVM = """
ip link set lo up
ip link add vif5.0 type veth peer name eth0
ip link set eth0 netns {peer_pid}
ip link set vif5.0 group 2 alias vif5.0-netback address fe:ff:ff:ff:ff:ff up
ip addr add 10.137.0.1/32 dev vif5.0
ip -6 addr add fd09:24ef:4179::a89:1/128 dev vif5.0 nodad
ip route add 10.137.0.5/32 dev vif5.0 metric 32752
ip route add 10.137.0.6/32 dev vif5.0 metric 32752
ip -6 route add fd09:24ef:4179::a89:5/128 dev vif5.0 metric 32752
ip neigh add 10.137.0.5 lladdr 00:16:3e:5e:6c:05 dev vif5.0 nud permanent
ip link add uplink0 type veth peer name uplink1
ip link set uplink0 up
ip link set uplink1 up
ip addr add 192.0.2.1/24 dev uplink0
ip route add default via 192.0.2.2 dev uplink0
nft add table ip qubes
nft add set ip qubes allowed '{{ type ifname . ipv4_addr; }}'
nft add element ip qubes allowed '{{ "vif5.0" . 10.137.0.5 }}'
nft add table ip t
nft add chain ip t o '{{ type filter hook output priority 0; }}'
nft add rule ip t o ct state new accept
ipset create qa hash:net,iface
ipset add qa 10.137.0.5/32,vif5.0
"""


def main() -> None:
    if os.geteuid() != 0:
        raise SystemExit("capture_netlink: run as root (it creates network namespaces)")
    outdir = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests/unit/data/netlink"
    outdir.mkdir(parents=True, exist_ok=True)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        raise SystemExit(f"unshare: {os.strerror(ctypes.get_errno())}")
    # The veth peer's namespace: a process of ours sitting in a namespace of its own.
    peer = subprocess.Popen(["unshare", "--net", "sleep", "600"])
    try:
        for _ in range(100):
            if os.readlink(f"/proc/{peer.pid}/ns/net") != os.readlink("/proc/self/ns/net"):
                break
            subprocess.run(["sleep", "0.05"], check=True)
        sh(NETVM.format(peer_pid=peer.pid))
        capture(Capture(outdir))
    finally:
        peer.kill()
        peer.wait()


def capture(c: Capture) -> None:
    vif = socket.if_nametoindex("vif5.0")
    uplink = socket.if_nametoindex("uplink0")
    no_strict = frozenset({nlsock.NETLINK_GET_STRICT_CHK})
    no_cap = frozenset({nlsock.NETLINK_CAP_ACK})

    c.run("link_get", "RTM_GETLINK of vif5.0 by name: one RTM_NEWLINK (veth, peer in another namespace, "
          "group 2, alias), then the ACK", Rtnl, lambda r, _: r.link("vif5.0"))
    c.run("link_get_missing", "RTM_GETLINK of a name no device has: ENODEV", Rtnl, lambda r, _: r.link("nosuch0"))
    c.run("link_dump", "RTM_GETLINK dump: lo, vif5.0, uplink0, uplink1 in several messages, then DONE",
          Rtnl, lambda r, _: r.links())
    c.run("addr_dump_strict", "RTM_GETADDR dump of vif5.0 with strict checking: the kernel sends vif5.0's only",
          Rtnl, lambda r, _: r.addresses(vif))
    c.run("addr_dump_unfiltered", "RTM_GETADDR dump of vif5.0 without strict checking (a kernel before 4.20): "
          "every address of every link", Rtnl, lambda r, _: r.addresses(vif), refuse=no_strict)
    c.run("route_dump_strict", "RTM_GETROUTE dump (IPv4, main table, oif vif5.0) with strict checking",
          Rtnl, lambda r, _: r.routes(vif, socket.AF_INET))
    c.run("route_dump_unfiltered", "RTM_GETROUTE dump (IPv4, oif vif5.0) without strict checking: every route "
          "of every table", Rtnl, lambda r, _: r.routes(vif, socket.AF_INET), refuse=no_strict)
    c.run("route_dump6_strict", "RTM_GETROUTE dump (IPv6, main table, oif vif5.0) with strict checking",
          Rtnl, lambda r, _: r.routes(vif, socket.AF_INET6))
    c.run("route_get", "RTM_GETROUTE of 10.137.0.5 with RTM_F_FIB_MATCH: the host route", Rtnl,
          lambda r, _: r.route_lookup("10.137.0.5"))
    c.run("neigh_get", "RTM_GETNEIGH of 10.137.0.5 on vif5.0: the permanent entry", Rtnl,
          lambda r, _: r.neighbour(vif, "10.137.0.5"))
    c.run("addr_add_ack", "RTM_NEWADDR of a new address: the ACK (error 0)", Rtnl,
          lambda r, _: r.address("add", uplink, "198.51.100.1/32"))
    c.run("addr_add_exists", "RTM_NEWADDR of an address that is there: EEXIST", Rtnl,
          lambda r, _: r.address("add", uplink, "198.51.100.1/32"))

    def bad_prefix(r: Rtnl, _: Recorder) -> object:
        # Not expressible through Rtnl.route (ip_network is strict): the raw request.
        body = bytes([socket.AF_INET, 24, 0, 0, 254, RTPROT_STATIC, 0, RTN_UNICAST]) + nlsock.u32(0)
        body += nlsock.attr(1, bytes([10, 0, 0, 1])) + nlsock.attr(4, nlsock.u32(vif))
        return r.request(RTM_NEWROUTE, nlsock.NLM_F_CREATE | nlsock.NLM_F_EXCL, body)

    c.run("route_add_bad_prefix", "RTM_NEWROUTE of 10.0.0.1/24: EINVAL with the kernel's message (capped ACK, "
          "extended ACK)", Rtnl, bad_prefix)
    long_name = "x" * 30
    c.run("link_set_long_name", "RTM_SETLINK with a 30-byte IFLA_IFNAME: ERANGE, 'Attribute failed policy "
          "validation', the offset of the attribute and its policy (capped ACK)", Rtnl,
          lambda r, _: r.set_link(vif, name=long_name))
    c.run("link_set_long_name_uncapped", "The same without NETLINK_CAP_ACK: the error echoes the whole request "
          "before its TLVs", Rtnl, lambda r, _: r.set_link(vif, name=long_name), refuse=no_cap)

    def interrupted(r: Rtnl, rec: Recorder) -> object:
        sh("for i in $(seq 1 17); do ip link add d$i type veth peer name e$i; done")
        # The first datagram of the first dump is in: a new link moves the
        # namespace's dev_base_seq and the dump's next messages say so.
        rec.after_next = lambda: sh("ip link add late0 type veth peer name late1")
        return len(r.links())

    c.run("link_dump_interrupted", "RTM_GETLINK dump of 39 links with a link added after its first datagram: "
          "a message flagged NLM_F_DUMP_INTR, DONE; then the retry, whole", Rtnl, interrupted)

    def bad_dump(r: Rtnl, _: Recorder) -> object:
        # A destination length in a FIB dump request: refused by the dump itself, in its DONE.
        body = bytes([socket.AF_INET, 8, 0, 0, 254, 0, 0, 0]) + nlsock.u32(0)
        return r.request(RTM_GETROUTE, nlsock.NLM_F_DUMP, body)

    c.run("route_dump_bad_header", "RTM_GETROUTE dump with rtm_dst_len set under strict checking: the dump "
          "fails, its errno and message in the DONE", Rtnl, bad_dump)

    def overrun(r: Rtnl, _: Recorder) -> object:
        return r.link("vif5.0")

    c.run("link_get_overrun", "RTM_GETLINK with SO_RCVBUF at its minimum: the reply fills the queue, the ACK is "
          "dropped (ENOBUFS, then the reply, then nothing); every retry alike", Rtnl, overrun, rcvbuf=1)

    # --- netfilter ---------------------------------------------------------------
    c.run("nft_getgen", "NFT_MSG_GETGEN: NFT_MSG_NEWGEN with the generation, then the ACK", Nfnl,
          lambda n, _: n.nft_genid())
    key = nft_key("10.137.0.5", "vif5.0")
    c.run("nft_getelem_present", "NFT_MSG_GETSETELEM of an element of ip qubes allowed", Nfnl,
          lambda n, _: n.nft_element("get", 4, "qubes", "allowed", key))
    c.run("nft_getelem_missing_set", "NFT_MSG_GETSETELEM in a set that does not exist: ENOENT", Nfnl,
          lambda n, _: n.nft_element("get", 4, "qubes", "nosuchset", key))
    c.run("nft_newelem_exists", "A batch adding an element that is there (NLM_F_EXCL): EEXIST", Nfnl,
          lambda n, _: n.nft_element("add", 4, "qubes", "allowed", key))
    c.run("ipset_test_absent", "IPSET_CMD_TEST of a non-member: ipset's IPSET_ERR_EXIST (4103)", Nfnl,
          lambda n, _: n.ipset_element("test", "qa", 4, "10.137.0.9/32", "vif5.0"))
    c.run("ipset_header_missing", "IPSET_CMD_HEADER of a set that does not exist: ENOENT", Nfnl,
          lambda n, _: n.ipset_exists("nosuch"))

    def conntrack(n: Nfnl, _: Recorder) -> object:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for last in (2, 3, 4):
            s.sendto(b"x", (f"127.0.0.{last}", 9999))
        s.close()
        return n.conntrack_purge(["127.0.0.3"])

    c.run("conntrack_purge", "IPCTNL_MSG_CT_GET dump of three UDP entries, then the IPCTNL_MSG_CT_DELETE of "
          "127.0.0.3's", Nfnl, conntrack)


if __name__ == "__main__":
    main()
