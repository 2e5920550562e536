"""Flow offload around the events: what ``init`` plans from the probe, and what a vif's events add to it."""

from __future__ import annotations

from pathlib import Path

import pytest

from vif_hotplug.app import offload
from vif_hotplug.app.settings import Settings
from vif_hotplug.core.errors import KernelError
from vif_hotplug.core.model import Plan, Step
from vif_hotplug.core.plan_base import flow_offload, flowtable_device

PLAN = Plan("online", "vif5.0", (Step("set", flowtable_device("x")),))


class Probed:
    """The two facts ``init`` asks of the host for flow offload."""

    def __init__(self, missing: str | Exception | None, groups: dict[int, list[str]] | None = None) -> None:
        self.missing = missing
        self.groups = groups or {}

    def flow_offload_missing(self) -> str | None:
        if isinstance(self.missing, Exception):
            raise self.missing
        return self.missing

    def group_members(self, group: int) -> list[str]:
        return self.groups.get(group, [])


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(state_dir=str(tmp_path / "state"))


def test_init_offloads_over_the_vm_interfaces_and_uplinks_where_the_probe_finds_flowtables() -> None:
    got = offload.plan_for_init(Probed(None, {2: ["vif5.0"], 1: ["eth0"], 0: ["wlan0"]}))
    assert got.step == Step("ensure", flow_offload(["eth0", "vif5.0"]))


def test_init_plans_nothing_and_says_why_where_the_kernel_has_no_flowtables() -> None:
    got = offload.plan_for_init(Probed("no flowtables here", {2: ["vif5.0"]}))
    assert (got.step, "no flowtables here" in got.note) == (None, True)


def test_a_probe_that_fails_counts_as_no_flow_offload() -> None:
    got = offload.plan_for_init(Probed(KernelError("cannot load libnftables")))
    assert (got.step, "cannot load libnftables" in got.note) == (None, True)


def test_nothing_is_recorded_as_installed_before_init_installed_it(settings: Settings) -> None:
    assert offload.installed(settings) is False


def test_the_record_follows_what_init_installed(settings: Settings) -> None:
    offload.record(settings, True)
    installed = offload.installed(settings)
    offload.record(settings, False)
    assert (installed, offload.installed(settings)) == (True, False)


def test_a_first_online_adds_its_device_to_an_installed_flowtable(settings: Settings) -> None:
    offload.record(settings, True)
    plan = offload.with_device(PLAN, settings, "vif5.0", fresh=True)
    assert plan.steps == (*PLAN.steps, Step("add", flowtable_device("vif5.0")))


def test_a_repeated_online_leaves_the_flowtable_alone(settings: Settings) -> None:
    offload.record(settings, True)
    assert offload.with_device(PLAN, settings, "vif5.0", fresh=False) == PLAN


def test_without_a_flowtable_an_online_plans_nothing_more(settings: Settings) -> None:
    assert offload.with_device(PLAN, settings, "vif5.0", fresh=True) == PLAN


def test_an_offline_takes_its_device_out_of_the_flowtable(settings: Settings) -> None:
    offload.record(settings, True)
    plan = offload.without_device(PLAN, settings, "vif5.0", exists=True)
    assert plan.steps[-1] == Step("remove", flowtable_device("vif5.0"))


def test_an_offline_of_a_device_that_is_gone_leaves_the_flowtable_to_the_kernel(settings: Settings) -> None:
    offload.record(settings, True)
    assert offload.without_device(PLAN, settings, "vif5.0", exists=False) == PLAN
