"""pytest plugin of ``run.sh``: the QubesDB fixtures with Qubes' real module and qubesdb-read.

The fixtures of ``tests/qubesdb_fixtures.py`` look these names up when they
run: the daemon moves to the real library's fixed socket path
(``QDB_DAEMON_LOCAL_PATH``), the module is the one built in
``$QUBESDB_REAL_BUILD``, and the tools directory holds the real qubesdb-read.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

import tests.qubesdb_fixtures as fixtures
from tests.qubesdb_daemon import StandinQubesDB

REAL_SOCKET = "/var/run/qubes/qubesdb.sock"
BUILD = Path(os.environ["QUBESDB_REAL_BUILD"])


class AtTheRealPath(StandinQubesDB):
    def __init__(self, path: str, entries: dict[str, str | bytes] | None = None) -> None:
        super().__init__(REAL_SOCKET, entries)


def real_module(socket_path: str, strict: bool = False) -> ModuleType:
    sys.modules.pop("qubesdb", None)
    [so] = BUILD.glob("qubesdb.*.so")
    spec = importlib.util.spec_from_file_location("qubesdb", so)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["qubesdb"] = module
    module.VIOLATIONS = []  # type: ignore[attr-defined] - the library reports nothing: a violation aborts it
    return module


def real_tools(where: Path) -> Path:
    where.mkdir(mode=0o755, parents=True, exist_ok=True)
    shutil.copy(BUILD / "qubesdb-read", where / "qubesdb-read")
    return where


fixtures.StandinQubesDB = AtTheRealPath  # type: ignore[misc]
fixtures.import_standin = real_module
fixtures.tools_dir = real_tools
