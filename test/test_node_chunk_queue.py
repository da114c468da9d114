"""The queued actions of chunk mode, without ROS: open-loop order, actions_per_inference, ensembling, drops."""

from __future__ import annotations

import math

import numpy as np
import pytest

from openvla_ros.ros.chunk_queue import ChunkQueue


def chunk(number: int, size: int = 4, dim: int = 7) -> np.ndarray:
    """A chunk whose action j is [number, j, 0, ...]: each popped action says where it came from."""
    values = np.zeros((size, dim))
    values[:, 0] = number
    values[:, 1] = np.arange(size)
    return values


def origin(action: np.ndarray | None) -> tuple[int, int] | None:
    return None if action is None else (int(action[0]), int(action[1]))


def test_a_chunk_runs_open_loop_in_order_from_the_next_tick() -> None:
    queue = ChunkQueue()
    placed = queue.add(chunk(1), next_tick=10, actions_per_inference=4)
    assert (placed.start_tick, placed.planned) == (10, 4)
    assert queue.planned(10) == 4 and queue.depth(10) == 4
    assert [origin(queue.pop(tick)) for tick in range(10, 15)] == [(1, 0), (1, 1), (1, 2), (1, 3), None]
    assert queue.planned(15) == 0


def test_the_next_chunk_continues_where_the_plan_ends() -> None:
    queue = ChunkQueue()
    queue.add(chunk(1), next_tick=10, actions_per_inference=4)
    assert origin(queue.pop(10)) == (1, 0)
    assert queue.add(chunk(2), next_tick=11, actions_per_inference=4).start_tick == 14, "requested early"
    assert queue.planned(11) == 7
    popped = [origin(queue.pop(tick)) for tick in range(11, 19)]
    assert popped == [(1, 1), (1, 2), (1, 3), (2, 0), (2, 1), (2, 2), (2, 3), None]


def test_actions_per_inference_plans_that_many_and_keeps_the_rest_for_a_late_chunk() -> None:
    queue = ChunkQueue()
    queue.add(chunk(1), next_tick=0, actions_per_inference=2)
    assert queue.planned(0) == 2 and queue.depth(0) == 4
    assert origin(queue.pop(0)) == (1, 0)
    queue.add(chunk(2), next_tick=1, actions_per_inference=2)  # on time: replaces chunk 1's reserve
    assert [origin(queue.pop(tick)) for tick in range(1, 4)] == [(1, 1), (2, 0), (2, 1)]
    # chunk 3 is late: chunk 2's reserve fills ticks 4 and 5, then chunk 3 starts when it arrives
    assert [origin(queue.pop(tick)) for tick in (4, 5)] == [(2, 2), (2, 3)]
    assert queue.add(chunk(3), next_tick=7, actions_per_inference=2).start_tick == 7
    assert [origin(queue.pop(tick)) for tick in (6, 7, 8)] == [None, (3, 0), (3, 1)]


def test_ticks_that_passed_are_dropped_not_replayed() -> None:
    queue = ChunkQueue()
    queue.add(chunk(1), next_tick=0, actions_per_inference=4)
    assert origin(queue.pop(2)) == (1, 2), "ticks 0 and 1 went by without a publish (a stopped loop, say)"
    assert queue.depth(0) == 1


def test_ensembling_averages_every_prediction_for_a_tick_oldest_weighted_most() -> None:
    decay = 0.5
    queue = ChunkQueue(blend="ensemble", decay=decay)
    first = np.arange(12, dtype=float).reshape(3, 4)
    second = 100.0 + np.arange(12, dtype=float).reshape(3, 4)
    third = 1000.0 + np.arange(12, dtype=float).reshape(3, 4)
    queue.add(first, next_tick=0, actions_per_inference=1)
    np.testing.assert_allclose(queue.pop(0), first[0])
    queue.add(second, next_tick=1, actions_per_inference=1)
    queue.add(third, next_tick=1, actions_per_inference=1)  # starts where the plan ends: tick 2
    w = [1.0, math.exp(-decay), math.exp(-2 * decay)]
    np.testing.assert_allclose(queue.pop(1), (w[0] * first[1] + w[1] * second[0]) / (w[0] + w[1]))
    expected = (w[0] * first[2] + w[1] * second[1] + w[2] * third[0]) / sum(w)
    np.testing.assert_allclose(queue.pop(2), expected)
    np.testing.assert_allclose(queue.pop(3), (w[0] * second[2] + w[1] * third[1]) / (w[0] + w[1]))
    np.testing.assert_allclose(queue.pop(4), third[2])
    assert queue.pop(5) is None


def test_ensembling_with_no_decay_is_the_plain_mean() -> None:
    queue = ChunkQueue(blend="ensemble", decay=0.0)
    queue.add(np.zeros((2, 7)), next_tick=0, actions_per_inference=1)
    queue.add(np.ones((2, 7)), next_tick=0, actions_per_inference=1)
    np.testing.assert_allclose(queue.pop(1), np.full(7, 0.5))


def test_clear_drops_every_queued_action_and_the_plan() -> None:
    queue = ChunkQueue(blend="ensemble")
    queue.add(chunk(1), next_tick=0, actions_per_inference=4)
    queue.add(chunk(2), next_tick=0, actions_per_inference=4)
    queue.clear()
    assert queue.depth(0) == 0 and queue.planned(0) == 0
    assert all(queue.pop(tick) is None for tick in range(10))
    assert queue.add(chunk(3), next_tick=20, actions_per_inference=4).start_tick == 20, "no plan to continue"
    assert origin(queue.pop(20)) == (3, 0)


def test_bad_settings_and_chunks_are_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="chunk_blend must be one of none, ensemble"):
        ChunkQueue(blend="average")
    with pytest.raises(ValueError, match="decay"):
        ChunkQueue(decay=-1.0)
    queue = ChunkQueue()
    with pytest.raises(ValueError, match=r"actions_per_inference must be within 1\.\.4"):
        queue.add(chunk(1), next_tick=0, actions_per_inference=5)
    with pytest.raises(ValueError, match=r"\[K, A\]"):
        queue.add(np.zeros(7), next_tick=0, actions_per_inference=1)
