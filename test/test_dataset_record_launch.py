"""The recording launch file: its command line from record.yaml, and the real launch build where available."""

from __future__ import annotations

import ast
import importlib.util
import shutil
from pathlib import Path
from types import SimpleNamespace

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


def _launch_module():
    """Returns the launch file as a module; skips where the ROS 2 ``launch`` package is not installed."""
    pytest.importorskip("launch.actions")  # the repo's launch/ folder alone is not the package
    spec = importlib.util.spec_from_file_location("record_launch", LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_launch_description_builds_where_launch_is_installed() -> None:
    description = _launch_module().generate_launch_description()
    declared = [entity.name for entity in description.entities if hasattr(entity, "default_value")]
    assert declared == ["config", "output_dir", "episode", "storage"]


def test_without_ros2_bag_the_launch_fails_naming_the_recorder_that_needs_no_rosbag2(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = _launch_module()
    from launch.actions import ExecuteProcess

    from launch import LaunchContext

    context = LaunchContext()
    context.launch_configurations.update(config=str(RECORD_YAML), output_dir="/data/my demos", episode="ep_01",
                                         storage="")
    monkeypatch.setattr(shutil, "which", lambda name: f"/opt/ros/bin/{name}")
    monkeypatch.setattr(module, "entry_points", lambda group: [SimpleNamespace(name="topic")])
    assert "`ros2 bag` is not installed" in module.missing_ros2_bag()
    with pytest.raises(RuntimeError) as raised:
        module._make_recorder(context)
    assert str(raised.value).endswith(f"Record without rosbag2 instead: python -m openvla_ros.record --config "
                                      f"{RECORD_YAML} --output-dir '/data/my demos' --episode ep_01")

    context.launch_configurations.update(storage="rosbag1")
    with pytest.raises(RuntimeError) as raised:
        module._make_recorder(context)
    assert str(raised.value) == "cannot record: storage must be one of mcap, sqlite3, got 'rosbag1'"
    assert "--storage" not in module.fallback_command({"output_dir": "/d", "storage": "rosbag1"})
    assert module.fallback_command({"output_dir": "/d", "storage": "sqlite3"}).endswith("--storage sqlite3")
    context.launch_configurations.update(storage="")

    monkeypatch.setattr(module, "entry_points", lambda group: [SimpleNamespace(name="bag")])
    assert module.missing_ros2_bag() == ""
    (process,) = module._make_recorder(context)
    assert isinstance(process, ExecuteProcess)

    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert module.missing_ros2_bag() == "the `ros2` command is not on PATH"
