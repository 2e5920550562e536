"""Sysctls as plan settings (kernel.sysctl) on a stand-in /proc/sys in a temporary directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from vif_hotplug.core.errors import DeviceGone, KernelError
from vif_hotplug.core.model import Sysctl, dev_sysctl
from vif_hotplug.kernel.sysctl import Sysctls, kernel_has_ipv6, read_sysctl


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    for key, value in {"net/ipv4/ip_forward": "0\n", "net/ipv4/conf/vif4.0/proxy_arp": "0\n"}.items():
        path = tmp_path / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value)
    return tmp_path


def test_setting_a_new_value_writes_it_and_returns_the_previous_one(proc: Path) -> None:
    old = Sysctls(str(proc)).set(dev_sysctl("ipv4/proxy_arp", "vif4.0", "1"))
    assert old == dev_sysctl("ipv4/proxy_arp", "vif4.0", "0")
    assert (proc / "net/ipv4/conf/vif4.0/proxy_arp").read_text().strip() == "1"


def test_setting_the_value_already_there_changes_nothing(proc: Path) -> None:
    path = proc / "net/ipv4/ip_forward"
    before = path.stat().st_mtime_ns
    assert Sysctls(str(proc)).set(Sysctl("net/ipv4/ip_forward", "0")) is None
    assert path.stat().st_mtime_ns == before


def test_a_key_of_a_missing_device_means_the_device_is_gone(proc: Path) -> None:
    with pytest.raises(DeviceGone, match=r"vif9\.0"):
        Sysctls(str(proc)).set(dev_sysctl("ipv4/proxy_arp", "vif9.0", "1"))


def test_a_missing_global_key_is_a_kernel_error_naming_it(proc: Path) -> None:
    with pytest.raises(KernelError, match="net/ipv6/conf/all/forwarding") as err:
        Sysctls(str(proc)).set(Sysctl("net/ipv6/conf/all/forwarding", "1"))
    assert not isinstance(err.value, DeviceGone)


def test_current_reads_the_value_or_none(proc: Path) -> None:
    sysctls = Sysctls(str(proc))
    assert sysctls.current(Sysctl("net/ipv4/ip_forward", "1")) == Sysctl("net/ipv4/ip_forward", "0")
    assert sysctls.current(dev_sysctl("ipv4/proxy_arp", "vif9.0", "1")) is None


def test_read_sysctl_strips_the_newline(proc: Path) -> None:
    assert read_sysctl("net/ipv4/ip_forward", None, str(proc)) == "0"


def test_kernel_has_ipv6_follows_proc_sys(tmp_path: Path) -> None:
    assert kernel_has_ipv6(str(tmp_path)) is False
    (tmp_path / "net" / "ipv6").mkdir(parents=True)
    assert kernel_has_ipv6(str(tmp_path)) is True


@pytest.mark.parametrize(
    ("key", "dev"),
    [("net/ipv4/conf/vif4.0/proxy_arp", "vif4.0"), ("net/ipv4/conf/all/proxy_arp", None),
     ("net/ipv4/conf/default/proxy_arp", None), ("net/ipv4/ip_forward", None)],
)
def test_a_sysctl_knows_its_interface(key: str, dev: str | None) -> None:
    assert Sysctl(key, "1").dev == dev
