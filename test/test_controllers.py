"""The policy node's control logic without DDS: ControlCore with the token-mode and chunk-mode controllers.

The node's own tests (test_policy_node*.py, test_node_chunk_mode.py) run the same logic over DDS; these
drive it directly, with a hand-set clock, a recording Outputs and policies that block until released,
so the order of events (a stop while the model runs, a tick while a step runs) is exact.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
from sensor_msgs.msg import Image

from openvla_ros.errors import OpenVLAError
from openvla_ros.ros.chunk_controller import ChunkController
from openvla_ros.ros.chunk_mode import ChunkModel, ProprioReading
from openvla_ros.ros.control import ControlSettings, LatestSlot
from openvla_ros.ros.control_core import ControlCore, Frame
from openvla_ros.ros.token_mode import TokenController

SECOND = 1_000_000_000
ACTION = np.array([0.01, -0.02, 0.03, 0.1, -0.2, 0.15, 0.7])


class Recorder:
    """An Outputs that keeps what would have been published, in order."""

    def __init__(self) -> None:
        self.published: list[tuple[str, Any]] = []

    def action(self, action: np.ndarray, gripper: float, settings: ControlSettings, stamp: Any) -> None:
        self.published.append(("action", (np.array(action), gripper, stamp)))

    def zero_delta(self, gripper: float, frame_id: str) -> None:
        self.published.append(("zero", gripper))

    def timing(self, kind: str, stamp: Any, values: dict[str, float]) -> None:
        self.published.append(("timing", (kind, values)))

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.published if kind != "timing"]


class Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def info(self, message: str) -> None:
        self.lines.append(("info", message))

    def warning(self, message: str) -> None:
        self.lines.append(("warning", message))

    def error(self, message: str) -> None:
        self.lines.append(("error", message))

    def debug(self, message: str) -> None:
        self.lines.append(("debug", message))


class Clock:
    def __init__(self) -> None:
        self.ns = 100 * SECOND

    def __call__(self) -> int:
        return self.ns


class GatedPolicy:
    """``predict_action`` / ``predict_chunk`` wait until :meth:`release_one` lets one call finish."""

    unnorm_key = "test"

    def __init__(self, result: np.ndarray, gated: bool = False) -> None:
        self.result = result
        self.gated = gated
        self.started = threading.Semaphore(0)
        self.gate = threading.Semaphore(0)
        self.calls = 0

    def _run(self) -> np.ndarray:
        self.calls += 1
        self.started.release()
        if self.gated:
            assert self.gate.acquire(timeout=10), "the test never let the model finish"
        if isinstance(self.result, Exception):
            raise self.result
        return self.result

    def predict_action(self, rgb: np.ndarray, instruction: str) -> np.ndarray:
        assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
        return self._run()

    def predict_chunk(self, rgb: np.ndarray, instruction: str, wrist_images: Any = (), proprio: Any = None) -> np.ndarray:
        self.last_proprio = proprio
        return self._run()

    def release_one(self) -> None:
        self.gate.release()


def image(stamp_ns: int) -> Image:
    message = Image(height=8, width=8, encoding="rgb8", step=24, data=bytes(8 * 8 * 3))
    message.header.stamp.sec, message.header.stamp.nanosec = divmod(stamp_ns, SECOND)
    return message


def put_frame(core: ControlCore, slot: LatestSlot[Frame] | None = None) -> None:
    (slot or core.frames).put(Frame(image(core.now_ns()), core.now_ns(), core.now_ns()))


def token_setup(result: Any = ACTION, gated: bool = False) -> tuple[ControlCore, TokenController, Recorder, Clock, GatedPolicy]:
    recorder, clock, policy = Recorder(), Clock(), GatedPolicy(result, gated)
    core = ControlCore(recorder, Log(), clock)
    core.mode = TokenController(core, policy)
    core.activate(start_enabled=True)
    core.set_instruction("pick up the red block")
    put_frame(core)
    return core, core.mode, recorder, clock, policy


def test_token_tick_publishes_the_limited_action_stamped_with_its_frame() -> None:
    core, mode, recorder, clock, _ = token_setup(result=np.array([0.5, 0, 0, 0, 0, 0, 1.0]))
    mode.tick(clock())
    mode.wait_idle(10)
    assert recorder.kinds() == ["action"]
    action, gripper, stamp = recorder.published[0][1]
    assert action[0] == core.settings.max_translation and gripper == 1.0  # clipped per axis
    assert stamp.sec * SECOND + stamp.nanosec == clock()
    assert core.steps == 1 and core.output_live
    mode.close(5)


def test_nothing_is_published_before_enable_or_without_an_instruction() -> None:
    core, mode, recorder, clock, policy = token_setup()
    core.set_enabled(False, "active")
    mode.tick(clock())
    core.set_enabled(True, "active")
    core.set_instruction("")  # rejected: no instruction any more
    mode.tick(clock())
    mode.wait_idle(10)
    assert recorder.published == [] and policy.calls == 0
    assert "instruction" in core.problems.active()
    mode.close(5)


def test_enabling_an_inactive_node_is_refused() -> None:
    core, mode, _, _, _ = token_setup()
    core.deactivate()
    success, message = core.set_enabled(True, "inactive")
    assert not success and "inactive" in message and not core.enabled
    mode.close(5)


def test_a_stale_camera_sends_one_zero_delta_then_nothing() -> None:
    core, mode, recorder, clock, policy = token_setup()
    mode.tick(clock())
    mode.wait_idle(10)
    clock.ns += int(2 * core.settings.max_image_age_s * SECOND)
    for _ in range(3):
        mode.tick(clock())
    mode.wait_idle(10)
    assert recorder.kinds() == ["action", "zero"] and policy.calls == 1
    assert "stale_image" in core.problems.active()
    mode.close(5)


def test_a_stop_while_the_model_runs_voids_its_result() -> None:
    core, mode, recorder, clock, policy = token_setup(gated=True)
    mode.tick(clock())
    policy.release_one()
    mode.wait_idle(10)
    mode.tick(clock())  # a second step, held inside the model
    assert policy.started.acquire(timeout=10) and policy.started.acquire(timeout=10)
    core.stop_output("test stop")
    policy.release_one()
    mode.wait_idle(10)
    assert recorder.kinds() == ["action", "zero"], "nothing may follow the zero delta"
    mode.close(5)


def test_a_tick_during_a_step_runs_once_it_ends_and_only_once() -> None:
    core, mode, recorder, clock, policy = token_setup(gated=True)
    mode.tick(clock())
    assert policy.started.acquire(timeout=10)
    clock.ns += SECOND // 20  # a tick that finds the worker busy: noted, not queued
    mode.tick(clock())
    mode.tick(clock())
    put_frame(core)
    policy.release_one()
    assert policy.started.acquire(timeout=10), "the late tick's step did not start"
    policy.release_one()
    mode.wait_idle(10)
    assert recorder.kinds() == ["action", "action"] and policy.calls == 2
    mode.close(5)


def test_a_non_finite_action_is_never_published() -> None:
    core, mode, recorder, clock, _ = token_setup(result=np.array([np.nan, 0, 0, 0, 0, 0, 1.0]))
    mode.tick(clock())
    mode.wait_idle(10)
    assert recorder.kinds() == [] and "non_finite" in core.problems.active()
    mode.close(5)


def test_an_inference_error_stops_the_output_and_the_loop_goes_on() -> None:
    core, mode, recorder, clock, policy = token_setup()
    mode.tick(clock())
    mode.wait_idle(10)
    policy.result = OpenVLAError("model failed")
    mode.tick(clock())
    mode.wait_idle(10)
    assert recorder.kinds() == ["action", "zero"] and "inference" in core.problems.active()
    policy.result = ACTION
    put_frame(core)
    mode.tick(clock())
    mode.wait_idle(10)
    assert recorder.kinds() == ["action", "zero", "action"] and "inference" not in core.problems.active()
    mode.close(5)


# ---------------------------------------------------------------------- chunk mode

def chunk(number: int, size: int = 4) -> np.ndarray:
    values = np.tile(ACTION, (size, 1))
    values[:, 0] = 0.001 * (np.arange(size) + 1)
    values[:, 1] = 0.0001 * (number + 1)
    return values


def chunk_setup(proprio_dim: int = 0, gated: bool = False) -> tuple[ControlCore, ChunkController, Recorder, Clock, GatedPolicy]:
    recorder, clock, policy = Recorder(), Clock(), GatedPolicy(chunk(0), gated)
    core = ControlCore(recorder, Log(), clock)
    core.settings = ControlSettings(rate_hz=20.0, rate_limit_hz=100.0)
    mode = ChunkController(core, policy, ChunkModel(chunk_size=4, action_dim=7, num_images=1, proprio_dim=proprio_dim))
    if proprio_dim:
        mode.add_proprio("/joint_states")
    core.mode = mode
    core.activate(start_enabled=True)
    core.set_instruction("pick up the red block")
    put_frame(core)
    return core, mode, recorder, clock, policy


def tick(core: ControlCore, mode: ChunkController, clock: Clock) -> None:
    clock.ns += SECOND // 20
    put_frame(core)
    mode.tick(clock())
    mode.wait_idle(10)


def test_chunk_actions_go_out_one_per_tick_in_order() -> None:
    core, mode, recorder, clock, policy = chunk_setup()
    for _ in range(5):
        tick(core, mode, clock)
    actions = [values[0] for kind, values in recorder.published if kind == "action"]
    assert len(actions) >= 3
    assert [round(a[0] * 1000) for a in actions[:3]] == [1, 2, 3], "the chunk's actions in their order"
    assert policy.calls >= 1 and mode.control.chunks == policy.calls
    mode.close(5)


def test_a_new_instruction_drops_the_queued_actions() -> None:
    core, mode, recorder, clock, _ = chunk_setup()
    tick(core, mode, clock)
    assert mode.control.depth() > 0
    core.set_instruction("move to the green block")
    assert mode.control.depth() == 0
    mode.close(5)


def test_a_chunk_computed_across_a_stop_is_discarded() -> None:
    core, mode, recorder, clock, policy = chunk_setup(gated=True)
    clock.ns += SECOND // 20
    mode.tick(clock())
    assert policy.started.acquire(timeout=10)
    core.stop_output("test stop")
    policy.release_one()
    mode.wait_idle(10)
    assert mode.control.discarded == 1 and mode.control.depth() == 0 and recorder.kinds() == []
    mode.close(5)


def test_stale_proprio_stops_the_output_and_drops_the_queue() -> None:
    core, mode, recorder, clock, policy = chunk_setup(proprio_dim=3)
    proprio = np.zeros(3)
    mode.proprio_slot.put(ProprioReading(proprio, clock(), clock()))
    tick(core, mode, clock)
    mode.proprio_slot.put(ProprioReading(proprio, clock(), clock()))
    tick(core, mode, clock)
    assert recorder.kinds()[-1] == "action" and policy.last_proprio is proprio
    clock.ns += int(2 * core.settings.max_proprio_age_s * SECOND)
    put_frame(core)
    mode.tick(clock())
    assert recorder.kinds()[-1] == "zero" and mode.control.depth() == 0
    assert "stale_proprio" in core.problems.active()
    mode.close(5)


@pytest.mark.parametrize("make", [token_setup, chunk_setup])
def test_diagnostics_name_the_mode_and_count_the_steps(make: Any) -> None:
    core, mode, _, clock, _ = make()
    for _ in range(3):
        clock.ns += SECOND // 20
        put_frame(core)
        mode.tick(clock())
        mode.wait_idle(10)
    values = core.diagnostic_values(clock())
    assert values["mode"] == ("token" if isinstance(mode, TokenController) else "chunk")
    assert int(values["steps"]) == core.steps >= 2 and values["enabled"] == "true"
    mode.close(5)
