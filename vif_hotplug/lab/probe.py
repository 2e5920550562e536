"""Small network probes the lab runs inside its namespaces (``python -m vif_hotplug.lab_probe``).

Each subcommand is started by :mod:`vif_hotplug.lab` through ``ip netns
exec``, so it only ever sees the namespace it was put in:

* ``serve --port P``: the uplink's server, TCP and UDP on every address of
  both families. A TCP client sending ``hello`` gets back the address it was
  seen from (the NAT check); ``count TOKEN`` returns how many UDP datagrams
  carried ``TOKEN`` (the anti-spoofing checks). Prints ``ready`` once bound;
  runs until SIGTERM.
* ``connect HOST PORT``: prints the address the server saw us as.
* ``query HOST PORT TOKEN``: prints the server's count for ``TOKEN``.
* ``send-udp SRC DST PORT TOKEN``: sends ``TOKEN`` from ``SRC`` to ``DST``;
  ``SRC`` may be any address (a transparent socket, so forging a source needs
  no address change in the namespace).
* ``listen-udp PORT TOKEN``: prints ``ready``, counts datagrams carrying
  ``TOKEN`` until its standard input closes, then prints the count.
* ``ping HOST [--wait S]``: one ICMP or ICMPv6 echo over a raw socket; exit
  0 on a reply (so the lab needs no ``ping`` binary; unprivileged ICMP
  sockets are off in a fresh namespace anyway).

Exit status 0 on success, 1 on a network error (one line on stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Sequence
from types import FrameType

TIMEOUT = 3.0
_MAX = 512


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _bind_all(kind: socket.SocketKind, port: int) -> list[socket.socket]:
    """One socket per family on the wildcard address (IPv6 one is v6-only)."""
    out = []
    for fam, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        s = socket.socket(fam, kind)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((addr, port))
        if kind == socket.SOCK_STREAM:
            s.listen(16)
        out.append(s)
    return out


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def serve(port: int) -> int:
    """The uplink server: answers ``hello`` with the peer address, ``count T`` with a tally."""
    signal.signal(signal.SIGTERM, _stop)
    listeners = _bind_all(socket.SOCK_STREAM, port)
    datagrams = _bind_all(socket.SOCK_DGRAM, port)
    seen: dict[str, int] = {}
    print("ready", flush=True)
    while True:
        ready, _, _ = select.select(listeners + datagrams, [], [])
        for s in ready:
            if s in datagrams:
                data, _peer = s.recvfrom(_MAX)
                token = data.decode("ascii", "replace").strip()
                seen[token] = seen.get(token, 0) + 1
                continue
            conn, peer = s.accept()
            with conn:
                conn.settimeout(TIMEOUT)
                with contextlib.suppress(OSError):
                    line = conn.recv(_MAX).decode("ascii", "replace").split()
                    if line[:1] == ["hello"]:
                        reply = str(peer[0])
                    elif line[:1] == ["count"] and len(line) == 2:
                        reply = str(seen.get(line[1], 0))
                    else:
                        reply = "error"
                    conn.sendall(reply.encode() + b"\n")


def _ask(host: str, port: int, message: str) -> str:
    with socket.create_connection((host, port), timeout=TIMEOUT) as s:
        s.sendall(message.encode() + b"\n")
        return s.recv(_MAX).decode("ascii", "replace").strip()


#: linux/in.h IP_TRANSPARENT and linux/in6.h IPV6_TRANSPARENT: bind to and send
#: from an address the host does not own (needs CAP_NET_ADMIN).
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75


def send_udp(src: str, dst: str, port: int, token: str, count: int = 3) -> None:
    fam = _family(dst)
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        else:
            s.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
        s.bind((src, 0))
        for _ in range(count):
            s.sendto(token.encode(), (dst, port))


def listen_udp(port: int, token: str) -> int:
    socks = _bind_all(socket.SOCK_DGRAM, port)
    print("ready", flush=True)
    count = 0
    stdin = sys.stdin.fileno()
    while True:
        ready, _, _ = select.select([*socks, stdin], [], [])
        if stdin in ready and not os.read(stdin, _MAX):
            break
        for s in socks:
            if s in ready:
                data, _peer = s.recvfrom(_MAX)
                count += data.decode("ascii", "replace").strip() == token
    return count


def _checksum(data: bytes) -> int:
    """RFC 1071 Internet checksum."""
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ping(host: str, wait: float) -> bool:
    """Send one echo request to ``host``; whether a matching echo reply came within ``wait`` seconds."""
    v6 = ":" in host
    ident, payload = os.getpid() & 0xFFFF, b"vif-hotplug-lab"
    request_type, reply_type = (128, 129) if v6 else (8, 0)
    header = struct.pack("!BBHHH", request_type, 0, 0, ident, 1)
    # The kernel fills in the ICMPv6 checksum (it covers the IPv6 pseudo-header).
    checksum = 0 if v6 else _checksum(header + payload)
    packet = struct.pack("!BBHHH", request_type, 0, checksum, ident, 1) + payload
    fam, proto = (socket.AF_INET6, socket.IPPROTO_ICMPV6) if v6 else (socket.AF_INET, socket.IPPROTO_ICMP)
    with socket.socket(fam, socket.SOCK_RAW, proto) as s:
        s.sendto(packet, (host, 0))
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([s], [], [], left)
            if not ready:
                break
            data, peer = s.recvfrom(2048)
            if not v6:
                data = data[(data[0] & 0x0F) * 4 :]  # IPv4 raw sockets include the IP header
            if len(data) < 8 or peer[0] != socket.getaddrinfo(host, None, fam)[0][4][0]:
                continue
            rtype, _code, _sum, rid, _seq = struct.unpack("!BBHHH", data[:8])
            if rtype == reply_type and rid == ident:
                return True
    return False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vif_hotplug.lab_probe", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("serve").add_argument("--port", type=int, required=True)
    c = sub.add_parser("connect")
    c.add_argument("host")
    c.add_argument("port", type=int)
    q = sub.add_parser("query")
    q.add_argument("host")
    q.add_argument("port", type=int)
    q.add_argument("token")
    s = sub.add_parser("send-udp")
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("port", type=int)
    s.add_argument("token")
    ln = sub.add_parser("listen-udp")
    ln.add_argument("port", type=int)
    ln.add_argument("token")
    pg = sub.add_parser("ping")
    pg.add_argument("host")
    pg.add_argument("--wait", type=float, default=2.0)
    return p


def run(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        if ns.cmd == "serve":
            return serve(ns.port)
        if ns.cmd == "connect":
            print(_ask(ns.host, ns.port, "hello"))
        elif ns.cmd == "query":
            print(_ask(ns.host, ns.port, f"count {ns.token}"))
        elif ns.cmd == "send-udp":
            send_udp(ns.src, ns.dst, ns.port, ns.token)
        elif ns.cmd == "listen-udp":
            print(listen_udp(ns.port, ns.token), flush=True)
        elif ns.cmd == "ping":
            answered = ping(ns.host, ns.wait)
            print(f"{ns.host}: {'reply' if answered else 'no reply'}")
            return 0 if answered else 1
    except OSError as exc:
        print(f"lab_probe {ns.cmd}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run())
