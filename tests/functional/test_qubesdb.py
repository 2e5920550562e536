"""QubesDB as a Qubes netvm has it: the agent through Qubes' module (stand-in), one-shot runs through
``qubesdb-read`` (fake), on real kernel networking, once per firewall backend.

The stand-in daemon runs in this process (``tests/qubesdb_daemon.py``); the
agent imports the stand-in module because its own environment at start has
the stand-in's directory on ``PYTHONPATH`` (nothing of it goes through the
clients' forwarded environment), in strict mode: a call from a thread where
SIGTERM can interrupt it, or two calls at once, is recorded as a violation
and fails the test. netvm.conf has no ``[netvm]`` section: the parameters,
connected addresses, mappings and services come from QubesDB.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import polling
from tests.qubesdb_daemon import STANDIN_DIR, StandinQubesDB, tools_dir
from tests.qubesdb_fixtures import NETVM_DB

from .conftest import NetnsFactory, entry_point
from .hotplug_env import UPLINK_NET, Netvm, received, running_netvm, udp_listen, udp_send, wait_for_line

pytestmark = pytest.mark.netns

MAPPED_REAL, MAPPED_VISIBLE, MAPPED_GATEWAY = "10.137.0.50", "10.138.0.2", "10.138.0.1"
#: NAT namespaces are named for the whole machine (<vif>-nat): a domid the other suites do not use.
MAPPED_DOMID = 37
NAT_NETNS = f"vif{MAPPED_DOMID}.0-nat"


@pytest.fixture
def qdb() -> Iterator[StandinQubesDB]:
    where = tempfile.mkdtemp(prefix="qdb")
    daemon = StandinQubesDB(f"{where}/qubesdb.sock", dict(NETVM_DB)).start()
    try:
        yield daemon
    finally:
        daemon.stop()
        violations = Path(daemon.path + ".violations")
        text = violations.read_text() if violations.exists() else ""
        shutil.rmtree(where, ignore_errors=True)
        assert text == "", f"the agent broke a rule of Qubes' library:\n{text}"


@pytest.fixture
def netvm(make_netns: NetnsFactory, backend: str) -> Iterator[Netvm]:
    with running_netvm(make_netns, "", backend) as env:
        yield env


def start_agent_with_module(netvm: Netvm, qdb: StandinQubesDB, monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent, with Qubes' module (the stand-in) importable in its own environment."""
    with monkeypatch.context() as m:
        m.setenv("PYTHONPATH", str(STANDIN_DIR))
        m.setenv("QUBESDB_STANDIN_SOCKET", qdb.path)
        m.setenv("QUBESDB_STANDIN_STRICT", "1")
        netvm.start_agent("--no-start-up")


def qubesdb_read_env(netvm: Netvm, qdb: StandinQubesDB) -> dict[str, str]:
    """A one-shot run (no agent, no module) with the fake qubesdb-read in its tools directory."""
    return {"VIF_HOTPLUG_TOOLS_DIR": str(tools_dir(netvm.tmp / "tools")), "QUBESDB_STANDIN_SOCKET": qdb.path,
            "VIF_HOTPLUG_AGENT": "off"}


def eventually(check: Callable[[], bool], seconds: float = 30.0) -> bool:
    return polling.eventually(check, seconds)


def netns_list() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


# --- parameters -----------------------------------------------------------------------------------


def test_online_through_the_agent_takes_the_netvm_parameters_from_qubesdb(
    netvm: Netvm, qdb: StandinQubesDB, monkeypatch: pytest.MonkeyPatch,
) -> None:
    qdb.write("/qubes-netvm-gateway", "10.137.0.254")
    start_agent_with_module(netvm, qdb, monkeypatch)
    netvm.add_vm(4)
    netvm.hotplug("online", 4)
    addresses = netvm.ns.run("ip", "-o", "-4", "addr", "show", "dev", "vif4.0").stdout
    assert "10.137.0.254/32" in addresses and netvm.status(4) == "connected"


def test_the_plan_is_the_same_through_the_module_and_through_qubesdb_read(
    netvm: Netvm, qdb: StandinQubesDB, monkeypatch: pytest.MonkeyPatch,
) -> None:
    netvm.add_vm(4, [MAPPED_REAL], vm_view=(MAPPED_VISIBLE, MAPPED_GATEWAY))
    by_command = netvm.hotplug("online", 4, "--dry-run", "type_if=vif", env=qubesdb_read_env(netvm, qdb))
    start_agent_with_module(netvm, qdb, monkeypatch)
    by_module = netvm.hotplug("online", 4, "--dry-run", "type_if=vif")
    assert "vif4.0-nat" in by_module.stdout  # QubesDB's mapping, harden service and gateway are in it
    assert by_module.stdout == by_command.stdout


def test_an_event_through_qubesdb_read_runs_it_once(netvm: Netvm, qdb: StandinQubesDB) -> None:
    netvm.add_vm(4)
    netvm.hotplug("online", 4, env=qubesdb_read_env(netvm, qdb))
    runs = Path(qdb.path + ".runs").read_text().splitlines()
    assert len(runs) == 1 and netvm.status(4) == "connected"


# --- watches ---------------------------------------------------------------------------------------


def test_a_change_of_connected_ips_reaches_the_connected_sets_with_no_event(
    netvm: Netvm, qdb: StandinQubesDB, monkeypatch: pytest.MonkeyPatch,
) -> None:
    start_agent_with_module(netvm, qdb, monkeypatch)
    netvm.tool("init")
    assert netvm.firewall().members(4, "connected") == {"10.137.0.5", "10.137.0.6"}
    qdb.write("/connected-ips", "10.137.0.9")
    assert eventually(lambda: netvm.firewall().members(4, "connected") == {"10.137.0.9"})


def test_connected_ips_watch_follows_qubesdb_in_a_process_of_its_own(
    netvm: Netvm, qdb: StandinQubesDB,
) -> None:
    netvm.tool("init", env=qubesdb_read_env(netvm, qdb))
    env = {**os.environ, **netvm.env, "PYTHONPATH": str(STANDIN_DIR), "QUBESDB_STANDIN_SOCKET": qdb.path,
           "QUBESDB_STANDIN_STRICT": "1"}
    watch = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{netvm.ns.name}", entry_point("vif-hotplug"), "connected-ips", "--watch"],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert eventually(lambda: qdb.watch_count() > 0)
        qdb.write("/connected-ips", "10.137.0.9")
        assert eventually(lambda: netvm.firewall().members(4, "connected") == {"10.137.0.9"})
    finally:
        watch.terminate()
        _, err = watch.communicate(timeout=30)
    assert watch.returncode == 0, err


def test_a_mapping_written_after_its_vif_came_online_takes_effect(
    netvm: Netvm, qdb: StandinQubesDB, monkeypatch: pytest.MonkeyPatch,
) -> None:
    qdb.rm(f"/mapped-ip/{MAPPED_REAL}/")
    start_agent_with_module(netvm, qdb, monkeypatch)
    up = netvm.add_uplink()
    vm = netvm.add_vm(MAPPED_DOMID, [MAPPED_REAL], vm_view=(MAPPED_VISIBLE, MAPPED_GATEWAY))
    netvm.hotplug("online", MAPPED_DOMID)
    assert NAT_NETNS not in netns_list()
    # dom0 writes the mapping once the VM runs (Qubes issue 9318).
    qdb.write(f"/mapped-ip/{MAPPED_REAL}/visible-ip", MAPPED_VISIBLE)
    qdb.write(f"/mapped-ip/{MAPPED_REAL}/visible-gateway", MAPPED_GATEWAY)

    def nat_ready() -> bool:
        if NAT_NETNS not in netns_list():
            return False
        inside = subprocess.run(["ip", "-n", NAT_NETNS, "-o", "-4", "addr", "show", "dev", f"vif{MAPPED_DOMID}.0"],
                                capture_output=True, text=True).stdout
        return f"{MAPPED_GATEWAY}/32" in inside

    assert eventually(nat_ready)
    netvm.settle(MAPPED_DOMID)
    out = received(up, f"{UPLINK_NET}.2", netvm.tmp / "out.log", [(vm.ns, MAPPED_VISIBLE, "out")])
    back_log = netvm.tmp / "back.log"
    at_vm = udp_listen(vm.ns, MAPPED_VISIBLE, 5001, back_log)
    try:
        udp_send(up, f"{UPLINK_NET}.2", MAPPED_REAL, 5001, "back")
        assert wait_for_line(back_log, "back")
    finally:
        at_vm.kill()
        at_vm.wait()
    assert out == [f"{MAPPED_REAL} out"]
    assert back_log.read_text().splitlines() == [f"{UPLINK_NET}.2 back"]
    assert netvm.status(MAPPED_DOMID) == "connected"


# --- a QubesDB that hangs, and reading without side effects -------------------------------------------


def test_a_qubesdb_that_hangs_fails_the_event_in_one_line(
    netvm: Netvm, qdb: StandinQubesDB, monkeypatch: pytest.MonkeyPatch,
) -> None:
    start_agent_with_module(netvm, qdb, monkeypatch)
    netvm.add_vm(4)
    netvm.hotplug("online", 4)
    qdb.hang = True
    qdb.write("/qubes-netvm-primary-dns", "10.139.1.9")  # the agent must read QubesDB again
    netvm.add_vm(5)
    proc = netvm.hotplug("online", 5, check=False)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == ["vif-route-qubes: vif5.0: online failed: QubesDB did not answer within 5s"]
    assert netvm.status(5) == "error"


def test_status_and_dry_runs_read_qubesdb_and_change_nothing(
    netvm: Netvm, qdb: StandinQubesDB, monkeypatch: pytest.MonkeyPatch,
) -> None:
    start_agent_with_module(netvm, qdb, monkeypatch)
    netvm.tool("init")
    netvm.add_vm(4)
    netvm.hotplug("online", 4)
    netvm.settle(4)
    before = netvm.settled_dump()
    status = netvm.tool("status", check=False)
    netvm.tool("reconcile", "--dry-run")
    netvm.hotplug("offline", 4, "--dry-run", "type_if=vif")
    assert status.returncode == 0, status.stdout + status.stderr
    assert netvm.settled_dump() == before
    assert qdb.client_changes == []
