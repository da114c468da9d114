"""Resampling of recorded streams onto a common clock at the control rate.

Steps lie ``step_ns`` apart on the bag's receive clock, starting at the first moment every required
stream (each camera, the action source, the gripper and state when used, the instruction topic when
no fixed instruction is given) has spoken. Step ``k`` at time ``t_k``:

* observation: the newest image of each camera and the newest state stamped at or before ``t_k``;
  the instruction in force at ``t_k``. Nothing stamped after ``t_k`` enters step ``k``'s observation.
* action: what happened over the step, from messages in ``(t_k, t_k+1]``:
  ``Float64MultiArray`` commands are summed (deltas) or the newest is taken; ``TwistStamped`` velocities
  are integrated with a zero-order hold (a twist older than the timeout counts as zero);
  ``PoseStamped`` end-effector poses give the delta from the pose at ``t_k`` to the pose at ``t_k+1``
  (translation in the base frame, rotation ``R_k+1 R_k^T`` as roll, pitch, yaw). The gripper is the
  newest command at or before ``t_k+1``.

A step is emitted once its window has closed, so the last, incomplete window of a recording is not
a step. Steps carry ``stale`` and ``idle`` flags; the caller decides what to drop.

With ``step_clock: actions`` (Float64MultiArray commands only) every command is a step of its own:
the observation is taken as the command arrives (the newest image and state received before it),
the action is the command itself, and there is no resampling.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from openvla_ros.dataset.config import ConversionConfig
from openvla_ros.errors import DatasetError


class ActionKind(str, Enum):
    """The supported action sources."""

    VECTOR = "vector"  # std_msgs/Float64MultiArray with 7 values
    TWIST = "twist"  # geometry_msgs/TwistStamped velocities + gripper topic
    POSE = "pose"  # geometry_msgs/PoseStamped end-effector poses + gripper topic


class Role(str, Enum):
    """What a message contributes to a step."""

    CAMERA = "camera"
    ACTION = "action"
    GRIPPER = "gripper"
    STATE = "state"
    INSTRUCTION = "instruction"


@dataclass
class AlignedStep:
    """One step on the control clock.

    Attributes:
        time_ns: the step time ``t_k`` on the bag clock.
        images: ``{camera key: handle}`` of the newest frame at or before ``t_k`` (the handle is whatever
            the caller passed in, e.g. an undecoded message).
        image_times_ns: ``{camera key: receive time}`` of those frames.
        state: newest state at or before ``t_k`` (float64), or None without a state topic.
        state_time_ns: its receive time, or None.
        action: float64 ``[dx, dy, dz, droll, dpitch, dyaw, gripper]`` over ``(t_k, t_k+1]``.
        instruction: the instruction in force at ``t_k``.
        stale: an image or the state is older than the allowed observation age.
        idle: motion below the idle thresholds and the gripper unchanged from the previous step.
    """

    time_ns: int
    images: dict[str, Any]
    image_times_ns: dict[str, int]
    state: np.ndarray | None
    state_time_ns: int | None
    action: np.ndarray = field(default_factory=lambda: np.zeros(7))
    instruction: str = ""
    stale: bool = False
    idle: bool = False


def quaternion_to_matrix(quaternion: Sequence[float]) -> np.ndarray:
    """Returns the 3x3 rotation matrix of a quaternion ``(x, y, z, w)`` (normalised first).

    Raises:
        ValueError: for a zero or non-finite quaternion.
    """
    x, y, z, w = np.asarray(quaternion, dtype=np.float64)
    norm = np.sqrt(x * x + y * y + z * z + w * w)
    if not np.isfinite(norm) or norm == 0.0:
        raise ValueError(f"quaternion {tuple(quaternion)} has no valid orientation")
    x, y, z, w = x / norm, y / norm, z / norm, w / norm
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def matrix_to_euler(rotation: np.ndarray) -> np.ndarray:
    """Returns ``(roll, pitch, yaw)`` with ``rotation = Rz(yaw) Ry(pitch) Rx(roll)``."""
    roll = np.arctan2(rotation[2, 1], rotation[2, 2])
    pitch = np.arcsin(np.clip(-rotation[2, 0], -1.0, 1.0))
    yaw = np.arctan2(rotation[1, 0], rotation[0, 0])
    return np.array([roll, pitch, yaw])


def pose_to_state(pose: np.ndarray) -> np.ndarray:
    """Returns ``[x, y, z, roll, pitch, yaw]`` of a pose ``[x, y, z, qx, qy, qz, qw]``."""
    return np.concatenate([pose[:3], matrix_to_euler(quaternion_to_matrix(pose[3:]))])


def pose_delta(start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Returns ``[dx, dy, dz, droll, dpitch, dyaw]`` taking pose ``start`` to pose ``end``.

    Both poses are ``[x, y, z, qx, qy, qz, qw]`` in the same base frame; the translation is the
    difference of positions and the rotation is ``R_end R_start^T`` (the rotation applied in the base
    frame) as roll, pitch, yaw.
    """
    rotation = quaternion_to_matrix(end[3:]) @ quaternion_to_matrix(start[3:]).T
    return np.concatenate([end[:3] - start[:3], matrix_to_euler(rotation)])


class StepAligner:
    """Turns a time-ordered stream of messages into :class:`AlignedStep` s at the control rate.

    Feed every message with :meth:`add` in bag order and call :meth:`finish` at the end; both return
    the steps completed so far.
    """

    def __init__(self, config: ConversionConfig, action_kind: ActionKind, camera_keys: Sequence[str],
                 *, use_state: bool) -> None:
        self._config = config
        self._kind = ActionKind(action_kind)
        self._camera_keys = tuple(camera_keys)
        self._use_state = use_state
        self._fixed_instruction = config.instruction.strip() or None
        self._step_ns = config.step_ns
        self._max_age_ns = round(config.max_observation_age_s * 1e9)
        self._twist_timeout_ns = round(config.twist_timeout_s * 1e9)

        self._seen: set[Hashable] = set()
        self._last_time_ns: int | None = None
        self._next_boundary_ns: int | None = None
        self._images: dict[str, tuple[int, Any]] = {}
        self._state: tuple[int, np.ndarray] | None = None
        self._instruction = ""
        self._gripper: float | None = None
        self._commands: list[np.ndarray] = []
        self._pose: np.ndarray | None = None
        self._twist: tuple[int, np.ndarray] | None = None
        self._integrated_until_ns: int | None = None
        self._motion = np.zeros(6)
        self._current: AlignedStep | None = None
        self._pose_at_step: np.ndarray | None = None
        self._previous_gripper: float | None = None
        self._action_clock = config.step_clock == "actions"
        if self._action_clock and self._kind is not ActionKind.VECTOR:
            raise DatasetError(
                f"step_clock 'actions' makes one step of each Float64MultiArray command; this action source "
                f"sends {self._kind.value} messages, which need step_clock 'rate'"
            )

    @property
    def started(self) -> bool:
        """True once every required stream has spoken (the first step time is fixed)."""
        if self._action_clock:
            return not self.missing_streams()
        return self._next_boundary_ns is not None

    def missing_streams(self) -> list[str]:
        """Returns the required streams that have not spoken yet (empty once started)."""
        return [name for name in self._required() if name not in self._seen]

    def _required(self) -> list[Hashable]:
        required: list[Hashable] = [f"{Role.CAMERA.value}:{key}" for key in self._camera_keys]
        required.append(Role.ACTION.value)
        if self._kind is not ActionKind.VECTOR:
            required.append(Role.GRIPPER.value)
        if self._use_state:
            required.append(Role.STATE.value)
        if self._fixed_instruction is None:
            required.append(Role.INSTRUCTION.value)
        return required

    def add(self, time_ns: int, role: Role, value: Any, camera_key: str = "image") -> list[AlignedStep]:
        """Applies one message received at ``time_ns`` and returns the steps it completed."""
        if self._action_clock:
            return self._add_on_action_clock(time_ns, Role(role), value, camera_key)
        steps: list[AlignedStep] = []
        while self._next_boundary_ns is not None and time_ns > self._next_boundary_ns:
            steps.extend(self._cross_boundary(self._next_boundary_ns))
        self._apply(time_ns, Role(role), value, camera_key)
        self._last_time_ns = time_ns if self._last_time_ns is None else max(self._last_time_ns, time_ns)
        if self._next_boundary_ns is None and all(name in self._seen for name in self._required()):
            self._next_boundary_ns = time_ns
        return steps

    def _add_on_action_clock(self, time_ns: int, role: Role, value: Any, camera_key: str) -> list[AlignedStep]:
        """``step_clock: actions``: a command completes the step observed as it arrives."""
        if role is not Role.ACTION:
            self._apply(time_ns, role, value, camera_key)
            return []
        ready = all(name in self._seen for name in self._required() if name != Role.ACTION.value)
        step = self._observe(time_ns) if ready else None
        self._apply(time_ns, role, value, camera_key)
        if step is None:
            self._commands = []
            return []
        closed = self._close_step(step, time_ns)
        self._commands = []
        return [closed]

    def finish(self) -> list[AlignedStep]:
        """Closes every step whose window ended at or before the last message; returns them."""
        steps: list[AlignedStep] = []
        while (
            self._next_boundary_ns is not None
            and self._last_time_ns is not None
            and self._next_boundary_ns <= self._last_time_ns
        ):
            steps.extend(self._cross_boundary(self._next_boundary_ns))
        self._next_boundary_ns = None
        return steps

    def _apply(self, time_ns: int, role: Role, value: Any, camera_key: str) -> None:
        if role is Role.CAMERA:
            self._images[camera_key] = (time_ns, value)
            self._seen.add(f"{Role.CAMERA.value}:{camera_key}")
            return
        self._seen.add(role.value)
        if role is Role.STATE:
            self._state = (time_ns, np.asarray(value, dtype=np.float64))
        elif role is Role.INSTRUCTION:
            self._instruction = str(value)
        elif role is Role.GRIPPER:
            self._gripper = self._gripper_value(value)
        elif self._kind is ActionKind.VECTOR:
            command = np.asarray(value, dtype=np.float64)
            self._commands.append(command)
            self._gripper = self._gripper_value(command[6])
        elif self._kind is ActionKind.TWIST:
            self._integrate_twist(time_ns)
            self._twist = (time_ns, np.asarray(value, dtype=np.float64))
        else:
            self._pose = np.asarray(value, dtype=np.float64)

    def _gripper_value(self, value: float) -> float:
        value = float(value)
        return 1.0 - value if self._config.gripper_invert else value

    def _integrate_twist(self, until_ns: int) -> None:
        """Adds the held twist's motion from the last integration time up to ``until_ns``."""
        if self._integrated_until_ns is None:
            return
        if self._twist is not None:
            twist_time, velocity = self._twist
            start = max(self._integrated_until_ns, twist_time)
            end = min(until_ns, twist_time + self._twist_timeout_ns)
            if end > start:
                self._motion += velocity * ((end - start) / 1e9)
        self._integrated_until_ns = max(self._integrated_until_ns, until_ns)

    def _cross_boundary(self, boundary_ns: int) -> list[AlignedStep]:
        """Closes the step ending at ``boundary_ns`` (if any) and opens the one starting there."""
        steps = []
        if self._current is not None:
            steps.append(self._close_step(self._current, boundary_ns))
        self._current = self._observe(boundary_ns)
        self._commands = []
        self._motion = np.zeros(6)
        self._integrated_until_ns = boundary_ns
        self._pose_at_step = None if self._pose is None else self._pose.copy()
        self._next_boundary_ns = boundary_ns + self._step_ns
        return steps

    def _observe(self, time_ns: int) -> AlignedStep:
        images = {key: handle for key, (_, handle) in self._images.items()}
        image_times = {key: stamp for key, (stamp, _) in self._images.items()}
        ages = [time_ns - stamp for stamp in image_times.values()]
        state = state_time = None
        if self._use_state and self._state is not None:
            state_time, state = self._state
            ages.append(time_ns - state_time)
        return AlignedStep(
            time_ns=time_ns,
            images=images,
            image_times_ns=image_times,
            state=state,
            state_time_ns=state_time,
            instruction=self._fixed_instruction or self._instruction,
            stale=any(age > self._max_age_ns for age in ages),
        )

    def _close_step(self, step: AlignedStep, end_ns: int) -> AlignedStep:
        if self._kind is ActionKind.VECTOR:
            if not self._commands:
                motion = np.zeros(6)
            elif self._config.action_aggregate == "sum":
                motion = np.sum([command[:6] for command in self._commands], axis=0)
            else:
                motion = self._commands[-1][:6].copy()
        elif self._kind is ActionKind.TWIST:
            self._integrate_twist(end_ns)
            motion = self._motion.copy()
        else:
            motion = pose_delta(self._pose_at_step, self._pose)
        gripper = float(self._gripper)
        step.action = np.concatenate([motion, [gripper]])
        config = self._config
        still = (
            np.all(np.abs(motion[:3]) < config.idle_translation)
            and np.all(np.abs(motion[3:6]) < config.idle_rotation)
        )
        step.idle = bool(still and (self._previous_gripper is None or gripper == self._previous_gripper))
        self._previous_gripper = gripper
        return step
