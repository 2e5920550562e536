"""The applier against a fake host that behaves like the kernel (EEXIST, ENOENT)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from vif_hotplug.applier import apply_all_or_nothing, apply_best_effort
from vif_hotplug.errors import DeviceGone, KernelError
from vif_hotplug.model import (
    ConntrackPurge,
    Hooks,
    LinkState,
    Plan,
    Removable,
    Route,
    Runnable,
    SetEntry,
    Settable,
    Step,
    Sysctl,
)


@dataclass
class FakeHost:
    objects: set[Removable] = field(default_factory=set)
    settings: dict[tuple[str, ...], str] = field(default_factory=dict)
    fail_on: object | None = None
    gone: bool = False
    ran: list[Runnable] = field(default_factory=list)

    def _check(self, target: object) -> None:
        if target == self.fail_on:
            raise KernelError(f"cannot apply {target}")
        if self.gone and not isinstance(target, SetEntry):
            raise DeviceGone("device is gone")

    def add(self, target: Removable) -> bool:
        self._check(target)
        if target in self.objects:
            return False
        self.objects.add(target)
        return True

    def remove(self, target: Removable) -> bool:
        self._check(target)
        if target not in self.objects:
            return False
        self.objects.remove(target)
        return True

    def set(self, target: Settable) -> Settable | None:
        self._check(target)
        if isinstance(target, Sysctl):
            key: tuple[str, ...] = ("sysctl", target.dev, target.name)
            old = self.settings.get(key, "0")
            if old == target.value:
                return None
            self.settings[key] = target.value
            return Sysctl(target.family, target.dev, target.name, old)
        if isinstance(target, LinkState):
            key = ("up", target.dev)
            was = self.settings.get(key, "0") == "1"
            if was == target.up:
                return None
            self.settings[key] = "1" if target.up else "0"
            return LinkState(target.dev, was)
        raise TypeError(target)

    def run(self, target: Runnable) -> None:
        self._check(target)
        self.ran.append(target)


ROUTE = Route("vif4.0", "10.137.0.5/32", 32748)
ENTRY = SetEntry("qbs-allowed4", "10.137.0.5/32", "vif4.0")
ONLINE = Plan(
    "online",
    "vif4.0",
    (
        Step("set", Sysctl("ipv4", "vif4.0", "proxy_arp", "1")),
        Step("run", ConntrackPurge("10.137.0.5")),
        Step("add", ENTRY),
        Step("set", LinkState("vif4.0", True)),
        Step("add", ROUTE),
        Step("run", Hooks("online", "vif4.0", "vif", ("10.137.0.5",), "/hooks")),
    ),
)


def test_applying_twice_changes_nothing_the_second_time() -> None:
    host = FakeHost()
    assert apply_all_or_nothing(ONLINE, host)
    before = (set(host.objects), dict(host.settings))
    assert apply_all_or_nothing(ONLINE, host) == []
    assert (host.objects, host.settings) == before


def test_failure_undoes_everything_this_run_added() -> None:
    host = FakeHost(fail_on=ROUTE)
    with pytest.raises(KernelError):
        apply_all_or_nothing(ONLINE, host)
    assert host.objects == set()
    assert host.settings == {("sysctl", "vif4.0", "proxy_arp"): "0", ("up", "vif4.0"): "0"}


def test_failure_keeps_what_existed_before_the_run() -> None:
    host = FakeHost(objects={ENTRY}, fail_on=ROUTE)
    with pytest.raises(KernelError):
        apply_all_or_nothing(ONLINE, host)
    assert host.objects == {ENTRY}


def test_hooks_do_not_run_when_an_earlier_step_fails() -> None:
    host = FakeHost(fail_on=ROUTE)
    with pytest.raises(KernelError):
        apply_all_or_nothing(ONLINE, host)
    assert not [r for r in host.ran if isinstance(r, Hooks)]


OFFLINE = Plan(
    "offline",
    "vif4.0",
    (Step("remove", ROUTE), Step("set", LinkState("vif4.0", False)), Step("remove", ENTRY)),
)


def test_removal_of_absent_objects_is_success() -> None:
    assert apply_best_effort(OFFLINE, FakeHost()) == []


def test_removal_treats_a_vanished_device_as_done_and_still_cleans_sets() -> None:
    host = FakeHost(objects={ROUTE, ENTRY}, gone=True)
    apply_best_effort(OFFLINE, host)
    assert ENTRY not in host.objects


def test_removal_continues_past_a_failure_and_reports_it() -> None:
    host = FakeHost(objects={ROUTE, ENTRY}, fail_on=ROUTE)
    with pytest.raises(KernelError):
        apply_best_effort(OFFLINE, host)
    assert host.objects == {ROUTE}


def test_an_unexpected_library_exception_still_rolls_back_and_becomes_kernel_error() -> None:
    class Exploding(FakeHost):
        def add(self, target: Removable) -> bool:
            if target == ROUTE:
                raise ValueError("library surprise")
            return super().add(target)

    host = Exploding()
    with pytest.raises(KernelError, match="library surprise"):
        apply_all_or_nothing(ONLINE, host)
    assert host.objects == set()
