"""The policy node's control logic shared by both modes, without DDS.

:class:`ControlCore` holds what every control tick reads and every stop changes: enabled, the
instruction, the settings, the newest camera frame, whether actions are being published, and the stop
count that voids a step still running. It applies the safety rules (inputs checked on each tick, one
zero delta on a stop, limits before publishing, nothing published after a stop) and counts what
``/diagnostics`` reports. What goes out goes through an :class:`Outputs` (the node's publishers, or a
recorder in tests); the clock is a function. The mode controllers (:mod:`openvla_ros.ros.token_mode`,
:mod:`openvla_ros.ros.chunk_mode_control`) run the model on top of it through one interface,
:class:`ModeController`.

Thread safety: the control timer and the inference worker both call in; everything they share is read
and written under :attr:`ControlCore.lock`.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from openvla_ros.errors import OpenVLAError
from openvla_ros.model.processor import validate_instruction
from openvla_ros.ros.control import (
    GRIPPER_INDEX,
    ControlSettings,
    LatencyStats,
    LatestSlot,
    ProblemTracker,
    RateMeter,
    limit_action,
    map_gripper,
)
from openvla_ros.ros.input_freshness import CAMERA, InputSource


@dataclass(frozen=True)
class Frame:
    """A received camera message, kept undecoded until a control step uses it."""

    message: Any  # sensor_msgs Image or CompressedImage
    stamp_ns: int
    received_ns: int


class Outputs(Protocol):
    """Where the controllers' messages go (the node's publishers)."""

    def action(self, action: np.ndarray, gripper: float, settings: ControlSettings, stamp: Any) -> None:
        """Publishes one limited action (``~/action``, ``~/delta_twist``, ``~/gripper``)."""

    def zero_delta(self, gripper: float, frame_id: str) -> None:
        """Publishes the zero delta of a stop (gripper held)."""

    def timing(self, kind: str, stamp: Any, values: dict[str, float]) -> None:
        """Publishes the timings of one step or chunk (``~/step_timing``)."""


class Log(Protocol):
    """A logger (rclpy's node logger has these)."""

    def info(self, message: str) -> Any: ...

    def warning(self, message: str) -> Any: ...

    def error(self, message: str) -> Any: ...

    def debug(self, message: str) -> Any: ...


class ModeController(Protocol):
    """One way of running the model: token mode (a step per tick) or chunk mode (a queue of actions)."""

    def tick(self, now_ns: int) -> None:
        """One control tick: check the inputs, publish or start what this tick needs."""

    def on_stop(self) -> None:
        """A stop happened (called under the core's lock): drop whatever would still be published."""

    def on_new_instruction(self) -> None:
        """The instruction changed (called under the core's lock)."""

    def diagnostic_values(self) -> dict[str, str]:
        """The mode's own values of ``/diagnostics``."""

    def wait_idle(self, timeout_s: float) -> None:
        """Waits for a running inference to finish."""

    def close(self, timeout_s: float) -> None:
        """Stops the worker thread."""


class ControlCore:
    """Enable, instruction, safety stop, input checks, problem reports and counters of the control loop."""

    def __init__(self, outputs: Outputs, log: Log, now_ns: Callable[[], int]) -> None:
        self.outputs = outputs
        self.log = log
        self.now_ns = now_ns
        self.lock = threading.RLock()
        self.problems = ProblemTracker()
        self.settings = ControlSettings()
        self.frames: LatestSlot[Frame] = LatestSlot()
        self.mode: ModeController | None = None
        self.instruction: str | None = None
        self.strip_instruction = False
        self.publish_timing = False
        self.enabled = False
        self.active = False  # the control timer runs
        self.output_live = False  # actions are being published (a stop then sends a zero delta)
        self.stop_count = 0  # a step that started before a stop is void
        self.last_gripper = math.nan
        self.action_rate = RateMeter(window_s=5.0)
        self.latency_ms = LatencyStats()
        self.model_ms = LatencyStats()
        self.steps = 0

    # ------------------------------------------------------------------ commands from the node

    def activate(self, start_enabled: bool) -> None:
        with self.lock:
            self.active = True
            self.enabled = start_enabled
            self.action_rate.reset()

    def deactivate(self) -> None:
        """The control timer is gone: nothing is published until the next activation."""
        with self.lock:
            self.active = False
            self.enabled = False

    def disable(self) -> None:
        """Stops new steps at once (a signal): the timer may still fire, but publishes nothing."""
        with self.lock:
            self.enabled = False

    def set_enabled(self, on: bool, state_label: str) -> tuple[bool, str]:
        """The ``~/enable`` service: returns (success, message). Disabling stops the output."""
        with self.lock:
            if on and not self.active:
                return False, f"node is {state_label}; activate it before enabling output"
            was_enabled, self.enabled = self.enabled, on
        if not on:
            self.stop_output("disabled")
        if was_enabled != on:
            self.log.info("output enabled" if on else "output disabled")
        waiting = "" if self.instruction is not None else " (waiting for an instruction)"
        return True, ("enabled" + waiting) if on else "disabled"

    def set_instruction(self, text: str) -> None:
        """A received instruction: a valid one replaces the current one, an invalid one stops the output."""
        try:
            instruction = validate_instruction(text, strip=self.strip_instruction)
        except OpenVLAError as exc:
            self.log.error(f"instruction rejected, output stopped until a valid one arrives: {exc}")
            self.problems.report("instruction", str(exc))
            with self.lock:
                self.instruction = None
            self.stop_output("invalid instruction")
            return
        with self.lock:
            changed = instruction != self.instruction
            self.instruction = instruction
            if changed and self.mode is not None:
                self.mode.on_new_instruction()
        self.problems.resolve("instruction")
        if changed:
            self.log.info(f"instruction: {instruction!r}")

    def release(self) -> None:
        """Forgets the inputs of the released model."""
        self.frames.clear()
        with self.lock:
            self.instruction = None
            self.mode = None
            self.active = False

    # ------------------------------------------------------------------ safety

    def stop_output(self, reason: str) -> bool:
        """Publishes one zero delta (gripper held) if actions were being published, then stays silent.

        Also voids any step still running, so nothing it computed is published after the zero delta.
        Returns True when a zero delta went out.
        """
        with self.lock:
            self.stop_count += 1
            if self.mode is not None:
                self.mode.on_stop()
            if not self.output_live:
                return False
            self.output_live = False
            self.outputs.zero_delta(self.last_gripper, self.settings.frame_id)
        self.log.info(f"published a zero delta ({reason})")
        return True

    def checked_inputs(self, now_ns: int) -> tuple[Frame, str, ControlSettings] | None:
        """Returns (newest frame, instruction, settings) when a step may run now, else None.

        Applies the safety checks of a control tick: enabled, an instruction, a frame, its stamp not
        ahead of the clock and not older than ``max_image_age_s`` (those two stop the output).
        """
        with self.lock:
            enabled, instruction, settings = self.enabled, self.instruction, self.settings
        if not enabled:
            return None
        if instruction is None:
            self.report("no_instruction", "enabled but no instruction received yet; publishing nothing", warn=False)
            return None
        self.resolve("no_instruction")
        frame = self.frames.peek()
        if not self.input_is_fresh(CAMERA, None if frame is None else frame.stamp_ns, now_ns, settings.max_image_age_s):
            return None
        assert frame is not None
        return frame, instruction, settings

    def input_is_fresh(self, source: InputSource, stamp_ns: int | None, now_ns: int, max_age_s: float) -> bool:
        """Checks one input's newest stamp; a problem is reported (logged once) and, when it is one that
        stops the output, one zero delta goes out. Returns True when the input may be used."""
        finding = source.check(stamp_ns, now_ns, max_age_s)
        for key, recovery in source.recoveries(finding):
            self.resolve(key, recovery)
        if finding is None:
            return True
        self.report(finding.key, finding.message, warn=finding.warn, detail=finding.detail)
        if finding.stops_output:
            self.stop_output(finding.key.replace("_", " "))
        return False

    def still_current(self, stop_count: int, instruction: str | None = None) -> bool:
        """True when a result computed at ``stop_count`` (for ``instruction``, when given) may still be
        published (lock held)."""
        return (
            self.enabled
            and self.active
            and self.stop_count == stop_count
            and (instruction is None or self.instruction == instruction)
        )

    def limited(self, action: Any, settings: ControlSettings) -> tuple[np.ndarray, float] | None:
        """Returns (the action within the limits, the mapped gripper); None after stopping the output
        when the action is not finite."""
        try:
            limited = limit_action(action, settings.max_translation, settings.max_rotation)
            gripper = map_gripper(limited[GRIPPER_INDEX], settings.gripper_mode, settings.gripper_flip)
        except ValueError as exc:
            self.report("non_finite", f"action not published: {exc}")
            self.stop_output("invalid action")
            return None
        return limited, gripper

    def publish_if_current(self, limited: np.ndarray, gripper: float, settings: ControlSettings, stamp: Any,
                           stop_count: int, instruction: str | None = None) -> bool:
        """Publishes a limited action unless a stop (or, with ``instruction``, a new instruction) came since
        ``stop_count``; returns True when it went out."""
        with self.lock:
            if not self.still_current(stop_count, instruction):
                return False
            self.outputs.action(limited, gripper, settings, stamp)
            self.output_live = True
            self.last_gripper = float(limited[GRIPPER_INDEX])
        self.steps += 1
        self.action_rate.tick()
        return True

    def decoded(self, message: Any) -> np.ndarray | None:
        """Returns the RGB image of a camera message; None after stopping the output when it is rejected."""
        from openvla_ros.ros.ros_conversions import message_to_rgb

        try:
            rgb = message_to_rgb(message)
        except OpenVLAError as exc:
            self.report("image", f"camera image rejected: {exc}")
            self.stop_output("camera image rejected")
            return None
        return rgb

    def inference_failed(self, exc: OpenVLAError) -> None:
        self.report("inference", f"inference failed: {type(exc).__name__}: {exc}")
        self.stop_output("inference failed")

    def worker_error(self, exc: Exception) -> None:
        """An unexpected error in the worker: reported, the output stopped, the node keeps running."""
        self.report("worker", f"unexpected {type(exc).__name__} in a control step: {exc}")
        try:
            self.stop_output("control step failed")
        except Exception as publish_error:  # nothing more can be done from the worker thread
            self.log.error(f"could not publish the zero delta: {publish_error}")

    # ------------------------------------------------------------------ reporting

    def report(self, key: str, message: str, warn: bool = True, detail: str = "") -> None:
        """Logs a recurring problem once (again only when it changes or every 10 s while it lasts)."""
        if not self.problems.report(key, message):
            return
        if detail:
            message = f"{message} ({detail})"
        if not warn:
            self.log.info(message)
        elif key == "stale_image":
            self.log.warning(message)
        else:
            self.log.error(message)

    def resolve(self, key: str, recovery_message: str | None = None) -> bool:
        resolved = self.problems.resolve(key)
        if resolved and recovery_message:
            self.log.info(recovery_message)
        return resolved

    def diagnostic_values(self, now_ns: int) -> dict[str, str]:
        """The control loop's values of ``/diagnostics`` (the mode adds its own)."""
        newest = self.frames.peek()
        image_age_s = (now_ns - newest.stamp_ns) / 1e9 if newest is not None else math.nan
        values = {
            "enabled": str(self.enabled).lower(),
            "instruction": self.instruction or "",
            "rate_hz_target": f"{self.settings.rate_hz:g}",
            "rate_hz_achieved": f"{self.action_rate.rate_hz():.2f}",
            "inference_latency_ms_last": f"{self.model_ms.last:.1f}",
            "inference_latency_ms_median": f"{self.model_ms.percentile(50):.1f}",
            "image_to_action_latency_ms_median": f"{self.latency_ms.percentile(50):.1f}",
            "dropped_frames": str(self.frames.dropped),
            "skipped_ticks": "0",
            "ticks_reusing_frame": "0",
            "steps": str(self.steps),
            "image_errors": str(self.problems.count("image")),
            "inference_errors": str(self.problems.count("inference")),
            "mode": "none",
        }
        mode = self.mode
        if mode is not None:
            with self.lock:
                values |= mode.diagnostic_values()
        values["image_age_s"] = f"{image_age_s:.3f}"
        return values
