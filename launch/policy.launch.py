"""Launches the OpenVLA policy node with its parameter file.

    ros2 launch openvla_ros policy.launch.py model:=/path/to/checkpoint unnorm_key:=bridge_orig

The node starts from ``params_file`` (default: the package's ``config/policy.yaml``); ``model``,
``quantization``, ``unnorm_key``, the topic arguments and ``rate_hz`` override the file only when given,
and ``use_sim_time`` always applies. The node configures and activates itself (``autostart``) but publishes nothing until
``~/enable`` is called with ``true``.

    ros2 launch openvla_ros policy.launch.py model:=/path/to/oft-checkpoint rate_hz:=20 \
        wrist_image_topics:=wrist/image_raw proprio_topic:=joint_states

runs an OpenVLA-OFT checkpoint in chunk mode (one inference per chunk of K actions, one action per tick)
with one wrist camera and the joint states as proprio. ``energy_steps:=1`` adds the energy model's
correction to each chunk (a model trained with ``training/train_energy.py``).

    ros2 launch openvla_ros policy.launch.py model:=/path/to/checkpoint namespace:=robot1

runs it as ``/robot1/openvla_policy``: ``~/action``, ``~/enable`` and the other node-private names, and
topic names that do not start with ``/``, resolve under ``/robot1``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from launch import LaunchContext, LaunchDescription

PACKAGE = "openvla_ros"
NODE_NAME = "openvla_policy"

# (name, default, description); an empty default keeps the parameter file's value.
LAUNCH_ARGUMENTS = (
    ("model", "", "Checkpoint directory or hub id, or http://host:port of a policy server (remote mode); empty "
     "keeps the parameter file's value."),
    ("api_key", "", "Remote mode: the policy server's API key (else $OPENVLA_API_KEY); empty keeps the parameter "
     "file's value."),
    ("quantization", "", "none, 8bit or 4bit; empty keeps the parameter file's value."),
    ("unnorm_key", "", "Action statistics key, e.g. bridge_orig; empty keeps the parameter file's value."),
    ("image_topic", "", "Camera topic (sensor_msgs/Image), relative to the namespace unless it starts with /; "
     "empty keeps the parameter file's value."),
    ("instruction_topic", "", "Instruction topic (std_msgs/String), relative to the namespace unless it starts "
     "with /; empty keeps the parameter file's value."),
    ("rate_hz", "", "Control rate in Hz, 1 to 30 (up to 100 in chunk mode); empty keeps the file's value (5.0)."),
    ("wrist_image_topics", "", "Chunk mode: wrist camera topics, comma-separated, as many as the model takes; "
     "empty keeps the parameter file's value."),
    ("proprio_topic", "", "Chunk mode: robot state topic for models that take proprio (see proprio_type in the "
     "parameter file); empty keeps the parameter file's value."),
    ("actions_per_inference", "", "Chunk mode: actions of each chunk before the next takes over, 0 = all K; "
     "empty keeps the parameter file's value."),
    ("chunk_blend", "", "Chunk mode: none or ensemble (temporal ensembling); empty keeps the parameter file's "
     "value."),
    ("energy_steps", "", "Chunk mode: energy-model correction steps per chunk, 0 = off (needs an energy model "
     "beside the head); empty keeps the parameter file's value."),
    ("energy_step_size", "", "Chunk mode: step size of each energy correction step, in normalised action units; "
     "empty keeps the parameter file's value."),
    ("energy_max_step_fraction", "", "Chunk mode: largest correction step as a fraction of the chunk's norm; "
     "empty keeps the parameter file's value."),
    ("params_file", "", "Parameter file; empty for the package's config/policy.yaml."),
    ("namespace", "", "Namespace of the node: its outputs and services, and its inputs when their names "
     "are relative, move under it (e.g. robot1)."),
    ("log_level", "info", "Logging level: debug, info, warn or error."),
    ("use_sim_time", "false", "Take time from /clock (simulation)."),
)
OPTIONAL_OVERRIDES = (
    "model", "api_key", "quantization", "unnorm_key", "image_topic", "instruction_topic", "rate_hz", "wrist_image_topics",
    "proprio_topic", "actions_per_inference", "chunk_blend", "energy_steps", "energy_step_size",
    "energy_max_step_fraction",
)
INTEGER_ARGUMENTS = ("actions_per_inference", "energy_steps")
NUMBER_ARGUMENTS = ("energy_step_size", "energy_max_step_fraction")


def parameter_overrides(arguments: dict[str, str]) -> dict[str, object]:
    """Returns the node parameters that the resolved launch ``arguments`` set over the parameter file.

    Raises:
        ValueError: when ``rate_hz`` or ``actions_per_inference`` is given but is not a number.
    """
    overrides: dict[str, object] = {
        "use_sim_time": arguments.get("use_sim_time", "false").strip().lower() in ("true", "1", "yes"),
    }
    for name in OPTIONAL_OVERRIDES:
        value = arguments.get(name, "").strip()
        if not value:
            continue
        if name == "rate_hz":
            try:
                overrides[name] = float(value)
            except ValueError:
                raise ValueError(f"launch argument rate_hz must be a number of Hz, got {value!r}") from None
        elif name in INTEGER_ARGUMENTS:
            try:
                overrides[name] = int(value)
            except ValueError:
                raise ValueError(f"launch argument {name} must be a whole number, got {value!r}") from None
        elif name in NUMBER_ARGUMENTS:
            try:
                overrides[name] = float(value)
            except ValueError:
                raise ValueError(f"launch argument {name} must be a number, got {value!r}") from None
        elif name == "wrist_image_topics":
            overrides[name] = [topic.strip() for topic in value.split(",") if topic.strip()]
        else:
            overrides[name] = value
    return overrides


def _make_policy_node(context: LaunchContext) -> list:
    """Returns the policy node action, with the launch arguments resolved in ``context``."""
    from ament_index_python.packages import get_package_share_directory
    from launch.substitutions import LaunchConfiguration
    from launch_ros.actions import LifecycleNode

    def argument(name: str) -> str:
        return LaunchConfiguration(name).perform(context)

    params_file = argument("params_file") or f"{get_package_share_directory(PACKAGE)}/config/policy.yaml"
    overrides = parameter_overrides({name: argument(name) for name, _, _ in LAUNCH_ARGUMENTS})
    return [
        LifecycleNode(
            package=PACKAGE,
            executable="policy_node",
            name=NODE_NAME,
            namespace=argument("namespace"),
            output="screen",
            parameters=[params_file, overrides],
            ros_arguments=["--log-level", argument("log_level")],
        )
    ]


def generate_launch_description() -> LaunchDescription:
    """Returns the launch description: the declared arguments and the policy node."""
    from launch.actions import DeclareLaunchArgument, OpaqueFunction

    from launch import LaunchDescription
    arguments = [
        DeclareLaunchArgument(name, default_value=default, description=description)
        for name, default, description in LAUNCH_ARGUMENTS
    ]
    return LaunchDescription([*arguments, OpaqueFunction(function=_make_policy_node)])
