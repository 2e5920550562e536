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


# --- only hooks that root alone can change run ---------------------------------------------------------

needs_root = pytest.mark.skipif(__import__("os").geteuid() != 0, reason="only root owns what root alone can change")


@needs_root
def test_a_hook_others_may_write_is_skipped_with_a_warning(hooks_dir: Path, log: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    script(hooks_dir, "10-open", log, mode=0o777)
    script(hooks_dir, "20-closed", log)
    assert [Path(p).name for p in hook_programs(str(hooks_dir))] == ["20-closed"]
    assert "10-open skipped" in caplog.text


@needs_root
def test_a_hooks_directory_others_may_write_runs_nothing(hooks_dir: Path, log: Path) -> None:
    script(hooks_dir, "10-hook", log)
    hooks_dir.chmod(0o777)
    run_hooks(hooks(hooks_dir, "10.137.0.5"))
    assert calls(log) == []


@needs_root
def test_a_hook_owned_by_another_user_is_skipped(hooks_dir: Path, log: Path) -> None:
    import os

    path = script(hooks_dir, "10-theirs", log)
    os.chown(path, 65534, 65534)
    assert hook_programs(str(hooks_dir)) == []


@needs_root
def test_a_symlink_to_a_hook_root_alone_can_change_runs_and_one_to_anything_else_does_not(
    tmp_path: Path, hooks_dir: Path, log: Path,
) -> None:
    elsewhere = tmp_path / "lib"
    elsewhere.mkdir()
    good = script(elsewhere, "good", log)
    bad = script(elsewhere, "bad", log, mode=0o777)
    (hooks_dir / "10-good").symlink_to(good)
    (hooks_dir / "20-bad").symlink_to(bad)
    assert [Path(p).name for p in hook_programs(str(hooks_dir))] == ["10-good"]


def test_hooks_get_a_minimal_environment_whoever_ran_the_event(
    hooks_dir: Path, log: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SECRET", "leaked")
    monkeypatch.setenv("PATH", "/nonexistent")
    script(hooks_dir, "10-env", log, body=f'env | sort >> "{log}"')
    run_hooks(hooks(hooks_dir, "10.137.0.5"))
    seen = calls(log)
    assert "SECRET=leaked" not in seen and "vif=vif4.0" in seen
    assert any(line.startswith("PATH=/usr/sbin:") for line in seen)
