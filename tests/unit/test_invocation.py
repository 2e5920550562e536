"""How vif-route-qubes is called, and what it reads and writes in XenStore (xenstore_env)."""

from __future__ import annotations

from ipaddress import ip_network

import pytest

from tests.unit.fakes import FakeXenStore
from vif_hotplug.core.errors import InvalidInput
from vif_hotplug.core.model import VmNetwork
from vif_hotplug.core.validation import VifId
from vif_hotplug.xenstore_env import (
    BackendConfig,
    parse_invocation,
    read_backend,
    report_connected,
    report_error,
)

TOOLSTACK = {"XENBUS_PATH": "backend/vif/4/0", "vif": "vif4.0", "XENBUS_TYPE": "vif", "netdev": ""}
PATH = "backend/vif/4/0"
MAC = "00:16:3e:5e:6c:00"


# --- parse_invocation ------------------------------------------------------------------------


def test_toolstack_form_takes_the_vif_from_xenbus_path_and_env() -> None:
    event = parse_invocation(["online", "type_if=vif"], TOOLSTACK)
    assert (event.command, event.vif, event.dev, event.type_if, event.xenbus_path) == (
        "online", VifId(4, 0), "vif4.0", "vif", PATH,
    )


def test_toolstack_form_without_vif_env_derives_the_name() -> None:
    assert parse_invocation(["offline"], {"XENBUS_PATH": "backend/vif/7/1"}).dev == "vif7.1"


def test_toolstack_form_accepts_an_absolute_xenbus_path() -> None:
    env = {"XENBUS_PATH": "/local/domain/0/backend/vif/7/1"}
    assert parse_invocation(["offline"], env).xenbus_path == "backend/vif/7/1"


def test_renamed_vif_in_env_is_accepted() -> None:
    assert parse_invocation(["offline"], {**TOOLSTACK, "vif": "work-vm"}).dev == "work-vm"


def test_manual_form_derives_xenbus_path() -> None:
    event = parse_invocation(["online", "vif12.0"], {})
    assert (event.xenbus_path, event.dev) == ("backend/vif/12/0", "vif12.0")


def test_manual_name_wins_over_a_stray_xenbus_path() -> None:
    assert parse_invocation(["online", "vif12.0"], TOOLSTACK).vif == VifId(12, 0)


def test_type_if_defaults_to_vif() -> None:
    assert parse_invocation(["add"], TOOLSTACK).type_if == "vif"


def test_key_value_arguments_are_kept_as_options() -> None:
    event = parse_invocation(["online", "type_if=tap", "script=/etc/xen/scripts/vif-route-qubes"], TOOLSTACK)
    assert (event.type_if, dict(event.options)["script"]) == ("tap", "/etc/xen/scripts/vif-route-qubes")


@pytest.mark.parametrize(
    ("argv", "env", "needle"),
    [
        ([], {}, "missing command"),
        (["start"], TOOLSTACK, "'start'"),
        (["online"], {}, "XENBUS_PATH"),
        (["online", "type_if=vif"], {"XENBUS_PATH": ""}, "XENBUS_PATH"),
        (["online"], {"XENBUS_PATH": "backend/vif/4/0", "vif": "vif5.0"}, "does not match"),
        (["online"], {"XENBUS_PATH": "backend/vif/4/0", "vif": "vif4.0;id"}, "vif4.0;id"),
        (["online"], {"XENBUS_PATH": "backend/vbd/4/0"}, "backend/vbd/4/0"),
        (["online", "type_if=$(id)"], TOOLSTACK, "type_if=$(id)"),
        (["online", "=vif"], TOOLSTACK, "=vif"),
        (["online", "vif4.0", "vif5.0"], {}, "vif5.0"),
        (["online", "vif04.0"], {}, "vif04.0"),
    ],
    ids=["no command", "unknown command", "no xenbus path", "empty xenbus path", "vif of another domain",
         "vif with shell", "not a vif path", "option with shell", "option without key", "two names",
         "leading zero"],
)
def test_bad_invocations_are_refused_naming_the_value(argv: list[str], env: dict[str, str], needle: str) -> None:
    with pytest.raises(InvalidInput) as err:
        parse_invocation(argv, env)
    assert needle in str(err.value) and "\n" not in str(err.value)


# --- read_backend --------------------------------------------------------------------------------


def backend(**values: str) -> FakeXenStore:
    return FakeXenStore({f"{PATH}/{k}": v for k, v in values.items()})


def test_backend_gives_addresses_mac_type_and_vifname() -> None:
    xs = backend(ip="10.137.0.5 fd09::5", mac="00:16:3E:5E:6C:00", type="ioemu", vifname="work-vm")
    assert read_backend(xs, PATH, require=True) == BackendConfig(
        VmNetwork((ip_network("10.137.0.5/32"), ip_network("fd09::5/128")), MAC, "ioemu"), "work-vm",
    )


@pytest.mark.parametrize("values", [{"ip": ""}, {}], ids=["empty ip", "missing ip"])
def test_online_of_a_vm_without_ip_is_a_vm_without_addresses(values: dict[str, str]) -> None:
    config = read_backend(backend(mac=MAC, **values), PATH, require=True)
    assert config.vm == VmNetwork((), MAC)


@pytest.mark.parametrize("values", [{"ip": ""}, {}, {"ip": "  "}], ids=["empty ip", "missing ip", "blank ip"])
def test_offline_without_ip_has_no_vm(values: dict[str, str]) -> None:
    assert read_backend(backend(mac=MAC, **values), PATH, require=False).vm is None


def test_offline_without_mac_still_has_the_addresses() -> None:
    config = read_backend(backend(ip="10.137.0.5"), PATH, require=False)
    assert config.vm is not None and config.vm.networks == (ip_network("10.137.0.5/32"),)


def test_empty_vifname_is_no_vifname() -> None:
    assert read_backend(backend(ip="10.137.0.5", mac=MAC, vifname=""), PATH, require=True).vifname is None


BAD_BACKEND = [
    ("online without mac", {"ip": "10.137.0.5"}, True, "mac"),
    ("bad mac", {"ip": "10.137.0.5", "mac": "00:16:3e"}, True, "00:16:3e"),
    ("multicast mac", {"ip": "10.137.0.5", "mac": "01:00:5e:00:00:01"}, True, "multicast"),
    ("bad ip online", {"ip": "10.137.0.5/24", "mac": MAC}, True, "10.137.0.5/24"),
    ("bad ip offline", {"ip": "nonsense", "mac": MAC}, False, "nonsense"),
    ("bad mac offline", {"ip": "10.137.0.5", "mac": "zz"}, False, "zz"),
    ("bad vifname", {"ip": "10.137.0.5", "mac": MAC, "vifname": "x;y"}, True, "x;y"),
    ("bad vifname offline", {"vifname": "-rf"}, False, "-rf"),
    ("bad type", {"ip": "10.137.0.5", "mac": MAC, "type": "Vif Type"}, True, "Vif Type"),
]


@pytest.mark.parametrize(("values", "require", "needle"), [pytest.param(*r[1:], id=r[0]) for r in BAD_BACKEND])
def test_bad_backend_values_are_named(values: dict[str, str], require: bool, needle: str) -> None:
    with pytest.raises(InvalidInput) as err:
        read_backend(backend(**values), PATH, require=require)
    assert needle in str(err.value) and "\n" not in str(err.value)


# --- reporting ---------------------------------------------------------------------------------------


def test_success_is_reported_as_connected() -> None:
    xs = FakeXenStore()
    report_connected(xs, PATH)
    assert xs.writes == [(f"{PATH}/hotplug-status", "connected")]


def test_failure_writes_the_error_before_the_status_the_toolstack_waits_on() -> None:
    xs = FakeXenStore()
    report_error(xs, PATH, "invalid MAC 'zz'")
    assert xs.writes == [(f"{PATH}/hotplug-error", "invalid MAC 'zz'"), (f"{PATH}/hotplug-status", "error")]
