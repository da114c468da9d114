"""A pretrained tiny base: the tiny OpenVLA-OFT trained fully on a broad simulated dataset.

    python -m openvla_ros.tiny artifacts/tiny-pretrained --pretrain      (or: make pretrained)

The analogue of OpenVLA's Open X-Embodiment pretraining, small enough for a CPU. It runs the same
stages a user's data goes through:

1. ``demos/``: the scripted expert's episodes of every pretraining task family, every block colour
   and every phrasing, written as rosbag2 bags (:func:`openvla_ros.sim.demos.record_expert_episodes`);
2. ``data/``: those bags converted to RLDS by the converter, with ``config/pipeline.yaml``'s layout;
3. ``train/``: the trainer, all weights trained (``lora_rank 0``) with the L1 chunk head, proprio
   and FiLM;
4. ``eval.json``: closed-loop success on fresh episodes of each pretraining task;
5. the merged model moves to ``OUT`` with ``pretrain.json``, which records the settings, the success
   rates and the SHA-256 of every file.

All stages work in ``OUT.build/``. Each finished stage leaves a marker, so an interrupted build picks up
at the first unfinished stage (training from its last checkpoint); one resumed with other settings
keeps the finished stages those settings do not touch (:data:`STAGE_INPUTS`). ``OUT`` appears only when
everything is done (one rename), so a half-written base is never taken for finished; a cached base
whose files no longer match ``pretrain.json`` is reported as corrupt and rebuilt by
:func:`ensure_pretrained`. Deterministic for a seed on a given machine and thread count.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from openvla_ros.errors import OpenVLAError

logger = logging.getLogger(__name__)

MANIFEST = "pretrain.json"
MANIFEST_VERSION = 2  # 2: closed-loop checkpoint selection, threads and seeds recorded
DATASET_NAME = "sim_pretrain"
REPO = Path(__file__).resolve().parents[1]
CONVERSION_CONFIG = REPO / "config" / "pipeline.yaml"
# What a base is built to reach on its fresh episodes (17 of 20); builds land on either side of it.
TARGET_RATE = 0.85


class PretrainError(OpenVLAError):
    """A pretraining build failed, or a cached base is missing or corrupt."""


@dataclass(frozen=True)
class PretrainSettings:
    """What the pretrained base is trained on and how long.

    Attributes:
        tasks: task families of the dataset, one after the other by episode.
        episodes: expert episodes written (failed expert episodes are not kept).
        steps, batch_size, learning_rate: full training of every weight.
        chunk: actions per chunk of the L1 head.
        expert_noise: the expert's per-step noise (metres at full speed), for state coverage.
        eval_episodes: closed-loop episodes per task on fresh seeds.
        seed: seeds the model, the episodes and the training.
        size: the tiny config to start from.
        film: FiLM in every ViT block (OpenVLA-OFT+): the instruction's mean embedding scales and shifts
            the patch features, so the vision towers can pick out the named block themselves.
        select_every: steps between closed-loop validations; the weights with the most successes on the
            validation episodes are the base (0: the last weights).
        select_episodes: closed-loop validation episodes per task (seeds of their own, never evaluated).
        threads: torch CPU threads the build trains with (the result depends on it: recorded, fixed),
            and the processes that record the demos (which do not change them).
        ema_decay: decay of the moving average of the weights that is validated and kept (0: the
            weights as trained).
        block_counts: blocks on the table in the recorded episodes, taken in turn (validation and
            evaluation always use the default scene's 3).
        locate_patch_weight, locate_point_weight: weights of the auxiliary localisation losses
            (:mod:`openvla_ros.sim.localisation`; both 0: the action loss alone). They teach where the
            named block is directly, which the action loss alone takes most of the build to find.
    """

    tasks: tuple[str, ...] = ("reach",)
    episodes: int = 2000
    steps: int = 3000
    batch_size: int = 16
    learning_rate: float = 1e-3
    chunk: int = 8
    expert_noise: float = 0.004
    eval_episodes: int = 20
    seed: int = 0
    size: str = "small"
    film: bool = True
    select_every: int = 500
    select_episodes: int = 20
    threads: int = 2
    ema_decay: float = 0.0
    block_counts: tuple[int, ...] = (3,)
    locate_patch_weight: float = 0.1
    locate_point_weight: float = 0.5

    def __post_init__(self) -> None:
        from openvla_ros.sim.scene import COLORS, TASKS

        unknown = [t for t in self.tasks if t not in TASKS]
        if not self.tasks or unknown:
            raise PretrainError(f"pretraining tasks must be among {', '.join(TASKS)}, got {list(self.tasks)}")
        for name in ("episodes", "steps", "batch_size", "chunk"):
            if getattr(self, name) < 1:
                raise PretrainError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise PretrainError(f"learning_rate must be > 0, got {self.learning_rate}")
        for name in ("eval_episodes", "select_every", "select_episodes"):
            if getattr(self, name) < 0:
                raise PretrainError(f"{name} must be >= 0, got {getattr(self, name)}")
        object.__setattr__(self, "block_counts", tuple(self.block_counts))
        if not self.block_counts or not all(1 <= n <= len(COLORS) for n in self.block_counts):
            raise PretrainError(f"block_counts must be within 1..{len(COLORS)}, got {list(self.block_counts)}")
        if "stack" in self.tasks and min(self.block_counts) < 2:
            raise PretrainError("the stack task needs at least 2 blocks: drop 1 from block_counts")
        if self.threads < 1:
            raise PretrainError(f"threads must be >= 1, got {self.threads}")
        for name in ("locate_patch_weight", "locate_point_weight"):
            if not getattr(self, name) >= 0:
                raise PretrainError(f"{name} must be >= 0, got {getattr(self, name)}")
        from openvla_ros.finetune.ema import ema_decay_problem

        if ema_decay_problem(self.ema_decay):
            raise PretrainError(ema_decay_problem(self.ema_decay))

    @property
    def localises(self) -> bool:
        """Whether training adds the localisation losses (either weight above 0)."""
        return bool(self.locate_patch_weight or self.locate_point_weight)

    def as_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["tasks"] = list(self.tasks)
        values["block_counts"] = list(self.block_counts)
        return values


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_hashes(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): _sha256(path)
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


def verify_pretrained(path: str | Path) -> dict[str, Any]:
    """Returns the manifest of a finished pretrained base after checking every file against it.

    Raises:
        PretrainError: when ``path`` is missing, unfinished or corrupt (the message says which file).
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise PretrainError(f"no pretrained base at {path}; build it with `make pretrained`")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise PretrainError(f"{path} is not a finished pretrained base ({manifest_path.name}: {exc}); "
                            "remove it and run `make pretrained`") from None
    expected = manifest.get("files") or {}
    if manifest.get("version") != MANIFEST_VERSION or not expected:
        raise PretrainError(f"{manifest_path} is not a pretrained-base manifest of this version; rebuild it")
    actual = _file_hashes(path)
    for name, digest in expected.items():
        if name not in actual:
            raise PretrainError(f"pretrained base {path} is corrupt: {name} is missing; rebuild it")
        if actual[name] != digest:
            raise PretrainError(f"pretrained base {path} is corrupt: {name} does not match its recorded "
                                "SHA-256; rebuild it")
    extra = sorted(set(actual) - set(expected))
    if extra:
        raise PretrainError(f"pretrained base {path} holds files it was not built with ({', '.join(extra[:3])}); "
                            "rebuild it")
    return manifest


# The stages in order, each with the settings its output depends on besides the stages before it. A
# build resumed with other settings keeps the finished stages up to the first one whose settings changed
# (another --steps keeps the demos and the dataset); that stage and every later one start over.
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "base": ("size", "seed"),
    "demos": ("tasks", "episodes", "expert_noise", "block_counts"),  # not threads: the bags are the same
    "data": (),
    "train": ("steps", "batch_size", "learning_rate", "chunk", "film", "select_every", "select_episodes",
              "threads", "ema_decay", "locate_patch_weight", "locate_point_weight"),
    "eval": ("eval_episodes",),
}


class _Stages:
    """Markers of the finished stages of one build directory, tied to the settings they were made with."""

    def __init__(self, build: Path, settings: PretrainSettings) -> None:
        self.build = build
        self.file = build / "stages.json"
        wanted = settings.as_dict()
        state = json.loads(self.file.read_text()) if self.file.exists() else {}
        if state.get("settings") != wanted:
            state = self._keep_unchanged(state, wanted)
        build.mkdir(parents=True, exist_ok=True)
        self.state = state
        self._save()

    def _keep_unchanged(self, state: dict[str, Any], wanted: dict[str, Any]) -> dict[str, Any]:
        """Returns the state with only the finished stages that the new settings leave as they were."""
        before = state.get("settings")
        kept: dict[str, Any] = {}
        named = {key for inputs in STAGE_INPUTS.values() for key in inputs}
        if isinstance(before, dict) and set(before) == set(wanted) == named:  # else: an unknown layout, nothing kept
            changed = {key for key in wanted if before[key] != wanted[key]}
            for name, inputs in STAGE_INPUTS.items():
                if name not in state.get("done", {}) or changed & set(inputs):
                    break
                kept[name] = state["done"][name]
        if self.build.exists():
            if kept:
                logger.info("%s was started with other settings: keeping its %s", self.build, ", ".join(kept))
            else:
                logger.info("discarding %s: it was started with other settings", self.build)
            for child in list(self.build.iterdir()):
                if child.name in kept or child.name == self.file.name:
                    continue
                if child.is_dir():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        elapsed = {name: seconds for name, seconds in state.get("elapsed_s", {}).items() if name in kept}
        return {"settings": wanted, "done": kept, "elapsed_s": elapsed}

    def _save(self) -> None:
        scratch = self.file.with_suffix(".tmp")
        scratch.write_text(json.dumps(self.state, indent=1))
        scratch.replace(self.file)

    def done(self, name: str) -> dict[str, Any] | None:
        return self.state["done"].get(name)

    def finish(self, name: str, facts: dict[str, Any]) -> None:
        self.state["done"][name] = facts
        self._save()


def _stage_dir(stages: _Stages, name: str) -> Path:
    """Returns the stage's directory, emptied when the stage had started but not finished."""
    directory = stages.build / name
    if directory.exists():
        shutil.rmtree(directory)
    return directory


def episode_seeds(settings: PretrainSettings, offset: int = 0) -> list[tuple[int, ...]]:
    """Returns the scene seeds of the pretraining episodes."""
    return [(settings.seed, 7000 + offset, index) for index in range(settings.episodes)]


def validation_seeds(settings: PretrainSettings, task_number: int) -> list[tuple[int, ...]]:
    """The closed-loop validation episodes that select the checkpoint (never trained on, never reported)."""
    return [(settings.seed, 8000 + task_number, index) for index in range(settings.select_episodes)]


def evaluation_seeds(settings: PretrainSettings, task_number: int) -> list[tuple[int, ...]]:
    """The fresh episodes the build reports its success on."""
    return [(settings.seed, 9000 + task_number, index) for index in range(settings.eval_episodes)]


def determinism_record(settings: PretrainSettings) -> dict[str, Any]:
    """What the build's result depends on besides its settings: versions, threads and every seed."""
    import platform

    import numpy
    import torch

    from openvla_ros.sim.localisation import heads_seed

    return {"torch": torch.__version__, "numpy": numpy.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "torch_threads": torch.get_num_threads(),
            "seeds": {"model": settings.seed, "training": settings.seed,
                      "localisation_heads": heads_seed(settings.seed),
                      "episodes": f"({settings.seed}, 7000, 0..{settings.episodes - 1})",
                      "validation": [f"({settings.seed}, {8000 + n}, 0..{settings.select_episodes - 1})"
                                     for n in range(len(settings.tasks))],
                      "evaluation": [f"({settings.seed}, {9000 + n}, 0..{settings.eval_episodes - 1})"
                                     for n in range(len(settings.tasks))]}}


def _print(message: str) -> None:
    print(message, flush=True)


def build_pretrained(out: str | Path, settings: PretrainSettings | None = None,
                     progress: Callable[[str], None] = _print) -> dict[str, Any]:
    """Builds the pretrained base in ``out`` (resuming an interrupted build) and returns its manifest.

    Raises:
        PretrainError: when ``out`` exists already, or a stage fails (the message names it).
    """
    settings = settings or PretrainSettings()
    out = Path(out)
    if out.exists():
        raise PretrainError(f"{out} exists; remove it to rebuild, or use ensure_pretrained() to reuse it")
    build = out.with_name(out.name + ".build")
    stages = _Stages(build, settings)
    started = time.monotonic()
    elapsed = dict(stages.state.get("elapsed_s", {}))

    def timed(name: str, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        facts = stages.done(name)
        if facts is not None:
            progress(f"[pretrain] {name}: done before, kept")
            return facts
        progress(f"[pretrain] {name} ...")
        start = time.monotonic()
        facts = work()
        elapsed[name] = round(time.monotonic() - start, 1)
        stages.state["elapsed_s"] = elapsed
        stages.finish(name, facts)
        progress(f"[pretrain] {name}: {elapsed[name]} s")
        return facts

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)  # the result depends on it: fixed and recorded
    try:
        return _build(out, build, stages, settings, progress, started, elapsed, timed)
    finally:
        torch.set_num_threads(threads)


def _build(out: Path, build: Path, stages: _Stages, settings: PretrainSettings, progress: Callable[[str], None],
           started: float, elapsed: dict[str, float], timed: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    timed("base", lambda: _make_base(stages, settings))
    demos = timed("demos", lambda: _record(stages, settings))
    data = timed("data", lambda: _convert(stages, settings, demos))
    training = timed("train", lambda: _train(stages, settings, progress))
    evaluation = timed("eval", lambda: _evaluate(build / "train" / "merged", settings, data["name"]))

    staging = build / "final"
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(build / "train" / "merged", staging)
    if training.get("selection"):
        from openvla_ros.finetune.selection import plot_curve

        plot_curve({"pretraining": training["selection"]}, staging / "selection.png",
                   f"pretraining: closed-loop validation ({settings.select_episodes} episodes per task)")
    manifest = {
        "version": MANIFEST_VERSION,
        "settings": settings.as_dict(),
        "dataset": data,
        "demos": {k: v for k, v in demos.items() if k != "bags"},
        "training": training,
        "selection": training.get("selection"),
        "success": evaluation,
        "determinism": determinism_record(settings),
        "elapsed_s": elapsed,
        "build_s_this_run": round(time.monotonic() - started, 1),
        "files": _file_hashes(staging),
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
    staging.rename(out)
    shutil.rmtree(build, ignore_errors=True)
    return manifest


def kept_stages_note(out: str | Path) -> str:
    """Returns what an interrupted build kept for the next run: its finished stages, or nothing."""
    out = Path(out)
    if out.exists():
        return f"the finished base in {out} is unchanged"
    build = out.with_name(out.name + ".build")
    try:
        done = list(json.loads((build / "stages.json").read_text()).get("done", {}))
    except (OSError, ValueError):
        done = []
    if not done:
        return "no stage had finished; nothing was kept"
    return (f"finished stages kept in {build} ({', '.join(done)}); the same command resumes from there, "
            "the unfinished stage starts over")


def weak_base_advice(manifest: dict[str, Any], out: str | Path) -> list[str]:
    """Returns one line per task whose reported success is below :data:`TARGET_RATE`: what it means and
    the way out (the same command rebuilds the same base; another seed gives another one)."""
    seed = int(manifest.get("settings", {}).get("seed", 0))
    lines = []
    for task, result in manifest.get("success", {}).items():
        if result["episodes"] and result["successes"] / result["episodes"] < TARGET_RATE:
            lines.append(
                f"{task}: {result['successes']}/{result['episodes']} is below the {TARGET_RATE:.0%} a base is built "
                "for. Whether a build gets there depends on its seed (docs/results.md), and the same command "
                f"rebuilds the same base: remove {out} and build it again with --seed {seed + 1} "
                f"(make pretrained PRETRAIN_ARGS=\"--seed {seed + 1}\")."
            )
    return lines


def ensure_pretrained(out: str | Path, settings: PretrainSettings | None = None,
                      progress: Callable[[str], None] = _print) -> dict[str, Any]:
    """Returns the manifest of the base in ``out``, building it first when missing and rebuilding it when corrupt.

    A finished base built with other settings is kept (its manifest says which); remove it to rebuild.
    """
    out = Path(out)
    if out.exists():
        try:
            return verify_pretrained(out)
        except PretrainError as exc:
            progress(f"[pretrain] {exc}: rebuilding")
            shutil.rmtree(out)
    return build_pretrained(out, settings, progress)


# ---------------------------------------------------------------------------------------- stages


def _make_base(stages: _Stages, settings: PretrainSettings) -> dict[str, Any]:
    from openvla_ros.model.tiny import make_tiny_checkpoint

    directory = _stage_dir(stages, "base")
    make_tiny_checkpoint(directory, seed=settings.seed, size=settings.size)
    return {"size": settings.size, "seed": settings.seed}


def _record(stages: _Stages, settings: PretrainSettings) -> dict[str, Any]:
    from openvla_ros.sim.demos import record_expert_episodes

    directory = _stage_dir(stages, "demos")
    seeds = episode_seeds(settings)
    written = []
    counts = settings.block_counts
    for number, task in enumerate(settings.tasks):
        mine = seeds[number::len(settings.tasks)]
        for turn, blocks in enumerate(counts):
            where = directory / task if len(counts) == 1 else directory / task / f"{blocks}_blocks_{turn}"
            written += record_expert_episodes(where, mine[turn::len(counts)], task=task,
                                              expert_noise=settings.expert_noise, num_blocks=blocks,
                                              workers=settings.threads)
    if not written:
        raise PretrainError("the expert solved none of the pretraining episodes; nothing to train on")
    instructions = sorted({episode.instruction for episode in written})
    return {
        "bags": [str(episode.path) for episode in written],
        "episodes": len(written),
        "expert_failures": settings.episodes - len(written),
        "steps": sum(episode.steps for episode in written),
        "instructions": instructions,
    }


def _convert(stages: _Stages, settings: PretrainSettings, demos: dict[str, Any]) -> dict[str, Any]:
    from openvla_ros.dataset import convert_bags, load_config

    directory = _stage_dir(stages, "data")
    report = convert_bags(demos["bags"], directory, DATASET_NAME, load_config(CONVERSION_CONFIG))
    return {"name": DATASET_NAME, "episodes": report.episodes, "steps": report.steps,
            "splits": dict(report.splits)}


def _train(stages: _Stages, settings: PretrainSettings, progress: Callable[[str], None]) -> dict[str, Any]:
    from openvla_ros.finetune.config import FinetuneConfig
    from openvla_ros.finetune.trainer import Trainer

    directory = stages.build / "train"
    resume = (directory / "checkpoints").is_dir() and any((directory / "checkpoints").iterdir())
    if not resume and directory.exists():
        shutil.rmtree(directory)
    config = FinetuneConfig(
        vla_path=str(stages.build / "base"), data_dir=str(stages.build / "data"), dataset_name=DATASET_NAME,
        out=str(directory), max_steps=settings.steps, batch_size=settings.batch_size,
        learning_rate=settings.learning_rate, lr_schedule="cosine", warmup_steps=min(50, settings.steps // 10),
        lora_rank=0, image_aug=False, device="cpu", save_steps=max(1, min(250, settings.steps)),
        eval_steps=max(1, settings.steps // 4), eval_batches=4, log_steps=max(1, min(100, settings.steps // 10)),
        keep_checkpoints=1, seed=settings.seed, resume=resume, action_head="l1", chunk=settings.chunk,
        use_proprio=True, film=settings.film, ema_decay=settings.ema_decay,
    )
    if resume:
        progress(f"[pretrain] train: resuming from {directory / 'checkpoints'}")
    selection = None
    if settings.select_every and settings.select_episodes:
        from openvla_ros.finetune.selection import ClosedLoopSelection

        def validate(policy: Any) -> tuple[int, int]:
            outcomes = [o for number, task in enumerate(settings.tasks)
                        for o in rollout_success(policy, validation_seeds(settings, number), task)]
            return sum(o["success"] for o in outcomes), len(outcomes)

        selection = ClosedLoopSelection(validate, settings.select_every, directory / "selection")
    auxiliary = None
    if settings.localises:
        from openvla_ros.sim.localisation import heads_seed, localisation_loss

        auxiliary = localisation_loss(settings.locate_patch_weight, settings.locate_point_weight,
                                      heads_seed(settings.seed))
    start = time.monotonic()
    last = Trainer(config, selection=selection, auxiliary=auxiliary).run()
    return {"steps": settings.steps, "batch_size": settings.batch_size, "seconds": round(time.monotonic() - start, 1),
            "last": {k: v for k, v in last.items() if k != "selected"}, "selection": last.get("selected")}


def rollout_success(policy: Any, seeds: Sequence[tuple[int, ...]], task: str,
                    actions_per_chunk: int | None = None, num_blocks: int | None = None) -> list[dict[str, Any]]:
    """Runs closed-loop episodes of an OFT ``policy`` in the sim and returns one outcome per seed.

    Each chunk is predicted from the camera image and the robot state the demonstrations record, and
    its first ``actions_per_chunk`` actions (default: half the chunk) are applied before the next.
    ``num_blocks`` overrides the scene's number of blocks (default: the pretraining scenes' 3).
    """
    from openvla_ros.sim import SceneConfig, TabletopRenderer, TabletopScene
    from openvla_ros.sim.demos import scene_state

    config = SceneConfig() if num_blocks is None else SceneConfig(num_blocks=num_blocks)
    scene, renderer = TabletopScene(config), TabletopRenderer()
    execute = actions_per_chunk or max(1, policy.chunk_size // 2)
    outcomes = []
    for seed in seeds:
        episode = scene.reset(seed=seed, task=task)
        state = scene.evaluate()
        while scene.status == "running":
            chunk = policy.predict_chunk(renderer.render(scene), episode.instruction, proprio=scene_state(scene))
            for action in chunk[:execute]:
                state = scene.apply_action(action)
                if scene.status != "running":
                    break
        outcomes.append({"seed": list(seed), "instruction": episode.instruction, "success": scene.status == "success",
                         "steps": state.steps, "final_distance_m": round(float(state.goal_distance), 4)})
    return outcomes


def _evaluate(model: Path, settings: PretrainSettings, unnorm_key: str) -> dict[str, Any]:
    from openvla_ros.model.oft_policy import OFTPolicy

    if settings.eval_episodes == 0:
        return {}
    policy = OFTPolicy.from_pretrained(str(model), device="cpu", unnorm_key=unnorm_key)
    results = {}
    for number, task in enumerate(settings.tasks):
        outcomes = rollout_success(policy, evaluation_seeds(settings, number), task)
        successes = sum(o["success"] for o in outcomes)
        results[task] = {"successes": successes, "episodes": len(outcomes), "rate": successes / len(outcomes),
                         "final_distance_m": [o["final_distance_m"] for o in outcomes]}
    return results
