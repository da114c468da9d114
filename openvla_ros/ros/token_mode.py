"""Token mode (OpenVLA): one inference per control tick, on a worker thread, without DDS.

A tick takes the newest frame (or the last one again, counted, when the camera sent none since) and
starts a step on the worker. A tick that comes while a step runs starts its step as soon as that one
ends, unless the next tick comes first; then it is skipped. Never a queue: one late tick at most.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from openvla_ros.errors import OpenVLAError
from openvla_ros.ros.control import ControlSettings, SingleJobWorker
from openvla_ros.ros.control_core import ControlCore, Frame
from openvla_ros.ros.tick_schedule import LateTick


@dataclass(frozen=True)
class Step:
    """One unit of work for the inference worker."""

    frame: Frame
    instruction: str
    tick_ns: int
    settings: ControlSettings
    stop_count: int  # the core's stop count when the step started: a stop since then voids it


class TokenController:
    """Runs a policy with ``predict_action(rgb, instruction)`` once per tick (see the module docstring)."""

    def __init__(self, core: ControlCore, policy: Any) -> None:
        self.core = core
        self.policy = policy
        self.late_tick = LateTick()
        self.ticks_reusing_frame = 0
        self.worker: SingleJobWorker[Step] = SingleJobWorker(self.run, core.worker_error)

    # ------------------------------------------------------------------ control thread

    def tick(self, now_ns: int) -> None:
        inputs = self.core.checked_inputs(now_ns)
        if inputs is None:
            return
        if self.worker.busy:
            # The previous step overran: this tick's step starts as soon as it ends, unless the next
            # tick comes first (then this one is skipped). One late tick at most: never a queue.
            with self.core.lock:
                self.late_tick.note(now_ns)
            return
        if not self.worker.submit(self.make_step(*inputs, now_ns)):
            with self.core.lock:
                self.late_tick.skipped += 1

    def make_step(self, frame: Frame, instruction: str, settings: ControlSettings, tick_ns: int) -> Step:
        """Returns the step of a tick, on a frame newer than the last step's when there is one."""
        with self.core.lock:
            stop_count = self.core.stop_count
        newest = self.core.frames.take_new()
        if newest is None:
            # No frame since the last step (camera jitter, or a camera slower than rate_hz): the rate is
            # kept with the newest frame, whose age the checks bound; counted in diagnostics.
            self.ticks_reusing_frame += 1
            newest = frame
        return Step(newest, instruction, tick_ns, settings, stop_count)

    def on_stop(self) -> None:
        self.late_tick.clear()

    def on_new_instruction(self) -> None:
        """Nothing queued: a step still running for the old instruction is voided when it ends."""

    def diagnostic_values(self) -> dict[str, str]:
        return {
            "skipped_ticks": str(self.late_tick.skipped),
            "ticks_reusing_frame": str(self.ticks_reusing_frame),
            "mode": "token",
        }

    def wait_idle(self, timeout_s: float) -> None:
        self.worker.wait_idle(timeout_s=timeout_s)

    def close(self, timeout_s: float) -> None:
        self.worker.stop(timeout_s=timeout_s)

    # ------------------------------------------------------------------ worker thread

    def run(self, step: Step) -> None:
        """Runs ``step``, then the step of a tick that came while it ran (if still due)."""
        current: Step | None = step
        while current is not None:
            self.run_one(current)
            current = self.late_step()

    def late_step(self) -> Step | None:
        """After a step: the step of a tick that came while it ran, if still due."""
        now_ns = self.core.now_ns()
        with self.core.lock:
            late_ns = self.late_tick.take_due(now_ns, 1e9 / self.core.settings.rate_hz)
        if late_ns is None:  # none waiting, or the next tick is due already (this one is skipped)
            return None
        inputs = self.core.checked_inputs(now_ns)
        return None if inputs is None else self.make_step(*inputs, now_ns)

    def run_one(self, step: Step) -> None:
        """Decode, infer, limit and publish one action."""
        core = self.core
        started = time.perf_counter()
        rgb = core.decoded(step.frame.message)
        if rgb is None:
            return
        core.resolve("image", "camera images are valid again")
        decoded = time.perf_counter()
        try:
            action = self.policy.predict_action(rgb, step.instruction)
        except OpenVLAError as exc:
            core.inference_failed(exc)
            return
        inferred = time.perf_counter()
        limited = core.limited(action, step.settings)
        if limited is None:
            return
        core.resolve("inference", "inference works again")
        core.resolve("non_finite")
        stamp = step.frame.message.header.stamp
        if not core.publish_if_current(*limited, step.settings, stamp, step.stop_count, step.instruction):
            return  # disabled, deactivated, re-instructed or stopped (stale camera...) while the model ran
        published = time.perf_counter()
        core.model_ms.add((inferred - decoded) * 1e3)
        core.latency_ms.add((core.now_ns() - step.frame.stamp_ns) / 1e6)
        if core.publish_timing:
            core.outputs.timing("step", stamp, {
                "image_age_at_tick_ms": (step.tick_ns - step.frame.stamp_ns) / 1e6,
                "image_delivery_ms": (step.frame.received_ns - step.frame.stamp_ns) / 1e6,
                "decode_ms": (decoded - started) * 1e3,
                "model_ms": (inferred - decoded) * 1e3,
                "publish_ms": (published - inferred) * 1e3,
                "step_ms": (published - started) * 1e3,
            })
