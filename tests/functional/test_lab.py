"""``vif-hotplug lab`` as installed: every check passes and nothing of the lab remains.

Each lab run takes seconds, so one run per mode is shared by the tests of
this module; each test asserts one property of that run.
"""

from __future__ import annotations

import glob
import json
import re
import subprocess
from dataclasses import dataclass
from typing import Any

import pytest

from tests.functional.conftest import entry_point, require_root

pytestmark = pytest.mark.netns

TIMEOUT = 300


@dataclass(frozen=True)
class LabRun:
    returncode: int
    results: list[dict[str, Any]]
    lab_id: str
    #: (pid, command line) of every child the lab reported starting.
    children: tuple[tuple[int, str], ...]
    stderr: str


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def run_lab(*args: str) -> LabRun:
    require_root()
    proc = subprocess.run(
        [entry_point("vif-hotplug"), "lab", "--json", *args], capture_output=True, text=True, timeout=TIMEOUT,
    )
    found = re.search(r"creating namespaces vhlab-([0-9a-f]+)-", proc.stderr)
    assert found, f"lab did not start:\n{proc.stderr}"
    try:
        results = json.loads(proc.stdout)
    except ValueError:
        pytest.fail(f"--json printed no JSON:\n{proc.stdout}\n{proc.stderr}")
    pids = [int(p) for p in re.findall(r"\(pid (\d+)\)", proc.stderr)]
    return LabRun(proc.returncode, results, found.group(1), tuple((p, _cmdline(p)) for p in pids), proc.stderr)


def leftovers(lab: LabRun) -> list[str]:
    """Anything of this lab still present: namespaces, netns files, state, tmpdir, child processes."""
    prefix = f"vhlab-{lab.lab_id}"
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    out = [f"namespace {n}" for n in names if n.startswith(prefix)]
    out += glob.glob(f"/etc/netns/{prefix}-*") + glob.glob(f"/run/vif-hotplug-lab/{lab.lab_id}.json")
    out += glob.glob(f"/tmp/{prefix}-*")
    # A PID may be reused by an unrelated process: only the same command line counts.
    out += [f"process {pid} {cmd}" for pid, cmd in lab.children if cmd and _cmdline(pid) == cmd]
    return out


def failed(lab: LabRun) -> list[dict[str, Any]]:
    return [r for r in lab.results if not r["ok"]]


@pytest.fixture(scope="module")
def ipv4_lab() -> LabRun:
    return run_lab()


@pytest.fixture(scope="module")
def ipv6_lab() -> LabRun:
    return run_lab("--ipv6")


def test_lab_passes_every_check(ipv4_lab: LabRun) -> None:
    assert ipv4_lab.results and not failed(ipv4_lab), ipv4_lab.stderr
    assert ipv4_lab.returncode == 0


def test_lab_results_are_rows_of_check_vm_ok_detail(ipv4_lab: LabRun) -> None:
    assert all(set(r) == {"check", "vm", "ok", "detail"} for r in ipv4_lab.results)


def test_lab_proves_each_required_property(ipv4_lab: LabRun) -> None:
    checks = {r["check"] for r in ipv4_lab.results}
    for needle in ("online: hotplug-status connected", "ping uplink", "tcp to uplink, source NATed",
                   "dns DNS1 udp", "dns DNS1 tcp", "dns DNS2 udp", "dns DNS2 tcp", "no vm-to-vm",
                   "forged source dropped", "uplink-forged VM address dropped", "offline: routes gone",
                   "offline: gateway address gone", "offline: neighbour gone", "offline: set entries gone",
                   "after switch: dns DNS1 udp"):
        assert needle in checks


def test_lab_checks_every_vm(ipv4_lab: LabRun) -> None:
    connected = {r["vm"] for r in ipv4_lab.results if r["check"] == "online: hotplug-status connected"}
    assert connected == {"vm11", "vm12", "vm13"}


def test_lab_leaves_nothing_behind(ipv4_lab: LabRun) -> None:
    assert ipv4_lab.children, "the lab reported no child process"
    assert leftovers(ipv4_lab) == []


def test_ipv6_lab_passes_every_check(ipv6_lab: LabRun) -> None:
    assert ipv6_lab.results and not failed(ipv6_lab), ipv6_lab.stderr
    assert ipv6_lab.returncode == 0


def test_ipv6_lab_proves_ipv6_properties(ipv6_lab: LabRun) -> None:
    checks = {r["check"] for r in ipv6_lab.results}
    for needle in ("ping6 uplink", "tcp6 to uplink, source NATed", "forged IPv6 source dropped",
                   "uplink-forged VM IPv6 address dropped", "no IPv6 for an IPv4-only VM", "dns DNS1 udp"):
        assert needle in checks


def test_ipv6_lab_leaves_nothing_behind(ipv6_lab: LabRun) -> None:
    assert leftovers(ipv6_lab) == []


def test_keep_then_down_leaves_nothing_behind() -> None:
    kept = run_lab("--keep", "--vms", "1")
    assert kept.returncode == 0, kept.stderr
    assert f"namespace vhlab-{kept.lab_id}-net" in leftovers(kept)
    down = subprocess.run(
        [entry_point("vif-hotplug"), "lab", "--down", kept.lab_id], capture_output=True, text=True, timeout=60,
    )
    assert down.returncode == 0, down.stderr
    assert leftovers(kept) == []


def test_ipv6_lab_needs_two_vms() -> None:
    require_root()
    proc = subprocess.run(
        [entry_point("vif-hotplug"), "lab", "--ipv6", "--vms", "1"], capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "--vms" in proc.stderr


def test_down_of_unknown_lab_fails() -> None:
    require_root()
    proc = subprocess.run(
        [entry_point("vif-hotplug"), "lab", "--down", "nosuchlab"], capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1
    assert "no lab nosuchlab" in proc.stderr
