"""The thin client and the agent's side of the wire: what is handed over, how it is asked, what is refused."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vif_hotplug import registry
from vif_hotplug.agent import client, server
from vif_hotplug.agent.client import END, MAGIC, encode_request, served, socket_path, via_agent
from vif_hotplug.agent.server import decode_request

ROOT = Path(__file__).parents[2]


@pytest.mark.parametrize(("prog", "argv", "expected"), [
    ("vif-route-qubes", ["online", "type_if=vif"], True),
    ("qubes-setup-dnat-to-ns", [], True),
    ("qubes-setup-dnat-to-ns", ["--watch"], False),
    ("vif-hotplug", ["status", "--json"], True),
    ("vif-hotplug", ["route", "online", "vif4.0"], True),
    ("vif-hotplug", ["dns", "--watch"], False),
    ("vif-hotplug", ["agent"], False),
    ("vif-hotplug", ["lab", "--vms", "2"], False),
    ("vif-hotplug", ["xenstored", "--socket", "/x"], False),
    ("vif-hotplug", ["connected-ips", "--watch"], False),
    ("vif-hotplug", [], False),
    ("vif-hotplug", ["no-such-command"], False),
    ("something-else", ["online"], False),
])
def test_only_short_commands_of_our_programs_go_to_the_agent(prog: str, argv: list[str], expected: bool) -> None:
    assert served(prog, argv) is expected


def test_the_request_carries_argv_and_the_allowed_environment_as_given_str_or_bytes() -> None:
    as_str = encode_request("vif-route-qubes", ["online", "type_if=vif"],
                            {"vif": "vif4.0", "XENBUS_PATH": "backend/vif/4/0\udc80", "PATH": "/evil"})
    as_bytes = encode_request("vif-route-qubes", ["online", "type_if=vif"],
                              {b"vif": b"vif4.0", b"XENBUS_PATH": b"backend/vif/4/0\x80", b"PATH": b"/evil"})
    assert as_str == as_bytes
    assert as_str.split(b"\0") == [MAGIC.encode(), b"vif-route-qubes", b"2", b"online", b"type_if=vif", b"2",
                                   b"XENBUS_PATH=backend/vif/4/0\x80", b"vif=vif4.0", END.encode(), b""]


def test_the_agent_reads_back_what_the_client_sent() -> None:
    raw = encode_request("vif-hotplug", ["status", "--json"], {"VIF_HOTPLUG_CONF": "/c", "XENSTORED_PATH": "/s"})
    assert decode_request(raw) == ("vif-hotplug", ["status", "--json"],
                                   {"XENSTORED_PATH": "/s", "VIF_HOTPLUG_CONF": "/c"})


def test_a_request_cut_short_is_refused_not_run_with_part_of_its_environment() -> None:
    raw = encode_request("vif-route-qubes", ["online"], {"VIF_HOTPLUG_CONF": "/c", "XENSTORED_PATH": "/s"})
    for cut in range(1, len(raw)):
        with pytest.raises(ValueError):
            decode_request(raw[:cut])


def test_the_agent_drops_variables_outside_the_allowed_list_whoever_sent_them() -> None:
    words = [MAGIC, "vif-route-qubes", "1", "online", "3", "PATH=/evil", "LD_PRELOAD=/x.so", "vif=vif4.0", END]
    raw = b"".join(w.encode() + b"\0" for w in words)
    assert decode_request(raw)[2] == {"vif": "vif4.0"}


@pytest.mark.parametrize("words", [
    [MAGIC, "p", "5", "a", "0", END],          # more arguments than words
    [MAGIC, "p", "0", "2", "A=1", END],        # fewer variables than announced
    [MAGIC, "p", "0", "1", "novalue", END],    # not KEY=VALUE
    ["VIFHOTPLUG1", "p", "0", "0", END],        # the old protocol
    [MAGIC, "p", "x", "0", END],
])
def test_malformed_requests_are_refused(words: list[str]) -> None:
    with pytest.raises(ValueError):
        decode_request(b"".join(w.encode() + b"\0" for w in words))


def test_the_socket_follows_the_state_directory_unless_named() -> None:
    assert socket_path({}) == "/run/vif-hotplug/agent.sock"
    assert socket_path({b"VIF_HOTPLUG_STATE_DIR": b"/tmp/s/"}) == "/tmp/s/agent.sock"
    assert socket_path({"VIF_HOTPLUG_STATE_DIR": "/tmp/s", "VIF_HOTPLUG_AGENT_SOCKET": "/a.sock"}) == "/a.sock"


def test_the_client_loads_nothing_beyond_a_bare_interpreter_and_its_registry() -> None:
    code = ("import sys; before = set(sys.modules); sys.path[0:0] = [sys.argv[1]]; "
            "import vif_hotplug.agent.client; print(sorted(set(sys.modules) - before))")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(ROOT)], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == str(sorted(["_socket", "vif_hotplug", "vif_hotplug.agent", "vif_hotplug.agent.client",
                                      "vif_hotplug.registry"]))


def _serve_once(path: Path, answer: bytes | None, accepted: threading.Event) -> threading.Thread:
    """A listener at ``path`` that takes one connection and answers ``answer`` (``None``: never)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def run() -> None:
        conn, _ = listener.accept()
        accepted.set()
        if answer is not None:
            conn.sendall(answer)
            conn.close()
        else:
            time.sleep(client.TIMEOUT + 5)
        listener.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_an_agent_that_takes_a_request_and_never_answers_is_given_up_on_in_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(client, "TIMEOUT", 0.5)
    accepted = threading.Event()
    _serve_once(tmp_path / "agent.sock", None, accepted)
    start = time.monotonic()
    code = via_agent("vif-route-qubes", ["online"], {"VIF_HOTPLUG_AGENT_SOCKET": str(tmp_path / "agent.sock")})
    assert code is None and accepted.is_set()
    assert time.monotonic() - start < 3


def test_the_client_waits_for_the_agent_less_than_libxl_waits_for_the_script_minus_the_fallback() -> None:
    from vif_hotplug.app.settings import AGENT_LOCK_TIMEOUT, FALLBACK_LOCK_TIMEOUT, XENSTORE_TIMEOUT

    libxl_hotplug_timeout = 40.0  # LIBXL_HOTPLUG_TIMEOUT, tools/libs/light/libxl_internal.h
    assert client.CONNECT_TIMEOUT + client.TIMEOUT + FALLBACK_LOCK_TIMEOUT + XENSTORE_TIMEOUT < libxl_hotplug_timeout
    assert AGENT_LOCK_TIMEOUT < client.TIMEOUT


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a socket another user owns")
def test_the_client_sends_nothing_to_a_socket_whose_server_is_not_root() -> None:
    # Not pytest's tmp_path: its parent is root's alone, and "nobody" must reach the socket.
    import shutil
    import tempfile

    where = Path(tempfile.mkdtemp(prefix="vh-client-"))
    where.chmod(0o777)
    try:
        _refused_by_a_non_root_server(where / "agent.sock")
    finally:
        shutil.rmtree(where)


def _refused_by_a_non_root_server(path: Path) -> None:
    code = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.bind(sys.argv[1]); s.listen(1)\n"
        "import os; os.chmod(sys.argv[1], 0o777); print('ready', flush=True)\n"
        "c, _ = s.accept(); c.settimeout(3)\n"
        "print('got', len(c.recv(65536)), flush=True)\n"
    )
    proc = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3",
                             "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    assert via_agent("vif-route-qubes", ["online"], {"VIF_HOTPLUG_AGENT_SOCKET": str(path)}) is None
    assert proc.stdout.readline().strip() == "got 0"
    proc.wait(timeout=10)


def test_every_served_command_the_client_may_send_is_one_the_agent_dispatches() -> None:
    for command in registry.COMMANDS:
        assert served("vif-hotplug", [command.name]) == command.served
        if command.program:
            assert served(command.program, []) == command.served


def test_a_trickling_client_does_not_hold_the_request_deadline_open() -> None:
    a, b = socket.socketpair()
    stop = threading.Event()

    def trickle() -> None:
        while not stop.is_set():
            a.send(b"x")
            time.sleep(0.05)

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        start = time.monotonic()
        with pytest.raises(OSError):
            server._read_request(b, time.monotonic() + 0.3)
        assert time.monotonic() - start < 1
    finally:
        stop.set()
        thread.join()
        a.close()
        b.close()
