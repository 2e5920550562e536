"""The XenStore client (xen.xenstore_client) against the embedded xenstored and against hostile servers.

Every failure must be one :class:`XenStoreUnavailable` line within the
deadline, and nothing may be printed anywhere (pyxs' router thread printed
tracebacks to stderr).
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

from vif_hotplug.core.errors import XenStoreUnavailable
from vif_hotplug.lab.xenstored import XenStoreServer
from vif_hotplug.xen import xenstore_client
from vif_hotplug.xen.xenstore_client import XENBUS_DEVICE, XenStore, default_endpoint
from vif_hotplug.xen.xs_wire import HEADER_SIZE, Header, Message, Op, encode

#: The deadline given to clients of hostile stores (every such test waits it out at most once).
TIMEOUT = 0.25
#: How much later than the deadline a failure may arrive (a slow CI machine).
SLACK = 1.5
#: The deadline for the well-behaved embedded store, which answers at once.
GENEROUS = 5.0


# --- the embedded xenstored --------------------------------------------------------------------


@pytest.fixture
def xenstored(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "xenstored.sock")
    server = XenStoreServer(path)
    server.start_in_thread()
    try:
        yield path
    finally:
        server.shutdown()


@pytest.fixture
def xs(xenstored: str) -> Iterator[XenStore]:
    with XenStore(("unix", xenstored), GENEROUS) as client:
        yield client


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


def test_directory_lists_children_and_nothing_for_a_missing_node(xs: XenStore) -> None:
    xs.write("backend/vif/4/0/ip", "10.137.0.5")
    xs.write("backend/vif/7/0/ip", "10.137.0.7")
    assert (sorted(xs.directory("backend/vif")), xs.directory("backend/vbd")) == (["4", "7"], [])


def test_remove_deletes_a_subtree_and_ignores_what_is_absent(xs: XenStore) -> None:
    xs.write("backend/vif/4/0/ip", "10.137.0.5")
    xs.remove("backend/vif/4")
    xs.remove("backend/vif/4")
    assert xs.read("backend/vif/4/0/ip") is None


def test_an_error_reply_is_one_line_and_the_connection_stays_usable(xs: XenStore) -> None:
    with pytest.raises(XenStoreUnavailable) as err:
        xs.read("not a valid path")
    assert "EINVAL" in str(err.value) and "\n" not in str(err.value)
    xs.write("ok", "1")
    assert xs.read("ok") == "1"


def test_many_requests_on_one_connection(xs: XenStore) -> None:
    for i in range(50):
        xs.write(f"data/{i}", str(i))
    assert [xs.read(f"data/{i}") for i in range(50)] == [str(i) for i in range(50)]


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


def test_a_store_that_went_away_fails_the_next_request(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "xenstored.sock")
    server = XenStoreServer(path)
    server.start_in_thread()
    client = XenStore(("unix", path), GENEROUS)
    client.write("a", "1")
    server.shutdown()
    start = time.monotonic()
    with pytest.raises(XenStoreUnavailable) as err:
        client.read("a")
    assert time.monotonic() - start < GENEROUS and "\n" not in str(err.value)
    assert capfd.readouterr() == ("", "")


@pytest.mark.parametrize(
    ("present", "endpoint"),
    [
        ({"/var/run/xenstored/socket"}, ("unix", "/var/run/xenstored/socket")),
        ({"/run/xenstored/socket"}, ("unix", "/run/xenstored/socket")),
        (set(), ("xenbus", XENBUS_DEVICE)),
    ],
    ids=["var run socket", "run socket", "no daemon"],
)
def test_default_endpoint_prefers_the_daemons_socket(present: set[str], endpoint: tuple[str, str]) -> None:
    assert default_endpoint(exists=lambda p: p in present) == endpoint


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
            with conn, contextlib.suppress(OSError):
                self._behaviour(conn, n)
            n += 1

    def close(self) -> None:
        self.stop.set()
        self._thread.join()
        self._listener.close()


@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[Callable[..., str]]:
    servers: list[HostileServer] = []

    def start(behaviour: Behaviour, accept: bool = True) -> str:
        server = HostileServer(str(tmp_path / f"hostile{len(servers)}.sock"), behaviour, accept)
        servers.append(server)
        return server.path

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
    hostile: Callable[..., str], behaviour: Behaviour, capfd: pytest.CaptureFixture[str]
) -> None:
    client = XenStore(("unix", hostile(behaviour)), TIMEOUT)
    start = time.monotonic()
    with pytest.raises(XenStoreUnavailable) as err:
        client.read("backend/vif/4/0/ip")
    assert time.monotonic() - start < TIMEOUT + SLACK
    assert str(err.value) and "\n" not in str(err.value)
    assert chains_nothing(err.value)
    assert capfd.readouterr() == ("", "")


@pytest.mark.parametrize("behaviour", [pytest.param(b, id=i) for i, b in HOSTILE])
def test_a_write_to_a_hostile_store_fails_the_same_way(
    hostile: Callable[..., str], behaviour: Behaviour, capfd: pytest.CaptureFixture[str]
) -> None:
    client = XenStore(("unix", hostile(behaviour)), TIMEOUT)
    start = time.monotonic()
    with pytest.raises(XenStoreUnavailable) as err:
        client.write("backend/vif/4/0/hotplug-status", "connected")
    assert time.monotonic() - start < TIMEOUT + SLACK and "\n" not in str(err.value)
    assert capfd.readouterr() == ("", "")


def test_a_store_that_accepts_nothing_fails_within_the_deadline(
    hostile: Callable[..., str], capfd: pytest.CaptureFixture[str]
) -> None:
    client = XenStore(("unix", hostile(never_answers, accept=False)), TIMEOUT)
    start = time.monotonic()
    with pytest.raises(XenStoreUnavailable, match="did not answer"):
        client.read("x")
    assert time.monotonic() - start < TIMEOUT + SLACK
    assert capfd.readouterr() == ("", "")


def test_a_watch_event_before_the_reply_is_skipped(hostile: Callable[..., str]) -> None:
    def watch_event_first(conn: socket.socket, n: int) -> None:
        request = recv_request(conn)
        conn.sendall(encode(Message(Op.WATCH_EVENT, 0, 0, b"backend\0token\0")))
        conn.sendall(encode(Message(Op.READ, request.req_id, 0, b"10.137.0.5")))

    assert XenStore(("unix", hostile(watch_event_first)), TIMEOUT).read("backend/vif/4/0/ip") == "10.137.0.5"


def test_after_a_broken_reply_the_next_request_starts_a_fresh_connection(hostile: Callable[..., str]) -> None:
    def garbage_then_good(conn: socket.socket, n: int) -> None:
        while True:
            request = recv_request(conn)
            if n == 0:
                conn.sendall(encode(Message(request.type, request.req_id + 7, 0, b"stale")))
                return
            conn.sendall(encode(Message(request.type, request.req_id, 0, b"fresh")))

    client = XenStore(("unix", hostile(garbage_then_good)), TIMEOUT)
    with pytest.raises(XenStoreUnavailable):
        client.read("x")
    assert not client.connected
    assert client.read("x") == "fresh"


def test_a_missing_key_answer_from_any_store_is_none(hostile: Callable[..., str]) -> None:
    def enoent(conn: socket.socket, n: int) -> None:
        request = recv_request(conn)
        conn.sendall(encode(Message(Op.ERROR, request.req_id, 0, b"ENOENT\0")))

    assert XenStore(("unix", hostile(enoent)), TIMEOUT).read("x") is None
