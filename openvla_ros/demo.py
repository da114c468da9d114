"""``make demo``: the simulated tabletop and the OpenVLA policy node in closed loop, with a live readout.

    python -m openvla_ros.demo [--model PATH_OR_HUB_ID] [--duration 20] [--task reach] [--seed 0]

Starts ``sim_scene`` and ``policy_node`` as child processes, starts an episode (the sim publishes its
instruction), enables the policy and prints one line per second: the achieved action rate, the model
latency, the age of the newest camera image, the last action and the task state. At the end it prints
a summary and saves a PNG of the episode (the last camera frame with the gripper's path, the actions
and the timing over time). Ctrl-C or SIGTERM stop it early; the child processes are always stopped.

The model is, in order: ``--model`` (or the ``MODEL`` environment variable), the fine-tuned model of
``make pipeline`` at ``artifacts/pipeline/merged`` if it exists, else the tiny random checkpoint at
``artifacts/tiny``, built on first use. DDS traffic stays on this machine
(``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST``) and, unless ``ROS_DOMAIN_ID`` is set, on a random domain.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from openvla_ros.demo_report import Readings, live_line, print_summary, save_episode_png
from openvla_ros.ros.child_nodes import ChildNode, local_ros_environment

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path("artifacts")
TINY_DIR = "tiny"
PRETRAINED_DIR = "tiny-pretrained"
FINE_TUNED_DIR = Path("pipeline") / "merged"
POLICY_NODE = "openvla_policy"
SIM_NODE = "sim_scene"
EXIT_INTERRUPTED = 130


class DemoError(RuntimeError):
    """The demo cannot run: a child process died, the model did not load, a service never appeared."""


@dataclass(frozen=True)
class ModelChoice:
    """The model the demo runs and why it was chosen."""

    model: str
    source: str  # "argument", "fine-tuned", "pretrained" or "tiny"
    needs_build: bool = False


def resolve_model(model: str | None, artifacts: Path = ARTIFACTS) -> ModelChoice:
    """Returns the model to run: ``model`` if given, else the pipeline's fine-tuned model, else the
    pretrained tiny base (``make pretrained``), else the random tiny one."""
    if model:
        return ModelChoice(model, "argument")
    fine_tuned = artifacts / FINE_TUNED_DIR
    if (fine_tuned / "config.json").is_file():
        return ModelChoice(str(fine_tuned), "fine-tuned")
    pretrained = artifacts / PRETRAINED_DIR
    if (pretrained / "pretrain.json").is_file():
        return ModelChoice(str(pretrained), "pretrained")
    tiny = artifacts / TINY_DIR
    return ModelChoice(str(tiny), "tiny", needs_build=not (tiny / "config.json").is_file())


def model_proprio_dim(model: str) -> int:
    """Returns the proprio length an OpenVLA-OFT checkpoint takes (0 for none, a token model or a hub id)."""
    try:
        config = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return 0
    return int((config.get("oft") or {}).get("proprio_dim") or 0)


def resolve_unnorm_key(model: str) -> str:
    """Returns the action statistics key to use for a local checkpoint, or "" to let the node decide.

    A checkpoint with one key needs none; with several, a ``dataset_statistics.json`` holding exactly
    one key (what fine-tuning writes) names the dataset the model was adapted to.
    """
    directory = Path(model)
    keys: list[str] = []
    statistics_keys: list[str] = []
    try:
        keys = list(json.loads((directory / "config.json").read_text()).get("norm_stats") or {})
    except (OSError, ValueError):
        return ""
    try:
        statistics_keys = list(json.loads((directory / "dataset_statistics.json").read_text()))
    except (OSError, ValueError):
        pass
    available = list(dict.fromkeys(keys + statistics_keys))
    if len(available) <= 1:
        return ""
    if len(statistics_keys) == 1:
        return statistics_keys[0]
    return ""


# ---------------------------------------------------------------------------------------- child processes


# ---------------------------------------------------------------------------------------- monitoring


class DemoMonitor:
    """An rclpy node in this process: subscriptions to the demo's topics and clients of its services."""

    def __init__(self, context: Any) -> None:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
        from geometry_msgs.msg import PoseStamped
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import Image
        from std_msgs.msg import Float64MultiArray
        from std_srvs.srv import SetBool, Trigger

        self.readings = Readings()
        self.node = rclpy.create_node("openvla_demo", context=context)
        sensor = QoSProfile(
            history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.BEST_EFFORT
        )
        self.node.create_subscription(Float64MultiArray, f"/{POLICY_NODE}/action", self._on_action, 50)
        self.node.create_subscription(PoseStamped, "/ee_pose", self._on_pose, 50)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 10)
        self.node.create_subscription(DiagnosticStatus, f"/{SIM_NODE}/task_state", self._on_task_state, 10)
        self.node.create_subscription(Image, "/camera/image_raw", self._on_image, sensor)
        self.enable_client = self.node.create_client(SetBool, f"/{POLICY_NODE}/enable")
        self.reset_client = self.node.create_client(Trigger, f"/{SIM_NODE}/reset")
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        self._spinner = threading.Thread(target=self.executor.spin, daemon=True)
        self._spinner.start()

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()
        self._spinner.join(timeout=5)

    def _on_action(self, message: Any) -> None:
        with self.readings.lock:
            self.readings.actions.append((time.monotonic(), np.array(message.data, dtype=np.float64)))

    def _on_pose(self, message: Any) -> None:
        position = message.pose.position
        with self.readings.lock:
            self.readings.poses.append((time.monotonic(), (position.x, position.y, position.z)))

    def _on_diagnostics(self, message: Any) -> None:
        for status in message.status:
            if status.name == f"{POLICY_NODE}: policy":
                with self.readings.lock:
                    self.readings.policy_status = {item.key: item.value for item in status.values}

    def _on_task_state(self, message: Any) -> None:
        with self.readings.lock:
            self.readings.task_status = {item.key: item.value for item in message.values}

    def _on_image(self, message: Any) -> None:
        with self.readings.lock:
            if self.readings.first_frame is None:
                self.readings.first_frame = message
            self.readings.last_frame = message

    def call(self, client: Any, request: Any, timeout_s: float, should_stop: Callable[[], bool]) -> Any:
        """Calls a service, waiting up to ``timeout_s`` for it to appear and answer.

        Raises:
            DemoError: on timeout. Returns None when ``should_stop`` turns true first.
        """
        deadline = time.monotonic() + timeout_s
        while not client.service_is_ready():
            if should_stop():
                return None
            if time.monotonic() > deadline:
                raise DemoError(f"service {client.srv_name} did not appear within {timeout_s:.0f} s")
            time.sleep(0.05)
        future = client.call_async(request)
        while not future.done():
            if should_stop():
                return None
            if time.monotonic() > deadline:
                raise DemoError(f"service {client.srv_name} did not answer within {timeout_s:.0f} s")
            time.sleep(0.02)
        return future.result()


# ---------------------------------------------------------------------------------------- main


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m openvla_ros.demo",
        description="Run the OpenVLA policy node on the simulated tabletop and print what it does.",
    )
    parser.add_argument(
        "--model", default=os.environ.get("MODEL") or None, help="checkpoint directory or hub id"
    )
    parser.add_argument(
        "--unnorm-key", default=None, help="action statistics key (default: chosen from the model)"
    )
    parser.add_argument(
        "--duration", type=float, default=20.0, help="seconds of closed-loop control (default 20)"
    )
    parser.add_argument("--task", default="reach", choices=("reach", "pick", "stack", "random"))
    parser.add_argument("--seed", type=int, default=0, help="episode seed")
    parser.add_argument("--rate-hz", type=float, default=5.0, help="policy control rate (default 5)")
    parser.add_argument("--out", type=Path, default=ARTIFACTS / "demo", help="where logs and the PNG go")
    parser.add_argument(
        "--startup-timeout", type=float, default=300.0, help="seconds allowed for model loading"
    )
    return parser.parse_args(argv)


class _Stop:
    """Set by SIGINT / SIGTERM; remembers which signal arrived."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signal_number = 0

    def __call__(self, signal_number: int, _frame: Any) -> None:
        self.signal_number = signal_number
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()


@dataclass
class DemoProcesses:
    """Everything the demo started, so that it can all be stopped whatever happens."""

    children: list[ChildNode] = field(default_factory=list)
    monitor: DemoMonitor | None = None
    context: Any = None

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
        if self.context is not None:
            import rclpy

            rclpy.try_shutdown(context=self.context)
            self.context = None
        for child in self.children:
            child.stop()
        if self.children:
            stopped = ", ".join(f"{child.name} (exit {child.process.returncode})" for child in self.children)
            print(f"stopped {stopped}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Runs the demo; returns 0 when it ran to the end, 130 when stopped early, 1 on failure."""
    args = _parse_args(argv)
    stop = _Stop()
    previous_handlers = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    processes = DemoProcesses()
    try:
        return _run(args, stop, processes)
    except DemoError as exc:
        print(f"error: {exc}", flush=True)
        for child in processes.children:
            print(f"--- last lines of {child.log_path}:\n{child.log_tail(indent='    ')}", flush=True)
        return 1
    finally:
        processes.close()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)


def _run(args: argparse.Namespace, stop: _Stop, processes: DemoProcesses) -> int:
    children = processes.children
    choice = resolve_model(args.model)
    if choice.source == "pretrained":
        from openvla_ros.pretrain import PretrainError, verify_pretrained

        try:
            verify_pretrained(choice.model)
        except PretrainError as exc:
            print(f"not using the pretrained base: {exc}", flush=True)
            tiny = Path(choice.model).with_name(TINY_DIR)
            choice = ModelChoice(str(tiny), "tiny", needs_build=not (tiny / "config.json").is_file())
    if choice.needs_build:
        from openvla_ros.model.tiny import make_tiny_checkpoint

        print(f"building the tiny random checkpoint in {choice.model} (first run only) ...", flush=True)
        make_tiny_checkpoint(choice.model, seed=0)
    unnorm_key = args.unnorm_key if args.unnorm_key is not None else resolve_unnorm_key(choice.model)
    description = {
        "argument": "given",
        "fine-tuned": "fine-tuned by make pipeline",
        "pretrained": "the pretrained tiny base of make pretrained",
        "tiny": "tiny, untrained",
    }
    print(
        f"model: {choice.model} ({description[choice.source]})"
        + (f", unnorm_key {unnorm_key}" if unnorm_key else "")
    )

    env = local_ros_environment()
    args.out.mkdir(parents=True, exist_ok=True)
    print(
        f"ROS_DOMAIN_ID={env['ROS_DOMAIN_ID']} ROS_AUTOMATIC_DISCOVERY_RANGE={env['ROS_AUTOMATIC_DISCOVERY_RANGE']}; "
        f"node logs in {args.out}/",
        flush=True,
    )

    from openvla_ros.sim.demos import SIM_SETUP_FILE, read_sim_setup

    sim_args = ["-p", f"task:={args.task}", "-p", f"seed:={args.seed}", "-p", "reset_on_start:=false"]
    if read_sim_setup(choice.model).get("camera_upside_down"):
        # the model was fine-tuned on demonstrations seen by the camera mounted upside down
        print(f"sim camera: upside down, as the model was fine-tuned ({SIM_SETUP_FILE})", flush=True)
        sim_args += ["-p", "camera_upside_down:=true"]
    children.append(ChildNode(SIM_NODE, "openvla_ros.sim_scene_node", sim_args, args.out, env))
    policy_args = ["--params-file", str(REPO / "config" / "policy.yaml"), "-p", f"model:={choice.model}"]
    policy_args += ["-p", f"rate_hz:={args.rate_hz}"]
    if unnorm_key:
        policy_args += ["-p", f"unnorm_key:={unnorm_key}"]
    if model_proprio_dim(choice.model):
        # the sim's gantry joint states are the robot state the demonstrations record
        policy_args += ["-p", "proprio_topic:=/joint_states", "-p", "proprio_type:=joint_state"]
    children.append(ChildNode(POLICY_NODE, "openvla_ros.policy_node", policy_args, args.out, env))
    print(f"started {', '.join(f'{c.name} (pid {c.process.pid})' for c in children)}", flush=True)

    import rclpy
    from rclpy.signals import SignalHandlerOptions
    from std_srvs.srv import SetBool, Trigger

    processes.context = rclpy.Context()
    rclpy.init(context=processes.context, signal_handler_options=SignalHandlerOptions.NO)
    monitor = processes.monitor = DemoMonitor(processes.context)

    def should_stop() -> bool:
        if stop.is_set():  # checked first: Ctrl-C in a terminal also reaches (and ends) the children
            return True
        for child in children:
            if not child.alive():
                if stop.event.wait(0.2):  # the interrupt may be about to reach this process too
                    return True
                raise DemoError(f"{child.name} exited with status {child.process.returncode}")
        return False

    started_loading = time.monotonic()
    reset = monitor.call(monitor.reset_client, Trigger.Request(), 60.0, should_stop)
    if reset is None:
        return _interrupted(stop)
    instruction = reset.message
    print(f'episode: "{instruction}" (task {args.task}, seed {args.seed})', flush=True)
    print("waiting for the policy node to load the model ...", flush=True)
    enabled = monitor.call(
        monitor.enable_client, SetBool.Request(data=True), args.startup_timeout, should_stop
    )
    if enabled is None:
        return _interrupted(stop)
    if not enabled.success:
        raise DemoError(f"the policy node refused to enable: {enabled.message}")
    print(f"policy ready after {time.monotonic() - started_loading:.1f} s; control enabled", flush=True)

    start = time.monotonic()
    episode_start, episodes, reported = start, [], set()
    resets: list[tuple[float, float]] = []
    next_line = start + 1.0
    while time.monotonic() - start < args.duration:
        if should_stop():
            break
        now = time.monotonic()
        if now >= next_line:
            print(live_line(now - start, monitor.readings, now), flush=True)
            next_line += 1.0
        with monitor.readings.lock:
            task = dict(monitor.readings.task_status)
        if task.get("status") in ("success", "timeout") and task.get("episode") not in reported:
            reported.add(task.get("episode"))
            # the episode is over: report it and start the next one (its new instruction is latched)
            episodes.append(task)
            print(f'episode {len(episodes)}: "{instruction}" -> {task["status"]} after {task.get("steps", "?")} steps',
                  flush=True)
            if time.monotonic() - start > args.duration - 3.0:
                break
            disabled = time.monotonic()
            monitor.call(monitor.enable_client, SetBool.Request(data=False), 10.0, should_stop)
            reset = monitor.call(monitor.reset_client, Trigger.Request(), 10.0, should_stop)
            if reset is None:
                break
            instruction, episode_start = reset.message, time.monotonic()
            print(f'episode {len(episodes) + 1}: "{instruction}"', flush=True)
            monitor.call(monitor.enable_client, SetBool.Request(data=True), 10.0, should_stop)
            resets.append((disabled, time.monotonic()))
        time.sleep(0.02)
    elapsed = time.monotonic() - start
    if not stop.is_set():
        resets.append((time.monotonic(), math.inf))  # the final disable: its zero delta is no control step
        monitor.call(monitor.enable_client, SetBool.Request(data=False), 10.0, should_stop)

    print_summary(monitor.readings, start, elapsed, args.rate_hz, choice.source == "tiny", episodes)
    png = save_episode_png(args.out / "episode.png", monitor.readings, instruction, episode_start, args.rate_hz,
                           resets)
    print(f"saved {png}", flush=True)
    return _interrupted(stop) if stop.is_set() else 0


def _interrupted(stop: _Stop) -> int:
    name = signal.Signals(stop.signal_number).name if stop.signal_number else "signal"
    print(f"stopped early ({name})", flush=True)
    return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
