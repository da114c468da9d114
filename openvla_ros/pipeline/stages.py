"""The pipeline's data stages: recording the expert over DDS, conversion, fine-tuning, the energy model, offline evaluation."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from openvla_ros.pipeline.processes import ChildProcess, RosSession, wait_for
from openvla_ros.pipeline.settings import REPO, SIM_NODE, TRAINER_LOGGER, PipelineError, PipelineSettings


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


def finetune(settings: PipelineSettings, spec: Any, data_dir: Path, out: Path) -> dict[str, Any]:
    """LoRA fine-tunes the base on the dataset (outputs in ``out``); returns metrics and the curve.

    An OpenVLA-OFT base is fine-tuned with its own L1 head, chunk and proprio layout (heads trained
    fully, the VLA through LoRA), as ``training/finetune.py --action-head l1`` does; ``spec`` is its
    layout (:func:`~openvla_ros.pipeline.settings.base_spec`; None for a token model).
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
        keep_checkpoints=1, seed=settings.train_seed, ema_decay=settings.ema_decay, **oft,
    )
    selection = None
    if settings.select_every and settings.select_episodes:
        from openvla_ros.finetune.selection import ClosedLoopSelection
        from openvla_ros.pipeline.closed_loop import rollout
        from openvla_ros.pipeline.settings import episode_seed_sets

        seeds = episode_seed_sets(settings)["validation"]

        def validate(policy: Any) -> tuple[int, int]:
            results = [rollout(policy, seed, settings.task, settings.camera_upside_down) for seed in seeds]
            return sum(result.success for result in results), len(results)

        selection = ClosedLoopSelection(validate, settings.select_every, out / "selection")
    auxiliary = None
    if settings.localises:
        if spec is None:  # run() refuses this before recording
            raise PipelineError(f"--locate-weights needs an OpenVLA-OFT base; {settings.base} is a token model")
        from openvla_ros.sim.localisation import heads_seed, localisation_loss

        auxiliary = localisation_loss(settings.locate_patch_weight, settings.locate_point_weight,
                                      heads_seed(settings.train_seed))
    handler = _TrainerLog()
    logger = logging.getLogger(TRAINER_LOGGER)
    previous_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        trainer = Trainer(config, selection=selection, auxiliary=auxiliary)
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
        "last": {key: value for key, value in last.items() if key != "selected"},
        "selection": last.get("selected"),
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
