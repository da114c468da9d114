"""The policy node's input age checks, without ROS: missing, ahead of the clock, stale, fresh."""

from __future__ import annotations

import math

import pytest

from openvla_ros.ros.input_freshness import CAMERA, Verdict, judge_age, proprio, wrist_camera

NOW_NS = 1_000 * 1_000_000_000


@pytest.mark.parametrize(
    ("offset_s", "verdict"),
    [(0.0, Verdict.FRESH), (0.49, Verdict.FRESH), (0.51, Verdict.STALE), (-0.4, Verdict.FRESH), (-0.6, Verdict.AHEAD)],
)
def test_the_age_against_the_limit_decides(offset_s: float, verdict: Verdict) -> None:
    found, age_s = judge_age(NOW_NS - int(offset_s * 1e9), NOW_NS, 0.5)
    assert found is verdict
    assert age_s == pytest.approx(offset_s)


def test_nothing_received_is_missing_with_no_age() -> None:
    verdict, age_s = judge_age(None, NOW_NS, 0.5)
    assert verdict is Verdict.MISSING and math.isnan(age_s)


def test_the_camera_keeps_its_messages_and_waits_quietly_for_a_first_image() -> None:
    missing = CAMERA.check(None, NOW_NS, 0.5)
    assert missing is not None and missing.key == "no_image" and not missing.stops_output and not missing.warn
    stale = CAMERA.check(NOW_NS - 2_000_000_000, NOW_NS, 0.5)
    assert stale is not None and stale.stops_output and stale.key == "stale_image"
    assert stale.message.startswith("camera images are older than max_image_age_s (0.5 s)")
    assert stale.detail == "newest image is 2.00 s old"
    ahead = CAMERA.check(NOW_NS + 5_000_000_000, NOW_NS, 0.5)
    assert ahead is not None and ahead.key == "clock_mismatch" and "ahead of the node's clock" in ahead.message
    assert CAMERA.check(NOW_NS, NOW_NS, 0.5) is None


def test_wrist_cameras_and_proprio_name_their_topic_and_stop_when_missing() -> None:
    wrist = wrist_camera(1, "/wrist/image_raw").check(None, NOW_NS, 0.5)
    assert wrist is not None and wrist.stops_output and "/wrist/image_raw" in wrist.message
    stale = proprio("/joint_states").check(NOW_NS - 800_000_000, NOW_NS, 0.25)
    assert stale is not None and stale.key == "stale_proprio"
    assert stale.message.startswith("proprio messages on /joint_states are older than max_proprio_age_s (0.25 s)")


def test_a_problem_is_over_only_when_a_later_check_or_none_fails() -> None:
    stale = CAMERA.check(NOW_NS - 2_000_000_000, NOW_NS, 0.5)
    assert [key for key, _ in CAMERA.recoveries(stale)] == ["no_image", "clock_mismatch"]
    ahead = CAMERA.check(NOW_NS + 2_000_000_000, NOW_NS, 0.5)
    assert [key for key, _ in CAMERA.recoveries(ahead)] == ["no_image"], "a stale camera is not fresh yet"
    assert dict(CAMERA.recoveries(None))["stale_image"] == "fresh images again; output resumes"
