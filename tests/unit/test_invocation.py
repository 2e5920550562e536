"""How the toolstack, udev and a person call vif-route-qubes."""

from __future__ import annotations

import pytest

from vif_hotplug.errors import InvalidInput
from vif_hotplug.validation import VifId
from vif_hotplug.xenstore_env import parse_invocation

TOOLSTACK = {"XENBUS_PATH": "backend/vif/4/0", "vif": "vif4.0", "XENBUS_TYPE": "vif", "netdev": ""}


def test_toolstack_form_takes_the_vif_from_xenbus_path_and_env() -> None:
    event = parse_invocation(["online", "type_if=vif"], TOOLSTACK)
    assert (event.command, event.vif, event.dev, event.type_if, event.manual) == (
        "online", VifId(4, 0), "vif4.0", "vif", False,
    )


def test_toolstack_form_without_vif_env_derives_the_name() -> None:
    assert parse_invocation(["offline"], {"XENBUS_PATH": "backend/vif/7/1"}).dev == "vif7.1"


def test_renamed_vif_in_env_is_accepted() -> None:
    assert parse_invocation(["offline"], {**TOOLSTACK, "vif": "work-vm"}).dev == "work-vm"


def test_manual_form_derives_xenbus_path() -> None:
    event = parse_invocation(["online", "vif12.0"], {})
    assert event.xenbus_path == "backend/vif/12/0" and event.manual


def test_manual_name_wins_over_a_stray_xenbus_path() -> None:
    assert parse_invocation(["online", "vif12.0"], TOOLSTACK).vif == VifId(12, 0)


@pytest.mark.parametrize(
    ("argv", "env", "needle"),
    [
        ([], {}, "missing command"),
        (["start"], TOOLSTACK, "'start'"),
        (["online"], {}, "XENBUS_PATH"),
        (["online", "type_if=vif"], {"XENBUS_PATH": ""}, "XENBUS_PATH"),
        (["online"], {"XENBUS_PATH": "backend/vif/4/0", "vif": "vif5.0"}, "does not match"),
        (["online"], {"XENBUS_PATH": "backend/vif/4/0", "vif": "vif4.0;id"}, "vif4.0;id"),
        (["online", "type_if=$(id)"], TOOLSTACK, "type_if=$(id)"),
        (["online", "vif4.0", "vif5.0"], {}, "vif5.0"),
    ],
)
def test_bad_invocations_are_refused_naming_the_value(argv: list[str], env: dict[str, str], needle: str) -> None:
    with pytest.raises(InvalidInput, match=None) as err:
        parse_invocation(argv, env)
    assert needle in str(err.value)
