"""One hotplug event end to end (app.hotplug.handle_event) against a fake kernel and a fake XenStore."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from tests.unit.fakes import FakeKernel, FakeXenStore
from vif_hotplug.app.hotplug import Outcome, handle_event
from vif_hotplug.app.settings import Settings
from vif_hotplug.core.firewall import SetElement
from vif_hotplug.core.model import Hooks, LinkState, Plan, Step
from vif_hotplug.core.netvm_params import parse_conf
from vif_hotplug.xenstore_env import parse_invocation

MAC = "00:16:3e:5e:6c:00"
BACKEND = "backend/vif/4/0"
NETVM_KEYS = {
    "qubes-netvm-gateway": "10.137.0.1",
    "qubes-netvm-gateway6": "fd09:24ef:4179::a89:1",
    "qubes-netvm-primary-dns": "10.139.1.1",
    "qubes-netvm-secondary-dns": "10.139.1.2",
}
SETTINGS = Settings(hooks_dir="/hooks")
IP = "10.137.0.5 fd09:24ef:4179::a89:5"


def toolstack_env(domid: int = 4, vif: str | None = None) -> dict[str, str]:
    return {"XENBUS_PATH": f"backend/vif/{domid}/0", "vif": vif or f"vif{domid}.0", "XENBUS_TYPE": "vif"}


def store(ip: str | None = IP, mac: str | None = MAC, **extra: str) -> FakeXenStore:
    data = dict(NETVM_KEYS)
    if ip is not None:
        data[f"{BACKEND}/ip"] = ip
    if mac is not None:
        data[f"{BACKEND}/mac"] = mac
    data.update({f"{BACKEND}/{k}": v for k, v in extra.items()})
    return FakeXenStore(data)


def add_vm(xs: FakeXenStore, domid: int, ip: str, mac: str = "00:16:3e:5e:6c:05") -> None:
    xs.data[f"backend/vif/{domid}/0/ip"] = ip
    xs.data[f"backend/vif/{domid}/0/mac"] = mac


def kernel() -> FakeKernel:
    k = FakeKernel()
    k.add_link("eth0", up=True)
    k.add_link("vif4.0")
    k.add_link("vif5.0")
    k.init_firewall()
    return k


@contextlib.contextmanager
def no_lock() -> Iterator[None]:
    yield


def event(command: str, xs: FakeXenStore, k: FakeKernel, *, domid: int = 4, vif: str | None = None,
          settings: Settings = SETTINGS, **kw: Any) -> Outcome:
    ev = parse_invocation([command, "type_if=vif"], toolstack_env(domid, vif))
    return handle_event(ev, settings, k, xs, kw.pop("qubesdb", None), kw.pop("lock", no_lock), **kw)


def status(xs: FakeXenStore, domid: int = 4) -> tuple[str | None, str | None]:
    return xs.data.get(f"backend/vif/{domid}/0/hotplug-status"), xs.data.get(f"backend/vif/{domid}/0/hotplug-error")


# --- online ---------------------------------------------------------------------------------------


def test_online_configures_the_vif_and_reports_connected() -> None:
    xs, k = store(), kernel()
    outcome = event("online", xs, k)
    assert (outcome.exit_code, outcome.error, status(xs)) == (0, None, ("connected", None))
    assert (k.link("vif4.0").up, k.link("vif4.0").group) == (True, 2)
    assert k.routes_of("vif4.0") == {"10.137.0.5/32", "fd09:24ef:4179::a89:5/128"}
    assert k.addresses_of("vif4.0") == {"10.137.0.1/32", "fd09:24ef:4179::a89:1/128"}
    assert SetElement(4, "allowed", "10.137.0.5/32", "vif4.0") in k.set_elements


def test_online_that_changed_something_returns_its_hooks() -> None:
    outcome = event("online", store(), kernel())
    assert outcome.hooks == Hooks("online", "vif4.0", "vif", ("10.137.0.5", "fd09:24ef:4179::a89:5"), "/hooks",
                                  (("XENBUS_PATH", "backend/vif/4/0"),))


def test_second_online_changes_nothing_and_runs_no_hooks() -> None:
    xs, k = store(), kernel()
    event("online", xs, k)
    before = k.state()
    outcome = event("online", xs, k)
    assert (outcome.exit_code, outcome.changed, outcome.hooks) == (0, (), None)
    assert k.state() == before
    assert status(xs) == ("connected", None)


def test_second_online_keeps_the_running_vms_connections() -> None:
    xs, k = store(), kernel()
    event("online", xs, k)
    k.conntrack.add("10.137.0.5")
    event("online", xs, k)
    assert "10.137.0.5" in k.conntrack


def test_first_online_purges_connections_a_previous_vm_left_on_the_address() -> None:
    xs, k = store(), kernel()
    k.conntrack.add("10.137.0.5")
    event("online", xs, k)
    assert "10.137.0.5" not in k.conntrack


def test_online_of_a_vm_without_addresses_brings_the_link_up_with_nothing_allowed() -> None:
    xs, k = store(ip=""), kernel()
    outcome = event("online", xs, k)
    assert (outcome.exit_code, status(xs)) == (0, ("connected", None))
    assert (k.link("vif4.0").up, k.link("vif4.0").group) == (True, 2)
    assert (k.routes_of("vif4.0"), k.addresses_of("vif4.0"), k.elements_of("vif4.0")) == (set(), set(), set())
    assert outcome.hooks is not None and outcome.hooks.addresses == ()


def test_online_with_a_missing_ip_key_is_a_vm_without_addresses() -> None:
    xs, k = store(ip=None), kernel()
    assert event("online", xs, k).exit_code == 0
    assert k.routes_of("vif4.0") == set()


def test_online_takes_netvm_parameters_from_qubesdb_before_xenstore() -> None:
    xs, k = store(), kernel()
    qubesdb = {"/qubes-netvm-gateway": "10.137.0.254", "/qubes-netvm-primary-dns": "10.139.1.1"}
    event("online", xs, k, qubesdb=qubesdb.get)
    assert k.addresses_of("vif4.0") == {"10.137.0.254/32"}


def test_online_fills_the_connected_sets_from_xenstore() -> None:
    xs, k = store(), kernel()
    xs.data["qubes-connected-ips"] = "10.137.0.5 10.137.0.9"
    event("online", xs, k)
    assert {e.network for e in k.elements(4, "connected")} == {"10.137.0.5/32", "10.137.0.9/32"}


def test_online_renames_to_vifname_and_keeps_netbacks_name_as_alias() -> None:
    xs, k = store(vifname="work-vm"), kernel()
    outcome = event("online", xs, k)
    assert (outcome.exit_code, outcome.dev) == (0, "work-vm")
    assert (k.exists("vif4.0"), k.alias("work-vm"), k.link("work-vm").up) == (False, "vif4.0", True)
    assert k.routes_of("work-vm") == {"10.137.0.5/32", "fd09:24ef:4179::a89:5/128"}


def test_second_online_of_a_renamed_vif_is_quiet() -> None:
    xs, k = store(vifname="work-vm"), kernel()
    event("online", xs, k)
    before = k.state()
    assert event("online", xs, k, vif="work-vm").changed == ()
    assert k.state() == before


def test_second_online_under_netbacks_old_name_finds_the_renamed_vif() -> None:
    xs, k = store(vifname="work-vm"), kernel()
    event("online", xs, k)
    before = k.state()
    outcome = event("online", xs, k, vif="vif4.0")
    assert (outcome.exit_code, outcome.dev, outcome.changed) == (0, "work-vm", ())
    assert k.state() == before


def test_online_refuses_a_vifname_another_device_has() -> None:
    xs, k = store(vifname="eth0"), kernel()
    before = k.state()
    outcome = event("online", xs, k)
    assert outcome.exit_code == 1 and "eth0" in (outcome.error or "")
    assert k.state() == before


def test_online_of_a_mapped_vm_builds_its_nat_namespace() -> None:
    conf = parse_conf("[mapped-ip]\n10.137.0.5 = 10.138.0.2 10.138.0.1\n")
    xs, k = store(), kernel()
    assert event("online", xs, k, settings=Settings(hooks_dir="/hooks", conf=conf)).exit_code == 0
    assert k.link("vif4.0", "vif4.0-nat").kind == "netback"
    assert k.link("vif4.0").kind == "veth"
    assert k.routes_of("vif4.0") == {"10.137.0.5/32"}


def test_second_online_of_a_mapped_vm_changes_nothing() -> None:
    # A repeat (udev and xl devd both call online; reconcile calls it for every vif) must not
    # disturb a running VM: Linux flushes a link's routes when it goes down.
    settings = Settings(hooks_dir="/hooks", conf=parse_conf("[mapped-ip]\n10.137.0.5 = 10.138.0.2 10.138.0.1\n"))
    xs, k = store(), kernel()
    event("online", xs, k, settings=settings)
    before = k.state()
    outcome = event("online", xs, k, settings=settings)
    assert [str(s) for s in outcome.changed] == []
    assert k.state() == before


def test_online_holds_the_lock_while_it_changes_the_kernel() -> None:
    held: list[bool] = []
    state = {"held": False}

    @contextlib.contextmanager
    def lock() -> Iterator[None]:
        state["held"] = True
        yield
        state["held"] = False

    event("online", store(), kernel(), lock=lock, on_step=lambda at, i, s: held.append(state["held"]))
    assert held and all(held)


def test_online_calls_the_step_hook_for_every_step() -> None:
    seen: list[tuple[str, int]] = []
    outcome = event("online", store(), kernel(), on_step=lambda at, i, s: seen.append((at, i)))
    assert outcome.plan is not None
    assert seen == [(at, i) for i in range(len(outcome.plan.steps)) for at in ("before", "after")]


# --- online failures ---------------------------------------------------------------------------------

BAD_BACKEND = [
    ("mac not a mac", {"mac": "zz"}, "'zz'"),
    ("multicast mac", {"mac": "01:00:5e:00:00:01"}, "multicast"),
    ("broadcast mac", {"mac": "ff:ff:ff:ff:ff:ff"}, "broadcast"),
    ("all-zero mac", {"mac": "00:00:00:00:00:00"}, "all zero"),
    ("missing mac", {"mac": None}, "mac"),
    ("ip not an address", {"ip": "10.137.0.300"}, "10.137.0.300"),
    ("ip with shell", {"ip": "10.137.0.5;reboot"}, "reboot"),
    ("ip link-local", {"ip": "169.254.1.1"}, "169.254.1.1"),
    ("ip too wide", {"ip": "10.0.0.0/8"}, "10.0.0.0/8"),
    ("ip is the gateway", {"ip": "10.137.0.1"}, "own gateway"),
    ("ip is a virtual dns", {"ip": "10.139.1.2"}, "own gateway"),
    ("bad vifname", {"vifname": "a b"}, "'a b'"),
    ("bad type", {"type": "VIF!"}, "'VIF!'"),
]


@pytest.mark.parametrize(("values", "needle"), [pytest.param(*r[1:], id=r[0]) for r in BAD_BACKEND])
def test_bad_backend_values_fail_online_with_one_line_and_no_change(values: dict[str, str | None], needle: str) -> None:
    xs, k = store(ip=values.pop("ip", IP), mac=values.pop("mac", MAC), **values), kernel()  # type: ignore[arg-type]
    before = k.state()
    outcome = event("online", xs, k)
    assert outcome.exit_code == 1
    assert outcome.error is not None and needle in outcome.error and "\n" not in outcome.error
    assert status(xs) == ("error", outcome.error)
    assert k.state() == before


BAD_NETVM = [
    ("gateway not an address", {"qubes-netvm-gateway": "10.137.0.999"}, "10.137.0.999"),
    ("gateway6 not ipv6", {"qubes-netvm-gateway6": "10.0.0.1"}, "not an IPv6"),
    ("no gateway for an ipv4 vm", {"qubes-netvm-gateway": "", "qubes-netvm-primary-dns": "10.139.1.1"}, "gateway"),
]


@pytest.mark.parametrize(("values", "needle"), [pytest.param(*r[1:], id=r[0]) for r in BAD_NETVM])
def test_bad_netvm_parameters_fail_online_with_no_change(values: dict[str, str], needle: str) -> None:
    xs, k = store(), kernel()
    xs.data.update(values)
    before = k.state()
    outcome = event("online", xs, k)
    assert (outcome.exit_code, status(xs)[0]) == (1, "error")
    assert needle in (outcome.error or "")
    assert k.state() == before


def test_a_vm_address_this_netvm_owns_fails_online_with_no_change() -> None:
    xs, k = store(ip="192.168.1.10"), kernel()
    k.local.add("192.168.1.10")  # the uplink's own address
    before = k.state()
    outcome = event("online", xs, k)
    assert outcome.exit_code == 1 and "192.168.1.10" in (outcome.error or "")
    assert k.state() == before


def test_a_broken_netvm_conf_fails_online() -> None:
    xs, k = store(), kernel()
    settings = Settings(hooks_dir="/hooks", conf_error="invalid config /etc/vif-hotplug/netvm.conf: bad")
    outcome = event("online", xs, k, settings=settings)
    assert (outcome.exit_code, outcome.error) == (1, "invalid config /etc/vif-hotplug/netvm.conf: bad")


def test_a_kernel_failure_undoes_online_and_is_reported() -> None:
    xs, k = store(), kernel()
    k.fail("add", lambda t: getattr(t, "destination", None) == "fd09:24ef:4179::a89:5/128")
    before = k.state()
    outcome = event("online", xs, k)
    assert (outcome.exit_code, status(xs)) == (1, ("error", "injected add failure"))
    assert k.state() == before


def test_an_unexpected_exception_is_an_internal_error_not_a_traceback() -> None:
    xs, k = store(), kernel()
    def link_facts(dev: str, **kw: Any) -> Any:
        raise ZeroDivisionError("oops")

    k.link_facts = link_facts  # type: ignore[method-assign]
    outcome = event("online", xs, k)
    assert (outcome.exit_code, outcome.error) == (1, "internal error: ZeroDivisionError: oops")
    assert status(xs)[0] == "error"


def test_xenstore_failing_on_hotplug_status_undoes_everything_online_changed() -> None:
    xs, k = store(), kernel()
    xs.data["qubes-connected-ips"] = "10.137.0.5"
    xs.fail_writes.add(f"{BACKEND}/hotplug-status")
    k.conntrack.add("10.137.0.5")
    before = k.state()
    outcome = event("online", xs, k)
    assert outcome.exit_code == 1 and outcome.error is not None and "\n" not in outcome.error
    assert k.state() == before
    assert status(xs)[0] is None


def test_xenstore_down_fails_online_with_one_line_and_no_change() -> None:
    xs, k = store(), kernel()
    xs.down = True
    before = k.state()
    outcome = event("online", xs, k)
    assert outcome.exit_code == 1 and "did not answer" in (outcome.error or "")
    assert k.state() == before


def test_online_refuses_a_vif_env_naming_another_device() -> None:
    xs, k = store(), kernel()
    k.add_link("othervm", group=2, alias="vif7.0")
    before = k.state()
    outcome = event("online", xs, k, vif="othervm")
    assert outcome.exit_code == 1 and "'othervm'" in (outcome.error or "")
    assert k.state() == before


def test_online_of_a_device_that_does_not_exist_fails_without_change() -> None:
    xs, k = store(), kernel()
    del k.links[(None, "vif4.0")]
    before = k.state()
    outcome = event("online", xs, k)
    assert outcome.exit_code == 1 and "vif4.0" in (outcome.error or "")
    assert k.state() == before


# --- offline --------------------------------------------------------------------------------------------


def test_offline_undoes_what_online_did() -> None:
    xs, k = store(), kernel()
    before = k.state()
    event("online", xs, k)
    outcome = event("offline", xs, k)
    assert outcome.exit_code == 0
    assert k.state() == before


def test_offline_that_changed_something_returns_its_hooks() -> None:
    xs, k = store(), kernel()
    event("online", xs, k)
    hooks = event("offline", xs, k).hooks
    assert hooks is not None
    assert (hooks.command, hooks.addresses) == ("offline", ("10.137.0.5", "fd09:24ef:4179::a89:5"))


def test_second_offline_changes_nothing_and_runs_no_hooks() -> None:
    xs, k = store(), kernel()
    event("online", xs, k)
    event("offline", xs, k)
    before = k.state()
    outcome = event("offline", xs, k)
    assert (outcome.exit_code, outcome.changed, outcome.hooks, k.state()) == (0, (), None, before)


def two_vms() -> tuple[FakeXenStore, FakeKernel]:
    xs, k = store(), kernel()
    add_vm(xs, 5, "10.137.0.6")
    event("online", xs, k)
    event("online", xs, k, domid=5)
    return xs, k


@pytest.mark.parametrize(
    "values",
    [{"ip": "not an address"}, {"mac": "zz"}, {"ip": None, "mac": None}, {"vifname": "a b"}],
    ids=["bad ip", "bad mac", "keys gone", "bad vifname"],
)
def test_offline_with_bad_backend_values_still_removes_this_vifs_set_elements(values: dict[str, str | None]) -> None:
    xs, k = two_vms()
    others = k.elements_of("vif5.0")
    for key, value in values.items():
        if value is None:
            xs.data.pop(f"{BACKEND}/{key}", None)
        else:
            xs.data[f"{BACKEND}/{key}"] = value
    outcome = event("offline", xs, k)
    assert outcome.exit_code == 0
    assert k.elements_of("vif4.0") == set()
    assert {e.network for e in k.set_elements if e.set == "downstream"} == {"10.137.0.6/32"}
    assert k.elements_of("vif5.0") == others


def test_offline_with_a_broken_netvm_conf_still_removes_the_vif() -> None:
    xs, k = two_vms()
    outcome = event("offline", xs, k, settings=Settings(hooks_dir="/hooks", conf_error="invalid config x"))
    assert outcome.exit_code == 0
    assert (k.elements_of("vif4.0"), k.routes_of("vif4.0"), k.link("vif4.0").group) == (set(), set(), 0)


def test_offline_of_a_vanished_link_removes_its_set_elements() -> None:
    xs, k = two_vms()
    del k.links[(None, "vif4.0")]
    k._drop_link_objects(None, "vif4.0")
    outcome = event("offline", xs, k)
    assert outcome.exit_code == 0
    assert k.elements_of("vif4.0") == set()
    assert k.elements_of("vif5.0") != set()


def test_offline_of_a_vif_that_never_came_online_changes_nothing() -> None:
    xs, k = store(ip=None, mac=None), kernel()
    add_vm(xs, 5, "10.137.0.6")
    event("online", xs, k, domid=5)
    del k.links[(None, "vif4.0")]
    before = k.state()
    outcome = event("offline", xs, k)
    assert (outcome.exit_code, outcome.changed, k.state()) == (0, (), before)


def test_offline_keeps_the_downstream_element_of_an_address_another_vif_now_routes() -> None:
    xs, k = store(), kernel()
    add_vm(xs, 5, IP)  # the same VM restarted with domid 5
    event("online", xs, k)
    event("online", xs, k, domid=5)
    event("offline", xs, k)
    assert SetElement(4, "downstream", "10.137.0.5/32") in k.set_elements
    assert k.elements_of("vif4.0") == set()


def test_offline_finds_a_renamed_vif_by_its_alias_when_vifname_is_gone() -> None:
    xs, k = store(vifname="work-vm"), kernel()
    event("online", xs, k)
    xs.data.pop(f"{BACKEND}/vifname")
    outcome = event("offline", xs, k)
    assert (outcome.exit_code, outcome.dev) == (0, "work-vm")
    assert (k.elements_of("work-vm"), k.routes_of("work-vm"), k.link("work-vm").up) == (set(), set(), False)


def test_offline_of_a_mapped_vm_removes_its_nat_namespace() -> None:
    settings = Settings(hooks_dir="/hooks", conf=parse_conf("[mapped-ip]\n10.137.0.5 = 10.138.0.2 10.138.0.1\n"))
    xs, k = store(), kernel()
    before = k.state()
    event("online", xs, k, settings=settings)
    assert event("offline", xs, k, settings=settings).exit_code == 0
    assert k.state() == before


def test_offline_refuses_a_vif_env_naming_another_device() -> None:
    xs, k = two_vms()
    k.add_link("othervm", group=2, alias="vif7.0")
    before = k.state()
    outcome = event("offline", xs, k, vif="othervm")
    assert outcome.exit_code == 1 and "'othervm'" in (outcome.error or "")
    assert k.state() == before


def test_offline_failure_is_reported_after_removing_the_rest() -> None:
    xs, k = two_vms()
    k.fail("remove", lambda t: getattr(t, "destination", None) == "10.137.0.5/32")
    outcome = event("offline", xs, k)
    assert outcome.exit_code == 1 and status(xs) == ("error", "injected remove failure")
    assert k.elements_of("vif4.0") == set()


# --- dry run and no-op commands ------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["online", "offline"])
def test_dry_run_returns_the_plan_and_changes_nothing(command: str) -> None:
    xs, k = two_vms()
    if command == "online":
        event("offline", xs, k)
    before, writes = k.state(), list(xs.writes)
    outcome = event(command, xs, k, dry_run=True)
    assert outcome.exit_code == 0 and outcome.plan is not None and outcome.plan.steps
    assert (k.state(), xs.writes, outcome.changed) == (before, writes, ())


def test_dry_run_of_bad_values_writes_no_error_to_xenstore() -> None:
    xs, k = store(mac="zz"), kernel()
    outcome = event("online", xs, k, dry_run=True)
    assert (outcome.exit_code, xs.writes) == (1, [])


@pytest.mark.parametrize("command", ["add", "remove"])
def test_add_and_remove_do_nothing(command: str) -> None:
    xs, k = store(), kernel()
    before = k.state()
    assert (event(command, xs, k).exit_code, k.state(), xs.writes) == (0, before, [])


def test_an_event_for_another_interface_type_does_nothing() -> None:
    xs, k = store(), kernel()
    ev = parse_invocation(["online", "type_if=tap"], toolstack_env())
    before = k.state()
    assert handle_event(ev, SETTINGS, k, xs, None, no_lock).exit_code == 0
    assert (k.state(), xs.writes) == (before, [])


def test_outcome_has_no_hooks_after_a_failure() -> None:
    plan_hooks = Hooks("online", "vif4.0", "vif", (), "/hooks")
    plan = Plan("online", "vif4.0", (), hooks=plan_hooks)
    changed = (Step("set", LinkState("vif4.0", True)),)
    assert Outcome(1, "vif4.0", plan, changed).hooks is None
    assert Outcome(0, "vif4.0", plan, changed).hooks == plan_hooks


@pytest.mark.parametrize(("vifname", "ok"), [("vif4.0", True), ("work-vm", True), ("vif5.0", False), ("vif4.1", False)])
def test_a_vifname_may_not_be_the_name_netback_gives_another_vif(vifname: str, ok: bool) -> None:
    from vif_hotplug.core.errors import InvalidInput
    from vif_hotplug.xenstore_env import read_backend

    xs = FakeXenStore({"backend/vif/4/0/ip": "10.137.0.5", "backend/vif/4/0/mac": "00:16:3e:5e:6c:05",
                       "backend/vif/4/0/vifname": vifname})
    if ok:
        assert read_backend(xs, "backend/vif/4/0", require=True).vifname == vifname
    else:
        with pytest.raises(InvalidInput, match="the name netback gives another vif"):
            read_backend(xs, "backend/vif/4/0", require=True)
