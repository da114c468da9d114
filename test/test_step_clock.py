"""The conversion's step clocks: ``rate`` resamples, ``actions`` makes one step of each command."""

from __future__ import annotations

import numpy as np
import pytest

from openvla_ros.dataset.alignment import ActionKind, Role, StepAligner
from openvla_ros.dataset.config import config_from_mapping
from openvla_ros.errors import DatasetError

MS = 1_000_000
PERIOD = 100 * MS  # a 10 Hz command stream
FRAME = 33 * MS  # a 30 Hz camera


def config(clock: str):
    return config_from_mapping({
        "topics": {"image": "/camera/image_raw", "action": "/teleop/action", "state": "/joint_states",
                   "instruction": "/instruction"},
        "conversion": {"rate_hz": 10.0, "action_aggregate": "last", "step_clock": clock},
    })


def expert_recording(commands: int, seed: int = 0) -> tuple[list[tuple[int, Role, object]], list[np.ndarray]]:
    """A recording like the sim's over DDS: the expert's first command starts the rate clock, the later
    ones arrive a period apart with a millisecond of receive jitter either way; the state follows each
    command at once, the camera shows it up to a frame later. Camera handles are the position they show.
    """
    rng = np.random.default_rng(seed)
    t0 = 1_000 * MS
    actions = [np.array([0.01 * (k + 1), -0.005, 0.0, 0.0, 0.0, 0.0, 1.0]) for k in range(commands)]
    times = [t0 + k * PERIOD + (0 if k == 0 else int(rng.choice([-1, 1]) * MS)) for k in range(commands)]
    events: list[tuple[int, Role, object]] = [(t0 - 500 * MS, Role.INSTRUCTION, "reach")]
    position = np.zeros(3)
    events.append((t0 - 400 * MS, Role.STATE, position.copy()))
    applied = [(t, a) for t, a in zip(times, actions, strict=True)]
    for frame_time in range(t0 - 300 * MS, times[-1] + 300 * MS, FRAME):
        shown = np.zeros(3) + sum((a[:3] for t, a in applied if t < frame_time - 5 * MS), np.zeros(3))
        events.append((frame_time, Role.CAMERA, shown))
    for t, action in applied:
        position = position + action[:3]
        events.append((t, Role.ACTION, action))
        events.append((t + 1 * MS, Role.STATE, position.copy()))
    events.sort(key=lambda event: event[0])
    return events, actions


def run(clock: str, events) -> list:
    aligner = StepAligner(config(clock), ActionKind.VECTOR, ["image"], use_state=True)
    steps = []
    for time_ns, role, value in events:
        steps += aligner.add(time_ns, role, value)
    return [step for step in steps + aligner.finish() if not step.idle]


def test_on_the_action_clock_each_command_is_one_step_observed_just_before_it() -> None:
    events, actions = expert_recording(30)
    steps = run("actions", events)
    assert len(steps) == len(actions), "every command is a step, the first included"
    before = np.zeros(3)
    for step, action in zip(steps, actions, strict=True):
        np.testing.assert_array_equal(step.action, action)
        np.testing.assert_allclose(step.state[:3], before, atol=1e-12)  # the state the command starts from
        np.testing.assert_allclose(step.images["image"], before, atol=1e-12)  # and the frame shows it
        before = before + action[:3]


def test_on_the_rate_clock_the_same_commands_land_on_boundaries_and_pair_wrongly() -> None:
    events, actions = expert_recording(30)
    steps = run("rate", events)
    lost = len(actions) - len(steps)
    mispaired = sum(
        not np.allclose(step.state[:3], sum((a[:3] for a in actions[: int(round(step.action[0] / 0.01)) - 1]),
                                            np.zeros(3)))
        for step in steps
    )
    assert lost + mispaired >= 5, "the rate clock pairs commands right by luck only when they land on boundaries"


def test_the_action_clock_needs_float64multiarray_commands() -> None:
    with pytest.raises(DatasetError, match="step_clock 'actions'.*twist.*step_clock 'rate'"):
        StepAligner(config("actions"), ActionKind.TWIST, ["image"], use_state=False)
    with pytest.raises(DatasetError, match="step_clock must be one of rate, actions"):
        config("tick")
