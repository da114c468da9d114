"""When the policy node runs the model, without ROS: the late tick of token mode, chunk requests."""

from __future__ import annotations

import pytest

from openvla_ros.ros.tick_schedule import ChunkRequestSchedule, LateTick

PERIOD_NS = 100_000_000  # 10 Hz


def test_one_tick_waits_for_the_running_step_and_an_older_one_is_skipped() -> None:
    late = LateTick()
    late.note(0)
    late.note(PERIOD_NS)  # a second busy tick replaces the first
    assert late.skipped == 1
    assert late.take_due(PERIOD_NS + 30_000_000, PERIOD_NS) == PERIOD_NS
    assert late.take_due(PERIOD_NS + 30_000_000, PERIOD_NS) is None, "taken once"


def test_a_late_tick_whose_successor_is_due_is_skipped() -> None:
    late = LateTick()
    late.note(0)
    assert late.take_due(PERIOD_NS, PERIOD_NS) is None
    assert late.skipped == 1
    late.note(0)
    late.clear()
    assert late.take_due(1, PERIOD_NS) is None and late.skipped == 1, "a stop voids it without a skip"


def test_before_any_latency_is_known_a_chunk_is_requested_when_the_margin_is_reached() -> None:
    schedule = ChunkRequestSchedule(margin_ticks=1.0)
    assert schedule.lead_ticks(0.05) == 1
    assert schedule.due(0, 0.05, busy=False), "an empty queue asks for a chunk"
    assert schedule.due(1, 0.05, busy=False)
    assert not schedule.due(2, 0.05, busy=False)
    assert not schedule.due(0, 0.05, busy=True), "one inference at a time"


@pytest.mark.parametrize(
    ("latency_s", "period_s", "lead"),
    [(0.1, 0.05, 4), (0.1, 0.1, 3), (0.1, 0.02, 7), (0.012, 0.1, 2)],
)
def test_the_lead_covers_the_latency_with_a_margin(latency_s: float, period_s: float, lead: int) -> None:
    schedule = ChunkRequestSchedule(margin_ticks=1.0, latency_factor=1.2)
    schedule.add_latency(latency_s)
    assert schedule.lead_ticks(period_s) == lead
    # requested with `lead` actions left, a chunk that takes latency_s arrives with some still queued
    assert lead * period_s - latency_s >= period_s
    assert schedule.due(lead, period_s, busy=False) and not schedule.due(lead + 1, period_s, busy=False)


def test_the_slowest_recent_chunk_sets_the_lead_and_old_ones_age_out() -> None:
    schedule = ChunkRequestSchedule(margin_ticks=0.0, latency_factor=1.0, window=3)
    for seconds in (0.3, 0.1, 0.1):
        schedule.add_latency(seconds)
    assert schedule.latency_s == 0.3
    schedule.add_latency(0.1)
    assert schedule.latency_s == 0.1
    schedule.add_latency(float("nan"))
    assert schedule.latency_s == 0.1, "a non-finite measurement is ignored"
    schedule.clear()
    assert schedule.latency_s == 0.0
