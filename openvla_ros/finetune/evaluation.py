"""Offline evaluation: recorded frames through exactly the inference path, against recorded actions.

Token models are scored per step; OFT models per chunk window (from each step: the recorded K actions, neutral ones past the episode's end)."""

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


def _plot_actions(frames: Sequence[Frame], path: Path, title: str, xlabel: str, draw) -> Path:
    """Writes a PNG with one panel per action dimension: the recorded episode plus what ``draw(axis, index)`` adds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recorded = np.stack([f.action for f in frames])
    figure, axes = plt.subplots(len(ACTION_NAMES), 1, figsize=(8, 12), sharex=True)
    for index, (axis, name) in enumerate(zip(axes, ACTION_NAMES, strict=True)):
        axis.plot(np.arange(len(frames)), recorded[:, index], label="recorded", color="black")
        draw(axis, index)
        axis.set_ylabel(name)
        axis.grid(alpha=0.3)
    # one legend under the title, outside the panels, so it covers no data
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.975), ncol=len(labels), frameon=False)
    axes[-1].set_xlabel(xlabel)
    figure.suptitle(title)
    figure.tight_layout(rect=(0, 0, 1, 0.965))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


def plot_episode(frames: Sequence[Frame], predicted: np.ndarray, path: Path, title: str) -> Path:
    """Writes a PNG with one panel per action dimension: recorded vs predicted over the episode."""
    steps = np.arange(len(frames))

    def draw(axis, index: int) -> None:
        axis.plot(steps, predicted[:, index], label="predicted", color="tab:orange", linestyle="--")

    return _plot_actions(frames, path, title, "step", draw)


def window_inputs(policy, window: ChunkWindow) -> dict[str, Any]:
    """Returns the keyword arguments of ``policy.predict_chunk`` for a window's first frame."""
    first = window.first
    return {
        "image": decode_image(first.image),
        "instruction": first.instruction,
        "wrist_images": [decode_image(data) for data in first.wrist_images[: policy.num_images - 1]],
        "proprio": first.state if policy.proprio_dim else None,
    }


def predict_window_chunks(policy, windows: Sequence[ChunkWindow]) -> np.ndarray:
    """Returns the physical chunks [N, K, A] an OFT ``policy`` predicts at each window's first frame."""
    return np.stack([policy.predict_chunk(**window_inputs(policy, window)) for window in windows])


def predict_window_details(policy, windows: Sequence[ChunkWindow]) -> list:
    """Returns the :class:`~openvla_ros.model.oft_policy.ChunkPrediction` of an OFT ``policy`` at each window."""
    return [policy.predict(**window_inputs(policy, window)) for window in windows]


def energy_metrics(policy, windows: Sequence[ChunkWindow], predictions: Sequence | None = None,
                   negatives: int = 7) -> dict[str, Any]:
    """Returns what the energy model of an OFT ``policy`` says about ``windows``.

    With ``policy.energy.steps > 0``: L1 (physical units) to the recorded chunk of the head's chunk and of
    the refined one, and their mean energies. Always: E_pos, the energy of each window's recorded chunk
    under its own observation, against E_neg, that of the recorded chunks of ``negatives`` other windows
    (spread over the split), and how often the recorded chunk has the lowest energy of them.
    ``predictions`` are :func:`predict_window_details` of the same windows (computed when not given).
    """
    if policy.energy.steps and predictions is None:
        predictions = predict_window_details(policy, windows)
    recorded = np.stack([w.actions for w in windows])
    count = len(windows)
    others = min(negatives, count - 1)
    positive, negative, retrieved = [], [], 0
    corrected, uncorrected, before, after, fallbacks = [], [], [], [], 0
    for index, window in enumerate(windows):
        inputs = window_inputs(policy, window)
        chosen = [(index + 1 + round(k * (count - 1) / max(1, others))) % count for k in range(others)]
        chosen = [c for c in dict.fromkeys(chosen) if c != index]
        energies = policy.candidate_energies(inputs["image"], inputs["instruction"], recorded[[index, *chosen]],
                                             wrist_images=inputs["wrist_images"], proprio=inputs["proprio"])
        positive.append(float(energies[0]))
        negative.extend(float(e) for e in energies[1:])
        retrieved += int(len(energies) > 1 and energies[0] < energies[1:].min())
        if policy.energy.steps:
            prediction = predictions[index]
            corrected.append(prediction.chunk)
            uncorrected.append(prediction.uncorrected)
            fallbacks += int(prediction.problem is not None)
            if prediction.problem is None:
                before.append(prediction.energy_before)
                after.append(prediction.energy_after)
    result: dict[str, Any] = {
        "energy_positive": float(np.mean(positive)),
        "energy_negative": float(np.mean(negative)) if negative else float("nan"),
        "retrieval_accuracy": retrieved / count if others else float("nan"),
        "negatives_per_window": others,
        "steps": policy.energy.steps,
    }
    if policy.energy.steps:
        corrected_error = np.abs(np.stack(corrected) - recorded)
        uncorrected_error = np.abs(np.stack(uncorrected) - recorded)
        result.update({
            "step_size": policy.energy.step_size,
            "max_step_fraction": policy.energy.max_step_fraction,
            "l1_uncorrected": float(uncorrected_error.mean()),
            "l1_corrected": float(corrected_error.mean()),
            "l1_per_chunk_step_uncorrected": [float(v) for v in uncorrected_error.mean(axis=(0, 2))],
            "l1_per_chunk_step_corrected": [float(v) for v in corrected_error.mean(axis=(0, 2))],
            "energy_head_chunk": float(np.mean(before)) if before else float("nan"),
            "energy_refined_chunk": float(np.mean(after)) if after else float("nan"),
            "fallbacks": fallbacks,
        })
    return result


def chunk_metrics(windows: Sequence[ChunkWindow], predicted: np.ndarray) -> dict[str, Any]:
    """Returns L1 (physical units) per dimension, per chunk step and overall against the recorded chunks."""
    recorded = np.stack([w.actions for w in windows])
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
    def draw(axis, index: int) -> None:
        for number, (start, chunk) in enumerate(zip(starts, chunks, strict=True)):
            steps = np.arange(start, start + chunk.shape[0])
            axis.plot(steps, chunk[:, index], color="tab:orange", linestyle="--", marker=".",
                      label="predicted chunks" if number == 0 else None)
            axis.axvline(start, color="tab:orange", alpha=0.15)

    return _plot_actions(frames, path, title,
                         "step (each chunk is predicted from the observation at its first step)", draw)
