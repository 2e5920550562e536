"""Tiny UDP sender/listener run inside test namespaces (``python3 udp_probe.py ...``).

listen ADDR PORT FILE   print "ready", then append "SOURCE PAYLOAD" per datagram to FILE
send SRC DST PORT TEXT  send one datagram from SRC (must be a local address)
"""

from __future__ import annotations

import socket
import sys


def main(argv: list[str]) -> int:
    if argv[0] == "listen":
        addr, port, path = argv[1], int(argv[2]), argv[3]
        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.bind((addr, port))
        print("ready", flush=True)
        while True:
            data, peer = s.recvfrom(2048)
            with open(path, "a") as f:
                f.write(f"{peer[0]} {data.decode(errors='replace')}\n")
    if argv[0] == "send":
        src, dst, port, text = argv[1], argv[2], int(argv[3]), argv[4]
        fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.bind((src, 0))
        s.sendto(text.encode(), (dst, port))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
