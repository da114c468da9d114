"""The recording launch file: its command line from record.yaml, and the real launch build where available."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
LAUNCH_FILE = REPO / "launch" / "record.launch.py"
RECORD_YAML = REPO / "config" / "record.yaml"


def _record_command_function():
    """Returns ``record_command`` compiled from the launch file alone (``launch`` may not be importable)."""
    tree = ast.parse(LAUNCH_FILE.read_text())
    keep = [node for node in tree.body
            if isinstance(node, ast.FunctionDef) and node.name == "record_command" or isinstance(node, ast.Assign)]
    module = ast.Module(body=[*ast.parse("import os\nimport time\nfrom pathlib import Path").body, *keep],
                        type_ignores=[])
    namespace: dict = {}
    exec(compile(module, str(LAUNCH_FILE), "exec"), namespace)
    return namespace["record_command"]


def test_launch_file_follows_ros2_conventions() -> None:
    tree = ast.parse(LAUNCH_FILE.read_text())
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert "generate_launch_description" in functions
    arguments = next(node for node in tree.body if isinstance(node, ast.Assign)
                     and getattr(node.targets[0], "id", "") == "LAUNCH_ARGUMENTS")
    names = [element.elts[0].value for element in arguments.value.elts]
    assert names == ["config", "output_dir", "episode", "storage"]


def test_record_command_from_the_shared_config() -> None:
    record_command = _record_command_function()
    config = yaml.safe_load(RECORD_YAML.read_text())
    command = record_command(config, "/data/demos", "pick_cup_01", "", "kilted")
    assert command[:7] == ["ros2", "bag", "record", "--storage", "mcap", "--output", "/data/demos/pick_cup_01"]
    topics = ["/camera/image_raw", "/teleop/action", "/joint_states", "/instruction"]
    assert command[7:] == ["--topics", *topics], "Kilted deprecates positional topics; later distros drop them"
    assert record_command(config, "/data/demos", "pick_cup_01", "", "humble")[7:] == topics, "Humble has no --topics"
    assert record_command(config, "/data/demos", "pick_cup_01", "", "")[7] == "--topics"
    config["record"].update(max_bag_duration_s=60, extra_topics=["/tf", "/instruction"])
    command = record_command(config, "", "ep", "sqlite3")
    assert command[3:7] == ["--storage", "sqlite3", "--output", "demos/ep"]
    assert command[7:10] == ["--max-bag-duration", "60", "--topics"] and command[-1] == "/tf"
    assert command.count("/instruction") == 1
    assert record_command(config, "", "", "")[6].startswith("demos/episode_")
    with pytest.raises(ValueError, match="storage must be one of mcap, sqlite3"):
        record_command(config, "", "ep", "rosbag1")


def test_launch_description_builds_where_launch_is_installed() -> None:
    pytest.importorskip("launch.actions")  # the repo's launch/ folder alone is not the package
    spec = importlib.util.spec_from_file_location("record_launch", LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    description = module.generate_launch_description()
    declared = [entity.name for entity in description.entities if hasattr(entity, "default_value")]
    assert declared == ["config", "output_dir", "episode", "storage"]
