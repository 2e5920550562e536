"""The embedded xenstored against real clients: Debian's xenstore-utils and pyxs.

Each test gets its own server on a socket in ``tmp_path``; nothing needs root.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pyxs

import vif_hotplug
from vif_hotplug.lab.xenstored import XenStoreServer
from vif_hotplug.xen.xs_wire import (
    HEADER_SIZE,
    XENSTORE_PAYLOAD_MAX,
    Decoder,
    Header,
    Message,
    Op,
    encode,
    error_payload,
    join_args,
)

TIMEOUT = 10.0


@pytest.fixture
def sock(tmp_path: Path) -> Iterator[str]:
    """Path of a running server's socket."""
    path = str(tmp_path / "xs.sock")
    with XenStoreServer(path):
        yield path


@pytest.fixture
def server(tmp_path: Path) -> Iterator[XenStoreServer]:
    with XenStoreServer(str(tmp_path / "xs.sock")) as running:
        yield running


def client(path: str) -> Any:
    return pyxs.Client(unix_socket_path=path)


def cli(path: str, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not installed (package xenstore-utils)")
    env = dict(os.environ, XENSTORED_PATH=path)
    proc = subprocess.run([tool, *args], capture_output=True, text=True, env=env, timeout=TIMEOUT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{tool} {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
    return proc


class Raw:
    """A bare protocol client, for what well-behaved libraries never send."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(path)
        self.decoder = Decoder()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def receive(self) -> Message:
        while (message := self.decoder.next_message()) is None:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("server closed the connection")
            self.decoder.feed(data)
        return message

    def request(self, op: int, payload: bytes, req_id: int = 1, tx_id: int = 0) -> Message:
        self.send(encode(Message(op, req_id, tx_id, payload)))
        return self.receive()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(sock: str) -> Iterator[Raw]:
    conn = Raw(sock)
    yield conn
    conn.close()


def next_event(monitor: Any) -> tuple[bytes, bytes]:
    # Monitor.wait() blocks forever; the queue behind it takes a timeout.
    path, token = monitor.events.get(timeout=TIMEOUT)
    return path, token


def fill_directory(path: str, parent: bytes, count: int) -> None:
    with client(path) as c:
        for n in range(count):
            c.mkdir(parent + b"/entry-%05d" % n)


# -- xenstore-utils ------------------------------------------------------------


def test_cli_write_then_read_round_trips_a_value(sock: str) -> None:
    cli(sock, "xenstore-write", "/vm/1/name", "guest one")
    assert cli(sock, "xenstore-read", "/vm/1/name").stdout == "guest one\n"


def test_cli_relative_path_lands_under_local_domain_0(sock: str) -> None:
    cli(sock, "xenstore-write", "name", "Domain-0")
    assert cli(sock, "xenstore-read", "/local/domain/0/name").stdout == "Domain-0\n"


def test_cli_read_of_a_missing_node_fails(sock: str) -> None:
    assert cli(sock, "xenstore-read", "/nope", check=False).returncode != 0


def test_cli_ls_shows_a_tree_with_values(sock: str) -> None:
    cli(sock, "xenstore-write", "/t/a", "1", "/t/b/c", "2")
    assert cli(sock, "xenstore-ls", "/t").stdout == 'a = "1"\nb = ""\n c = "2"\n'


def test_cli_list_shows_children_in_creation_order(sock: str) -> None:
    cli(sock, "xenstore-write", "/t/z", "", "/t/a", "", "/t/m", "")
    assert cli(sock, "xenstore-list", "/t").stdout.split() == ["z", "a", "m"]


def test_cli_rm_removes_a_whole_subtree(sock: str) -> None:
    cli(sock, "xenstore-write", "/t/keep", "1", "/t/gone/a/b", "2")
    cli(sock, "xenstore-rm", "/t/gone")
    assert cli(sock, "xenstore-ls", "/t").stdout == 'keep = "1"\n'


def test_cli_exists_succeeds_for_a_present_node(sock: str) -> None:
    cli(sock, "xenstore-write", "/t/here", "")
    assert cli(sock, "xenstore-exists", "/t/here", check=False).returncode == 0


def test_cli_exists_fails_for_a_missing_node(sock: str) -> None:
    assert cli(sock, "xenstore-exists", "/t/absent", check=False).returncode != 0


def test_cli_list_pages_a_huge_directory_with_directory_part(sock: str, caplog: pytest.LogCaptureFixture) -> None:
    fill_directory(sock, b"/big", 3000)  # ~36 KiB of names: nine times the payload limit
    with caplog.at_level(logging.DEBUG, logger="vif_hotplug.lab.xenstored"):
        listed = cli(sock, "xenstore-list", "/big").stdout.split()
    assert listed == [f"entry-{n:05d}" for n in range(3000)]
    assert any("DIRECTORY_PART" in record.getMessage() for record in caplog.records)


def test_cli_list_of_a_huge_directory_on_a_store_without_directory_part_fails_with_e2big(
    server: XenStoreServer,
) -> None:
    fill_directory(server.socket_path, b"/big", 3000)
    # A xenstored before Xen 4.9: libxenstore turns DIRECTORY_PART's ENOSYS back into the E2BIG.
    server.answer_with_error(Op.DIRECTORY_PART, "/big", "ENOSYS")
    proc = cli(server.socket_path, "xenstore-list", "/big", check=False)
    assert (proc.returncode, proc.stderr) == (1, "xenstore-list: could not list path /big\n")


def test_cli_ls_shows_every_entry_of_a_huge_directory(sock: str) -> None:
    fill_directory(sock, b"/big", 3000)
    lines = cli(sock, "xenstore-ls", "/big").stdout.splitlines()
    assert lines == [f'entry-{n:05d} = ""' for n in range(3000)]


def test_cli_watch_reports_a_write_from_another_client(sock: str) -> None:
    if shutil.which("xenstore-watch") is None:
        pytest.skip("xenstore-watch not installed (package xenstore-utils)")
    watcher = subprocess.Popen(
        ["xenstore-watch", "-n", "2", "/w"], stdout=subprocess.PIPE, text=True,
        env=dict(os.environ, XENSTORED_PATH=sock),
    )
    try:
        assert watcher.stdout is not None
        assert select.select([watcher.stdout], [], [], TIMEOUT)[0], "no initial watch event"
        assert watcher.stdout.readline() == "/w\n"  # the event every new watch fires once
        cli(sock, "xenstore-write", "/w/x", "1")
        out, _ = watcher.communicate(timeout=TIMEOUT)
    finally:
        watcher.kill()
        watcher.wait()
    assert out == "/w/x\n"


# -- pyxs ----------------------------------------------------------------------


def test_pyxs_write_then_read_round_trips_a_value(sock: str) -> None:
    with client(sock) as c:
        c.write(b"/vm/1/uuid", b"1234")
        assert c.read(b"/vm/1/uuid") == b"1234"


def test_pyxs_write_creates_missing_parents_with_empty_values(sock: str) -> None:
    with client(sock) as c:
        c.write(b"/a/b/c", b"x")
        assert c.read(b"/a/b") == b""


def test_pyxs_mkdir_leaves_an_existing_value_alone(sock: str) -> None:
    with client(sock) as c:
        c.write(b"/a", b"kept")
        c.mkdir(b"/a")
        assert c.read(b"/a") == b"kept"


def test_pyxs_delete_of_a_missing_node_with_existing_parent_succeeds(sock: str) -> None:
    with client(sock) as c:
        c.mkdir(b"/a")
        c.delete(b"/a/never")
        assert c.list(b"/a") == []


def test_pyxs_delete_of_a_node_whose_parent_is_missing_gives_enoent(sock: str) -> None:
    with client(sock) as c, pytest.raises(pyxs.PyXSError) as caught:
        c.delete(b"/no/such")
    assert caught.value.args[0] == errno.ENOENT


def test_pyxs_new_node_gets_default_permissions(sock: str) -> None:
    with client(sock) as c:
        c.mkdir(b"/p")
        assert c.get_perms(b"/p") == [b"n0"]


def test_pyxs_set_perms_is_returned_by_get_perms(sock: str) -> None:
    with client(sock) as c:
        c.mkdir(b"/p")
        c.set_perms(b"/p", [b"b3", b"r1", b"w2"])
        assert c.get_perms(b"/p") == [b"b3", b"r1", b"w2"]


def test_pyxs_get_domain_path_is_under_local_domain(sock: str) -> None:
    with client(sock) as c:
        assert c.get_domain_path(5) == b"/local/domain/5"


def test_pyxs_list_of_a_huge_directory_gives_e2big(sock: str) -> None:
    fill_directory(sock, b"/big", 3000)
    with client(sock) as c, pytest.raises(pyxs.PyXSError) as caught:
        c.list(b"/big")
    assert caught.value.args[0] == errno.E2BIG


def test_transaction_writes_are_invisible_to_others_until_commit(sock: str) -> None:
    with client(sock) as c1, client(sock) as c2:
        c1.transaction()
        c1.write(b"/tx/x", b"1")
        assert not c2.exists(b"/tx/x")
        assert c1.commit()
        assert c2.read(b"/tx/x") == b"1"


def test_transaction_sees_its_own_writes(sock: str) -> None:
    with client(sock) as c:
        c.transaction()
        c.write(b"/tx/x", b"1")
        assert c.read(b"/tx/x") == b"1"
        c.rollback()


def test_transaction_rollback_discards_writes(sock: str) -> None:
    with client(sock) as c:
        c.transaction()
        c.write(b"/tx/x", b"1")
        c.rollback()
        assert not c.exists(b"/tx/x")


def test_transaction_conflicting_write_makes_commit_fail_with_eagain(sock: str) -> None:
    with client(sock) as c1, client(sock) as c2:
        c1.write(b"/tx/x", b"0")
        c1.transaction()
        c1.write(b"/tx/x", b"from-tx")
        c2.write(b"/tx/x", b"outside")
        assert c1.commit() is False  # pyxs reports EAGAIN as False
        assert c2.read(b"/tx/x") == b"outside"


def test_transaction_fails_when_a_read_node_changed(sock: str) -> None:
    with client(sock) as c1, client(sock) as c2:
        c1.write(b"/tx/in", b"0")
        c1.transaction()
        c1.write(b"/tx/out", c1.read(b"/tx/in"))
        c2.write(b"/tx/in", b"1")
        assert c1.commit() is False


def test_transaction_fails_when_a_listed_directory_changed(sock: str) -> None:
    with client(sock) as c1, client(sock) as c2:
        c1.mkdir(b"/tx/dir")
        c1.transaction()
        c1.write(b"/tx/count", str(len(c1.list(b"/tx/dir"))).encode())
        c2.mkdir(b"/tx/dir/new")
        assert c1.commit() is False


def test_transaction_unaffected_by_unrelated_writes_commits(sock: str) -> None:
    with client(sock) as c1, client(sock) as c2:
        c1.write(b"/tx/a/x", b"0")
        c2.write(b"/other/y", b"0")
        c1.transaction()
        c1.write(b"/tx/a/x", b"1")
        c2.write(b"/other/y", b"1")
        assert c1.commit() is True


def test_watch_fires_once_when_registered(sock: str) -> None:
    with client(sock) as c:
        monitor = c.monitor()
        monitor.watch(b"/w", b"tok")
        assert next_event(monitor) == (b"/w", b"tok")


def test_watch_fires_on_a_write_from_another_client(sock: str) -> None:
    with client(sock) as watcher, client(sock) as writer:
        monitor = watcher.monitor()
        monitor.watch(b"/w", b"tok")
        next_event(monitor)
        writer.write(b"/w/a/b", b"1")
        assert next_event(monitor) == (b"/w/a/b", b"tok")


def test_watch_ignores_writes_outside_its_subtree(sock: str) -> None:
    with client(sock) as watcher, client(sock) as writer:
        monitor = watcher.monitor()
        monitor.watch(b"/w", b"tok")
        next_event(monitor)
        writer.write(b"/wx", b"1")
        writer.write(b"/w", b"2")
        assert next_event(monitor) == (b"/w", b"tok")


def test_relative_watch_reports_relative_paths(sock: str) -> None:
    with client(sock) as watcher, client(sock) as writer:
        monitor = watcher.monitor()
        monitor.watch(b"device", b"tok")
        next_event(monitor)
        writer.write(b"/local/domain/0/device/vif/0", b"1")
        assert next_event(monitor) == (b"device/vif/0", b"tok")


def test_rm_fires_watches_on_removed_descendants(sock: str) -> None:
    with client(sock) as watcher, client(sock) as writer:
        writer.write(b"/r/a/b", b"1")
        monitor = watcher.monitor()
        monitor.watch(b"/r/a/b", b"tok")
        next_event(monitor)
        writer.delete(b"/r")
        assert next_event(monitor) == (b"/r/a/b", b"tok")


def test_set_perms_fires_the_watch(sock: str) -> None:
    with client(sock) as watcher, client(sock) as writer:
        writer.mkdir(b"/p")
        monitor = watcher.monitor()
        monitor.watch(b"/p", b"tok")
        next_event(monitor)
        writer.set_perms(b"/p", [b"r1"])
        assert next_event(monitor) == (b"/p", b"tok")


def test_transaction_watch_events_wait_for_commit(sock: str) -> None:
    with client(sock) as watcher, client(sock) as writer:
        monitor = watcher.monitor()
        monitor.watch(b"/w", b"tok")
        next_event(monitor)
        writer.transaction()
        writer.write(b"/w/x", b"1")
        writer.exists(b"/w")  # a round trip the event would have overtaken
        with pytest.raises(queue.Empty):
            monitor.events.get(timeout=0.2)
        writer.commit()
        assert next_event(monitor) == (b"/w/x", b"tok")


def test_unwatch_stops_events(sock: str) -> None:
    with client(sock) as watcher, client(sock) as writer:
        monitor = watcher.monitor()
        monitor.watch(b"/w", b"tok")
        next_event(monitor)
        monitor.unwatch(b"/w", b"tok")
        writer.write(b"/w", b"1")
        watcher.exists(b"/w")  # a round trip the event would have overtaken
        with pytest.raises(queue.Empty):
            monitor.events.get(timeout=0.2)


# -- raw protocol ----------------------------------------------------------------


def test_reply_carries_the_request_req_id_and_tx_id(raw: Raw) -> None:
    tx_id = int(raw.request(Op.TRANSACTION_START, b"\0").payload.rstrip(b"\0"))
    reply = raw.request(Op.WRITE, b"/a\0v", req_id=0xDEADBEEF, tx_id=tx_id)
    assert (reply.type, reply.req_id, reply.tx_id, reply.payload) == (Op.WRITE, 0xDEADBEEF, tx_id, b"OK\0")


def test_unknown_transaction_id_gives_enoent(raw: Raw) -> None:
    assert raw.request(Op.READ, b"/\0", tx_id=777) == Message(Op.ERROR, 1, 777, error_payload("ENOENT"))


def test_read_of_a_missing_node_gives_enoent(raw: Raw) -> None:
    assert raw.request(Op.READ, b"/missing\0").payload == error_payload("ENOENT")


def test_request_without_nul_terminator_gives_einval(raw: Raw) -> None:
    assert raw.request(Op.READ, b"/a").payload == error_payload("EINVAL")


def test_invalid_path_gives_einval(raw: Raw) -> None:
    assert raw.request(Op.WRITE, b"/a//b\0v").payload == error_payload("EINVAL")


def test_unknown_operation_gives_enosys(raw: Raw) -> None:
    assert raw.request(200, b"\0").payload == error_payload("ENOSYS")


def test_is_domain_introduced_answers_true(raw: Raw) -> None:
    assert raw.request(Op.IS_DOMAIN_INTRODUCED, b"3\0").payload == b"T\0"


def test_introduce_is_acknowledged(raw: Raw) -> None:
    assert raw.request(Op.INTRODUCE, join_args(b"3", b"1234", b"5")).payload == b"OK\0"


def test_directory_part_chunks_reassemble_to_the_full_listing(sock: str, raw: Raw) -> None:
    fill_directory(sock, b"/big", 1000)
    listing, offset, generations = b"", 0, set()
    while True:
        reply = raw.request(Op.DIRECTORY_PART, join_args(b"/big", str(offset).encode()))
        assert reply.type == Op.DIRECTORY_PART and len(reply.payload) <= XENSTORE_PAYLOAD_MAX
        generation, _, chunk = reply.payload.partition(b"\0")
        generations.add(generation)
        if chunk.endswith(b"\0\0") or chunk == b"\0":
            listing += chunk[:-1]
            break
        listing += chunk
        offset += len(chunk)
    assert len(generations) == 1
    assert listing == join_args(*(b"entry-%05d" % n for n in range(1000)))


def _names(sock: str, count: int) -> None:
    # 15 characters and the NUL: 256 of them are exactly one payload.
    with client(sock) as c:
        for n in range(count):
            c.mkdir(b"/big/n%014d" % n)


def test_directory_of_exactly_one_payload_of_names_is_answered_whole(sock: str, raw: Raw) -> None:
    _names(sock, 256)
    reply = raw.request(Op.DIRECTORY, join_args(b"/big"))
    assert (reply.type, len(reply.payload)) == (Op.DIRECTORY, XENSTORE_PAYLOAD_MAX)


def test_directory_over_one_payload_of_names_gives_e2big(sock: str, raw: Raw) -> None:
    _names(sock, 257)
    assert raw.request(Op.DIRECTORY, join_args(b"/big")) == Message(Op.ERROR, 1, 0, error_payload("E2BIG"))


def test_a_request_told_to_fail_fails_and_others_do_not(server: XenStoreServer) -> None:
    raw = Raw(server.socket_path)
    try:
        server.answer_with_error(Op.WRITE, "/local/domain/0/backend/vif/4/0/hotplug-status", "ENOENT")
        refused = raw.request(Op.WRITE, b"backend/vif/4/0/hotplug-status\0connected", req_id=1)
        other = raw.request(Op.WRITE, b"backend/vif/4/0/hotplug-error\0x", req_id=2)
        server.answer_with_error(Op.WRITE, "/local/domain/0/backend/vif/4/0/hotplug-status", None)
        again = raw.request(Op.WRITE, b"backend/vif/4/0/hotplug-status\0connected", req_id=3)
    finally:
        raw.close()
    assert refused == Message(Op.ERROR, 1, 0, error_payload("ENOENT"))
    assert (other.type, again.type) == (Op.WRITE, Op.WRITE)


def test_oversized_message_gets_e2big_then_disconnect(raw: Raw) -> None:
    raw.send(Header(Op.WRITE, 9, 0, XENSTORE_PAYLOAD_MAX + 1).pack())
    assert raw.receive() == Message(Op.ERROR, 9, 0, error_payload("E2BIG"))
    with pytest.raises(ConnectionError):
        raw.receive()


def test_server_survives_a_client_disconnecting_mid_message(sock: str) -> None:
    half = Raw(sock)
    half.send(encode(Message(Op.WRITE, 1, 0, b"/a\0value"))[: HEADER_SIZE + 3])
    half.close()
    with client(sock) as c:
        c.write(b"/alive", b"1")
        assert not c.exists(b"/a")


def test_server_survives_garbage_input(sock: str) -> None:
    garbage = Raw(sock)
    garbage.send(bytes(range(256)) * 4)
    garbage.close()
    with client(sock) as c:
        c.write(b"/alive", b"1")
        assert c.read(b"/alive") == b"1"


def test_server_survives_a_client_that_vanishes_with_a_watch(sock: str) -> None:
    with client(sock) as c:
        c.monitor().watch(b"/w", b"tok")
    with client(sock) as c:
        c.write(b"/w/x", b"1")
        assert c.read(b"/w/x") == b"1"


def test_request_split_across_writes_is_reassembled(raw: Raw) -> None:
    for byte in encode(Message(Op.WRITE, 4, 0, b"/split\0v")):
        raw.send(bytes([byte]))
    assert raw.receive().payload == b"OK\0"


# -- lifecycle -------------------------------------------------------------------


def test_socket_is_private_to_its_owner(sock: str) -> None:
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600


def test_shutdown_removes_the_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "xs.sock")
    with XenStoreServer(path):
        pass
    assert not os.path.exists(path)


def _wait_for_listener(path: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        assert proc.poll() is None, "serve() exited early"
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(path)
                return
            except OSError:
                time.sleep(0.05)
    raise AssertionError(f"nothing listening on {path}")


def _serve_in_subprocess(path: str) -> subprocess.Popen[bytes]:
    code = "import sys; from vif_hotplug.lab.xenstored import serve; serve(sys.argv[1])"
    package_root = str(Path(vif_hotplug.__file__).parent.parent)
    return subprocess.Popen([sys.executable, "-c", code, path], env=dict(os.environ, PYTHONPATH=package_root))


def test_serve_replaces_a_stale_socket_file(tmp_path: Path) -> None:
    path = str(tmp_path / "xs.sock")
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(path)  # closing leaves the file behind, as a crashed daemon would
    proc = _serve_in_subprocess(path)
    try:
        _wait_for_listener(path, proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=TIMEOUT)


def test_serve_exits_cleanly_on_sigterm(tmp_path: Path) -> None:
    path = str(tmp_path / "xs.sock")
    proc = _serve_in_subprocess(path)
    _wait_for_listener(path, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=TIMEOUT) == 0
    assert not os.path.exists(path)
