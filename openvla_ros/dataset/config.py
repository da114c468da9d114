"""Settings of demonstration recording and bag -> RLDS conversion, shared with ``config/record.yaml``.

The YAML file has three sections: ``topics`` (what is recorded and converted), ``conversion`` (the
converter's defaults; command-line flags override them) and ``record`` (``ros2 bag record`` options,
read only by the launch file). Every field is checked when the config is built and a bad value
raises :class:`~openvla_ros.errors.DatasetError` naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openvla_ros.errors import DatasetError

DATASET_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")
ACTION_AGGREGATES = ("sum", "last")
STEP_CLOCKS = ("rate", "actions")
_STRING_FIELDS = ("image", "wrist_image", "action", "gripper", "state", "instruction")


@dataclass(frozen=True)
class TopicConfig:
    """The demonstration topics; an empty string means "not recorded".

    Names are matched against the bag's topics as written, then with or without a leading ``/``
    (``camera/image_raw`` finds ``/camera/image_raw``; ``AAA`` finds a bag topic stored as ``AAA``).

    Attributes:
        image: primary camera (``sensor_msgs/Image`` or ``sensor_msgs/CompressedImage``), stored as
            ``observation/image``.
        wrist_image: optional second camera, stored as ``observation/wrist_image``.
        action: the 7-DoF action source: ``std_msgs/Float64MultiArray`` with 7 values
            ``[dx, dy, dz, droll, dpitch, dyaw, gripper]``, ``geometry_msgs/TwistStamped`` (velocities,
            integrated over each step) or ``geometry_msgs/PoseStamped`` (end-effector poses, differenced
            between steps).
        gripper: gripper command (``std_msgs/Float64`` or ``Float32``, 1 = open, 0 = closed); required
            with TwistStamped and PoseStamped actions, ignored with Float64MultiArray.
        state: optional robot state: ``sensor_msgs/JointState`` (positions), ``geometry_msgs/PoseStamped``
            (x, y, z, roll, pitch, yaw) or ``std_msgs/Float64MultiArray``; stored as ``observation/state``.
        instruction: language instruction (``std_msgs/String``); may be replaced by a fixed instruction.
    """

    image: str = "/camera/image_raw"
    wrist_image: str = ""
    action: str = "/teleop/action"
    gripper: str = ""
    state: str = ""
    instruction: str = "/instruction"

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if not isinstance(value, str):
                raise DatasetError(f"topics.{item.name} must be a topic name string, got {value!r}")
            if value and (value != value.strip() or any(char.isspace() for char in value) or value == "/"):
                raise DatasetError(f"topics.{item.name} must be a topic name without spaces, got {value!r}")
        if not self.image:
            raise DatasetError("topics.image is empty; name the camera topic, e.g. /camera/image_raw")
        if not self.action:
            raise DatasetError("topics.action is empty; name the 7-DoF action topic")

    def camera_topics(self) -> dict[str, str]:
        """Returns ``{observation key: topic}`` of the configured cameras."""
        cameras = {"image": self.image}
        if self.wrist_image:
            cameras["wrist_image"] = self.wrist_image
        return cameras

    def recorded_topics(self) -> list[str]:
        """Returns every configured topic once, in a stable order."""
        names = [getattr(self, item.name) for item in dataclasses.fields(self)]
        return list(dict.fromkeys(name for name in names if name))


@dataclass(frozen=True)
class ConversionConfig:
    """How bags become steps and episodes.

    Attributes:
        topics: the topics to read.
        rate_hz: control rate of the dataset; steps are ``1 / rate_hz`` apart on the bag's clock.
        instruction: fixed instruction for every step; empty to read ``topics.instruction``.
        val_fraction: share of episodes written to the ``val`` split (at least one episode).
        split_seed: seed of the episode shuffle that picks the validation episodes.
        action_aggregate: how Float64MultiArray commands inside one step combine: ``sum`` (deltas, the
            motion over the step) or ``last`` (the newest command). The gripper is always the newest.
        step_clock: ``rate``: steps ``1 / rate_hz`` apart from the moment every stream has spoken;
            ``actions``: one step per Float64MultiArray command, observed just before it arrives (for a
            source that sends one command per control step, such as a scripted expert or a teleoperation
            loop: on the ``rate`` clock its commands can land on the step boundaries, where receive
            jitter decides which step each one belongs to).
        twist_timeout_s: a twist older than this counts as zero velocity (as servo controllers do).
        gripper_invert: store ``1 - gripper`` (for recordings where 1 means closed).
        joint_names: JointState joints to store, in order; empty for all joints of the first message.
        max_observation_age_s: a step whose newest image or state is older than this is dropped.
        split_on_instruction: start a new episode when the instruction changes.
        split_on_gap: start a new episode after dropped stale steps (a camera or state gap).
        drop_idle: drop steps whose motion is below the idle thresholds and whose gripper is unchanged.
        idle_translation: idle threshold on each of |dx|, |dy|, |dz| (recording units, e.g. metres).
        idle_rotation: idle threshold on each of |droll|, |dpitch|, |dyaw| (radians).
        image_size: side of the stored square images (224 for OpenVLA).
        jpeg_quality: JPEG quality of the stored images (1-100).
        max_shard_mb: size at which a new TFRecord shard is started.
        chunk_size: the action chunk length K of an OpenVLA-OFT model to be trained on the dataset (8 as
            for LIBERO); episodes with fewer steps are named in a warning, because OpenVLA-OFT's own RLDS
            loader fails on an episode shorter than K - 1 steps ("Requires start <= limit"). 0: no check.
    """

    topics: TopicConfig = field(default_factory=TopicConfig)
    rate_hz: float = 5.0
    instruction: str = ""
    val_fraction: float = 0.1
    split_seed: int = 0
    action_aggregate: str = "sum"
    step_clock: str = "rate"
    twist_timeout_s: float = 0.5
    gripper_invert: bool = False
    joint_names: tuple[str, ...] = ()
    max_observation_age_s: float = 0.5
    split_on_instruction: bool = False
    split_on_gap: bool = False
    drop_idle: bool = True
    idle_translation: float = 1e-4
    idle_rotation: float = 1e-3
    image_size: int = 224
    jpeg_quality: int = 95
    max_shard_mb: float = 256.0
    chunk_size: int = 8

    def __post_init__(self) -> None:
        if not isinstance(self.topics, TopicConfig):
            raise DatasetError("topics must be a TopicConfig")
        _check_positive("rate_hz", self.rate_hz, upper=100.0)
        if not isinstance(self.val_fraction, int | float) or not 0.0 <= self.val_fraction < 1.0:
            raise DatasetError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if self.action_aggregate not in ACTION_AGGREGATES:
            raise DatasetError(
                f"action_aggregate must be one of {', '.join(ACTION_AGGREGATES)}, got {self.action_aggregate!r}"
            )
        if self.step_clock not in STEP_CLOCKS:
            raise DatasetError(f"step_clock must be one of {', '.join(STEP_CLOCKS)}, got {self.step_clock!r}")
        _check_positive("twist_timeout_s", self.twist_timeout_s)
        _check_positive("max_observation_age_s", self.max_observation_age_s)
        _check_positive("idle_translation", self.idle_translation, allow_zero=True)
        _check_positive("idle_rotation", self.idle_rotation, allow_zero=True)
        _check_positive("max_shard_mb", self.max_shard_mb)
        if not isinstance(self.image_size, int) or self.image_size < 8:
            raise DatasetError(f"image_size must be an integer >= 8, got {self.image_size!r}")
        if not isinstance(self.chunk_size, int) or isinstance(self.chunk_size, bool) or self.chunk_size < 0:
            raise DatasetError(f"chunk_size must be an integer >= 0 (0: no check), got {self.chunk_size!r}")
        if not isinstance(self.jpeg_quality, int) or not 1 <= self.jpeg_quality <= 100:
            raise DatasetError(f"jpeg_quality must be an integer in 1..100, got {self.jpeg_quality!r}")
        if not isinstance(self.instruction, str):
            raise DatasetError(f"instruction must be a string, got {self.instruction!r}")
        if not self.instruction.strip() and not self.topics.instruction:
            raise DatasetError(
                "no instruction source: set topics.instruction or give a fixed instruction (--instruction)"
            )
        object.__setattr__(self, "joint_names", tuple(str(name) for name in self.joint_names))

    @property
    def step_ns(self) -> int:
        """The step period in nanoseconds."""
        return round(1e9 / self.rate_hz)

    def replace(self, **changes: Any) -> ConversionConfig:
        """Returns a copy with ``changes`` applied (values of None are ignored) and checked again."""
        return dataclasses.replace(self, **{key: value for key, value in changes.items() if value is not None})


def _check_positive(name: str, value: Any, *, upper: float = math.inf, allow_zero: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0) and value <= upper
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        limit = f" and <= {upper:g}" if math.isfinite(upper) else ""
        raise DatasetError(f"{name} must be a number {bound}{limit}, got {value!r}")


def config_from_mapping(data: Mapping[str, Any] | None, **overrides: Any) -> ConversionConfig:
    """Returns the conversion config of a parsed ``record.yaml`` (``topics`` and ``conversion``).

    ``overrides`` replace keys of the ``conversion`` section (None values are ignored) before the
    config is checked, so a command-line ``--instruction`` can stand in for a missing instruction topic.

    Raises:
        DatasetError: on unknown keys or bad values, naming them.
    """
    data = dict(data or {})
    given = {key: value for key, value in overrides.items() if value is not None}
    if given:
        data["conversion"] = {**dict(data.get("conversion") or {}), **given}
    unknown = sorted(set(data) - {"topics", "conversion", "record"})
    if unknown:
        raise DatasetError(f"unknown section(s) {', '.join(unknown)}; expected topics, conversion, record")
    topics = _section(data, "topics", TopicConfig)
    conversion = _section(data, "conversion", ConversionConfig, exclude=("topics",))
    if "joint_names" in conversion:
        conversion["joint_names"] = tuple(conversion["joint_names"] or ())
    return ConversionConfig(topics=TopicConfig(**topics), **conversion)


def _section(data: Mapping[str, Any], name: str, kind: type, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    section = data.get(name) or {}
    if not isinstance(section, Mapping):
        raise DatasetError(f"section {name!r} must be a mapping, got {type(section).__name__}")
    allowed = {item.name for item in dataclasses.fields(kind)} - set(exclude)
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise DatasetError(
            f"unknown key(s) in {name}: {', '.join(unknown)}; allowed keys: {', '.join(sorted(allowed))}"
        )
    # YAML reads an empty value as None; for string fields that means "not set".
    return {key: "" if value is None and key in _STRING_FIELDS else value for key, value in section.items()}


def load_config(path: str | Path | None, **overrides: Any) -> ConversionConfig:
    """Returns the conversion config of a YAML file (defaults when ``path`` is None) with ``overrides``.

    Raises:
        DatasetError: when the file is missing, is not valid YAML, or holds bad keys or values.
    """
    if path is None:
        return config_from_mapping({}, **overrides)
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise DatasetError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DatasetError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is not None and not isinstance(data, Mapping):
        raise DatasetError(f"config file {path} must hold a mapping with topics/conversion sections")
    return config_from_mapping(data, **overrides)


def validate_dataset_name(name: str) -> str:
    """Returns ``name`` when it is a valid TFDS dataset name (lower snake_case).

    Raises:
        DatasetError: otherwise, with a suggestion.
    """
    if not isinstance(name, str) or not DATASET_NAME_PATTERN.match(name):
        suggestion = re.sub(r"[^a-z0-9_]+", "_", str(name).lower()).strip("_") or "my_robot_demos"
        if not suggestion[0].isalpha():
            suggestion = f"d_{suggestion}"
        raise DatasetError(
            f"dataset name {name!r} is not valid for tensorflow-datasets (lower case letters, digits and "
            f"underscores, starting with a letter); try {suggestion!r}"
        )
    return name
