"""Control-loop pieces of the policy node that need no ROS: settings, safety, gripper, rates, worker.

Everything here is plain Python + numpy so it can be unit-tested without rclpy; ``policy_node``
wires it to topics, parameters and timers.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

from openvla_ros.model.action_codec import ACTION_NAMES

TWIST_MODES = ("delta", "velocity")
GRIPPER_MODES = ("raw", "binary", "signed_binary")
MIN_RATE_HZ = 1.0
MAX_RATE_HZ = 30.0  # one inference per action: the model bounds the rate long before this
MAX_CHUNK_RATE_HZ = 100.0  # chunk mode: actions come from a queue, one inference serves many ticks
CHUNK_BLENDS = ("none", "ensemble")
TRANSLATION_AXES = slice(0, 3)
ROTATION_AXES = slice(3, 6)
GRIPPER_INDEX = 6

JobT = TypeVar("JobT")


@dataclass(frozen=True)
class ControlSettings:
    """The run-time tunable part of the node's parameters, validated as a whole.

    Raises ``ValueError`` naming the bad field from ``__post_init__``; the node turns that into the
    reason of a rejected parameter change.
    """

    # Control rate in Hz: one inference is started per tick (ticks are skipped while one runs).
    rate_hz: float = 5.0
    # ``delta``: the twist carries the per-step delta; ``velocity``: delta x rate_hz (for MoveIt Servo).
    twist_mode: str = "delta"
    # frame_id written into ~/delta_twist: the frame the dataset's deltas are expressed in.
    frame_id: str = "base_link"
    # Mapping of the model's gripper value to ~/gripper, see :func:`map_gripper`.
    gripper_mode: str = "raw"
    # Invert the open/closed sense of ~/gripper.
    gripper_flip: bool = False
    # An image older than this (by its header stamp) stops the output, in seconds.
    max_image_age_s: float = 0.5
    # Per-axis clip of |dx|, |dy|, |dz| in the dataset's units (metres for most datasets).
    max_translation: float = 0.05
    # Per-axis clip of |droll|, |dpitch|, |dyaw| in radians.
    max_rotation: float = 0.25
    # Chunk mode: actions of each chunk planned before the next chunk takes over; 0 = all K.
    actions_per_inference: int = 0
    # Chunk mode: ``none`` (a chunk replaces what is queued) or ``ensemble`` (ACT's temporal ensembling).
    chunk_blend: str = "none"
    # Chunk mode, ``ensemble``: weight exp(-ensemble_decay * i) of the i-th oldest prediction of a tick.
    ensemble_decay: float = 0.01
    # A proprio message older than this stops the output, in seconds.
    max_proprio_age_s: float = 0.5
    # The upper bound of rate_hz (not a parameter): MAX_RATE_HZ, or MAX_CHUNK_RATE_HZ in chunk mode.
    rate_limit_hz: float = field(default=MAX_RATE_HZ)

    def __post_init__(self) -> None:
        if not math.isfinite(self.rate_hz) or not MIN_RATE_HZ <= self.rate_hz <= self.rate_limit_hz:
            hint = "" if self.rate_limit_hz >= MAX_CHUNK_RATE_HZ else (
                f"; up to {MAX_CHUNK_RATE_HZ:g} Hz with a chunked (OpenVLA-OFT) model"
            )
            raise ValueError(
                f"rate_hz must be within [{MIN_RATE_HZ:g}, {self.rate_limit_hz:g}] Hz, got {self.rate_hz}{hint}"
            )
        if self.actions_per_inference < 0:
            raise ValueError(
                f"actions_per_inference must be >= 0 (0 = the whole chunk), got {self.actions_per_inference}"
            )
        if self.chunk_blend not in CHUNK_BLENDS:
            raise ValueError(f"chunk_blend must be one of {', '.join(CHUNK_BLENDS)}; got {self.chunk_blend!r}")
        if not math.isfinite(self.ensemble_decay) or self.ensemble_decay < 0.0:
            raise ValueError(f"ensemble_decay must be a finite number >= 0, got {self.ensemble_decay}")
        if not math.isfinite(self.max_proprio_age_s) or self.max_proprio_age_s <= 0.0:
            raise ValueError(
                f"max_proprio_age_s must be a positive number of seconds, got {self.max_proprio_age_s}"
            )
        if self.twist_mode not in TWIST_MODES:
            raise ValueError(f"twist_mode must be one of {', '.join(TWIST_MODES)}; got {self.twist_mode!r}")
        if self.gripper_mode not in GRIPPER_MODES:
            raise ValueError(
                f"gripper_mode must be one of {', '.join(GRIPPER_MODES)}; got {self.gripper_mode!r}"
            )
        if not self.frame_id.strip():
            raise ValueError("frame_id must not be empty: name the frame the actions are expressed in")
        if not math.isfinite(self.max_image_age_s) or self.max_image_age_s <= 0.0:
            raise ValueError(
                f"max_image_age_s must be a positive number of seconds, got {self.max_image_age_s}"
            )
        for name in ("max_translation", "max_rotation"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0.0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")


def limit_action(action: np.ndarray, max_translation: float, max_rotation: float) -> np.ndarray:
    """Returns a copy of a 7-D action with translations and rotations clipped per axis.

    The gripper value is passed through unchanged.

    Raises:
        ValueError: when ``action`` is not 7 finite numbers (NaN or inf are never let through).
    """
    action = np.asarray(action, dtype=np.float64)
    if action.shape != (len(ACTION_NAMES),):
        raise ValueError(f"action must have shape ({len(ACTION_NAMES)},), got {action.shape}")
    if not np.all(np.isfinite(action)):
        bad = [name for name, value in zip(ACTION_NAMES, action, strict=True) if not math.isfinite(value)]
        raise ValueError(f"action has non-finite values in {', '.join(bad)}: {action.tolist()}")
    limited = action.copy()
    limited[TRANSLATION_AXES] = np.clip(limited[TRANSLATION_AXES], -max_translation, max_translation)
    limited[ROTATION_AXES] = np.clip(limited[ROTATION_AXES], -max_rotation, max_rotation)
    return limited


def map_gripper(value: float, mode: str, flip: bool = False) -> float:
    """Returns the gripper command for ``~/gripper`` from the model's gripper value.

    Modes (the model's value is in [0, 1] with 1 = open for Bridge-style data):
        ``raw``: the value itself (``flip``: 1 - value).
        ``binary``: 1.0 when value > 0.5 else 0.0 (``flip``: swapped).
        ``signed_binary``: LIBERO's mapping, [0, 1] -> [-1, 1] then sign, so -1, 0 (exactly 0.5) or +1
        (``flip``: sign-inverted, as LIBERO's controller wants -1 = open).

    Raises:
        ValueError: for an unknown mode or a non-finite value.
    """
    if not math.isfinite(value):
        raise ValueError(f"gripper value is not finite: {value}")
    if mode == "raw":
        return 1.0 - value if flip else float(value)
    if mode == "binary":
        closed_or_open = 1.0 if value > 0.5 else 0.0
        return 1.0 - closed_or_open if flip else closed_or_open
    if mode == "signed_binary":
        signed = float(np.sign(2.0 * value - 1.0))
        return -signed if flip else signed
    raise ValueError(f"gripper_mode must be one of {', '.join(GRIPPER_MODES)}; got {mode!r}")


def twist_components(action: np.ndarray, twist_mode: str, rate_hz: float) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(linear[3], angular[3])`` for the twist: the delta itself or delta x rate_hz.

    Raises:
        ValueError: for an unknown twist mode.
    """
    if twist_mode == "delta":
        scale = 1.0
    elif twist_mode == "velocity":
        scale = rate_hz
    else:
        raise ValueError(f"twist_mode must be one of {', '.join(TWIST_MODES)}; got {twist_mode!r}")
    action = np.asarray(action, dtype=np.float64)
    return action[TRANSLATION_AXES] * scale, action[ROTATION_AXES] * scale


class RateMeter:
    """Achieved event rate over a sliding time window (thread-safe)."""

    def __init__(self, window_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._times: deque[float] = deque()
        self._lock = threading.Lock()

    def tick(self, now: float | None = None) -> None:
        """Records one event at ``now`` (default: the clock's current time)."""
        now = self._clock() if now is None else now
        with self._lock:
            self._times.append(now)
            self._trim(now)

    def rate_hz(self, now: float | None = None) -> float:
        """Returns events per second over the window (0.0 with fewer than two events)."""
        now = self._clock() if now is None else now
        with self._lock:
            self._trim(now)
            if len(self._times) < 2:
                return 0.0
            span = self._times[-1] - self._times[0]
            return (len(self._times) - 1) / span if span > 0 else 0.0

    def reset(self) -> None:
        with self._lock:
            self._times.clear()

    def _trim(self, now: float) -> None:
        while self._times and now - self._times[0] > self.window_s:
            self._times.popleft()


class LatencyStats:
    """The last few hundred samples of a duration, with median and percentile read-outs (thread-safe)."""

    def __init__(self, size: int = 300) -> None:
        self._samples: deque[float] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, value: float) -> None:
        with self._lock:
            self._samples.append(value)

    def percentile(self, q: float) -> float:
        """Returns the q-th percentile (0-100) of the kept samples, NaN when there are none."""
        with self._lock:
            if not self._samples:
                return math.nan
            return float(np.percentile(np.fromiter(self._samples, dtype=np.float64), q))

    @property
    def last(self) -> float:
        with self._lock:
            return self._samples[-1] if self._samples else math.nan

    def __len__(self) -> int:
        with self._lock:
            return len(self._samples)


class LatestSlot(Generic[JobT]):
    """Holds only the newest value; counts values replaced before anyone took them (thread-safe)."""

    def __init__(self) -> None:
        self._value: JobT | None = None
        self._taken = True
        self._lock = threading.Lock()
        self.dropped = 0

    def put(self, value: JobT) -> None:
        with self._lock:
            if not self._taken:
                self.dropped += 1
            self._value = value
            self._taken = False

    def peek(self) -> JobT | None:
        """Returns the newest value without marking it taken (None before the first put)."""
        with self._lock:
            return self._value

    def take(self) -> JobT | None:
        """Returns the newest value and marks it used, so replacing it later is not counted as a drop."""
        with self._lock:
            self._taken = True
            return self._value

    def take_new(self) -> JobT | None:
        """Returns the newest value and marks it used, or None when it was already taken (or never put)."""
        with self._lock:
            if self._taken:
                return None
            self._taken = True
            return self._value

    def clear(self) -> None:
        with self._lock:
            self._value = None
            self._taken = True


class SingleJobWorker(Generic[JobT]):
    """A background thread that runs one job at a time and refuses new jobs while busy.

    ``submit`` never blocks and never queues: when the worker is still running the previous job it
    returns False and the caller counts a skipped tick. Exceptions escaping ``handler`` are passed to
    ``on_error`` and do not stop the thread.
    """

    def __init__(
        self,
        handler: Callable[[JobT], None],
        on_error: Callable[[Exception], None],
        name: str = "policy-worker",
    ) -> None:
        self._handler = handler
        self._on_error = on_error
        self._condition = threading.Condition()
        self._job: JobT | None = None
        self._busy = False
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        with self._condition:
            return self._busy

    def submit(self, job: JobT) -> bool:
        """Hands ``job`` to the worker; returns False (and drops the job) when it is busy or stopped."""
        with self._condition:
            if self._busy or self._stopping:
                return False
            self._job = job
            self._busy = True
            self._condition.notify()
            return True

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        """Blocks until the current job (if any) is done; returns False on timeout."""
        with self._condition:
            return self._condition.wait_for(lambda: not self._busy, timeout=timeout_s)

    def stop(self, timeout_s: float | None = None) -> None:
        """Lets the running job finish, then ends the thread."""
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._job is not None or self._stopping)
                if self._job is None:
                    return
                job, self._job = self._job, None
            try:
                self._handler(job)
            except Exception as exc:  # the worker must outlive any one failing step
                self._on_error(exc)
            finally:
                with self._condition:
                    self._busy = False
                    self._condition.notify_all()


class ProblemTracker:
    """Decides when a recurring problem is worth a log line, and remembers which ones are active.

    A problem is logged the first time it occurs, when its message changes, and then at most once
    per ``repeat_after_s`` while it persists; :meth:`resolve` ends it so the caller can log the
    recovery once. Thread-safe.
    """

    def __init__(self, repeat_after_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.repeat_after_s = repeat_after_s
        self._clock = clock
        self._active: dict[str, tuple[str, float]] = {}
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def report(self, key: str, message: str) -> bool:
        """Records one occurrence of problem ``key``; returns True when the caller should log it now."""
        now = self._clock()
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + 1
            previous = self._active.get(key)
            if previous is not None and previous[0] == message and now - previous[1] < self.repeat_after_s:
                return False
            self._active[key] = (message, now)
            return True

    def resolve(self, key: str) -> bool:
        """Ends problem ``key``; returns True when it was active (the caller logs the recovery)."""
        with self._lock:
            return self._active.pop(key, None) is not None

    def active(self) -> dict[str, str]:
        """Returns the active problems as {key: last message}."""
        with self._lock:
            return {key: message for key, (message, _) in self._active.items()}

    def count(self, key: str) -> int:
        """Returns how many times ``key`` was reported in total."""
        with self._lock:
            return self._counts.get(key, 0)
