"""Chunk mode's control loop simulated tick by tick, without ROS: given a model latency, does the loop wait?"""

from __future__ import annotations

import math

import numpy as np
import pytest

from openvla_ros.ros.chunk_control import ChunkControl


def chunk(number: int, size: int) -> np.ndarray:
    values = np.zeros((size, 7))
    values[:, 0] = number
    values[:, 1] = np.arange(size)
    return values


def simulate(size: int, latency_ticks: int, ticks: int, actions_per_inference: int = 0, period_s: float = 0.05):
    """Runs ``ticks`` control ticks with a model that takes ``latency_ticks`` ticks per chunk.

    Returns the control state and the (chunk, index) of every tick's action (None: nothing queued).
    """
    control = ChunkControl(size)
    running: tuple[int, int] | None = None  # (number, tick it is ready after)
    published: list[tuple[int, int] | None] = []
    number = 0
    for _ in range(ticks):
        if running is not None and control.tick >= running[1]:
            control.add_chunk(chunk(running[0], size), actions_per_inference, stamp=running[0],
                              latency_s=latency_ticks * period_s)
            running = None
        plan = control.next_tick(period_s, busy=running is not None, driving=bool(published) and
                                 published[-1] is not None)
        published.append(None if plan.action is None else (int(plan.action[0]), int(plan.action[1])))
        if plan.request:
            running = (number, plan.tick + latency_ticks)
            number += 1
    return control, published


@pytest.mark.parametrize(("size", "latency_ticks"), [(8, 2), (8, 5), (25, 8), (8, 1)])
def test_a_model_faster_than_its_chunk_never_leaves_the_loop_waiting(size: int, latency_ticks: int) -> None:
    control, published = simulate(size, latency_ticks, ticks=400)
    first = next(i for i, item in enumerate(published) if item is not None)
    assert first <= latency_ticks + 1, "the first chunk is asked for on the first tick"
    assert all(item is not None for item in published[first:]), "no tick without an action after the first chunk"
    assert control.starved == 0
    # every chunk runs open-loop from its first action, in order
    steps = published[first:]
    for (chunk_a, index_a), (chunk_b, index_b) in zip(steps, steps[1:], strict=False):
        assert (chunk_b == chunk_a and index_b == index_a + 1) or (chunk_b > chunk_a and index_b == 0)
    # one inference per chunk less the lead: well below one per tick
    assert control.chunks <= math.ceil(400 / (size - latency_ticks - 2)) + 1


def test_actions_per_inference_sets_how_many_actions_each_chunk_gives() -> None:
    control, published = simulate(8, latency_ticks=1, ticks=200, actions_per_inference=4)
    steps = [item for item in published if item is not None]
    assert max(index for _, index in steps) == 3, "chunks hand over after 4 actions"
    assert control.starved == 0 and control.chunks >= 200 / 4 - 2


def test_a_model_slower_than_its_chunk_starves_the_loop_and_is_counted() -> None:
    control, published = simulate(8, latency_ticks=10, ticks=200)
    assert control.starved > 0
    assert published.count(None) > 200 / 10, "a tick waits for every late chunk"


def test_clear_drops_the_queue_and_the_next_request_is_due_at_once() -> None:
    control = ChunkControl(8)
    assert control.next_tick(0.05, busy=False, driving=False).request
    control.add_chunk(chunk(0, 8), 0, stamp="s", latency_s=0.1)
    plan = control.next_tick(0.05, busy=False, driving=True)
    assert plan.action is not None and plan.stamp == "s" and not plan.request
    control.clear()
    after = control.next_tick(0.05, busy=False, driving=True)
    assert after.action is None and after.request and control.starved == 1
    values = control.diagnostic_values(0)
    assert values["chunk_size"] == "8" and values["actions_per_inference"] == "8" and values["chunks"] == "1"
