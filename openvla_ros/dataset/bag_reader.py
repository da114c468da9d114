"""Reading demonstration bags (rosbag2, sqlite3 or mcap, metadata versions 4-9, split bags) with rosbags.

No ROS installation is needed. :class:`DemoBag` checks that the configured topics exist with a
supported message type, streams their messages in bag order as plain values (numbers, arrays,
strings) and camera frames as undecoded :class:`RawFrame` handles, and, once the stream ends,
checks that every topic yielded as many messages as the bag's metadata declares (a mismatched
``metadata.yaml`` can otherwise make a reader return nothing without complaint).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from openvla_ros.dataset.alignment import ActionKind, Role, pose_to_state, quaternion_to_matrix
from openvla_ros.dataset.config import ConversionConfig
from openvla_ros.errors import DatasetError, ImageError

IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
VECTOR_TYPE = "std_msgs/msg/Float64MultiArray"
TWIST_TYPES = ("geometry_msgs/msg/TwistStamped", "geometry_msgs/msg/Twist")
POSE_TYPE = "geometry_msgs/msg/PoseStamped"
JOINT_STATE_TYPE = "sensor_msgs/msg/JointState"
SCALAR_TYPES = ("std_msgs/msg/Float64", "std_msgs/msg/Float32")
STRING_TYPE = "std_msgs/msg/String"

ACCEPTED_TYPES: dict[Role, tuple[str, ...]] = {
    Role.CAMERA: IMAGE_TYPES,
    Role.ACTION: (VECTOR_TYPE, *TWIST_TYPES, POSE_TYPE),
    Role.GRIPPER: SCALAR_TYPES,
    Role.STATE: (JOINT_STATE_TYPE, POSE_TYPE, VECTOR_TYPE),
    Role.INSTRUCTION: (STRING_TYPE,),
}


@dataclass(frozen=True)
class Stream:
    """One topic read from a bag and the part it plays in a step."""

    topic: str
    msgtype: str
    role: Role
    camera_key: str = ""


@dataclass(frozen=True)
class RawFrame:
    """A camera message kept undecoded until a step needs it."""

    topic: str
    msgtype: str
    time_ns: int
    data: Any


@dataclass
class TopicCount:
    """Messages read on one topic: the count and the first and last receive times."""

    msgtype: str
    count: int = 0
    first_ns: int = 0
    last_ns: int = 0

    @property
    def rate_hz(self) -> float:
        """Mean message rate over the topic's span (0.0 with fewer than two messages)."""
        span = (self.last_ns - self.first_ns) / 1e9
        return (self.count - 1) / span if self.count > 1 and span > 0 else 0.0


def action_kind_of(msgtype: str) -> ActionKind:
    """Returns the action source kind of an action topic's message type."""
    if msgtype == VECTOR_TYPE:
        return ActionKind.VECTOR
    if msgtype in TWIST_TYPES:
        return ActionKind.TWIST
    return ActionKind.POSE


class DemoBag:
    """A demonstration bag opened for conversion; use as a context manager.

    Raises (from ``__enter__``):
        DatasetError: when the path is not a readable bag, a configured topic is missing (the message
            lists the bag's topics) or has an unsupported message type.
    """

    def __init__(self, path: str | Path, config: ConversionConfig) -> None:
        self.path = Path(path)
        self.config = config
        self.streams: list[Stream] = []
        self.action_kind = ActionKind.VECTOR
        self.counts: dict[str, TopicCount] = {}
        self._reader: Any = None
        self._connections: list[Any] = []
        self._joint_names: tuple[str, ...] = config.joint_names

    def __enter__(self) -> DemoBag:
        from rosbags.highlevel import AnyReader
        from rosbags.typesys import Stores, get_typestore

        if not self.path.exists():
            raise DatasetError(f"bag {self.path} does not exist; pass a rosbag2 directory (with metadata.yaml)")
        try:
            self._reader = AnyReader([self.path], default_typestore=get_typestore(Stores.LATEST))
            self._reader.open()
        except Exception as exc:
            self._reader = None
            raise DatasetError(
                f"cannot open bag {self.path}: {exc}; check that it is a complete rosbag2 directory "
                "(metadata.yaml beside its .db3/.mcap files), or rebuild its metadata with `ros2 bag reindex`"
            ) from exc
        try:
            self._resolve_streams()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._reader is not None:
            reader, self._reader = self._reader, None
            reader.close()

    @property
    def start_ns(self) -> int:
        """The bag's start time (ns)."""
        return int(self._reader.start_time)

    @property
    def declared_message_count(self) -> int:
        """Messages that the bag's metadata declares on the topics being read."""
        return sum(int(conn.msgcount) for conn in self._connections)

    def topic_types(self) -> dict[str, str]:
        """Returns ``{topic: message type}`` of every topic in the bag."""
        return {conn.topic: conn.msgtype for conn in self._reader.connections}

    def _resolve_streams(self) -> None:
        topics = self.config.topics
        wanted: list[tuple[str, Role, str]] = [
            (topic, Role.CAMERA, key) for key, topic in topics.camera_topics().items()
        ]
        wanted.append((topics.action, Role.ACTION, ""))
        if topics.state:
            wanted.append((topics.state, Role.STATE, ""))
        if not self.config.instruction.strip():
            wanted.append((topics.instruction, Role.INSTRUCTION, ""))
        available = self.topic_types()
        missing = [topic for topic, _, _ in wanted if topic not in available]
        if missing:
            raise DatasetError(
                f"bag {self.path} has no topic {', '.join(missing)}; its topics are: "
                f"{_describe(available)}. Fix the topic names in the config (--config) or record them."
            )
        self.action_kind = action_kind_of(available[topics.action])
        if self.action_kind is not ActionKind.VECTOR:
            if not topics.gripper:
                raise DatasetError(
                    f"action topic {topics.action} is a {available[topics.action]}, which carries no gripper "
                    "command: set topics.gripper to a std_msgs/Float64 gripper topic"
                )
            if topics.gripper not in available:
                raise DatasetError(
                    f"bag {self.path} has no topic {topics.gripper}; its topics are: {_describe(available)}"
                )
            wanted.append((topics.gripper, Role.GRIPPER, ""))
        self.streams = []
        for topic, role, key in wanted:
            msgtype = available[topic]
            if msgtype not in ACCEPTED_TYPES[role]:
                raise DatasetError(
                    f"topic {topic} in bag {self.path} is a {msgtype}; as the {role.value} source it must be "
                    f"one of {', '.join(ACCEPTED_TYPES[role])}"
                )
            self.streams.append(Stream(topic, msgtype, role, key))
        by_topic = {stream.topic for stream in self.streams}
        self._connections = [conn for conn in self._reader.connections if conn.topic in by_topic]
        self.counts = {stream.topic: TopicCount(stream.msgtype) for stream in self.streams}

    def messages(self) -> Iterator[tuple[int, Stream, Any]]:
        """Yields ``(receive time ns, stream, value)`` in bag order.

        Values: a :class:`RawFrame` for cameras; float64 arrays for actions (7 values, twist
        ``[vx, vy, vz, wx, wy, wz]`` or pose ``[x, y, z, qx, qy, qz, qw]``) and state; a float for the
        gripper; a string for the instruction. After the last message, the counts read are checked.

        Raises:
            DatasetError: when a message cannot be read or has the wrong size, or when the number of
                messages read on a topic differs from the bag's metadata.
        """
        streams = {stream.topic: stream for stream in self.streams}
        try:
            iterator = self._reader.messages(connections=self._connections)
            for connection, time_ns, raw in iterator:
                stream = streams[connection.topic]
                count = self.counts[stream.topic]
                if count.count == 0:
                    count.first_ns = time_ns
                count.count += 1
                count.last_ns = time_ns
                if stream.role is Role.CAMERA:
                    yield time_ns, stream, RawFrame(stream.topic, stream.msgtype, time_ns, raw)
                else:
                    message = self._reader.deserialize(raw, stream.msgtype)
                    yield time_ns, stream, self._value(stream, message, time_ns)
        except DatasetError:
            raise
        except Exception as exc:
            raise DatasetError(
                f"cannot read messages of bag {self.path}: {type(exc).__name__}: {exc}; the bag is damaged "
                "(try `ros2 bag reindex`, or leave this bag out)"
            ) from exc
        self._check_counts()

    def _check_counts(self) -> None:
        declared: dict[str, int] = {}
        for conn in self._connections:
            declared[conn.topic] = declared.get(conn.topic, 0) + int(conn.msgcount)
        wrong = [
            f"{topic}: read {self.counts[topic].count}, metadata declares {count}"
            for topic, count in declared.items()
            if self.counts[topic].count != count
        ]
        if wrong:
            raise DatasetError(
                f"bag {self.path} does not match its metadata ({'; '.join(wrong)}); the metadata.yaml "
                "does not describe the data files: rebuild it with `ros2 bag reindex` before converting"
            )

    def decode_frame(self, frame: RawFrame) -> np.ndarray:
        """Returns the RGB uint8 ``(height, width, 3)`` pixels of a camera frame, as the policy node converts them.

        Raises:
            DatasetError: when the message cannot be deserialised or converted.
        """
        from openvla_ros.ros_conversions import message_to_rgb

        try:
            message = self._reader.deserialize(frame.data, frame.msgtype)
            return message_to_rgb(message)
        except ImageError as exc:
            raise DatasetError(f"bag {self.path}: frame on {frame.topic} at {frame.time_ns} ns: {exc}") from exc
        except Exception as exc:
            raise DatasetError(
                f"bag {self.path}: cannot read the frame on {frame.topic} at {frame.time_ns} ns: {exc}"
            ) from exc

    def _value(self, stream: Stream, message: Any, time_ns: int) -> Any:
        """Returns the decoded value of a non-camera message, rejecting NaN/inf and unusable orientations.

        Raises:
            DatasetError: naming the bag, topic and time of the bad message.
        """
        value = self._decoded_value(stream, message, time_ns)
        if isinstance(value, str):
            return value
        if not np.all(np.isfinite(value)):
            raise DatasetError(
                f"bag {self.path}: {stream.role.value} on {stream.topic} at {time_ns} ns holds NaN or infinity "
                f"({np.round(np.asarray(value, dtype=np.float64), 6).tolist()}); fix the publisher or leave this bag out"
            )
        if stream.msgtype == POSE_TYPE and stream.role is Role.ACTION:
            try:
                quaternion_to_matrix(value[3:])
            except ValueError as exc:
                raise DatasetError(f"bag {self.path}: pose on {stream.topic} at {time_ns} ns: {exc}") from exc
        return value

    def _decoded_value(self, stream: Stream, message: Any, time_ns: int) -> Any:
        msgtype = stream.msgtype
        if msgtype == STRING_TYPE:
            return str(message.data)
        if msgtype in SCALAR_TYPES:
            return float(message.data)
        if msgtype == VECTOR_TYPE:
            values = np.asarray(message.data, dtype=np.float64)
            if stream.role is Role.ACTION and values.shape != (7,):
                raise DatasetError(
                    f"bag {self.path}: action on {stream.topic} at {time_ns} ns has {values.size} values; a "
                    "Float64MultiArray action needs 7: dx, dy, dz, droll, dpitch, dyaw, gripper"
                )
            return values
        if msgtype in TWIST_TYPES:
            twist = message.twist if msgtype.endswith("TwistStamped") else message
            return np.array([twist.linear.x, twist.linear.y, twist.linear.z,
                             twist.angular.x, twist.angular.y, twist.angular.z])
        if msgtype == POSE_TYPE:
            position, orientation = message.pose.position, message.pose.orientation
            pose = np.array([position.x, position.y, position.z,
                             orientation.x, orientation.y, orientation.z, orientation.w])
            if stream.role is Role.STATE:
                try:
                    return pose_to_state(pose)
                except ValueError as exc:
                    raise DatasetError(f"bag {self.path}: pose on {stream.topic} at {time_ns} ns: {exc}") from exc
            return pose
        return self._joint_positions(stream, message, time_ns)

    def _joint_positions(self, stream: Stream, message: Any, time_ns: int) -> np.ndarray:
        names = list(message.name)
        positions = np.asarray(message.position, dtype=np.float64)
        if len(names) != positions.size:
            raise DatasetError(
                f"bag {self.path}: JointState on {stream.topic} at {time_ns} ns has {len(names)} names but "
                f"{positions.size} positions"
            )
        if not self._joint_names:
            self._joint_names = tuple(names)
        index = {name: i for i, name in enumerate(names)}
        absent = [name for name in self._joint_names if name not in index]
        if absent:
            raise DatasetError(
                f"bag {self.path}: JointState on {stream.topic} at {time_ns} ns lacks joint(s) "
                f"{', '.join(absent)}; it has {', '.join(names)}. List the joints to keep in conversion.joint_names"
            )
        return positions[[index[name] for name in self._joint_names]]


def _describe(topics: dict[str, str]) -> str:
    return ", ".join(f"{topic} ({msgtype})" for topic, msgtype in sorted(topics.items())) or "none"
