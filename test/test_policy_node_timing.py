"""The policy node's timing and safety logic over real DDS, with a stand-in policy of known step time.

Only the model is replaced (test/standin_policy_node.py): ticks, late ticks, reused frames, stops that
void a running step, the lifecycle, instruction QoS and signal handling are the node as shipped. The
step time is a sleep, so the rates asserted here hold on a busy machine: they do not depend on how fast
it runs a model. Every test sets up the state it needs; node processes belong to the module's fixture
or to the test itself.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rclpy
from lifecycle_msgs.msg import Transition  # noqa: E402
from policy_helpers import (
    PARAMS_FILE,
    Camera,
    Driver,
    NodeProcess,
    Received,
    assert_holds_rate,
    drive,
    is_zero,
    latest_status,
    rate_over,
    start_node,
    status_values,
    wait_active,
    zero_delta_then_silence,
)
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from ros_helpers import LATCHED_QOS, wait_until  # sets up DDS isolation first
from std_msgs.msg import String  # noqa: E402

VOLATILE_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE)
FAST_STEP_S = 0.02
SLOW_STEP_S = 0.15
LONG_STEP_S = 1.5
STANDIN_TRANSLATION = (0.01, -0.02, 0.03)


def _topics(name: str) -> tuple[str, str]:
    return f"/{name}/camera", f"/{name}/instruction"



@pytest.fixture(scope="module")
def standin_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, NodeProcess]]:
    log_dir = tmp_path_factory.mktemp("standin_logs")
    managed_params = log_dir / "managed.yaml"
    managed_params.write_text(
        PARAMS_FILE.read_text()
        .replace("/**/openvla_policy:", "/**/standin_managed:")
        .replace("autostart: true", "autostart: false")
        .replace("rate_hz: 5.0", "rate_hz: 10")
        .replace("max_translation: 0.05", "max_translation: 0")
    )

    def node(name: str, step_s: float, *overrides: str, params_file: Path = PARAMS_FILE) -> NodeProcess:
        image_topic, instruction_topic = _topics(name)
        return start_node(
            name,
            log_dir,
            "model:=standin",
            f"image_topic:={image_topic}",
            f"instruction_topic:={instruction_topic}",
            *overrides,
            params_file=params_file,
            standin_step_s=step_s,
        )

    started = {
        "standin_fast": node("standin_fast", FAST_STEP_S, "rate_hz:=10.0"),
        "standin_slow": node("standin_slow", SLOW_STEP_S, "rate_hz:=10.0"),
        "standin_long": node("standin_long", LONG_STEP_S, "rate_hz:=1.0"),
        "standin_managed": node("standin_managed", FAST_STEP_S, params_file=managed_params),
    }
    yield started
    for node_process in started.values():
        node_process.stop()


def _driver(ros_node: rclpy.node.Node, nodes: dict[str, NodeProcess], name: str, **kwargs) -> Driver:
    driver = Driver(ros_node, name, *_topics(name), compressed=False, **kwargs)
    if name != "standin_managed":
        wait_active(driver, nodes[name])
    return driver


@pytest.fixture(scope="module")
def drivers(ros_node: rclpy.node.Node, standin_nodes: dict[str, NodeProcess]) -> dict[str, Driver]:
    return {name: _driver(ros_node, standin_nodes, name) for name in standin_nodes}


_drive = drive
_zero_delta_then_silence = zero_delta_then_silence


@pytest.mark.parametrize("rate_hz", [5.0, 10.0, 20.0])
def test_the_control_rate_holds_when_the_step_is_short(drivers: dict[str, Driver], rate_hz: float) -> None:
    driver = drivers["standin_fast"]
    first = _drive(driver, rate_hz)
    time.sleep(4.5)
    assert_holds_rate(driver.twists, first + 1.0, 3.0, rate_hz)


def test_each_step_runs_on_a_new_frame_and_carries_its_stamp(drivers: dict[str, Driver]) -> None:
    driver = drivers["standin_fast"]
    first = _drive(driver, 5.0)
    time.sleep(2.5)
    twists = [twist for _, twist in driver.twists.since(first)]
    stamps = [(twist.header.stamp.sec, twist.header.stamp.nanosec) for twist in twists]
    assert set(stamps) <= driver.camera.stamps, "every action must carry the stamp of a published image"
    assert len(set(stamps)) == len(stamps), "a 30 Hz camera gives every 5 Hz step a new frame"
    np.testing.assert_allclose([twists[-1].twist.linear.x, twists[-1].twist.linear.y], STANDIN_TRANSLATION[:2])


def test_a_step_longer_than_the_period_starts_the_next_step_when_it_ends(
    drivers: dict[str, Driver], diagnostics: Received
) -> None:
    driver = drivers["standin_slow"]  # 150 ms steps at 10 Hz: the model bounds the rate
    first = _drive(driver, 10.0)
    time.sleep(4.5)
    achieved = rate_over(driver.twists, first + 1.0, 3.0)
    back_to_back = 1.0 / SLOW_STEP_S
    assert 0.8 * back_to_back <= achieved <= 1.06 * back_to_back, f"{achieved:.2f} Hz, steps back to back"
    values = status_values(latest_status(diagnostics, "standin_slow"))
    assert int(values["skipped_ticks"]) > 0, "ticks that found a step running and a late tick waiting"


def test_a_stop_in_the_middle_of_a_step_publishes_one_zero_delta_then_nothing(drivers: dict[str, Driver]) -> None:
    driver = drivers["standin_long"]  # 1.5 s steps back to back: one is always running
    _drive(driver)
    driver.wait_for_actions(1, timeout_s=10.0)
    disabled = time.monotonic()
    assert driver.enable(False).success
    wait_until(lambda: driver.twists.since(disabled), 5.0, "the zero delta")
    _zero_delta_then_silence(driver, disabled, LONG_STEP_S + 0.5)

    _drive(driver)
    driver.wait_for_actions(1, timeout_s=10.0)
    stopped = time.monotonic()
    driver.camera.mode = "stopped"  # the watchdog (max_image_age_s 0.5) stops it while a step runs
    wait_until(lambda: driver.twists.since(stopped), 5.0, "the watchdog's zero delta")
    assert driver.twists.since(stopped)[0][0] - stopped < LONG_STEP_S, "the stop must not wait for the step"
    _zero_delta_then_silence(driver, stopped, LONG_STEP_S + 0.5)
    driver.camera.mode = "good"


def test_a_camera_slower_than_the_rate_keeps_the_rate_and_is_reported(
    drivers: dict[str, Driver], ros_node: rclpy.node.Node, diagnostics: Received
) -> None:
    driver = drivers["standin_fast"]
    _drive(driver, 10.0)
    slow = Camera(ros_node, _topics("standin_fast")[0], hz=4.0)
    driver.camera.mode = "stopped"
    slow.mode = "good"
    try:
        start = time.monotonic()
        time.sleep(4.0)
        assert_holds_rate(driver.twists, start + 0.5, 3.0, 10.0)
        # A frame delayed past max_image_age_s on a busy machine gives a zero delta stamped with the clock
        # (the stale stop, tested elsewhere); every action that moves carries the stamp of a camera frame.
        moving = [t for _, t in driver.twists.since(start + 0.5) if t.twist.linear.x or t.twist.linear.y]
        stamps = {(t.header.stamp.sec, t.header.stamp.nanosec) for t in moving}
        assert len(moving) >= 10, "most ticks act"
        assert stamps <= slow.stamps | driver.camera.stamps and len(stamps) <= 17, "ticks reuse the newest frame"
        assert int(status_values(latest_status(diagnostics, "standin_fast"))["ticks_reusing_frame"]) >= 10
    finally:
        slow.mode = "stopped"
        ros_node.destroy_timer(slow.timer)
        driver.camera.mode = "good"


def test_managed_node_runs_the_whole_lifecycle_through_its_services(
    drivers: dict[str, Driver], standin_nodes: dict[str, NodeProcess]
) -> None:
    driver = drivers["standin_managed"]
    driver.wait_ready(120.0)
    assert driver.state() == "unconfigured", "autostart: false must leave the node unconfigured"
    assert driver.get("rate_hz", "max_translation") == [10.0, 0.0], "10 and 0 in YAML are 10.0 and 0.0"
    assert driver.transition(Transition.TRANSITION_CONFIGURE)
    assert driver.state() == "inactive"
    response = driver.enable(True)
    assert not response.success and "inactive" in response.message
    assert driver.transition(Transition.TRANSITION_ACTIVATE)
    assert driver.state() == "active"
    first = _drive(driver)
    time.sleep(3.5)
    assert_holds_rate(driver.twists, first + 0.5, 2.5, 10.0)
    actions = np.array([action.data for _, action in driver.actions.since(first)])
    assert np.all(actions[:, :3] == 0.0), "max_translation: 0 must hold every translation at zero"
    assert np.all(actions[:, 3:6] != 0.0)

    deactivated = time.monotonic()
    assert driver.transition(Transition.TRANSITION_DEACTIVATE)
    assert driver.state() == "inactive"
    _zero_delta_then_silence(driver, deactivated, 0.8)

    assert driver.transition(Transition.TRANSITION_CLEANUP)
    assert driver.state() == "unconfigured"
    assert driver.transition(Transition.TRANSITION_CONFIGURE), "configure after cleanup loads the policy again"
    assert driver.transition(Transition.TRANSITION_ACTIVATE)
    _drive(driver)
    assert standin_nodes["standin_managed"].log().count("subscribed to /standin_managed/camera") == 2


def test_image_stamps_ahead_of_the_clock_stop_output(
    drivers: dict[str, Driver], standin_nodes: dict[str, NodeProcess]
) -> None:
    driver = drivers["standin_fast"]
    _drive(driver, 10.0)
    shifted = time.monotonic()
    driver.camera.stamp_offset_s = 5.0
    try:
        wait_until(lambda: any(is_zero(t) for _, t in driver.twists.since(shifted)), 5.0, "the zero delta")
        _zero_delta_then_silence(driver, shifted, 0.8)
        assert "stamps are ahead of the node's clock" in standin_nodes["standin_fast"].log()
    finally:
        driver.camera.stamp_offset_s = 0.0
    driver.wait_for_actions(2)


def test_instructions_from_an_ordinary_volatile_publisher_reach_the_node(
    drivers: dict[str, Driver], ros_node: rclpy.node.Node, diagnostics: Received,
    standin_nodes: dict[str, NodeProcess],
) -> None:
    driver = drivers["standin_fast"]
    _drive(driver)
    volatile = ros_node.create_publisher(String, _topics("standin_fast")[1], VOLATILE_QOS)
    try:
        wait_until(lambda: volatile.get_subscription_count() > 0, 30, "a match for a volatile publisher")
        volatile.publish(String(data="open the drawer"))
        wait_until(
            lambda: status_values(latest_status(diagnostics, "standin_fast"))["instruction"] == "open the drawer",
            15.0,
            "the volatile publisher's instruction in the diagnostics",
        )
        assert "incompatible QoS" not in standin_nodes["standin_fast"].log(), "no warning for a working publisher"
    finally:
        ros_node.destroy_publisher(volatile)


def test_a_latched_instruction_published_before_the_node_starts_reaches_it(
    ros_node: rclpy.node.Node, diagnostics: Received, tmp_path: Path
) -> None:
    name = "standin_latecomer"
    image_topic, instruction_topic = _topics(name)
    latched = ros_node.create_publisher(String, instruction_topic, LATCHED_QOS)
    latched.publish(String(data="stack the blocks"))
    node_process = start_node(
        name, tmp_path, "model:=standin", f"image_topic:={image_topic}", f"instruction_topic:={instruction_topic}",
        standin_step_s=FAST_STEP_S,
    )
    try:
        driver = Driver(ros_node, name, image_topic, "/unused_instruction", compressed=False)
        wait_active(driver, node_process)
        wait_until(
            lambda: status_values(latest_status(diagnostics, name))["instruction"] == "stack the blocks",
            15.0,
            "the latched instruction in the late node's diagnostics",
        )
        assert "offering incompatible QoS" not in node_process.log()
    finally:
        ros_node.destroy_publisher(latched)
        assert node_process.stop() == 0, node_process.log()[-3000:]


@pytest.mark.parametrize(
    ("signals", "gap_s"),
    [
        ((signal.SIGINT, signal.SIGINT), 0.05),
        ((signal.SIGINT, signal.SIGINT), 0.3),
        ((signal.SIGINT, signal.SIGINT, signal.SIGINT), 0.15),
        ((signal.SIGTERM,), 0.0),
        ((signal.SIGINT, signal.SIGTERM), 0.05),
    ],
    ids=["two-sigints-50ms-apart", "two-sigints-300ms-apart", "three-sigints", "sigterm", "sigint-then-sigterm"],
)
def test_signals_while_driving_send_one_zero_delta_and_exit_cleanly(
    ros_node: rclpy.node.Node, tmp_path: Path, signals: tuple[int, ...], gap_s: float
) -> None:
    name = "standin_signals"
    node_process = start_node(
        name, tmp_path, "model:=standin", *(f"{k}:={v}" for k, v in zip(("image_topic", "instruction_topic"),
                                                                          _topics(name), strict=True)),
        "rate_hz:=5.0", standin_step_s=0.3,
    )
    driver = Driver(ros_node, name, *_topics(name), compressed=False)
    try:
        wait_active(driver, node_process)
        _drive(driver)
        driver.wait_for_actions(1)
        interrupted = time.monotonic()
        for number, signum in enumerate(signals):
            if number:
                time.sleep(gap_s)
            node_process.process.send_signal(signum)
        node_process.process.wait(timeout=60)
    finally:
        node_process.stop()
        driver.camera.mode = "stopped"
    log = node_process.log()
    assert node_process.process.returncode == 0, log[-3000:]
    wait_until(lambda: any(is_zero(t) for _, t in driver.twists.since(interrupted)), 5.0, "the zero delta")
    after = driver.twists.since(interrupted)
    assert is_zero(after[-1][1]) and sum(is_zero(t) for _, t in after) == 1, "one zero delta, last"
    assert len(after) <= 2, "at most a step that was already publishing, then the zero delta"
    for noise in ("Traceback", "terminate called", "never retrieved"):
        assert noise not in log, log[-3000:]


def test_a_rate_above_the_token_limit_is_blamed_on_the_rate_not_on_the_load(
    ros_node: rclpy.node.Node, tmp_path: Path
) -> None:
    name = "standin_too_fast"
    node_process = start_node(name, tmp_path, "model:=standin", "rate_hz:=100.0", standin_step_s=FAST_STEP_S)
    try:
        wait_until(lambda: "stays unconfigured" in node_process.log() or node_process.process.poll() is not None,
                   120.0, "the configure failure")
        log = node_process.log()
        assert "the model loaded, but the parameters do not fit it" in log, log[-3000:]
        assert "rate_hz 100 is above 30 Hz" in log and "could not load the model" not in log
        assert node_process.process.poll() is None, "the node keeps running, unconfigured"
    finally:
        assert node_process.stop() == 0, node_process.log()[-3000:]
