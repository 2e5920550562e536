"""The lab's pure parts (topology, parsers, reporting) and its refusals; no root needed."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest

from vif_hotplug import lab
from vif_hotplug.lab_checks import (
    CheckResult,
    addresses_of,
    antispoof_counts,
    dig_answers,
    format_table,
    member_mentions,
    route_destinations,
    set_members,
    to_json,
)
from vif_hotplug.lab_probe import _checksum
from vif_hotplug.lab_topology import (
    NETBACK_MAC,
    LabPaths,
    hotplug_env,
    netvm_commands,
    netvm_conf,
    plan_topology,
    uplink_commands,
    vm_commands,
    vm_ipv6,
    xenstore_entries,
)

# --- topology --------------------------------------------------------------------


def test_namespaces_carry_prefix_and_lab_id() -> None:
    topo = plan_topology("abc123", 3, False)
    assert all(ns.startswith("vhlab-abc123-") for ns in topo.namespaces)
    assert len(set(topo.namespaces)) == 5


def test_vms_get_consecutive_domids_and_vif_names() -> None:
    topo = plan_topology("x", 3, False)
    assert [vm.vif for vm in topo.vms] == ["vif11.0", "vif12.0", "vif13.0"]
    assert [str(vm.ipv4) for vm in topo.vms] == ["10.137.0.11", "10.137.0.12", "10.137.0.13"]


def test_vm_mac_is_xen_prefixed_and_unique() -> None:
    macs = [vm.mac for vm in plan_topology("x", 5, False).vms]
    assert all(m.startswith("00:16:3e:") for m in macs)
    assert len(set(macs)) == 5


def test_ipv6_lab_leaves_last_vm_ipv4_only() -> None:
    vms = plan_topology("x", 3, True).vms
    assert [vm.ipv6 is not None for vm in vms] == [True, True, False]
    assert vms[-1].ipv6_self is not None  # it still tries


def test_vm_ipv6_embeds_the_ipv4_address_like_qubes() -> None:
    assert vm_ipv6(IPv4Address("10.137.0.11")) == IPv6Address("fd09:24ef:4179::a89:b")


@pytest.mark.parametrize(("vms", "ipv6"), [(0, False), (51, False), (1, True)])
def test_vm_count_out_of_range_is_refused(vms: int, ipv6: bool) -> None:
    with pytest.raises(ValueError, match="--vms"):
        plan_topology("x", vms, ipv6)


def test_every_step_runs_inside_a_lab_namespace() -> None:
    topo = plan_topology("x", 2, True)
    steps = netvm_commands(topo) + uplink_commands(topo) + [s for vm in topo.vms for s in vm_commands(vm)]
    assert {ns for ns, _ in steps} <= set(topo.namespaces)


def test_vif_end_has_netback_mac_and_peer_lands_in_the_vm() -> None:
    topo = plan_topology("x", 1, False)
    vm = topo.vms[0]
    (argv,) = [a for _, a in netvm_commands(topo) if vm.vif in a]
    assert argv[argv.index(vm.vif) + 2] == NETBACK_MAC
    assert argv[-1] == vm.ns and vm.mac in argv


def test_netvm_uplink_is_not_eth0() -> None:
    argv = [a for _, a in netvm_commands(plan_topology("x", 1, False))]
    assert not [a for a in argv if "eth0" in a and "peer" not in a]


def test_vm_configures_itself_like_a_qubes_vm() -> None:
    cmds = [" ".join(a) for _, a in vm_commands(plan_topology("x", 1, False).vms[0])]
    assert "ip addr add 10.137.0.11/32 dev eth0" in cmds
    assert f"ip neigh replace 10.137.0.1 lladdr {NETBACK_MAC} dev eth0 nud permanent" in cmds
    assert "ip route add default via 10.137.0.1 dev eth0 onlink" in cmds


def test_xenstore_backend_holds_what_libxl_writes() -> None:
    entries = dict(xenstore_entries(plan_topology("x", 2, True)))
    be = "/local/domain/0/backend/vif/11/0"
    assert entries[f"{be}/ip"] == "10.137.0.11 fd09:24ef:4179::a89:b"
    assert entries[f"{be}/script"] == "/etc/xen/scripts/vif-route-qubes"
    assert entries[f"{be}/frontend-id"] == "11"
    assert entries["/local/domain/0/backend/vif/12/0/ip"] == "10.137.0.12"


@pytest.mark.parametrize("ipv6", [True, False])
def test_xenstore_has_gateway6_only_with_ipv6(ipv6: bool) -> None:
    entries = dict(xenstore_entries(plan_topology("x", 2, ipv6)))
    assert ("/local/domain/0/qubes-netvm-gateway6" in entries) is ipv6
    assert entries["/local/domain/0/qubes-netvm-gateway"] == "10.137.0.1"


def test_hotplug_env_is_the_toolstacks() -> None:
    vm = plan_topology("x", 1, False).vms[0]
    env = hotplug_env(vm, LabPaths("/tmp/t"), {"PATH": "/bin"})
    assert env["XENBUS_PATH"] == "backend/vif/11/0"
    assert env["vif"] == "vif11.0"
    assert (env["XENBUS_TYPE"], env["XENBUS_BASE_PATH"], env["netdev"]) == ("vif", "backend", "")
    assert env["XENSTORED_PATH"].startswith("/tmp/t/")
    assert env["XTABLES_LOCKFILE"].startswith("/tmp/t/")


@pytest.mark.parametrize("with_params", [True, False])
def test_netvm_conf_names_params_only_when_asked(with_params: bool) -> None:
    text = netvm_conf(plan_topology("x", 1, False), "/tmp/t/hooks.d", with_params)
    assert "hooks_dir = /tmp/t/hooks.d" in text
    assert ("gateway = 10.137.0.1" in text) is with_params


# --- parsers -----------------------------------------------------------------------

RAW_SAVE = """\
*raw
:PREROUTING ACCEPT [10:600]
[10:600] -A PREROUTING -j QBS-ANTISPOOF
[3:84] -A QBS-ANTISPOOF -m devgroup --src-group 0x2 -m set ! --match-set qbs-allowed4 src,src -j DROP
[7:300] -A QBS-ANTISPOOF -m devgroup ! --src-group 0x2 -m set --match-set qbs-downstream4 src -j DROP
COMMIT
"""


def test_antispoof_counts_reads_packets_per_set() -> None:
    assert antispoof_counts(RAW_SAVE) == {"qbs-allowed4": 3, "qbs-downstream4": 7}


def test_dig_answers_skip_comments() -> None:
    assert dig_answers(";; connection timed out; no servers could be reached\n") == ()
    assert dig_answers("203.0.113.1\n") == ("203.0.113.1",)


IPSET_LIST = """\
Name: qbs-allowed4
Type: hash:net,iface
Members:
10.137.0.11,vif11.0
10.137.0.12,vif12.0

Name: qbs-downstream6
Type: hash:net
Members:
fd09:24ef:4179::a89:b
"""


def test_set_members_lists_every_member() -> None:
    assert set_members(IPSET_LIST) == ("10.137.0.11,vif11.0", "10.137.0.12,vif12.0", "fd09:24ef:4179::a89:b")


@pytest.mark.parametrize(
    ("member", "mentions"),
    [("10.137.0.11,vif11.0", True), ("10.137.0.12,vif11.0", True), ("10.137.0.12,vif12.0", False),
     ("10.137.0.11", True), ("10.137.0.110", False)],
)
def test_member_mentions_address_or_device(member: str, mentions: bool) -> None:
    assert member_mentions(member, IPv4Address("10.137.0.11"), "vif11.0") is mentions


def test_route_destinations_first_words() -> None:
    text = "default via 192.0.2.1 dev uplink0\n10.137.0.11 dev vif11.0 scope link metric 32741\n"
    assert route_destinations(text) == ("default", "10.137.0.11")


def test_addresses_of_reads_both_families() -> None:
    text = ("5: vif11.0    inet 10.137.0.1/32 scope global vif11.0\\       valid_lft forever\n"
            "5: vif11.0    inet6 fd09:24ef:4179::a89:1/128 scope global \\       valid_lft forever\n")
    assert addresses_of(text) == ("10.137.0.1/32", "fd09:24ef:4179::a89:1/128")


# --- reporting ---------------------------------------------------------------------

ROWS = [CheckResult("ping uplink", "vm11", True, "answered"), CheckResult("no vm-to-vm", "vm11", False, "answered")]


def test_table_ends_with_pass_fail_summary() -> None:
    lines = format_table(ROWS).splitlines()
    assert lines[-1] == "1 passed, 1 failed"
    assert lines[2].startswith("FAIL")


def test_json_is_a_list_of_check_vm_ok_detail() -> None:
    assert json.loads(to_json(ROWS))[1] == {"check": "no vm-to-vm", "vm": "vm11", "ok": False, "detail": "answered"}


def test_icmp_checksum_of_a_known_header() -> None:
    # Echo request, id 1, seq 1, no payload: 0x0800 + 0x0001 + 0x0001 summed and inverted.
    assert _checksum(bytes.fromhex("0800000000010001")) == 0xF7FD


# --- refusals and state -----------------------------------------------------------------


@pytest.fixture(autouse=True)
def _restore_package_logger() -> Iterator[None]:
    # lab.run() configures the package logger as an entry point does; undo it for the next test.
    pkg = logging.getLogger("vif_hotplug")
    saved = list(pkg.handlers), pkg.propagate, pkg.level
    yield
    pkg.handlers[:], pkg.propagate = saved[0], saved[1]
    pkg.setLevel(saved[2])


def test_lab_refuses_without_root(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert lab.run([], env={}) == 1
    assert "root" in capsys.readouterr().err


@pytest.mark.parametrize(("tool", "package"), [("dnsmasq", "dnsmasq-base"), ("dig", "dnsutils"), ("ip", "iproute2")])
def test_missing_tool_names_its_debian_package(monkeypatch: pytest.MonkeyPatch, tool: str, package: str) -> None:
    real = lab.find_program
    monkeypatch.setattr(lab, "find_program", lambda name, path: None if name == tool else real(name, path))
    tools, missing = lab.find_tools({"PATH": os.environ.get("PATH", "")})
    assert tools is None
    assert f"{tool} (Debian package {package})" in missing


def test_down_without_any_lab_succeeds(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(lab, "STATE_DIR", str(tmp_path / "state"))
    assert lab.down("", "ip") == 0


def test_down_of_unknown_lab_fails(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(lab, "STATE_DIR", str(tmp_path))
    assert lab.down("nosuch", "ip") == 1


def test_down_without_id_refuses_to_choose_between_labs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(lab, "STATE_DIR", str(tmp_path))
    lab.LabState("aaaaaa").save()
    lab.LabState("bbbbbb").save()
    assert lab.down("", "ip") == 2


def test_state_round_trips(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(lab, "STATE_DIR", str(tmp_path))
    state = lab.LabState("abc123", "/tmp/x", ["vhlab-abc123-up"], ["/etc/netns/vhlab-abc123-up"],
                         [{"pid": 1, "start": 2, "what": "dnsmasq-a"}])
    state.save()
    assert lab.LabState.load(lab.LabState.path_for("abc123")) == state


def test_stop_process_spares_a_process_that_is_not_the_recorded_one() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        start = lab.process_start_time(child.pid)
        assert start is not None
        lab.stop_process(child.pid, start + 1, "impostor")
        assert child.poll() is None
        lab.stop_process(child.pid, start, "child")
        assert child.poll() is not None
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_process_start_time_of_a_missing_process_is_none() -> None:
    assert lab.process_start_time(2**22 + 1) is None
