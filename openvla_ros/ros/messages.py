"""The policy node's outgoing messages, built from plain values (no node, no publishing).

Stamps are ``builtin_interfaces/Time`` messages (a header's stamp, or ``Clock.now().to_msg()``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import TwistStamped
from std_msgs.msg import Float64MultiArray, MultiArrayDimension

from openvla_ros.model.action_codec import ACTION_NAMES
from openvla_ros.ros.control import ControlSettings, twist_components

ACTION_LAYOUT_LABEL = ",".join(ACTION_NAMES)


def action_array(values: Sequence[float]) -> Float64MultiArray:
    """Returns ``~/action``: the 7 values labelled with the action layout."""
    array = Float64MultiArray()
    array.layout.dim = [
        MultiArrayDimension(label=ACTION_LAYOUT_LABEL, size=len(ACTION_NAMES), stride=len(ACTION_NAMES))
    ]
    array.data = [float(value) for value in values]
    return array


def delta_twist(action: np.ndarray, settings: ControlSettings, stamp: Any) -> TwistStamped:
    """Returns ``~/delta_twist`` of ``action`` (a delta, or a velocity with ``twist_mode: velocity``)."""
    twist = TwistStamped()
    twist.header.stamp = stamp
    twist.header.frame_id = settings.frame_id
    linear, angular = twist_components(action, settings.twist_mode, settings.rate_hz)
    twist.twist.linear.x, twist.twist.linear.y, twist.twist.linear.z = (float(v) for v in linear)
    twist.twist.angular.x, twist.twist.angular.y, twist.twist.angular.z = (float(v) for v in angular)
    return twist


def zero_delta(last_gripper: float, frame_id: str, stamp: Any) -> tuple[Float64MultiArray, TwistStamped]:
    """Returns the stop messages: an action of zero deltas holding ``last_gripper``, and a zero twist."""
    array = action_array([0.0] * (len(ACTION_NAMES) - 1) + [last_gripper])
    twist = TwistStamped()
    twist.header.stamp = stamp
    twist.header.frame_id = frame_id
    return array, twist


def timing_array(name: str, stamp: Any, values: Mapping[str, float]) -> DiagnosticArray:
    """Returns a ``~/step_timing`` message: one status ``name`` with the values in milliseconds (3 decimals)."""
    timing = DiagnosticArray()
    timing.header.stamp = stamp
    timing.status = [
        DiagnosticStatus(
            name=name, values=[KeyValue(key=key, value=f"{value:.3f}") for key, value in values.items()]
        )
    ]
    return timing


def diagnostic_array(name: str, level: bytes, summary: str, hardware_id: str, values: Mapping[str, str],
                     stamp: Any) -> DiagnosticArray:
    """Returns a ``/diagnostics`` message with one status of ``values``."""
    array = DiagnosticArray()
    array.header.stamp = stamp
    array.status = [DiagnosticStatus(level=level, name=name, message=summary, hardware_id=hardware_id,
                                     values=[KeyValue(key=key, value=value) for key, value in values.items()])]
    return array
