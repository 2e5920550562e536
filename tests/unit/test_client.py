"""The thin client: what it hands to the agent, and how it asks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vif_hotplug.agent.client import MAGIC, encode_request, served, socket_path

CLIENT = Path(__file__).parents[2] / "vif_hotplug" / "agent" / "client.py"


@pytest.mark.parametrize(("prog", "argv", "expected"), [
    ("vif-route-qubes", ["online", "type_if=vif"], True),
    ("qubes-setup-dnat-to-ns", [], True),
    ("qubes-setup-dnat-to-ns", ["--watch"], False),
    ("vif-hotplug", ["status", "--json"], True),
    ("vif-hotplug", ["agent"], False),
    ("vif-hotplug", ["lab", "--vms", "2"], False),
    ("vif-hotplug", ["xenstored", "--socket", "/x"], False),
    ("vif-hotplug", ["connected-ips", "--watch"], False),
    ("vif-hotplug", [], False),
    ("something-else", ["online"], False),
])
def test_only_short_commands_of_our_programs_go_to_the_agent(prog: str, argv: list[str], expected: bool) -> None:
    assert served(prog, argv) is expected


def test_the_request_carries_argv_and_the_environment_as_given_str_or_bytes() -> None:
    as_str = encode_request("vif-route-qubes", ["online", "type_if=vif"], {"vif": "vif4.0", "X": "\udc80"})
    as_bytes = encode_request("vif-route-qubes", ["online", "type_if=vif"], {b"vif": b"vif4.0", b"X": b"\x80"})
    assert as_str == as_bytes
    assert as_str.split(b"\0") == [MAGIC.encode(), b"vif-route-qubes", b"2", b"online", b"type_if=vif",
                                   b"vif=vif4.0", b"X=\x80", b""]


def test_the_socket_follows_the_state_directory_unless_named() -> None:
    assert socket_path({}) == "/run/vif-hotplug/agent.sock"
    assert socket_path({b"VIF_HOTPLUG_STATE_DIR": b"/tmp/s/"}) == "/tmp/s/agent.sock"
    assert socket_path({"VIF_HOTPLUG_STATE_DIR": "/tmp/s", "VIF_HOTPLUG_AGENT_SOCKET": "/a.sock"}) == "/a.sock"


def test_the_client_loads_no_module_beyond_a_bare_interpreters(tmp_path: Path) -> None:
    (tmp_path / "vif_hotplug_client.py").write_text(CLIENT.read_text())
    code = ("import sys; before = set(sys.modules); sys.path[0:0] = [sys.argv[1]]; import vif_hotplug_client; "
            "print(sorted(set(sys.modules) - before))")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(tmp_path)], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "['_socket', 'vif_hotplug_client']"
