"""Demonstration datasets: rosbag2 recordings -> RLDS, without ROS (rosbags + tensorflow-datasets).

Modules: ``config`` (topics and conversion settings, shared with ``config/record.yaml``),
``bag_reader`` (bags in, typed messages out), ``alignment`` (resampling onto the control clock),
``rlds_writer`` (RLDS layout, splits, statistics, atomic publication), ``converter`` (the pipeline)
and ``check`` (opening the result as OpenVLA's loader does). Nothing here imports rclpy.
"""

from openvla_ros.dataset.config import ConversionConfig, TopicConfig, load_config
from openvla_ros.dataset.converter import ConversionReport, convert_bags, format_report
from openvla_ros.dataset.rlds_writer import VERSION

__all__ = [
    "VERSION",
    "ConversionConfig",
    "ConversionReport",
    "TopicConfig",
    "convert_bags",
    "format_report",
    "load_config",
]
