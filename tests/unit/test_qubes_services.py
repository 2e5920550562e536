"""Side by side with Qubes' own services (issue 19), without root: detection of a Qubes VM, the
vifname rule, the firewall service's reload, forwarding left to Qubes, the hardening holds, and the
NetworkManager hook's restart of the updates proxy."""

from __future__ import annotations

import os
import subprocess
from ipaddress import IPv4Address, ip_network
from pathlib import Path

import pytest

from tests.unit.fakes import FakeKernel
from vif_hotplug.app import qubes_vm
from vif_hotplug.app.applier import apply_all_or_nothing, apply_best_effort
from vif_hotplug.app.netvm_plan import plan_init
from vif_hotplug.app.settings import DEFAULT_PATH, Settings
from vif_hotplug.core.errors import InvalidInput, KernelError
from vif_hotplug.core.model import HardeningHold, NetvmParams, Sysctl, VmNetwork
from vif_hotplug.core.plan_vif import OfflineInputs, OnlineInputs, plan_offline, plan_online

ROOT = Path(__file__).resolve().parents[2]
HOOK = ROOT / "etc/NetworkManager/dispatcher.d/qubes-nmhook"
PARAMS = NetvmParams(gateway=IPv4Address("10.137.0.1"), primary_dns=IPv4Address("10.139.1.1"),
                     secondary_dns=IPv4Address("10.139.1.2"))
NETS = (ip_network("10.137.0.5/32"),)
MAC = "00:16:3e:5e:6c:00"
ALL_SEND = "net/ipv4/conf/all/send_redirects"


@pytest.fixture
def not_qubes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(qubes_vm, "MARKER_VM", str(tmp_path / "no-marker"))
    monkeypatch.setattr(qubes_vm, "_qubesdb_module", lambda: False)


# --- is this a Qubes VM ----------------------------------------------------------------------------------


def test_a_domain_without_qubesdb_or_marker_is_not_a_qubes_vm(not_qubes: None) -> None:
    assert qubes_vm.in_qubes_vm(Settings()) is False


def test_qubesdb_read_on_the_tool_path_means_a_qubes_vm(not_qubes: None) -> None:
    assert qubes_vm.in_qubes_vm(Settings(qubesdb_read="/usr/bin/qubesdb-read")) is True


def test_qubes_vm_marker_means_a_qubes_vm(not_qubes: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "marker-vm").write_text("")
    monkeypatch.setattr(qubes_vm, "MARKER_VM", str(tmp_path / "marker-vm"))
    assert qubes_vm.in_qubes_vm(Settings()) is True


def test_qubes_own_qubesdb_module_means_a_qubes_vm(not_qubes: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qubes_vm, "_qubesdb_module", lambda: True)
    assert qubes_vm.in_qubes_vm(Settings()) is True


# --- vifname ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["work-vm", "eth1", "Vif4.0", "xvif4"])
def test_a_vifname_outside_vif_star_is_refused_naming_it(name: str) -> None:
    with pytest.raises(InvalidInput, match=f"invalid vifname '{name}'.*vif\\*"):
        qubes_vm.check_vifname(name)


@pytest.mark.parametrize("name", ["vif4.0", "vif-work", "vifwork"])
def test_a_vifname_qubes_firewall_sees_as_a_vm_is_accepted(name: str) -> None:
    qubes_vm.check_vifname(name)


# --- reloading the firewall service ----------------------------------------------------------------------


def _tools(tmp_path: Path, script: str) -> Settings:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "systemctl"
    exe.write_text("#!/bin/sh\n" + script)
    exe.chmod(0o755)
    return Settings(path=f"{bindir}:{DEFAULT_PATH}")


def test_the_reload_asks_systemd_as_qubes_dns_script_does(tmp_path: Path) -> None:
    log = tmp_path / "calls"
    settings = _tools(tmp_path, f'echo "$@" >> {log}\n')
    qubes_vm.reload_firewall_service(settings, "test")
    assert log.read_text() == "--no-block try-reload-or-restart qubes-firewall.service\n"


@pytest.mark.parametrize("script", ["echo 'not booted with systemd' >&2; exit 1\n", "exit 5\n", "sleep 30\n"],
                         ids=["no systemd", "no such unit", "hung"])
def test_a_failing_systemctl_never_fails_the_caller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    script: str) -> None:
    monkeypatch.setattr(qubes_vm, "SYSTEMCTL_TIMEOUT", 0.5)
    qubes_vm.reload_firewall_service(_tools(tmp_path, script), "test")


def test_no_systemctl_at_all_is_no_error(tmp_path: Path) -> None:
    qubes_vm.reload_firewall_service(Settings(path=str(tmp_path)), "test")


# --- forwarding ------------------------------------------------------------------------------------------


def test_in_a_qubes_vm_init_plans_no_forwarding(not_qubes: None) -> None:
    plan = plan_init(PARAMS, True, FakeKernel(), Settings(qubesdb_read="/usr/bin/qubesdb-read"), None, None, None)
    assert not [s for s in plan.steps if isinstance(s.target, Sysctl) and "forward" in s.target.key]


def test_outside_qubes_init_still_turns_forwarding_on(not_qubes: None) -> None:
    plan = plan_init(PARAMS, True, FakeKernel(), Settings(), None, None, None)
    assert [s.target.key for s in plan.steps if isinstance(s.target, Sysctl)] == ["net/ipv4/ip_forward"]


# --- hardening holds: conf/all set while a hardened vif needs it, put back after the last ---------------


def _kernel(*devs: str) -> FakeKernel:
    k = FakeKernel()
    for dev in devs:
        k.add_link(dev)
    return k


def _online(k: FakeKernel, dev: str) -> None:
    inputs = OnlineInputs(dev, 4, VmNetwork(NETS if dev == "vif4.0" else (ip_network("10.137.0.6/32"),), MAC),
                          PARAMS, k.link_facts(dev, defaults_wanted=False), "/hooks", harden=True)
    apply_all_or_nothing(plan_online(inputs).steps, k, dev)


def _offline(k: FakeKernel, dev: str, harden: bool = True) -> None:
    nets = NETS if dev == "vif4.0" else (ip_network("10.137.0.6/32"),)
    apply_best_effort(plan_offline(OfflineInputs(dev, 4, nets, PARAMS, k.link_facts(dev), "/hooks",
                                                 harden=harden)).steps, k, dev)


def _all(k: FakeKernel, key: str = ALL_SEND) -> str:
    return k.namespaces[None][key]


def test_a_hardened_vif_turns_send_redirects_off_on_conf_all() -> None:
    k = _kernel("vif4.0")
    _online(k, "vif4.0")
    assert _all(k) == "0"


def test_conf_all_stays_hardened_while_another_hardened_vif_is_online() -> None:
    k = _kernel("vif4.0", "vif5.0")
    _online(k, "vif4.0")
    _online(k, "vif5.0")
    _offline(k, "vif4.0")
    assert _all(k) == "0"


def test_the_last_hardened_vif_going_offline_puts_conf_all_back() -> None:
    k = _kernel("vif4.0", "vif5.0")
    _online(k, "vif4.0")
    _online(k, "vif5.0")
    _offline(k, "vif4.0")
    _offline(k, "vif5.0")
    assert (_all(k), k.hardening_record) == ("1", None)


def test_a_key_this_package_did_not_change_is_left_as_it_was() -> None:
    k = _kernel("vif4.0")
    k.namespaces[None][ALL_SEND] = "0"  # the administrator's own choice
    _online(k, "vif4.0")
    k.namespaces[None][ALL_SEND] = "0"
    _offline(k, "vif4.0")
    assert _all(k) == "0"


def test_a_key_changed_since_this_package_set_it_is_not_put_back() -> None:
    k = _kernel("vif4.0")
    k.namespaces[None][ALL_SEND] = "2"
    _online(k, "vif4.0")
    k.namespaces[None][ALL_SEND] = "1"  # someone else's choice, after ours
    _offline(k, "vif4.0")
    assert _all(k) == "1"


def test_a_hold_taken_while_hardening_was_on_is_let_go_after_it_is_switched_off() -> None:
    k = _kernel("vif4.0")
    _online(k, "vif4.0")
    _offline(k, "vif4.0", harden=False)
    assert _all(k) == "1"


def test_a_holder_destroyed_without_offline_does_not_keep_conf_all_hardened() -> None:
    k = _kernel("vif4.0", "vif5.0")
    _online(k, "vif4.0")
    _online(k, "vif5.0")
    del k.links[(None, "vif5.0")]  # the VM's vif vanished, no offline ran for it
    _offline(k, "vif4.0")
    assert _all(k) == "1"


def test_a_failed_online_puts_conf_all_back() -> None:
    k = _kernel("vif4.0")
    k.fail("set", lambda t: getattr(t, "dev", None) == "vif4.0" and getattr(t, "up", None) is True)
    with pytest.raises(KernelError):
        _online(k, "vif4.0")
    assert (_all(k), k.hardening_record) == ("1", None)


def test_status_of_a_hardened_vif_sees_conf_all_turned_back_on() -> None:
    k = _kernel("vif4.0")
    _online(k, "vif4.0")
    k.namespaces[None][ALL_SEND] = "1"
    hold = HardeningHold("vif4.0", ((ALL_SEND, "0"),))
    assert k.handlers[HardeningHold].present(hold) is False  # type: ignore[union-attr]


# --- the NetworkManager hook ------------------------------------------------------------------------------


def _hook(tmp_path: Path, action: str, tool_exit: int) -> tuple[int, str]:
    bindir, tools = tmp_path / "bin", tmp_path / "sbin"
    bindir.mkdir(exist_ok=True)
    tools.mkdir(exist_ok=True)
    dns = bindir / "qubes-setup-dnat-to-ns"
    dns.write_text(f"#!/bin/sh\nexit {tool_exit}\n")
    dns.chmod(0o755)
    calls = tmp_path / "systemctl.log"
    systemctl = tools / "systemctl"
    systemctl.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    systemctl.chmod(0o755)
    env = {"PATH": f"{tools}:/usr/bin:/bin", "VIF_HOTPLUG_BIN": str(bindir)}
    proc = subprocess.run(["sh", str(HOOK), "uplink0", action], env=env, capture_output=True, text=True)
    return proc.returncode, calls.read_text() if calls.exists() else ""


@pytest.mark.parametrize("action", ["up", "vpn-up", "vpn-down", "dhcp4-change", "dns-change", "connectivity-change"])
def test_the_hook_restarts_the_updates_proxy_when_the_dns_changed(tmp_path: Path, action: str) -> None:
    assert _hook(tmp_path, action, 0) == (0, "--no-block try-restart qubes-updates-proxy.service\n")


def test_the_hook_leaves_the_updates_proxy_alone_when_nothing_changed(tmp_path: Path) -> None:
    assert _hook(tmp_path, "up", 100) == (0, "")


def test_the_hook_restarts_the_updates_proxy_after_a_failed_dns_run_too(tmp_path: Path) -> None:
    # Qubes' hook restarts it for any status but 100.
    assert _hook(tmp_path, "up", 1) == (1, "--no-block try-restart qubes-updates-proxy.service\n")


def test_the_hook_restarts_nothing_for_other_actions(tmp_path: Path) -> None:
    assert _hook(tmp_path, "down", 0) == (0, "")


def test_the_hook_is_still_executable() -> None:
    assert os.access(HOOK, os.X_OK)
