"""How an event's XenStore reads should travel: pipelined in one send, one write per request, or one at a time.

An online event reads its keys in one batch (``Prefetched``: the backend
keys, the netvm's keys, the connected-ips keys). On xenstored's socket the
batch may go in one ``send`` (the daemon reads a stream); the xenbus device
takes one message per ``write`` (docs/xenstore.md). This measures, on the
socket of the embedded xenstored (its own process, so client and server do
not share an interpreter), per batch:

* ``one send``: every request in one ``send``, then the replies (what the
  client does on the socket);
* ``write each``: one ``send`` per request, then the replies (what the client
  does on the device; one code path if the socket did it too);
* ``one by one``: request, reply, request, reply... (no pipelining at all);
* ``XenStore.read_many``: the client itself (on the device: its writer thread).

With root and /dev/fuse it also runs the last two through the xenbus device
double (the only ways the driver allows), in both driver modes. Ratios are to
``one send`` on the socket, measured in the same run, rounds interleaved and
rotated, p50 of ``-n`` batches per cell after warm-up. A benchmark, not a test.

Run: ``sudo .venv/bin/python benchmarks/bench_xenstore_pipelining.py [-n 400]``
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vif_hotplug.core.netvm_params import CONNECTED_XENSTORE, QUBES_NAMES  # noqa: E402
from vif_hotplug.xen.xenstore_client import XenStore  # noqa: E402
from vif_hotplug.xen.xs_wire import Decoder, Message, Op, encode, join_args  # noqa: E402
from vif_hotplug.xenstore_env import BACKEND_KEYS  # noqa: E402

KEYS = [f"backend/vif/4/0/{k}" for k in BACKEND_KEYS] + list(QUBES_NAMES.values()) + list(CONNECTED_XENSTORE.values())


class Conn:
    """A raw connection (socket or device file) speaking whole messages."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.decoder = Decoder()
        self.req_id = 0

    def messages(self) -> list[bytes]:
        out = []
        for key in KEYS:
            self.req_id += 1
            out.append(encode(Message(Op.READ, self.req_id, 0, join_args(key.encode()))))
        return out

    def replies(self, count: int) -> None:
        got = 0
        while got < count:
            if self.decoder.next_message() is not None:
                got += 1
                continue
            self.decoder.feed(os.read(self.fd, 65536))

    def one_send(self) -> None:
        data = b"".join(self.messages())
        while data:
            data = data[os.write(self.fd, data):]
        self.replies(len(KEYS))

    def write_each(self) -> None:
        for message in self.messages():
            os.write(self.fd, message)
        self.replies(len(KEYS))

    def one_by_one(self) -> None:
        for message in self.messages():
            os.write(self.fd, message)
            self.replies(1)


@contextmanager
def xenstored(tmp: str) -> Iterator[str]:
    path = os.path.join(tmp, "xs.sock")
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from vif_hotplug.lab.xenstored import serve; "
                             "serve(sys.argv[1])", path], cwd=REPO, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(path):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("xenstored did not start")
            time.sleep(0.02)
        yield path
    finally:
        proc.terminate()
        proc.wait()


def device_available() -> bool:
    return os.geteuid() == 0 and os.path.exists("/dev/fuse")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=400, help="batches per cell (default 400)")
    p.add_argument("--warmup", type=int, default=50)
    args = p.parse_args()
    with ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-xs-"))
        store = stack.enter_context(xenstored(tmp))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(store)
        stack.callback(sock.close)
        for key in KEYS[:4]:  # some present, some absent, as in an event
            sock.sendall(encode(Message(Op.WRITE, 0, 0, join_args(key.encode()) + b"x")))
        Conn(sock.fileno()).replies(4)
        socket_conn = Conn(sock.fileno())
        cells: dict[str, Callable[[], None]] = {
            "socket: one send": socket_conn.one_send,
            "socket: write each": socket_conn.write_each,
            "socket: one by one": socket_conn.one_by_one,
        }
        client = stack.enter_context(XenStore(("unix", store)))
        cells["socket: XenStore.read_many"] = lambda: client.read_many(KEYS) and None
        if device_available():
            from tests.xenbus_double.double import XenbusDouble

            for mode, options in (("device", {}), ("device, write blocks", {"blocking_write": True})):
                double = stack.enter_context(XenbusDouble(store, **options).start())
                fd = os.open(double.path, os.O_RDWR)
                stack.callback(os.close, fd)
                conn = Conn(fd)
                cells[f"{mode}: write each"] = conn.write_each
                cells[f"{mode}: one by one"] = conn.one_by_one
                on_device = stack.enter_context(XenStore(("xenbus", double.path)))
                cells[f"{mode}: XenStore.read_many"] = lambda c=on_device: c.read_many(KEYS) and None  # type: ignore[misc]
        samples: dict[str, list[float]] = {name: [] for name in cells}
        names = list(cells)
        for round_no in range(args.warmup + args.n):
            for name in names[round_no % len(names):] + names[:round_no % len(names)]:
                start = time.perf_counter()
                cells[name]()
                elapsed = time.perf_counter() - start
                if round_no >= args.warmup:
                    samples[name].append(elapsed)
    base = statistics.median(samples["socket: one send"])
    print(f"{len(KEYS)} reads per batch, {args.n} batches per cell, p50 (p25-p75), ratio to socket: one send")
    for name, values in samples.items():
        q = statistics.quantiles(values, n=4)
        print(f"  {name:36} {statistics.median(values) * 1e6:8.0f} µs ({q[0] * 1e6:.0f}-{q[2] * 1e6:.0f})"
              f"  x{statistics.median(values) / base:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
