"""Control-loop pieces without ROS: settings validation, safety limits, gripper mapping, rates, worker."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest

from openvla_ros.ros.control import (
    ControlSettings,
    LatencyStats,
    LatestSlot,
    ProblemTracker,
    RateMeter,
    SingleJobWorker,
    limit_action,
    map_gripper,
    twist_components,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_default_settings_are_valid_and_conservative() -> None:
    settings = ControlSettings()
    assert settings.rate_hz == 5.0
    assert settings.twist_mode == "delta"
    assert settings.gripper_mode == "raw"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("rate_hz", 0.5, "rate_hz must be within [1, 30]"),
        ("rate_hz", 31.0, "rate_hz must be within [1, 30]"),
        ("rate_hz", math.nan, "rate_hz"),
        ("twist_mode", "accel", "twist_mode must be one of delta, velocity"),
        ("gripper_mode", "inverted", "gripper_mode must be one of raw, binary, signed_binary"),
        ("max_image_age_s", 0.0, "max_image_age_s must be a positive"),
        ("max_translation", -0.1, "max_translation must be a finite number >= 0"),
        ("max_rotation", math.inf, "max_rotation must be a finite number >= 0"),
        ("frame_id", " ", "frame_id must not be empty"),
    ],
)
def test_invalid_settings_name_the_field(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ControlSettings(**{field: value})


def test_limit_action_clips_translation_and_rotation_per_axis_and_keeps_gripper() -> None:
    action = np.array([0.2, -0.2, 0.01, 1.0, -1.0, 0.1, 0.9])
    limited = limit_action(action, max_translation=0.05, max_rotation=0.25)
    np.testing.assert_allclose(limited, [0.05, -0.05, 0.01, 0.25, -0.25, 0.1, 0.9])
    assert action[0] == 0.2, "the input must not be modified"


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_limit_action_refuses_non_finite_values(bad: float) -> None:
    action = np.zeros(7)
    action[4] = bad
    with pytest.raises(ValueError, match="non-finite values in dpitch"):
        limit_action(action, 0.05, 0.25)


def test_limit_action_refuses_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"shape \(7,\)"):
        limit_action(np.zeros(6), 0.05, 0.25)


@pytest.mark.parametrize(
    ("value", "mode", "flip", "expected"),
    [
        (0.7, "raw", False, 0.7),
        (0.7, "raw", True, 0.3),
        (0.51, "binary", False, 1.0),
        (0.5, "binary", False, 0.0),
        (0.2, "binary", True, 1.0),
        (0.9, "signed_binary", False, 1.0),
        (0.1, "signed_binary", False, -1.0),
        (0.5, "signed_binary", False, 0.0),
        (0.9, "signed_binary", True, -1.0),
        (0.1, "signed_binary", True, 1.0),
    ],
)
def test_gripper_mapping(value: float, mode: str, flip: bool, expected: float) -> None:
    assert map_gripper(value, mode, flip) == pytest.approx(expected)


def test_gripper_mapping_rejects_unknown_mode_and_nan() -> None:
    with pytest.raises(ValueError, match="gripper_mode"):
        map_gripper(0.5, "percent")
    with pytest.raises(ValueError, match="not finite"):
        map_gripper(math.nan, "raw")


def test_twist_velocity_mode_scales_by_rate() -> None:
    action = np.array([0.01, 0.02, -0.03, 0.1, 0.0, -0.1, 1.0])
    linear, angular = twist_components(action, "delta", 10.0)
    np.testing.assert_allclose(linear, [0.01, 0.02, -0.03])
    np.testing.assert_allclose(angular, [0.1, 0.0, -0.1])
    linear, angular = twist_components(action, "velocity", 10.0)
    np.testing.assert_allclose(linear, [0.1, 0.2, -0.3])
    np.testing.assert_allclose(angular, [1.0, 0.0, -1.0])
    with pytest.raises(ValueError, match="twist_mode"):
        twist_components(action, "position", 10.0)


def test_rate_meter_measures_rate_over_its_window() -> None:
    clock = FakeClock()
    meter = RateMeter(window_s=2.0, clock=clock)
    assert meter.rate_hz() == 0.0
    for _ in range(21):  # 10 Hz for 2 s
        meter.tick()
        clock.now += 0.1
    assert meter.rate_hz() == pytest.approx(10.0, rel=0.06)
    clock.now += 5.0  # nothing for longer than the window
    assert meter.rate_hz() == 0.0


def test_latency_stats_percentiles() -> None:
    stats = LatencyStats(size=100)
    assert math.isnan(stats.percentile(50))
    for value in range(1, 101):
        stats.add(float(value))
    assert stats.percentile(50) == pytest.approx(50.5)
    assert stats.percentile(99) == pytest.approx(99.01)
    assert stats.last == 100.0
    stats.add(1000.0)
    assert len(stats) == 100, "the oldest sample is dropped"


def test_latest_slot_keeps_only_newest_and_counts_unused_drops() -> None:
    slot: LatestSlot[int] = LatestSlot()
    assert slot.peek() is None
    slot.put(1)
    slot.put(2)  # 1 was never used
    assert slot.dropped == 1
    assert slot.take() == 2
    slot.put(3)  # 2 was used: not a drop
    assert slot.dropped == 1
    assert slot.peek() == 3


def test_worker_refuses_jobs_while_busy_and_survives_errors() -> None:
    release = threading.Event()
    done: list[int] = []
    errors: list[Exception] = []

    def handle(job: int) -> None:
        if job < 0:
            raise RuntimeError("bad job")
        release.wait(5.0)
        done.append(job)

    worker: SingleJobWorker[int] = SingleJobWorker(handle, errors.append)
    try:
        assert worker.submit(1)
        assert not worker.submit(2), "a busy worker must refuse, not queue"
        release.set()
        assert worker.wait_idle(5.0)
        assert done == [1]
        assert worker.submit(-1)
        assert worker.wait_idle(5.0)
        assert len(errors) == 1 and "bad job" in str(errors[0])
        assert worker.submit(3), "the worker keeps running after a failing job"
        assert worker.wait_idle(5.0)
        assert done == [1, 3]
    finally:
        worker.stop(5.0)
    assert not worker.submit(4), "a stopped worker refuses jobs"


def test_worker_runs_off_the_calling_thread() -> None:
    threads: list[str] = []
    release = threading.Event()

    def job(_: int) -> None:
        release.wait(10.0)  # a worker that ran jobs on the caller's thread would block submit() here
        threads.append(threading.current_thread().name)

    worker: SingleJobWorker[int] = SingleJobWorker(job, print)
    try:
        worker.submit(0)
        assert threads == [], "submit() returned before the job ran: it runs elsewhere"
        release.set()
        worker.wait_idle(10.0)
    finally:
        worker.stop(5.0)
    assert threads and threads[0] != threading.current_thread().name


def test_problem_tracker_logs_once_then_throttles_and_reports_recovery() -> None:
    clock = FakeClock()
    tracker = ProblemTracker(repeat_after_s=10.0, clock=clock)
    assert tracker.report("image", "bad encoding yuv422")
    assert not tracker.report("image", "bad encoding yuv422")
    assert tracker.report("image", "bad encoding mono16"), "a different message is logged"
    clock.now = 11.0
    assert tracker.report("image", "bad encoding mono16"), "repeated after the throttle period"
    assert tracker.active() == {"image": "bad encoding mono16"}
    assert tracker.count("image") == 4
    assert tracker.resolve("image")
    assert not tracker.resolve("image")
    assert tracker.report("image", "bad encoding mono16"), "a problem that comes back is logged again"


def test_auto_cpu_threads_leaves_one_core_to_ros() -> None:
    from openvla_ros.ros.policy_node import auto_cpu_threads

    assert [auto_cpu_threads(cores) for cores in (1, 2, 4, 16)] == [1, 1, 3, 15]


def test_the_nodes_center_crop_auto_follows_the_models_training(tiny_checkpoint, tmp_path) -> None:
    import json
    import shutil

    from openvla_ros.ros.policy_node import PARAMETERS, load_policy

    augmented = tmp_path / "augmented"
    shutil.copytree(tiny_checkpoint, augmented)
    config = json.loads((augmented / "config.json").read_text())
    config["openvla_ros"] = {"trained_with_image_aug": True}
    (augmented / "config.json").write_text(json.dumps(config))
    values = {spec.name: spec.default for spec in PARAMETERS} | {"model": str(augmented), "device": "cpu"}
    assert load_policy(values).image_transform.center_crop, "center_crop_auto (default) turns it on"
    assert not load_policy(values | {"center_crop_auto": False}).image_transform.center_crop
    plain = values | {"model": str(tiny_checkpoint)}
    assert not load_policy(plain).image_transform.center_crop
    assert load_policy(plain | {"center_crop": True, "center_crop_auto": False}).image_transform.center_crop
