"""Fine-tuning configuration: a dataclass readable from YAML with command-line overrides."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from openvla_ros.finetune.ema import ema_decay_problem
from openvla_ros.model.loading import QUANTIZATIONS

LR_SCHEDULES = ("constant", "linear", "cosine")
ACTION_HEADS = ("tokens", "l1")
DEFAULT_CHUNK = 8


@dataclass
class FinetuneConfig:
    """Settings of one fine-tuning run (defaults follow the official LoRA recipe).

    Attributes:
        vla_path: base checkpoint directory or hub id.
        data_dir: directory holding the RLDS dataset (``DATA_DIR/NAME/VERSION``).
        dataset_name: the dataset's name; also the ``norm_stats`` key of the fine-tuned model.
        out: output directory (adapter/, merged/, checkpoints/, tensorboard/).
        max_steps: optimizer steps to train.
        batch_size: samples per forward pass (per process).
        grad_accumulation_steps: forward passes per optimizer step.
        learning_rate: AdamW learning rate (official: constant 5e-4).
        lr_schedule: constant, linear or cosine decay after warmup.
        warmup_steps: linear warmup steps.
        ema_decay: keep an exponential moving average of the trainable weights with this decay (e.g.
            0.999) and evaluate, select and write the average; 0 turns it off.
        max_grad_norm: gradient clipping norm (0 disables).
        lora_rank, lora_alpha, lora_dropout: LoRA settings (alpha defaults to min(rank, 16)); rank 0
            trains every weight instead (full fine-tuning, as for pretraining; no quantisation).
        quantization: none (LoRA on a full-precision base), 8bit or 4bit (QLoRA).
        dtype: base weights dtype: auto (bf16 on CUDA, fp32 on CPU), bfloat16, float16, float32.
        device: auto, cpu, cuda or cuda:N.
        image_aug: random 90%-area crops + colour jitter (use --center-crop at inference).
        gradient_checkpointing: trade compute for memory in the language model.
        save_steps: write a resumable checkpoint every N steps.
        eval_steps: validate on the ``val`` split every N steps (0 disables).
        eval_batches: at most this many validation batches per evaluation.
        log_steps: log metrics every N steps.
        keep_checkpoints: how many periodic checkpoints to keep.
        seed: seed of data order, augmentation and LoRA initialisation.
        resume: continue from the newest checkpoint in ``out/checkpoints``.
        action_head: ``tokens`` (OpenVLA's 7 action tokens, cross-entropy) or ``l1`` (OpenVLA-OFT: one
            bidirectional pass, a chunk of continuous actions, L1 loss on the normalised chunk).
        chunk: K, actions per chunk (l1 only); 0 = the base's when it is an OFT model, else 8.
        use_proprio: feed ``observation/state`` through a proprio projector (l1 only).
        num_images: images per observation, primary then wrist cameras (l1 only).
        film: language-conditioned FiLM in every ViT block (l1 only).
    """

    vla_path: str = "openvla/openvla-7b"
    data_dir: str = ""
    dataset_name: str = ""
    out: str = "runs/finetune"
    max_steps: int = 1000
    batch_size: int = 8
    grad_accumulation_steps: int = 1
    learning_rate: float = 5e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    ema_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_rank: int = 32
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    quantization: str = "none"
    dtype: str = "auto"
    device: str = "auto"
    image_aug: bool = True
    gradient_checkpointing: bool = False
    save_steps: int = 500
    eval_steps: int = 500
    eval_batches: int = 20
    log_steps: int = 10
    keep_checkpoints: int = 2
    seed: int = 7
    resume: bool = False
    action_head: str = "tokens"
    chunk: int = 0
    use_proprio: bool = False
    num_images: int = 1
    film: bool = False

    def __post_init__(self) -> None:
        if not self.data_dir:
            raise ValueError("data_dir is required: the directory that holds the RLDS dataset")
        if not self.dataset_name:
            raise ValueError("dataset_name is required: the RLDS dataset's name")
        positive = ("max_steps", "batch_size", "grad_accumulation_steps", "save_steps", "log_steps",
                    "keep_checkpoints")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_steps", "eval_batches", "warmup_steps", "lora_rank"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if ema_decay_problem(self.ema_decay):
            raise ValueError(ema_decay_problem(self.ema_decay))
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0, got {self.max_grad_norm}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.action_head not in ACTION_HEADS:
            raise ValueError(f"action_head must be one of {', '.join(ACTION_HEADS)}, got {self.action_head!r}")
        if self.chunk < 0 or self.num_images < 1:
            raise ValueError(f"chunk must be >= 0 and num_images >= 1, got {self.chunk} and {self.num_images}")
        if self.action_head == "tokens":
            chunk_options = {"chunk": self.chunk != 0, "use_proprio": self.use_proprio,
                             "num_images": self.num_images != 1, "film": self.film}
            given = [name for name, used in chunk_options.items() if used]
            if given:
                raise ValueError(
                    f"{', '.join('--' + n.replace('_', '-') for n in given)} need the OFT head: add --action-head l1"
                )
        if self.lora_rank == 0 and self.quantization != "none":
            raise ValueError("full fine-tuning (lora_rank 0) trains the weights themselves and cannot use a "
                             f"{self.quantization} base; use LoRA (lora_rank > 0) for QLoRA")
        if self.lora_alpha is None:
            self.lora_alpha = float(min(self.lora_rank, 16) or 16)

    @property
    def out_dir(self) -> Path:
        return Path(self.out)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _field_kind(field: dataclasses.Field) -> str:
    """Returns "bool", "int", "float" or "str" for a config field (``float | None`` counts as float)."""
    kind = field.type if isinstance(field.type, str) else field.type.__name__
    for name in ("bool", "int", "float"):
        if kind.startswith(name):
            return name
    return "str"


def _coerce(field: dataclasses.Field, value: Any, source: str) -> Any:
    """Returns a YAML value as the field's type (YAML reads ``5e-4`` as a string, ``1`` as an int).

    Raises:
        ValueError: naming the field when the value cannot be read as its type.
    """
    kind = _field_kind(field)
    if value is None:
        return None
    try:
        if kind == "bool":
            return value if isinstance(value, bool) else _parse_bool(str(value))
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        raise ValueError(f"{source}: {field.name} must be {'an' if kind == 'int' else 'a'} {kind}, got {value!r}") from None
    return str(value)


def build_parser() -> argparse.ArgumentParser:
    """Returns the command-line parser: one ``--option`` per config field, all defaulting to unset."""
    parser = argparse.ArgumentParser(
        prog="python training/finetune.py",
        description="LoRA / QLoRA fine-tuning of OpenVLA on an RLDS dataset.",
    )
    parser.add_argument("--config", type=Path, help="YAML file of settings (command-line options override it)")
    for field in dataclasses.fields(FinetuneConfig):
        option = "--" + field.name.replace("_", "-")
        kind = _field_kind(field)
        if kind == "bool":
            parser.add_argument(option, type=_parse_bool, nargs="?", const=True, default=None, metavar="BOOL")
        elif kind == "int":
            parser.add_argument(option, type=int, default=None)
        elif kind == "float":
            parser.add_argument(option, type=float, default=None)
        else:
            parser.add_argument(option, type=str, default=None)
    return parser


def load_config(argv: list[str] | None = None) -> FinetuneConfig:
    """Returns the config from defaults < YAML file < command-line options.

    Raises:
        ValueError: for unknown YAML keys or invalid values (the message names the field).
        SystemExit: for unparsable command lines (argparse).
    """
    args = vars(build_parser().parse_args(argv))
    config_path = args.pop("config")
    values: dict[str, Any] = {}
    if config_path is not None:
        if not config_path.is_file():
            raise ValueError(f"config file {config_path} not found")
        loaded = yaml.safe_load(config_path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{config_path} must hold a mapping of settings")
        known = {f.name: f for f in dataclasses.fields(FinetuneConfig)}
        for key, value in loaded.items():
            name = str(key).replace("-", "_")
            if name not in known:
                raise ValueError(f"{config_path}: unknown setting {key!r}; known: {', '.join(sorted(known))}")
            values[name] = _coerce(known[name], value, str(config_path))
    values.update({key: value for key, value in args.items() if value is not None})
    return FinetuneConfig(**values)
