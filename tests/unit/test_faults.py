"""Test-only fault injection (app.faults): which specs arm a hook, and where it fires.

The hook would SIGKILL this process: ``os.kill`` is replaced, never called for real.
"""

from __future__ import annotations

import os
import signal

import pytest

from vif_hotplug.app import faults
from vif_hotplug.app.faults import fault_hook
from vif_hotplug.core.model import LinkState, Step

STEP = Step("set", LinkState("vif4.0", True))


@pytest.fixture
def kills(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    seen: list[tuple[int, int]] = []
    monkeypatch.setattr(faults.os, "kill", lambda pid, sig: seen.append((pid, sig)))
    return seen


def test_the_hook_kills_this_process_with_sigkill_at_the_named_point(kills: list[tuple[int, int]]) -> None:
    hook = fault_hook("online:after:2", "online", in_agent=False)
    assert hook is not None
    hook("after", 2, STEP)
    assert kills == [(os.getpid(), signal.SIGKILL)]


@pytest.mark.parametrize(("at", "index"), [("before", 2), ("after", 1), ("after", 3)])
def test_the_hook_does_nothing_anywhere_else(kills: list[tuple[int, int]], at: str, index: int) -> None:
    hook = fault_hook("online:after:2", "online", in_agent=False)
    assert hook is not None
    hook(at, index, STEP)
    assert kills == []


def test_an_agent_spec_arms_the_hook_in_the_agent(kills: list[tuple[int, int]]) -> None:
    hook = fault_hook("agent:offline:before:0", "offline", in_agent=True)
    assert hook is not None
    hook("before", 0, STEP)
    assert kills == [(os.getpid(), signal.SIGKILL)]


@pytest.mark.parametrize(
    ("spec", "command", "in_agent"),
    [
        ("agent:online:before:1", "online", False),
        ("online:before:1", "online", True),
        ("online:before:1", "offline", False),
        ("init:before:1", "online", False),
    ],
    ids=["agent spec outside the agent", "plain spec inside the agent", "other command", "init spec in online"],
)
def test_a_spec_for_another_process_or_command_arms_nothing(spec: str, command: str, in_agent: bool) -> None:
    assert fault_hook(spec, command, in_agent) is None


@pytest.mark.parametrize(
    "spec",
    [None, "", "online", "online:before", "online:during:1", "online:before:x", "online:before:1:2",
     "agent:", "agent:online:before", ":::", "online:before:1.5"],
)
def test_a_malformed_spec_is_ignored(spec: str | None) -> None:
    assert fault_hook(spec, "online", in_agent=False) is None
