"""The package's layers, read from the source with ``ast``: imports point down and form no circle.

Layers: the model core (``openvla_ros.model``) imports only itself and ``openvla_ros.errors``; the
core, the dataset and fine-tuning code and the simulator never import rclpy or the ROS layer
(``openvla_ros.ros``); and no module imports, directly or through others, a module that imports it
(function-level imports included: a circle there breaks as soon as someone moves an import up).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "openvla_ros"


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Returns every module name ``path`` imports, at any level of its code (package and third-party)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names
                         if f"{node.module}.{alias.name}" in MODULES)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Returns every module ``start`` imports directly or through others."""
    seen: set[str] = set()
    frontier = list(graph[start])
    while frontier:
        current = frontier.pop()
        if current not in seen:
            seen.add(current)
            frontier.extend(graph[current])
    return seen


def test_the_model_core_imports_nothing_above_it() -> None:
    offending = {
        name: sorted(imported for imported in imports if _within(imported, "openvla_ros")
                     and not _within(imported, "openvla_ros.model") and imported != "openvla_ros.errors")
        for name, imports in GRAPH.items() if _within(name, "openvla_ros.model")
    }
    assert {name: found for name, found in offending.items() if found} == {}


def test_the_core_never_imports_rclpy_or_the_ros_layer() -> None:
    core = ("openvla_ros.model", "openvla_ros.dataset", "openvla_ros.finetune", "openvla_ros.sim",
            "openvla_ros.interrupts", "openvla_ros.errors")
    offending = {
        name: sorted(imported for imported in imports
                     if _within(imported, "rclpy") or _within(imported, "openvla_ros.ros"))
        for name, imports in GRAPH.items() if any(_within(name, package) for package in core)
    }
    assert {name: found for name, found in offending.items() if found} == {}


def test_no_module_takes_part_in_an_import_circle() -> None:
    internal = {name: {imported for imported in imports if imported in MODULES} for name, imports in GRAPH.items()}
    assert sorted(name for name in internal if name in _reachable(internal, name)) == []


def test_the_checker_sees_a_circle_and_an_upward_import(tmp_path: Path) -> None:
    """The checks above can fail: the same reading finds what a circle and an upward import look like."""
    source = tmp_path / "module.py"
    source.write_text("import os\n\ndef late():\n    from openvla_ros.pretrain import build_pretrained\n")
    assert "openvla_ros.pretrain" in _imports(source)
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert "a" in _reachable(graph, "a") and "d" not in _reachable(graph, "a")
