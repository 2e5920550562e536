"""The XenStore client (xen.xenstore_client) on both transports, against the embedded xenstored and hostile stores.

Every test that talks to a store runs on each transport a driver domain
may have: xenstored's Unix socket, and the kernel's xenbus device, played by
the FUSE double of :mod:`tests.xenbus_double` (the driver of Linux 6.x, and
with ``blocking_write`` the one of kernels before 4.11, whose ``write()``
returns only once xenstored answered) with the same store behind it. The
device needs root and ``/dev/fuse``; without them its cases are skipped.

Every failure must be one :class:`XenStoreUnavailable` line within the
deadline, and nothing may be printed anywhere (pyxs' router thread printed
tracebacks to stderr). The double records every rule of the driver a
client breaks; a test ends in error if any was.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.xenbus_double.double import XenbusDouble
from vif_hotplug.core.errors import XenStoreUnavailable
from vif_hotplug.lab.xenstored import XenStoreServer
from vif_hotplug.xen import xenstore_client
from vif_hotplug.xen.xenstore_client import XENBUS_DEVICE, XENBUS_PROC, Endpoint, XenStore, default_endpoint
from vif_hotplug.xen.xs_wire import HEADER_SIZE, XENSTORE_PAYLOAD_MAX, Header, Message, Op, encode, join_args

#: The deadline given to clients of hostile stores (every such test waits it out at most once).
TIMEOUT = 0.25
#: How much later than the deadline a failure may arrive (a slow CI machine).
SLACK = 1.5
#: The deadline for the well-behaved embedded store, which answers at once.
GENEROUS = 5.0

TRANSPORTS = {
    "socket": None,
    "device": {},
    "device, write blocks until the reply": {"blocking_write": True},
}


def device_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the xenbus device double mounts a FUSE file: needs root"
    if not os.path.exists("/dev/fuse"):
        return "the xenbus device double needs /dev/fuse"
    return None


class Transport:
    """``transport(store_socket, **double_options)``: the endpoint through which this transport reaches that store."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.options = TRANSPORTS[name]
        self.doubles: list[XenbusDouble] = []

    @property
    def device(self) -> bool:
        return self.options is not None

    def __call__(self, store: str, **extra: object) -> Endpoint:
        if self.options is None:
            return "unix", store
        reason = device_unavailable()
        if reason:
            pytest.skip(reason)
        double = XenbusDouble(store, **{**self.options, **extra}).start()  # type: ignore[arg-type]
        self.doubles.append(double)
        return "xenbus", double.path


Reach = Transport


@pytest.fixture(params=list(TRANSPORTS))
def reach(request: pytest.FixtureRequest) -> Iterator[Transport]:
    transport = Transport(request.param)
    yield transport
    broken = [v for double in transport.doubles for v in double.violations]
    for double in transport.doubles:
        double.stop()
    assert not broken, f"the client broke the xenbus driver's rules: {broken}"


def on_device(endpoint: Endpoint) -> bool:
    return endpoint[0] == "xenbus"


# --- the embedded xenstored --------------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[XenStoreServer]:
    server = XenStoreServer(str(tmp_path / "xenstored.sock"))
    server.start_in_thread()
    try:
        yield server
    finally:
        server.shutdown()


@pytest.fixture
def endpoint(server: XenStoreServer, reach: Reach) -> Endpoint:
    return reach(server.socket_path)


@pytest.fixture
def xs(endpoint: Endpoint) -> Iterator[XenStore]:
    with XenStore(endpoint, GENEROUS) as client:
        yield client


def fill(server: XenStoreServer, entries: dict[str, str]) -> None:
    """Entries written over the socket, whatever transport the test's client uses."""
    with XenStore(("unix", server.socket_path), GENEROUS) as client:
        for path, value in entries.items():
            client.write(path, value)


def test_a_written_value_reads_back(xs: XenStore) -> None:
    xs.write("backend/vif/4/0/ip", "10.137.0.5 fd09::5")
    assert xs.read("backend/vif/4/0/ip") == "10.137.0.5 fd09::5"


def test_relative_paths_are_under_the_domains_home(xs: XenStore) -> None:
    xs.write("backend/vif/4/0/mac", "00:16:3e:5e:6c:00")
    assert xs.read("/local/domain/0/backend/vif/4/0/mac") == "00:16:3e:5e:6c:00"


def test_reading_a_missing_key_gives_none(xs: XenStore) -> None:
    assert xs.read("backend/vif/4/0/nothing") is None


def test_an_empty_value_reads_back_empty_not_none(xs: XenStore) -> None:
    xs.write("backend/vif/4/0/ip", "")
    assert xs.read("backend/vif/4/0/ip") == ""


def test_a_non_ascii_value_round_trips(xs: XenStore) -> None:
    xs.write("data/name", "réseau ✓")
    assert xs.read("data/name") == "réseau ✓"


def test_the_reads_of_an_event_return_every_value_in_order(xs: XenStore, server: XenStoreServer) -> None:
    # read_many is what Prefetched makes of an event's keys: one wait for all the replies.
    fill(server, {"backend/vif/4/0/ip": "10.137.0.5", "backend/vif/4/0/mac": "00:16:3e:5e:6c:00",
                  "backend/vif/4/0/vifname": ""})
    keys = ["backend/vif/4/0/ip", "backend/vif/4/0/mac", "backend/vif/4/0/type", "backend/vif/4/0/vifname"]
    assert xs.read_many(keys) == ["10.137.0.5", "00:16:3e:5e:6c:00", None, ""]


def test_every_request_reaches_the_store_as_one_message(server: XenStoreServer, reach: Transport) -> None:
    if not reach.device:
        pytest.skip("a stream has no message boundaries")
    endpoint = reach(server.socket_path)
    with XenStore(endpoint, GENEROUS) as client:
        client.read_many([f"data/{i}" for i in range(12)])
    assert (reach.doubles[0].requests, reach.doubles[0].violations) == (12, [])


def test_directory_lists_children_and_nothing_for_a_missing_node(xs: XenStore, server: XenStoreServer) -> None:
    fill(server, {"backend/vif/4/0/ip": "10.137.0.5", "backend/vif/7/0/ip": "10.137.0.7"})
    assert (sorted(xs.directory("backend/vif")), xs.directory("backend/vbd")) == (["4", "7"], [])


def test_a_directory_longer_than_one_reply_is_read_in_pages(xs: XenStore, server: XenStoreServer) -> None:
    # A netvm with 2000 VMs: ~9 KiB of names, over the 4096 bytes of one reply (xenstored answers E2BIG).
    fill(server, {f"backend/vif/{domid}/0/online": "1" for domid in range(1, 2001)})
    assert xs.directory("backend/vif") == [str(domid) for domid in range(1, 2001)]


@pytest.mark.parametrize("answer", ["ENOSYS", "EINVAL"])
def test_a_long_directory_on_a_store_that_cannot_page_is_one_line(
    xs: XenStore, server: XenStoreServer, answer: str
) -> None:
    fill(server, {f"backend/vif/{domid}/0/online": "1" for domid in range(1, 2001)})
    # A xenstored before Xen 4.9 does not know DIRECTORY_PART.
    server.answer_with_error(Op.DIRECTORY_PART, "/local/domain/0/backend/vif", answer)
    with pytest.raises(XenStoreUnavailable) as err:
        xs.directory("backend/vif")
    assert "E2BIG" in str(err.value) and "\n" not in str(err.value)


def test_remove_deletes_a_subtree_and_ignores_what_is_absent(xs: XenStore) -> None:
    xs.write("backend/vif/4/0/ip", "10.137.0.5")
    xs.remove("backend/vif/4")
    xs.remove("backend/vif/4")
    xs.remove("backend/vif/4/0/ip")  # its parent is gone too: ENOENT, still nothing to do
    assert xs.read("backend/vif/4/0/ip") is None


def test_an_error_reply_is_one_line_and_the_connection_stays_usable(xs: XenStore) -> None:
    with pytest.raises(XenStoreUnavailable) as err:
        xs.read("not a valid path")
    assert "EINVAL" in str(err.value) and "\n" not in str(err.value)
    xs.write("ok", "1")
    assert xs.read("ok") == "1"


def test_an_enoent_answer_to_a_write_is_unavailable_and_names_the_path(xs: XenStore, server: XenStoreServer) -> None:
    # Absent means something only to reads, listings and removals: a refused write is a failure.
    server.answer_with_error(Op.WRITE, "/local/domain/0/backend/vif/4/0/hotplug-status", "ENOENT")
    with pytest.raises(XenStoreUnavailable) as err:
        xs.write("backend/vif/4/0/hotplug-status", "connected")
    assert "backend/vif/4/0/hotplug-status" in str(err.value) and "ENOENT" in str(err.value)


@pytest.mark.parametrize("op", [Op.WRITE, Op.READ, Op.RM, Op.DIRECTORY], ids=lambda op: op.name)
def test_a_refusal_other_than_absent_is_one_line_naming_it(xs: XenStore, server: XenStoreServer, op: Op) -> None:
    server.answer_with_error(op, "/local/domain/0/backend/vif/4", "EACCES")
    calls: dict[Op, Callable[[], object]] = {
        Op.WRITE: lambda: xs.write("backend/vif/4", "x"), Op.READ: lambda: xs.read("backend/vif/4"),
        Op.RM: lambda: xs.remove("backend/vif/4"), Op.DIRECTORY: lambda: xs.directory("backend/vif/4")}
    with pytest.raises(XenStoreUnavailable) as err:
        calls[op]()
    assert "EACCES" in str(err.value) and "\n" not in str(err.value)


def test_a_refused_read_among_the_reads_of_an_event_is_one_line(xs: XenStore, server: XenStoreServer) -> None:
    server.answer_with_error(Op.READ, "/local/domain/0/backend/vif/4/0/mac", "EACCES")
    with pytest.raises(XenStoreUnavailable, match="EACCES"):
        xs.read_many(["backend/vif/4/0/ip", "backend/vif/4/0/mac", "backend/vif/4/0/type"])
    assert xs.read("backend/vif/4/0/ip") is None  # the replies after it were taken: still in step


def test_many_requests_on_one_connection(xs: XenStore) -> None:
    for i in range(50):
        xs.write(f"data/{i}", str(i))
    assert [xs.read(f"data/{i}") for i in range(50)] == [str(i) for i in range(50)]


def _largest_value(endpoint: Endpoint) -> int:
    """The longest value a write of path ``a`` may carry on this transport."""
    # The device buffers header and payload in 4096 bytes; the socket takes a 4096-byte payload.
    room = XENSTORE_PAYLOAD_MAX - HEADER_SIZE if on_device(endpoint) else XENSTORE_PAYLOAD_MAX
    return room - len(b"a\0")


def test_the_largest_request_a_transport_takes_goes_through(xs: XenStore, endpoint: Endpoint) -> None:
    value = "v" * _largest_value(endpoint)
    xs.write("a", value)
    assert xs.read("a") == value


def test_a_request_larger_than_a_transport_takes_is_one_line_and_nothing_is_sent(
    xs: XenStore, endpoint: Endpoint
) -> None:
    with pytest.raises(XenStoreUnavailable) as err:
        xs.write("a", "v" * (_largest_value(endpoint) + 1))
    assert "larger than" in str(err.value) and "\n" not in str(err.value)
    assert xs.read("a") is None


def test_replies_read_in_pieces_are_reassembled(server: XenStoreServer, reach: Transport) -> None:
    if not reach.device:
        pytest.skip("the socket's pieces are the kernel's business")
    endpoint = reach(server.socket_path, read_limit=7)
    fill(server, {"backend/vif/4/0/ip": "10.137.0.5", "backend/vif/4/0/mac": "00:16:3e:5e:6c:00"})
    with XenStore(endpoint, GENEROUS) as client:
        assert client.read_many(["backend/vif/4/0/ip", "backend/vif/4/0/mac"]) == ["10.137.0.5", "00:16:3e:5e:6c:00"]


def test_a_spurious_eagain_on_read_is_retried_or_one_line(xs: XenStore, monkeypatch: pytest.MonkeyPatch) -> None:
    # poll() may report a readable descriptor whose read then says EAGAIN; whatever the
    # client makes of it, no raw OSError may reach the caller.
    xs.write("a", "1")
    calls = {"read": 0}

    def flaky_read(fd: int, n: int) -> bytes:
        calls["read"] += 1
        if calls["read"] == 1:
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        return os.read(fd, n)

    fake_os = SimpleNamespace(**{name: getattr(os, name) for name in dir(os) if not name.startswith("__")})
    fake_os.read = flaky_read
    monkeypatch.setattr(xenstore_client, "os", fake_os)
    try:
        value = xs.read("a")
    except XenStoreUnavailable:
        return
    assert value == "1"


def test_a_store_that_went_away_fails_the_next_request(
    tmp_path: Path, reach: Reach, capfd: pytest.CaptureFixture[str]
) -> None:
    path = str(tmp_path / "xenstored.sock")
    server = XenStoreServer(path)
    server.start_in_thread()
    client = XenStore(reach(path), TIMEOUT)
    client.write("a", "1")
    server.shutdown()
    start = time.monotonic()
    with pytest.raises(XenStoreUnavailable) as err:
        client.read("a")
    # Through the device nothing says the store is gone: the deadline does.
    assert time.monotonic() - start < TIMEOUT + SLACK and "\n" not in str(err.value)
    client.close()
    assert capfd.readouterr() == ("", "")


def test_xenstored_path_naming_a_socket_or_a_device_is_used_as_what_it_is(xs: XenStore, endpoint: Endpoint) -> None:
    with XenStore(default_endpoint(endpoint[1]), GENEROUS) as client:
        client.write("a", "1")
        assert (client.read("a"), client.transport) == ("1", "device" if on_device(endpoint) else "socket")


# --- transport-independent -----------------------------------------------------------------


def test_constructing_a_client_connects_to_nothing(tmp_path: Path) -> None:
    client = XenStore(("unix", str(tmp_path / "absent.sock")), TIMEOUT)
    assert not client.connected


def test_a_missing_socket_is_one_line_naming_it(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "absent.sock")
    with pytest.raises(XenStoreUnavailable) as err:
        XenStore(("unix", path), TIMEOUT).read("x")
    assert path in str(err.value) and "\n" not in str(err.value)
    assert capfd.readouterr() == ("", "")


def test_a_missing_xenbus_device_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(XenStoreUnavailable, match="cannot connect"):
        XenStore(("xenbus", str(tmp_path / "xenbus")), TIMEOUT).read("x")


def test_a_device_of_a_domain_without_a_xenstore_event_channel_is_one_line(server: XenStoreServer) -> None:
    if reason := device_unavailable():
        pytest.skip(reason)
    with XenbusDouble(server.socket_path, no_event_channel=True).start() as double:
        with pytest.raises(XenStoreUnavailable) as err:
            XenStore(("xenbus", double.path), TIMEOUT).read("x")
    assert "cannot connect" in str(err.value) and "No such file" in str(err.value)


@pytest.mark.parametrize(
    ("xenstored_path", "present", "endpoint"),
    [
        ("/tmp/xs.sock", {"/var/run/xenstored/socket", XENBUS_DEVICE}, ("path", "/tmp/xs.sock")),
        (None, {"/var/run/xenstored/socket", XENBUS_DEVICE}, ("unix", "/var/run/xenstored/socket")),
        (None, {"/run/xenstored/socket", XENBUS_DEVICE}, ("unix", "/run/xenstored/socket")),
        (None, {XENBUS_DEVICE, XENBUS_PROC}, ("xenbus", XENBUS_DEVICE)),
        (None, {XENBUS_PROC}, ("xenbus", XENBUS_PROC)),
        (None, set(), ("xenbus", XENBUS_DEVICE)),
    ],
    ids=["XENSTORED_PATH", "var run socket", "run socket", "device", "old xenfs device", "nothing"],
)
def test_default_endpoint_follows_libxenstores_order(
    xenstored_path: str | None, present: set[str], endpoint: Endpoint
) -> None:
    assert default_endpoint(xenstored_path, exists=lambda p: p in present) == endpoint


# --- hostile servers -------------------------------------------------------------------------------

Behaviour = Callable[[socket.socket, int], None]


def chains_nothing(exc: BaseException) -> bool:
    """No library exception rides along (a traceback would show it)."""
    return exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)


def recv_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("client went away")
        data += chunk
    return data


def recv_request(conn: socket.socket) -> Message:
    header = Header.unpack(recv_exactly(conn, HEADER_SIZE))
    return Message(header.type, header.req_id, header.tx_id, recv_exactly(conn, header.length))


class HostileServer:
    """A Unix socket server that treats its ``n``-th connection (from 0) with ``behaviour(conn, n)``."""

    def __init__(self, path: str, behaviour: Behaviour, accept: bool = True) -> None:
        self.path = path
        self.stop = threading.Event()
        self._behaviour = behaviour
        self._conn: socket.socket | None = None
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(8)
        self._listener.settimeout(0.05)
        self._thread = threading.Thread(target=self._serve if accept else self.stop.wait, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        n = 0
        while not self.stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._conn = conn
            with conn, contextlib.suppress(OSError):
                self._behaviour(conn, n)
            n += 1

    def close(self) -> None:
        self.stop.set()
        if self._conn is not None:
            # A behaviour waiting for a client that is still connected (the double's connection lives as
            # long as the open file) must not hold the test up.
            with contextlib.suppress(OSError):
                self._conn.shutdown(socket.SHUT_RDWR)
        self._thread.join()
        self._listener.close()


@pytest.fixture
def hostile(tmp_path: Path, reach: Reach) -> Iterator[Callable[..., Endpoint]]:
    """``hostile(behaviour)``: the endpoint of a new hostile store on this test's transport."""
    servers: list[HostileServer] = []

    def start(behaviour: Behaviour, accept: bool = True) -> Endpoint:
        server = HostileServer(str(tmp_path / f"hostile{len(servers)}.sock"), behaviour, accept)
        servers.append(server)
        return reach(server.path)

    yield start
    for server in servers:
        server.close()


def until_the_client_gives_up(conn: socket.socket) -> None:
    conn.recv(1)


def never_answers(conn: socket.socket, n: int) -> None:
    recv_request(conn)
    until_the_client_gives_up(conn)


def wrong_request_id(conn: socket.socket, n: int) -> None:
    request = recv_request(conn)
    conn.sendall(encode(Message(request.type, request.req_id + 1, 0, b"10.137.0.5")))


def closes_before_reading(conn: socket.socket, n: int) -> None:
    conn.close()


def closes_mid_request(conn: socket.socket, n: int) -> None:
    conn.recv(4)


def closes_mid_reply(conn: socket.socket, n: int) -> None:
    request = recv_request(conn)
    conn.sendall(encode(Message(request.type, request.req_id, 0, b"10.137.0.5"))[:10])


def garbage(conn: socket.socket, n: int) -> None:
    recv_request(conn)
    conn.sendall(b"\xff" * 64)


def short_garbage_then_silence(conn: socket.socket, n: int) -> None:
    recv_request(conn)
    conn.sendall(b"hello")
    until_the_client_gives_up(conn)


def truncated_payload_then_silence(conn: socket.socket, n: int) -> None:
    request = recv_request(conn)
    conn.sendall(Header(request.type, request.req_id, 0, 100).pack() + b"short")
    until_the_client_gives_up(conn)


def wrong_message_type(conn: socket.socket, n: int) -> None:
    request = recv_request(conn)
    conn.sendall(encode(Message(Op.DIRECTORY, request.req_id, 0, b"a\0b\0")))


def unknown_error_name(conn: socket.socket, n: int) -> None:
    request = recv_request(conn)
    conn.sendall(encode(Message(Op.ERROR, request.req_id, 0, b"EWHAT\0")))


def announces_a_huge_payload(conn: socket.socket, n: int) -> None:
    request = recv_request(conn)
    conn.sendall(Header(request.type, request.req_id, 0, 1 << 20).pack())


def enoent_to_everything(conn: socket.socket, n: int) -> None:
    while True:
        request = recv_request(conn)
        conn.sendall(encode(Message(Op.ERROR, request.req_id, 0, b"ENOENT\0")))


HOSTILE = [
    ("never answers", never_answers),
    ("wrong request id", wrong_request_id),
    ("closes before reading", closes_before_reading),
    ("closes mid request", closes_mid_request),
    ("closes mid reply", closes_mid_reply),
    ("garbage bytes", garbage),
    ("short garbage then silence", short_garbage_then_silence),
    ("truncated payload then silence", truncated_payload_then_silence),
    ("wrong message type", wrong_message_type),
    ("unknown error name", unknown_error_name),
    ("announces a huge payload", announces_a_huge_payload),
]


@pytest.mark.parametrize("behaviour", [pytest.param(b, id=i) for i, b in HOSTILE])
def test_a_hostile_store_gives_one_line_within_the_deadline_and_prints_nothing(
    hostile: Callable[..., Endpoint], behaviour: Behaviour, capfd: pytest.CaptureFixture[str]
) -> None:
    client = XenStore(hostile(behaviour), TIMEOUT)
    start = time.monotonic()
    with pytest.raises(XenStoreUnavailable) as err:
        client.read("backend/vif/4/0/ip")
    assert time.monotonic() - start < TIMEOUT + SLACK
    assert str(err.value) and "\n" not in str(err.value)
    assert chains_nothing(err.value)
    client.close()
    assert capfd.readouterr() == ("", "")


@pytest.mark.parametrize("behaviour", [pytest.param(b, id=i) for i, b in HOSTILE])
def test_a_write_to_a_hostile_store_fails_the_same_way(
    hostile: Callable[..., Endpoint], behaviour: Behaviour, capfd: pytest.CaptureFixture[str]
) -> None:
    client = XenStore(hostile(behaviour), TIMEOUT)
    start = time.monotonic()
    with pytest.raises(XenStoreUnavailable) as err:
        client.write("backend/vif/4/0/hotplug-status", "connected")
    assert time.monotonic() - start < TIMEOUT + SLACK and "\n" not in str(err.value)
    client.close()
    assert capfd.readouterr() == ("", "")


def test_the_reads_of_an_event_from_a_store_that_never_answers_fail_within_the_deadline(
    hostile: Callable[..., Endpoint], capfd: pytest.CaptureFixture[str]
) -> None:
    def reads_everything_answers_nothing(conn: socket.socket, n: int) -> None:
        while conn.recv(65536):
            pass

    client = XenStore(hostile(reads_everything_answers_nothing), TIMEOUT)
    start = time.monotonic()
    with pytest.raises(XenStoreUnavailable, match="did not answer"):
        client.read_many(["backend/vif/4/0/ip", "backend/vif/4/0/mac"])
    assert time.monotonic() - start < TIMEOUT + SLACK
    client.close()
    assert capfd.readouterr() == ("", "")


def test_a_store_that_accepts_nothing_fails_within_the_deadline(
    hostile: Callable[..., Endpoint], capfd: pytest.CaptureFixture[str]
) -> None:
    client = XenStore(hostile(never_answers, accept=False), TIMEOUT)
    start = time.monotonic()
    with pytest.raises(XenStoreUnavailable, match="did not answer"):
        client.read("x")
    assert time.monotonic() - start < TIMEOUT + SLACK
    client.close()
    assert capfd.readouterr() == ("", "")


def test_a_watch_event_before_the_reply_is_skipped(hostile: Callable[..., Endpoint]) -> None:
    def watch_event_first(conn: socket.socket, n: int) -> None:
        request = recv_request(conn)
        conn.sendall(encode(Message(Op.WATCH_EVENT, 0, 0, b"backend\0token\0")))
        conn.sendall(encode(Message(Op.READ, request.req_id, 0, b"10.137.0.5")))

    assert XenStore(hostile(watch_event_first), TIMEOUT).read("backend/vif/4/0/ip") == "10.137.0.5"


def test_after_a_broken_reply_the_next_request_starts_a_fresh_connection(hostile: Callable[..., Endpoint]) -> None:
    def garbage_then_good(conn: socket.socket, n: int) -> None:
        while True:
            request = recv_request(conn)
            if n == 0:
                conn.sendall(encode(Message(request.type, request.req_id + 7, 0, b"stale")))
                return
            conn.sendall(encode(Message(request.type, request.req_id, 0, b"fresh")))

    client = XenStore(hostile(garbage_then_good), TIMEOUT)
    with pytest.raises(XenStoreUnavailable):
        client.read("x")
    assert not client.connected
    assert client.read("x") == "fresh"
    client.close()


def test_a_missing_key_answer_from_any_store_is_none(hostile: Callable[..., Endpoint]) -> None:
    with XenStore(hostile(enoent_to_everything), TIMEOUT) as client:
        assert client.read("x") is None


def test_a_missing_key_answer_to_a_write_from_any_store_is_unavailable(hostile: Callable[..., Endpoint]) -> None:
    with XenStore(hostile(enoent_to_everything), TIMEOUT) as client, pytest.raises(XenStoreUnavailable):
        client.write("backend/vif/4/0/hotplug-status", "connected")


def test_a_directory_that_changes_while_paged_is_listed_again_from_the_start(
    hostile: Callable[..., Endpoint]
) -> None:
    def changes_after_the_first_page(conn: socket.socket, n: int) -> None:
        pages = {  # (generation, offset) -> names; generation 2 from the second request on
            (b"1", b"0"): b"a\0b\0", (b"2", b"4"): b"c\0d\0\0", (b"2", b"0"): b"a\0b\0c\0\0"}
        generation = b"1"
        while True:
            request = recv_request(conn)
            if request.type == Op.DIRECTORY:
                conn.sendall(encode(Message(Op.ERROR, request.req_id, 0, b"E2BIG\0")))
                continue
            offset = request.payload.split(b"\0")[1]
            names = pages[(generation, offset)]
            conn.sendall(encode(Message(Op.DIRECTORY_PART, request.req_id, 0, join_args(generation) + names)))
            generation = b"2"

    with XenStore(hostile(changes_after_the_first_page), TIMEOUT) as client:
        assert client.directory("backend/vif") == ["a", "b", "c"]


def test_a_directory_page_that_adds_nothing_is_one_line(hostile: Callable[..., Endpoint]) -> None:
    def pages_forever(conn: socket.socket, n: int) -> None:
        while True:
            request = recv_request(conn)
            answer = (Message(Op.ERROR, request.req_id, 0, b"E2BIG\0") if request.type == Op.DIRECTORY
                      else Message(Op.DIRECTORY_PART, request.req_id, 0, b"7\0"))
            conn.sendall(encode(answer))

    with XenStore(hostile(pages_forever), TIMEOUT) as client, pytest.raises(XenStoreUnavailable) as err:
        client.directory("backend/vif")
    assert "\n" not in str(err.value)
