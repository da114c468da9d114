"""Opening a converted dataset the way OpenVLA's loader does, to check it before a fine-tune."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from openvla_ros.dataset.rlds_writer import (
    ACTION,
    IS_FIRST,
    IS_LAST,
    LANGUAGE_INSTRUCTION,
    OBSERVATION,
    STATISTICS_FILE,
    STEPS,
    TRAIN_SPLIT,
    VAL_SPLIT,
)
from openvla_ros.errors import DatasetError


def check_dataset(data_dir: str | Path, name: str, num_steps: int = 3) -> list[str]:
    """Opens ``name`` with ``tfds.builder(name, data_dir=data_dir)`` and returns lines describing a few steps.

    Raises:
        DatasetError: when the dataset does not open, lacks a non-empty train or val split, or has no
            statistics file.
    """
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=str(data_dir))
    except Exception as exc:
        raise DatasetError(f"cannot open dataset {name!r} in {data_dir}: {exc}") from exc
    splits = builder.info.splits
    for split in (TRAIN_SPLIT, VAL_SPLIT):
        if split not in splits or splits[split].num_examples == 0:
            raise DatasetError(f"dataset {name!r} has no {split} episodes; OpenVLA's loader needs both splits")
    statistics_path = Path(builder.data_dir) / STATISTICS_FILE
    if not statistics_path.exists():
        raise DatasetError(f"dataset {name!r} lacks {statistics_path}; convert it again")
    statistics = json.loads(statistics_path.read_text())[name]
    lines = [
        f"{name} {builder.info.version} at {builder.data_dir}",
        f"splits: train {splits[TRAIN_SPLIT].num_examples} episodes, val {splits[VAL_SPLIT].num_examples} episodes",
        f"transitions in statistics: {statistics['num_transitions']}, trajectories: {statistics['num_trajectories']}",
    ]
    dataset = builder.as_dataset(split=TRAIN_SPLIT)
    for episode in tfds.as_numpy(dataset.take(1)):
        steps = list(episode[STEPS])
        lines.append(f"first train episode: {len(steps)} steps")
        for index, step in enumerate(steps[:num_steps]):
            observation = step[OBSERVATION]
            shapes = ", ".join(f"{key} {tuple(np.shape(value))}" for key, value in observation.items())
            action = ", ".join(f"{value:+.4f}" for value in step[ACTION])
            instruction = step[LANGUAGE_INSTRUCTION].decode()
            lines.append(
                f"  step {index}: {shapes}; action [{action}]; first={bool(step[IS_FIRST])} "
                f"last={bool(step[IS_LAST])}; instruction {instruction!r}"
            )
    return lines
