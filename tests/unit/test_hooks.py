"""The administrator's hooks (app.hooks.run_hooks), run as real scripts from a temporary directory."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from vif_hotplug.app.hooks import hook_programs, run_hooks
from vif_hotplug.core.model import Hooks


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return tmp_path / "calls.log"


@pytest.fixture
def hooks_dir(tmp_path: Path) -> Path:
    d = tmp_path / "hooks.d"
    d.mkdir()
    return d


def script(hooks_dir: Path, name: str, log: Path, body: str = "", mode: int = 0o755) -> Path:
    path = hooks_dir / name
    path.write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\n{body}\n')
    path.chmod(mode)
    return path


def calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def hooks(hooks_dir: Path, *addresses: str, command: str = "online") -> Hooks:
    return Hooks(command, "vif4.0", "vif", addresses, str(hooks_dir))


def test_each_hook_runs_once_per_address_with_command_vif_type_and_address(hooks_dir: Path, log: Path) -> None:
    script(hooks_dir, "10-a", log)
    run_hooks(hooks(hooks_dir, "10.137.0.5", "fd09::5"))
    assert calls(log) == ["10-a online vif4.0 vif 10.137.0.5", "10-a online vif4.0 vif fd09::5"]


def test_a_vm_without_addresses_runs_each_hook_once_without_an_address(hooks_dir: Path, log: Path) -> None:
    script(hooks_dir, "10-a", log)
    run_hooks(hooks(hooks_dir, command="offline"))
    assert calls(log) == ["10-a offline vif4.0 vif"]


def test_hooks_run_in_name_order(hooks_dir: Path, log: Path) -> None:
    for name in ("20-b", "10-a", "30-c"):
        script(hooks_dir, name, log)
    run_hooks(hooks(hooks_dir, "10.137.0.5"))
    assert [c.split()[0] for c in calls(log)] == ["10-a", "20-b", "30-c"]


def test_a_failing_hook_is_not_fatal_and_the_next_ones_run(hooks_dir: Path, log: Path) -> None:
    script(hooks_dir, "10-fails", log, "exit 3")
    script(hooks_dir, "20-ok", log)
    run_hooks(hooks(hooks_dir, "10.137.0.5"))
    assert [c.split()[0] for c in calls(log)] == ["10-fails", "20-ok"]


def test_a_hook_that_cannot_be_executed_is_not_fatal(hooks_dir: Path, log: Path) -> None:
    broken = hooks_dir / "10-broken"
    broken.write_text("#!/nonexistent/interpreter\n")
    broken.chmod(0o755)
    script(hooks_dir, "20-ok", log)
    run_hooks(hooks(hooks_dir, "10.137.0.5"))
    assert calls(log) == ["20-ok online vif4.0 vif 10.137.0.5"]


def test_hooks_share_one_time_budget_and_later_ones_are_skipped(hooks_dir: Path, log: Path) -> None:
    script(hooks_dir, "10-slow", log, "exec sleep 5")
    script(hooks_dir, "20-never", log)
    start = time.monotonic()
    run_hooks(hooks(hooks_dir, "10.137.0.5", "10.137.0.6"), budget=0.5)
    assert time.monotonic() - start < 3.0
    assert calls(log) == ["10-slow online vif4.0 vif 10.137.0.5"]


def test_only_executable_visible_regular_files_are_hooks(hooks_dir: Path, log: Path) -> None:
    script(hooks_dir, "10-a", log)
    script(hooks_dir, ".hidden", log)
    script(hooks_dir, "20-not-executable", log, mode=0o644)
    (hooks_dir / "30-dir").mkdir()
    assert hook_programs(str(hooks_dir)) == [str(hooks_dir / "10-a")]


def test_a_missing_hooks_directory_means_no_hooks(tmp_path: Path) -> None:
    run_hooks(hooks(tmp_path / "absent", "10.137.0.5"))
    assert hook_programs(str(tmp_path / "absent")) == []
