"""Reading demonstration bags (rosbag2, sqlite3 or mcap, metadata versions 1-9, split bags).

No ROS installation is needed. :class:`DemoBag` checks that the configured topics exist with a
supported message type, streams their messages in bag order as plain values (numbers, arrays,
strings) and camera frames as :class:`RawFrame` handles that only say where the frame lies (its
bytes are read and decoded when a step uses it), and, once the stream ends, checks that every topic
yielded as many messages as the storage declares and, with a ``metadata.yaml``, as the metadata
declares.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from openvla_ros.dataset.alignment import ActionKind, Role, pose_to_state, quaternion_to_matrix
from openvla_ros.dataset.bag_storage import BagError, StoredBag, open_bag
from openvla_ros.dataset.cdr import CdrError
from openvla_ros.dataset.cdr_values import decode_value
from openvla_ros.dataset.config import ConversionConfig
from openvla_ros.errors import DatasetError, ImageError

COMPRESSED_TYPE = "sensor_msgs/msg/CompressedImage"
IMAGE_TYPES = ("sensor_msgs/msg/Image", COMPRESSED_TYPE)
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
    """A camera message not read yet: ``data`` locates it in the bag's storage for :meth:`DemoBag.decode_frame`."""

    topic: str
    msgtype: str
    time_ns: int
    data: Any


def mean_rate_hz(count: int, first_ns: int, last_ns: int) -> float:
    """Returns the mean rate of ``count`` messages received from ``first_ns`` to ``last_ns`` (0.0 with fewer than two)."""
    span = (last_ns - first_ns) / 1e9
    return (count - 1) / span if count > 1 and span > 0 else 0.0


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
        return mean_rate_hz(self.count, self.first_ns, self.last_ns)


def action_kind_of(msgtype: str) -> ActionKind:
    """Returns the action source kind of an action topic's message type."""
    if msgtype == VECTOR_TYPE:
        return ActionKind.VECTOR
    if msgtype in TWIST_TYPES:
        return ActionKind.TWIST
    return ActionKind.POSE


class DemoBag:
    """A demonstration bag opened for conversion; use as a context manager.

    Topics, types and counts come from the storage files (see :mod:`~openvla_ros.dataset.bag_storage`),
    so QoS differences between ``metadata.yaml`` and the storage hide nothing, a bag without
    ``metadata.yaml`` reads, and only the configured topics are ever decoded.

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
        self._bag: StoredBag | None = None
        self._joint_names: tuple[str, ...] = config.joint_names

    def __enter__(self) -> DemoBag:
        try:
            self._bag = open_bag(self.path)
        except DatasetError:
            raise
        except Exception as exc:
            raise BagError(
                f"cannot open bag {self.path}: {type(exc).__name__}: {_one_line(exc)}; check that it is a complete "
                "rosbag2 directory (its .db3/.mcap files, with or without metadata.yaml)"
            ) from exc
        try:
            self._resolve_streams()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._bag is not None:
            bag, self._bag = self._bag, None
            bag.close()

    @property
    def start_ns(self) -> int:
        """The receive time (ns) of the first message read so far on the configured topics (0 before any)."""
        firsts = [count.first_ns for count in self.counts.values() if count.count]
        return min(firsts) if firsts else 0

    @property
    def declared_message_count(self) -> int:
        """Messages on the topics being read, as the storage (or else the metadata) declares them."""
        total = 0
        for stream in self.streams:
            total += self._storage_count(stream.topic) or (self._bag.declared_counts or {}).get(stream.topic, 0)
        return total

    @property
    def warnings(self) -> list[str]:
        """Problems the storage reported that did not stop the reading (e.g. a truncated last file)."""
        return self._bag.warnings if self._bag is not None else []

    def topic_types(self) -> dict[str, str]:
        """Returns ``{topic: message type}`` of every topic in the bag's storage."""
        return {name: topic.msgtype for name, topic in self._bag.topics.items()}

    def _stored_types(self, topic: str) -> tuple[str, ...]:
        """Returns every message type the storage records for ``topic``."""
        return self._bag.topics[topic].types

    def _storage_count(self, topic: str) -> int | None:
        stored = self._bag.topics.get(topic)
        return None if stored is None else stored.count

    def _resolve_streams(self) -> None:
        topics = self.config.topics
        available = self.topic_types()

        def in_bag(topic: str) -> str:
            """The bag's name for a configured topic: as written, else with or without the leading '/'
            (bags keep names as recorded: rosbag2's own test bags have topics such as ``AAA``)."""
            if topic in available:
                return topic
            other = topic[1:] if topic.startswith("/") else f"/{topic}"
            return other if other in available else topic

        wanted: list[tuple[str, Role, str]] = [
            (in_bag(topic), Role.CAMERA, key) for key, topic in topics.camera_topics().items()
        ]
        action = in_bag(topics.action)
        wanted.append((action, Role.ACTION, ""))
        if topics.state:
            wanted.append((in_bag(topics.state), Role.STATE, ""))
        if not self.config.instruction.strip():
            wanted.append((in_bag(topics.instruction), Role.INSTRUCTION, ""))
        missing = [topic for topic, _, _ in wanted if topic not in available]
        if missing:
            raise DatasetError(
                f"bag {self.path} has no topic {', '.join(missing)}; its topics are: "
                f"{_describe(available)}. Fix the topic names in the config (--config) or record them."
            )
        if available[action] not in ACCEPTED_TYPES[Role.ACTION]:
            raise DatasetError(
                f"topic {action} in bag {self.path} is a {available[action]}; as the action source it must be one "
                f"of {', '.join(ACCEPTED_TYPES[Role.ACTION])}. Name the action topic in topics.action"
            )
        self.action_kind = action_kind_of(available[action])
        if self.action_kind is not ActionKind.VECTOR:
            if not topics.gripper:
                raise DatasetError(
                    f"action topic {action} is a {available[action]}, which carries no gripper "
                    "command: set topics.gripper to a std_msgs/Float64 gripper topic"
                )
            gripper = in_bag(topics.gripper)
            if gripper not in available:
                raise DatasetError(
                    f"bag {self.path} has no topic {gripper}; its topics are: {_describe(available)}"
                )
            wanted.append((gripper, Role.GRIPPER, ""))
        self.streams = []
        for topic, role, key in wanted:
            types = self._stored_types(topic)
            if len(types) > 1:
                raise DatasetError(
                    f"topic {topic} in bag {self.path} holds messages of several types ({', '.join(types)}); "
                    "convert a bag whose topic has one type"
                )
            msgtype = available[topic]
            if msgtype not in ACCEPTED_TYPES[role]:
                raise DatasetError(
                    f"topic {topic} in bag {self.path} is a {msgtype}; as the {role.value} source it must be "
                    f"one of {', '.join(ACCEPTED_TYPES[role])}"
                )
            self.streams.append(Stream(topic, msgtype, role, key))
        self.counts = {stream.topic: TopicCount(stream.msgtype) for stream in self.streams}

    def messages(self) -> Iterator[tuple[int, Stream, Any]]:
        """Yields ``(receive time ns, stream, value)`` in bag order.

        Values: a :class:`RawFrame` for cameras (its pixels are read only when :meth:`decode_frame`
        asks for them); float64 arrays for actions (7 values, twist ``[vx, vy, vz, wx, wy, wz]`` or
        pose ``[x, y, z, qx, qy, qz, qw]``) and state; a float for the gripper; a string for the
        instruction. After the last message, the counts read are checked against the storage's own
        counts and, when the bag has a ``metadata.yaml``, against the metadata's.

        Raises:
            DatasetError: when a message cannot be read or has the wrong size, or when the number of
                messages read on a topic differs from the storage's or the metadata's count.
        """
        streams = {stream.topic: stream for stream in self.streams}
        payload = [stream.topic for stream in self.streams if stream.role is not Role.CAMERA]
        try:
            for time_ns, topic, locator, data in self._bag.entries(list(streams), payload):
                stream = streams[topic]
                count = self.counts[topic]
                if count.count == 0:
                    count.first_ns = time_ns
                count.count += 1
                count.last_ns = time_ns
                if data is None:
                    yield time_ns, stream, RawFrame(topic, stream.msgtype, time_ns, locator)
                else:
                    message = self._deserialize(stream, data, time_ns)
                    yield time_ns, stream, self._value(stream, message, time_ns)
        except DatasetError:
            raise
        except Exception as exc:
            raise DatasetError(
                f"cannot read messages of bag {self.path}: {type(exc).__name__}: {_one_line(exc)}; the bag is "
                "damaged (try `ros2 bag reindex`, or leave this bag out)"
            ) from exc
        self._check_counts()

    def _deserialize(self, stream: Stream, data: bytes | memoryview, time_ns: int) -> Any:
        try:
            return decode_value(stream.msgtype, data)
        except CdrError as exc:
            raise BagError(
                f"bag {self.path}: the {stream.msgtype} message on {stream.topic} at {time_ns} ns cannot be "
                f"decoded ({exc}); it was recorded with another definition of that type, or is damaged"
            ) from exc

    def _check_counts(self) -> None:
        damaged, mismatched = [], []
        declared = self._bag.declared_counts
        for stream in self.streams:
            read = self.counts[stream.topic].count
            stored = self._storage_count(stream.topic)
            if stored is not None and read != stored:
                damaged.append(f"{stream.topic}: read {read}, the storage declares {stored}")
            elif declared is not None and stream.topic in declared and read != declared[stream.topic]:
                mismatched.append(f"{stream.topic}: read {read}, metadata declares {declared[stream.topic]}")
        if damaged:
            raise BagError(
                f"bag {self.path} holds fewer or more messages than its storage declares ({'; '.join(damaged)}); "
                "the storage file is damaged: leave this bag out (`mcap recover` may repair an mcap file)"
            )
        if mismatched:
            raise BagError(
                f"bag {self.path} does not match its metadata ({'; '.join(mismatched)}); the metadata.yaml does not "
                "describe the data files: rebuild it with `ros2 bag reindex` (or move it away: the bag is then "
                "read from its storage alone) before converting"
            )

    def decode_frame(self, frame: RawFrame) -> np.ndarray:
        """Returns the RGB uint8 ``(height, width, 3)`` pixels of a camera frame, as the policy node converts them.

        Reads the frame's bytes from the storage (safe from worker threads) and decodes them in place.

        Raises:
            DatasetError: when the bag is closed, or the frame cannot be read or converted.
        """
        from openvla_ros.dataset.cdr import compressed_rgb, image_rgb

        bag = self._bag
        if bag is None:
            raise BagError(f"bag {self.path} is closed; frame on {frame.topic} at {frame.time_ns} ns not read")
        data = bag.read(frame.data, frame.topic)
        try:
            return compressed_rgb(data) if frame.msgtype == COMPRESSED_TYPE else image_rgb(data)
        except ImageError as exc:
            raise DatasetError(f"bag {self.path}: frame on {frame.topic} at {frame.time_ns} ns: {exc}") from exc
        except Exception as exc:
            raise DatasetError(
                f"bag {self.path}: cannot read the frame on {frame.topic} at {frame.time_ns} ns: {_one_line(exc)}"
            ) from exc

    def _value(self, stream: Stream, decoded: Any, time_ns: int) -> Any:
        """Returns the decoded value of a non-camera message, rejecting NaN/inf and unusable orientations.

        Raises:
            DatasetError: naming the bag, topic and time of the bad message.
        """
        value = self._decoded_value(stream, decoded, time_ns)
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

    def _decoded_value(self, stream: Stream, decoded: Any, time_ns: int) -> Any:
        msgtype = stream.msgtype
        if msgtype == VECTOR_TYPE and stream.role is Role.ACTION and decoded.shape != (7,):
            raise DatasetError(
                f"bag {self.path}: action on {stream.topic} at {time_ns} ns has {decoded.size} values; a "
                "Float64MultiArray action needs 7: dx, dy, dz, droll, dpitch, dyaw, gripper"
            )
        if msgtype == POSE_TYPE and stream.role is Role.STATE:
            try:
                return pose_to_state(decoded)
            except ValueError as exc:
                raise DatasetError(f"bag {self.path}: pose on {stream.topic} at {time_ns} ns: {exc}") from exc
        if msgtype == JOINT_STATE_TYPE:
            return self._joint_positions(stream, *decoded, time_ns)
        return decoded

    def _joint_positions(self, stream: Stream, names: tuple[str, ...], positions: np.ndarray,
                         time_ns: int) -> np.ndarray:
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


def _one_line(exc: BaseException) -> str:
    """Returns an exception's message on one line, shortened (some libraries put whole definitions in it)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _describe(topics: dict[str, str]) -> str:
    return ", ".join(f"{topic} ({msgtype})" for topic, msgtype in sorted(topics.items())) or "none"
