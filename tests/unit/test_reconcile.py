"""``reconcile`` (app.reconcile): every vif to its desired state, leftovers of gone vifs removed (fakes only)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from tests.unit.fakes import FakeKernel, FakeXenStore
from vif_hotplug.app import reconcile as reconcile_module
from vif_hotplug.app.reconcile import ReconcileResult, online_vifs, reconcile
from vif_hotplug.app.settings import Settings
from vif_hotplug.core.firewall import SetElement
from vif_hotplug.core.model import Route
from vif_hotplug.core.validation import VifId

NETVM_KEYS = {"qubes-netvm-gateway": "10.137.0.1", "qubes-netvm-primary-dns": "10.139.1.1"}


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    netns = tmp_path / "netns"
    netns.mkdir()
    monkeypatch.setattr(reconcile_module, "NETNS_DIR", str(netns))
    return Settings(hooks_dir=str(tmp_path / "hooks"), hotplug_lock=str(tmp_path / "hotplug.lock"), lock_timeout=2.0)


def vm(xs: FakeXenStore, domid: int, ip: str, online: str = "1", mac: str = "00:16:3e:5e:6c:00") -> None:
    base = f"backend/vif/{domid}/0"
    xs.data.update({f"{base}/ip": ip, f"{base}/mac": mac, f"{base}/online": online})


def scene() -> tuple[FakeXenStore, FakeKernel]:
    xs = FakeXenStore(dict(NETVM_KEYS))
    vm(xs, 4, "10.137.0.5")
    vm(xs, 5, "10.137.0.6")
    k = FakeKernel()
    k.add_link("eth0", up=True)
    k.add_link("vif4.0")
    k.add_link("vif5.0")
    k.init_firewall()
    return xs, k


def run(settings: Settings, xs: FakeXenStore, k: FakeKernel, **kw: bool) -> ReconcileResult:
    return reconcile(settings, k, xs, None, lock=contextlib.nullcontext, **kw)


def test_online_vifs_are_those_xenstore_marks_online() -> None:
    xs, _ = scene()
    vm(xs, 7, "10.137.0.7", online="0")
    assert online_vifs(xs) == [VifId(4, 0), VifId(5, 0)]


def test_reconcile_brings_every_online_vif_up(settings: Settings) -> None:
    xs, k = scene()
    result = run(settings, xs, k)
    assert (result.online, result.errors) == (["vif4.0", "vif5.0"], [])
    assert (k.routes_of("vif4.0"), k.routes_of("vif5.0")) == ({"10.137.0.5/32"}, {"10.137.0.6/32"})
    assert xs.data["backend/vif/5/0/hotplug-status"] == "connected"


def test_a_second_reconcile_changes_nothing(settings: Settings) -> None:
    xs, k = scene()
    run(settings, xs, k)
    before = k.state()
    result = run(settings, xs, k)
    assert (result.changes, result.removed, k.state()) == (0, [], before)


def test_reconcile_restores_what_drifted(settings: Settings) -> None:
    xs, k = scene()
    run(settings, xs, k)
    k._remove_route(Route("vif4.0", "10.137.0.5/32", 32748))
    k.set_elements.discard(SetElement(4, "allowed", "10.137.0.6/32", "vif5.0"))
    run(settings, xs, k)
    assert k.routes_of("vif4.0") == {"10.137.0.5/32"}
    assert SetElement(4, "allowed", "10.137.0.6/32", "vif5.0") in k.set_elements


def test_reconcile_removes_the_set_elements_of_a_vif_that_is_gone(settings: Settings) -> None:
    xs, k = scene()
    run(settings, xs, k)
    xs.data["backend/vif/5/0/online"] = "0"
    del k.links[(None, "vif5.0")]
    k._drop_link_objects(None, "vif5.0")
    result = run(settings, xs, k)
    assert k.elements_of("vif5.0") == set()
    assert {e.network for e in k.set_elements if e.set == "downstream"} == {"10.137.0.5/32"}
    assert k.elements_of("vif4.0") and result.removed


def test_reconcile_takes_a_vm_interface_xenstore_does_not_list_offline(settings: Settings) -> None:
    xs, k = scene()
    run(settings, xs, k)
    xs.data["backend/vif/5/0/online"] = "0"
    run(settings, xs, k)
    assert (k.link("vif5.0").up, k.link("vif5.0").group, k.routes_of("vif5.0")) == (False, 0, set())
    assert k.link("vif4.0").up


def test_reconcile_skips_an_online_vif_whose_device_does_not_exist(settings: Settings) -> None:
    xs, k = scene()
    del k.links[(None, "vif5.0")]
    result = run(settings, xs, k)
    assert (result.online, result.errors) == (["vif4.0"], [])


def test_a_vif_with_bad_values_is_reported_and_the_others_still_come_up(settings: Settings) -> None:
    xs, k = scene()
    xs.data["backend/vif/4/0/mac"] = "zz"
    result = run(settings, xs, k)
    assert result.online == ["vif5.0"]
    assert len(result.errors) == 1 and result.errors[0].startswith("vif4.0: ") and "'zz'" in result.errors[0]


def test_a_dry_run_plans_but_changes_nothing(settings: Settings) -> None:
    xs, k = scene()
    before = k.state()
    result = run(settings, xs, k, dry_run=True)
    assert k.state() == before and result.plans and xs.writes == []


def test_an_allowed_address_that_left_xenstore_is_removed(settings: Settings) -> None:
    xs, k = scene()
    run(settings, xs, k)
    xs.data["backend/vif/4/0/ip"] = "10.137.0.9"
    run(settings, xs, k)
    allowed = {e for e in k.set_elements if e.set == "allowed" and e.dev == "vif4.0"}
    assert allowed == {SetElement(4, "allowed", "10.137.0.9/32", "vif4.0")}
    assert SetElement(4, "downstream", "10.137.0.5/32") not in k.set_elements


def test_a_half_done_offline_of_a_vif_no_longer_online_is_finished(settings: Settings) -> None:
    xs, k = scene()
    run(settings, xs, k)
    xs.data["backend/vif/5/0/online"] = "0"
    k.link("vif5.0").group = 0  # killed right after leaving group 2: its sysctls and routes are still set
    result = run(settings, xs, k)
    assert k.link("vif5.0").sysctls["ipv4/proxy_arp"] == "0"
    assert k.routes_of("vif5.0") == set()
    assert any(r.startswith("vif5.0: offline") for r in result.removed)


def test_a_vif_offline_in_xenstore_and_clean_is_not_reported(settings: Settings) -> None:
    xs, k = scene()
    xs.data["backend/vif/5/0/online"] = "0"
    result = run(settings, xs, k)
    assert not any(r.startswith("vif5.0") for r in result.removed)
