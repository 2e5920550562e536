"""vif-route-qubes on real kernel networking, one fresh netvm namespace per test."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .conftest import NetnsFactory, entry_point
from .hotplug_env import (
    GATEWAY,
    UPLINK_NET,
    Netvm,
    mute_unix_server,
    received,
    running_netvm,
    udp_listen,
    udp_send,
    wait_for_line,
)

CONF = f"""[netvm]
gateway = {GATEWAY}
primary_dns = 10.139.1.1
secondary_dns = 10.139.1.2
"""


@pytest.fixture
def netvm(make_netns: NetnsFactory, backend: str, with_agent: bool) -> Iterator[Netvm]:
    with running_netvm(make_netns, CONF, backend, with_agent) as env:
        yield env


# --- online -------------------------------------------------------------------


def test_online_sets_up_route_gateway_neighbour_proxy_arp_and_antispoofing(netvm: Netvm) -> None:
    netvm.add_vm(4, ["10.137.0.5"], mac="00:16:3e:5e:6c:00")
    netvm.hotplug("online", 4)
    ns = netvm.ns
    assert "10.137.0.5 dev vif4.0 proto static metric 32748" in ns.run("ip", "route").stdout
    assert f"inet {GATEWAY}/32" in ns.run("ip", "addr", "show", "vif4.0").stdout
    assert "10.137.0.5 lladdr 00:16:3e:5e:6c:00 PERMANENT" in ns.run("ip", "neigh", "show", "dev", "vif4.0").stdout
    assert ns.run("cat", "/proc/sys/net/ipv4/conf/vif4.0/proxy_arp").stdout.strip() == "1"
    link = ns.run("ip", "link", "show", "vif4.0").stdout
    assert ",UP" in link and "group 2" in link
    assert netvm.members(4, "allowed") == ["vif4.0 . 10.137.0.5"]
    assert netvm.members(4, "downstream") == ["10.137.0.5"]
    assert netvm.status(4) == "connected"


ANTISPOOF4 = {
    "prerouting": ["iifgroup 2 goto antispoof", "iifname vif* drop", "ip saddr @downstream drop",
                   "ip saddr @connected drop"],
    "antispoof": ["iifname . ip saddr @allowed accept", "drop"],
    "downstream-out": ["oifgroup 2 accept", "ip daddr @downstream drop", "ip daddr @connected drop"],
}


def test_online_installs_a_constant_handful_of_antispoofing_rules(netvm: Netvm) -> None:
    netvm.add_vm(4)
    netvm.hotplug("online", 4)
    one = netvm.firewall()
    for domid in (5, 6):
        netvm.add_vm(domid)
        netvm.hotplug("online", domid)
    three = netvm.firewall()
    for chain in ANTISPOOF4:
        assert three.chain(4, chain) == one.chain(4, chain)
        assert three.chain(6, chain) == one.chain(6, chain)
    assert {c: sorted(three.chain(4, c)) for c in ANTISPOOF4} == {c: sorted(r) for c, r in ANTISPOOF4.items()}


def test_online_twice_succeeds_and_changes_nothing(netvm: Netvm) -> None:
    netvm.add_vm(4)
    netvm.hotplug("online", 4)
    first = netvm.dump()
    proc = netvm.hotplug("online", 4)
    assert proc.returncode == 0
    assert netvm.dump() == first


def test_online_purges_conntrack_entries_of_the_vm_address(netvm: Netvm) -> None:
    netvm.add_vm(4, ["10.137.0.5"])
    netvm.ns.run("conntrack", "-I", "-s", "10.137.0.5", "-d", "192.0.2.2", "-p", "udp", "--sport", "1000",
                 "--dport", "53", "--timeout", "300")
    netvm.ns.run("conntrack", "-I", "-s", "192.0.2.2", "-d", "10.137.0.5", "-p", "tcp", "--sport", "80",
                 "--dport", "1000", "--state", "ESTABLISHED", "--timeout", "300")
    netvm.ns.run("conntrack", "-I", "-s", "10.137.0.9", "-d", "192.0.2.2", "-p", "udp", "--sport", "1",
                 "--dport", "2", "--timeout", "300")
    netvm.hotplug("online", 4)
    listing = netvm.ns.run("conntrack", "-L", check=False).stdout
    assert "10.137.0.5" not in listing
    assert "10.137.0.9" in listing


def test_missing_optional_type_key_still_configures_the_vif_fully(netvm: Netvm) -> None:
    netvm.add_vm(4)
    netvm.xs_rm(f"{netvm.backend(4)}/type")
    netvm.hotplug("online", 4)
    assert "10.137.0.4 dev vif4.0" in netvm.ns.run("ip", "route").stdout
    assert netvm.status(4) == "connected"


def test_manual_form_derives_the_xenstore_path_from_the_name(netvm: Netvm) -> None:
    netvm.add_vm(4)
    netvm.hotplug("online", None, "vif4.0")
    assert "10.137.0.4 dev vif4.0" in netvm.ns.run("ip", "route").stdout
    assert netvm.status(4) == "connected"


@pytest.mark.parametrize("command", ["add", "remove"])
def test_add_and_remove_for_type_if_vif_are_successful_noops(netvm: Netvm, command: str) -> None:
    netvm.add_vm(4)
    before = netvm.dump()
    assert netvm.hotplug(command, 4).returncode == 0
    assert netvm.dump() == before


def test_dry_run_prints_the_plan_and_changes_nothing(netvm: Netvm) -> None:
    netvm.add_vm(4)
    before = netvm.dump()
    proc = netvm.hotplug("online", 4, "--dry-run", "type_if=vif")
    assert "add route 10.137.0.4/32 dev vif4.0 metric 32748" in proc.stdout
    assert netvm.dump() == before
    assert netvm.status(4) is None


def test_vifname_renames_the_interface_and_configures_the_new_name(netvm: Netvm) -> None:
    netvm.add_vm(4, extra={"vifname": "work-vm"})
    netvm.hotplug("online", 4)
    assert "10.137.0.4 dev work-vm" in netvm.ns.run("ip", "route").stdout
    assert netvm.members(4, "allowed") == ["work-vm . 10.137.0.4"]
    netvm.hotplug("offline", 4)
    assert netvm.members(4, "allowed") == []
    assert "10.137.0.4" not in netvm.ns.run("ip", "route").stdout


def test_hooks_get_command_vif_type_and_address_and_their_failure_is_not_fatal(netvm: Netvm) -> None:
    record = netvm.tmp / "hook.log"
    good = netvm.tmp / "hooks" / "10-record"
    good.write_text(f"#!/bin/sh\necho \"$@\" >> {record}\n")
    bad = netvm.tmp / "hooks" / "20-fail"
    bad.write_text("#!/bin/sh\nexit 3\n")
    for hook in (good, bad):
        hook.chmod(0o755)
    netvm.add_vm(4)
    netvm.hotplug("online", 4)
    netvm.hotplug("offline", 4)
    netvm.settle(4)
    assert record.read_text().splitlines() == ["online vif4.0 vif 10.137.0.4", "offline vif4.0 vif 10.137.0.4"]


def test_no_interface_named_eth0_is_needed_anywhere(netvm: Netvm) -> None:
    netvm.add_uplink()
    vm = netvm.add_vm(4)
    netvm.hotplug("online", 4)
    for ns in (netvm.ns, vm.ns, netvm.uplink):
        assert ns is not None
        assert "eth0" not in ns.run("ip", "-o", "link").stdout


# --- offline ------------------------------------------------------------------


def test_offline_returns_the_namespace_to_its_prior_state(netvm: Netvm) -> None:
    # The shared anti-spoofing sets and chain are created once and stay; make
    # them exist first so the snapshot isolates what belongs to vif4.0.
    netvm.add_vm(9)
    netvm.hotplug("online", 9)
    netvm.hotplug("offline", 9)
    netvm.add_vm(4)
    before = netvm.dump()
    netvm.hotplug("online", 4)
    assert netvm.dump() != before
    netvm.hotplug("offline", 4)
    assert netvm.dump() == before


def test_first_offline_leaves_only_the_shared_empty_sets_and_chain(netvm: Netvm) -> None:
    netvm.add_vm(4)
    netvm.hotplug("online", 4)
    netvm.hotplug("offline", 4)
    for family in (4, 6):
        for name in ("allowed", "downstream"):
            assert netvm.members(family, name) == []
    assert "10.137.0.4" not in netvm.ns.run("ip", "route").stdout
    assert GATEWAY not in netvm.ns.run("ip", "addr").stdout


def test_offline_twice_succeeds(netvm: Netvm) -> None:
    netvm.add_vm(4)
    netvm.hotplug("online", 4)
    netvm.hotplug("offline", 4)
    after = netvm.dump()
    assert netvm.hotplug("offline", 4).returncode == 0
    assert netvm.dump() == after


def test_offline_of_a_never_onlined_vif_is_a_quiet_success(netvm: Netvm) -> None:
    netvm.add_vm(4)
    before = netvm.dump()
    proc = netvm.hotplug("offline", 4)
    assert proc.returncode == 0 and proc.stderr == ""
    assert netvm.dump() == before


def test_offline_after_the_link_vanished_removes_its_set_members(netvm: Netvm) -> None:
    netvm.add_vm(4)
    netvm.add_vm(5)
    netvm.hotplug("online", 4)
    netvm.hotplug("online", 5)
    netvm.ns.run("ip", "link", "del", "vif4.0")
    assert netvm.hotplug("offline", 4).returncode == 0
    assert netvm.members(4, "allowed") == ["vif5.0 . 10.137.0.5"]
    assert netvm.members(4, "downstream") == ["10.137.0.5"]


def test_offline_after_the_link_vanished_leaves_the_prior_state_minus_that_link(netvm: Netvm) -> None:
    netvm.add_vm(9)
    netvm.hotplug("online", 9)
    netvm.hotplug("offline", 9)
    netvm.add_vm(4)
    before = {k: [x for x in v if "vif4.0" not in x] for k, v in netvm.dump().items()}
    netvm.hotplug("online", 4)
    netvm.ns.run("ip", "link", "del", "vif4.0")
    netvm.hotplug("offline", 4)
    assert netvm.dump() == before


def test_offline_after_backend_keys_vanished_still_cleans_from_kernel_state(netvm: Netvm) -> None:
    netvm.add_vm(4)
    netvm.hotplug("online", 4)
    netvm.xs_rm(f"{netvm.backend(4)}/ip")
    netvm.hotplug("offline", 4)
    assert netvm.members(4, "allowed") == []
    assert "10.137.0.4" not in netvm.ns.run("ip", "route").stdout


def test_offline_of_one_vif_leaves_the_other_untouched(netvm: Netvm) -> None:
    netvm.add_vm(4)
    netvm.add_vm(5)
    netvm.hotplug("online", 4)
    netvm.hotplug("online", 5)
    def vif5_state() -> list[str]:
        d = netvm.dump()
        return [x for k in ("links", "addresses", "routes4", "neigh", "sysctls") for x in d[k] if "vif5.0" in x]
    before = vif5_state()
    netvm.hotplug("offline", 4)
    assert vif5_state() == before
    assert netvm.members(4, "allowed") == ["vif5.0 . 10.137.0.5"]
    assert "10.137.0.5 dev vif5.0" in netvm.ns.run("ip", "route").stdout


def test_offline_keeps_an_address_another_vif_still_owns_in_the_downstream_set(netvm: Netvm) -> None:
    # A restarted VM briefly has its address on two vifs: the old domain's is being detached
    # (libxl has set its "online" to 0) when the new one comes up; the newer domain wins by metric.
    netvm.add_vm(4, ["10.137.0.50"])
    netvm.add_vm(7, ["10.137.0.50"])
    netvm.hotplug("online", 4)
    netvm.xs_write(f"{netvm.backend(4)}/online", "0")
    netvm.hotplug("online", 7)
    netvm.hotplug("offline", 4)
    assert netvm.members(4, "downstream") == ["10.137.0.50"]
    assert "10.137.0.50 dev vif7.0 proto static metric 32745" in netvm.ns.run("ip", "route").stdout


def test_a_second_vm_given_an_online_vms_address_is_refused_and_changes_nothing(netvm: Netvm) -> None:
    netvm.add_vm(4, ["10.137.0.50"])
    netvm.add_vm(7, ["10.137.0.50"])
    netvm.hotplug("online", 4)
    before = netvm.dump()
    proc = netvm.hotplug("online", 7, check=False)
    assert proc.returncode == 1 and "already routed to vif4.0" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert netvm.dump() == before and netvm.status(7) == "error"


# --- traffic ----------------------------------------------------------------------


def test_vm_traffic_with_its_own_source_is_forwarded_and_a_forged_source_is_dropped(netvm: Netvm) -> None:
    up = netvm.add_uplink()
    vm = netvm.add_vm(4, ["10.137.0.5"])
    netvm.hotplug("online", 4)
    vm.ns.run("ip", "addr", "add", "10.137.0.99/32", "dev", "lo")
    got = received(up, f"{UPLINK_NET}.2", netvm.tmp / "uplink.log",
                   [(vm.ns, "10.137.0.99", "forged"), (vm.ns, "10.137.0.5", "genuine")])
    assert got == ["10.137.0.5 genuine"]


def test_a_vm_address_forged_from_the_uplink_is_dropped(netvm: Netvm) -> None:
    up = netvm.add_uplink()
    netvm.add_vm(4, ["10.137.0.5"])
    target = netvm.add_vm(6, ["10.137.0.6"])
    netvm.hotplug("online", 4)
    netvm.hotplug("online", 6)
    up.run("ip", "addr", "add", "10.137.0.5/32", "dev", "lo")
    got = received(target.ns, "10.137.0.6", netvm.tmp / "vm6.log",
                   [(up, "10.137.0.5", "forged"), (up, f"{UPLINK_NET}.2", "genuine")])
    assert got == [f"{UPLINK_NET}.2 genuine"]


# --- load ---------------------------------------------------------------------------


def test_twenty_vifs_brought_online_concurrently_all_end_complete(netvm: Netvm) -> None:
    domids = list(range(10, 30))
    for domid in domids:
        netvm.add_vm(domid)
    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(lambda d: netvm.hotplug("online", d, check=False), domids))
    assert [r.returncode for r in results] == [0] * 20, [r.stderr for r in results if r.returncode]
    routes = netvm.ns.run("ip", "route").stdout
    neigh = netvm.ns.run("ip", "neigh", "show", "nud", "permanent").stdout
    for domid in domids:
        assert f"10.137.0.{domid} dev vif{domid}.0 proto static metric {32752 - domid}" in routes
        assert f"10.137.0.{domid} dev vif{domid}.0 lladdr" in neigh
        assert f"inet {GATEWAY}/32" in netvm.ns.run("ip", "addr", "show", f"vif{domid}.0").stdout
        assert netvm.status(domid) == "connected"
    assert netvm.members(4, "allowed") == sorted(f"vif{d}.0 . 10.137.0.{d}" for d in domids)
    assert sorted(netvm.firewall().chain(4, "prerouting")) == sorted(ANTISPOOF4["prerouting"])


# --- failures -------------------------------------------------------------------------


def test_a_failure_midway_undoes_this_run_and_reports_error(netvm: Netvm) -> None:
    netvm.add_vm(4)
    netvm.add_vm(5)
    netvm.hotplug("online", 5)
    # Squat the route vif4.0 needs, on another device: online must fail at the route step.
    netvm.ns.run("ip", "route", "add", "10.137.0.4/32", "dev", "vif5.0", "metric", "32748")
    before = netvm.dump()
    proc = netvm.hotplug("online", 4, check=False)
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) >= 1
    assert "10.137.0.4/32" in proc.stderr
    assert netvm.dump() == before
    assert netvm.status(4) == "error"
    assert "10.137.0.4/32" in (netvm.xs_read(f"{netvm.backend(4)}/hotplug-error") or "")


def _assert_rejected(netvm: Netvm, proc: subprocess.CompletedProcess[str], needle: str, before: dict[str, list[str]],
                     status_domid: int | None = 4) -> None:
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert needle in lines[0]
    assert netvm.dump() == before
    if status_domid is not None:
        assert netvm.status(status_domid) == "error"
        assert needle in (netvm.xs_read(f"{netvm.backend(status_domid)}/hotplug-error") or "")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("ip", "10.137.0.300"),
        ("ip", "abc"),
        ("ip", "10.0.0.1 -j ACCEPT"),
        ("ip", "10.137.0.4; reboot"),
        ("mac", "00:16:3e:5e:6c"),
        ("mac", "zz:16:3e:5e:6c:00"),
        ("mac", ""),
        ("vifname", "bad name;"),
        ("vifname", "x" * 20),
        ("type", "vif$(id)"),
    ],
)
def test_bad_xenstore_values_are_refused_with_no_state_change(netvm: Netvm, key: str, value: str) -> None:
    netvm.add_vm(4, extra={key: value})
    before = netvm.dump()
    proc = netvm.hotplug("online", 4, check=False)
    _assert_rejected(netvm, proc, value[:8] if value else key, before)


@pytest.mark.parametrize(
    "vif", ["eth0;x", "vif04.0", "vif32753.0", "vif4.0 ", "vif$(id).0", "v" * 20, "vif5.0"]
)
def test_bad_vif_names_from_the_toolstack_are_refused(netvm: Netvm, vif: str) -> None:
    netvm.add_vm(4)
    before = netvm.dump()
    proc = netvm.hotplug("online", 4, vif=vif, check=False)
    _assert_rejected(netvm, proc, vif.strip()[:6], before)


@pytest.mark.parametrize("name", ["vif04.0", "vif32753.0", "vif4", "eth0", "vif4.0;ls", "vif99999999.0"])
def test_bad_vif_names_by_hand_are_refused(netvm: Netvm, name: str) -> None:
    netvm.add_vm(4)
    before = netvm.dump()
    proc = netvm.hotplug("online", None, name, check=False)
    _assert_rejected(netvm, proc, name[:6], before, status_domid=None)


def test_domid_over_32752_in_xenbus_path_is_refused(netvm: Netvm) -> None:
    before = netvm.dump()
    proc = netvm.hotplug("online", None, "type_if=vif", env={"XENBUS_PATH": "backend/vif/32753/0", "vif": "vif32753.0"},
                         check=False)
    _assert_rejected(netvm, proc, "32753", before, status_domid=None)


def test_missing_xenbus_path_in_toolstack_form_is_refused(netvm: Netvm) -> None:
    before = netvm.dump()
    proc = netvm.hotplug("online", None, "type_if=vif", check=False)
    _assert_rejected(netvm, proc, "XENBUS_PATH", before, status_domid=None)


def test_unreachable_xenstore_is_a_clear_error(netvm: Netvm) -> None:
    netvm.add_vm(4)
    before = netvm.dump()
    proc = netvm.hotplug("online", 4, env={"XENSTORED_PATH": str(netvm.tmp / "nothing.sock")}, check=False)
    _assert_rejected(netvm, proc, "nothing.sock", before, status_domid=None)


def test_a_xenstore_that_never_answers_gives_an_error_not_a_hang(netvm: Netvm) -> None:
    netvm.add_vm(4)
    path = netvm.tmp / "mute.sock"
    with mute_unix_server(path):
        before = netvm.dump()
        proc = netvm.hotplug("online", 4, env={"XENSTORED_PATH": str(path)}, check=False)
        _assert_rejected(netvm, proc, "did not answer", before, status_domid=None)


def test_help_explains_both_invocation_forms() -> None:
    out = subprocess.run([entry_point("vif-route-qubes"), "--help"], capture_output=True, text=True).stdout
    assert "XENBUS_PATH" in out and "vif4.0" in out and "exit status" in out


def test_etc_wrapper_execs_the_thin_client_by_absolute_interpreter_path() -> None:
    text = Path(__file__).parents[2].joinpath("etc/xen/scripts/vif-route-qubes").read_text()
    exec_line = next(line for line in text.splitlines() if line.startswith("exec "))
    assert exec_line.startswith("exec /usr/bin/python3 -I -S -c ")
    assert "from vif_hotplug.agent import client" in exec_line
    assert exec_line.endswith(" /usr/lib/python3/dist-packages vif-route-qubes \"$@\"")
    assert "$VIF_HOTPLUG" not in text  # nothing of the caller's environment picks what runs
    assert os.access(Path(__file__).parents[2] / "etc/xen/scripts/vif-route-qubes", os.X_OK)


# --- mapped ("visible") addresses ---------------------------------------------------

MAPPED_CONF = CONF + "\n[mapped-ip]\n10.137.0.50 = 10.138.0.2 10.138.0.1\n"


def test_vm_with_a_mapped_address_is_seen_under_its_real_address_both_ways(netvm: Netvm) -> None:
    netvm.write_conf(MAPPED_CONF)
    up = netvm.add_uplink()
    vm = netvm.add_vm(4, ["10.137.0.50"], vm_view=("10.138.0.2", "10.138.0.1"))
    netvm.hotplug("online", 4)
    out = received(up, f"{UPLINK_NET}.2", netvm.tmp / "out.log", [(vm.ns, "10.138.0.2", "out")])
    # Sent to the real address; the VM listens on the one it believes in.
    back_log = netvm.tmp / "back.log"
    at_vm = udp_listen(vm.ns, "10.138.0.2", 5001, back_log)
    try:
        udp_send(up, f"{UPLINK_NET}.2", "10.137.0.50", 5001, "back")
        assert wait_for_line(back_log, "back")
    finally:
        at_vm.kill()
        at_vm.wait()
    assert out == ["10.137.0.50 out"]
    assert back_log.read_text().splitlines() == [f"{UPLINK_NET}.2 back"]
    assert "vif4.0-nat" in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_mapped_vif_online_twice_changes_nothing(netvm: Netvm) -> None:
    netvm.write_conf(MAPPED_CONF)
    netvm.add_vm(4, ["10.137.0.50"], vm_view=("10.138.0.2", "10.138.0.1"))
    netvm.hotplug("online", 4)
    first = netvm.dump()
    netvm.hotplug("online", 4)
    assert netvm.dump() == first


def test_mapped_vif_offline_removes_the_nat_namespace_and_restores_prior_state(netvm: Netvm) -> None:
    netvm.write_conf(MAPPED_CONF)
    netvm.add_vm(9)
    netvm.hotplug("online", 9)
    netvm.hotplug("offline", 9)
    netvm.add_vm(4, ["10.137.0.50"], vm_view=("10.138.0.2", "10.138.0.1"))
    before = netvm.dump()
    netvm.hotplug("online", 4)
    netvm.hotplug("offline", 4)
    assert netvm.dump() == before
    assert "vif4.0-nat" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_verbose_output_names_the_vif_on_every_line(netvm: Netvm) -> None:
    netvm.add_vm(4)
    proc = netvm.hotplug("online", 4, "-v", "type_if=vif")
    lines = proc.stderr.splitlines()
    assert lines and all(line.startswith("vif-route-qubes: vif4.0: ") for line in lines), lines
    assert "add route 10.137.0.4/32 dev vif4.0 metric 32748" in proc.stdout


# --- repeated and untidy events (review findings) ---------------------------------------


def test_online_again_keeps_the_running_vms_connections(netvm: Netvm) -> None:
    netvm.add_vm(4)
    netvm.hotplug("online", 4)
    netvm.ns.run("conntrack", "-I", "-s", "10.137.0.4", "-d", "192.0.2.2", "-p", "tcp", "--sport", "4000",
                 "--dport", "443", "--state", "ESTABLISHED", "--timeout", "300")
    netvm.hotplug("online", 4)
    assert "10.137.0.4" in netvm.ns.run("conntrack", "-L", check=False).stdout


def test_hooks_run_once_for_a_repeated_online_and_see_the_status_already_reported(netvm: Netvm) -> None:
    record = netvm.tmp / "hook.log"
    hook = netvm.tmp / "hooks" / "10-status"
    reader = shutil.which("xenstore-read") or "/usr/bin/xenstore-read"
    hook.write_text(f"#!/bin/sh\n{reader} backend/vif/4/0/hotplug-status >> {record}\n")
    hook.chmod(0o755)
    netvm.add_vm(4)
    netvm.hotplug("online", 4)
    netvm.hotplug("online", 4)
    netvm.settle(4)
    assert record.read_text().splitlines() == ["connected"]


@pytest.mark.parametrize(("key", "value"), [("ip", "10.137.0.4 bogus"), ("mac", "zz"), ("type", "$(x)")])
def test_offline_with_a_bad_backend_value_still_removes_this_vifs_state(netvm: Netvm, key: str, value: str) -> None:
    netvm.add_vm(4)
    netvm.add_vm(5)
    netvm.hotplug("online", 4)
    netvm.hotplug("online", 5)
    netvm.xs_write(f"{netvm.backend(4)}/{key}", value)
    netvm.hotplug("offline", 4)
    assert netvm.members(4, "allowed") == ["vif5.0 . 10.137.0.5"]
    assert "10.137.0.4" not in netvm.ns.run("ip", "route").stdout


def test_offline_with_a_broken_netvm_conf_still_removes_this_vifs_state(netvm: Netvm) -> None:
    netvm.add_vm(4)
    netvm.hotplug("online", 4)
    netvm.write_conf("[netvm]\ngateway = nonsense\n")
    netvm.hotplug("offline", 4)
    assert netvm.members(4, "allowed") == []
    assert "10.137.0.4" not in netvm.ns.run("ip", "route").stdout


def test_offline_finds_a_renamed_vif_after_its_vifname_key_is_gone(netvm: Netvm) -> None:
    netvm.add_vm(4, extra={"vifname": "work-vm"})
    netvm.hotplug("online", 4)
    netvm.xs_rm(f"{netvm.backend(4)}/vifname")
    netvm.xs_rm(f"{netvm.backend(4)}/ip")
    netvm.hotplug("offline", 4)
    assert netvm.members(4, "allowed") == []
    assert "10.137.0.4" not in netvm.ns.run("ip", "route").stdout


def test_a_vif_name_in_the_environment_that_is_another_device_is_refused(netvm: Netvm) -> None:
    netvm.add_uplink()
    netvm.add_vm(4)
    before = netvm.dump()
    proc = netvm.hotplug("online", 4, vif="uplink0", check=False)
    _assert_rejected(netvm, proc, "uplink0", before)


def test_a_vifname_that_another_device_already_has_is_refused(netvm: Netvm) -> None:
    netvm.add_uplink()
    netvm.add_vm(4, extra={"vifname": "uplink0"})
    netvm.ns.run("ip", "link", "del", "vif4.0")
    before = netvm.dump()
    proc = netvm.hotplug("online", 4, check=False)
    _assert_rejected(netvm, proc, "uplink0", before)


def test_a_foreign_accept_ahead_of_the_antispoofing_lets_no_forged_packet_through(netvm: Netvm) -> None:
    up = netvm.add_uplink()
    vm = netvm.add_vm(4, ["10.137.0.5"])
    netvm.hotplug("online", 4)
    if netvm.fw_backend == "iptables":
        # xtables: ACCEPT ends the table, so a rule above our jump would win; the next event moves ours back up.
        netvm.ns.run("iptables-legacy", "-t", "raw", "-I", "PREROUTING", "1", "-j", "ACCEPT")
    else:
        # nftables: an accept in another base chain ends only that chain; ours still sees the packet.
        netvm.ns.run("nft", "add table ip foreign; add chain ip foreign pre { type filter hook prerouting "
                     "priority -400; policy accept; }; add rule ip foreign pre accept")
    netvm.add_vm(5, ["10.137.0.6"])
    netvm.hotplug("online", 5)
    vm.ns.run("ip", "addr", "add", "10.137.0.99/32", "dev", "lo")
    got = received(up, f"{UPLINK_NET}.2", netvm.tmp / "uplink.log",
                   [(vm.ns, "10.137.0.99", "forged"), (vm.ns, "10.137.0.5", "genuine")])
    assert got == ["10.137.0.5 genuine"]


def test_empty_ip_brings_the_vif_up_passing_nothing_and_offline_undoes_it(netvm: Netvm) -> None:
    record = netvm.tmp / "hook.log"
    hook = netvm.tmp / "hooks" / "10-record"
    hook.write_text(f"#!/bin/sh\necho \"$@\" >> {record}\n")
    hook.chmod(0o755)
    netvm.add_vm(9)
    netvm.hotplug("online", 9)
    netvm.hotplug("offline", 9)
    netvm.add_vm(4, extra={"ip": ""})
    before = netvm.dump()
    netvm.hotplug("online", 4)
    link = netvm.ns.run("ip", "link", "show", "vif4.0").stdout
    assert ",UP" in link and "group 2" in link
    assert netvm.status(4) == "connected"
    assert not [m for m in netvm.members(4, "allowed") if "vif4.0" in m]
    assert "vif4.0" not in netvm.ns.run("ip", "route").stdout
    netvm.hotplug("offline", 4)
    assert netvm.dump() == before
    netvm.settle(4)
    assert record.read_text().splitlines()[-2:] == ["online vif4.0 vif", "offline vif4.0 vif"]


# --- status and reconcile of one vif's leftovers ------------------------------------------------


def test_status_and_reconcile_finish_a_half_done_offline(netvm: Netvm) -> None:
    netvm.add_vm(4)
    netvm.hotplug("online", 4)
    netvm.xs_write(f"{netvm.backend(4)}/online", "0")
    # As if offline had been killed right after the vif left group 2.
    netvm.ns.run("ip", "link", "set", "vif4.0", "group", "0")
    drift = netvm.tool("status", "vif4.0", "--json", check=False)
    assert drift.returncode == 1 and "proxy_arp" in drift.stdout
    netvm.tool("reconcile")
    assert netvm.sysctl("net/ipv4/conf/vif4.0/proxy_arp") == "0"
    assert "10.137.0.4" not in netvm.ns.run("ip", "route").stdout
    assert netvm.tool("status", "vif4.0", check=False).returncode == 0


def test_reconcile_drops_an_allowed_address_that_left_xenstore(netvm: Netvm) -> None:
    netvm.add_vm(4)
    netvm.hotplug("online", 4)
    netvm.xs_write(f"{netvm.backend(4)}/ip", "10.137.0.9")
    netvm.tool("reconcile")
    assert netvm.members(4, "allowed") == ["vif4.0 . 10.137.0.9"]
    assert netvm.members(4, "downstream") == ["10.137.0.9"]


# --- the udev trigger (run_hotplug_scripts=0) --------------------------------------------------------


def test_under_udev_a_vif_whose_script_is_vif_bridge_is_left_alone(netvm: Netvm) -> None:
    netvm.add_vm(4, extra={"script": "/etc/xen/scripts/vif-bridge"})
    before = netvm.dump()
    proc = netvm.hotplug("online", 4, "type_if=vif", "trigger=udev", check=False)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert netvm.dump() == before and netvm.status(4) is None


def test_under_udev_a_vif_whose_script_is_this_one_is_configured(netvm: Netvm) -> None:
    netvm.add_vm(4)
    proc = netvm.hotplug("online", 4, "type_if=vif", "trigger=udev")
    assert proc.returncode == 0 and netvm.status(4) == "connected"
    assert "10.137.0.4 dev vif4.0" in netvm.ns.run("ip", "route").stdout
