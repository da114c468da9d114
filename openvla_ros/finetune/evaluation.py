"""Offline evaluation: recorded frames through exactly the inference path, against recorded actions."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from openvla_ros.finetune.data import Frame, decode_image
from openvla_ros.model.action_codec import ACTION_NAMES
from openvla_ros.model.policy import OpenVLAPolicy


def predict_frames(policy: OpenVLAPolicy, frames: Sequence[Frame]) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(action_ids [N, 7], physical actions [N, 7])`` predicted by ``policy`` for ``frames``."""
    ids = np.stack([policy.predict_action_ids(decode_image(f.image), f.instruction) for f in frames])
    actions = policy.normalizer.unnormalize(policy.action_tokenizer.decode(ids))
    return ids, actions


def action_metrics(policy: OpenVLAPolicy, frames: Sequence[Frame], ids: np.ndarray, actions: np.ndarray) -> dict[str, Any]:
    """Returns per-dimension L1 (physical units), mean L1 and action-token accuracy against the recording."""
    recorded = np.stack([f.action for f in frames])
    recorded_ids = policy.action_tokenizer.encode(policy.normalizer.normalize(recorded))
    l1 = np.abs(actions - recorded).mean(axis=0)
    return {
        "num_steps": len(frames),
        "l1_per_dimension": {name: float(v) for name, v in zip(ACTION_NAMES, l1, strict=True)},
        "l1_mean": float(l1.mean()),
        "token_accuracy": float((ids == recorded_ids).mean()),
        "token_accuracy_per_dimension": {
            name: float(v) for name, v in zip(ACTION_NAMES, (ids == recorded_ids).mean(axis=0), strict=True)
        },
    }


def plot_episode(frames: Sequence[Frame], predicted: np.ndarray, path: Path, title: str) -> Path:
    """Writes a PNG with one panel per action dimension: recorded vs predicted over the episode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recorded = np.stack([f.action for f in frames])
    figure, axes = plt.subplots(len(ACTION_NAMES), 1, figsize=(8, 12), sharex=True)
    steps = np.arange(len(frames))
    for index, (axis, name) in enumerate(zip(axes, ACTION_NAMES, strict=True)):
        axis.plot(steps, recorded[:, index], label="recorded", color="black")
        axis.plot(steps, predicted[:, index], label="predicted", color="tab:orange", linestyle="--")
        axis.set_ylabel(name)
        axis.grid(alpha=0.3)
    axes[0].legend(loc="upper right")
    axes[-1].set_xlabel("step")
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path
