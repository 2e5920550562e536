"""Small network probes for the lab and the functional tests (``python -m vif_hotplug.lab.probe``).

Standard library only. A probe is always started through ``ip netns exec``
(or ``nsenter``) by its caller, so it only ever sees the namespace it was
put in; :func:`command` and the ``*_argv`` helpers build the argv, for
example ``("ip", "netns", "exec", NS, *send_udp_argv(src, dst, 5000, "x", count=1))``.

Subcommands:

``serve --port P``
    The uplink's server: TCP and UDP on port ``P`` of every address of both
    families. A TCP client sending ``hello`` gets back the address it was
    seen from (the NAT check); ``count TOKEN`` returns how many UDP
    datagrams carried exactly ``TOKEN``. Prints ``ready`` once bound; runs
    until SIGTERM (exit 0).
``connect HOST PORT``
    Prints the address the server saw us as.
``query HOST PORT TOKEN``
    Prints the server's count for ``TOKEN``.
``send-udp SRC DST PORT TOKEN [--count N]``
    Sends ``N`` datagrams (default 3) with payload ``TOKEN`` from ``SRC`` to
    ``DST``. ``SRC`` may be any address, local or not: the socket is
    transparent (``IP_TRANSPARENT``, needs CAP_NET_ADMIN), so forging a
    source needs no address change in the namespace.
``listen-udp PORT [TOKEN] [--bind ADDR] [--log FILE]``
    Binds UDP ``PORT`` on ``ADDR`` (default: the wildcard address of both
    families) and prints ``ready``. With ``--log``, appends one line
    ``SOURCE PAYLOAD`` per datagram to ``FILE`` (written whole, so a reader
    polling the file never sees half a line). With ``TOKEN``, counts the
    datagrams whose payload is exactly ``TOKEN``, and when its standard
    input reaches end of file prints the count and exits. Without ``TOKEN``
    it ignores standard input and runs until SIGTERM (exit 0) or killed.
``ping HOST [--wait S]``
    One ICMP or ICMPv6 echo over a raw socket (so no ``ping`` binary is
    needed; unprivileged ICMP sockets are off in a fresh namespace anyway).
    Prints ``HOST: reply`` or ``HOST: no reply``; exit 0 only on a reply.

Exit status: 0 success, 1 a network error (one line on stderr, ``ping``:
no reply), 2 usage error.
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

MODULE = "vif_hotplug.lab.probe"
TIMEOUT = 3.0
#: Datagrams ``send-udp`` sends unless told otherwise.
DEFAULT_COUNT = 3
_MAX = 2048


# --- argv builders, for callers -------------------------------------------------------


def command(*args: str, python: str = sys.executable) -> tuple[str, ...]:
    """``python -m vif_hotplug.lab.probe ARGS...`` (prefix it with ``ip netns exec NS``)."""
    return (python, "-m", MODULE, *args)


def send_udp_argv(
    src: object, dst: object, port: int, token: str, *, count: int = DEFAULT_COUNT, python: str = sys.executable
) -> tuple[str, ...]:
    return command("send-udp", str(src), str(dst), str(port), token, "--count", str(count), python=python)


def listen_udp_argv(
    port: int, token: str | None = None, *, bind: object | None = None, log: str | None = None,
    python: str = sys.executable,
) -> tuple[str, ...]:
    args = ["listen-udp", str(port)]
    if token is not None:
        args.append(token)
    if bind is not None:
        args += ["--bind", str(bind)]
    if log is not None:
        args += ["--log", log]
    return command(*args, python=python)


# --- the probes --------------------------------------------------------------------------


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _bind(kind: socket.SocketKind, port: int, addr: str | None = None) -> list[socket.socket]:
    """One socket on ``addr``, or one per family on the wildcard address (the IPv6 one v6-only)."""
    targets = [(_family(addr), addr)] if addr else [(socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")]
    out = []
    for fam, host in targets:
        s = socket.socket(fam, kind)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6 and not addr:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((host, port))
        if kind == socket.SOCK_STREAM:
            s.listen(16)
        out.append(s)
    return out


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def serve(port: int) -> int:
    """The uplink server: answers ``hello`` with the peer address, ``count T`` with a tally."""
    signal.signal(signal.SIGTERM, _stop)
    listeners = _bind(socket.SOCK_STREAM, port)
    datagrams = _bind(socket.SOCK_DGRAM, port)
    seen: dict[str, int] = {}
    print("ready", flush=True)
    while True:
        ready, _, _ = select.select(listeners + datagrams, [], [])
        for s in ready:
            if s in datagrams:
                data, _peer = s.recvfrom(_MAX)
                token = data.decode("ascii", "replace")
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


def send_udp(src: str, dst: str, port: int, token: str, count: int = DEFAULT_COUNT) -> None:
    fam = _family(dst)
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        else:
            s.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
        s.bind((src, 0))
        for _ in range(count):
            s.sendto(token.encode(), (dst, port))


def _append(path: str, line: str) -> None:
    # One write(2) of the whole line on an O_APPEND file: readers see it whole.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def listen_udp(port: int, token: str | None, bind: str | None = None, log: str | None = None) -> int:
    """Receive; with ``token`` until stdin closes, then return the count; without, until SIGTERM."""
    signal.signal(signal.SIGTERM, _stop)
    socks = _bind(socket.SOCK_DGRAM, port, bind)
    print("ready", flush=True)
    count = 0
    watched: list[socket.socket | int] = [*socks]
    # Standard input only matters when counting (a logging listener may have none).
    stdin = sys.stdin.fileno() if token is not None else -1
    if token is not None:
        watched.append(stdin)
    while True:
        ready, _, _ = select.select(watched, [], [])
        if stdin in ready and not os.read(stdin, _MAX):
            return count
        for s in socks:
            if s in ready:
                data, peer = s.recvfrom(_MAX)
                payload = data.decode("utf-8", "replace")
                if log is not None:
                    _append(log, f"{peer[0]} {payload}\n")
                count += payload == token


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
    want = socket.getaddrinfo(host, None, fam)[0][4][0]
    with socket.socket(fam, socket.SOCK_RAW, proto) as s:
        s.sendto(packet, (host, 0))
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([s], [], [], left)
            if not ready:
                break
            data, peer = s.recvfrom(_MAX)
            if not v6:
                data = data[(data[0] & 0x0F) * 4 :]  # IPv4 raw sockets include the IP header
            if len(data) < 8 or peer[0] != want:
                continue
            rtype, _code, _sum, rid, _seq = struct.unpack("!BBHHH", data[:8])
            if rtype == reply_type and rid == ident:
                return True
    return False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description="Network probes for the lab and tests.")
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
    s.add_argument("--count", type=int, default=DEFAULT_COUNT)
    ln = sub.add_parser("listen-udp")
    ln.add_argument("port", type=int)
    ln.add_argument("token", nargs="?")
    ln.add_argument("--bind", metavar="ADDR")
    ln.add_argument("--log", metavar="FILE")
    pg = sub.add_parser("ping")
    pg.add_argument("host")
    pg.add_argument("--wait", type=float, default=2.0)
    return p


def run(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    ns = p.parse_args(argv)
    if ns.cmd == "listen-udp" and ns.token is None and ns.log is None:
        p.error("listen-udp needs a TOKEN to count or --log FILE")
    if ns.cmd == "send-udp" and ns.count < 1:
        p.error("--count must be at least 1")
    try:
        if ns.cmd == "serve":
            return serve(ns.port)
        if ns.cmd == "connect":
            print(_ask(ns.host, ns.port, "hello"))
        elif ns.cmd == "query":
            print(_ask(ns.host, ns.port, f"count {ns.token}"))
        elif ns.cmd == "send-udp":
            send_udp(ns.src, ns.dst, ns.port, ns.token, ns.count)
        elif ns.cmd == "listen-udp":
            print(listen_udp(ns.port, ns.token, ns.bind, ns.log), flush=True)
        elif ns.cmd == "ping":
            answered = ping(ns.host, ns.wait)
            print(f"{ns.host}: {'reply' if answered else 'no reply'}")
            return 0 if answered else 1
    except OSError as exc:
        print(f"probe {ns.cmd}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run())
