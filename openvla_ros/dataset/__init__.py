"""Demonstration datasets: rosbag2 recordings -> RLDS, without ROS (own bag reader + tensorflow-datasets).

Modules: ``config`` (topics and conversion settings, shared with ``config/record.yaml``),
``bag_reader`` (bags in, typed messages out) over ``bag_storage`` (a bag's files as one stream),
``bag_layout`` (metadata.yaml and file discovery), ``bag_sqlite`` and ``bag_mcap``/``mcap_index``
(the two storage formats), ``cdr``/``cdr_values`` (images and small messages from their CDR bytes),
``alignment`` (resampling onto the control clock),
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
