"""Launches the OpenVLA policy node with its parameter file.

    ros2 launch openvla_ros policy.launch.py model:=/path/to/checkpoint unnorm_key:=bridge_orig

The node starts from ``params_file`` (default: the package's ``config/policy.yaml``); the topic, rate
and time arguments always apply, and ``model``, ``quantization`` and ``unnorm_key`` override the file
only when given. The node configures and activates itself (``autostart``) but publishes nothing until
``~/enable`` is called with ``true``.
"""

from __future__ import annotations

from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration

from launch import LaunchContext, LaunchDescription

PACKAGE = "openvla_ros"
NODE_NAME = "openvla_policy"

# (name, default, description); for the model arguments an empty default keeps the file's value.
LAUNCH_ARGUMENTS = (
    ("model", "", "Checkpoint directory or hub id; empty keeps the parameter file's value."),
    ("quantization", "", "none, 8bit or 4bit; empty keeps the parameter file's value."),
    ("unnorm_key", "", "Action statistics key, e.g. bridge_orig; empty keeps the parameter file's value."),
    ("image_topic", "/camera/image_raw", "Camera topic (sensor_msgs/Image)."),
    ("instruction_topic", "/instruction", "Instruction topic (std_msgs/String)."),
    ("rate_hz", "5.0", "Control rate in Hz, 1.0 to 30.0."),
    ("params_file", "", "Parameter file; empty for the package's config/policy.yaml."),
    ("namespace", "", "Namespace of the node."),
    ("log_level", "info", "Logging level: debug, info, warn or error."),
    ("use_sim_time", "false", "Take time from /clock (simulation)."),
)
OPTIONAL_OVERRIDES = ("model", "quantization", "unnorm_key")


def _make_policy_node(context: LaunchContext) -> list:
    """Returns the policy node action, with the launch arguments resolved in ``context``."""
    from ament_index_python.packages import get_package_share_directory
    from launch_ros.actions import LifecycleNode

    def argument(name: str) -> str:
        return LaunchConfiguration(name).perform(context)

    params_file = argument("params_file") or f"{get_package_share_directory(PACKAGE)}/config/policy.yaml"
    overrides: dict[str, object] = {
        "image_topic": argument("image_topic"),
        "instruction_topic": argument("instruction_topic"),
        "rate_hz": float(argument("rate_hz")),
        "use_sim_time": argument("use_sim_time").strip().lower() in ("true", "1", "yes"),
    }
    for name in OPTIONAL_OVERRIDES:
        if argument(name):
            overrides[name] = argument(name)
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
    arguments = [
        DeclareLaunchArgument(name, default_value=default, description=description)
        for name, default, description in LAUNCH_ARGUMENTS
    ]
    return LaunchDescription([*arguments, OpaqueFunction(function=_make_policy_node)])
