"""Synthetic demonstration bags with known contents, for tests, benchmarks and trying the converter.

:func:`write_demo_bag` records a camera, a 7-DoF action source, a JointState and an instruction with
timing jitter, an optional camera gap and an optional idle pause, using rosbags' writer (sqlite3 or
mcap). It returns :class:`DemoRecording`, the exact receive times and values written, from which a
test can work out independently what each converted step must hold.

Frame ``i`` is recognisable after resizing and JPEG: its top band is a flat colour
:func:`frame_code` ``(i)``; the rest is a fixed texture shifted by ``i`` pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

JOINT_NAMES = ("shoulder", "elbow", "wrist")


@dataclass
class DemoRecording:
    """What was written: per stream, receive times (ns) and values."""

    path: Path
    image_times: list[int] = field(default_factory=list)
    image_indices: list[int] = field(default_factory=list)
    action_times: list[int] = field(default_factory=list)
    actions: list[np.ndarray] = field(default_factory=list)
    gripper_times: list[int] = field(default_factory=list)
    grippers: list[float] = field(default_factory=list)
    state_times: list[int] = field(default_factory=list)
    states: list[np.ndarray] = field(default_factory=list)
    instruction_times: list[int] = field(default_factory=list)
    instructions: list[str] = field(default_factory=list)
    image_size: tuple[int, int] = (64, 48)
    bytes_written: int = 0


def frame_code(index: int) -> tuple[int, int, int]:
    """Returns the flat RGB colour of frame ``index``'s top band (unique for index < 4096)."""
    return (16 + 14 * (index % 16), 16 + 14 * ((index // 16) % 16), 16 + 14 * ((index // 256) % 16))


def decode_frame_code(rgb: tuple[float, float, float]) -> int:
    """Returns the frame index whose :func:`frame_code` is nearest to ``rgb``."""
    digits = [int(np.clip(round((value - 16) / 14), 0, 15)) for value in rgb]
    return digits[0] + 16 * digits[1] + 256 * digits[2]


def make_frame(index: int, width: int, height: int, texture: np.ndarray | None = None) -> np.ndarray:
    """Returns frame ``index``: RGB uint8 (height, width, 3), top third flat :func:`frame_code`, rest textured."""
    if texture is None:
        texture = make_texture(width, height)
    frame = np.roll(texture, shift=index, axis=1).copy()
    frame[: height // 3] = frame_code(index)
    return frame


def make_texture(width: int, height: int, seed: int = 7) -> np.ndarray:
    """Returns a fixed smooth-plus-blocky RGB texture."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    texture = np.repeat(np.repeat(blocks, 8, axis=0), 8, axis=1)[:height, :width]
    ramp = np.linspace(0, 60, width, dtype=np.float32)[None, :, None]
    return np.clip(texture.astype(np.float32) * 0.7 + ramp, 0, 255).astype(np.uint8)


def synthetic_action(index: int, idle: bool) -> np.ndarray:
    """Returns action command ``index``: distinct non-zero deltas, gripper open then closed."""
    if idle:
        motion = np.zeros(6)
    else:
        motion = np.array([0.001 * (index + 1), -0.0005 * (index + 2), 0.002 * np.sin(index + 1),
                           0.01 * np.cos(index), 0.003 * ((index % 5) - 2.5), 0.004])
    gripper = 1.0 if (index // 15) % 2 == 0 else 0.0
    return np.concatenate([motion, [gripper]])


def write_demo_bag(
    path: str | Path,
    *,
    storage: str = "sqlite3",
    duration_s: float = 4.0,
    camera_hz: float = 30.0,
    action_hz: float = 10.0,
    state_hz: float = 20.0,
    image_size: tuple[int, int] = (64, 48),
    compressed: bool = False,
    jitter_s: float = 0.004,
    camera_gap_s: tuple[float, float] | None = None,
    idle_s: tuple[float, float] | None = None,
    action_source: str = "vector",
    instructions: tuple[tuple[float, str], ...] = ((0.0, "pick up the red block"),),
    start_ns: int = 1_700_000_000_000_000_000,
    seed: int = 0,
    version: int = 9,
) -> DemoRecording:
    """Writes a demonstration bag and returns what it contains.

    Args:
        path: bag directory to create (must not exist).
        storage: ``sqlite3`` or ``mcap``.
        image_size: (width, height) of the camera frames.
        compressed: store JPEG ``CompressedImage`` frames instead of rgb8 ``Image``.
        camera_gap_s: (start, end) seconds with no camera frames (a dropped-frame gap).
        idle_s: (start, end) seconds during which the action commands are zero.
        action_source: ``vector`` (Float64MultiArray on /teleop/action), ``twist`` (TwistStamped on
            /teleop/twist + Float64 /teleop/gripper) or ``pose`` (PoseStamped on /robot/ee_pose +
            Float64 /teleop/gripper).
        instructions: (time s, text) pairs published on /instruction.
        version: rosbag2 metadata version written (8 or 9).
    """
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    typestore = get_typestore(Stores.LATEST)
    types = typestore.types
    rng = np.random.default_rng(seed)
    width, height = image_size
    recording = DemoRecording(path=Path(path), image_size=image_size)
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3

    def stamp(time_ns: int):
        return types["builtin_interfaces/msg/Time"](sec=time_ns // 1_000_000_000, nanosec=time_ns % 1_000_000_000)

    def header(time_ns: int, frame_id: str = "base_link"):
        return types["std_msgs/msg/Header"](stamp=stamp(time_ns), frame_id=frame_id)

    def times(rate: float, first_s: float = 0.0) -> list[int]:
        count = int((duration_s - first_s) * rate)
        base = first_s + np.arange(count) / rate
        noise = rng.uniform(-jitter_s, jitter_s, size=count) if jitter_s else np.zeros(count)
        return sorted(start_ns + int(round((t + n) * 1e9)) for t, n in zip(base, noise, strict=True) if t + n >= 0)

    events: list[tuple[int, int, str, object]] = []  # (time, order, topic, message)
    texture = make_texture(width, height)
    image_type = "sensor_msgs/msg/CompressedImage" if compressed else "sensor_msgs/msg/Image"
    for index, time_ns in enumerate(times(camera_hz, 0.01)):
        seconds = (time_ns - start_ns) / 1e9
        if camera_gap_s and camera_gap_s[0] <= seconds < camera_gap_s[1]:
            continue
        recording.image_times.append(time_ns)
        recording.image_indices.append(index)
        events.append((time_ns, 0, "/camera/image_raw", index))

    action_topic = {"vector": "/teleop/action", "twist": "/teleop/twist", "pose": "/robot/ee_pose"}[action_source]
    pose = np.array([0.4, 0.0, 0.3, 0.0, 0.0, 0.0, 1.0])
    for index, time_ns in enumerate(times(action_hz, 0.02)):
        seconds = (time_ns - start_ns) / 1e9
        command = synthetic_action(index, bool(idle_s and idle_s[0] <= seconds < idle_s[1]))
        if action_source == "vector":
            value = command
        elif action_source == "twist":
            value = command[:6] * action_hz  # velocity that moves the command's delta in one period
        else:
            pose = pose.copy()
            pose[:3] += command[:3]
            value = pose
        recording.action_times.append(time_ns)
        recording.actions.append(value)
        events.append((time_ns, 1, action_topic, value))
        if action_source != "vector":
            recording.gripper_times.append(time_ns + 1000)
            recording.grippers.append(float(command[6]))
            events.append((time_ns + 1000, 2, "/teleop/gripper", float(command[6])))

    for index, time_ns in enumerate(times(state_hz, 0.0)):
        value = np.array([0.01 * index, -0.02 * index, 0.5 + 0.001 * index])
        recording.state_times.append(time_ns)
        recording.states.append(value)
        events.append((time_ns, 3, "/joint_states", value))

    for seconds, text in instructions:
        time_ns = start_ns + int(round(seconds * 1e9))
        recording.instruction_times.append(time_ns)
        recording.instructions.append(text)
        events.append((time_ns, 4, "/instruction", text))

    events.sort(key=lambda event: (event[0], event[1]))
    topic_types = {
        "/camera/image_raw": image_type,
        "/teleop/action": "std_msgs/msg/Float64MultiArray",
        "/teleop/twist": "geometry_msgs/msg/TwistStamped",
        "/robot/ee_pose": "geometry_msgs/msg/PoseStamped",
        "/teleop/gripper": "std_msgs/msg/Float64",
        "/joint_states": "sensor_msgs/msg/JointState",
        "/instruction": "std_msgs/msg/String",
    }
    used = {topic for _, _, topic, _ in events}

    def message(topic: str, time_ns: int, value: object):
        if topic == "/camera/image_raw":
            frame = make_frame(int(value), width, height, texture)
            if compressed:
                import cv2

                ok, jpeg = cv2.imencode(".jpg", frame[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
                return types[image_type](header=header(time_ns, "camera"), format="jpeg", data=jpeg.reshape(-1))
            return types[image_type](header=header(time_ns, "camera"), height=height, width=width, encoding="rgb8",
                                     is_bigendian=0, step=width * 3, data=frame.reshape(-1))
        if topic == "/teleop/action":
            layout = types["std_msgs/msg/MultiArrayLayout"](dim=[], data_offset=0)
            return types["std_msgs/msg/Float64MultiArray"](layout=layout, data=np.asarray(value, dtype=np.float64))
        if topic == "/teleop/twist":
            vector = types["geometry_msgs/msg/Vector3"]
            twist = types["geometry_msgs/msg/Twist"](linear=vector(*value[:3]), angular=vector(*value[3:6]))
            return types["geometry_msgs/msg/TwistStamped"](header=header(time_ns), twist=twist)
        if topic == "/robot/ee_pose":
            point = types["geometry_msgs/msg/Point"](*value[:3])
            orientation = types["geometry_msgs/msg/Quaternion"](*value[3:7])
            pose_msg = types["geometry_msgs/msg/Pose"](position=point, orientation=orientation)
            return types["geometry_msgs/msg/PoseStamped"](header=header(time_ns), pose=pose_msg)
        if topic == "/teleop/gripper":
            return types["std_msgs/msg/Float64"](data=float(value))
        if topic == "/joint_states":
            positions = np.asarray(value, dtype=np.float64)
            return types["sensor_msgs/msg/JointState"](
                header=header(time_ns), name=list(JOINT_NAMES), position=positions,
                velocity=np.zeros(0), effort=np.zeros(0))
        return types["std_msgs/msg/String"](data=str(value))

    with Writer(Path(path), version=version, storage_plugin=plugin) as writer:
        connections = {
            topic: writer.add_connection(topic, topic_types[topic], typestore=typestore)
            for topic in topic_types if topic in used
        }
        for time_ns, _, topic, value in events:
            data = typestore.serialize_cdr(message(topic, time_ns, value), topic_types[topic])
            recording.bytes_written += len(data)
            writer.write(connections[topic], time_ns, data)
    return recording


def write_episode_bag(
    path: str | Path,
    images: list[np.ndarray],
    actions: list[np.ndarray],
    instruction: str,
    *,
    states: list[np.ndarray] | None = None,
    rate_hz: float = 10.0,
    encoding: str = "rgb8",
    storage: str = "mcap",
    start_ns: int = 1_700_000_000_000_000_000,
) -> Path:
    """Writes one recorded episode as a rosbag2 bag, as a robot would have recorded it.

    Step ``i`` publishes ``images[i]`` (RGB uint8 HxWx3) on /camera/image_raw at ``i / rate_hz`` s and,
    10 ms later, ``actions[i]`` (7 values, Float64MultiArray on /teleop/action) and ``states[i]``
    (JointState on /joint_states) when given; the instruction and one idle command (no motion, the
    gripper held) come first and another last, so the converter pairs frame i with action i for every
    step on either step clock. ``encoding``
    is the camera's: ``rgb8``, ``bgr8`` (channels stored reversed, as many drivers do) or ``jpeg``
    (CompressedImage on /camera/image_raw/compressed).

    Raises:
        ValueError: images and actions of different lengths, or an unknown encoding.
    """
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    if len(images) != len(actions) or (states is not None and len(states) != len(images)):
        raise ValueError("write_episode_bag: images, actions (and states) must have one entry per step")
    if encoding not in ("rgb8", "bgr8", "jpeg"):
        raise ValueError(f"write_episode_bag: encoding must be rgb8, bgr8 or jpeg, got {encoding!r}")
    typestore = get_typestore(Stores.LATEST)
    types = typestore.types
    image_topic = "/camera/image_raw/compressed" if encoding == "jpeg" else "/camera/image_raw"
    image_type = "sensor_msgs/msg/CompressedImage" if encoding == "jpeg" else "sensor_msgs/msg/Image"

    def header(time_ns: int, frame_id: str):
        time = types["builtin_interfaces/msg/Time"](sec=time_ns // 1_000_000_000, nanosec=time_ns % 1_000_000_000)
        return types["std_msgs/msg/Header"](stamp=time, frame_id=frame_id)

    def image_message(image: np.ndarray, time_ns: int):
        height, width = image.shape[:2]
        if encoding == "jpeg":
            import cv2

            ok, jpeg = cv2.imencode(".jpg", np.ascontiguousarray(image[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 95])
            if not ok:
                raise ValueError("write_episode_bag: JPEG encoding failed")
            return types[image_type](header=header(time_ns, "camera"), format="jpeg", data=jpeg.reshape(-1))
        pixels = image[..., ::-1] if encoding == "bgr8" else image
        return types[image_type](header=header(time_ns, "camera"), height=height, width=width, encoding=encoding,
                                 is_bigendian=0, step=width * 3, data=np.ascontiguousarray(pixels).reshape(-1))

    period_ns = int(round(1e9 / rate_hz))
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    with Writer(Path(path), version=9, storage_plugin=plugin) as writer:
        image_connection = writer.add_connection(image_topic, image_type, typestore=typestore)
        action_connection = writer.add_connection("/teleop/action", "std_msgs/msg/Float64MultiArray",
                                                  typestore=typestore)
        text_connection = writer.add_connection("/instruction", "std_msgs/msg/String", typestore=typestore)
        state_connection = None
        if states is not None:
            state_connection = writer.add_connection("/joint_states", "sensor_msgs/msg/JointState",
                                                     typestore=typestore)
        text = types["std_msgs/msg/String"](data=instruction)
        writer.write(text_connection, start_ns, typestore.serialize_cdr(text, "std_msgs/msg/String"))
        layout = types["std_msgs/msg/MultiArrayLayout"](dim=[], data_offset=0)
        # An idle (zero) command first, as a teleoperation device sends before the motion starts: the
        # converter's steps begin once every stream has spoken, so action i then falls in step i.
        # Idle commands move nothing and hold the gripper where the motion leaves it (a closed gripper
        # would be a command of its own, e.g. on the `actions` step clock, which makes each command a step).
        def idle_command(gripper_from: np.ndarray | None):
            data = np.zeros(len(actions[0]) if actions else 7)
            if gripper_from is not None:
                data[6] = float(gripper_from[6])
            return types["std_msgs/msg/Float64MultiArray"](layout=layout, data=data)

        idle = idle_command(np.asarray(actions[0]) if actions else None)
        writer.write(action_connection, start_ns, typestore.serialize_cdr(idle, "std_msgs/msg/Float64MultiArray"))
        for index, (image, action) in enumerate(zip(images, actions, strict=True)):
            time_ns = start_ns + 5_000_000 + index * period_ns
            writer.write(image_connection, time_ns,
                         typestore.serialize_cdr(image_message(image, time_ns), image_type))
            if state_connection is not None:
                state = types["sensor_msgs/msg/JointState"](
                    header=header(time_ns, "base_link"), name=[f"joint{i}" for i in range(len(states[index]))],
                    position=np.asarray(states[index], dtype=np.float64), velocity=np.zeros(0), effort=np.zeros(0))
                writer.write(state_connection, time_ns + 1_000_000,
                             typestore.serialize_cdr(state, "sensor_msgs/msg/JointState"))
            command = types["std_msgs/msg/Float64MultiArray"](layout=layout, data=np.asarray(action, np.float64))
            writer.write(action_connection, time_ns + 10_000_000,
                         typestore.serialize_cdr(command, "std_msgs/msg/Float64MultiArray"))
        # and an idle command after the last step, which closes that step's window
        idle = idle_command(np.asarray(actions[-1]) if actions else None)
        writer.write(action_connection, start_ns + 15_000_000 + len(images) * period_ns,
                     typestore.serialize_cdr(idle, "std_msgs/msg/Float64MultiArray"))
    return Path(path)
