"""The files an install puts on a driver domain say what the README says."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_install_script_installs_only_files_that_exist() -> None:
    text = (ROOT / "install.sh").read_text()
    paths = set(re.findall(r"(?<![/\w])((?:etc|udev)/[\w./-]+)", text))
    assert paths
    assert [p for p in paths if not (ROOT / p).exists()] == []


def test_udev_rules_run_the_script_for_online_and_offline_like_xen() -> None:
    rules = (ROOT / "udev/60-vif-hotplug.rules").read_text()
    for action in ("online", "offline"):
        assert (
            f'SUBSYSTEM=="xen-backend", KERNEL=="vif-*", ACTION=="{action}", '
            f'RUN+="/etc/xen/scripts/vif-route-qubes {action} type_if=vif"'
        ) in rules


def test_xen_wrapper_and_dispatcher_hook_are_executable() -> None:
    for rel in ("etc/xen/scripts/vif-route-qubes", "etc/NetworkManager/dispatcher.d/qubes-nmhook"):
        assert os.access(ROOT / rel, os.X_OK), rel


def test_init_unit_runs_before_the_network() -> None:
    unit = (ROOT / "etc/systemd/system/vif-hotplug-init.service").read_text()
    assert "Before=network-pre.target" in unit
    assert "ExecStart=/usr/local/bin/vif-hotplug init" in unit
