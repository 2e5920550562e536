"""The files an install puts on a driver domain exist and can run.

Kept to existence and executability: their contents belong to the install
scripts and units, which change on their own schedule.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]

EXECUTABLES = ["install.sh", "etc/xen/scripts/vif-route-qubes", "etc/NetworkManager/dispatcher.d/qubes-nmhook"]


@pytest.mark.parametrize("rel", EXECUTABLES)
def test_scripts_that_are_run_directly_are_executable_files(rel: str) -> None:
    path = ROOT / rel
    assert path.is_file() and os.access(path, os.X_OK), rel


@pytest.mark.parametrize("rel", EXECUTABLES)
def test_scripts_name_their_interpreter(rel: str) -> None:
    assert (ROOT / rel).read_bytes().startswith(b"#!")


def test_there_is_a_udev_rules_file() -> None:
    assert list((ROOT / "udev").glob("*.rules"))


def test_the_init_unit_exists() -> None:
    assert (ROOT / "etc/systemd/system/vif-hotplug-init.service").is_file()
