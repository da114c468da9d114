"""The pipeline's data stages: recording the expert over DDS, conversion, fine-tuning, the energy model, offline evaluation."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from openvla_ros.pipeline.processes import ChildProcess, RosSession, wait_for
from openvla_ros.pipeline.settings import REPO, SIM_NODE, TRAINER_LOGGER, PipelineError, PipelineSettings


class _LaneStoppedError(Exception):
    """Raised inside a recording lane when another lane failed or the run was interrupted."""


class EpisodeBook:
    """The episodes that several recording lanes recorded, by sim episode number, and when to stop.

    The kept demonstrations are the first ``wanted`` successful episodes in number order, whatever
    the lane count, so the dataset is the one a single sim recording episode after episode gives.
    """

    def __init__(self, wanted: int, max_failures: int) -> None:
        self.wanted = wanted
        self.max_failures = max_failures
        self.stopped = threading.Event()
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._results: dict[int, dict[str, Any] | None] = {}  # number -> facts of a success, None: failed

    def needs(self, number: int) -> bool:
        """Whether episode ``number`` may still be among the kept ones (False once ``wanted`` successes
        have lower numbers: every later number can then be left out)."""
        with self._lock:
            below = sum(1 for known, facts in self._results.items() if known < number and facts is not None)
        return below < self.wanted

    def add(self, number: int, facts: dict[str, Any] | None) -> None:
        """Records episode ``number``'s outcome (``None``: the expert failed).

        Raises:
            PipelineError: when more than ``max_failures`` episodes failed (the sim or expert is broken).
        """
        with self._lock:
            self._results[number] = facts
            failures = sum(1 for value in self._results.values() if value is None)
        if failures > self.max_failures:
            raise PipelineError(f"the expert failed {failures} episodes (last: episode {number}); the sim or the "
                                "expert is broken")

    def fail(self, error: BaseException) -> None:
        """Keeps a lane's error and tells every lane to stop."""
        if not isinstance(error, _LaneStoppedError):
            with self._lock:
                self.errors.append(error)
        self.stopped.set()

    def check(self) -> None:
        """Raises _LaneStoppedError once a lane failed or the run was interrupted."""
        if self.stopped.is_set():
            raise _LaneStoppedError()

    def outcome(self) -> tuple[list[tuple[int, dict[str, Any]]], list[int], int]:
        """Returns (kept (number, facts) in number order, numbers recorded beyond them, expert failures)."""
        with self._lock:
            successes = sorted((number, facts) for number, facts in self._results.items() if facts is not None)
            failures = sum(1 for facts in self._results.values() if facts is None)
        return successes[:self.wanted], [number for number, _ in successes[self.wanted:]], failures


def record_demonstrations(settings: PipelineSettings, bags_dir: Path, log_dir: Path,
                          env: dict[str, str]) -> dict[str, Any]:
    """Records ``settings.episodes`` expert episodes through sim nodes, one bag each.

    ``settings.record_lanes`` sims run side by side, each in a ROS domain of its own with its own
    recorder: lane i records the sim episodes i, i + lanes, i + 2 lanes, ... The bag of sim episode k
    is ``episode_<k>``. A demonstration the expert fails is not kept (its bag is deleted), and the
    kept ones are the first ``settings.episodes`` successes by episode number, so the bags do not
    depend on the lane count. More than ``max(3, episodes // 5)`` failures end the stage.

    Returns the recording facts (bags, steps, expert successes, messages, megabytes).

    Raises:
        PipelineError: when a sim fails, a topic never appears or the expert fails too often.
    """
    from openvla_ros.ros.child_nodes import DomainsTakenError
    from openvla_ros.ros.record import load_record_settings

    record_settings = load_record_settings(settings.config)
    book = EpisodeBook(settings.episodes, max(3, settings.episodes // 5))
    lanes = min(settings.record_lanes, settings.episodes)
    own_domain = int(env["ROS_DOMAIN_ID"])
    try:
        _record_lanes(settings, record_settings, lanes, own_domain, bags_dir, log_dir, env, book)
    except DomainsTakenError as exc:
        raise PipelineError(f"{exc}; or record in one lane (--record-lanes 1)") from None
    kept, beyond, failures = book.outcome()
    for number in beyond:
        shutil.rmtree(bags_dir / _bag_name(number), ignore_errors=True)
    if beyond:
        print(f"  left out {len(beyond)} episode(s) recorded beyond the first {settings.episodes} successes "
              f"(the lanes ran ahead): {', '.join(_bag_name(number) for number in beyond)}", flush=True)
    facts: dict[str, Any] = {
        "bags": [str(bags_dir / _bag_name(number)) for number, _ in kept],
        "expert_steps": [episode["steps"] for _, episode in kept],
        "messages": sum(episode["messages"] for _, episode in kept),
        "topics": list(record_settings.topics),
        "expert_failures": failures,
        "lanes": lanes,
    }
    facts["megabytes"] = round(sum(f.stat().st_size for f in bags_dir.rglob("*") if f.is_file()) / 1e6, 2)
    return facts


def _record_lanes(settings: PipelineSettings, record_settings: Any, lanes: int, own_domain: int, bags_dir: Path,
                  log_dir: Path, env: dict[str, str], book: EpisodeBook) -> None:
    """Runs the lanes, each on a thread of its own, until the book needs no more; raises a lane's error."""
    from openvla_ros.interrupts import run_to_the_end
    from openvla_ros.ros.child_nodes import reserved_domain_ids

    with reserved_domain_ids(lanes - 1, exclude=(own_domain,)) as more_domains:
        domains = [own_domain, *more_domains]

        def lane_main(lane: int) -> None:
            try:
                _record_lane(settings, record_settings, lane, lanes, domains[lane], bags_dir, log_dir, env, book)
            except BaseException as error:  # noqa: BLE001 -- handed to the caller's thread by the book
                book.fail(error)

        # An interrupt sets book.stopped: every lane then stops its sim before this returns.
        run_to_the_end([lambda lane=lane: lane_main(lane) for lane in range(lanes)], book.stopped, "record-lane")
    if book.errors:
        raise book.errors[0]


def _bag_name(number: int) -> str:
    return f"episode_{number:03d}"


def _record_lane(settings: PipelineSettings, record_settings: Any, lane: int, lanes: int, domain_id: int,
                 bags_dir: Path, log_dir: Path, env: dict[str, str], book: EpisodeBook) -> None:
    """Records sim episodes lane, lane + lanes, ... through a sim of its own until the book needs no more."""
    from std_srvs.srv import SetBool, Trigger

    from openvla_ros.ros.record import BagRecorder

    topics = list(record_settings.topics)
    image_topic = topics[0]
    sim = ChildProcess(SIM_NODE if lane == 0 else f"{SIM_NODE}_lane{lane}", "openvla_ros.sim_scene_node", [
        "-p", f"task:={settings.task}", "-p", f"seed:={settings.record_seed}", "-p", "reset_on_start:=false",
        "-p", f"first_episode:={lane}", "-p", f"episode_stride:={lanes}",
        "-p", "publish_compressed:=true", "-p", f"expert_rate_hz:={settings.expert_rate_hz}",
        "-p", f"expert_settle_steps:={settings.expert_settle_steps}",
        "-p", f"camera_upside_down:={str(settings.camera_upside_down).lower()}",
    ], log_dir, dict(env, ROS_DOMAIN_ID=str(domain_id)))
    session = None

    def alive() -> None:
        sim.check_alive()
        book.check()

    try:
        session = RosSession("pipeline_recorder", domain_id=domain_id)
        number = lane
        while book.needs(number):
            book.check()
            reset = session.call(f"/{SIM_NODE}/reset", Trigger, Trigger.Request(), 60.0, alive)
            wait_for(lambda number=number: session.task_state.get("episode") == str(number), 10.0,
                     f"the task state of episode {number}", alive)
            path = bags_dir / _bag_name(number)
            recorder = BagRecorder(session.node, topics, path, record_settings.storage)
            recorder.start()
            try:
                wait_for(lambda recorder=recorder: set(recorder.subscribed_topics()) == set(topics)
                         and recorder.counts().get(image_topic, 0) >= 2
                         and recorder.counts().get("/instruction", 0) >= 1,
                         20.0, f"the recorder to receive {', '.join(topics)}", alive)
                session.call(f"/{SIM_NODE}/expert", SetBool, SetBool.Request(data=True), 10.0, alive)
                budget_s = 90 / settings.expert_rate_hz + 10.0
                wait_for(lambda number=number: session.task_state.get("episode") == str(number)
                         and session.task_state.get("status") != "running"
                         and session.task_state.get("expert") == "false",
                         budget_s, f"the end of expert episode {number}", alive)
                time.sleep(2.5 / settings.expert_rate_hz)  # the last step's window closes on later frames
            finally:
                summary = recorder.stop()
            state = dict(session.task_state)
            if state.get("status") != "success":
                shutil.rmtree(path, ignore_errors=True)
                print(f"  sim episode {number}: the expert failed ({reset.message!r}, {state.get('status')}); "
                      "not kept", flush=True)
                book.add(number, None)
            else:
                print(f"  {path.name}: {reset.message!r}, expert success in {state.get('steps')} steps, "
                      f"{summary.message_count} messages", flush=True)
                book.add(number, {"steps": int(state.get("steps", 0)), "messages": summary.message_count})
            number += lanes
    finally:
        try:
            if session is not None:
                session.close()
        finally:
            sim.stop()  # also when closing the session failed: no sim outlives its lane


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
