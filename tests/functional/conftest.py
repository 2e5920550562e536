"""Fixtures for tests that touch the kernel: each gets throw-away namespaces.

Nothing here ever runs in the host's main network namespace: commands go
through ``ip netns exec`` into namespaces the fixture created and deletes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def entry_point(name: str) -> str:
    """Absolute path of an installed console script of this package."""
    path = BIN / name
    if not path.exists():
        found = shutil.which(name)
        if found is None:
            pytest.fail(f"{name} is not installed in {BIN}: run the README's test command")
        return found
    return str(path)


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")


def require_tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
    if path is None:
        pytest.skip(f"{name} not installed")
    return path


@dataclass
class Netns:
    name: str
    env: dict[str, str] = field(default_factory=dict)

    def run(
        self, *cmd: str, check: bool = True, env: dict[str, str] | None = None, timeout: float = 60,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        full_env = dict(os.environ)
        full_env.update(self.env)
        if env:
            full_env.update(env)
        proc = subprocess.run(
            ["ip", "netns", "exec", self.name, *cmd], capture_output=True, text=True, env=full_env,
            timeout=timeout, input=input,
        )
        if check and proc.returncode != 0:
            msg = f"{' '.join(cmd)} in {self.name} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
            raise AssertionError(msg)
        return proc

    def sh(self, script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-ec", script, check=check)

    def popen(self, cmd: Sequence[str], **kw: object) -> subprocess.Popen[str]:
        return subprocess.Popen(["ip", "netns", "exec", self.name, *cmd], text=True, **kw)  # type: ignore[call-overload, no-any-return]


class NetnsFactory:
    def __init__(self) -> None:
        self.created: list[str] = []

    def __call__(self, prefix: str = "vh") -> Netns:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        self.created.append(name)
        ns = Netns(name)
        ns.run("ip", "link", "set", "lo", "up")
        return ns

    def cleanup(self) -> None:
        for name in reversed(self.created):
            subprocess.run(["ip", "netns", "pids", name], capture_output=True)
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            shutil.rmtree(f"/etc/netns/{name}", ignore_errors=True)


@pytest.fixture
def make_netns() -> Iterator[NetnsFactory]:
    """Creates namespaces on demand; all are deleted (with their processes) after the test."""
    require_root()
    factory = NetnsFactory()
    try:
        yield factory
    finally:
        factory.cleanup()


@pytest.fixture
def netns(make_netns: NetnsFactory) -> Netns:
    return make_netns()


BACKENDS = ("nftables", "iptables")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The firewall backend a test's netvm uses: every test that asks runs once per backend."""
    return str(request.param)


@pytest.fixture(params=("local", "agent"))
def with_agent(request: pytest.FixtureRequest) -> bool:
    """Whether the events go through a resident agent: the suites that ask run both ways."""
    return request.param == "agent"
