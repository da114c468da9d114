"""The policy node over real DDS: node processes started from config/policy.yaml with the tiny model.

Three node processes run for the whole module (started together to share the start-up time):
``openvla_policy`` (raw images, the parameter file as shipped), ``policy_compressed`` (compressed
images, enabled at start) and ``policy_broken`` (a model path that does not exist and invalid start-up
parameters). The tests drive them from an rclpy node in this process and run in file order: each
leaves the main node enabled with an instruction, or says what it changed.
"""

from __future__ import annotations

import ast
import importlib.util
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import rclpy  # noqa: E402  (imported after the DDS isolation variables are set)
import rclpy.duration  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus  # noqa: E402
from geometry_msgs.msg import TwistStamped  # noqa: E402
from lifecycle_msgs.msg import Transition  # noqa: E402
from lifecycle_msgs.srv import ChangeState, GetState  # noqa: E402
from rcl_interfaces.srv import GetParameters, SetParameters  # noqa: E402
from rclpy.parameter import Parameter, parameter_value_to_python  # noqa: E402
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from ros_helpers import LATCHED_QOS, spinning_node, wait_until  # sets up DDS isolation first
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402
from std_msgs.msg import Float64, Float64MultiArray, String  # noqa: E402
from std_srvs.srv import SetBool  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PARAMS_FILE = REPO / "config" / "policy.yaml"
LAUNCH_FILE = REPO / "launch" / "policy.launch.py"
CAMERA_HZ = 30.0
IMAGE_SHAPE = (96, 128, 3)
INSTRUCTION = "pick up the red block"
SENSOR_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.BEST_EFFORT)


# ---------------------------------------------------------------------------------------- helpers



@dataclass
class NodeProcess:
    name: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        return self.process.returncode


def start_node(
    name: str, log_dir: Path, *ros_args: str, params_file: Path = PARAMS_FILE, namespace: str = ""
) -> NodeProcess:
    command = [
        sys.executable,
        "-m",
        "openvla_ros.policy_node",
        "--ros-args",
        "--params-file",
        str(params_file),
    ]
    if name != "openvla_policy":
        command += ["-r", f"__node:={name}"]
    if namespace:
        command += ["-r", f"__ns:={namespace}"]
    for argument in ros_args:
        command += ["-p", argument]
    env = dict(os.environ, RCUTILS_LOGGING_BUFFERED_STREAM="0", PYTHONUNBUFFERED="1")
    log_path = log_dir / f"{name}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    return NodeProcess(name, process, log_path)


@dataclass
class Received:
    """Messages received on one topic, with their arrival times (monotonic)."""

    items: list[tuple[float, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, message: Any) -> None:
        with self.lock:
            self.items.append((time.monotonic(), message))

    def since(self, start: float, end: float = math.inf) -> list[tuple[float, Any]]:
        with self.lock:
            return [(t, m) for t, m in self.items if start <= t < end]


class Camera:
    """Publishes a constant test image (30 Hz by default) with fresh stamps; ``mode`` selects what is sent.

    ``stamp_offset_s`` shifts the stamps from the publisher's clock (a camera whose clock is ahead).
    """

    def __init__(
        self, node: rclpy.node.Node, topic: str, compressed: bool = False, hz: float = CAMERA_HZ
    ) -> None:
        self.node = node
        self.compressed = compressed
        self.mode = "stopped"
        self.stamp_offset_s = 0.0
        self.stamps: set[tuple[int, int]] = set()
        self.pixels = np.random.default_rng(1).integers(0, 256, size=IMAGE_SHAPE, dtype=np.uint8)
        message_type = CompressedImage if compressed else Image
        self.publisher = node.create_publisher(message_type, topic, SENSOR_QOS)
        self.timer = node.create_timer(1.0 / hz, self._publish)
        ok, jpeg = cv2.imencode(".jpg", self.pixels)
        assert ok
        self.jpeg = jpeg.tobytes()

    def _publish(self) -> None:
        if self.mode == "stopped":
            return
        now = self.node.get_clock().now()
        stamp = (now + rclpy.duration.Duration(nanoseconds=int(self.stamp_offset_s * 1e9))).to_msg()
        if self.compressed:
            message = CompressedImage(format="jpeg")
            message.data = self.jpeg if self.mode == "good" else b"\xff\xd8\xff\xe0 this is not a jpeg"
        else:
            height, width, _ = IMAGE_SHAPE
            message = Image(height=height, width=width, encoding="rgb8", step=width * 3)
            data = self.pixels.tobytes()
            if self.mode == "bad_encoding":
                message.encoding = "yuv422"
            elif self.mode == "bad_length":
                data = data[: len(data) // 2]
            message.data = data
        message.header.stamp = stamp
        message.header.frame_id = "camera"
        self.stamps.add((stamp.sec, stamp.nanosec))
        self.publisher.publish(message)


class Driver:
    """The test side: publishers, subscriptions and service clients for one policy node."""

    def __init__(
        self,
        node: rclpy.node.Node,
        name: str,
        image_topic: str,
        instruction_topic: str,
        compressed: bool,
        camera_hz: float = CAMERA_HZ,
    ):
        self.node = node
        self.name = name
        self.camera = Camera(node, image_topic + ("/compressed" if compressed else ""), compressed, camera_hz)
        self.instruction_pub = node.create_publisher(String, instruction_topic, LATCHED_QOS)
        self.actions, self.twists, self.grippers = Received(), Received(), Received()
        node.create_subscription(Float64MultiArray, f"/{name}/action", self.actions.add, 50)
        node.create_subscription(TwistStamped, f"/{name}/delta_twist", self.twists.add, 50)
        node.create_subscription(Float64, f"/{name}/gripper", self.grippers.add, 50)
        self.enable_client = node.create_client(SetBool, f"/{name}/enable")
        self.state_client = node.create_client(GetState, f"/{name}/get_state")
        self.change_state_client = node.create_client(ChangeState, f"/{name}/change_state")
        self.get_params_client = node.create_client(GetParameters, f"/{name}/get_parameters")
        self.set_params_client = node.create_client(SetParameters, f"/{name}/set_parameters")

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        for client in (self.enable_client, self.state_client, self.get_params_client, self.set_params_client):
            assert client.wait_for_service(timeout_sec=timeout_s), f"{client.srv_name} never appeared"

    def call(self, client: Any, request: Any, timeout_s: float = 10.0) -> Any:
        future = client.call_async(request)
        wait_until(future.done, timeout_s, f"a response from {client.srv_name}")
        return future.result()

    def enable(self, on: bool) -> SetBool.Response:
        return self.call(self.enable_client, SetBool.Request(data=on))

    def state(self) -> str:
        return self.call(self.state_client, GetState.Request()).current_state.label

    def transition(self, transition_id: int, timeout_s: float = 60.0) -> bool:
        request = ChangeState.Request(transition=Transition(id=transition_id))
        return self.call(self.change_state_client, request, timeout_s).success

    def get(self, *names: str) -> list[Any]:
        response = self.call(self.get_params_client, GetParameters.Request(names=list(names)))
        return [parameter_value_to_python(value) for value in response.values]

    def set(self, **values: Any) -> list[Any]:
        request = SetParameters.Request(
            parameters=[Parameter(name, value=value).to_parameter_msg() for name, value in values.items()]
        )
        return list(self.call(self.set_params_client, request).results)

    def instruct(self, text: str) -> None:
        self.instruction_pub.publish(String(data=text))

    def wait_for_actions(self, count: int = 1, timeout_s: float = 10.0) -> float:
        """Waits until ``count`` new twists arrived; returns the arrival time of the first of them."""
        start = time.monotonic()
        wait_until(
            lambda: len(self.twists.since(start)) >= count, timeout_s, f"{count} actions from {self.name}"
        )
        return self.twists.since(start)[0][0]

    def silent_for(self, seconds: float) -> list[tuple[float, Any]]:
        """Returns the twists received during the next ``seconds``."""
        start = time.monotonic()
        time.sleep(seconds)
        return self.twists.since(start)


def is_zero(twist: TwistStamped) -> bool:
    values = (twist.twist.linear.x, twist.twist.linear.y, twist.twist.linear.z)
    values += (twist.twist.angular.x, twist.twist.angular.y, twist.twist.angular.z)
    return all(value == 0.0 for value in values)


def rate_over(received: Received, start: float, window_s: float) -> float:
    times = [t for t, _ in received.since(start, start + window_s)]
    assert len(times) >= 2, f"only {len(times)} messages in {window_s} s"
    return (len(times) - 1) / (times[-1] - times[0])


# ---------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def nodes(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, NodeProcess]]:
    log_dir = tmp_path_factory.mktemp("policy_node_logs")
    # The broken node reads a copy of the shipped file with two values changed, from a namespace.
    broken_params = log_dir / "broken.yaml"
    broken_params.write_text(
        PARAMS_FILE.read_text()
        .replace("/**/openvla_policy:", "/**/policy_broken:")
        .replace('frame_id: "base_link"', 'frame_id: "tool0"')
        .replace("max_rotation: 0.25", "max_rotation: 0.2")
    )
    # The managed node starts unconfigured (autostart false) from a file that writes floats as integers.
    managed_params = log_dir / "managed.yaml"
    managed_params.write_text(
        PARAMS_FILE.read_text()
        .replace("/**/openvla_policy:", "/**/policy_managed:")
        .replace("autostart: true", "autostart: false")
        .replace("rate_hz: 5.0", "rate_hz: 10")
        .replace("max_translation: 0.05", "max_translation: 0")
    )
    started = {
        "policy_managed": start_node(
            "policy_managed",
            log_dir,
            f"model:={tiny_checkpoint}",
            "cpu_threads:=1",
            "image_topic:=/managed_camera/image",
            "instruction_topic:=/managed_instruction",
            params_file=managed_params,
        ),
        "openvla_policy": start_node(
            "openvla_policy", log_dir, f"model:={tiny_checkpoint}", "cpu_threads:=1"
        ),
        "policy_compressed": start_node(
            "policy_compressed",
            log_dir,
            f"model:={tiny_checkpoint}",
            "cpu_threads:=1",
            "image_transport:=compressed",
            "image_topic:=/compressed_camera/image",
            "instruction_topic:=/compressed_instruction",
            "start_enabled:=true",
        ),
        "policy_broken": start_node(
            "policy_broken",
            log_dir,
            "model:=/nonexistent/openvla-checkpoint",
            "image_topic:=/broken_camera/image",
            "rate_hz:=100.0",
            "gripper_mode:=sideways",
            params_file=broken_params,
            namespace="/lab",
        ),
    }
    yield started
    for node_process in started.values():
        node_process.stop()


@pytest.fixture(scope="module")
def ros_node() -> Iterator[rclpy.node.Node]:
    with spinning_node("policy_node_test_driver") as node:
        yield node


@pytest.fixture(scope="module")
def main_driver(nodes: dict[str, NodeProcess], ros_node: rclpy.node.Node) -> Driver:
    driver = Driver(ros_node, "openvla_policy", "/camera/image_raw", "/instruction", compressed=False)
    driver.wait_ready()
    wait_until(
        lambda: driver.camera.publisher.get_subscription_count() > 0, 30, "the node's image subscription"
    )
    driver.camera.mode = "good"
    return driver


@pytest.fixture(scope="module")
def diagnostics(ros_node: rclpy.node.Node) -> Received:
    received = Received()
    ros_node.create_subscription(DiagnosticArray, "/diagnostics", received.add, 50)
    return received


def latest_status(diagnostics: Received, node_name: str, timeout_s: float = 5.0) -> DiagnosticStatus:
    start = time.monotonic()

    def find() -> DiagnosticStatus | None:
        for _, array in reversed(diagnostics.since(start)):
            for status in array.status:
                if status.name == f"{node_name}: policy":
                    return status
        return None

    wait_until(lambda: find() is not None, timeout_s, f"diagnostics of {node_name}")
    status = find()
    assert status is not None
    return status


# ---------------------------------------------------------------------------------------- the main node


def test_node_starts_from_the_parameter_file_and_activates_itself(
    main_driver: Driver, tiny_checkpoint: Path
) -> None:
    assert main_driver.state() == "active"
    model, rate, gripper_mode, start_enabled, frame_id = main_driver.get(
        "model", "rate_hz", "gripper_mode", "start_enabled", "frame_id"
    )
    assert model == str(tiny_checkpoint), "the -p override must win over the file"
    assert (rate, gripper_mode, start_enabled, frame_id) == (5.0, "raw", False, "base_link")


def test_nothing_is_published_without_an_instruction(main_driver: Driver) -> None:
    response = main_driver.enable(True)
    assert response.success
    assert "waiting for an instruction" in response.message
    assert main_driver.silent_for(1.5) == []
    assert main_driver.actions.since(0) == [] and main_driver.grippers.since(0) == []


def test_nothing_is_published_before_enable(main_driver: Driver) -> None:
    assert main_driver.enable(False).success
    main_driver.instruct(INSTRUCTION)
    assert main_driver.silent_for(1.5) == []


def test_actions_arrive_at_5_hz_stamped_with_image_stamps(main_driver: Driver) -> None:
    assert main_driver.enable(True).success
    first = main_driver.wait_for_actions(2)
    time.sleep(3.2)
    assert rate_over(main_driver.twists, first, 3.0) == pytest.approx(5.0, rel=0.10)
    twists = [twist for _, twist in main_driver.twists.since(first)]
    stamps = {(twist.header.stamp.sec, twist.header.stamp.nanosec) for twist in twists}
    assert stamps <= main_driver.camera.stamps, "every action must carry the stamp of a published image"
    assert len(stamps) == len(twists), "each step uses a new frame"
    assert {twist.header.frame_id for twist in twists} == {"base_link"}

    actions = [action for _, action in main_driver.actions.since(first)]
    assert actions and all(len(action.data) == 7 for action in actions)
    assert actions[0].layout.dim[0].label == "dx,dy,dz,droll,dpitch,dyaw,gripper"
    assert actions[0].layout.dim[0].size == 7
    values = np.array([action.data for action in actions])
    assert np.all(np.isfinite(values))
    assert np.all(np.abs(values[:, :3]) <= 0.05) and np.all(np.abs(values[:, 3:6]) <= 0.25)
    twist = twists[-1].twist
    np.testing.assert_allclose(
        [twist.linear.x, twist.linear.y, twist.linear.z, twist.angular.x, twist.angular.y, twist.angular.z],
        values[-1, :6],
        err_msg="delta mode: the twist is the action's delta",
    )
    grippers = [message.data for _, message in main_driver.grippers.since(first)]
    assert grippers and grippers[-1] == pytest.approx(values[-1, 6]), "raw mode passes the gripper through"


def test_diagnostics_report_rate_latency_and_dropped_frames(
    main_driver: Driver, diagnostics: Received
) -> None:
    status = latest_status(diagnostics, "openvla_policy")
    values = {item.key: item.value for item in status.values}
    assert status.level == DiagnosticStatus.OK, status.message
    assert values["state"] == "active" and values["enabled"] == "true"
    assert values["instruction"] == INSTRUCTION
    assert float(values["rate_hz_achieved"]) == pytest.approx(5.0, rel=0.15)
    assert 0.0 < float(values["inference_latency_ms_median"]) < 1000.0
    assert 0.0 <= float(values["image_age_s"]) < 0.5
    assert int(values["dropped_frames"]) > 0, "a 30 Hz camera and a 5 Hz loop must drop frames"


def test_rate_gripper_twist_and_limits_change_at_run_time(main_driver: Driver) -> None:
    results = main_driver.set(
        rate_hz=10.0, twist_mode="velocity", gripper_mode="signed_binary", max_translation=0.001
    )
    assert all(result.successful for result in results), [result.reason for result in results]
    try:
        first = main_driver.wait_for_actions(2)
        time.sleep(3.2)
        assert rate_over(main_driver.twists, first, 3.0) == pytest.approx(10.0, rel=0.10)
        actions = np.array([action.data for _, action in main_driver.actions.since(first + 0.5)])
        twists = [twist.twist for _, twist in main_driver.twists.since(first + 0.5)]
        grippers = [message.data for _, message in main_driver.grippers.since(first + 0.5)]
        assert np.all(np.abs(actions[:, :3]) <= 0.001 + 1e-12), "max_translation must clip every axis"
        assert np.abs(actions[:, :3]).max() == pytest.approx(0.001), "the tiny model's deltas exceed the clip"
        # the tiny model gives the same action for the same image and instruction: compare any pair
        np.testing.assert_allclose(
            [twists[-1].linear.x, twists[-1].angular.z], [actions[-1, 0] * 10.0, actions[-1, 5] * 10.0]
        )
        assert set(grippers) <= {-1.0, 0.0, 1.0}
        assert grippers[-1] == np.sign(2.0 * actions[-1, 6] - 1.0)
    finally:
        main_driver.set(rate_hz=5.0, twist_mode="delta", gripper_mode="raw", max_translation=0.05)


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        ({"rate_hz": 100.0}, "rate_hz"),
        ({"rate_hz": 0.0}, "rate_hz"),
        ({"gripper_mode": "sideways"}, "gripper_mode must be one of raw, binary, signed_binary"),
        ({"twist_mode": "accel"}, "twist_mode must be one of delta, velocity"),
        ({"max_rotation": -1.0}, "max_rotation"),
        ({"frame_id": ""}, "frame_id must not be empty"),
        ({"model": "/elsewhere"}, "read-only"),
        ({"rate_hz": "fast"}, "type"),
    ],
)
def test_invalid_parameters_are_rejected_with_a_reason(
    main_driver: Driver, values: dict, reason: str
) -> None:
    (result,) = main_driver.set(**values)
    assert not result.successful
    assert reason in result.reason
    assert main_driver.get("rate_hz", "gripper_mode") == [5.0, "raw"], "rejected values must not apply"


def test_rejected_parameter_changes_are_logged_with_the_reason(
    main_driver: Driver, nodes: dict[str, NodeProcess]
) -> None:
    (result,) = main_driver.set(max_image_age_s=60.0)
    assert not result.successful
    wait_until(
        lambda: "parameter change rejected (max_image_age_s)" in nodes["openvla_policy"].log(),
        5.0,
        "the rejection in the node's log",
    )
    line = next(
        line
        for line in nodes["openvla_policy"].log().splitlines()
        if "parameter change rejected (max_image_age_s)" in line
    )
    assert result.reason in line


def test_whole_numbers_set_at_run_time_are_taken_as_floats(main_driver: Driver) -> None:
    (result,) = main_driver.set(rate_hz=5)
    assert result.successful, result.reason
    assert main_driver.get("rate_hz") == [5.0]


def test_watchdog_sends_one_zero_delta_when_the_camera_stops(main_driver: Driver) -> None:
    main_driver.wait_for_actions(1)
    stopped = time.monotonic()
    main_driver.camera.mode = "stopped"
    time.sleep(2.0)  # max_image_age_s is 0.5 in the parameter file
    after = main_driver.twists.since(stopped)
    zeros = [twist for _, twist in after if is_zero(twist)]
    assert len(zeros) == 1, f"expected exactly one zero delta, got {len(zeros)} of {len(after)} messages"
    assert is_zero(after[-1][1]), "nothing may follow the zero delta"
    assert after[-1][0] - stopped < 0.5 + 0.2 + 0.3, "the stop must come within max_image_age_s and a tick"
    assert main_driver.silent_for(1.0) == []
    main_driver.camera.mode = "good"
    main_driver.wait_for_actions(2, timeout_s=5.0)


@pytest.mark.parametrize(
    ("mode", "logged"),
    [
        ("bad_encoding", "unsupported image encoding 'yuv422'"),
        ("bad_length", "needs 36864 bytes of data, got 18432"),
    ],
)
def test_bad_images_stop_output_are_logged_once_and_recover(
    main_driver: Driver, nodes: dict[str, NodeProcess], mode: str, logged: str
) -> None:
    main_driver.wait_for_actions(1)
    main_driver.camera.mode = mode
    time.sleep(0.5)
    assert all(is_zero(twist) for twist in [m for _, m in main_driver.silent_for(1.5)]), (
        "no action from a bad frame"
    )
    assert main_driver.silent_for(0.6) == []
    log = nodes["openvla_policy"].log()
    assert log.count(logged) == 1, f"expected one log line with {logged!r}:\n{log[-3000:]}"
    assert nodes["openvla_policy"].process.poll() is None
    main_driver.camera.mode = "good"
    main_driver.wait_for_actions(2, timeout_s=5.0)
    assert "camera images are valid again" in nodes["openvla_policy"].log()


@pytest.mark.parametrize(("text", "logged"), [("", "empty"), ("x" * 5000, "1000")])
def test_bad_instructions_stop_output_and_recover(
    main_driver: Driver, nodes: dict[str, NodeProcess], text: str, logged: str
) -> None:
    main_driver.wait_for_actions(1)
    main_driver.instruct(text)
    time.sleep(0.5)
    assert main_driver.silent_for(1.0) == []
    last_line = [
        line for line in nodes["openvla_policy"].log().splitlines() if "instruction rejected" in line
    ][-1]
    assert logged in last_line
    main_driver.instruct(INSTRUCTION)
    main_driver.wait_for_actions(2, timeout_s=5.0)


def test_disable_sends_one_zero_delta_then_silence(main_driver: Driver) -> None:
    main_driver.wait_for_actions(1)
    disabled = time.monotonic()
    assert main_driver.enable(False).success
    time.sleep(1.0)
    after = [twist for _, twist in main_driver.twists.since(disabled)]
    assert after and is_zero(after[-1]) and sum(is_zero(twist) for twist in after) == 1
    assert main_driver.silent_for(0.8) == []


def test_sigint_while_driving_sends_a_zero_delta_and_exits_cleanly(
    nodes: dict[str, NodeProcess], main_driver: Driver
) -> None:
    assert main_driver.enable(True).success
    main_driver.wait_for_actions(2)
    interrupted = time.monotonic()
    assert nodes["openvla_policy"].stop() == 0, nodes["openvla_policy"].log()[-3000:]
    time.sleep(0.3)
    after = [twist for _, twist in main_driver.twists.since(interrupted)]
    assert after and is_zero(after[-1]), "the last message before exit must be a zero delta"


# ---------------------------------------------------------------------------------------- other nodes


def test_compressed_transport_survives_corrupt_jpeg_and_recovers(
    nodes: dict[str, NodeProcess], ros_node: rclpy.node.Node
) -> None:
    driver = Driver(
        ros_node, "policy_compressed", "/compressed_camera/image", "/compressed_instruction", True
    )
    driver.wait_ready()
    wait_until(
        lambda: driver.camera.publisher.get_subscription_count() > 0, 30, "the compressed subscription"
    )
    driver.instruct(INSTRUCTION)
    driver.camera.mode = "good"
    driver.wait_for_actions(3, timeout_s=15.0)  # start_enabled: no ~/enable call needed
    driver.camera.mode = "corrupt"
    time.sleep(0.5)
    assert all(is_zero(twist) for _, twist in driver.silent_for(1.0))
    assert driver.silent_for(0.6) == []
    assert nodes["policy_compressed"].log().count("could not decode") == 1
    driver.camera.mode = "good"
    driver.wait_for_actions(2, timeout_s=5.0)
    driver.camera.mode = "stopped"


@pytest.fixture(scope="module")
def managed_driver(nodes: dict[str, NodeProcess], ros_node: rclpy.node.Node) -> Driver:
    driver = Driver(ros_node, "policy_managed", "/managed_camera/image", "/managed_instruction", False)
    driver.wait_ready()
    return driver


def _zero_deltas_then_silence(driver: Driver, since: float) -> None:
    after = driver.twists.since(since)
    assert after and is_zero(after[-1][1]), "the last message must be a zero delta"
    assert sum(is_zero(twist) for _, twist in after) == 1, "exactly one zero delta"
    assert driver.silent_for(0.8) == []


def test_managed_node_runs_the_whole_lifecycle_through_its_services(managed_driver: Driver) -> None:
    driver = managed_driver
    assert driver.state() == "unconfigured", "autostart: false must leave the node unconfigured"
    assert driver.get("rate_hz", "max_translation") == [10.0, 0.0], "10 and 0 in YAML are 10.0 and 0.0"
    assert driver.transition(Transition.TRANSITION_CONFIGURE)
    assert driver.state() == "inactive"
    response = driver.enable(True)
    assert not response.success and "inactive" in response.message
    assert driver.transition(Transition.TRANSITION_ACTIVATE)
    assert driver.state() == "active"
    wait_until(lambda: driver.camera.publisher.get_subscription_count() > 0, 30, "the image subscription")
    driver.camera.mode = "good"
    driver.instruct(INSTRUCTION)
    assert driver.enable(True).success
    first = driver.wait_for_actions(2)
    time.sleep(3.2)  # the first steps after a model load run slower: measure the 2 s after a warm-up second
    assert rate_over(driver.twists, first + 1.0, 2.0) == pytest.approx(10.0, rel=0.10)
    actions = np.array([action.data for _, action in driver.actions.since(first)])
    assert np.all(actions[:, :3] == 0.0), "max_translation: 0 must hold every translation at zero"
    assert np.any(actions[:, 3:6] != 0.0)

    deactivated = time.monotonic()
    assert driver.transition(Transition.TRANSITION_DEACTIVATE)
    assert driver.state() == "inactive"
    _zero_deltas_then_silence(driver, deactivated)

    assert driver.transition(Transition.TRANSITION_CLEANUP)
    assert driver.state() == "unconfigured"
    assert driver.transition(Transition.TRANSITION_CONFIGURE), "configure after cleanup reloads the model"
    assert driver.transition(Transition.TRANSITION_ACTIVATE)
    assert driver.enable(True).success
    driver.wait_for_actions(3, timeout_s=15.0)


def test_image_stamps_ahead_of_the_clock_stop_output(
    managed_driver: Driver, nodes: dict[str, NodeProcess]
) -> None:
    driver = managed_driver
    driver.wait_for_actions(1)
    shifted = time.monotonic()
    driver.camera.stamp_offset_s = 5.0
    time.sleep(1.0)
    _zero_deltas_then_silence(driver, shifted)
    assert "stamps are ahead of the node's clock" in nodes["policy_managed"].log()
    driver.camera.stamp_offset_s = 0.0
    driver.wait_for_actions(2, timeout_s=5.0)


def test_a_camera_slower_than_the_rate_keeps_the_rate_and_is_reported(
    managed_driver: Driver, ros_node: rclpy.node.Node, diagnostics: Received
) -> None:
    driver = managed_driver
    slow = Camera(ros_node, "/managed_camera/image", hz=4.0)
    driver.camera.mode = "stopped"
    slow.mode = "good"
    try:
        start = time.monotonic()
        time.sleep(3.2)
        assert rate_over(driver.twists, start + 0.2, 3.0) == pytest.approx(10.0, rel=0.15)
        stamps = {(t.header.stamp.sec, t.header.stamp.nanosec) for _, t in driver.twists.since(start + 0.2)}
        assert stamps <= slow.stamps | driver.camera.stamps and len(stamps) <= 14, "ticks reuse the newest frame"
        values = {item.key: item.value for item in latest_status(diagnostics, "policy_managed").values}
        assert int(values["ticks_reusing_frame"]) >= 10
    finally:
        slow.mode = "stopped"
        ros_node.destroy_timer(slow.timer)
        driver.camera.mode = "good"


def test_a_model_that_fails_to_load_leaves_the_node_running_unconfigured(
    nodes: dict[str, NodeProcess], ros_node: rclpy.node.Node, diagnostics: Received
) -> None:
    driver = Driver(ros_node, "lab/policy_broken", "/broken_camera/image", "/broken_instruction", False)
    driver.wait_ready()
    status = latest_status(diagnostics, "policy_broken")
    assert status.level == DiagnosticStatus.ERROR
    assert "/nonexistent/openvla-checkpoint" in status.message or "failed" in status.message
    assert driver.state() == "unconfigured"
    response = driver.enable(True)
    assert not response.success and "unconfigured" in response.message
    assert nodes["policy_broken"].process.poll() is None
    log = nodes["policy_broken"].log()
    assert log.count("could not load the model") == 1
    assert "parameter 'rate_hz' rejected at start-up" in log
    assert "parameter 'gripper_mode' rejected at start-up" in log and "sideways" in log
    assert driver.get("rate_hz", "gripper_mode") == [5.0, "raw"], (
        "rejected start-up values fall back to defaults"
    )
    assert driver.get("frame_id", "max_rotation") == ["tool0", 0.2], "the namespaced node reads its file"


# ---------------------------------------------------------------------------------------- launch file


LAUNCH_ARGUMENTS = {
    "model",
    "quantization",
    "unnorm_key",
    "image_topic",
    "instruction_topic",
    "rate_hz",
    "params_file",
    "namespace",
    "log_level",
    "use_sim_time",
}


def test_launch_file_compiles_and_declares_every_argument() -> None:
    tree = ast.parse(LAUNCH_FILE.read_text(), filename=str(LAUNCH_FILE))
    functions = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    assert "generate_launch_description" in functions
    table = next(
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        and any(getattr(t, "id", "") == "LAUNCH_ARGUMENTS" for t in node.targets)
    )
    declared = {ast.literal_eval(entry)[0] for entry in table.elts}
    assert declared == LAUNCH_ARGUMENTS
    compile(LAUNCH_FILE.read_text(), str(LAUNCH_FILE), "exec")


def test_parameter_file_lists_every_declared_parameter() -> None:
    import yaml

    from openvla_ros.policy_node import PARAMETERS

    parameters = yaml.safe_load(PARAMS_FILE.read_text())["/**/openvla_policy"]["ros__parameters"]
    assert parameters == {spec.name: spec.default for spec in PARAMETERS}


def test_launch_description_builds_where_launch_is_installed() -> None:
    spec = importlib.util.find_spec("launch")
    if spec is None or spec.origin is None or importlib.util.find_spec("launch_ros") is None:
        pytest.skip("the ROS 2 `launch` and `launch_ros` packages are not installed here")
    loader_spec = importlib.util.spec_from_file_location("policy_launch", LAUNCH_FILE)
    assert loader_spec is not None and loader_spec.loader is not None
    launch_module = importlib.util.module_from_spec(loader_spec)
    loader_spec.loader.exec_module(launch_module)
    description = launch_module.generate_launch_description()
    names = {argument.name for argument in description.get_launch_arguments()}
    assert names == LAUNCH_ARGUMENTS


def _policy_launch_module():
    """Returns the policy launch file as a module (its `launch` imports happen only when it builds)."""
    loader_spec = importlib.util.spec_from_file_location("policy_launch_file", LAUNCH_FILE)
    assert loader_spec is not None and loader_spec.loader is not None
    module = importlib.util.module_from_spec(loader_spec)
    loader_spec.loader.exec_module(module)
    return module


def test_launch_arguments_override_the_parameter_file_only_when_given() -> None:
    parameter_overrides = _policy_launch_module().parameter_overrides
    defaults = {name: default for name, default, _ in _policy_launch_module().LAUNCH_ARGUMENTS}
    assert parameter_overrides(defaults) == {"use_sim_time": False}, "defaults must keep the file's values"
    given = dict(defaults, model="openvla/openvla-7b", quantization="4bit", unnorm_key="bridge_orig",
                 image_topic="/wrist/image", instruction_topic="/task", rate_hz="10", use_sim_time="true")
    assert parameter_overrides(given) == {
        "model": "openvla/openvla-7b", "quantization": "4bit", "unnorm_key": "bridge_orig",
        "image_topic": "/wrist/image", "instruction_topic": "/task", "rate_hz": 10.0, "use_sim_time": True,
    }
    with pytest.raises(ValueError, match="rate_hz must be a number of Hz, got 'fast'"):
        parameter_overrides(dict(defaults, rate_hz="fast"))
