"""The converter's former bag reading path, through the rosbags library, kept only as the benchmark's baseline.

It reads with ``rosbags.highlevel.AnyReader`` (topics matched to data through metadata.yaml's QoS
profiles, every schema parsed on open, every message, frames included, read in full), deserialises the
small messages with rosbags' typestore and a frame with rosbags, then converts it with
``openvla_ros.ros_conversions.message_to_rgb``. Do not use it for conversion: it is what
:class:`openvla_ros.dataset.bag_reader.DemoBag` replaced.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from openvla_ros.dataset.alignment import Role
from openvla_ros.dataset.bag_reader import POSE_TYPE, TWIST_TYPES, VECTOR_TYPE, DemoBag, RawFrame
from openvla_ros.errors import DatasetError


class RosbagsDemoBag(DemoBag):
    """:class:`DemoBag` reading through rosbags (the pre-replacement path); same interface."""

    def __enter__(self) -> RosbagsDemoBag:
        from rosbags.highlevel import AnyReader
        from rosbags.typesys import Stores, get_typestore

        self._reader = AnyReader([self.path], default_typestore=get_typestore(Stores.LATEST))
        self._reader.open()
        self._resolve_streams()
        wanted = {stream.topic for stream in self.streams}
        self._connections = [conn for conn in self._reader.connections if conn.topic in wanted]
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._reader.close()

    def topic_types(self) -> dict[str, str]:
        return {conn.topic: conn.msgtype for conn in self._reader.connections}

    def _stored_types(self, topic: str) -> tuple[str, ...]:
        return (self.topic_types()[topic],)

    @property
    def declared_message_count(self) -> int:
        return sum(int(conn.msgcount) for conn in self._connections)

    @property
    def warnings(self) -> list[str]:
        return []

    def messages(self) -> Iterator[tuple[int, Any, Any]]:
        streams = {stream.topic: stream for stream in self.streams}
        for connection, time_ns, raw in self._reader.messages(connections=self._connections):
            stream = streams[connection.topic]
            count = self.counts[stream.topic]
            count.first_ns = count.first_ns or time_ns
            count.count += 1
            count.last_ns = time_ns
            if stream.role is Role.CAMERA:
                yield time_ns, stream, RawFrame(stream.topic, stream.msgtype, time_ns, raw)
            else:
                message = self._reader.deserialize(raw, stream.msgtype)
                yield time_ns, stream, self._value(stream, _plain(stream.msgtype, message), time_ns)
        declared = {conn.topic: int(conn.msgcount) for conn in self._connections}
        if any(self.counts[topic].count != count for topic, count in declared.items()):
            raise DatasetError(f"bag {self.path} does not match its metadata")

    def decode_frame(self, frame: RawFrame) -> np.ndarray:
        from openvla_ros.ros.ros_conversions import message_to_rgb

        return message_to_rgb(self._reader.deserialize(frame.data, frame.msgtype))


def _plain(msgtype: str, message: Any) -> Any:
    """Returns a rosbags message as the value :meth:`DemoBag._value` takes."""
    if msgtype == VECTOR_TYPE:
        return np.asarray(message.data, dtype=np.float64)
    if msgtype in TWIST_TYPES:
        twist = message.twist if msgtype.endswith("Stamped") else message
        return np.array([twist.linear.x, twist.linear.y, twist.linear.z,
                         twist.angular.x, twist.angular.y, twist.angular.z])
    if msgtype == POSE_TYPE:
        position, orientation = message.pose.position, message.pose.orientation
        return np.array([position.x, position.y, position.z, orientation.x, orientation.y, orientation.z,
                         orientation.w])
    if msgtype.endswith("JointState"):
        return tuple(message.name), np.asarray(message.position, dtype=np.float64)
    if msgtype.endswith("String"):
        return str(message.data)
    return float(message.data)
