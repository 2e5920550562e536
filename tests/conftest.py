"""Suite-wide policy: under ``CI=true`` a skipped root/netns test is a failure."""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and "functional" in str(item.fspath):
        report.outcome = "failed"
        report.longrepr = f"functional test skipped under CI=true: {report.longrepr}"
