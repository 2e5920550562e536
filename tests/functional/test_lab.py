"""``vif-hotplug lab`` as installed: every check passes with each firewall backend, and nothing
of the lab remains (in the host's main namespace least of all).

Each lab run takes seconds, so one run per mode (backend, IPv4 or IPv6) is
shared by the tests of this module; each test asserts one property of that run.
"""

from __future__ import annotations

import glob
import json
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Any

import pytest

from tests.functional.conftest import entry_point, require_root, require_tool

pytestmark = pytest.mark.netns

TIMEOUT = 300
#: Every mode of the lab runs once per firewall backend.
BACKENDS = ("nftables", "iptables")


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def host_firewall() -> set[str]:
    """This package's objects in the host's main network namespace (read only): tables, chains, sets."""
    out: set[str] = set()
    nft = subprocess.run([require_tool("nft"), "-j", "list", "tables"], capture_output=True, text=True)
    if nft.returncode == 0:
        for item in json.loads(nft.stdout).get("nftables", []):
            table = item.get("table")
            if table and "qubes" in table.get("name", ""):
                out.add(f"nft table {table['family']} {table['name']}")
    for save in ("iptables-legacy-save", "ip6tables-legacy-save"):
        text = subprocess.run([require_tool(save)], capture_output=True, text=True).stdout
        out |= {f"{save} {m}" for m in re.findall(r"^:((?:QBS|PR-QBS)\S*)", text, re.M)}
    sets = subprocess.run([require_tool("ipset"), "list", "-n"], capture_output=True, text=True).stdout.split()
    out |= {f"ipset {s}" for s in sets if s.startswith("qbs-")}
    return out


@dataclass(frozen=True)
class LabRun:
    args: tuple[str, ...]
    returncode: int
    results: list[dict[str, Any]]
    lab_id: str
    #: (pid, command line) of every child the lab reported starting.
    children: tuple[tuple[int, str], ...]
    stderr: str
    #: This package's firewall objects that appeared in the host's main namespace during the run.
    host_changes: frozenset[str]


def _lab_run(args: tuple[str, ...], proc: subprocess.CompletedProcess[str], before: set[str]) -> LabRun:
    found = re.search(r"creating namespaces vhlab-([0-9a-f]+)-", proc.stderr)
    assert found, f"lab did not start:\n{proc.stderr}"
    try:
        results = json.loads(proc.stdout)
    except ValueError:
        pytest.fail(f"--json printed no JSON:\n{proc.stdout}\n{proc.stderr}")
    pids = [int(p) for p in re.findall(r"\(pid (\d+)\)", proc.stderr)]
    return LabRun(args, proc.returncode, results, found.group(1), tuple((p, _cmdline(p)) for p in pids),
                  proc.stderr, frozenset(host_firewall() - before))


def run_lab(*args: str) -> LabRun:
    require_root()
    before = host_firewall()
    proc = subprocess.run(
        [entry_point("vif-hotplug"), "lab", "--json", *args], capture_output=True, text=True, timeout=TIMEOUT,
    )
    return _lab_run(args, proc, before)


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


def rows(lab: LabRun, check: str) -> list[dict[str, Any]]:
    return [r for r in lab.results if r["check"] == check]


@pytest.fixture(scope="module", params=BACKENDS)
def ipv4_lab(request: pytest.FixtureRequest) -> LabRun:
    return run_lab("--backend", str(request.param))


@pytest.fixture(scope="module", params=BACKENDS)
def ipv6_lab(request: pytest.FixtureRequest) -> LabRun:
    return run_lab("--backend", str(request.param), "--ipv6")


# --- IPv4 lab, once per backend ---------------------------------------------------------


def test_lab_passes_every_check(ipv4_lab: LabRun) -> None:
    assert ipv4_lab.results and not failed(ipv4_lab), ipv4_lab.stderr
    assert ipv4_lab.returncode == 0


def test_lab_results_are_rows_of_check_vm_ok_detail(ipv4_lab: LabRun) -> None:
    assert all(set(r) == {"check", "vm", "ok", "detail"} for r in ipv4_lab.results)


def test_lab_inits_the_netvm_with_the_backend_asked(ipv4_lab: LabRun) -> None:
    backend = ipv4_lab.args[ipv4_lab.args.index("--backend") + 1]
    assert [r["ok"] for r in rows(ipv4_lab, f"vif-hotplug init --backend {backend}")] == [True]


def test_lab_proves_each_required_property(ipv4_lab: LabRun) -> None:
    checks = {r["check"] for r in ipv4_lab.results}
    for needle in ("online: hotplug-status connected", "ping uplink", "tcp to uplink, source NATed",
                   "dns DNS1 udp", "dns DNS1 tcp", "dns DNS2 udp", "dns DNS2 tcp", "no vm-to-vm",
                   "forged source dropped", "uplink-forged VM address dropped", "offline: routes gone",
                   "offline: gateway address gone", "offline: neighbour gone", "offline: set entries gone",
                   "qubes-setup-dnat-to-ns again: unchanged", "after switch: dns DNS1 udp"):
        assert needle in checks


def test_lab_checks_every_vm(ipv4_lab: LabRun) -> None:
    connected = {r["vm"] for r in rows(ipv4_lab, "online: hotplug-status connected")}
    assert connected == {"vm11", "vm12", "vm13"}


def test_isolation_is_proven_by_the_forward_drop_and_a_control(ipv4_lab: LabRun) -> None:
    isolation = rows(ipv4_lab, "no vm-to-vm")
    assert len(isolation) == 3
    for row in isolation:
        assert "0 arrived, 3 dropped by the forward chain" in row["detail"]
        assert "3 of 3 arrived" in row["detail"]


def test_lab_leaves_nothing_behind(ipv4_lab: LabRun) -> None:
    assert ipv4_lab.children, "the lab reported no child process"
    assert leftovers(ipv4_lab) == []


def test_lab_never_touches_the_hosts_firewall(ipv4_lab: LabRun) -> None:
    assert ipv4_lab.host_changes == frozenset()


# --- IPv6 lab, once per backend -----------------------------------------------------------


def test_ipv6_lab_passes_every_check(ipv6_lab: LabRun) -> None:
    assert ipv6_lab.results and not failed(ipv6_lab), ipv6_lab.stderr
    assert ipv6_lab.returncode == 0


def test_ipv6_lab_proves_ipv6_properties(ipv6_lab: LabRun) -> None:
    checks = {r["check"] for r in ipv6_lab.results}
    for needle in ("ping6 uplink", "tcp6 to uplink, source NATed", "forged IPv6 source dropped",
                   "uplink-forged VM IPv6 address dropped", "no IPv6 for an IPv4-only VM", "no vm-to-vm IPv6",
                   "dns DNS1 udp"):
        assert needle in checks


def test_ipv6_lab_leaves_nothing_behind(ipv6_lab: LabRun) -> None:
    assert leftovers(ipv6_lab) == []
    assert ipv6_lab.host_changes == frozenset()


# --- lifecycle ------------------------------------------------------------------------------


def test_keep_then_down_leaves_nothing_behind() -> None:
    kept = run_lab("--keep", "--vms", "1", "--backend", "auto")
    assert kept.returncode == 0, kept.stderr
    assert f"namespace vhlab-{kept.lab_id}-net" in leftovers(kept)
    down = subprocess.run(
        [entry_point("vif-hotplug"), "lab", "--down", kept.lab_id], capture_output=True, text=True, timeout=60,
    )
    assert down.returncode == 0, down.stderr
    assert leftovers(kept) == []
    assert kept.host_changes == frozenset()


def test_sigterm_tears_the_lab_down() -> None:
    require_root()
    before = host_firewall()
    proc = subprocess.Popen(
        [entry_point("vif-hotplug"), "lab", "--json", "--vms", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    seen: list[str] = []
    deadline = time.monotonic() + 60
    # Once XenStore runs, the lab has namespaces and children to clean up.
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        seen.append(line)
        if not line or "started xenstored" in line:
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    lab = _lab_run((), subprocess.CompletedProcess(proc.args, proc.returncode, out, "".join(seen) + err), before)
    assert lab.returncode == 1
    assert [r["detail"] for r in rows(lab, "lab run")] == ["interrupted"]
    assert leftovers(lab) == []


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
