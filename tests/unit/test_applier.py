"""The one applier against a fake kernel (EEXIST, ENOENT, ENODEV as the kernel answers): end state, not call order."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_network
from typing import Any

import pytest

from tests.unit.fakes import FakeKernel
from vif_hotplug.app.applier import (
    Drift,
    apply_all_or_nothing,
    apply_best_effort,
    check,
    rollback,
)
from vif_hotplug.core.errors import DeviceGone, KernelError
from vif_hotplug.core.firewall import SetElement
from vif_hotplug.core.handlers import ActionOps, ObjectOps
from vif_hotplug.core.model import (
    ConntrackPurge,
    DeviceAddress,
    LinkState,
    NetvmParams,
    Route,
    Step,
    Sysctl,
    VmNetwork,
    dev_sysctl,
)
from vif_hotplug.core.plan_base import antispoof_ruleset
from vif_hotplug.core.plan_vif import Mapped, OfflineInputs, OnlineInputs, plan_offline, plan_online

DEV = "vif4.0"
MAC = "00:16:3e:5e:6c:00"
NETVM = NetvmParams(gateway=IPv4Address("10.137.0.1"), gateway6=IPv6Address("fd09:24ef:4179::a89:1"),
                    primary_dns=IPv4Address("10.139.1.1"))
NETS = (ip_network("10.137.0.5/32"), ip_network("fd09:24ef:4179::a89:5/128"))
ROUTE4 = Route(DEV, "10.137.0.5/32", 32748)


def kernel(*, firewall: bool = True) -> FakeKernel:
    k = FakeKernel()
    k.add_link(DEV)
    k.add_link("eth0", up=True)
    if firewall:
        k.init_firewall()
    return k


def online_steps(k: FakeKernel, dev: str = DEV, **kw: Any) -> tuple[Step, ...]:
    facts = k.link_facts(kw.get("rename_from") or dev)
    inputs = OnlineInputs(dev, 4, VmNetwork(NETS, MAC), NETVM, facts, "/hooks", harden=True, **kw)
    return plan_online(inputs).steps


def offline_steps(k: FakeKernel, dev: str = DEV) -> tuple[Step, ...]:
    return plan_offline(OfflineInputs(dev, 4, NETS, NETVM, k.link_facts(dev), "/hooks", harden=True)).steps


def fail_at(k: FakeKernel, step: Step, exc: BaseException | None = None) -> None:
    k.fail(step.op, step.target, exc)


# --- all or nothing ------------------------------------------------------------------------------


def test_online_plan_brings_the_vif_up_with_its_routes_and_gateway() -> None:
    k = kernel()
    apply_all_or_nothing(online_steps(k), k, DEV)
    assert (k.link(DEV).up, k.link(DEV).group) == (True, 2)
    assert k.routes_of(DEV) == {"10.137.0.5/32", "fd09:24ef:4179::a89:5/128"}
    assert k.addresses_of(DEV) == {"10.137.0.1/32", "fd09:24ef:4179::a89:1/128"}


def test_applying_twice_changes_nothing_the_second_time() -> None:
    k = kernel()
    apply_all_or_nothing(online_steps(k), k, DEV)
    before = k.state()
    second = apply_all_or_nothing(online_steps(k), k, DEV)
    assert (second.changed, second.undo, k.state()) == ((), (), before)


def test_only_steps_that_changed_something_are_reported() -> None:
    k = kernel()
    k.link(DEV).sysctls["ipv4/proxy_arp"] = "1"
    changed = apply_all_or_nothing(online_steps(k), k, DEV).changed
    assert Step("set", dev_sysctl("ipv4/proxy_arp", DEV, "1")) not in changed
    assert Step("add", ROUTE4) in changed


def test_a_purge_is_done_but_never_reported_as_a_change() -> None:
    k = kernel()
    k.conntrack.add("10.137.0.5")
    changed = apply_all_or_nothing(online_steps(k), k, DEV).changed
    assert "10.137.0.5" not in k.conntrack
    assert not [s for s in changed if isinstance(s.target, ConntrackPurge)]


def online_step_ids(**kw: Any) -> list[Any]:
    steps = online_steps(kernel(), **kw)
    return [pytest.param(i, id=f"{i}-{s}") for i, s in enumerate(steps) if s.op != "ensure"]


@pytest.mark.parametrize("index", online_step_ids())
def test_a_failing_step_leaves_the_kernel_as_it_was(index: int) -> None:
    k = kernel()
    k.link(DEV).sysctls["ipv4/accept_redirects"] = "2"  # not the default: the rollback must bring back "2"
    steps = online_steps(k)
    fail_at(k, steps[index])
    before = k.state()
    with pytest.raises(KernelError, match="injected"):
        apply_all_or_nothing(steps, k, DEV)
    assert k.state() == before


@pytest.mark.parametrize("index", online_step_ids(dev="work-vm", rename_from=DEV))
def test_a_failing_step_of_a_rename_leaves_the_kernel_as_it_was(index: int) -> None:
    k = kernel()
    steps = online_steps(k, dev="work-vm", rename_from=DEV)
    fail_at(k, steps[index])
    before = k.state()
    with pytest.raises(KernelError):
        apply_all_or_nothing(steps, k, DEV)
    assert k.state() == before


MAPPED = Mapped(IPv4Address("10.137.0.5"), IPv4Address("10.138.0.2"), IPv4Address("10.138.0.1"))


@pytest.mark.parametrize("index", online_step_ids(mapped=MAPPED))
def test_a_failing_step_of_a_mapped_vif_leaves_the_kernel_as_it_was(index: int) -> None:
    k = kernel()
    steps = online_steps(k, mapped=MAPPED)
    fail_at(k, steps[index])
    before = k.state()
    with pytest.raises(KernelError):
        apply_all_or_nothing(steps, k, DEV)
    assert k.state() == before


def test_a_failure_keeps_what_existed_before_the_run() -> None:
    k = kernel()
    k.link(DEV).up = True
    k._add_route(ROUTE4)
    k._add_element(SetElement(4, "allowed", "10.137.0.5/32", DEV))
    steps = online_steps(k)
    fail_at(k, steps[-1])
    with pytest.raises(KernelError):
        apply_all_or_nothing(steps, k, DEV)
    assert (k.routes_of(DEV), k.elements_of(DEV), k.link(DEV).up) == (
        {"10.137.0.5/32"}, {SetElement(4, "allowed", "10.137.0.5/32", DEV)}, True,
    )


def test_a_failure_never_undoes_a_firewall_ruleset() -> None:
    k = kernel(firewall=False)
    steps = online_steps(k)
    fail_at(k, steps[-1])
    with pytest.raises(KernelError):
        apply_all_or_nothing(steps, k, DEV)
    assert not k._drift(antispoof_ruleset((4, 6)))


def test_a_device_vanishing_midway_fails_online_and_rolls_back() -> None:
    k = kernel()
    steps = online_steps(k)
    k.fail("add", ROUTE4, DeviceGone(f"cannot add route: device {DEV} is gone"))
    before = k.state()
    with pytest.raises(DeviceGone):
        apply_all_or_nothing(steps, k, DEV)
    assert k.state() == before


@pytest.mark.parametrize("exc", [ValueError("library surprise"), OSError(5, "Input/output error"),
                                 AttributeError("NoneType has no attribute 'x'")], ids=lambda e: type(e).__name__)
def test_an_unexpected_library_exception_becomes_kernel_error_and_still_rolls_back(exc: Exception) -> None:
    k = kernel()
    steps = online_steps(k)
    k.fail("add", ROUTE4, exc)
    before = k.state()
    with pytest.raises(KernelError) as err:
        apply_all_or_nothing(steps, k, DEV)
    assert type(exc).__name__ in str(err.value) and "\n" not in str(err.value)
    assert err.value.__cause__ is exc
    assert k.state() == before


def test_the_undo_steps_of_a_successful_run_restore_the_kernel() -> None:
    k = kernel()
    before = k.state()
    applied = apply_all_or_nothing(online_steps(k), k, DEV)
    rollback(applied.undo, k, DEV)
    assert k.state() == before


def test_a_rename_is_undone_by_renaming_back() -> None:
    k = kernel()
    before = k.state()
    applied = apply_all_or_nothing(online_steps(k, dev="work-vm", rename_from=DEV), k, DEV)
    assert k.exists("work-vm") and k.alias("work-vm") == DEV
    rollback(applied.undo, k, DEV)
    assert k.state() == before


def test_rollback_goes_on_past_an_undo_step_that_fails() -> None:
    k = kernel()
    applied = apply_all_or_nothing(online_steps(k), k, DEV)
    k.fail("remove", DeviceAddress(DEV, "10.137.0.1/32"))
    rollback(applied.undo, k, DEV)
    assert (k.addresses_of(DEV), k.routes_of(DEV), k.link(DEV).up) == ({"10.137.0.1/32"}, set(), False)


def test_a_target_without_handler_is_a_kernel_error() -> None:
    k = kernel()
    with pytest.raises(KernelError, match="no handler for str"):
        apply_all_or_nothing([Step("add", "not a kernel object")], k, DEV)  # type: ignore[arg-type]


def test_an_operation_the_kind_does_not_support_is_a_kernel_error() -> None:
    with pytest.raises(KernelError, match="cannot add Sysctl"):
        apply_all_or_nothing([Step("add", Sysctl("net/ipv4/ip_forward", "1"))], kernel(), DEV)


# --- best effort -----------------------------------------------------------------------------------


def online_then_offline_kernel() -> FakeKernel:
    k = kernel()
    apply_all_or_nothing(online_steps(k), k, DEV)
    return k


def test_offline_plan_removes_everything_the_online_plan_added() -> None:
    k = kernel()
    before = k.state()
    apply_all_or_nothing(online_steps(k), k, DEV)
    apply_best_effort(offline_steps(k), k, DEV)
    assert k.state() == before


def test_removal_of_absent_objects_changes_nothing_and_succeeds() -> None:
    k = kernel()
    before = k.state()
    assert apply_best_effort(offline_steps(k), k, DEV) == []
    assert k.state() == before


def test_removal_goes_on_past_failures_and_raises_the_first() -> None:
    k = online_then_offline_kernel()
    steps = offline_steps(k)
    k.fail("remove", ROUTE4, KernelError("first"))
    k.fail("remove", DeviceAddress(DEV, "10.137.0.1/32"), KernelError("second"))
    with pytest.raises(KernelError, match="first"):
        apply_best_effort(steps, k, DEV)
    assert k.addresses_of(DEV) == {"10.137.0.1/32"}
    assert k.elements_of(DEV) == set()
    assert (k.link(DEV).up, k.link(DEV).group) == (False, 0)


def test_an_unexpected_library_exception_in_a_removal_becomes_kernel_error() -> None:
    k = online_then_offline_kernel()
    steps = offline_steps(k)
    k.fail("remove", ROUTE4, RuntimeError("boom"))
    with pytest.raises(KernelError, match="RuntimeError: boom"):
        apply_best_effort(steps, k, DEV)
    assert k.elements_of(DEV) == set()


def test_a_vanished_device_counts_as_done_and_its_set_elements_still_go() -> None:
    k = online_then_offline_kernel()
    steps = offline_steps(k)
    del k.links[(None, DEV)]
    k._drop_link_objects(None, DEV)
    apply_best_effort(steps, k, DEV)
    assert k.elements_of(DEV) == set()
    assert not [e for e in k.set_elements if e.set == "downstream"]


def test_best_effort_reports_what_it_changed() -> None:
    k = online_then_offline_kernel()
    changed = apply_best_effort(offline_steps(k), k, DEV)
    assert Step("remove", ROUTE4) in changed
    assert apply_best_effort(offline_steps(k), k, DEV) == []


# --- check --------------------------------------------------------------------------------------------


def test_check_finds_nothing_after_a_successful_apply() -> None:
    k = online_then_offline_kernel()
    assert check(online_steps(k), k) == []


def test_check_changes_nothing() -> None:
    k = kernel()
    before = k.state()
    check(online_steps(k), k)
    assert k.state() == before


def test_check_reports_a_missing_object_per_step() -> None:
    k = online_then_offline_kernel()
    k._remove_route(ROUTE4)
    assert check(online_steps(k), k) == [Drift(Step("add", ROUTE4), "missing")]


def test_check_reports_a_setting_with_its_current_value() -> None:
    k = online_then_offline_kernel()
    k.link(DEV).sysctls["ipv4/proxy_arp"] = "0"
    (drift,) = check(online_steps(k), k)
    assert drift.step == Step("set", dev_sysctl("ipv4/proxy_arp", DEV, "1"))
    assert drift.detail == f"is {dev_sysctl('ipv4/proxy_arp', DEV, '0')}"


def test_check_reports_a_ruleset_that_drifted() -> None:
    k = online_then_offline_kernel()
    del k.tables[(None, 4, "qubes")].chains["antispoof"]
    drifts = check(online_steps(k), k)
    assert [d.step.target for d in drifts] == [antispoof_ruleset((4, 6))]
    assert "antispoof" in drifts[0].detail


def test_check_reports_an_object_a_removal_left_behind() -> None:
    k = online_then_offline_kernel()
    assert Drift(Step("remove", ROUTE4), "still present") in check(offline_steps(k), k)


def test_check_reports_every_setting_of_a_vanished_device_as_missing() -> None:
    k = online_then_offline_kernel()
    steps = online_steps(k)
    del k.links[(None, DEV)]
    k._drop_link_objects(None, DEV)
    drifts = {d.step: d.detail for d in check(steps, k)}
    assert drifts[Step("set", LinkState(DEV, True))] == "missing"
    assert drifts[Step("add", ROUTE4)] == "missing"


def test_check_never_reports_a_run_step() -> None:
    k = kernel()
    assert check([Step("run", ConntrackPurge(("10.137.0.5",)))], k) == []


def test_check_reports_a_failing_read_as_unreadable() -> None:
    def present(target: object) -> bool:
        raise KernelError("netlink said no")

    class Host:
        handlers = {Route: ObjectOps(lambda t: True, lambda t: True, present)}

    assert check([Step("add", ROUTE4)], Host()) == [Drift(Step("add", ROUTE4), "cannot read: netlink said no")]


# --- the fault hook -------------------------------------------------------------------------------------


def test_the_step_hook_sees_before_and_after_of_every_index() -> None:
    k = kernel()
    steps = online_steps(k)[:3]
    seen: list[tuple[str, int, Step]] = []
    apply_all_or_nothing(steps, k, DEV, on_step=lambda at, i, s: seen.append((at, i, s)))
    assert seen == [(at, i, s) for i, s in enumerate(steps) for at in ("before", "after")]


def test_the_step_hook_sees_no_after_for_a_step_that_failed() -> None:
    k = kernel()
    steps = online_steps(k)[:3]
    fail_at(k, steps[1])
    seen: list[tuple[str, int]] = []
    with pytest.raises(KernelError):
        apply_all_or_nothing(steps, k, DEV, on_step=lambda at, i, s: seen.append((at, i)))
    assert seen == [("before", 0), ("after", 0), ("before", 1)]


def test_the_step_hook_sees_every_index_of_a_removal_even_past_failures() -> None:
    k = online_then_offline_kernel()
    steps = offline_steps(k)
    k.fail("remove", ROUTE4)
    seen: list[tuple[str, int]] = []
    with pytest.raises(KernelError):
        apply_best_effort(steps, k, DEV, on_step=lambda at, i, s: seen.append((at, i)))
    assert seen == [(at, i) for i in range(len(steps)) for at in ("before", "after")]


def test_a_step_hook_that_stops_the_process_stops_before_the_step_runs() -> None:
    class Killed(BaseException):
        pass

    def hook(at: str, index: int, step: Step) -> None:
        if (at, index) == ("before", 1):
            raise Killed

    k = kernel()
    steps = online_steps(k)
    with pytest.raises(Killed):
        apply_all_or_nothing(steps, k, DEV, on_step=hook)
    assert k.link(DEV).sysctls["ipv4/proxy_arp"] == "1"
    assert k.link(DEV).sysctls["ipv4/accept_redirects"] == k.defaults["ipv4/accept_redirects"]


def test_an_action_step_runs_each_time() -> None:
    ran: list[str] = []

    class Host:
        handlers = {ConntrackPurge: ActionOps(lambda p: ran.extend(p.addresses))}

    steps = [Step("run", ConntrackPurge(("10.137.0.5",)))]
    apply_all_or_nothing(steps, Host(), DEV)
    apply_all_or_nothing(steps, Host(), DEV)
    assert ran == ["10.137.0.5", "10.137.0.5"]
