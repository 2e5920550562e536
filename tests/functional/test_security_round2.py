"""Security review, round 2, with real packets: no window for spoofing after a failed step, no state
outliving its VM, nothing an event does to a device or address that is not its own.

Each attack is followed by a control over the same path that must arrive,
so whatever was dropped before it is known gone (``hotplug_env.received``).
Both firewall backends.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import NetnsFactory, entry_point
from .hotplug_env import GATEWAY, UPLINK_NET, Netvm, capture, fault, received, running_netvm, udp_send

pytestmark = pytest.mark.netns

CONF = f"[netvm]\ngateway = {GATEWAY}\nprimary_dns = 10.139.1.1\nsecondary_dns = 10.139.1.2\n"
UP = f"{UPLINK_NET}.2"


@pytest.fixture
def netvm(make_netns: NetnsFactory, backend: str) -> Iterator[Netvm]:
    with running_netvm(make_netns, CONF, backend) as env:
        env.add_uplink()
        yield env


def _forge(netvm: Netvm, domid: int, source: str) -> None:
    """Let VM ``domid`` send from ``source`` (an address its kernel owns; the netvm must still refuse it)."""
    netvm.vms[domid].ns.run("ip", "addr", "add", f"{source}/32", "dev", "lo")


def _replace_vm(netvm: Netvm, domid: int, ip: str) -> None:
    """Domain ``domid`` gone and a new one with that domid (netback's device name again) and ``ip``."""
    netvm.ns.run("ip", "link", "del", f"vif{domid}.0", check=False)
    netvm.add_vm(domid, [ip])


# --- a VM interface is never up without its anti-spoofing ---------------------------------------------


def test_a_vif_left_up_outside_group_2_passes_no_packet(netvm: Netvm) -> None:
    """What a failed link-down used to leave (up, group 0): the vif's packets are dropped by name."""
    assert netvm.uplink is not None
    netvm.add_vm(4)
    netvm.add_vm(5)
    netvm.hotplug("online", 4)
    netvm.hotplug("online", 5)
    netvm.ns.run("ip", "link", "set", "vif4.0", "group", "0")
    _forge(netvm, 4, "10.137.1.99")
    got = received(netvm.uplink, UP, netvm.tmp / "up.log",
                   [(netvm.vms[4].ns, "10.137.1.99", "forged"), (netvm.vms[4].ns, "10.137.0.4", "own"),
                    (netvm.vms[5].ns, "10.137.0.5", "control")])
    assert got == ["10.137.0.5 control"]


# --- allowed elements do not outlive their VM -------------------------------------------------------


def test_after_ip_changed_before_offline_the_next_vm_on_that_device_cannot_send_from_the_old_address(
    netvm: Netvm,
) -> None:
    assert netvm.uplink is not None
    netvm.add_vm(4, ["10.137.0.5"])
    netvm.hotplug("online", 4)
    netvm.xs_write(f"{netvm.backend(4)}/ip", "10.137.0.9")
    netvm.hotplug("offline", 4)
    _replace_vm(netvm, 4, "10.137.0.9")
    netvm.hotplug("online", 4)
    _forge(netvm, 4, "10.137.0.5")
    got = received(netvm.uplink, UP, netvm.tmp / "up.log",
                   [(netvm.vms[4].ns, "10.137.0.5", "old"), (netvm.vms[4].ns, "10.137.0.9", "own")])
    assert got == ["10.137.0.9 own"]


def test_after_a_killed_offline_the_next_vm_on_that_device_cannot_send_from_the_old_address(netvm: Netvm) -> None:
    assert netvm.uplink is not None
    netvm.add_vm(4, ["10.137.0.5"])
    netvm.hotplug("online", 4)
    with fault(netvm, "offline", "before", 0):
        assert netvm.hotplug("offline", 4, check=False).returncode == -9  # SIGKILL, as the OOM killer would
    assert "vif4.0 . 10.137.0.5" in netvm.members(4, "allowed")  # the offline never ran
    _replace_vm(netvm, 4, "10.137.0.9")
    netvm.xs_write(f"{netvm.backend(4)}/ip", "10.137.0.9")
    netvm.hotplug("online", 4)
    assert netvm.members(4, "allowed") == ["vif4.0 . 10.137.0.9"]
    _forge(netvm, 4, "10.137.0.5")
    got = received(netvm.uplink, UP, netvm.tmp / "up.log",
                   [(netvm.vms[4].ns, "10.137.0.5", "old"), (netvm.vms[4].ns, "10.137.0.9", "own")])
    assert got == ["10.137.0.9 own"]


# --- only this vif's device ---------------------------------------------------------------------


def test_an_offline_whose_vifname_names_the_uplink_leaves_the_uplink_up(netvm: Netvm) -> None:
    assert netvm.uplink is not None
    netvm.add_vm(4)
    netvm.hotplug("online", 4)
    netvm.xs_write(f"{netvm.backend(4)}/vifname", "uplink0")
    netvm.hotplug("offline", 4)
    assert ",UP" in netvm.ns.run("ip", "link", "show", "uplink0").stdout
    got = received(netvm.uplink, UP, netvm.tmp / "up.log", [(netvm.ns, f"{UPLINK_NET}.1", "uplink works")])
    assert got == [f"{UPLINK_NET}.1 uplink works"]
    assert ",UP" not in netvm.ns.run("ip", "link", "show", "vif4.0").stdout


def test_an_offline_whose_vifname_names_another_vms_device_leaves_that_vm_connected(netvm: Netvm) -> None:
    assert netvm.uplink is not None
    netvm.add_vm(4)
    netvm.add_vm(5, extra={"vifname": "vm5"})
    netvm.hotplug("online", 4)
    netvm.hotplug("online", 5)
    netvm.xs_write(f"{netvm.backend(4)}/vifname", "vm5")
    netvm.hotplug("offline", 4)
    link = netvm.ns.run("ip", "link", "show", "vm5").stdout
    assert ",UP" in link and "group 2" in link
    got = received(netvm.uplink, UP, netvm.tmp / "up.log", [(netvm.vms[5].ns, "10.137.0.5", "still here")])
    assert got == ["10.137.0.5 still here"]


# --- addresses that are someone else's ---------------------------------------------------------------


@pytest.mark.parametrize(("ip", "reason"), [
    ("10.137.0.0/28", "covers 10.137.0.4/32"),          # covers an online VM's address
    (UP, "on the network of uplink0"),                 # the LAN's router
])
def test_an_address_that_is_someone_elses_is_refused_in_one_line_without_change(
    netvm: Netvm, ip: str, reason: str,
) -> None:
    netvm.add_vm(4)
    netvm.hotplug("online", 4)
    netvm.add_vm(7)
    netvm.xs_write(f"{netvm.backend(7)}/ip", ip)
    before = netvm.settled_dump()
    proc = netvm.hotplug("online", 7, check=False)
    assert proc.returncode == 1 and reason in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert netvm.settled_dump() == before and netvm.status(7) == "error"


def test_an_upstream_nameserver_cannot_be_a_vms_address(netvm: Netvm) -> None:
    resolv = netvm.tmp / "resolv.conf"
    resolv.write_text(f"nameserver {UP}\n")
    netvm.tool("dns", "--resolv-conf", str(resolv), check=False)
    netvm.add_vm(7)
    netvm.xs_write(f"{netvm.backend(7)}/ip", UP)
    proc = netvm.hotplug("online", 7, check=False)
    assert proc.returncode == 1 and "upstream nameserver" in proc.stderr, proc.stderr


# --- a VM's address never leaves by the uplink ---------------------------------------------------------


def test_packets_towards_a_vm_whose_route_is_missing_never_leave_by_the_uplink(netvm: Netvm) -> None:
    """No connected-ips source configured: the downstream set alone keeps them in."""
    assert netvm.uplink is not None
    netvm.add_vm(4)
    netvm.hotplug("online", 4)
    netvm.ns.run("ip", "route", "del", "10.137.0.4", "dev", "vif4.0")
    netvm_mac = netvm.ns.run("cat", "/sys/class/net/uplink0/address").stdout.strip()
    # From the uplink towards the VM: the netvm would route it straight back out of uplink0.
    uplink = netvm.uplink
    out = capture(uplink, "wan0", f"ether src {netvm_mac} and dst host 10.137.0.4",
                  lambda: udp_send(uplink, UP, "10.137.0.4", 5000, "lost"))
    assert "\n0 packets received by filter" in "\n" + out, out


# --- per-namespace state only ever describes its own namespace ----------------------------------------


def _inode(netvm: Netvm) -> int:
    return os.stat(f"/run/netns/{netvm.ns.name}").st_ino


def test_records_of_a_dead_namespace_with_the_same_inode_vouch_for_nothing(netvm: Netvm) -> None:
    """A namespace that died left records under the inode this one now has (the kernel reuses it)."""
    state = Path(netvm.env["VIF_HOTPLUG_STATE_DIR"])
    state.mkdir(parents=True, exist_ok=True)
    ino = _inode(netvm)
    stale = {f"backend-{ino}-1.json": {"backend": netvm.fw_backend, "init": True},
             f"verified-{netvm.fw_backend}-{ino}-1.json": {"anything": "0"}}
    for name, data in stale.items():
        (state / name).write_text(json.dumps(data))
    netvm.add_vm(4)
    netvm.hotplug("online", 4)
    assert not netvm.firewall().has_chain(4, "input")  # no init was asked for here
    netvm.tool("init")
    fw = netvm.firewall()
    for chain in ("input", "forward", "postrouting", "custom-input", "custom-forward"):
        assert fw.has_chain(4, chain), chain
    assert not any((state / name).exists() for name in stale)


# --- nothing of the caller's environment reaches inside ---------------------------------------------


def test_a_fault_asked_for_in_the_environment_is_not_obeyed(netvm: Netvm) -> None:
    netvm.add_vm(4)
    proc = netvm.hotplug("online", 4, env={"VIF_HOTPLUG_FAULT": "online:before:0"}, check=False)
    assert proc.returncode == 0 and netvm.status(4) == "connected"


def test_an_abbreviated_watch_option_is_a_usage_error_not_a_watch(netvm: Netvm) -> None:
    proc = subprocess.run(["nsenter", f"--net=/run/netns/{netvm.ns.name}", entry_point("qubes-setup-dnat-to-ns"),
                           "--w"], capture_output=True, text=True, timeout=30, env={**os.environ, **netvm.env})
    assert proc.returncode != 0 and "unrecognized arguments: --w" in proc.stderr


def test_a_loopback_gateway_in_netvm_conf_is_refused_in_one_line(netvm: Netvm) -> None:
    netvm.write_conf("[netvm]\ngateway = 127.0.0.1\nprimary_dns = 10.139.1.1\n")
    netvm.add_vm(4)
    before = netvm.dump()
    proc = netvm.hotplug("online", 4, check=False)
    assert proc.returncode == 1 and "127.0.0.1" in proc.stderr and "loopback" in proc.stderr
    assert netvm.dump() == before
