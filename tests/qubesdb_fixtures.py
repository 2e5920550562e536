"""Fixtures of the QubesDB tests: a stand-in daemon, the stand-in module on it, a cache, the fake qubesdb-read.

Import the ``*_fixture`` functions into a test module to use the fixtures
by their names (``daemon``, ``module``, ``cache``, ``qubesdb_read``).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.qubesdb_daemon import StandinQubesDB, forget_standin, import_standin, tools_dir
from vif_hotplug.xen.qubesdb import QubesDBCache

#: A Qubes netvm's QubesDB, as these tests start from it (with keys this package does not read).
NETVM_DB = {
    "/qubes-netvm-gateway": "10.137.0.1",
    "/qubes-netvm-gateway6": "fd09:24ef:4179::a89:1",
    "/qubes-netvm-primary-dns": "10.139.1.1",
    "/qubes-netvm-secondary-dns": "10.139.1.2",
    "/qubes-netvm-network": "10.137.0.0",
    "/qubes-ip": "10.138.0.9",
    "/connected-ips": "10.137.0.5 10.137.0.6",
    "/connected-ips6": "fd09:24ef:4179::a89:5",
    "/mapped-ip/10.137.0.50/visible-ip": "10.138.0.2",
    "/mapped-ip/10.137.0.50/visible-gateway": "10.138.0.1",
    "/qubes-service/harden-network-interfaces": "1",
    "/name": "sys-net",
    "/qubes-firewall/10.137.0.5/policy": "drop",
}
GATEWAY = "/qubes-netvm-gateway"
CONNECTED = "/connected-ips"
#: Long enough for any answer here, short enough for a test that waits it out.
TIMEOUT = 1.0


@pytest.fixture(name="daemon")
def daemon_fixture() -> Iterator[StandinQubesDB]:
    # A short directory: Unix socket paths are limited to 108 bytes.
    where = tempfile.mkdtemp(prefix="qdb")
    d = StandinQubesDB(f"{where}/qubesdb.sock", dict(NETVM_DB)).start()
    try:
        yield d
    finally:
        d.stop()
        shutil.rmtree(where, ignore_errors=True)


@pytest.fixture(name="module")
def module_fixture(daemon: StandinQubesDB) -> Iterator[ModuleType]:
    """The stand-in module in strict mode: a call from a thread where SIGTERM is not blocked fails."""
    m = import_standin(daemon.path, strict=True)
    try:
        yield m
    finally:
        forget_standin()


@pytest.fixture(name="cache")
def cache_fixture(module: ModuleType) -> Iterator[QubesDBCache]:
    c = QubesDBCache(module, timeout=TIMEOUT)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(name="qubesdb_read")
def qubesdb_read_fixture(daemon: StandinQubesDB, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The fake qubesdb-read, talking to the same daemon (it finds it through its environment)."""
    monkeypatch.setenv("QUBESDB_STANDIN_SOCKET", daemon.path)
    return str(tools_dir(tmp_path / "tools") / "qubesdb-read")
