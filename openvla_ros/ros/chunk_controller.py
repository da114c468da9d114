"""Chunk mode (OpenVLA-OFT): one inference per chunk of K actions, one queued action per tick, without DDS.

Each tick checks every input (camera, wrist cameras, proprio), publishes the tick's queued action and
asks the worker for the next chunk when the schedule says so (:class:`~openvla_ros.ros.chunk_control.
ChunkControl`). A stop drops the whole queue, and a chunk being computed when it came is thrown away; a
new instruction drops the queued actions of the old one. With an energy model (``energy_steps > 0``)
the policy refines each chunk before it is queued.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from openvla_ros.errors import OpenVLAError
from openvla_ros.ros.chunk_control import ChunkControl
from openvla_ros.ros.chunk_mode import ChunkModel, ProprioReading, chunk_problem
from openvla_ros.ros.control import ControlSettings, LatestSlot, SingleJobWorker
from openvla_ros.ros.control_core import ControlCore, Frame
from openvla_ros.ros.input_freshness import InputSource, proprio, wrist_camera
from openvla_ros.ros.node_status import EnergyStats


@dataclass(frozen=True)
class ChunkRequest:
    """One chunk for the inference worker to compute."""

    frame: Frame
    wrist_frames: tuple[Frame, ...]
    proprio: np.ndarray | None
    instruction: str
    tick: int  # the control tick that requested it
    settings: ControlSettings
    stop_count: int  # a stop since the request voids the chunk
    requested: float  # time.perf_counter() at the request


class ChunkController:
    """Runs a chunked policy (``predict_chunk``) for the control loop (see the module docstring)."""

    def __init__(self, core: ControlCore, policy: Any, model: ChunkModel, energy_steps: int = 0) -> None:
        self.core = core
        self.policy = policy
        self.model = model
        self.control = ChunkControl(model.chunk_size)
        self.control.set_blend(core.settings.chunk_blend, core.settings.ensemble_decay)
        self.wrist_slots: list[LatestSlot[Frame]] = []
        self.wrist_sources: list[InputSource] = []
        self.proprio_slot: LatestSlot[ProprioReading] = LatestSlot()
        self.proprio_source: InputSource | None = None
        self.energy = EnergyStats()
        self.energy_steps = int(energy_steps)  # as the policy was loaded with
        self._energy_warned = False
        if hasattr(policy, "log_energy_fallback"):
            policy.log_energy_fallback = False  # warned once here, through the node's logger
        self.worker: SingleJobWorker[ChunkRequest] = SingleJobWorker(self.run, core.worker_error)

    # ------------------------------------------------------------------ set-up

    def add_wrist_camera(self, topic_name: str, slot: LatestSlot[Frame]) -> None:
        """Takes the next wrist camera (in the model's order): its frames arrive in ``slot``."""
        self.wrist_slots.append(slot)
        self.wrist_sources.append(wrist_camera(len(self.wrist_slots), topic_name))

    def add_proprio(self, topic_name: str) -> None:
        """Takes the robot state from ``topic_name``: its readings arrive in :attr:`proprio_slot`."""
        self.proprio_source = proprio(topic_name)

    def apply_settings(self, settings: ControlSettings) -> None:
        self.control.set_blend(settings.chunk_blend, settings.ensemble_decay)

    def configure_energy(self, steps: int, step_size: float, max_step_fraction: float) -> None:
        """Hands the energy parameters to the policy (from its next chunk on); logs what is on."""
        configure = getattr(self.policy, "configure_energy", None)
        if configure is None:
            return
        try:
            configure(steps, step_size, max_step_fraction)
        except ValueError as exc:  # validated before, so only a policy that changed its mind gets here
            self.core.log.error(f"energy settings not applied: {exc}")
            return
        self.energy_steps = int(steps)
        self.core.log.info(
            f"energy refinement {'off' if not steps else f'on: {int(steps)} step(s)'} (step size {step_size:g}, "
            f"at most {max_step_fraction:g} of the chunk's norm per step)"
        )

    # ------------------------------------------------------------------ control thread

    def tick(self, now_ns: int) -> None:
        """Publishes this tick's queued action and requests a chunk when due; a failed input check stops
        the output (which drops the whole queue)."""
        core = self.core
        inputs = core.checked_inputs(now_ns)
        if inputs is None:
            return
        frame, instruction, settings = inputs
        extra = self.checked_extra_inputs(now_ns, settings)
        if extra is None:
            return
        wrist_frames, proprio_values = extra
        with core.lock:
            plan = self.control.next_tick(1.0 / settings.rate_hz, self.worker.busy, driving=core.output_live)
            stop_count = core.stop_count
        if plan.request:
            newest = core.frames.take_new() or frame
            self.worker.submit(ChunkRequest(newest, wrist_frames, proprio_values, instruction, plan.tick, settings,
                                            stop_count, time.perf_counter()))
        if plan.action is not None:
            limited = core.limited(plan.action, settings)
            if limited is not None:
                core.publish_if_current(*limited, settings, plan.stamp, stop_count)

    def checked_extra_inputs(
        self, now_ns: int, settings: ControlSettings
    ) -> tuple[tuple[Frame, ...], np.ndarray | None] | None:
        """Returns (newest wrist frames, newest proprio) when they are fresh, else None (output stopped)."""
        core = self.core
        wrist_frames = []
        for source, slot in zip(self.wrist_sources, self.wrist_slots, strict=True):
            wrist = slot.peek()
            if not core.input_is_fresh(source, None if wrist is None else wrist.stamp_ns, now_ns,
                                       settings.max_image_age_s):
                return None
            assert wrist is not None
            wrist_frames.append(wrist)
        proprio_values = None
        if self.proprio_source is not None:
            reading = self.proprio_slot.peek()
            if not core.input_is_fresh(self.proprio_source, None if reading is None else reading.stamp_ns, now_ns,
                                       settings.max_proprio_age_s):
                return None
            assert reading is not None
            proprio_values = reading.values
        return tuple(wrist_frames), proprio_values

    def on_stop(self) -> None:
        self.control.clear()

    def on_new_instruction(self) -> None:
        self.control.clear()  # the queued actions were for the previous task

    def diagnostic_values(self) -> dict[str, str]:
        values = {"mode": "chunk", **self.control.diagnostic_values(self.core.settings.actions_per_inference)}
        if self.model.has_energy:
            values |= self.energy.values(self.energy_steps)
        return values

    def wait_idle(self, timeout_s: float) -> None:
        self.worker.wait_idle(timeout_s=timeout_s)

    def close(self, timeout_s: float) -> None:
        self.worker.stop(timeout_s=timeout_s)

    # ------------------------------------------------------------------ worker thread

    def run(self, request: ChunkRequest) -> None:
        """Decodes the images, predicts a chunk and queues it (if no stop came meanwhile)."""
        core = self.core
        started = time.perf_counter()
        rgb = core.decoded(request.frame.message)
        wrist_rgb = [core.decoded(frame.message) for frame in request.wrist_frames] if rgb is not None else []
        if rgb is None or any(image is None for image in wrist_rgb):
            return
        core.resolve("image", "camera images are valid again")
        decoded = time.perf_counter()
        try:
            chunk = self.policy.predict_chunk(rgb, request.instruction, wrist_images=wrist_rgb,
                                              proprio=request.proprio)
        except OpenVLAError as exc:
            core.inference_failed(exc)
            return
        inferred = time.perf_counter()
        if self.energy.record(getattr(self.policy, "last_prediction", None)) and not self._energy_warned:
            self._energy_warned = True
            core.log.warning(
                f"energy refinement skipped, the uncorrected chunk is used: {self.energy.problem} (said once; "
                "energy_fallbacks in /diagnostics counts them)"
            )
        problem = chunk_problem(chunk, self.model)
        if problem is not None:
            core.report("non_finite", f"chunk not used: {problem}")
            core.stop_output("invalid chunk")
            return
        core.resolve("inference", "inference works again")
        core.resolve("non_finite")
        stamp = request.frame.message.header.stamp
        with core.lock:
            if not core.still_current(request.stop_count, request.instruction):
                self.control.discarded += 1  # stopped, disabled or re-instructed while the model ran
                return
            settings = core.settings
            latency_s = time.perf_counter() - request.requested
            placed = self.control.add_chunk(np.asarray(chunk, dtype=np.float64), settings.actions_per_inference,
                                            stamp, latency_s)
            depth = self.control.depth()
            lead = self.control.schedule.lead_ticks(1.0 / settings.rate_hz)
        core.model_ms.add((inferred - decoded) * 1e3)
        core.latency_ms.add((core.now_ns() - request.frame.stamp_ns) / 1e6)
        if core.publish_timing:
            core.outputs.timing("chunk", stamp, {
                "decode_ms": (decoded - started) * 1e3,
                "model_ms": (inferred - decoded) * 1e3,
                "chunk_ms": latency_s * 1e3,  # from the request to the actions being queued
                "queue_depth": float(depth),
                "lead_ticks": float(lead),
                "start_delay_ticks": float(placed.start_tick - request.tick),
            })
