"""The resident agent: access, order, faults and resources, on both firewall backends.

The hotplug suites (test_vif_route*.py) already run every event through an
agent and without one (the ``with_agent`` fixture); this file proves what
only the agent has: who may use it, what happens when it dies or a client
misbehaves, that it neither leaks nor blocks, and that a late start
brings the VMs up.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from vif_hotplug.agent.client import encode_request

from .conftest import NetnsFactory, entry_point
from .hotplug_env import GATEWAY, Netvm, fault, mute_unix_server, running_netvm

pytestmark = pytest.mark.netns

CONF = f"[netvm]\ngateway = {GATEWAY}\nprimary_dns = 10.139.1.1\nsecondary_dns = 10.139.1.2\n"
ROOT = Path(__file__).parents[2]
WRAPPER = ROOT / "etc" / "xen" / "scripts" / "vif-route-qubes"


@pytest.fixture
def netvm(make_netns: NetnsFactory, backend: str) -> Iterator[Netvm]:
    with running_netvm(make_netns, CONF, backend, agent=True) as env:
        yield env


def _agent_pid(netvm: Netvm) -> int:
    """The agent's own pid (nsenter execs it, so the Popen pid is the agent)."""
    assert netvm.agent is not None
    return netvm.agent.pid


def _ask(netvm: Netvm, request: bytes, read: bool = True) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(netvm.agent_socket))
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        if not read:
            return b""
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def _route_env(netvm: Netvm, domid: int) -> dict[str, str]:
    return {**netvm.env, "XENBUS_PATH": f"backend/vif/{domid}/0", "vif": f"vif{domid}.0"}


# --- the wrapper the toolstack runs ------------------------------------------------------


@pytest.fixture
def prefix(tmp_path: Path) -> Path:
    """The Xen wrapper as an install lays it out, pointed at this test's interpreter and package."""
    import sys

    text = WRAPPER.read_text()
    text = text.replace("/usr/bin/python3", sys.executable).replace("/usr/lib/python3/dist-packages", str(ROOT))
    script = tmp_path / "vif-route-qubes"
    script.write_text(text)
    script.chmod(0o755)
    return script


def _wrapper(netvm: Netvm, script: Path, domid: int, command: str, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **_route_env(netvm, domid), **extra}
    return subprocess.run(["nsenter", f"--net=/run/netns/{netvm.ns.name}", str(script), command, "type_if=vif"],
                          capture_output=True, text=True, env=env, timeout=120)


def test_the_xen_wrapper_goes_through_the_agent(netvm: Netvm, prefix: Path) -> None:
    netvm.add_vm(4)
    # A process doing the work itself would kill itself at its first step; the agent obeys no
    # such fault: an event that succeeds now was served by the agent.
    with fault(netvm, "online", "before", 0, where="local"):
        proc = _wrapper(netvm, prefix, 4, "online")
    assert proc.returncode == 0, proc.stderr
    assert netvm.status(4) == "connected"
    assert netvm.tool("status", "vif4.0", check=False).returncode == 0


def test_the_xen_wrapper_does_the_work_itself_without_an_agent(netvm: Netvm, prefix: Path) -> None:
    netvm.stop_agent()
    netvm.add_vm(4)
    proc = _wrapper(netvm, prefix, 4, "online")
    assert proc.returncode == 0, proc.stderr
    assert netvm.status(4) == "connected"
    assert "10.137.0.4 dev vif4.0" in netvm.ns.run("ip", "route").stdout


def test_a_bad_event_gives_the_same_one_line_error_with_and_without_the_agent(netvm: Netvm, prefix: Path) -> None:
    netvm.add_vm(4, extra={"mac": "zz:16:3e:5e:6c:00"})
    with_agent = _wrapper(netvm, prefix, 4, "online")
    without = _wrapper(netvm, prefix, 4, "online", VIF_HOTPLUG_AGENT="off")
    assert (with_agent.returncode, with_agent.stderr) == (without.returncode, without.stderr) == (1, with_agent.stderr)
    assert len(with_agent.stderr.strip().splitlines()) == 1
    assert netvm.status(4) == "error"


# --- faults ----------------------------------------------------------------------------------


def test_killing_the_agent_at_any_step_leaves_nothing_the_client_does_not_finish(netvm: Netvm) -> None:
    netvm.add_vm(4)
    netvm.stop_agent()
    netvm.hotplug("online", 4)  # the shared anti-spoofing chains and sets exist from here on
    netvm.hotplug("offline", 4)
    reference_off = netvm.dump()
    for index in range(60):
        netvm.start_agent("--no-start-up")
        with fault(netvm, "online", "before", index, where="agent"):
            proc = netvm.hotplug("online", 4, check=False)
        died = netvm.agent is not None and netvm.agent.poll() is not None
        assert proc.returncode == 0, proc.stderr  # the client fell back and did the work
        assert netvm.status(4) == "connected"
        assert "10.137.0.4 dev vif4.0" in netvm.ns.run("ip", "route").stdout
        if not died:
            break  # past the plan's last step: the agent did it all
        netvm.stop_agent()
        netvm.hotplug("offline", 4)
        assert netvm.dump() == reference_off
    else:
        pytest.fail("the fault point never went past the plan")


# --- order and concurrency -------------------------------------------------------------------------


def test_a_hundred_concurrent_clients_all_succeed(netvm: Netvm) -> None:
    domids = list(range(10, 110))
    for domid in domids:
        netvm.add_vm(domid, [f"10.137.{domid // 250}.{domid % 250}"], mac=f"00:16:3e:5e:00:{domid:02x}")
    with ThreadPoolExecutor(max_workers=100) as pool:
        results = list(pool.map(lambda d: netvm.hotplug("online", d, check=False), domids))
    assert [r.returncode for r in results] == [0] * len(domids), [r.stderr for r in results if r.returncode][:3]
    assert all(netvm.status(d) == "connected" for d in domids)
    assert len(netvm.members(4, "allowed")) == len(domids)


def test_a_slow_hook_of_one_vif_does_not_delay_another(netvm: Netvm) -> None:
    marker = netvm.tmp / "slow-hook-done"
    hook = netvm.tmp / "hooks" / "10-slow"
    hook.write_text(f"#!/bin/sh\n[ \"$2\" = vif4.0 ] && sleep 20 && touch {marker}\nexit 0\n")
    hook.chmod(0o755)
    netvm.add_vm(4)
    netvm.add_vm(5)
    netvm.hotplug("online", 4)
    netvm.hotplug("online", 5)
    assert netvm.status(5) == "connected"
    assert not marker.exists()  # vif5.0 was served while vif4.0's hook still ran


def test_a_client_that_leaves_mid_event_leaves_the_event_done_and_the_agent_serving(netvm: Netvm) -> None:
    netvm.add_vm(4)
    netvm.add_vm(5)
    _ask(netvm, encode_request("vif-route-qubes", ["online", "type_if=vif"], _route_env(netvm, 4)), read=False)
    assert wait_for_status(netvm, 4, "connected")
    netvm.hotplug("online", 5)
    assert netvm.status(5) == "connected"


def wait_for_status(netvm: Netvm, domid: int, status: str, deadline: float = 30) -> bool:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if netvm.status(domid) == status:
            return True
        time.sleep(0.05)
    return False


# --- who may ask, and what ------------------------------------------------------------------------


def test_the_socket_is_root_only(netvm: Netvm) -> None:
    mode = netvm.agent_socket.stat().st_mode & 0o777
    assert mode == 0o600 and netvm.agent_socket.stat().st_uid == 0


def test_a_non_root_client_is_refused(netvm: Netvm) -> None:
    netvm.add_vm(4)
    # Open the door the file mode keeps shut: the agent itself must still say no.
    netvm.agent_socket.chmod(0o666)
    for d in (netvm.tmp, netvm.tmp / "state"):
        d.chmod(0o755)
    before = netvm.dump()
    # The system's interpreter and nothing of the checkout: "nobody" may not enter the
    # directory it lies in (root's home is 0700).
    code = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.connect(sys.argv[1])\n"
        "s.sendall(sys.stdin.buffer.read()); s.shutdown(socket.SHUT_WR)\n"
        "out = b''\n"
        "while chunk := s.recv(65536): out += chunk\n"
        "sys.stdout.write(out.decode())\n"
    )
    request = encode_request("vif-route-qubes", ["online", "type_if=vif"], _route_env(netvm, 4))
    proc = subprocess.run(
        ["nsenter", f"--net=/run/netns/{netvm.ns.name}", "setpriv", "--reuid=65534", "--regid=65534",
         "--clear-groups", "/usr/bin/python3", "-I", "-c", code, str(netvm.agent_socket)],
        capture_output=True, input=request, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().endswith("X1\n") and "refused" in proc.stdout.decode()
    assert netvm.dump() == before


@pytest.mark.parametrize("garbage", [b"", b"\x00\x01\x02", b"GET / HTTP/1.0\r\n\r\n", b"VIFHOTPLUG1\x00x\x00999\x00"])
def test_garbage_gets_an_error_and_the_agent_keeps_serving(netvm: Netvm, garbage: bytes) -> None:
    answer = _ask(netvm, garbage)
    assert answer.endswith(b"X2\n") and b"bad request" in answer
    netvm.add_vm(4)
    netvm.hotplug("online", 4)
    assert netvm.status(4) == "connected"


def test_commands_that_must_run_here_are_not_served(netvm: Netvm) -> None:
    answer = _ask(netvm, encode_request("vif-hotplug", ["lab"], netvm.env))
    assert answer.endswith(b"X2\n")


# --- resources and start-up ------------------------------------------------------------------------------


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_the_agents_fds_and_memory_do_not_grow_over_a_thousand_events(netvm: Netvm) -> None:
    netvm.add_vm(4)
    request = encode_request("vif-route-qubes", ["online", "type_if=vif"], _route_env(netvm, 4))
    off = encode_request("vif-route-qubes", ["offline", "type_if=vif"], _route_env(netvm, 4))
    for _ in range(100):  # warm up: caches, lazily opened sockets
        _ask(netvm, request)
        _ask(netvm, off)
    pid = _agent_pid(netvm)
    fds, rss = _fds(pid), _rss_kib(pid)
    for _ in range(500):
        assert _ask(netvm, request).endswith(b"X0\n")
        assert _ask(netvm, off).endswith(b"X0\n")
    assert _fds(pid) == fds
    assert _rss_kib(pid) - rss < 4096  # KiB: allocator noise, not a leak per event


def test_a_late_agent_brings_up_the_vifs_xenstore_lists(netvm: Netvm) -> None:
    netvm.stop_agent()
    for domid in (4, 5):
        netvm.add_vm(domid)
    netvm.start_agent()  # with its start-up reconcile
    for domid in (4, 5):
        assert wait_for_status(netvm, domid, "connected")
        assert f"10.137.0.{domid} dev vif{domid}.0" in netvm.ns.run("ip", "route").stdout


def test_socket_activation_serves_on_the_socket_systemd_passes(netvm: Netvm) -> None:
    netvm.stop_agent()
    netvm.add_vm(4)
    path = netvm.tmp / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(8)
    env = {k: v for k, v in {**os.environ, **netvm.env}.items() if k != "VIF_HOTPLUG_AGENT"}
    env["LISTEN_FDS"] = "1"
    agent = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{netvm.ns.name}", "sh", "-c",
         f'LISTEN_PID=$$ exec {entry_point("vif-hotplug")} agent --no-start-up'],
        # Descriptor 3, as systemd passes it: made in preexec_fn, kept by pass_fds (closing comes after).
        env=env, pass_fds=(listener.fileno(), 3), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, preexec_fn=lambda: os.dup2(listener.fileno(), 3),
    )
    try:
        with fault(netvm, "online", "before", 0, where="local"):
            proc = netvm.hotplug("online", 4, env={"VIF_HOTPLUG_AGENT_SOCKET": str(path), "VIF_HOTPLUG_AGENT": "on"})
        assert proc.returncode == 0 and netvm.status(4) == "connected"
    finally:
        agent.terminate()
        agent.wait(timeout=40)
        listener.close()


def test_an_agent_that_accepts_and_never_answers_still_leaves_the_event_done_within_libxls_deadline(
    netvm: Netvm,
) -> None:
    netvm.stop_agent()
    netvm.add_vm(4)
    with mute_unix_server(netvm.agent_socket) as held:
        start = time.monotonic()
        proc = netvm.hotplug("online", 4, env={"VIF_HOTPLUG_AGENT": "on"}, check=False)
        elapsed = time.monotonic() - start
    assert held, "the client never reached the wedged agent"
    assert proc.returncode == 0 and netvm.status(4) == "connected", proc.stderr
    assert elapsed < 40  # LIBXL_HOTPLUG_TIMEOUT: libxl would have given up on the vif
