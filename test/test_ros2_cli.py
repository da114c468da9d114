"""The real ROS 2 command-line tools against the package as colcon installs it.

The package is built with colcon into a temporary workspace, ``install/setup.bash`` is sourced as a
user would, and then: ``ros2 launch openvla_ros policy.launch.py`` with the tiny checkpoint, the
README's ``ros2 topic pub`` and ``ros2 service call`` lines, ``ros2 param get``, Ctrl-C to the launch's
process group; a launch under ``namespace:=robot1``; and ``ros2 launch openvla_ros record.launch.py``
where rosbag2 is missing. A camera and the action subscriptions live in this process (rclpy).

Needs the ROS 2 launch and ros2cli wheels in ../shared/ros2-tooling (``make test`` installs them when
that folder exists) and colcon (``make test`` puts it in ``.venv/colcon``; a ``colcon`` on PATH works
too); the tests skip with the reason otherwise.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import rclpy
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from ros_helpers import LATCHED_QOS, spinning_node, wait_until  # sets ROS_DOMAIN_ID and localhost discovery
from sensor_msgs.msg import Image
from std_msgs.msg import Float64MultiArray, String
from std_srvs.srv import SetBool

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "openvla_ros"
NODE = "openvla_policy"
# What colcon needs of the source tree (setup.py's packages and data_files).
PACKAGE_FILES = ("package.xml", "setup.py", "setup.cfg", "resource", "openvla_ros", "launch", "config")
TOOLING_MODULES = ("launch", "launch_ros", "ros2cli", "ros2launch", "ros2topic", "ros2service", "ros2param")
INSTRUCTION = "pick up the red block"
LAUNCH_RATE_HZ = 4.0
IMAGE_SHAPE = (48, 64, 3)
CAMERA_HZ = 10.0
SENSOR_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.BEST_EFFORT)
# Generous: two cores shared with other work; the node imports torch and loads the model first.
START_TIMEOUT_S = 150.0
COMMAND_TIMEOUT_S = 60.0
ACTION_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60.0
# The test's parameter file: the launch argument rate_hz overrides its value, frame_id is only here.
PARAMS_YAML = f"""\
/**/{NODE}:
  ros__parameters:
    rate_hz: 2.0
    frame_id: tool0
    cpu_threads: 1
    max_image_age_s: 5.0
"""


def _missing_tooling() -> str:
    """Returns why the ROS 2 command-line tools cannot run here, or an empty string."""
    for module in TOOLING_MODULES:
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:  # origin None: only the repo's launch/ folder
            return (f"the ROS 2 launch and ros2cli wheels are not installed (no `{module}`); make test "
                    "installs them from ../shared/ros2-tooling when that folder exists")
    if _executable("ros2") is None:
        return "the `ros2` command is not installed"
    return ""


def _executable(name: str) -> str | None:
    """Returns the path of ``name`` in this interpreter's bin folder or on PATH."""
    return shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))


MISSING_TOOLING = _missing_tooling()
pytestmark = pytest.mark.skipif(bool(MISSING_TOOLING), reason=MISSING_TOOLING or "the tooling is installed")


def _colcon() -> tuple[list[str], dict[str, str]]:
    """Returns the colcon command and the environment it needs; skips the test when colcon is missing.

    The virtualenv ``<project venv>/colcon`` is run with this interpreter (with its site-packages on
    PYTHONPATH), so the installed entry points start this interpreter, the one with torch and rclpy.
    """
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site_packages = Path(sys.prefix) / "colcon" / "lib" / version / "site-packages"
    if (site_packages / "colcon_core").is_dir():
        return [sys.executable, "-m", "colcon"], {"PYTHONPATH": str(site_packages)}
    installed = shutil.which("colcon")
    if installed:
        return [installed], {}
    pytest.skip(f"colcon is not installed (make test puts it in {Path(sys.prefix) / 'colcon'} when "
                "../shared/ros2-tooling exists)")


@dataclass
class Workspace:
    """A colcon workspace with the package installed, and the environment of its sourced setup.bash."""

    root: Path
    env: dict[str, str]

    def ros2(self, *arguments: str, timeout_s: float = COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess:
        """Runs ``ros2 ARGUMENTS`` to the end; returns it with its output (stdout and stderr together).

        Raises:
            AssertionError: when it runs longer than ``timeout_s``.
        """
        command = ["ros2", *arguments]
        try:
            return subprocess.run(command, env=self.env, cwd=self.root, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            output = exc.output.decode(errors="replace") if isinstance(exc.output, bytes) else exc.output or ""
            raise AssertionError(f"`{shlex.join(command)}` did not end within {timeout_s} s; its output:\n"
                                 f"{output[-3000:]}") from None


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    """Builds the package with colcon into a fresh workspace; stops this domain's ros2 daemon at the end."""
    colcon, colcon_env = _colcon()
    root = tmp_path_factory.mktemp("ros2_ws")
    source = root / "src" / PACKAGE
    source.mkdir(parents=True)
    for name in PACKAGE_FILES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, source / name)
    venv_bin = str(Path(sys.executable).parent)
    base_env = dict(os.environ, PATH=os.pathsep.join([venv_bin, os.environ.get("PATH", "")]),
                    AMENT_PREFIX_PATH=os.pathsep.join(filter(None, [sys.prefix, os.environ.get("AMENT_PREFIX_PATH")])))
    build = subprocess.run([*colcon, "build", "--packages-select", PACKAGE], cwd=root, env=dict(base_env, **colcon_env),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert build.returncode == 0, f"colcon build failed:\n{build.stdout[-3000:]}"
    executable = root / "install" / PACKAGE / "lib" / PACKAGE / "policy_node"
    assert executable.is_file(), "colcon did not install policy_node where ros2 run and ros2 launch look"
    sourced = subprocess.run(["bash", "-c", 'source install/setup.bash && env -0'], cwd=root, env=base_env,
                             stdout=subprocess.PIPE, check=True, timeout=60)
    env = dict(entry.split("=", 1) for entry in sourced.stdout.decode().split("\0") if "=" in entry)
    env.update(PYTHONUNBUFFERED="1", RCUTILS_LOGGING_BUFFERED_STREAM="0", RCUTILS_COLORIZED_OUTPUT="0")
    assert env["ROS_DOMAIN_ID"] == os.environ["ROS_DOMAIN_ID"]
    built = Workspace(root, env)
    try:
        yield built
    finally:
        built.ros2("daemon", "stop")


@dataclass
class Launch:
    """A ``ros2 launch`` running in its own session (process group), its output in a file."""

    process: subprocess.Popen
    log_path: Path

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout_s: float = START_TIMEOUT_S) -> None:
        """Waits until ``text`` appears in the output.

        Raises:
            AssertionError: when the launch ends first or ``timeout_s`` passes; with the output.
        """
        try:
            wait_until(lambda: text in self.output() or self.process.poll() is not None, timeout_s, repr(text))
        except AssertionError as exc:
            raise AssertionError(f"{exc}; launch output:\n{self.output()[-3000:]}") from None
        assert text in self.output(), f"the launch ended (status {self.process.returncode}) before {text!r}:\n" \
                                      f"{self.output()[-3000:]}"

    def interrupt(self) -> int:
        """Sends SIGINT to the launch's process group, as Ctrl-C in a terminal does; returns its exit status."""
        os.killpg(self.process.pid, signal.SIGINT)
        try:
            return self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"ros2 launch did not end within {STOP_TIMEOUT_S} s of SIGINT:\n"
                                 f"{self.output()[-3000:]}") from None

    def kill(self) -> None:
        """Kills whatever of the process group is still running."""
        running = self.process.poll() is None
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if running:
            self.process.wait(timeout=10)


def start_launch(workspace: Workspace, log_path: Path, launch_file: str, *arguments: str) -> Launch:
    """Starts ``ros2 launch openvla_ros LAUNCH_FILE ARGUMENTS`` in a new session; its output goes to ``log_path``."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen(["ros2", "launch", PACKAGE, launch_file, *arguments], env=workspace.env,
                                   cwd=workspace.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return Launch(process, log_path)


@dataclass
class Received:
    """Messages received on one topic, with their arrival times (monotonic)."""

    items: list[tuple[float, Float64MultiArray]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, message: Float64MultiArray) -> None:
        with self.lock:
            self.items.append((time.monotonic(), message))

    def since(self, start: float, end: float = math.inf) -> list[tuple[float, Float64MultiArray]]:
        with self.lock:
            return [(t, m) for t, m in self.items if start <= t < end]


class Camera:
    """Publishes a constant rgb8 test image at ``CAMERA_HZ`` with fresh stamps."""

    def __init__(self, node: rclpy.node.Node, topic: str) -> None:
        self.node = node
        height, width, _ = IMAGE_SHAPE
        pixels = np.random.default_rng(3).integers(0, 256, size=IMAGE_SHAPE, dtype=np.uint8)
        self.template = Image(height=height, width=width, encoding="rgb8", step=width * 3, data=pixels.tobytes())
        self.publisher = node.create_publisher(Image, topic, SENSOR_QOS)
        self.timer = node.create_timer(1.0 / CAMERA_HZ, self._publish)

    def _publish(self) -> None:
        self.template.header.stamp = self.node.get_clock().now().to_msg()
        self.publisher.publish(self.template)


def policy_subscriptions(node: rclpy.node.Node, topic: str, namespace: str) -> list:
    """Returns the policy node's subscriptions on ``topic`` (the node ``namespace``/openvla_policy)."""
    return [info for info in node.get_subscriptions_info_by_topic(topic)
            if info.node_name == NODE and info.node_namespace == namespace]


def is_zero_delta(message: Float64MultiArray) -> bool:
    """True for a zero delta: all six motion values zero (the gripper value is held)."""
    return len(message.data) == 7 and all(value == 0.0 for value in message.data[:6])


def readme_command(prefix: str) -> list[str]:
    """Returns the README's command line that starts with ``prefix`` (its shell comment removed), split."""
    for line in (REPO / "README.md").read_text().splitlines():
        if line.startswith(prefix):
            return shlex.split(line, comments=True)
    raise AssertionError(f"the README has no line starting with {prefix!r}")


@pytest.fixture(scope="module")
def test_node() -> Iterator[rclpy.node.Node]:
    """This process's rclpy node (camera, subscriptions, graph queries), spinning in the background."""
    with spinning_node("ros2_cli_test") as node:
        yield node


@pytest.fixture(scope="module")
def params_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("params") / "policy_test.yaml"
    path.write_text(PARAMS_YAML)
    return path


@dataclass
class PolicyRun:
    launch: Launch
    actions: Received


@pytest.fixture(scope="module")
def policy_run(workspace: Workspace, test_node: rclpy.node.Node, tiny_checkpoint: Path, params_file: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[PolicyRun]:
    """``ros2 launch openvla_ros policy.launch.py`` with the tiny model, the test camera on /camera/image_raw."""
    Camera(test_node, "/camera/image_raw")
    actions = Received()
    test_node.create_subscription(Float64MultiArray, f"/{NODE}/action", actions.add, 50)
    log_path = tmp_path_factory.mktemp("launch") / "policy_launch.log"
    launch = start_launch(workspace, log_path, "policy.launch.py", f"model:={tiny_checkpoint}",
                          f"rate_hz:={LAUNCH_RATE_HZ}", f"params_file:={params_file}")
    try:
        launch.wait_for("active at")
        yield PolicyRun(launch, actions)
    finally:
        launch.kill()


def test_ros2_param_get_shows_the_launch_argument_over_the_parameter_file(
    workspace: Workspace, policy_run: PolicyRun
) -> None:
    result = workspace.ros2("param", "get", "--no-daemon", "--timeout", "30", f"/{NODE}", "rate_hz")
    assert result.returncode == 0 and result.stdout.strip() == f"Double value is: {LAUNCH_RATE_HZ}", result.stdout
    result = workspace.ros2("param", "get", "--no-daemon", "--timeout", "30", f"/{NODE}", "frame_id")
    assert result.stdout.strip() == "String value is: tool0", f"the params_file is not applied: {result.stdout}"


def test_readme_instruction_and_enable_commands_start_the_actions(
    workspace: Workspace, policy_run: PolicyRun, test_node: rclpy.node.Node
) -> None:
    publish = readme_command("ros2 topic pub --once --keep-alive 3 /instruction")
    assert publish == ["ros2", "topic", "pub", "--once", "--keep-alive", "3", "/instruction", "std_msgs/msg/String",
                       f"data: '{INSTRUCTION}'"]
    enable = readme_command("ros2 service call /openvla_policy/enable")
    assert enable == ["ros2", "service", "call", f"/{NODE}/enable", "std_srvs/srv/SetBool", "data: true"]

    try:
        result = workspace.ros2(*publish[1:])
    except AssertionError as exc:
        durabilities = [info.qos_profile.durability.name
                        for info in policy_subscriptions(test_node, "/instruction", "/")]
        raise AssertionError(f"{exc}\nThe node's subscriptions on /instruction have durability {durabilities}: "
                             "`ros2 topic pub` publishes volatile, which a transient-local-only subscription "
                             "never matches") from None
    assert result.returncode == 0, result.stdout
    policy_run.launch.wait_for(f"instruction: {INSTRUCTION!r}", timeout_s=COMMAND_TIMEOUT_S)

    before_enable = time.monotonic()
    assert policy_run.actions.since(0.0) == [], "actions were published before ~/enable"
    result = workspace.ros2(*enable[1:])
    assert result.returncode == 0 and "success=True" in result.stdout, result.stdout
    wait_until(lambda: len(policy_run.actions.since(before_enable)) >= 3, ACTION_TIMEOUT_S,
               f"three actions on /{NODE}/action after enable")
    for _, message in policy_run.actions.since(before_enable):
        assert len(message.data) == 7 and all(math.isfinite(value) for value in message.data)


def test_sigint_to_the_launch_ends_it_cleanly_after_a_zero_delta(policy_run: PolicyRun) -> None:
    if not policy_run.actions.since(0.0):
        pytest.skip("no actions were published, so there is no final zero delta to see")
    interrupted = time.monotonic()
    status = policy_run.launch.interrupt()
    output = policy_run.launch.output()
    assert status == 0, f"ros2 launch exited {status}:\n{output[-3000:]}"
    wait_until(lambda: bool(policy_run.actions.since(interrupted)), 10.0, "an action after SIGINT")
    last = policy_run.actions.since(interrupted)[-1][1]
    assert is_zero_delta(last), f"the last action after SIGINT is not a zero delta: {list(last.data)}"
    # Ctrl-C reaches the node twice: from the terminal's process group and again from ros2 launch.
    assert "process has finished cleanly" in output, f"the node did not exit cleanly:\n{output[-3000:]}"


def test_a_namespace_moves_the_node_inputs_and_outputs(
    workspace: Workspace, test_node: rclpy.node.Node, tiny_checkpoint: Path, params_file: Path, tmp_path: Path
) -> None:
    namespace = "/robot1"
    Camera(test_node, f"{namespace}/camera/image_raw")
    instruction = test_node.create_publisher(String, f"{namespace}/instruction", LATCHED_QOS)
    instruction.publish(String(data=INSTRUCTION))
    actions = Received()
    test_node.create_subscription(Float64MultiArray, f"{namespace}/{NODE}/action", actions.add, 50)
    launch = start_launch(workspace, tmp_path / "namespaced_launch.log", "policy.launch.py",
                          f"model:={tiny_checkpoint}", f"rate_hz:={LAUNCH_RATE_HZ}", "namespace:=robot1",
                          f"params_file:={params_file}")
    try:
        launch.wait_for("active at")
        client = test_node.create_client(SetBool, f"{namespace}/{NODE}/enable")
        assert client.wait_for_service(timeout_sec=COMMAND_TIMEOUT_S), f"{namespace}/{NODE}/enable never appeared"
        # The node is discovered now; its subscriptions come with it.
        outside = [topic for topic in ("/camera/image_raw", "/instruction")
                   if policy_subscriptions(test_node, topic, namespace)]
        assert not outside, f"the node in {namespace} still subscribes to {outside}, outside its namespace"
        for topic in (f"{namespace}/camera/image_raw", f"{namespace}/instruction"):
            wait_until(lambda topic=topic: bool(policy_subscriptions(test_node, topic, namespace)),
                       COMMAND_TIMEOUT_S, f"the node's subscription on {topic}")
        future = client.call_async(SetBool.Request(data=True))
        wait_until(future.done, COMMAND_TIMEOUT_S, "the enable response")
        assert future.result().success
        wait_until(lambda: len(actions.since(0.0)) >= 2, ACTION_TIMEOUT_S, f"actions on {namespace}/{NODE}/action")
        assert not [info for info in test_node.get_publishers_info_by_topic(f"/{NODE}/action")
                    if info.node_namespace == namespace], "the node in the namespace publishes outside it"

        status = launch.interrupt()
        output = launch.output()
        assert status == 0, f"ros2 launch exited {status}:\n{output[-3000:]}"
        assert "process has finished cleanly" in output, f"the node did not exit cleanly:\n{output[-3000:]}"
    finally:
        launch.kill()


def test_record_launch_without_rosbag2_fails_naming_the_recorder_without_it(
    workspace: Workspace, tmp_path: Path
) -> None:
    if shutil.which("ros2", path=workspace.env["PATH"]) and workspace.ros2("bag", "--help").returncode == 0:
        pytest.skip("`ros2 bag` is installed here: the launch records for real")
    result = workspace.ros2("launch", PACKAGE, "record.launch.py", "episode:=pick_cup_01",
                            f"output_dir:={tmp_path / 'demos'}")
    assert result.returncode != 0, f"ros2 launch exited 0 without a recorder:\n{result.stdout}"
    fallback = f"python -m openvla_ros.record --output-dir {tmp_path / 'demos'} --episode pick_cup_01"
    assert result.stdout.count(fallback) == 1, result.stdout
    assert "invalid choice" not in result.stdout, result.stdout
    assert not (tmp_path / "demos").exists()


# Rounds of each signal count (1, 2 and 3 SIGINTs 50 ms apart) in the shutdown test; more with
# OPENVLA_SHUTDOWN_ROUNDS=20 (about 10 minutes), as the benchmark of the final zero delta.
SHUTDOWN_ROUNDS = int(os.environ.get("OPENVLA_SHUTDOWN_ROUNDS", "1"))
SIGNAL_GAP_S = 0.05
LATE_MESSAGE_WAIT_S = 2.0


class CpuHog:
    """Busy loops in child processes, one per core: the load under which the last message was lost."""

    def __init__(self, processes: int = os.cpu_count() or 2) -> None:
        self.children = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]

    def stop(self) -> None:
        for child in self.children:
            child.kill()
            child.wait(timeout=10)


@dataclass
class ShutdownRound:
    signals: int
    status: int | None = None
    exit_s: float = math.nan
    node_exit_s: float = math.nan
    last_action: list[float] | None = None
    last_twist_zero: bool | None = None
    escalated: bool = False
    node_clean: bool = False

    def problems(self) -> list[str]:
        found = []
        if not self.node_clean:
            found.append("the node did not finish cleanly (exit status 0)")
        # ros2 launch itself dies of a SIGINT that arrives after its node has finished and its own
        # handlers are gone (the node now exits within tens of ms): the node's status is what counts.
        if self.status != 0 and not (self.status == -signal.SIGINT and self.node_clean):
            found.append(f"ros2 launch exit status {self.status}")
        if self.last_action is None or not (len(self.last_action) == 7 and not any(self.last_action[:6])):
            found.append(f"last action {self.last_action} is not a zero delta")
        if not self.last_twist_zero:
            found.append("the last delta_twist is not zero")
        if self.escalated:
            found.append("ros2 launch escalated to SIGTERM/SIGKILL")
        return found


def test_repeated_signals_under_load_deliver_the_zero_delta_last_and_exit_at_once(
    workspace: Workspace, test_node: rclpy.node.Node, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """1, 2 and 3 SIGINTs to the launch's process group, with every core busy: a reliable subscriber in
    this process gets the zero delta as the last message on ~/action and ~/delta_twist every time, and
    the node exits cleanly before ros2 launch escalates."""
    from geometry_msgs.msg import TwistStamped

    namespace = "/shutdown"
    Camera(test_node, f"{namespace}/camera/image_raw")
    instruction = test_node.create_publisher(String, f"{namespace}/instruction", LATCHED_QOS)
    instruction.publish(String(data=INSTRUCTION))
    actions, twists = Received(), Received()
    reliable = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100, reliability=ReliabilityPolicy.RELIABLE)
    test_node.create_subscription(Float64MultiArray, f"{namespace}/{NODE}/action", actions.add, reliable)
    test_node.create_subscription(TwistStamped, f"{namespace}/{NODE}/delta_twist", twists.add, reliable)
    params = tmp_path / "enabled.yaml"
    params.write_text(PARAMS_YAML + "    start_enabled: true\n")
    rounds = [ShutdownRound(count) for _ in range(SHUTDOWN_ROUNDS) for count in (1, 2, 3)]
    hog = CpuHog()
    try:
        for index, record in enumerate(rounds):
            started = time.monotonic()
            launch = start_launch(workspace, tmp_path / f"round_{index}.log", "policy.launch.py",
                                  f"model:={tiny_checkpoint}", "rate_hz:=10", "namespace:=shutdown",
                                  f"params_file:={params}")
            try:
                wait_until(lambda started=started, launch=launch: len(actions.since(started)) >= 3
                           or launch.process.poll() is not None, START_TIMEOUT_S, "three actions from the node")
                assert launch.process.poll() is None, f"the launch ended early:\n{launch.output()[-3000:]}"
                signalled = time.monotonic()
                for number in range(record.signals):
                    if number:
                        time.sleep(SIGNAL_GAP_S)
                    os.killpg(launch.process.pid, signal.SIGINT)
                deadline = signalled + STOP_TIMEOUT_S
                while launch.process.poll() is None and time.monotonic() < deadline:
                    if math.isnan(record.node_exit_s) and "process has finished cleanly" in launch.output():
                        record.node_exit_s = time.monotonic() - signalled  # as seen by ros2 launch
                    time.sleep(0.01)
                record.status = launch.process.poll()
                record.exit_s = time.monotonic() - signalled
                time.sleep(LATE_MESSAGE_WAIT_S)  # anything still in flight arrives, or is lost
                output = launch.output()
                record.escalated = "failed to terminate" in output
                record.node_clean = "process has finished cleanly" in output
                received = actions.since(started)
                record.last_action = list(received[-1][1].data) if received else None
                last_twists = twists.since(started)
                if last_twists:
                    linear, angular = last_twists[-1][1].twist.linear, last_twists[-1][1].twist.angular
                    record.last_twist_zero = not any((linear.x, linear.y, linear.z, angular.x, angular.y, angular.z))
            finally:
                launch.kill()
    finally:
        hog.stop()
    summary = "\n".join(
        f"round {index}: {record.signals} signal(s), node exit {record.node_exit_s:.2f} s, ros2 launch exit "
        f"{record.exit_s:.2f} s, status {record.status}: "
        + ("; ".join(record.problems()) or "ok")
        for index, record in enumerate(rounds)
    )
    failed = [record for record in rounds if record.problems()]
    print(summary)
    assert not failed, f"{len(failed)} of {len(rounds)} rounds failed:\n{summary}"
