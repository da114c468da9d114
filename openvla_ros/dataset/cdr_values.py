"""The converter's non-camera messages decoded from their CDR bytes into the plain values a step needs.

Each decoder reads the fields of one standard ROS 2 message type in order (see
:class:`~openvla_ros.dataset.cdr.CdrReader`) and returns numbers, never a message object:

* ``std_msgs/String`` -> ``str``; ``std_msgs/Float64`` and ``Float32`` -> ``float``;
* ``std_msgs/Float64MultiArray`` -> float64 array of ``data`` (the layout is read past);
* ``geometry_msgs/Twist`` and ``TwistStamped`` -> ``[vx, vy, vz, wx, wy, wz]``;
* ``geometry_msgs/PoseStamped`` -> ``[x, y, z, qx, qy, qz, qw]``;
* ``sensor_msgs/JointState`` -> ``(names, positions)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from openvla_ros.dataset.cdr import CdrError, CdrReader


def _string(reader: CdrReader) -> str:
    return reader.string()


def _float64(reader: CdrReader) -> float:
    return reader.float64()


def _float32(reader: CdrReader) -> float:
    return float(reader.float32())


def _float64_multi_array(reader: CdrReader) -> np.ndarray:
    for _ in range(reader.uint32()):  # layout.dim: label, size, stride
        reader.string()
        reader.uint32()
        reader.uint32()
    reader.uint32()  # layout.data_offset
    return reader.float64_sequence()


def _twist(reader: CdrReader) -> np.ndarray:
    return reader.float64_array(6)


def _twist_stamped(reader: CdrReader) -> np.ndarray:
    reader.skip_header()
    return reader.float64_array(6)


def _pose_stamped(reader: CdrReader) -> np.ndarray:
    reader.skip_header()
    return reader.float64_array(7)


def _joint_state(reader: CdrReader) -> tuple[tuple[str, ...], np.ndarray]:
    reader.skip_header()
    names = tuple(reader.string() for _ in range(reader.uint32()))
    return names, reader.float64_sequence()  # velocity and effort follow; not needed


DECODERS: dict[str, Callable[[CdrReader], Any]] = {
    "std_msgs/msg/String": _string,
    "std_msgs/msg/Float64": _float64,
    "std_msgs/msg/Float32": _float32,
    "std_msgs/msg/Float64MultiArray": _float64_multi_array,
    "geometry_msgs/msg/Twist": _twist,
    "geometry_msgs/msg/TwistStamped": _twist_stamped,
    "geometry_msgs/msg/PoseStamped": _pose_stamped,
    "sensor_msgs/msg/JointState": _joint_state,
}


def decode_value(msgtype: str, data: bytes | memoryview) -> Any:
    """Returns the plain value of a serialised message of ``msgtype`` (see the module docstring).

    Raises:
        CdrError: for a type without a decoder or bytes that are not a complete message of that type.
    """
    decoder = DECODERS.get(msgtype)
    if decoder is None:
        raise CdrError(f"no decoder for {msgtype}; readable types: {', '.join(DECODERS)}")
    return decoder(CdrReader(data))
