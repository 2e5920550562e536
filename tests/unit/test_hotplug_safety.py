"""What no event may leave behind or lift: anti-spoofing after a failed link-down, another VM's
addresses, allowed elements of a VM that is gone, a device that is not this vif's (fakes only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.unit.fakes import FakeKernel, FakeXenStore
from tests.unit.test_hotplug import BACKEND, event, kernel, status, store
from vif_hotplug.app.settings import Settings
from vif_hotplug.core.firewall import SetElement
from vif_hotplug.core.model import LinkState, Route
from vif_hotplug.kernel.state_files import state_file

ALLOWED5 = SetElement(4, "allowed", "10.137.0.5/32", "vif4.0")


def online4(xs: FakeXenStore, k: FakeKernel, **kw: object) -> int:
    return event("online", xs, k, **kw).exit_code  # type: ignore[arg-type]


# --- a failed link-down keeps the anti-spoofing ---------------------------------------------------


def test_an_offline_whose_link_down_fails_keeps_the_vif_in_group_2_with_its_allowed_elements() -> None:
    xs, k = store(ip="10.137.0.5"), kernel()
    assert online4(xs, k) == 0
    k.fail("set", LinkState("vif4.0", False))
    outcome = event("offline", xs, k)
    assert outcome.exit_code == 1
    assert k.link("vif4.0").up and k.link("vif4.0").group == 2
    assert ALLOWED5 in k.set_elements


def test_an_online_rollback_stops_at_a_failed_link_down_and_leaves_the_anti_spoofing() -> None:
    xs, k = store(ip="10.137.0.5"), kernel()
    k.fail("add", lambda t: isinstance(t, Route))
    k.fail("set", LinkState("vif4.0", False))
    assert online4(xs, k) == 1
    assert k.link("vif4.0").up and k.link("vif4.0").group == 2
    assert ALLOWED5 in k.set_elements


def test_an_offline_whose_link_down_works_lifts_the_anti_spoofing_of_the_down_vif() -> None:
    xs, k = store(ip="10.137.0.5"), kernel()
    assert online4(xs, k) == 0
    assert event("offline", xs, k).exit_code == 0
    assert not k.link("vif4.0").up and k.link("vif4.0").group == 0 and k.elements_of("vif4.0") == set()


# --- allowed elements do not outlive their VM -------------------------------------------------------


def test_offline_removes_the_elements_of_an_address_xenstore_no_longer_lists() -> None:
    xs, k = store(ip="10.137.0.5"), kernel()
    assert online4(xs, k) == 0
    xs.data[f"{BACKEND}/ip"] = "10.137.0.9"
    assert event("offline", xs, k).exit_code == 0
    assert k.elements_of("vif4.0") == set()
    assert SetElement(4, "downstream", "10.137.0.5/32") not in k.set_elements


def test_the_first_online_of_a_device_removes_the_elements_a_previous_vm_left_on_its_name() -> None:
    xs, k = store(ip="10.137.0.9"), kernel()
    # A previous VM on a device of this name whose offline never ran.
    k.set_elements |= {ALLOWED5, SetElement(4, "downstream", "10.137.0.5/32")}
    assert online4(xs, k) == 0
    assert k.elements_of("vif4.0") == {SetElement(4, "allowed", "10.137.0.9/32", "vif4.0")}
    assert SetElement(4, "downstream", "10.137.0.5/32") not in k.set_elements


def test_a_repeated_online_lists_no_set() -> None:
    xs, k = store(ip="10.137.0.5"), kernel()
    assert online4(xs, k) == 0
    listed: list[str] = []
    original = k.device_elements
    k.device_elements = lambda dev: listed.append(dev) or original(dev)  # type: ignore[method-assign]
    assert online4(xs, k) == 0
    assert listed == []


# --- only this vif's device -------------------------------------------------------------------------


@pytest.mark.parametrize("vifname", ["eth0", "vif5.0x"])
def test_offline_never_takes_down_a_device_xenstore_s_vifname_names_that_is_not_this_vif(vifname: str) -> None:
    xs, k = store(ip="10.137.0.5"), kernel()
    k.add_link("vif5.0x", up=True, group=2)
    assert online4(xs, k) == 0
    before = (k.link("eth0").up, k.link("vif5.0x").up, k.link("vif5.0x").group)
    xs.data[f"{BACKEND}/vifname"] = vifname
    event("offline", xs, k)
    assert (k.link("eth0").up, k.link("vif5.0x").up, k.link("vif5.0x").group) == before
    assert not k.link("vif4.0").up and k.elements_of("vif4.0") == set()


# --- another VM's addresses -------------------------------------------------------------------------


def test_an_address_another_online_vif_has_is_refused_without_a_change() -> None:
    xs, k = store(ip="10.137.0.5"), kernel()
    xs.data.update({"backend/vif/5/0/ip": "10.137.0.5", "backend/vif/5/0/mac": "00:16:3e:5e:6c:05",
                    "backend/vif/5/0/online": "1"})
    assert event("online", xs, k, domid=5).exit_code == 0
    before = k.state()
    outcome = event("online", xs, k)
    assert outcome.exit_code == 1 and "10.137.0.5" in (outcome.error or "") and "vif5.0" in (outcome.error or "")
    assert k.state() == before and status(xs)[0] == "error"


def test_the_address_of_a_vif_xenstore_no_longer_marks_online_may_be_taken_over() -> None:
    xs, k = store(ip="10.137.0.5"), kernel()
    xs.data.update({"backend/vif/5/0/ip": "10.137.0.5", "backend/vif/5/0/mac": "00:16:3e:5e:6c:05",
                    "backend/vif/5/0/online": "1"})
    assert event("online", xs, k, domid=5).exit_code == 0
    xs.data["backend/vif/5/0/online"] = "0"  # a VM restarted: its old domain is going away
    assert online4(xs, k) == 0


def test_a_network_covering_another_vms_address_is_refused() -> None:
    xs, k = store(ip="10.137.0.5"), kernel()
    xs.data.update({"backend/vif/5/0/ip": "10.137.0.130", "backend/vif/5/0/mac": "00:16:3e:5e:6c:05",
                    "backend/vif/5/0/online": "1"})
    assert event("online", xs, k, domid=5).exit_code == 0
    xs.data[f"{BACKEND}/ip"] = "10.137.0.128/25"
    outcome = event("online", xs, k)
    assert outcome.exit_code == 1 and "covers 10.137.0.130/32" in (outcome.error or "")


def test_an_address_on_the_uplinks_own_network_is_refused() -> None:
    xs, k = store(ip="192.0.2.2"), kernel()
    k.uplink_networks["192.0.2.0/24"] = "eth0"
    outcome = event("online", xs, k)
    assert outcome.exit_code == 1 and "eth0" in (outcome.error or "")
    assert k.elements_of("vif4.0") == set()


def test_an_upstream_nameserver_is_refused(tmp_path: Path) -> None:
    settings = Settings(hooks_dir="/hooks", state_dir=str(tmp_path))
    Path(state_file(str(tmp_path), "upstreams")).write_text(json.dumps(["192.0.2.53"]))
    xs, k = store(ip="192.0.2.53"), kernel()
    outcome = event("online", xs, k, settings=settings)
    assert outcome.exit_code == 1 and "upstream nameserver" in (outcome.error or "")
