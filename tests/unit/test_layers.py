"""The package's layers: dependencies point down only, no cycles, and the runtime never needs the lab.

Read from the source (every ``import``, at module level or inside a
function), not from what happens to be loaded: a lazy import is still a
dependency.
"""

from __future__ import annotations

import ast
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "vif_hotplug"

#: What each layer may import of the package (its own layer always).
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "kernel": {"core"},
    "xen": {"core"},
    "xenstore_env": {"core", "xen"},
    "registry": set(),
    "app": {"core", "kernel", "xen", "xenstore_env"},
    "agent": {"core", "app", "kernel", "xen", "xenstore_env", "registry", "entry"},
    "entry": {"core", "app", "kernel", "xen", "xenstore_env", "registry", "agent", "entry"},
    "lab": {"core", "app", "kernel", "xen", "xenstore_env", "registry", "agent", "entry"},
}
ENTRY_POINTS = {"cli", "vif_route", "setup_dnat_to_ns"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    top = parts[1]
    if top in ENTRY_POINTS:
        return "entry"
    return top


def _imports(path: Path) -> set[str]:
    """Every module of the package ``path`` imports (resolved, relative imports included)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("vif_hotplug")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("vif_hotplug"):
                continue
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found = (PACKAGE.parent / candidate.replace(".", "/")).with_suffix(".py").exists() or (
                    PACKAGE.parent / candidate.replace(".", "/") / "__init__.py").exists()
                out.add(candidate if found else target)
    return out


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def test_every_layer_imports_only_the_layers_below_it() -> None:
    wrong = []
    for module, targets in _graph().items():
        layer = _layer(module)
        for target in targets:
            other = _layer(target)
            if other in ("package", layer):
                continue
            if other not in ALLOWED.get(layer, set()):
                wrong.append(f"{module} ({layer}) imports {target} ({other})")
    assert wrong == []


def test_no_module_depends_on_itself_through_others() -> None:
    graph = _graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert [" -> ".join(c) for c in cycles] == []


def _without_lab(tmp_path: Path) -> dict[str, str]:
    """A copy of the package without its lab, as the runtime package installs it, and the
    environment of an interpreter that sees that copy (no editable install's finder: ``-S``)."""
    copy = tmp_path / "vif_hotplug"
    subprocess.run(["cp", "-r", str(PACKAGE), str(copy)], check=True)
    subprocess.run(["rm", "-r", str(copy / "lab")], check=True)
    path = os.pathsep.join([str(tmp_path), *site.getsitepackages()])
    return {**os.environ, "PYTHONPATH": path, "VIF_HOTPLUG_AGENT": "off"}


def _runtime_modules() -> list[str]:
    return sorted(m for m in _graph() if _layer(m) not in ("lab",) and m != "vif_hotplug")


def test_every_runtime_module_imports_with_the_lab_removed(tmp_path: Path) -> None:
    env = _without_lab(tmp_path)
    code = (
        "import importlib, sys\n"
        f"for name in {_runtime_modules()!r}:\n"
        "    importlib.import_module(name)\n"
        "assert not any(m.startswith('vif_hotplug.lab') for m in sys.modules), sorted(sys.modules)\n"
        f"assert sys.modules['vif_hotplug'].__file__.startswith({str(tmp_path)!r})\n"
    )
    proc = subprocess.run([sys.executable, "-S", "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("command", ["lab", "xenstored"])
def test_a_lab_command_without_the_lab_says_so_in_one_line(tmp_path: Path, command: str) -> None:
    env = _without_lab(tmp_path)
    proc = subprocess.run([sys.executable, "-S", "-m", "vif_hotplug.cli", command, "--help"], env=env,
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "vif-hotplug-lab" in proc.stderr
