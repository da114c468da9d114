"""``make pipeline``: demonstrations -> RLDS -> fine-tune -> closed-loop evaluation, end to end.

    python -m openvla_ros.pipeline [--base DIR] [--episodes 300] [--eval-episodes 20] [--steps 2000]
                                   [--energy-steps N] [--camera-upside-down] [--quick]

1. record: starts the ``sim_scene`` node (child process, JPEG camera stream, scripted expert at
   ``--expert-rate`` Hz) and records each expert episode into its own rosbag2 bag with
   :class:`~openvla_ros.ros.record.BagRecorder`, over DDS, exactly as ``python -m openvla_ros.ros.record``
   would (topics of ``config/pipeline.yaml``);
2. convert: the bags -> the RLDS dataset ``sim_<task>`` with :func:`~openvla_ros.dataset.convert_bags`;
3. fine-tune: LoRA on the base (the pretrained tiny base when cached, else the random tiny model) with
   :class:`~openvla_ros.finetune.trainer.Trainer` (the machinery of ``training/finetune.py``; an
   OpenVLA-OFT base keeps its L1 head, chunk and proprio), writing ``<out>/merged`` (the model
   ``make demo`` picks up); with ``--energy-steps`` an energy model is trained on it too;
4. evaluate offline: ``training/evaluate.py`` on the val split (JSON + its PNG);
5. evaluate closed loop: the base and the fine-tuned model (and, with ``--energy-steps``, the fine-tuned
   model with energy refinement) on ``--eval-episodes`` fresh
   episodes (seeds never recorded), in process against the same sim, renderer and image path as the
   node (``predict_action`` on the rendered RGB frame); optionally ``--node-episodes`` more through the
   real ``sim_scene`` + ``policy_node`` processes.

Everything goes to ``--out`` (``artifacts/pipeline``): ``bags/``, ``data/``, the fine-tune's outputs,
``trajectories.png``, ``training_curve.png``, ``evaluate_val.png``, ``report.json`` and ``logs/``.
Exit status: 0 when every stage ran (whatever the success rates), 1 when a stage failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from openvla_ros.pipeline_report import (
    POLICY_RUNS,
    format_table,
    plot_training_curve,
    plot_trajectories,
    wilson_interval,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path("artifacts") / "pipeline"
DEFAULT_BASE = Path("artifacts") / "tiny"
DEFAULT_PRETRAINED = Path("artifacts") / "tiny-pretrained"
DEFAULT_CONFIG = REPO / "config" / "pipeline.yaml"
MARKER = ".openvla_pipeline"
# Energy refinement in the closed-loop comparison: the node's and the policy's defaults.
ENERGY_STEP_SIZE = 0.5
ENERGY_MAX_STEP_FRACTION = 0.2
OFT_LEARNING_RATE = 1e-3
SIM_NODE = "sim_scene"
TRAINER_LOGGER = "openvla_ros.finetune.trainer"
QUICK = {"episodes": 3, "eval_episodes": 2, "steps": 3, "batch_size": 2, "node_episodes": 0}


class PipelineError(RuntimeError):
    """A stage of the pipeline failed; the message says which and why."""


class WaitTimeoutError(PipelineError):
    """Something the pipeline waited for did not happen in time (the processes are still alive)."""


@dataclass
class PipelineSettings:
    """What the pipeline does (see ``--help`` for each option)."""

    out: Path = DEFAULT_OUT
    base: Path = DEFAULT_BASE
    config: Path = DEFAULT_CONFIG
    task: str = "reach"
    episodes: int = 300
    eval_episodes: int = 20
    node_episodes: int = 10
    steps: int = 2000
    batch_size: int = 8
    learning_rate: float = 3e-3
    lora_rank: int = 32
    image_aug: bool = False
    energy_steps: int = 0
    energy_train_steps: int = 300
    camera_upside_down: bool = False
    expert_rate_hz: float = 10.0
    # Demonstrations go on after the success until the expert comes to rest (the sim's expert_settle_steps)
    expert_settle_steps: int = 10
    record_seed: int = 0
    eval_seed: int = 1
    train_seed: int = 7

    def __post_init__(self) -> None:
        from openvla_ros.sim import TASKS

        if self.task not in TASKS:
            raise PipelineError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.episodes < 2:
            raise PipelineError(f"episodes must be >= 2 (one train and one val episode), got {self.episodes}")
        for name in ("eval_episodes", "steps", "batch_size", "lora_rank"):
            if getattr(self, name) < 1:
                raise PipelineError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("node_episodes", "energy_steps", "energy_train_steps"):
            if getattr(self, name) < 0:
                raise PipelineError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.record_seed == self.eval_seed:
            raise PipelineError("eval_seed must differ from record_seed: evaluation needs episodes never recorded")

    @property
    def dataset_name(self) -> str:
        return f"sim_{self.task}"


@dataclass
class EpisodeResult:
    """One closed-loop episode: outcome and the fingertips' x/y path."""

    seed: list[int]
    instruction: str
    success: bool
    steps: int
    final_distance_m: float
    path_xy: list[list[float]]
    target_xy: list[float]
    blocks: dict[str, list[float]]


@dataclass
class Report:
    """Everything the run measured; written as ``report.json``."""

    settings: dict[str, Any]
    timings_s: dict[str, float] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    offline: dict[str, Any] = field(default_factory=dict)
    closed_loop: dict[str, Any] = field(default_factory=dict)
    node_check: dict[str, Any] = field(default_factory=dict)
    energy: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ helpers


def ros_environment() -> dict[str, str]:
    """Returns the environment for DDS traffic kept on this machine, on a random domain unless one is set.

    Also sets both variables in this process (before rclpy creates its participant).
    """
    env = dict(os.environ, RCUTILS_LOGGING_BUFFERED_STREAM="0", PYTHONUNBUFFERED="1")
    env.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    if not env.get("ROS_DOMAIN_ID"):
        env["ROS_DOMAIN_ID"] = str(random.SystemRandom().randint(1, 100))
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = env["ROS_AUTOMATIC_DISCOVERY_RANGE"]
    os.environ["ROS_DOMAIN_ID"] = env["ROS_DOMAIN_ID"]
    return env


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str, alive: Callable[[], None]) -> None:
    """Polls ``condition`` until it holds; ``alive`` raises when a child process died.

    Raises:
        WaitTimeoutError: after ``timeout_s`` seconds.
    """
    deadline = time.monotonic() + timeout_s
    while not condition():
        alive()
        if time.monotonic() > deadline:
            raise WaitTimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.02)


def prepare_out_dir(out: Path) -> None:
    """Empties the pipeline's output directory (only one that a previous run created).

    Raises:
        PipelineError: when ``out`` exists, is not empty and was not made by the pipeline.
    """
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise PipelineError(f"{out} exists and was not created by the pipeline; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("created by python -m openvla_ros.pipeline; emptied on every run\n")


@contextmanager
def stage(report: Report, name: str, title: str) -> Iterator[None]:
    """Prints the stage's start, times it into ``report.timings_s[name]``."""
    print(f"\n=== {title} ===", flush=True)
    start = time.monotonic()
    try:
        yield
    finally:
        report.timings_s[name] = round(time.monotonic() - start, 1)
    print(f"--- {name}: {report.timings_s[name]:.1f} s", flush=True)


class ChildProcess:
    """A ROS node run as ``python -m module --ros-args ...``, its output in a log file."""

    def __init__(self, name: str, module: str, ros_args: list[str], log_dir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", module, "--ros-args", *ros_args],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
            )

    def check_alive(self) -> None:
        """Raises PipelineError (with the log's tail) when the process has exited."""
        if self.process.poll() is not None:
            tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-15:])
            raise PipelineError(f"{self.name} exited with status {self.process.returncode}:\n{tail}")

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGINT (like Ctrl-C), then SIGKILL after ``timeout_s``."""
        if self.process.poll() is None:
            self.process.send_signal(2)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


class RosSession:
    """An rclpy context, one node spun on a background thread, and helpers to call services."""

    def __init__(self, node_name: str) -> None:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.signals import SignalHandlerOptions

        self.context = rclpy.Context()
        rclpy.init(context=self.context, signal_handler_options=SignalHandlerOptions.NO)
        self.node = rclpy.create_node(node_name, context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self._spin, name="pipeline-ros", daemon=True)
        self._thread.start()
        self.task_state: dict[str, str] = {}
        from diagnostic_msgs.msg import DiagnosticStatus

        self.node.create_subscription(DiagnosticStatus, f"/{SIM_NODE}/task_state", self._on_task_state, 10)

    def _spin(self) -> None:
        from rclpy.executors import ExternalShutdownException

        try:
            self.executor.spin()
        except ExternalShutdownException:
            pass

    def _on_task_state(self, message: Any) -> None:
        self.task_state = {item.key: item.value for item in message.values}

    def call(self, service: str, kind: Any, request: Any, timeout_s: float, alive: Callable[[], None]) -> Any:
        """Calls ``service`` and returns the response.

        Raises:
            PipelineError: when the service does not appear or answer within ``timeout_s``.
        """
        client = self.node.create_client(kind, service)
        try:
            wait_for(lambda: client.service_is_ready(), timeout_s, f"service {service}", alive)
            future = client.call_async(request)
            wait_for(future.done, timeout_s, f"the answer of {service}", alive)
            return future.result()
        finally:
            self.node.destroy_client(client)

    def close(self) -> None:
        import rclpy

        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)
        self._thread.join(timeout=5)


# ------------------------------------------------------------------------------------------ stages


def record_demonstrations(settings: PipelineSettings, bags_dir: Path, log_dir: Path,
                          env: dict[str, str]) -> dict[str, Any]:
    """Records ``settings.episodes`` expert episodes through the sim node, one bag each.

    Returns the recording facts (bags, steps, expert successes, messages, megabytes).

    A demonstration the expert fails is not kept (its bag is deleted and a new episode is recorded);
    more than ``max(3, episodes // 5)`` failures end the stage.

    Raises:
        PipelineError: when the sim fails, a topic never appears or the expert fails too often.
    """
    from std_srvs.srv import SetBool, Trigger

    from openvla_ros.ros.record import BagRecorder, load_record_settings

    record_settings = load_record_settings(settings.config)
    topics = list(record_settings.topics)
    image_topic = topics[0]
    sim = ChildProcess(SIM_NODE, "openvla_ros.sim_scene_node", [
        "-p", f"task:={settings.task}", "-p", f"seed:={settings.record_seed}", "-p", "reset_on_start:=false",
        "-p", "publish_compressed:=true", "-p", f"expert_rate_hz:={settings.expert_rate_hz}",
        "-p", f"expert_settle_steps:={settings.expert_settle_steps}",
        "-p", f"camera_upside_down:={str(settings.camera_upside_down).lower()}",
    ], log_dir, env)
    session = RosSession("pipeline_recorder")
    alive = sim.check_alive
    facts: dict[str, Any] = {"bags": [], "expert_steps": [], "messages": 0, "topics": topics, "expert_failures": 0}
    max_failures = max(3, settings.episodes // 5)
    episode = -1
    try:
        while len(facts["bags"]) < settings.episodes:
            episode += 1
            reset = session.call(f"/{SIM_NODE}/reset", Trigger, Trigger.Request(), 60.0, alive)
            wait_for(lambda episode=episode: session.task_state.get("episode") == str(episode), 10.0,
                     f"the task state of episode {episode}", alive)
            path = bags_dir / f"episode_{len(facts['bags']):03d}"
            recorder = BagRecorder(session.node, topics, path, record_settings.storage)
            recorder.start()
            try:
                wait_for(lambda recorder=recorder: set(recorder.subscribed_topics()) == set(topics)
                         and recorder.counts().get(image_topic, 0) >= 2
                         and recorder.counts().get("/instruction", 0) >= 1,
                         20.0, f"the recorder to receive {', '.join(topics)}", alive)
                session.call(f"/{SIM_NODE}/expert", SetBool, SetBool.Request(data=True), 10.0, alive)
                budget_s = 90 / settings.expert_rate_hz + 10.0
                wait_for(lambda episode=episode: session.task_state.get("episode") == str(episode)
                         and session.task_state.get("status") != "running"
                         and session.task_state.get("expert") == "false",
                         budget_s, f"the end of expert episode {episode}", alive)
                time.sleep(2.5 / settings.expert_rate_hz)  # the last step's window closes on later frames
            finally:
                summary = recorder.stop()
            state = dict(session.task_state)
            if state.get("status") != "success":
                facts["expert_failures"] += 1
                shutil.rmtree(path, ignore_errors=True)
                print(f"  sim episode {episode}: the expert failed ({reset.message!r}, {state.get('status')}); "
                      "not kept", flush=True)
                if facts["expert_failures"] > max_failures:
                    raise PipelineError(
                        f"the expert failed {facts['expert_failures']} episodes (last: {reset.message!r}, {state}); "
                        "the sim or the expert is broken"
                    )
                continue
            facts["bags"].append(str(path))
            facts["expert_steps"].append(int(state.get("steps", 0)))
            facts["messages"] += summary.message_count
            print(f"  {path.name}: {reset.message!r}, expert success in {state.get('steps')} steps, "
                  f"{summary.message_count} messages", flush=True)
    finally:
        session.close()
        sim.stop()
    facts["megabytes"] = round(sum(f.stat().st_size for f in bags_dir.rglob("*") if f.is_file()) / 1e6, 2)
    return facts


def convert(settings: PipelineSettings, bags: list[str], data_dir: Path) -> dict[str, Any]:
    """Converts the bags to RLDS and opens the result as OpenVLA's loader does; returns the dataset facts."""
    from openvla_ros.dataset import convert_bags, format_report, load_config
    from openvla_ros.dataset.check import check_dataset

    config = load_config(settings.config)
    report = convert_bags(bags, data_dir, settings.dataset_name, config, overwrite=True)
    print(format_report(report).split("\n  ")[0])
    for line in check_dataset(data_dir, settings.dataset_name, num_steps=1):
        print(f"  {line}")
    return {
        "name": settings.dataset_name,
        "path": str(report.dataset_dir),
        "episodes": report.episodes,
        "steps": report.steps,
        "splits": dict(report.splits),
        "dropped_idle": report.dropped_idle,
        "dropped_stale": report.dropped_stale,
        "action_q01": report.statistics["action"]["q01"],
        "action_q99": report.statistics["action"]["q99"],
    }


class _TrainerLog(logging.Handler):
    """Collects the trainer's ``step N split: key value ...`` log lines into a curve."""

    PATTERN = re.compile(r"\b([a-z][a-z0-9_]*) (-?[0-9.]+|nan)")  # names such as l1_first_step have digits

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.curve: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg != "step %d %s: %s" or len(record.args or ()) != 3:
            return
        step, split, text = record.args
        values = {key: float(value) for key, value in self.PATTERN.findall(text)}
        self.curve.append({"step": int(step), "split": split, **values})


def base_spec(base: Path) -> Any:
    """Returns the OFT layout (chunk, proprio, images) of an OpenVLA-OFT base, or None for a token model."""
    from openvla_ros.model.loading import read_config
    from openvla_ros.model.oft_loading import is_oft_checkpoint, read_oft_spec

    config = read_config(base)
    return read_oft_spec(base, config) if is_oft_checkpoint(base, config) else None


def finetune(settings: PipelineSettings, spec: Any, data_dir: Path, out: Path) -> dict[str, Any]:
    """LoRA fine-tunes the base on the dataset (outputs in ``out``); returns metrics and the curve.

    An OpenVLA-OFT base is fine-tuned with its own L1 head, chunk and proprio layout (heads trained
    fully, the VLA through LoRA), as ``training/finetune.py --action-head l1`` does; ``spec`` is its
    layout (:func:`base_spec`; None for a token model).
    """
    from openvla_ros.finetune.config import FinetuneConfig
    from openvla_ros.finetune.trainer import Trainer

    oft = {} if spec is None else {"action_head": "l1", "chunk": spec.chunk, "use_proprio": bool(spec.proprio_dim),
                                   "num_images": spec.num_images, "film": spec.film}
    config = FinetuneConfig(
        vla_path=str(settings.base), data_dir=str(data_dir), dataset_name=settings.dataset_name, out=str(out),
        max_steps=settings.steps, batch_size=settings.batch_size, learning_rate=settings.learning_rate,
        lr_schedule="cosine", warmup_steps=min(20, settings.steps // 10), lora_rank=settings.lora_rank,
        image_aug=settings.image_aug, device="cpu", save_steps=settings.steps,
        eval_steps=max(1, settings.steps // 4), eval_batches=4, log_steps=max(1, min(10, settings.steps // 10)),
        keep_checkpoints=1, seed=settings.train_seed, **oft,
    )
    handler = _TrainerLog()
    logger = logging.getLogger(TRAINER_LOGGER)
    previous_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        trainer = Trainer(config)
        before = trainer.evaluate()
        start = time.monotonic()
        last = trainer.run()
        seconds = time.monotonic() - start
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)
    samples = settings.steps * settings.batch_size
    return {
        "train_frames": len(trainer.train_frames),
        "train_samples": len(trainer.train_items),  # chunk windows for an OFT model
        "val_frames": len(trainer.val_frames),
        "steps": settings.steps,
        "batch_size": settings.batch_size,
        "epochs": round(samples / max(1, len(trainer.train_frames)), 2),
        "samples_per_s": round(samples / seconds, 2),
        "val_before": before,
        "last": last,
        "curve": handler.curve,
        "merged": str(out / "merged"),
        "action_head": "l1" if spec is not None else "tokens",
    }


def train_energy(settings: PipelineSettings, merged: Path, data_dir: Path, out: Path,
                 train_windows: int) -> dict[str, Any]:
    """Trains the energy model of the fine-tuned OFT model (VLA frozen) and writes it beside its head.

    The machinery of ``training/train_energy.py``; returns its last train and val metrics. A batch
    holds up to 16 chunk windows (each row's negatives are the others), fewer on a small dataset.
    """
    from openvla_ros.finetune.energy_training import EnergyTrainingConfig, run_energy_training

    steps = settings.energy_train_steps
    config = EnergyTrainingConfig(
        model=str(merged), data_dir=str(data_dir), dataset_name=settings.dataset_name, out=str(out),
        max_steps=steps, save_steps=max(1, steps), eval_steps=max(1, steps // 2), log_steps=max(1, steps // 10),
        batch_size=max(2, min(16, train_windows)), learning_rate=2e-3, hidden_dim=64, num_heads=4, device="cpu", seed=settings.train_seed,
    )
    start = time.monotonic()
    metrics = run_energy_training(config)
    return {"steps": steps, "seconds": round(time.monotonic() - start, 1), "last": metrics}


def offline_evaluation(settings: PipelineSettings, model: Path, data_dir: Path, plot: Path,
                       log_dir: Path) -> dict[str, Any]:
    """Runs ``training/evaluate.py`` on the val split; returns its JSON metrics.

    Raises:
        PipelineError: when the script fails.
    """
    command = [sys.executable, str(REPO / "training" / "evaluate.py"), "--model", str(model),
               "--data-dir", str(data_dir), "--dataset-name", settings.dataset_name, "--split", "val",
               "--device", "cpu", "--plot", str(plot)]
    if settings.image_aug:
        command.append("--center-crop")
    if settings.energy_steps:
        command += ["--energy-steps", str(settings.energy_steps)]
    print("  " + " ".join(command[1:]), flush=True)
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    (log_dir / "evaluate.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0 or "{" not in result.stdout:
        raise PipelineError(f"training/evaluate.py failed ({result.returncode}): {result.stderr[-2000:]}")
    return json.loads(result.stdout[result.stdout.index("{"):])


def rollout(policy: Any, seed: tuple[int, ...], task: str, upside_down: bool = False) -> EpisodeResult:
    """Runs one closed-loop episode of ``policy`` in the pure-Python sim and returns its outcome.

    Each step renders the overhead camera exactly as the ``sim_scene`` node publishes it. A token
    policy is called once per step (``policy.predict_action(rgb, instruction)``, as the policy node
    does); an OFT policy predicts a chunk from the frame and the robot state the demonstrations record
    (as the node's chunk mode does with ``proprio_topic``), and its first half is applied before the next.
    ``upside_down``: the camera mounted rotated by 180 degrees (the sim's ``camera_upside_down``).
    """
    from openvla_ros.sim import CameraModel, TabletopRenderer, TabletopScene
    from openvla_ros.sim.demos import scene_state

    scene = TabletopScene()
    renderer = TabletopRenderer(CameraModel(upside_down=upside_down))
    episode = scene.reset(seed=seed, task=task)
    path = [scene.ee_position[:2].tolist()]
    state = scene.evaluate()
    chunked = hasattr(policy, "predict_chunk")
    while scene.status == "running":
        if chunked:
            proprio = scene_state(scene) if policy.proprio_dim else None
            chunk = policy.predict_chunk(renderer.render(scene), episode.instruction, proprio=proprio)
            actions = chunk[: max(1, policy.chunk_size // 2)]
        else:
            actions = [policy.predict_action(renderer.render(scene), episode.instruction)]
        for action in actions:
            state = scene.apply_action(action)
            path.append(scene.ee_position[:2].tolist())
            if scene.status != "running":
                break
    return EpisodeResult(
        seed=list(seed), instruction=episode.instruction, success=scene.status == "success", steps=state.steps,
        final_distance_m=round(float(state.goal_distance), 4), path_xy=path,
        target_xy=scene.blocks[episode.target].position[:2].tolist(),
        blocks={color: block.position[:2].tolist() for color, block in scene.blocks.items()},
    )


def closed_loop(settings: PipelineSettings, merged: Path) -> dict[str, Any]:
    """Evaluates the base and the fine-tuned model on the same fresh episodes.

    A token base un-normalises with the dataset's statistics, so both act in the same physical units;
    an OFT base keeps its own statistics (those of its pretraining data, in the same units). With
    ``energy_steps`` > 0 the fine-tuned OFT model runs the same episodes a second time with energy
    refinement on (``fine_tuned_energy``).
    """
    from openvla_ros.model.oft_policy import OFTPolicy, load_policy_auto

    tuned = load_policy_auto(str(merged), unnorm_key=settings.dataset_name, device="cpu",
                             center_crop=settings.image_aug)
    base = load_policy_auto(str(settings.base), device="cpu")
    if not isinstance(base, OFTPolicy):
        base.normalizer = tuned.normalizer
    seeds = [(settings.eval_seed, index) for index in range(settings.eval_episodes)]
    results: dict[str, Any] = {"seeds": [list(s) for s in seeds], "mode": "in-process",
                               "policy": "chunks (half of each applied)" if isinstance(tuned, OFTPolicy)
                               else "one action per step"}
    runs: dict[str, tuple[Any, int]] = {"base": (base, 0), "fine_tuned": (tuned, 0)}
    if settings.energy_steps:
        runs["fine_tuned_energy"] = (tuned, settings.energy_steps)
    for label, _ in POLICY_RUNS:
        if label not in runs:
            continue
        policy, energy_steps = runs[label]
        if isinstance(policy, OFTPolicy) and policy.energy_model is not None:
            policy.configure_energy(energy_steps, ENERGY_STEP_SIZE, ENERGY_MAX_STEP_FRACTION)
        start = time.monotonic()
        episodes = [rollout(policy, seed, settings.task, settings.camera_upside_down) for seed in seeds]
        steps = sum(e.steps for e in episodes)
        successes = sum(e.success for e in episodes)
        low, high = wilson_interval(successes, len(episodes))
        results[label] = {
            "success_rate": successes / len(episodes),
            "successes": successes,
            "ci95": [round(low, 3), round(high, 3)],
            "energy_steps": energy_steps,
            "episodes": [asdict(e) for e in episodes],
            "ms_per_step": round(1000 * (time.monotonic() - start) / max(1, steps), 1),
        }
        print(f"  {label:<17} success {successes}/{len(episodes)} (95% CI {100 * low:.0f}-{100 * high:.0f} %, "
              f"{results[label]['ms_per_step']} ms per step, in process)", flush=True)
    return results


def node_check(settings: PipelineSettings, spec: Any, merged: Path, log_dir: Path,
               env: dict[str, str]) -> dict[str, Any]:
    """Runs the fine-tuned model through the real ``sim_scene`` and ``policy_node`` processes.

    Episodes use seeds ``(eval_seed + 1, k)``, never recorded. ``spec`` is the OFT layout the model kept
    from its base (None for a token model). Returns per-episode outcomes.
    """
    from std_srvs.srv import SetBool, Trigger

    rate_hz = 5.0
    sim = ChildProcess("sim_scene_check", "openvla_ros.sim_scene_node", [
        "-p", f"task:={settings.task}", "-p", f"seed:={settings.eval_seed + 1}", "-p", "reset_on_start:=false",
        "-p", f"camera_upside_down:={str(settings.camera_upside_down).lower()}",
    ], log_dir, env)
    policy_args = ["--params-file", str(REPO / "config" / "policy.yaml"), "-p", f"model:={merged}",
                   "-p", f"unnorm_key:={settings.dataset_name}", "-p", f"rate_hz:={rate_hz}", "-p", "device:=cpu"]
    if settings.image_aug:
        policy_args += ["-p", "center_crop:=true"]
    if spec is not None and spec.proprio_dim:
        policy_args += ["-p", "proprio_topic:=/joint_states", "-p", "proprio_type:=joint_state"]
    policy = ChildProcess("policy_node_check", "openvla_ros.policy_node", policy_args, log_dir, env)

    def alive() -> None:
        sim.check_alive()
        policy.check_alive()

    session = RosSession("pipeline_node_check")
    episodes = []
    try:
        for episode in range(settings.node_episodes):
            reset = session.call(f"/{SIM_NODE}/reset", Trigger, Trigger.Request(), 60.0, alive)
            wait_for(lambda episode=episode: session.task_state.get("episode") == str(episode), 10.0,
                     f"the task state of episode {episode}", alive)
            enabled = session.call("/openvla_policy/enable", SetBool, SetBool.Request(data=True), 120.0, alive)
            if not enabled.success:
                raise PipelineError(f"the policy node refused to enable: {enabled.message}")
            try:
                wait_for(lambda episode=episode: session.task_state.get("episode") == str(episode)
                         and session.task_state.get("status") != "running",
                         90 / rate_hz + 30.0, f"the end of node episode {episode}", alive)
                stalled = ""
            except WaitTimeoutError as exc:
                # a stalled episode (the nodes alive, the sim starved of CPU) is a failure, not the end
                # of the run: everything before it is kept and the next episode starts afresh
                stalled = str(exc)
            session.call("/openvla_policy/enable", SetBool, SetBool.Request(data=False), 10.0, alive)
            state = dict(session.task_state)
            status = "stalled" if stalled else state.get("status")
            episodes.append({"instruction": reset.message, "status": status,
                             "steps": int(state.get("steps", 0)), "seed": [settings.eval_seed + 1, episode]})
            print(f"  node episode {episode}: {reset.message!r} -> {status} after {state.get('steps')} steps"
                  + (f" ({stalled}; counted as a failure)" if stalled else ""), flush=True)
    finally:
        session.close()
        policy.stop()
        sim.stop()
    successes = sum(e["status"] == "success" for e in episodes)
    return {"mode": f"sim_scene + policy_node over DDS at {rate_hz:g} Hz", "episodes": episodes,
            "successes": successes, "success_rate": successes / max(1, len(episodes))}


def build_parser() -> argparse.ArgumentParser:
    """Returns the command-line parser."""
    defaults = PipelineSettings.__dataclass_fields__
    parser = argparse.ArgumentParser(prog="python -m openvla_ros.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (emptied first)")
    parser.add_argument("--base", type=Path, default=None,
                        help=f"checkpoint to fine-tune (default: the pretrained tiny base {DEFAULT_PRETRAINED} when "
                             f"`make pretrained` built it, else the random tiny model {DEFAULT_BASE}, built if missing)")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="topics and conversion YAML")
    parser.add_argument("--task", default="reach", help="reach, pick or stack")
    for name, help_text in (
        ("episodes", "expert episodes to record"),
        ("eval_episodes", "fresh episodes per policy in the closed-loop evaluation"),
        ("node_episodes", "episodes of the fine-tuned model through the real nodes (0: skip)"),
        ("steps", "fine-tuning optimizer steps"),
        ("batch_size", "fine-tuning batch size"),
        ("lora_rank", "LoRA rank"),
        ("record_seed", "sim seed of the recorded episodes"),
        ("eval_seed", "sim seed of the evaluation episodes (must differ)"),
        ("energy_steps", "OFT bases: also train an energy model and evaluate with this many refinement steps "
                         "(0: off)"),
        ("energy_train_steps", "energy model training steps (with --energy-steps)"),
    ):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=defaults[name].default, help=help_text)
    parser.add_argument("--learning-rate", type=float, default=None,
                        help=f"fine-tuning learning rate (default {OFT_LEARNING_RATE:g} for an OpenVLA-OFT base, whose "
                             f"heads train fully, {defaults['learning_rate'].default:g} for a token model)")
    parser.add_argument("--expert-rate", type=float, default=defaults["expert_rate_hz"].default,
                        help="scripted expert rate (Hz); the conversion rate of the config must match")
    parser.add_argument("--image-aug", action="store_true", help="train with crop/colour augmentation")
    parser.add_argument("--camera-upside-down", action=argparse.BooleanOptionalAction, default=None,
                        help="record and evaluate with the sim's camera mounted rotated by 180 degrees, a camera "
                             "pose the pretrained base never saw (default: on for an OpenVLA-OFT base such as the "
                             "pretrained one, off for a token model)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke-test sizes ({', '.join(f'{k} {v}' for k, v in QUICK.items())})")
    return parser


def default_base() -> Path:
    """Returns the pretrained tiny base when a finished, intact one is cached, else the random tiny model's path."""
    from openvla_ros.pretrain import PretrainError, verify_pretrained

    if DEFAULT_PRETRAINED.exists():
        try:
            verify_pretrained(DEFAULT_PRETRAINED)
            return DEFAULT_PRETRAINED
        except PretrainError as exc:
            print(f"note: not using {DEFAULT_PRETRAINED}: {exc}", flush=True)
    print(f"note: starting from the random tiny model {DEFAULT_BASE} (`make pretrained` builds the pretrained base)",
          flush=True)
    return DEFAULT_BASE


def settings_from_args(args: argparse.Namespace) -> PipelineSettings:
    """Returns the settings of parsed arguments (``--quick`` replaces the sizes).

    Raises:
        PipelineError: for invalid values.
    """
    base = args.base if args.base is not None else default_base()
    oft = (base / "config.json").is_file() and base_spec(base) is not None
    upside_down = oft if args.camera_upside_down is None else args.camera_upside_down
    values = {
        "out": args.out, "base": base, "config": args.config, "task": args.task, "episodes": args.episodes,
        "eval_episodes": args.eval_episodes, "node_episodes": args.node_episodes, "steps": args.steps,
        "batch_size": args.batch_size, "lora_rank": args.lora_rank,
        "image_aug": args.image_aug, "expert_rate_hz": args.expert_rate, "record_seed": args.record_seed,
        "eval_seed": args.eval_seed, "energy_steps": args.energy_steps,
        "energy_train_steps": args.energy_train_steps, "camera_upside_down": upside_down,
    }
    if args.learning_rate is not None:
        values["learning_rate"] = args.learning_rate
    elif oft:
        values["learning_rate"] = OFT_LEARNING_RATE
    if args.quick:
        values.update(QUICK)
    return PipelineSettings(**values)


def run(settings: PipelineSettings) -> Report:
    """Runs every stage and returns the report (also written to ``<out>/report.json``).

    Raises:
        PipelineError, OpenVLAError: when a stage fails.
    """
    # The fine-tuning stack (torch, peft, triton) before TensorFlow, which the dataset check loads:
    # importing them after TensorFlow in one process crashes (segmentation fault) with these wheels.
    import peft  # noqa: F401
    import torch  # noqa: F401

    import openvla_ros.finetune.trainer  # noqa: F401

    out = settings.out
    prepare_out_dir(out)
    log_dir = out / "logs"
    log_dir.mkdir()
    report = Report(settings={k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()})
    env = ros_environment()
    print(f"pipeline: task {settings.task}{' (camera upside down)' if settings.camera_upside_down else ''}, "
          f"{settings.episodes} demos, {settings.steps} steps, "
          f"{settings.eval_episodes} eval episodes; ROS_DOMAIN_ID={env['ROS_DOMAIN_ID']}; output {out}", flush=True)

    if not (settings.base / "config.json").is_file():
        with stage(report, "build_tiny", f"building the tiny checkpoint in {settings.base}"):
            from openvla_ros.model.tiny import make_tiny_checkpoint

            make_tiny_checkpoint(settings.base, seed=0)
    spec = base_spec(settings.base)
    oft = spec is not None
    if settings.energy_steps and not oft:
        raise PipelineError(f"--energy-steps refines OpenVLA-OFT chunks; {settings.base} is a token-by-token model "
                            f"(use an OFT base such as {DEFAULT_PRETRAINED}, or --energy-steps 0)")

    with stage(report, "record", f"recording {settings.episodes} expert episodes through sim_scene"):
        recording = record_demonstrations(settings, out / "bags", log_dir, env)
    with stage(report, "convert", "converting the bags to RLDS"):
        report.dataset = convert(settings, recording["bags"], out / "data")
        report.dataset.update(bags=len(recording["bags"]), bag_megabytes=recording["megabytes"],
                              messages=recording["messages"], expert_steps=recording["expert_steps"],
                              expert_failures=recording["expert_failures"])
    head = "L1 chunk head" if oft else "token head"
    with stage(report, "finetune", f"fine-tuning {settings.base} (LoRA rank {settings.lora_rank}, {head})"):
        report.training = finetune(settings, spec, out / "data", out)
        report.files["training_curve"] = str(plot_training_curve(report.training["curve"],
                                                                 out / "training_curve.png"))
    merged = out / "merged"
    from openvla_ros.sim.demos import write_sim_setup

    report.files["sim_setup"] = str(write_sim_setup(merged, settings.camera_upside_down))
    if settings.energy_steps:
        with stage(report, "energy", f"training the energy model ({settings.energy_train_steps} steps, VLA frozen)"):
            report.energy = train_energy(settings, merged, out / "data", out / "energy",
                                         report.training["train_samples"])
    with stage(report, "evaluate_offline", "offline evaluation (training/evaluate.py, val split)"):
        report.offline = offline_evaluation(settings, merged, out / "data", out / "evaluate_val.png", log_dir)
        report.files["evaluate_plot"] = report.offline["plot"]
    with stage(report, "closed_loop", f"closed loop on {settings.eval_episodes} fresh episodes (in process)"):
        report.closed_loop = closed_loop(settings, merged)
        report.files["trajectories"] = str(plot_trajectories(report.closed_loop, settings.task,
                                                             out / "trajectories.png"))
    if settings.node_episodes:
        with stage(report, "node_check", f"closed loop through sim_scene + policy_node ({settings.node_episodes} "
                   "episodes)"):
            report.node_check = node_check(settings, spec, merged, log_dir, env)
    report.files["merged_model"] = str(merged)
    report.files["report"] = str(out / "report.json")
    (out / "report.json").write_text(json.dumps(asdict(report), indent=1))
    return report


def main(argv: list[str] | None = None) -> int:
    """Runs the pipeline; returns 0 when every stage ran, 1 when one failed, 2 on bad options."""
    args = build_parser().parse_args(argv)
    from openvla_ros.errors import OpenVLAError

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        settings = settings_from_args(args)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from openvla_ros.interrupts import interrupt_exit_status, interrupt_name, termination_as_interrupt

    try:
        with termination_as_interrupt():
            report = run(settings)
    except (PipelineError, OpenVLAError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interrupt:
        print(f"interrupted ({interrupt_name(interrupt)}): the child processes are stopped; {settings.out} holds a "
              "partial run and no report.json (the next run empties it)", file=sys.stderr)
        return interrupt_exit_status(interrupt)
    print(format_table(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
