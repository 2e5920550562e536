"""The xenbus device double keeps every rule of Linux's driver (``drivers/xen/xenbus/xenbus_dev_frontend.c``).

Each rule is checked with bare system calls on the FUSE file, the way any
client meets it; Xen's own libxenstore (xenstore-utils with
``XENSTORED_PATH`` naming the device) must work through it unchanged. Root
(FUSE mounts, mount namespaces) is needed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.xenbus_double.double import XenbusDouble
from vif_hotplug.lab.xenstored import XenStoreServer
from vif_hotplug.xen.xs_wire import HEADER_SIZE, Decoder, Header, Message, Op, encode, join_args

from .conftest import require_root

READABLE = select.POLLIN | select.POLLRDNORM
EVERYTHING = READABLE | select.POLLOUT | select.POLLWRNORM
#: Generous: only a broken double makes a test wait this long.
WAIT = 10.0


@pytest.fixture
def store(tmp_path: Path) -> Iterator[XenStoreServer]:
    require_root()
    server = XenStoreServer(str(tmp_path / "xs.sock"))
    server.start_in_thread()
    try:
        yield server
    finally:
        server.shutdown()


@pytest.fixture
def double(store: XenStoreServer) -> Iterator[XenbusDouble]:
    with XenbusDouble(store.socket_path).start() as d:
        yield d


def request(op: Op, req_id: int, *args: bytes, tail: bytes = b"") -> bytes:
    return encode(Message(op, req_id, 0, join_args(*args) + tail))


def replies(fd: int, count: int) -> list[Message]:
    """``count`` messages read from a blocking descriptor."""
    decoder, out = Decoder(), list[Message]()
    while len(out) < count:
        if (message := decoder.next_message()) is not None:
            out.append(message)
            continue
        decoder.feed(os.read(fd, 65536))
    return out


def polled(fd: int, timeout_ms: int) -> int:
    poller = select.poll()
    poller.register(fd, EVERYTHING)
    events = poller.poll(timeout_ms)
    return events[0][1] if events else 0


@pytest.fixture
def fd(double: XenbusDouble) -> Iterator[int]:
    descriptor = os.open(double.path, os.O_RDWR)
    try:
        yield descriptor
    finally:
        os.close(descriptor)


def test_poll_reports_nothing_while_no_reply_is_queued_never_writable(fd: int) -> None:
    assert polled(fd, 200) == 0


def test_poll_reports_readable_only_once_a_reply_is_queued(fd: int) -> None:
    os.write(fd, request(Op.READ, 1, b"absent"))
    assert polled(fd, int(WAIT * 1000)) == READABLE
    replies(fd, 1)
    assert polled(fd, 200) == 0


def test_a_write_acts_on_its_first_message_and_drops_what_follows(fd: int, double: XenbusDouble) -> None:
    data = request(Op.WRITE, 1, b"a", tail=b"1") + request(Op.READ, 2, b"a")
    assert os.write(fd, data) == len(data)
    assert [m.req_id for m in replies(fd, 1)] == [1]
    assert polled(fd, 300) == 0
    assert double.requests == 1 and double.violations == ["18 byte(s) after the first message of a write dropped"]


def test_a_message_split_across_writes_is_taken_when_complete(fd: int, double: XenbusDouble) -> None:
    data = request(Op.WRITE, 1, b"a", tail=b"hello")
    for piece in (data[:5], data[5:HEADER_SIZE + 1], data[HEADER_SIZE + 1:]):
        assert os.write(fd, piece) == len(piece)
    assert replies(fd, 1)[0].payload == b"OK\0"
    assert double.violations == []


def test_a_write_past_the_4096_byte_buffer_fails_with_einval_and_drops_the_partial_message(
    fd: int, double: XenbusDouble
) -> None:
    os.write(fd, request(Op.READ, 1, b"a")[:10])
    with pytest.raises(OSError) as err:
        os.write(fd, b"x" * 4090)
    assert err.value.errno == errno.EINVAL
    # The buffer starts empty again: a whole message goes through.
    os.write(fd, request(Op.WRITE, 2, b"a", tail=b"1"))
    assert [m.req_id for m in replies(fd, 1)] == [2]


def test_a_header_declaring_more_than_the_buffer_holds_fails_with_e2big(fd: int) -> None:
    with pytest.raises(OSError) as err:
        os.write(fd, Header(Op.WRITE, 1, 0, 4096 - HEADER_SIZE + 1).pack())
    assert err.value.errno == errno.E2BIG


def test_the_largest_message_the_buffer_holds_is_taken(fd: int) -> None:
    data = request(Op.WRITE, 1, b"a", tail=b"v" * (4096 - HEADER_SIZE - 2))
    assert len(data) == 4096 and os.write(fd, data) == 4096
    assert replies(fd, 1)[0].payload == b"OK\0"


def test_a_read_returns_no_more_than_asked_and_the_rest_later(fd: int) -> None:
    os.write(fd, request(Op.WRITE, 1, b"a", tail=b"1"))
    whole = encode(Message(Op.WRITE, 1, 0, b"OK\0"))
    pieces = [os.read(fd, 5) for _ in range(4)]
    assert [len(p) for p in pieces] == [5, 5, 5, 4] and b"".join(pieces) == whole


def test_a_read_returns_every_queued_reply_at_once(store: XenStoreServer) -> None:
    # With writes that return once answered, both replies are queued before the read.
    with XenbusDouble(store.socket_path, blocking_write=True).start() as double:
        descriptor = os.open(double.path, os.O_RDWR)
        try:
            os.write(descriptor, request(Op.WRITE, 1, b"a", tail=b"1"))
            os.write(descriptor, request(Op.READ, 2, b"a"))
            data = os.read(descriptor, 65536)
        finally:
            os.close(descriptor)
    decoder = Decoder()
    decoder.feed(data)
    assert [(m.req_id, m.payload) for m in decoder] == [(1, b"OK\0"), (2, b"1")]


def test_with_blocking_writes_the_reply_is_queued_when_write_returns(store: XenStoreServer) -> None:
    with XenbusDouble(store.socket_path, blocking_write=True).start() as double:
        descriptor = os.open(double.path, os.O_RDWR)
        try:
            os.write(descriptor, request(Op.READ, 1, b"absent"))
            assert polled(descriptor, 0) == READABLE
        finally:
            os.close(descriptor)


def _silent_store(path: str) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)  # connections wait in the backlog, requests are never read
    return listener


def test_with_blocking_writes_a_store_that_never_answers_holds_the_write(tmp_path: Path) -> None:
    require_root()
    listener = _silent_store(str(tmp_path / "silent.sock"))
    outcome: list[object] = []
    double = XenbusDouble(str(tmp_path / "silent.sock"), blocking_write=True).start()
    try:
        descriptor = os.open(double.path, os.O_RDWR)

        def write() -> None:
            try:
                outcome.append(os.write(descriptor, request(Op.READ, 1, b"a")))
            except OSError as exc:
                outcome.append(exc.errno)

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        writer.join(0.5)
        assert writer.is_alive() and outcome == []
    finally:
        double.stop()  # the connection aborts: the held write fails
        listener.close()
    writer.join(WAIT)
    with contextlib.suppress(OSError):  # FUSE reports the aborted connection on close too
        os.close(descriptor)
    assert outcome and outcome[0] in (errno.ENOTCONN, errno.ECONNABORTED)


def test_a_read_without_o_nonblock_waits_for_a_reply(fd: int) -> None:
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(os.read(fd, 65536)), daemon=True)
    reader.start()
    reader.join(0.5)
    assert reader.is_alive()
    os.write(fd, request(Op.READ, 1, b"absent"))
    reader.join(WAIT)
    assert got and Header.unpack(got[0][:HEADER_SIZE]).req_id == 1


_READ_UNTIL_ALARM = """
import os, signal, sys
def alarm(signum, frame):
    raise TimeoutError
signal.signal(signal.SIGALRM, alarm)
fd = os.open(sys.argv[1], os.O_RDWR)
signal.setitimer(signal.ITIMER_REAL, 0.3)
try:
    os.read(fd, 65536)
except TimeoutError:
    print("interrupted")
"""


def test_a_signal_ends_a_waiting_read(double: XenbusDouble) -> None:
    # FUSE passes the signal on as FUSE_INTERRUPT and waits for the answer: the double gives EINTR, as
    # wait_event_interruptible does in xenbus_file_read, and Python then runs the handler.
    proc = subprocess.Popen([sys.executable, "-c", _READ_UNTIL_ALARM, double.path], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=WAIT)
    except subprocess.TimeoutExpired:
        # Even SIGKILL waits for a request the filesystem holds: abort the connection first.
        double.stop()
        proc.kill()
        proc.communicate()
        pytest.fail("the waiting read was never answered: the double ignored FUSE_INTERRUPT")
    assert (proc.returncode, out) == (0, "interrupted\n"), err


def test_a_read_with_o_nonblock_and_nothing_queued_fails_with_eagain(double: XenbusDouble) -> None:
    descriptor = os.open(double.path, os.O_RDWR | os.O_NONBLOCK)
    try:
        with pytest.raises(BlockingIOError):
            os.read(descriptor, 65536)
    finally:
        os.close(descriptor)


def test_o_nonblock_set_after_open_counts_for_each_read(fd: int) -> None:
    os.set_blocking(fd, False)
    with pytest.raises(BlockingIOError):
        os.read(fd, 65536)


def test_open_of_a_domain_without_a_xenstore_event_channel_fails_with_enoent(store: XenStoreServer) -> None:
    with XenbusDouble(store.socket_path, no_event_channel=True).start() as double:
        with pytest.raises(FileNotFoundError):
            os.open(double.path, os.O_RDWR)


def test_replies_to_requests_nobody_sent_never_reach_the_file_and_watch_events_do(tmp_path: Path) -> None:
    require_root()
    path = str(tmp_path / "odd.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def odd_store() -> None:
        conn, _ = listener.accept()
        with conn:
            header = Header.unpack(conn.recv(HEADER_SIZE, socket.MSG_WAITALL))
            conn.recv(header.length, socket.MSG_WAITALL)
            conn.sendall(encode(Message(Op.READ, header.req_id + 1, 0, b"stale"))
                         + encode(Message(Op.WATCH_EVENT, 0, 0, b"backend\0tok\0"))
                         + encode(Message(Op.READ, header.req_id, 0, b"fresh")))
            conn.recv(1)

    server = threading.Thread(target=odd_store, daemon=True)
    server.start()
    with XenbusDouble(path).start() as double:
        descriptor = os.open(double.path, os.O_RDWR)
        try:
            os.write(descriptor, request(Op.READ, 5, b"a"))
            got = replies(descriptor, 2)
        finally:
            os.close(descriptor)
    listener.close()
    assert [(m.type, m.payload) for m in got] == [(Op.WATCH_EVENT, b"backend\0tok\0"), (Op.READ, b"fresh")]


def test_each_open_file_has_a_connection_and_a_queue_of_its_own(double: XenbusDouble) -> None:
    first, second = os.open(double.path, os.O_RDWR), os.open(double.path, os.O_RDWR | os.O_NONBLOCK)
    try:
        os.write(first, request(Op.WRITE, 1, b"a", tail=b"1"))
        replies(first, 1)
        with pytest.raises(BlockingIOError):
            os.read(second, 65536)
    finally:
        os.close(first)
        os.close(second)


@pytest.mark.parametrize("blocking_write", [False, True], ids=["queued replies", "write blocks until the reply"])
def test_xen_libxenstore_works_through_the_double(store: XenStoreServer, blocking_write: bool) -> None:
    for tool in ("xenstore-write", "xenstore-read", "xenstore-list"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (package xenstore-utils)")
    with XenbusDouble(store.socket_path, blocking_write=blocking_write).start() as double:
        # libxenstore's get_handle opens XENSTORED_PATH as a device when it is not a socket.
        env = dict(os.environ, XENSTORED_PATH=double.path)

        def run(*argv: str) -> str:
            return subprocess.run(argv, env=env, capture_output=True, text=True, check=True, timeout=60).stdout

        run("xenstore-write", "/t/a", "1", "/t/b", "2")
        listed = run("xenstore-list", "/t").split()
        value = run("xenstore-read", "/t/b").strip()
        assert (listed, value, double.violations) == (["a", "b"], "2", [])


def test_libxenstore_pages_a_huge_directory_through_the_double(store: XenStoreServer, double: XenbusDouble) -> None:
    if shutil.which("xenstore-list") is None:
        pytest.skip("xenstore-list not installed (package xenstore-utils)")
    from vif_hotplug.xen.xenstore_client import XenStore

    with XenStore(("unix", store.socket_path)) as xs:
        for domid in range(1, 2001):
            xs.write(f"/local/domain/0/backend/vif/{domid}/0/online", "0")
    env = dict(os.environ, XENSTORED_PATH=double.path)
    out = subprocess.run(["xenstore-list", "/local/domain/0/backend/vif"], env=env,
                         capture_output=True, text=True, check=True, timeout=60).stdout
    assert out.split() == [str(domid) for domid in range(1, 2001)]


def test_the_mount_exists_only_in_the_doubles_namespace(double: XenbusDouble) -> None:
    inside = double.path.split("/root", 1)[1]
    with open("/proc/self/mounts") as mounts:
        assert "xenbus-double" not in mounts.read()
    assert os.path.getsize(inside) == 0  # the host sees the plain file it is mounted on


def test_a_private_dev_holds_the_device_and_everything_else_of_dev(store: XenStoreServer) -> None:
    with XenbusDouble(store.socket_path).start(dev=True) as double:
        script = ("test -e /dev/xen/xenbus && echo ok > /dev/null && test -e /dev/pts/ptmx "
                  "&& ! test -e /run/xenstored/socket && ! test -e /var/run/xenstored/socket")
        proc = subprocess.run(["nsenter", f"--mount={double.mount_ns}", "sh", "-c", script],
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
    assert not os.path.exists("/dev/xen")
