"""Test side of the policy node over DDS: node processes, a camera, and a driver for one node.

Shared by the tests with the real tiny model and those with the fixed-step stand-in policy.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import rclpy  # noqa: E402  (imported after the DDS isolation variables are set)
import rclpy.duration  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus  # noqa: E402
from geometry_msgs.msg import TwistStamped  # noqa: E402
from lifecycle_msgs.msg import Transition  # noqa: E402
from lifecycle_msgs.srv import ChangeState, GetState  # noqa: E402
from rcl_interfaces.srv import GetParameters, SetParameters  # noqa: E402
from rclpy.parameter import Parameter, parameter_value_to_python  # noqa: E402
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from ros_helpers import LATCHED_QOS, wait_until  # sets up DDS isolation first
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402
from std_msgs.msg import Float64, Float64MultiArray, String  # noqa: E402
from std_srvs.srv import SetBool  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PARAMS_FILE = REPO / "config" / "policy.yaml"
STANDIN_SCRIPT = Path(__file__).resolve().parent / "standin_policy_node.py"
CAMERA_HZ = 30.0
IMAGE_SHAPE = (96, 128, 3)
INSTRUCTION = "pick up the red block"
SENSOR_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.BEST_EFFORT)


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
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        return self.process.returncode


def start_node(
    name: str,
    log_dir: Path,
    *ros_args: str,
    params_file: Path = PARAMS_FILE,
    namespace: str = "",
    standin_step_s: float | None = None,
    standin_chunk: dict[str, int] | None = None,
) -> NodeProcess:
    """Starts a policy node process; with ``standin_step_s`` the model is the fixed-step stand-in.

    ``ros_args`` are ``name:=value`` parameter overrides. ``standin_chunk`` (e.g. ``{"chunk": 8}``, also
    ``action_dim``, ``num_images``, ``proprio_dim``) makes the stand-in a chunked policy.
    """
    options = [f"{key}={value}" for key, value in (standin_chunk or {}).items()]
    entry = [str(STANDIN_SCRIPT), f"{standin_step_s:.6f}", *options] if standin_step_s is not None else [
        "-m",
        "openvla_ros.policy_node",
    ]
    command = [sys.executable, *entry, "--ros-args", "--params-file", str(params_file)]
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


def wait_active(driver: Driver, node_process: NodeProcess, timeout_s: float = 120.0) -> None:
    """Waits until the node answers and reports the active state; fails with the node's log.

    A node answers only once it spins, i.e. after its model has loaded.
    """
    deadline = time.monotonic() + timeout_s
    try:
        driver.wait_ready(timeout_s)
        while True:
            # a request sent just after discovery can lose its response: ask again after 5 s
            future = driver.state_client.call_async(GetState.Request())
            give_up = min(deadline, time.monotonic() + 5.0)
            wait_until(lambda f=future, t=give_up: f.done() or time.monotonic() > t, timeout_s, "get_state")
            if future.done() and future.result().current_state.label == "active":
                return
            if not future.done():
                driver.state_client.remove_pending_request(future)
            assert node_process.process.poll() is None, "the node process exited"
            assert time.monotonic() < deadline, f"not active after {timeout_s} s"
            time.sleep(0.2)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{node_process.log()[-3000:]}") from None


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
        self.encoding = "rgb8"  # of the raw Image messages; ``pixels`` are sent as they are
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
            height, width, _ = self.pixels.shape
            message = Image(height=height, width=width, encoding=self.encoding, step=width * 3)
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
        instruction_qos: QoSProfile = LATCHED_QOS,
    ):
        self.node = node
        self.name = name
        self.camera = Camera(node, image_topic + ("/compressed" if compressed else ""), compressed, camera_hz)
        self.instruction_pub = node.create_publisher(String, instruction_topic, instruction_qos)
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

    def call(self, client: Any, request: Any, timeout_s: float = 10.0, attempts: int = 3) -> Any:
        """Calls a service; an unanswered request is sent again (a response sent right after discovery
        can be lost), so use ``attempts=1`` for requests that must not be repeated."""
        for attempt in range(attempts):
            future = client.call_async(request)
            try:
                wait_until(future.done, timeout_s, f"a response from {client.srv_name}")
            except AssertionError:
                client.remove_pending_request(future)
                if attempt + 1 == attempts:
                    raise
                continue
            return future.result()
        raise AssertionError("unreachable")

    def enable(self, on: bool) -> SetBool.Response:
        return self.call(self.enable_client, SetBool.Request(data=on))

    def state(self) -> str:
        return self.call(self.state_client, GetState.Request()).current_state.label

    def transition(self, transition_id: int, timeout_s: float = 60.0) -> bool:
        request = ChangeState.Request(transition=Transition(id=transition_id))
        return self.call(self.change_state_client, request, timeout_s, attempts=1).success

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

    def wait_for_actions(self, count: int = 1, timeout_s: float = 30.0) -> float:
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
    """Returns the mean arrival rate in [start, start + window_s): messages per second, stalls included."""
    times = [t for t, _ in received.since(start, start + window_s)]
    assert len(times) >= 2, f"only {len(times)} messages in {window_s} s"
    return (len(times) - 1) / (times[-1] - times[0])


def typical_rate_over(received: Received, start: float, window_s: float) -> float:
    """Returns 1 / the median arrival interval in [start, start + window_s).

    The period the sender keeps when the machine lets it: an occasional stall of the whole VM (CPU
    steal, another process) lengthens a few intervals and moves the mean rate, not the median.
    """
    times = [t for t, _ in received.since(start, start + window_s)]
    assert len(times) >= 3, f"only {len(times)} messages in {window_s} s"
    return 1.0 / float(np.median(np.diff(times)))


def assert_holds_rate(received: Received, start: float, window_s: float, rate_hz: float) -> None:
    """Asserts the sender kept ``rate_hz`` in [start, start + window_s), as far as a noisy 2-core VM allows.

    The period (the median interval) must be within 15% of the set one and never faster than 5% above it:
    that catches a sender that is too fast. The mean rate, counted by receipt time, has a floor at 60%
    (a stall of the whole VM lowers it) and a ceiling at 140%: after a stall of the receiving process the
    messages queued meanwhile are received in one burst, which packs more of them into the window.
    """
    typical = typical_rate_over(received, start, window_s)
    achieved = rate_over(received, start, window_s)
    assert 0.85 * rate_hz <= typical <= 1.05 * rate_hz, f"median interval {1e3 / typical:.0f} ms at {rate_hz} Hz set"
    assert 0.6 * rate_hz <= achieved <= 1.4 * rate_hz, f"{achieved:.2f} Hz at {rate_hz} Hz set"


def subscribe_diagnostics(node: rclpy.node.Node) -> Received:
    """Returns the /diagnostics messages ``node`` receives from now on."""
    received = Received()
    node.create_subscription(DiagnosticArray, "/diagnostics", received.add, 50)
    return received


def latest_status(diagnostics: Received, node_name: str, timeout_s: float = 10.0) -> DiagnosticStatus:
    """Returns the first policy status of ``node_name`` published after this call."""
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


def status_values(status: DiagnosticStatus) -> dict[str, str]:
    return {item.key: item.value for item in status.values}


class Proprio:
    """Publishes a robot state at ``hz`` while ``running``: JointState (stamped now) or Float64MultiArray."""

    def __init__(self, node: rclpy.node.Node, topic: str, values: tuple[float, ...], joint_state: bool = True,
                 hz: float = CAMERA_HZ) -> None:
        from sensor_msgs.msg import JointState

        self.node = node
        self.values = values
        self.joint_state = joint_state
        self.running = False
        self.publisher = node.create_publisher(JointState if joint_state else Float64MultiArray, topic, SENSOR_QOS)
        self.timer = node.create_timer(1.0 / hz, self._publish)

    def _publish(self) -> None:
        if not self.running:
            return
        from sensor_msgs.msg import JointState

        if self.joint_state:
            message = JointState(name=[f"joint{i}" for i in range(len(self.values))], position=list(self.values))
            message.header.stamp = self.node.get_clock().now().to_msg()
        else:
            message = Float64MultiArray(data=list(self.values))
        self.publisher.publish(message)


def drive(driver: Driver, rate_hz: float | None = None, count: int = 2, timeout_s: float = 30.0) -> float:
    """Puts a node in the driving state (camera on, instruction, enabled, rate); returns when actions flow."""
    if rate_hz is not None:
        assert all(result.successful for result in driver.set(rate_hz=rate_hz))
    wait_until(lambda: driver.camera.publisher.get_subscription_count() > 0, 60, "the node's image subscription")
    wait_until(lambda: driver.instruction_pub.get_subscription_count() > 0, 60, "the instruction subscription")
    driver.camera.mode = "good"
    driver.instruct(INSTRUCTION)
    assert driver.enable(True).success
    return driver.wait_for_actions(count, timeout_s)


def zero_delta_then_silence(driver: Driver, since: float, quiet_s: float) -> None:
    """Asserts that the twists since ``since`` end in exactly one zero delta and that nothing follows it."""
    after = driver.twists.since(since)
    assert after, "no zero delta after the stop"
    assert is_zero(after[-1][1]), "the last message must be a zero delta"
    assert sum(is_zero(twist) for _, twist in after) == 1, "exactly one zero delta"
    assert driver.silent_for(quiet_s) == [], "nothing may follow the zero delta"
