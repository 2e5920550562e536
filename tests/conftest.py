"""Suite-wide policy: under ``CI=true`` a skipped root/netns test (tests/functional) or
system test (tests/system: the Debian packages booted under systemd) is a failure."""

from __future__ import annotations

import os
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"
TESTS = Path(__file__).resolve().parent
#: Directories under tests/ whose tests must run in CI.
NEVER_SKIPPED_IN_CI = ("functional", "system")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    under = item.path.relative_to(TESTS).parts if item.path.is_relative_to(TESTS) else ()
    suite = under[0] if under and under[0] in NEVER_SKIPPED_IN_CI else None
    if IN_CI and report.skipped and suite is not None:
        report.outcome = "failed"
        report.longrepr = f"{suite} test skipped under CI=true: {report.longrepr}"
