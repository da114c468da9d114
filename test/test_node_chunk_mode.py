"""The policy node's chunk mode over real DDS, with a chunked stand-in policy of known step time and K.

The stand-in (test/standin_policy_node.py, ``chunk=K``) sleeps its step time and returns K actions that
say which chunk and which index they are, so the published order can be checked. Rates are judged
relative to the set rate with the tolerance of the token-mode timing tests, so they hold on a busy
2-core machine; no latency needing a fast machine is asserted.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rclpy
from policy_helpers import (
    Camera,
    Driver,
    NodeProcess,
    Proprio,
    Received,
    assert_holds_rate,
    drive,
    is_zero,
    latest_status,
    start_node,
    status_values,
    wait_active,
    zero_delta_then_silence,
)
from ros_helpers import wait_until  # sets up DDS isolation first
from standin_policy_node import STEP_UNIT, decode_action

CHUNK = 8
CHUNK_STEP_S = 0.1
SLOW_CHUNK = 16
SLOW_STEP_S = 0.6
PROPRIO_VALUES = (0.1, 0.2, 0.3)


def _topics(name: str) -> tuple[str, str]:
    return f"/{name}/camera", f"/{name}/instruction"


def _start(name: str, log_dir: Path, step_s: float, chunk: dict[str, int], *overrides: str) -> NodeProcess:
    image_topic, instruction_topic = _topics(name)
    return start_node(
        name, log_dir, "model:=standin", f"image_topic:={image_topic}", f"instruction_topic:={instruction_topic}",
        "publish_step_timing:=true", *overrides, standin_step_s=step_s, standin_chunk=chunk,
    )



@pytest.fixture(scope="module")
def chunk_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, NodeProcess]]:
    log_dir = tmp_path_factory.mktemp("chunk_logs")
    started = {
        "chunk_fast": _start("chunk_fast", log_dir, CHUNK_STEP_S, {"chunk": CHUNK}, "rate_hz:=10.0"),
        "chunk_slow": _start("chunk_slow", log_dir, SLOW_STEP_S, {"chunk": SLOW_CHUNK}, "rate_hz:=10.0"),
        "chunk_inputs": _start(
            "chunk_inputs", log_dir, CHUNK_STEP_S, {"chunk": CHUNK, "num_images": 2, "proprio_dim": 3},
            "rate_hz:=10.0", "wrist_image_topics:=['/chunk_inputs/wrist']", "proprio_topic:=/chunk_inputs/state",
            "max_proprio_age_s:=0.3",
        ),
    }
    yield started
    for node_process in started.values():
        node_process.stop()


@pytest.fixture(scope="module")
def drivers(ros_node: rclpy.node.Node, chunk_nodes: dict[str, NodeProcess]) -> dict[str, Driver]:
    drivers = {name: Driver(ros_node, name, *_topics(name), compressed=False) for name in chunk_nodes}
    for name, driver in drivers.items():
        wait_active(driver, chunk_nodes[name])
    return drivers


@pytest.fixture(scope="module")
def timings(ros_node: rclpy.node.Node) -> dict[str, Received]:
    from diagnostic_msgs.msg import DiagnosticArray

    received = {name: Received() for name in ("chunk_fast", "chunk_slow")}
    for name, store in received.items():
        ros_node.create_subscription(DiagnosticArray, f"/{name}/step_timing", store.add, 50)
    return received


def _chunk_model_ms(timing: Received, start: float) -> list[float]:
    values = []
    for _, array in timing.since(start):
        for status in array.status:
            if status.name.endswith(": chunk"):
                values.append(float(next(item.value for item in status.values if item.key == "model_ms")))
    return values


@pytest.mark.parametrize("rate_hz", [10.0, 20.0])
def test_chunk_mode_holds_the_rate_while_the_model_runs_at_a_fraction_of_it(
    drivers: dict[str, Driver], diagnostics: Received, timings: dict[str, Received], rate_hz: float
) -> None:
    driver = drivers["chunk_fast"]  # 100 ms per chunk of 8: at 20 Hz a chunk lasts 400 ms
    first = drive(driver, rate_hz)
    time.sleep(4.5)
    assert_holds_rate(driver.twists, first + 1.0, 3.0, rate_hz)
    model_ms = _chunk_model_ms(timings["chunk_fast"], first + 1.0)
    assert model_ms and min(model_ms) >= CHUNK_STEP_S * 1e3 * 0.95, "each chunk took the stand-in's step"
    values = status_values(latest_status(diagnostics, "chunk_fast"))
    assert values["mode"] == "chunk" and values["chunk_size"] == str(CHUNK)
    assert 0.0 < float(values["inference_rate_hz"]) <= 0.6 * rate_hz, "one inference serves several ticks"
    # order: within a chunk the indices follow one another, chunks only move forward
    decoded = [decode_action(action.data) for _, action in driver.actions.since(first + 1.0, first + 4.0)]
    for (chunk_a, index_a), (chunk_b, index_b) in zip(decoded, decoded[1:], strict=False):
        assert chunk_b > chunk_a or (chunk_b == chunk_a and index_b == index_a + 1), decoded
    assert max(index for _, index in decoded) >= CHUNK // 2, "each chunk is followed open-loop for a while"


def test_actions_per_inference_replans_sooner(drivers: dict[str, Driver], diagnostics: Received) -> None:
    driver = drivers["chunk_fast"]
    assert all(result.successful for result in driver.set(actions_per_inference=CHUNK // 2))
    try:
        first = drive(driver, 10.0)
        time.sleep(3.5)
        decoded = [decode_action(action.data) for _, action in driver.actions.since(first + 1.0)]
        assert max(index for _, index in decoded) < CHUNK // 2 + 1, f"at most 4 (+1 while late) per chunk: {decoded}"
        assert_holds_rate(driver.twists, first + 1.0, 2.5, 10.0)
    finally:
        assert all(result.successful for result in driver.set(actions_per_inference=0))


def test_ensembling_publishes_the_weighted_average_of_overlapping_chunks(drivers: dict[str, Driver]) -> None:
    driver = drivers["chunk_fast"]
    results = driver.set(chunk_blend="ensemble", actions_per_inference=2, ensemble_decay=0.5)
    assert all(result.successful for result in results)
    try:
        first = drive(driver, 10.0)
        time.sleep(3.0)
        assert_holds_rate(driver.twists, first + 1.0, 2.0, 10.0)
        dx = np.array([action.data[0] for _, action in driver.actions.since(first + 1.0)]) / STEP_UNIT
        blended = np.abs(dx - np.round(dx)) > 0.05
        assert blended.mean() > 0.5, f"most ticks average several chunks' predictions: {dx.round(3).tolist()}"
        assert np.all(dx >= 1.0 - 1e-9) and np.all(dx <= CHUNK + 1e-9), "an average stays within its predictions"
    finally:
        results = driver.set(chunk_blend="none", actions_per_inference=0, ensemble_decay=0.01)
        assert all(result.successful for result in results)


def test_actions_per_inference_above_the_chunk_size_is_refused_naming_k(drivers: dict[str, Driver]) -> None:
    (result,) = drivers["chunk_fast"].set(actions_per_inference=CHUNK + 1)
    assert not result.successful
    assert f"more than the model's chunk size K = {CHUNK}" in result.reason
    (result,) = drivers["chunk_fast"].set(rate_hz=100.0)
    assert result.successful, "chunk mode goes up to 100 Hz"
    assert all(result.successful for result in drivers["chunk_fast"].set(rate_hz=10.0))


@pytest.mark.parametrize("stop", ["disable", "camera watchdog"])
def test_a_stop_in_the_middle_of_a_chunk_publishes_one_zero_delta_then_nothing(
    drivers: dict[str, Driver], diagnostics: Received, stop: str
) -> None:
    driver = drivers["chunk_slow"]  # 600 ms per chunk of 16 at 10 Hz: a chunk is nearly always running
    drive(driver, 10.0, count=4)
    values = status_values(latest_status(diagnostics, "chunk_slow"))
    assert int(values["queue_depth"]) > 0 or int(values["chunks"]) > 0
    stopped = time.monotonic()
    if stop == "disable":
        assert driver.enable(False).success
    else:
        driver.camera.mode = "stopped"  # max_image_age_s 0.5
    wait_until(lambda: any(is_zero(t) for _, t in driver.twists.since(stopped)), 5.0, "the zero delta")
    zero_delta_then_silence(driver, stopped, SLOW_STEP_S + 0.6)
    driver.camera.mode = "good"
    if stop == "camera watchdog":
        assert driver.enable(False).success


def _await_problem(node_process: NodeProcess, text: str, timeout_s: float = 10.0) -> None:
    wait_until(lambda: text in node_process.log(), timeout_s, f"{text!r} in the log")


def test_a_stale_wrist_camera_or_proprio_stops_motion_and_says_which(
    drivers: dict[str, Driver], chunk_nodes: dict[str, NodeProcess], ros_node: rclpy.node.Node
) -> None:
    driver = drivers["chunk_inputs"]
    wrist = Camera(ros_node, "/chunk_inputs/wrist")
    state = Proprio(ros_node, "/chunk_inputs/state", PROPRIO_VALUES)
    try:
        wrist.mode, state.running = "good", True
        drive(driver, 10.0)
        stopped = time.monotonic()
        wrist.mode = "stopped"
        wait_until(lambda: any(is_zero(t) for _, t in driver.twists.since(stopped)), 5.0, "the zero delta")
        zero_delta_then_silence(driver, stopped, 0.8)
        _await_problem(chunk_nodes["chunk_inputs"], "wrist camera images on /chunk_inputs/wrist are older than")

        wrist.mode = "good"
        driver.wait_for_actions(2)
        stopped = time.monotonic()
        state.running = False
        wait_until(lambda: any(is_zero(t) for _, t in driver.twists.since(stopped)), 5.0, "the zero delta")
        zero_delta_then_silence(driver, stopped, 0.8)
        _await_problem(chunk_nodes["chunk_inputs"], "proprio messages on /chunk_inputs/state are older than")
        state.running = True
        driver.wait_for_actions(2)
    finally:
        wrist.mode, state.running = "stopped", False
        driver.enable(False)
        ros_node.destroy_timer(wrist.timer)
        ros_node.destroy_timer(state.timer)


@pytest.mark.parametrize(
    ("chunk", "overrides", "message"),
    [
        ({"chunk": CHUNK}, ("actions_per_inference:=9",), f"actions_per_inference 9 is more than the model's chunk size K = {CHUNK}"),
        ({"chunk": CHUNK, "action_dim": 6}, (), "the model predicts 6-D actions; the node publishes 7-DoF deltas"),
        ({"chunk": CHUNK, "num_images": 2}, (), "the model takes 2 image(s): the camera and 1 wrist camera(s)"),
    ],
    ids=["actions-per-inference-above-k", "six-dof-model", "missing-wrist-topic"],
)
def test_a_chunk_model_that_does_not_fit_the_parameters_leaves_the_node_unconfigured_saying_why(
    ros_node: rclpy.node.Node, tmp_path: Path, chunk: dict[str, int], overrides: tuple[str, ...], message: str
) -> None:
    name = "chunk_misfit"
    node_process = _start(name, tmp_path, 0.01, chunk, *overrides)
    try:
        driver = Driver(ros_node, name, *_topics(name), compressed=False)
        driver.wait_ready(60.0)
        _await_problem(node_process, message, 30.0)
        assert driver.state() == "unconfigured"
    finally:
        assert node_process.stop() == 0, node_process.log()[-3000:]
