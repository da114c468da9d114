"""Train an energy model for a finished OpenVLA-OFT model (the VLA frozen) on an RLDS dataset.

    python training/train_energy.py --model runs/oft/merged --data-dir DATA --dataset-name NAME \\
        --out runs/energy [--max-steps 2000] [--batch-size 24] [--resume]

Writes energy_model.safetensors + energy_model.json beside the model's head (and into OUT/energy), where
the policy, the node (energy_steps > 0) and training/evaluate.py find them. Interrupted? The same
command with --resume continues from the newest checkpoint, optimiser state included.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from openvla_ros.errors import OpenVLAError
from openvla_ros.finetune.checkpoints import newest_checkpoint_note
from openvla_ros.finetune.energy_training import EnergyTrainingConfig, run_energy_training
from openvla_ros.interrupts import interrupt_exit_status, interrupt_name, termination_as_interrupt


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python training/train_energy.py", description=__doc__.splitlines()[0])
    defaults = EnergyTrainingConfig.__dataclass_fields__
    parser.add_argument("--model", required=True, help="the finished OFT model (e.g. runs/oft/merged)")
    parser.add_argument("--data-dir", required=True, help="directory holding the RLDS dataset")
    parser.add_argument("--dataset-name", required=True)
    parser.add_argument("--out", default=defaults["out"].default, help="run directory (checkpoints, metrics.jsonl)")
    parser.add_argument("--unnorm-key", default=None, help="the model's statistics key (default: the dataset name)")
    for name, kind, text in (
        ("max_steps", int, "optimiser steps"),
        ("batch_size", int, "windows per step; each has batch_size - 1 in-batch negatives"),
        ("learning_rate", float, "AdamW learning rate"),
        ("weight_decay", float, "AdamW weight decay"),
        ("warmup_steps", int, "linear learning-rate warm-up steps"),
        ("max_grad_norm", float, "gradient clipping norm (0 disables)"),
        ("temperature", float, "InfoNCE temperature"),
        ("hidden_dim", int, "energy model width"),
        ("num_heads", int, "attention heads"),
        ("dropout", float, "dropout on the action features (training only)"),
        ("save_steps", int, "checkpoint every N steps"),
        ("eval_steps", int, "validate every N steps (0 disables)"),
        ("eval_batches", int, "validation batches per evaluation"),
        ("log_steps", int, "log every N steps"),
        ("keep_checkpoints", int, "periodic checkpoints kept"),
        ("seed", int, "data order, initialisation and dropout"),
    ):
        default = defaults[name].default
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default, help=f"{text} (default {default})")
    parser.add_argument("--image-aug", action="store_true", help="random crops and colour jitter")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quantization", default="none", choices=("none", "8bit", "4bit"))
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("--write-to-model", action=argparse.BooleanOptionalAction, default=True,
                        help="write the final files beside the model's head (default: on)")
    parser.add_argument("--overwrite", action="store_true", help="replace an energy model already beside the head")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    names = {field.name for field in dataclasses.fields(EnergyTrainingConfig)}
    try:
        with termination_as_interrupt():
            config = EnergyTrainingConfig(**{k: v for k, v in vars(args).items() if k in names})
            metrics = run_energy_training(config)
    except (OpenVLAError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        print(f"interrupted ({interrupt_name(interrupt)}): {newest_checkpoint_note(Path(args.out))}; run the "
              "same command with --resume to continue from it", file=sys.stderr)
        return interrupt_exit_status(interrupt)
    print(f"done: energy model in {config.out}/energy  last metrics: {metrics}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
