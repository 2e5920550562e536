"""Kernel modules (kernel.modules): what counts as loaded, loadable or absent; init loads netback only then."""

from __future__ import annotations

from pathlib import Path

import pytest

from vif_hotplug.core.errors import KernelError
from vif_hotplug.kernel.modules import load_module, module_state

RELEASE = "6.1.0-test"


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    sys_module, modules = tmp_path / "sys-module", tmp_path / "lib-modules"
    sys_module.mkdir()
    (modules / RELEASE).mkdir(parents=True)
    return sys_module, modules


def state(roots: tuple[Path, Path]) -> str:
    return module_state("xen-netback", str(roots[0]), str(roots[1]), RELEASE)


def test_a_module_listed_under_sys_module_is_loaded(roots: tuple[Path, Path]) -> None:
    (roots[0] / "xen_netback").mkdir()
    assert state(roots) == "loaded"


def test_a_module_built_into_the_kernel_counts_as_loaded(roots: tuple[Path, Path]) -> None:
    (roots[1] / RELEASE / "modules.builtin").write_text("kernel/drivers/net/xen-netback/xen-netback.ko\n")
    assert state(roots) == "loaded"


def test_a_module_of_the_running_kernel_nothing_loaded_is_loadable(roots: tuple[Path, Path]) -> None:
    (roots[1] / RELEASE / "modules.dep").write_text(
        "kernel/drivers/net/xen-netback/xen-netback.ko.xz: kernel/drivers/xen/xen-evtchn.ko.xz\n")
    assert state(roots) == "loadable"


def test_a_kernel_without_it_has_nothing_to_load(roots: tuple[Path, Path]) -> None:
    (roots[1] / RELEASE / "modules.dep").write_text("kernel/net/ipv4/tunnel4.ko:\n")
    assert state(roots) == "absent"


def test_this_machine_has_no_netback_to_load() -> None:
    assert module_state("xen-netback") in ("absent", "loaded")


def test_a_failing_modprobe_is_one_line_naming_the_module(tmp_path: Path) -> None:
    fake = tmp_path / "modprobe"
    fake.write_text("#!/bin/sh\necho 'modprobe: FATAL: Module xen-netback not found.' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(KernelError, match="xen-netback: modprobe: FATAL"):
        load_module("xen-netback", str(fake))


def test_no_modprobe_names_the_package() -> None:
    with pytest.raises(KernelError, match="kmod"):
        load_module("xen-netback", None)
