"""The hotplug commands of a driver domain that reaches XenStore only through the kernel's xenbus device.

A netvm here has no xenstored socket and no ``XENSTORED_PATH``: its
commands run in a mount namespace whose ``/dev/xen/xenbus`` is the FUSE
double of :mod:`tests.xenbus_double` (Linux's driver, with the embedded
xenstored behind it), as ``xl devd`` runs them in a real driver domain.
Every command must succeed without breaking a rule of the driver (the
double records any). Also here, on both transports: what a refused write
of ``hotplug-status`` does, and a ``backend/vif`` too long for one reply.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from vif_hotplug.xen.xenstore_client import XenStore
from vif_hotplug.xen.xs_wire import Op

from .conftest import NetnsFactory
from .hotplug_env import GATEWAY, Netvm, running_netvm

CONF = f"""[netvm]
gateway = {GATEWAY}
primary_dns = 10.139.1.1
secondary_dns = 10.139.1.2
"""


@pytest.fixture
def netvm(make_netns: NetnsFactory, backend: str) -> Iterator[Netvm]:
    with running_netvm(make_netns, CONF, backend, xenbus={}) as env:
        yield env
        assert env.xenbus is not None and env.xenbus.violations == []


def routes(netvm: Netvm) -> str:
    return netvm.ns.run("ip", "route").stdout


def test_the_commands_find_no_xenstored_and_no_xenstored_path(netvm: Netvm) -> None:
    assert "XENSTORED_PATH" not in netvm.env
    assert netvm.mount_ns is not None
    proc = netvm.ns.run("nsenter", f"--mount={netvm.mount_ns}", "sh", "-c",
                        "test -e /dev/xen/xenbus && ! test -e /run/xenstored/socket "
                        "&& ! test -e /var/run/xenstored/socket", check=False)
    assert proc.returncode == 0


def test_online_through_the_device_configures_the_vif_and_reports_connected(netvm: Netvm) -> None:
    netvm.add_vm(4, ["10.137.0.5"])
    netvm.hotplug("online", 4)
    assert "10.137.0.5 dev vif4.0 proto static metric 32748" in routes(netvm)
    assert netvm.members(4, "allowed") == ["vif4.0 . 10.137.0.5"]
    assert netvm.status(4) == "connected"
    assert netvm.xenbus is not None and netvm.xenbus.requests > 0


def test_offline_through_the_device_removes_what_online_made(netvm: Netvm) -> None:
    netvm.add_vm(4, ["10.137.0.5"])
    before = netvm.settled_dump()
    netvm.hotplug("online", 4)
    netvm.xs_write(f"{netvm.backend(4)}/online", "0")
    netvm.hotplug("offline", 4)
    assert netvm.members(4, "allowed") == [] and "10.137.0.5" not in routes(netvm)
    assert netvm.settled_dump()["routes4"] == before["routes4"]


def test_status_through_the_device_reports_the_vif_without_drift(netvm: Netvm) -> None:
    netvm.add_vm(4, ["10.137.0.5"])
    netvm.hotplug("online", 4)
    proc = netvm.tool("status", "vif4.0", check=False)
    assert proc.returncode == 0, proc.stderr
    assert "vif4.0 (XenStore: online): ok" in proc.stdout


def test_reconcile_through_the_device_repairs_a_lost_route(netvm: Netvm) -> None:
    netvm.add_vm(4, ["10.137.0.5"])
    netvm.hotplug("online", 4)
    netvm.ns.run("ip", "route", "del", "10.137.0.5", "dev", "vif4.0")
    netvm.tool("reconcile")
    assert "10.137.0.5 dev vif4.0 proto static metric 32748" in routes(netvm)


# --- on both transports ----------------------------------------------------------------------------


@pytest.fixture(params=["socket", "device"])
def any_netvm(request: pytest.FixtureRequest, make_netns: NetnsFactory, backend: str) -> Iterator[Netvm]:
    with running_netvm(make_netns, CONF, backend, xenbus={} if request.param == "device" else None) as env:
        yield env
        assert env.xenbus is None or env.xenbus.violations == []


def test_a_refused_hotplug_status_write_fails_online_in_one_line_and_undoes_the_vif(any_netvm: Netvm) -> None:
    netvm = any_netvm
    netvm.tool("init")  # the netvm's own rules first: online would add them, and keep them
    netvm.add_vm(4, ["10.137.0.5"])
    before = netvm.settled_dump()
    assert netvm.xenstored is not None
    # A real xenstored answers ENOENT for a node it lost meanwhile (the VM's backend torn down).
    netvm.xenstored.answer_with_error(Op.WRITE, f"{netvm.backend(4)}/hotplug-status", "ENOENT")
    proc = netvm.hotplug("online", 4, check=False)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "hotplug-status" in proc.stderr and "ENOENT" in proc.stderr
    assert "10.137.0.5" not in routes(netvm) and netvm.members(4, "allowed") == []
    assert netvm.settled_dump() == before


def _many_domids(netvm: Netvm, count: int) -> None:
    """``count`` VMs listed under backend/vif (detached: ``online`` 0, no device), written in one connection."""
    with XenStore(("unix", netvm.xs_path)) as xs:
        for domid in range(100, 100 + count):
            xs.write(f"{netvm.backend(domid)}/frontend-id", str(domid))
            xs.write(f"{netvm.backend(domid)}/online", "0")


def test_init_and_status_with_2000_domids_under_backend_vif_succeed(any_netvm: Netvm) -> None:
    # ~12 KiB of names: xenstored answers the listing E2BIG, the client pages it with DIRECTORY_PART.
    netvm = any_netvm
    _many_domids(netvm, 2000)
    netvm.add_vm(4, ["10.137.0.5"])
    netvm.tool("init")
    proc = netvm.tool("status", check=False)
    assert proc.returncode == 0, proc.stderr
    assert "vif4.0 (XenStore: online): ok" in proc.stdout
    assert proc.stdout.count("(XenStore: offline): ok") == 2000
    assert netvm.status(4) == "connected"
