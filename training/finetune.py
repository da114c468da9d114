"""LoRA / QLoRA fine-tuning of OpenVLA on an RLDS dataset.

    python training/finetune.py --vla-path openvla/openvla-7b --data-dir DATA --dataset-name NAME \\
        --out runs/my_robot [--quantization 4bit] [--config settings.yaml] [--resume]

Data-parallel on several GPUs: ``torchrun --nproc-per-node N training/finetune.py ...``.
See ``python training/finetune.py --help`` for every setting.
"""

from __future__ import annotations

import logging
import sys

from openvla_ros.errors import OpenVLAError
from openvla_ros.finetune.checkpoints import newest_checkpoint_note
from openvla_ros.finetune.config import load_config
from openvla_ros.finetune.trainer import run_finetune
from openvla_ros.interrupts import interrupt_exit_status, interrupt_name, termination_as_interrupt


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    config = None
    try:
        with termination_as_interrupt():
            config = load_config(argv)
            metrics = run_finetune(config)
    except (OpenVLAError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        print(
            f"interrupted ({interrupt_name(interrupt)}): {newest_checkpoint_note(config.out if config else None)}; run the same command with "
            "--resume to continue from it (steps since it are lost)",
            file=sys.stderr,
        )
        return interrupt_exit_status(interrupt)
    print(f"done: outputs in {config.out}  last metrics: {metrics}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
