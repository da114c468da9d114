"""Offline evaluation: recorded frames through exactly the inference path, against recorded actions.

Token models are scored per step; OFT models per chunk window (the recorded K actions from each start)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from openvla_ros.finetune.chunks import ChunkWindow
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


def predict_window_chunks(policy, windows: Sequence[ChunkWindow]) -> np.ndarray:
    """Returns the physical chunks [N, K, A] an OFT ``policy`` predicts at each window's first frame."""
    chunks = []
    for window in windows:
        first = window.first
        wrist = [decode_image(data) for data in first.wrist_images[: policy.num_images - 1]]
        proprio = first.state if policy.proprio_dim else None
        chunks.append(policy.predict_chunk(decode_image(first.image), first.instruction, wrist_images=wrist,
                                           proprio=proprio))
    return np.stack(chunks)


def chunk_metrics(windows: Sequence[ChunkWindow], predicted: np.ndarray) -> dict[str, Any]:
    """Returns L1 (physical units) per dimension, per chunk step and overall against the recorded chunks."""
    recorded = np.stack([[f.action for f in w.frames] for w in windows])
    error = np.abs(predicted - recorded)  # [N, K, A]
    per_dimension = error.mean(axis=(0, 1))
    return {
        "num_windows": len(windows),
        "chunk_size": int(recorded.shape[1]),
        "l1_per_dimension": {name: float(v) for name, v in zip(ACTION_NAMES, per_dimension, strict=True)},
        "l1_per_chunk_step": [float(v) for v in error.mean(axis=(0, 2))],
        "l1_mean": float(error.mean()),
    }


def plot_episode_chunks(frames: Sequence[Frame], starts: Sequence[int], chunks: np.ndarray, path: Path,
                        title: str) -> Path:
    """Writes a PNG with one panel per dimension: the recorded episode and each predicted chunk from its start."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recorded = np.stack([f.action for f in frames])
    figure, axes = plt.subplots(len(ACTION_NAMES), 1, figsize=(8, 12), sharex=True)
    for index, (axis, name) in enumerate(zip(axes, ACTION_NAMES, strict=True)):
        axis.plot(np.arange(len(frames)), recorded[:, index], label="recorded", color="black")
        for number, (start, chunk) in enumerate(zip(starts, chunks, strict=True)):
            steps = np.arange(start, start + chunk.shape[0])
            axis.plot(steps, chunk[:, index], color="tab:orange", linestyle="--", marker=".",
                      label="predicted chunks" if number == 0 else None)
            axis.axvline(start, color="tab:orange", alpha=0.15)
        axis.set_ylabel(name)
        axis.grid(alpha=0.3)
    axes[0].legend(loc="upper right")
    axes[-1].set_xlabel("step (each chunk is predicted from the observation at its first step)")
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path
