"""The sim_scene node over real DDS: camera, reset and instruction, applied actions, scripted expert."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from diagnostic_msgs.msg import DiagnosticStatus  # noqa: E402
from geometry_msgs.msg import PoseStamped  # noqa: E402
from rcl_interfaces.srv import SetParameters  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from ros_helpers import LATCHED_QOS, spinning_node, wait_until  # sets up DDS isolation first
from sensor_msgs.msg import Image, JointState  # noqa: E402
from std_msgs.msg import Bool, Float64, Float64MultiArray, String  # noqa: E402
from std_srvs.srv import SetBool, Trigger  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SENSOR_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=5, reliability=ReliabilityPolicy.BEST_EFFORT)



class Topic:
    """Messages received on one topic with their arrival times."""

    def __init__(self) -> None:
        self.items: list[tuple[float, Any]] = []
        self.lock = threading.Lock()

    def add(self, message: Any) -> None:
        with self.lock:
            self.items.append((time.monotonic(), message))

    def since(self, start: float) -> list[Any]:
        with self.lock:
            return [m for t, m in self.items if t >= start]

    def times_since(self, start: float) -> list[float]:
        with self.lock:
            return [t for t, _ in self.items if t >= start]

    def last(self) -> Any:
        with self.lock:
            return self.items[-1][1] if self.items else None


def values(status: DiagnosticStatus) -> dict[str, str]:
    return {item.key: item.value for item in status.values}


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[subprocess.Popen]:
    log_path = tmp_path_factory.mktemp("sim_node") / "sim_scene.log"
    env = dict(os.environ, RCUTILS_LOGGING_BUFFERED_STREAM="0", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "openvla_ros.sim_scene_node", "--ros-args"]
    command += ["-p", "task:=reach", "-p", "seed:=3", "-p", "expert_noise:=0.0"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    process.log_path = log_path  # type: ignore[attr-defined]
    yield process
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


class Driver:
    def __init__(self, node: Any) -> None:
        self.node = node
        self.images, self.poses, self.grippers, self.joints = Topic(), Topic(), Topic(), Topic()
        self.instructions, self.teleop, self.task_states, self.success = Topic(), Topic(), Topic(), Topic()
        node.create_subscription(Image, "/camera/image_raw", self.images.add, SENSOR_QOS)
        node.create_subscription(PoseStamped, "/ee_pose", self.poses.add, 50)
        node.create_subscription(Float64, "/gripper_state", self.grippers.add, 50)
        node.create_subscription(JointState, "/joint_states", self.joints.add, 50)
        node.create_subscription(String, "/instruction", self.instructions.add, LATCHED_QOS)
        node.create_subscription(Float64MultiArray, "/teleop/action", self.teleop.add, 50)
        node.create_subscription(DiagnosticStatus, "/sim_scene/task_state", self.task_states.add, 50)
        node.create_subscription(Bool, "/sim_scene/success", self.success.add, LATCHED_QOS)
        self.action_pub = node.create_publisher(Float64MultiArray, "/openvla_policy/action", 10)
        self.reset_client = node.create_client(Trigger, "/sim_scene/reset")
        self.expert_client = node.create_client(SetBool, "/sim_scene/expert")
        self.params_client = node.create_client(SetParameters, "/sim_scene/set_parameters")

    def call(self, client: Any, request: Any, timeout_s: float = 10.0) -> Any:
        assert client.wait_for_service(timeout_sec=60.0), f"{client.srv_name} never appeared"
        future = client.call_async(request)
        wait_until(future.done, timeout_s, f"a response from {client.srv_name}")
        return future.result()

    def reset(self) -> str:
        response = self.call(self.reset_client, Trigger.Request())
        assert response.success
        return response.message

    def act(self, *action: float) -> None:
        self.action_pub.publish(Float64MultiArray(data=[float(v) for v in action]))

    def pose_stamped_after(self, stamp_ns: int, timeout_s: float = 10.0) -> np.ndarray:
        """Returns the newest pose whose header stamp is at or after ``stamp_ns`` (the sim's clock).

        A pose received after a call may have been published before it; its stamp tells.
        """

        def fresh() -> list[PoseStamped]:
            with self.poses.lock:
                messages = [m for _, m in self.poses.items]
            return [m for m in messages if m.header.stamp.sec * 1_000_000_000 + m.header.stamp.nanosec >= stamp_ns]

        wait_until(lambda: fresh(), timeout_s, "an end-effector pose stamped after the reset")
        return self_pose(fresh()[-1])

    def newest_pose_after(self, start: float, timeout_s: float = 5.0) -> np.ndarray:
        wait_until(lambda: self.poses.since(start), timeout_s, "an end-effector pose")
        position = self.poses.since(start)[-1].pose.position
        return np.array([position.x, position.y, position.z])


@pytest.fixture(scope="module")
def driver(sim: subprocess.Popen) -> Iterator[Driver]:
    with spinning_node("sim_node_test_driver") as node:
        driver = Driver(node)
        assert driver.reset_client.wait_for_service(timeout_sec=60.0), Path(sim.log_path).read_text()
        wait_until(lambda: driver.action_pub.get_subscription_count() > 0, 30, "the sim's action subscription")
        yield driver


def test_camera_streams_640x480_rgb_frames_with_fresh_stamps(driver: Driver) -> None:
    start = time.monotonic()
    wait_until(lambda: len(driver.images.since(start)) >= 20, 15, "20 camera frames")
    frames = driver.images.since(start)
    image = frames[-1]
    assert (image.width, image.height, image.encoding, image.step) == (640, 480, "rgb8", 1920)
    assert len(image.data) == 640 * 480 * 3
    stamps = [m.header.stamp.sec + m.header.stamp.nanosec * 1e-9 for m in frames]
    assert all(b > a for a, b in zip(stamps, stamps[1:], strict=False))
    # The delivered rate depends on the machine's load (a busy 2-core VM delivers a few Hz to a Python
    # subscriber); the stamps show the publisher's own period: never faster than its 30 Hz timer.
    assert float(np.median(np.diff(stamps))) >= 0.9 / 30.0
    now = driver.node.get_clock().now().nanoseconds * 1e-9
    assert now - stamps[-1] < 2.0
    pixels = np.frombuffer(bytes(image.data), np.uint8).reshape(480, 640, 3)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 5  # table, blocks, gripper


def test_reset_publishes_a_new_latched_instruction(driver: Driver) -> None:
    wait_until(lambda: driver.task_states.last() is not None, 10, "a task state")
    episode_before = int(values(driver.task_states.last())["episode"])
    start = time.monotonic()
    instruction = driver.reset()
    assert instruction.startswith("move to the ") and instruction.endswith(" block")
    wait_until(lambda: driver.instructions.since(start), 5, "the new instruction")
    assert driver.instructions.since(start)[-1].data == instruction
    wait_until(
        lambda: any(int(values(s)["episode"]) == episode_before + 1 for s in driver.task_states.since(start)),
        5,
        "the task state of the new episode",
    )
    state = values(driver.task_states.since(start)[-1])
    assert state["status"] == "running" and state["instruction"] == instruction and state["steps"] == "0"
    assert driver.success.last().data is False


def test_actions_move_the_end_effector_and_the_gripper(driver: Driver) -> None:
    driver.reset()
    reset_done_ns = driver.node.get_clock().now().nanoseconds  # the reply comes after the reset took effect
    before = driver.pose_stamped_after(reset_done_ns)
    start = time.monotonic()
    driver.act(0.01, -0.02, 0.015, 0.0, 0.0, 0.05, 0.0)  # move and close
    wait_until(
        lambda: any(not np.allclose(self_pose(p), before) for p in driver.poses.since(start)),
        5,
        "the pose to change",
    )
    after = driver.newest_pose_after(start)
    np.testing.assert_allclose(after, before + [0.01, -0.02, 0.015], atol=1e-9)
    wait_until(
        lambda: driver.grippers.since(start) and driver.grippers.last().data == 0.0, 5, "a closed gripper"
    )
    joints = driver.joints.last()
    assert list(joints.name) == ["x", "y", "z", "yaw", "gripper"]
    np.testing.assert_allclose(joints.position[:3], after, atol=1e-9)
    assert joints.position[3] == pytest.approx(0.05) and joints.position[4] == 0.0
    wait_until(
        lambda: any(int(values(s)["steps"]) == 1 for s in driver.task_states.since(start)),
        5,
        "steps to count 1",
    )


def self_pose(message: PoseStamped) -> np.ndarray:
    position = message.pose.position
    return np.array([position.x, position.y, position.z])


def test_malformed_actions_are_ignored_and_the_node_keeps_running(
    driver: Driver, sim: subprocess.Popen
) -> None:
    start = time.monotonic()
    before = driver.newest_pose_after(start)
    driver.act(0.01, 0.01)  # 2 values instead of 7
    time.sleep(0.5)
    np.testing.assert_allclose(driver.newest_pose_after(time.monotonic()), before)
    assert sim.poll() is None
    wait_until(lambda: "action ignored" in Path(sim.log_path).read_text(), 5, "the error in the log")


def test_invalid_task_parameter_is_rejected_with_a_reason(driver: Driver) -> None:
    request = SetParameters.Request(parameters=[Parameter("task", value="juggle").to_parameter_msg()])
    result = driver.call(driver.params_client, request).results[0]
    assert not result.successful and "reach, pick, stack, random" in result.reason


def test_expert_publishes_teleop_actions_at_5_hz_and_solves_the_episode(driver: Driver) -> None:
    instruction = driver.reset()
    start = time.monotonic()
    response = driver.call(driver.expert_client, SetBool.Request(data=True))
    assert response.success
    wait_until(
        lambda: any(values(s)["status"] == "success" for s in driver.task_states.since(start)),
        30,
        f"the expert to solve {instruction!r}",
    )
    assert driver.success.last().data is True
    actions = driver.teleop.since(start)
    times = driver.teleop.times_since(start)
    assert len(actions) >= 5
    rate = (len(times) - 1) / (times[-1] - times[0])
    assert 3.0 < rate < 7.0, f"expert at {rate:.1f} Hz (target 5 Hz)"
    for message in actions:
        assert len(message.data) == 7 and max(abs(v) for v in message.data[:3]) <= 0.02 + 1e-12
    final = values([s for s in driver.task_states.since(start) if values(s)["status"] == "success"][0])
    assert int(final["steps"]) == len(actions)  # every teleop action was applied exactly once
    # The expert stops by itself once the episode is over.
    time.sleep(1.0)
    count = len(driver.teleop.since(start))
    time.sleep(1.0)
    assert len(driver.teleop.since(start)) == count


def test_with_settling_steps_the_expert_comes_to_rest_after_the_success_then_stops(
    driver: Driver, sim: subprocess.Popen
) -> None:
    def set_settle(steps: int) -> None:
        parameter = Parameter("expert_settle_steps", value=steps).to_parameter_msg()
        result = driver.call(driver.params_client, SetParameters.Request(parameters=[parameter])).results[0]
        assert result.successful, result.reason

    set_settle(10)
    try:
        instruction = driver.reset()
        start = time.monotonic()
        assert driver.call(driver.expert_client, SetBool.Request(data=True)).success

        def finished() -> list[dict[str, str]]:
            return [v for v in map(values, driver.task_states.since(start))
                    if v["status"] == "success" and v["expert"] == "false"]

        wait_until(finished, 30, f"the expert to solve {instruction!r} and come to rest")
        states = [values(s) for s in driver.task_states.since(start)]
        solved_at = int(next(v for v in states if v["status"] == "success")["steps"])
        total = int(finished()[0]["steps"])
        actions = [np.asarray(m.data) for m in driver.teleop.since(start)]
        assert len(actions) == total, "every teleop action, settling ones included, was applied once"
        assert 1 <= total - solved_at <= 10, (solved_at, total)
        settling = actions[solved_at:]
        assert len(settling) == 1 or np.linalg.norm(settling[-1][:3]) < np.linalg.norm(settling[0][:3]), "it brakes"
        assert all(a[6] == 1.0 for a in settling)
        time.sleep(1.0)
        assert len(driver.teleop.since(start)) == total, "and then it stops"
        assert "settling steps); expert stopped" in Path(sim.log_path).read_text()  # type: ignore[attr-defined]
    finally:
        set_settle(0)
