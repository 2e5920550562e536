"""File locks with a deadline (kernel.locks.file_lock)."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vif_hotplug.core.errors import KernelError
from vif_hotplug.kernel.locks import file_lock


@pytest.fixture
def held(tmp_path: Path) -> Iterator[str]:
    """A lock file another open file description holds (as another process would)."""
    path = str(tmp_path / "hotplug.lock")
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield path
    finally:
        os.close(fd)


def is_free(path: str) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_the_lock_is_held_inside_and_released_after(tmp_path: Path) -> None:
    path = str(tmp_path / "a.lock")
    with file_lock(path, 1.0):
        assert not is_free(path)
    assert is_free(path)


def test_the_lock_is_released_when_the_body_raises(tmp_path: Path) -> None:
    path = str(tmp_path / "a.lock")
    with pytest.raises(RuntimeError), file_lock(path, 1.0):
        raise RuntimeError("boom")
    assert is_free(path)


def test_a_missing_directory_is_created(tmp_path: Path) -> None:
    path = tmp_path / "run" / "vif-hotplug" / "a.lock"
    with file_lock(str(path), 1.0):
        assert path.exists()


def test_a_lock_held_elsewhere_times_out_naming_the_lock(held: str) -> None:
    start = time.monotonic()
    with pytest.raises(KernelError) as err, file_lock(held, 0.2, "hotplug lock"):
        pytest.fail("the lock was taken although held elsewhere")
    assert time.monotonic() - start < 2.0
    assert "hotplug lock" in str(err.value) and held in str(err.value) and "0.2s" in str(err.value)


def test_a_lock_is_taken_once_its_holder_lets_go(tmp_path: Path) -> None:
    path = str(tmp_path / "a.lock")
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.close(fd)  # the holder dies: the kernel releases its flock
    with file_lock(path, 0.2):
        pass


def test_a_lock_that_cannot_be_opened_is_a_kernel_error_naming_it(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    path = str(blocker / "a.lock")  # its directory is a regular file
    with pytest.raises(KernelError, match="cannot open xtables lock") as err, file_lock(path, 0.1, "xtables lock"):
        pass
    assert path in str(err.value)
