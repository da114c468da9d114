"""Training checkpoints shared by both trainers (VLA fine-tuning and the energy model).

A run keeps ``OUT/checkpoints/step-NNNNNN/`` directories. Each is written into a staging directory
beside them and renamed into place when complete, so a ``step-*`` directory is always whole: an
interrupted write (Ctrl-C, SIGTERM) removes its staging directory, and the staging directory of a
killed run is removed by the next run (see :func:`remove_stale_staging`). Only the newest ``keep``
checkpoints stay. The optimiser, scheduler, step and every random generator's state are saved with
the weights, so resuming continues the same run.
"""

from __future__ import annotations

import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from openvla_ros.errors import TrainingError
from openvla_ros.interrupts import remove_stale_staging
from openvla_ros.model.loading import fresh_directory

CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PATTERN = re.compile(r"^step-(\d{6,})$")
STAGING_PREFIX = ".staging-"


def list_checkpoints(out: Path) -> list[Path]:
    """Returns the complete checkpoints of the run in ``out``, oldest first."""
    root = Path(out) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [path for path in root.iterdir() if path.is_dir() and CHECKPOINT_PATTERN.match(path.name)]
    return sorted(found, key=lambda path: int(CHECKPOINT_PATTERN.match(path.name).group(1)))


def newest_checkpoint(out: Path) -> Path:
    """Returns the newest complete checkpoint of the run in ``out``.

    Raises:
        TrainingError: when there is none (``--resume`` on a run that never saved one).
    """
    found = list_checkpoints(out)
    if not found:
        raise TrainingError(f"--resume given but {Path(out) / CHECKPOINTS_DIR} holds no checkpoint; drop --resume")
    return found[-1]


def newest_checkpoint_note(out: Path | None) -> str:
    """Returns what an interrupted run kept, for its message: its newest complete checkpoint, or none."""
    if out is None:
        return "no checkpoint was complete yet"
    found = list_checkpoints(Path(out))
    if not found:
        return f"no checkpoint was complete yet in {Path(out) / CHECKPOINTS_DIR}"
    return f"the newest complete checkpoint is {found[-1]}"


def remove_stale_checkpoint_staging(out: Path) -> list[Path]:
    """Removes the half-written checkpoints a killed run left in ``out``; returns what was removed."""
    return remove_stale_staging(Path(out) / CHECKPOINTS_DIR, f"{STAGING_PREFIX}*")


def write_checkpoint(out: Path, step: int, write: Callable[[Path], None], keep: int) -> Path:
    """Writes checkpoint ``step`` with ``write(directory)`` atomically, then keeps only the newest ``keep``.

    An existing checkpoint of that step is left as it is. Returns the checkpoint's directory.
    """
    root = Path(out) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    if not final.exists():
        with fresh_directory(root, STAGING_PREFIX) as staging:  # removed unless renamed (interrupts too)
            write(staging)
            staging.rename(final)
    for old in list_checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def training_state(step: int, optimizer: Any, scheduler: Any, config: dict[str, Any]) -> dict[str, Any]:
    """Returns what resuming needs besides the weights: step, optimiser, scheduler, the RNGs, the config."""
    return {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": np.random.get_state(),
        "python_rng": random.getstate(),
        "config": config,
    }


def restore_training_state(state: dict[str, Any], optimizer: Any, scheduler: Any) -> int:
    """Loads a :func:`training_state` into the optimiser, scheduler and RNGs; returns its step."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    np.random.set_state(state["numpy_rng"])
    random.setstate(state["python_rng"])
    return int(state["step"])


def recover_model_swap(out: Path, name: str, fresh_name: str, previous_name: str) -> Path | None:
    """Puts back the model a run killed in the middle of its swap left aside; returns what became ``name``.

    A finished model is written as ``fresh_name`` (complete once it has that name), then swapped in:
    ``name`` -> ``previous_name``, ``fresh_name`` -> ``name``. A kill between the two renames leaves no
    ``name``: the newest complete model (``fresh_name``, else ``previous_name``) is renamed back to it.
    With ``name`` in place, the leftovers are removed. Every step is logged as a warning.
    """
    import logging

    logger = logging.getLogger(__name__)
    target, fresh, previous = out / name, out / fresh_name, out / previous_name
    restored = None
    if not target.exists():
        for candidate in (fresh, previous):
            if candidate.is_dir():
                candidate.rename(target)
                restored = target
                logger.warning("put back %s from %s: an earlier run was killed while it swapped in its model",
                               target, candidate.name)
                break
    for leftover in (fresh, previous):
        if leftover.exists():
            shutil.rmtree(leftover, ignore_errors=True)
            logger.warning("removed %s, left by an earlier run that was killed before it could clean up", leftover)
    return restored
