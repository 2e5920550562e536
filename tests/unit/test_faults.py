"""Test-only fault injection (app.faults): only a root-owned file arms it, never a caller's environment.

The hook would SIGKILL this process: ``os.kill`` is replaced, never called for real.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from vif_hotplug.app import faults
from vif_hotplug.app.faults import fault_hook
from vif_hotplug.app.settings import Settings, settings_from_env
from vif_hotplug.core.model import LinkState, Step

STEP = Step("set", LinkState("vif4.0", True))
SETTINGS = Settings(state_dir="/tmp/netvm-a/state")
LOCAL = SimpleNamespace(role="local")
AGENT = SimpleNamespace(role="agent")


@pytest.fixture
def kills(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    seen: list[tuple[int, int]] = []
    monkeypatch.setattr(faults.os, "kill", lambda pid, sig: seen.append((pid, sig)))
    return seen


def _file(tmp_path: Path, *specs: dict[str, Any] | str, mode: int = 0o600) -> str:
    path = tmp_path / "faults.json"
    path.write_text("".join((s if isinstance(s, str) else json.dumps(s)) + "\n" for s in specs))
    path.chmod(mode)
    return str(path)


def _spec(**kw: Any) -> dict[str, Any]:
    return {"state_dir": SETTINGS.state_dir, "command": "online", "when": "after", "index": 2, **kw}


def test_the_hook_kills_this_process_with_sigkill_at_the_named_point(
    tmp_path: Path, kills: list[tuple[int, int]],
) -> None:
    hook = fault_hook(SETTINGS, "online", LOCAL, _file(tmp_path, _spec()))  # type: ignore[arg-type]
    assert hook is not None
    hook("after", 2, STEP)
    assert kills == [(os.getpid(), signal.SIGKILL)]


@pytest.mark.parametrize(("at", "index"), [("before", 2), ("after", 1), ("after", 3)])
def test_the_hook_does_nothing_anywhere_else(tmp_path: Path, kills: list[tuple[int, int]], at: str, index: int) -> None:
    hook = fault_hook(SETTINGS, "online", LOCAL, _file(tmp_path, _spec()))  # type: ignore[arg-type]
    assert hook is not None
    hook(at, index, STEP)
    assert kills == []


def test_an_agent_spec_arms_the_hook_in_the_agent_only(tmp_path: Path) -> None:
    path = _file(tmp_path, _spec(where="agent"))
    assert fault_hook(SETTINGS, "online", AGENT, path) is not None  # type: ignore[arg-type]
    assert fault_hook(SETTINGS, "online", LOCAL, path) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("spec", [
    _spec(command="offline"), _spec(state_dir="/tmp/netvm-b/state"), _spec(when="during"), _spec(index="2"),
    _spec(where="agent"), "not json", "[1, 2]",
], ids=["other command", "other netvm", "bad when", "bad index", "agent only", "garbage", "not an object"])
def test_a_spec_for_another_netvm_process_or_command_or_malformed_arms_nothing(
    tmp_path: Path, spec: dict[str, Any] | str,
) -> None:
    assert fault_hook(SETTINGS, "online", LOCAL, _file(tmp_path, spec)) is None  # type: ignore[arg-type]


def test_a_file_writable_by_others_arms_nothing(tmp_path: Path) -> None:
    path = _file(tmp_path, _spec(), mode=0o622)
    assert fault_hook(SETTINGS, "online", LOCAL, path) is None  # type: ignore[arg-type]


def test_a_symlinked_file_arms_nothing(tmp_path: Path) -> None:
    real = _file(tmp_path, _spec())
    link = tmp_path / "link.json"
    link.symlink_to(real)
    assert fault_hook(SETTINGS, "online", LOCAL, str(link)) is None  # type: ignore[arg-type]


def test_no_file_no_fault() -> None:
    assert fault_hook(SETTINGS, "online", LOCAL, "/nonexistent/faults.json") is None  # type: ignore[arg-type]


def test_the_environment_cannot_ask_for_a_fault(tmp_path: Path) -> None:
    settings = settings_from_env({"VIF_HOTPLUG_FAULT": "online:before:3", "VIF_HOTPLUG_STATE_DIR": str(tmp_path)})
    assert fault_hook(settings, "online", LOCAL) is None  # type: ignore[arg-type]
    assert not hasattr(settings, "fault")
