"""Package layout: what colcon installs, the core/ROS boundary, and the supported Python versions."""

from __future__ import annotations

import ast
import glob
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROS_MODULES = {"rclpy", "sensor_msgs", "std_msgs", "geometry_msgs", "std_srvs", "diagnostic_msgs",
               "lifecycle_msgs", "rcl_interfaces", "builtin_interfaces", "launch", "launch_ros"}
# The ROS layer: only openvla_ros/ros/, the pipeline app and these top-level orchestrators may import ROS
# client libraries or messages.
ROS_LAYER = {"demo.py"}
ROS_FOLDERS = {"ros", "pipeline"}


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_core_and_training_never_import_ros() -> None:
    checked = 0
    for path in sorted((REPO / "openvla_ros").rglob("*.py")) + sorted((REPO / "training").glob("*.py")):
        if path.parent == REPO / "openvla_ros" and path.name in ROS_LAYER:
            continue
        if path.parent.parent == REPO / "openvla_ros" and path.parent.name in ROS_FOLDERS:
            continue
        ros = _imported_modules(path) & ROS_MODULES
        assert not ros, f"{path.relative_to(REPO)} imports {sorted(ros)}: the core must stay free of ROS"
        checked += 1
    assert checked >= 15


def test_model_core_never_imports_the_ros_layer() -> None:
    for path in sorted((REPO / "openvla_ros" / "model").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("openvla_ros.ros"), f"{path.name} imports {node.module}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("openvla_ros.ros"), f"{path.name} imports {alias.name}"


def test_training_scripts_do_not_import_the_node() -> None:
    for path in (REPO / "training").glob("*.py"):
        source = path.read_text()
        assert "policy_node" not in source, f"{path.name} imports the ROS node"


def test_setup_installs_what_ros2_run_and_launch_look_for() -> None:
    setup = (REPO / "setup.py").read_text()
    assert "share/ament_index/resource_index/packages" in setup and (REPO / "resource" / "openvla_ros").is_file()
    for folder, pattern in (("launch", "*.launch.py"), ("config", "*.yaml")):
        assert glob.glob(str(REPO / folder / pattern)), f"nothing to install in {folder}/"
        assert f'glob("{folder}/{pattern}")' in setup
    for script in ("policy_node = openvla_ros.ros.policy_node:main", "sim_scene = openvla_ros.ros.sim_scene_node:main"):
        assert script in setup
    cfg = (REPO / "setup.cfg").read_text()
    assert "install_scripts=$base/lib/openvla_ros" in cfg and "script_dir=$base/lib/openvla_ros" in cfg


def test_package_xml_is_format_3_ament_python_with_the_ros_dependencies_used() -> None:
    root = ElementTree.parse(REPO / "package.xml").getroot()
    assert root.get("format") == "3" and root.findtext("name") == "openvla_ros"
    assert root.find("export/build_type").text == "ament_python"
    declared = {element.text for element in root if element.tag.endswith("depend")}
    used = set()
    for path in (REPO / "openvla_ros").rglob("*.py"):
        used |= _imported_modules(path) & ROS_MODULES
    for path in (REPO / "launch").glob("*.py"):
        used |= _imported_modules(path) & ROS_MODULES
    assert used - declared == set(), f"imported but not declared in package.xml: {sorted(used - declared)}"


@pytest.mark.parametrize("version", ["3.10", "3.12"])
def test_sources_compile_on_other_supported_pythons(version: str, tmp_path: Path) -> None:
    candidates = [shutil.which(f"python{version}"),
                  *sorted(glob.glob(str(Path.home() / f".pyenv/versions/{version}.*/bin/python{version}")))]
    working = [c for c in candidates if c and subprocess.run([c, "--version"], capture_output=True).returncode == 0]
    if not working:
        pytest.skip(f"python{version} is not installed on this machine")
    interpreter = working[0]
    sources = [str(p) for folder in ("openvla_ros", "training", "benchmarks", "launch", "test")
               for p in (REPO / folder).rglob("*.py")]
    script = ("import sys, py_compile\n"
              "for path in sys.argv[1:]:\n"
              f"    py_compile.compile(path, cfile={str(tmp_path)!r} + '/x.pyc', doraise=True)\n")
    result = subprocess.run([interpreter, "-c", script, *sources], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sys.version_info >= (3, 10)
