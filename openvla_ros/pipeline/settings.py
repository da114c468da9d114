"""The pipeline's settings, defaults, errors and command line."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = Path("artifacts") / "pipeline"
DEFAULT_BASE = Path("artifacts") / "tiny"
DEFAULT_PRETRAINED = Path("artifacts") / "tiny-pretrained"
DEFAULT_CONFIG = REPO / "config" / "pipeline.yaml"
MARKER = ".openvla_pipeline"
# Energy refinement in the closed-loop comparison: the node's and the policy's defaults.
ENERGY_STEP_SIZE = 0.5
ENERGY_MAX_STEP_FRACTION = 0.2
# An OpenVLA-OFT base (the pretrained tiny one) is fine-tuned in full by default: on the same data and base, LoRA
# (rank 32, learning rate 1e-3) reached 18/80 upside-down episodes, every weight at 3e-4 with the weight average
# 38/80 (docs/results.md, 2026-12-06). LoRA on such a base keeps the OFT head's rate.
OFT_LEARNING_RATE = 1e-3
OFT_FULL_LEARNING_RATE = 3e-4
OFT_LORA_RANK = 0
# An OpenVLA-OFT base's fine-tune also trains the localisation losses (openvla_ros.sim.localisation): on the
# same data and base, validation reached 20/20 by step 1,500 with them and 2/20 by step 1,000 without them
# (docs/results.md, 2026-12-07).
OFT_LOCATE_WEIGHTS = (0.1, 0.5)
SIM_NODE = "sim_scene"
MAX_RECORD_LANES = 8
TRAINER_LOGGER = "openvla_ros.finetune.trainer"
QUICK = {"episodes": 3, "eval_episodes": 2, "steps": 3, "batch_size": 2, "node_episodes": 0, "select_episodes": 1}


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
    eval_episodes: int = 80
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
    # Sims recording side by side, each in a ROS domain of its own (the bags do not depend on it). The
    # recording is real time and a sim with its recorder uses about 0.4 of a core: 3 leave room on 2 cores.
    record_lanes: int = 3
    eval_seed: int = 1  # the node check uses eval_seed + 1
    train_seed: int = 7
    # Closed-loop checkpoint selection during fine-tuning: episodes (select_seed, k), never recorded or reported.
    select_every: int = 250
    select_episodes: int = 20
    select_seed: int = 3
    ema_decay: float = 0.995  # fine-tune: validate and write a moving average of the weights (0: as trained)
    threads: int = 2  # torch CPU threads for training and evaluation (the result depends on it: fixed, recorded)
    # OFT bases: weights of the auxiliary localisation losses in the fine-tune (openvla_ros.sim.localisation)
    locate_patch_weight: float = 0.0
    locate_point_weight: float = 0.0

    @property
    def localises(self) -> bool:
        """Whether training adds the localisation losses (either weight above 0)."""
        return bool(self.locate_patch_weight or self.locate_point_weight)

    def __post_init__(self) -> None:
        from openvla_ros.sim import TASKS

        if self.task not in TASKS:
            raise PipelineError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.episodes < 2:
            raise PipelineError(f"episodes must be >= 2 (one train and one val episode), got {self.episodes}")
        for name in ("eval_episodes", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise PipelineError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("node_episodes", "energy_steps", "energy_train_steps", "lora_rank"):
            if getattr(self, name) < 0:
                raise PipelineError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.record_seed in (self.eval_seed, self.eval_seed + 1):
            raise PipelineError("eval_seed must differ from record_seed, and so must eval_seed + 1 (the node "
                                "check's): evaluation needs episodes never recorded")
        if self.select_seed in (self.record_seed, self.eval_seed, self.eval_seed + 1):
            raise PipelineError(f"select_seed {self.select_seed} must differ from record_seed, eval_seed and "
                                "eval_seed + 1: checkpoint selection needs episodes of its own")
        for name in ("select_every", "select_episodes"):
            if getattr(self, name) < 0:
                raise PipelineError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.threads < 1:
            raise PipelineError(f"threads must be >= 1, got {self.threads}")
        if not 1 <= self.record_lanes <= MAX_RECORD_LANES:
            raise PipelineError(f"record_lanes must be 1-{MAX_RECORD_LANES} (each takes a ROS domain and about 0.4 "
                                f"of a CPU core), got {self.record_lanes}")
        for name in ("locate_patch_weight", "locate_point_weight"):
            if not getattr(self, name) >= 0:
                raise PipelineError(f"{name} must be >= 0, got {getattr(self, name)}")
        from openvla_ros.finetune.ema import ema_decay_problem

        if ema_decay_problem(self.ema_decay):
            raise PipelineError(ema_decay_problem(self.ema_decay))

    @property
    def dataset_name(self) -> str:
        return f"sim_{self.task}"


def episode_seed_sets(settings: PipelineSettings) -> dict[str, list[tuple[int, int]]]:
    """The sim seeds of each use: recorded demonstrations, checkpoint selection, reported evaluation, node check."""
    return {
        "recorded": [(settings.record_seed, k) for k in range(settings.episodes)],
        "validation": [(settings.select_seed, k) for k in range(settings.select_episodes)],
        "evaluation": [(settings.eval_seed, k) for k in range(settings.eval_episodes)],
        "node": [(settings.eval_seed + 1, k) for k in range(settings.node_episodes)],
    }


def base_spec(base: Path) -> Any:
    """Returns the OFT layout (chunk, proprio, images) of an OpenVLA-OFT base, or None for a token model."""
    from openvla_ros.model.loading import read_config
    from openvla_ros.model.oft_loading import is_oft_checkpoint, read_oft_spec

    config = read_config(base)
    return read_oft_spec(base, config) if is_oft_checkpoint(base, config) else None


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
        ("record_seed", "sim seed of the recorded episodes"),
        ("record_lanes", "sims recording side by side, each in a ROS domain of its own (the bags are the same "
                         "for any count)"),
        ("eval_seed", "sim seed of the evaluation episodes (must differ; the node check uses eval_seed + 1)"),
        ("select_every", "fine-tuning steps between closed-loop validations; the best weights are kept "
                         "(0: the last weights)"),
        ("select_episodes", "closed-loop validation episodes (seeds of their own)"),
        ("select_seed", "sim seed of the validation episodes (must differ from the others)"),
        ("threads", "torch CPU threads for training and evaluation"),
        ("energy_steps", "OFT bases: also train an energy model and evaluate with this many refinement steps "
                         "(0: off)"),
        ("energy_train_steps", "energy model training steps (with --energy-steps)"),
    ):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=defaults[name].default, help=help_text)
    parser.add_argument("--lora-rank", type=int, default=None,
                        help=f"LoRA rank; 0 fine-tunes every weight (default {OFT_LORA_RANK} for an OpenVLA-OFT base, "
                             f"{defaults['lora_rank'].default} for a token model)")
    parser.add_argument("--learning-rate", type=float, default=None,
                        help=f"fine-tuning learning rate (default for an OpenVLA-OFT base {OFT_FULL_LEARNING_RATE:g} "
                             f"for every weight, {OFT_LEARNING_RATE:g} with LoRA (the heads train fully); "
                             f"{defaults['learning_rate'].default:g} for a token model)")
    parser.add_argument("--ema-decay", type=float, default=defaults["ema_decay"].default,
                        help="fine-tuning: validate and write an exponential moving average of the weights with "
                             "this decay (0: the weights as trained)")
    parser.add_argument("--locate-weights", default=None, metavar="PATCH,POINT",
                        help="OpenVLA-OFT bases: weights of the auxiliary localisation losses in the fine-tune "
                             f"(default {OFT_LOCATE_WEIGHTS[0]:g},{OFT_LOCATE_WEIGHTS[1]:g} for an OpenVLA-OFT "
                             "base; 0,0: the action loss alone)")
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
        "batch_size": args.batch_size,
        "image_aug": args.image_aug, "expert_rate_hz": args.expert_rate, "record_seed": args.record_seed,
        "record_lanes": args.record_lanes,
        "eval_seed": args.eval_seed, "energy_steps": args.energy_steps, "select_every": args.select_every,
        "select_episodes": args.select_episodes, "select_seed": args.select_seed, "threads": args.threads,
        "energy_train_steps": args.energy_train_steps, "camera_upside_down": upside_down,
        "ema_decay": args.ema_decay,
    }
    if args.lora_rank is not None:
        values["lora_rank"] = args.lora_rank
    elif oft:
        values["lora_rank"] = OFT_LORA_RANK
    if args.learning_rate is not None:
        values["learning_rate"] = args.learning_rate
    elif oft:
        every_weight = values.get("lora_rank") == 0
        values["learning_rate"] = OFT_FULL_LEARNING_RATE if every_weight else OFT_LEARNING_RATE
    if args.locate_weights is not None:
        try:
            values["locate_patch_weight"], values["locate_point_weight"] = (
                float(w) for w in args.locate_weights.split(","))
        except ValueError:
            raise PipelineError(f"--locate-weights takes two numbers separated by a comma, got "
                                f"{args.locate_weights!r}") from None
    elif oft:
        values["locate_patch_weight"], values["locate_point_weight"] = OFT_LOCATE_WEIGHTS
    if args.quick:
        values.update(QUICK)
    return PipelineSettings(**values)
