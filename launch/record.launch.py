"""Records one demonstration with ``ros2 bag record`` on the topics named in ``config/record.yaml``.

    ros2 launch openvla_ros record.launch.py episode:=pick_cup_01
    ros2 launch openvla_ros record.launch.py config:=/path/record.yaml output_dir:=/data/demos storage:=sqlite3

The bag goes to ``<output_dir>/<episode>`` (an empty ``episode`` gives ``episode_<date>_<time>``), in
mcap unless ``storage`` says otherwise. Stop with Ctrl-C; then convert with
``training/bag_to_rlds.py``, which reads the same config file.

Where ``ros2 bag`` is not installed (rosbag2 is C++; ROS 2 from PyPI wheels does not have it), the
launch fails with one message naming ``python -m openvla_ros.record``, which records the same topics
into the same kind of bag without rosbag2, and ``ros2 launch`` exits non-zero.
"""

from __future__ import annotations

import os
import shlex
import shutil
import time
from importlib.metadata import entry_points
from pathlib import Path

from launch.actions import DeclareLaunchArgument, ExecuteProcess, OpaqueFunction
from launch.substitutions import LaunchConfiguration

from launch import LaunchContext, LaunchDescription

PACKAGE = "openvla_ros"
STORAGE_PLUGINS = ("mcap", "sqlite3")
# Distributions whose `ros2 bag record` takes topics only as positional arguments; later ones take
# `--topics` (positional topics are deprecated in Kilted and gone after it).
POSITIONAL_TOPIC_DISTROS = ("foxy", "galactic", "humble", "iron")

# (name, default, description); an empty default takes the value from the config file.
LAUNCH_ARGUMENTS = (
    ("config", "", "Topics file; empty for the package's config/record.yaml."),
    ("output_dir", "", "Directory of the bags; empty for the config's record.output_dir."),
    ("episode", "", "Bag name inside output_dir; empty for episode_<date>_<time>."),
    ("storage", "", "Storage plugin, mcap or sqlite3; empty for the config's record.storage (mcap)."),
)


def record_command(config: dict, output_dir: str, episode: str, storage: str, distro: str = "") -> list[str]:
    """Returns the ``ros2 bag record`` command line for a parsed config file.

    ``distro`` is the ROS distribution (``$ROS_DISTRO``): Humble and older get the topics as positional
    arguments, newer ones after ``--topics``.

    Raises:
        ValueError: for an unknown storage plugin or a config without an image or action topic.
    """
    from openvla_ros.dataset.config import config_from_mapping

    topics = config_from_mapping(config).topics
    record = dict((config or {}).get("record") or {})
    storage = storage or record.get("storage") or "mcap"
    if storage not in STORAGE_PLUGINS:
        raise ValueError(f"storage must be one of {', '.join(STORAGE_PLUGINS)}, got {storage!r}")
    output_dir = output_dir or record.get("output_dir") or "demos"
    episode = episode or time.strftime("episode_%Y%m%d_%H%M%S")
    command = ["ros2", "bag", "record", "--storage", storage, "--output", str(Path(output_dir) / episode)]
    duration = int(record.get("max_bag_duration_s") or 0)
    if duration > 0:
        command += ["--max-bag-duration", str(duration)]
    extra = [str(topic) for topic in record.get("extra_topics") or []]
    if distro.strip().lower() not in POSITIONAL_TOPIC_DISTROS:
        command.append("--topics")
    return command + list(dict.fromkeys(topics.recorded_topics() + extra))


def missing_ros2_bag() -> str:
    """Returns why ``ros2 bag record`` cannot run here, or an empty string when it can.

    ``ros2`` finds its verbs through the ``ros2cli.command`` entry points; rosbag2's ``ros2bag`` package
    registers ``bag`` there.
    """
    if shutil.which("ros2") is None:
        return "the `ros2` command is not on PATH"
    if not any(entry.name == "bag" for entry in entry_points(group="ros2cli.command")):
        return "`ros2 bag` is not installed (rosbag2 and its ros2bag package are missing)"
    return ""


def fallback_command(arguments: dict[str, str]) -> str:
    """Returns the ``python -m openvla_ros.record`` command line that records what ``arguments`` ask for."""
    command = ["python", "-m", "openvla_ros.record"]
    for name in ("config", "output_dir", "episode", "storage"):
        value = arguments.get(name, "").strip()
        if name == "storage" and value not in STORAGE_PLUGINS:
            continue  # only what the recorder accepts (the config's storage applies instead)
        if value:
            command += ["--" + name.replace("_", "-"), value]
    return shlex.join(command)


def _make_recorder(context: LaunchContext) -> list:
    """Returns the recording process, with the launch arguments resolved in ``context``.

    Raises:
        RuntimeError: when ``ros2 bag`` is not available; the message names the recorder that needs no
            rosbag2 (``ros2 launch`` prints it and exits non-zero).
    """
    import yaml
    from ament_index_python.packages import get_package_share_directory

    def argument(name: str) -> str:
        return LaunchConfiguration(name).perform(context)

    storage = argument("storage").strip()
    if storage and storage not in STORAGE_PLUGINS:
        raise RuntimeError(f"cannot record: storage must be one of {', '.join(STORAGE_PLUGINS)}, got {storage!r}")
    problem = missing_ros2_bag()
    if problem:
        fallback = fallback_command({name: argument(name) for name, _, _ in LAUNCH_ARGUMENTS})
        raise RuntimeError(f"cannot record: {problem}. Record without rosbag2 instead: {fallback}")
    config_file = argument("config") or f"{get_package_share_directory(PACKAGE)}/config/record.yaml"
    with open(config_file) as stream:
        config = yaml.safe_load(stream) or {}
    command = record_command(config, argument("output_dir"), argument("episode"), argument("storage"),
                             os.environ.get("ROS_DISTRO", ""))
    return [ExecuteProcess(cmd=command, output="screen", sigterm_timeout="10")]


def generate_launch_description() -> LaunchDescription:
    """Returns the launch description: the declared arguments and the ``ros2 bag record`` process."""
    arguments = [
        DeclareLaunchArgument(name, default_value=default, description=description)
        for name, default, description in LAUNCH_ARGUMENTS
    ]
    return LaunchDescription([*arguments, OpaqueFunction(function=_make_recorder)])
