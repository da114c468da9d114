"""RLDS episodes -> OFT training batches: chunk windows, several images, proprio, normalised targets.

A sample is a window of one episode: the observation at step t and the physical actions of steps
t .. t+K-1, normalised to the [-1, 1] chunk the L1 head regresses. As OpenVLA's RLDS pipeline forms
them, every step starts a window, so the last K-1 observations of an episode, those near the goal, are
trained on too. Steps past the episode's end get the neutral *physical* action (zero deltas, the last
gripper value held), normalised like every other target; OpenVLA's pipeline instead pads with 0.0
after normalising (the middle of each dimension's range, and a closed gripper). The physical neutral
teaches the model to stay still at the goal rather than drift toward the middle of the recorded range. Inputs are laid out by the core's
:func:`~openvla_ros.model.oft.build_chunk_inputs`, images go through the checkpoint's
:class:`~openvla_ros.model.processor.ImageTransform` and proprio through the same
:func:`~openvla_ros.model.oft_policy.normalize_proprio` the policy applies at inference.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from openvla_ros.errors import DatasetError
from openvla_ros.finetune.data import Frame, augment, decode_image
from openvla_ros.model.action_codec import neutral_action
from openvla_ros.model.oft import ChunkInputs, OFTSpec, build_chunk_inputs
from openvla_ros.model.oft_policy import chunk_normalizers, normalize_proprio
from openvla_ros.model.processor import ImageSettings, ImageTransform, prompt_token_ids

logger = logging.getLogger(__name__)

# Above this share of neutral (padded) target steps, the head mostly learns to stand still.
MAX_PADDED_FRACTION = 0.5


@dataclass(frozen=True)
class ChunkWindow:
    """One training window: ``frames[0]`` is observed; its episode's next steps, at most ``chunk``, give the target.

    ``frames`` stops at the episode's end; :attr:`actions` fills the rest of the chunk with neutral actions.
    """

    frames: tuple[Frame, ...]
    chunk: int

    @property
    def first(self) -> Frame:
        return self.frames[0]

    @property
    def padded(self) -> int:
        """How many of the chunk's steps lie past the episode's end."""
        return self.chunk - len(self.frames)

    @property
    def actions(self) -> np.ndarray:
        """Returns the physical [K, A] target chunk: the recorded actions, then neutral ones past the end."""
        recorded = np.stack([f.action for f in self.frames])
        if not self.padded:
            return recorded
        neutral = np.repeat(neutral_action(recorded[-1])[None], self.padded, axis=0)
        return np.concatenate([recorded, neutral])


def chunk_windows(frames: Sequence[Frame], chunk: int) -> list[ChunkWindow]:
    """Returns one window per step of every episode, in order (see :class:`ChunkWindow` for the end).

    ``frames`` must be in recording order, as :func:`~openvla_ros.finetune.data.load_frames` returns them.
    """
    episodes: dict[int, list[Frame]] = {}
    for frame in frames:
        episodes.setdefault(frame.episode, []).append(frame)
    windows = []
    for steps in episodes.values():
        for start in range(len(steps)):
            windows.append(ChunkWindow(tuple(steps[start:start + chunk]), chunk))
    return windows


def check_chunk_data(frames: Sequence[Frame], spec: OFTSpec, split: str) -> list[ChunkWindow]:
    """Returns the windows of ``frames`` after checking they hold what ``spec`` needs.

    Logs a warning when more than MAX_PADDED_FRACTION of the target steps lie past their episode's
    end (episodes short against ``spec.chunk``).

    Raises:
        DatasetError: too few wrist cameras, no state, or a state of another length than the proprio
            projector takes.
    """
    sample = frames[0]
    if spec.num_images > 1 and len(sample.wrist_images) < spec.num_images - 1:
        raise DatasetError(
            f"--num-images {spec.num_images} needs {spec.num_images - 1} wrist camera(s) in the dataset "
            f"(observation keys containing 'wrist'); split {split!r} has {len(sample.wrist_images)}. Record "
            "the wrist camera (topics.wrist_image in the conversion config) or lower --num-images"
        )
    if spec.proprio_dim:
        if sample.state is None:
            raise DatasetError(
                f"--use-proprio needs observation/state in the dataset; split {split!r} has none. Record the "
                "robot state (topics.state in the conversion config) or drop --use-proprio"
            )
        if sample.state.shape != (spec.proprio_dim,):
            raise DatasetError(
                f"split {split!r} has {sample.state.size}-value states; the model's proprio projector takes "
                f"{spec.proprio_dim}"
            )
    windows = chunk_windows(frames, spec.chunk)
    padded = padded_fraction(windows)
    if padded > MAX_PADDED_FRACTION:
        episodes = len({window.first.episode for window in windows})
        logger.warning(
            "split %r: %.0f%% of the chunk targets are neutral actions past the end of an episode (episodes "
            "of %.1f steps on average, --chunk %d): the model would mostly learn to stand still. Record "
            "longer episodes or lower --chunk", split, 100.0 * padded, len(windows) / episodes, spec.chunk,
        )
    return windows


def padded_fraction(windows: Sequence[ChunkWindow]) -> float:
    """Returns the share of target steps in ``windows`` that lie past their episode's end (0 when empty)."""
    total = sum(window.chunk for window in windows)
    return sum(window.padded for window in windows) / total if total else 0.0


class ChunkSampleBuilder:
    """Turns a :class:`ChunkWindow` into model inputs and the normalised target chunk.

    ``image_settings`` must be the base checkpoint's, as for the token head.
    """

    def __init__(self, tokenizer, statistics: dict[str, Any], spec: OFTSpec, image_settings: ImageSettings,
                 image_aug: bool, statistics_name: str) -> None:
        self.tokenizer = tokenizer
        self.spec = spec
        self.normalizer, self.proprio_bounds = chunk_normalizers(statistics, spec, statistics_name)
        self.transform = ImageTransform(settings=image_settings)
        self.image_aug = image_aug
        self._prompt_cache: dict[str, list[int]] = {}

    def prompt(self, instruction: str) -> list[int]:
        ids = self._prompt_cache.get(instruction)
        if ids is None:
            ids = self._prompt_cache[instruction] = prompt_token_ids(self.tokenizer, instruction)
        return ids

    def pixel_values(self, frame: Frame, rng: np.random.Generator | None) -> torch.Tensor:
        """Returns [C * N, S, S]: the primary image, then the first N-1 wrist images."""
        encoded = [frame.image, *frame.wrist_images[: self.spec.num_images - 1]]
        stacks = []
        for data in encoded:
            image = self.transform.model_image(decode_image(data))
            if self.image_aug and rng is not None:
                image = augment(image, rng)
            stacks.append(self.transform.settings.normalize(image))
        return torch.cat(stacks, dim=0)

    def target(self, window: ChunkWindow) -> np.ndarray:
        """Returns the normalised [K, A] chunk of a window."""
        return self.normalizer.normalize(window.actions)

    def __call__(self, window: ChunkWindow, rng: np.random.Generator | None) -> dict[str, Any]:
        frame = window.first
        sample: dict[str, Any] = {
            "prompt": self.prompt(frame.instruction),
            "pixel_values": self.pixel_values(frame, rng),
            "actions": torch.tensor(self.target(window), dtype=torch.float32),
        }
        if self.spec.proprio_dim:
            sample["proprio"] = torch.tensor(normalize_proprio(frame.state, self.proprio_bounds), dtype=torch.float32)
        return sample


@dataclass
class ChunkBatch:
    """One OFT batch on a device."""

    inputs: ChunkInputs
    pixel_values: torch.Tensor
    actions: torch.Tensor
    proprio: torch.Tensor | None

    def to(self, device: torch.device) -> ChunkBatch:
        return ChunkBatch(self.inputs.to(device), self.pixel_values.to(device), self.actions.to(device),
                          None if self.proprio is None else self.proprio.to(device))


def collate_chunks(samples: Sequence[dict[str, Any]], spec: OFTSpec, pad_token_id: int) -> ChunkBatch:
    """Returns the right-padded batch of ``samples`` (the same layout the policy builds)."""
    proprio = torch.stack([s["proprio"] for s in samples]) if spec.proprio_dim else None
    return ChunkBatch(
        inputs=build_chunk_inputs([s["prompt"] for s in samples], spec, pad_token_id),
        pixel_values=torch.stack([s["pixel_values"] for s in samples]),
        actions=torch.stack([s["actions"] for s in samples]),
        proprio=proprio,
    )


@dataclass
class ChunkMetrics:
    """Sums over a set of batches: the L1 loss, and L1 per chunk step in normalised and physical units."""

    loss_sum: float = 0.0
    batches: int = 0
    errors_normalized: list[np.ndarray] = field(default_factory=list)
    errors_physical: list[np.ndarray] = field(default_factory=list)

    def add(self, predicted: torch.Tensor, target: torch.Tensor, loss: float, samples: ChunkSampleBuilder) -> None:
        predicted_np = predicted.detach().float().cpu().numpy().astype(np.float64)
        target_np = target.detach().float().cpu().numpy().astype(np.float64)
        self.loss_sum += loss
        self.batches += 1
        self.errors_normalized.append(np.abs(predicted_np - target_np))
        unnorm = samples.normalizer.unnormalize
        self.errors_physical.append(np.abs(unnorm(predicted_np) - unnorm(target_np)))

    def summary(self) -> dict[str, float]:
        if not self.batches:
            return {"loss": float("nan"), "l1_normalized": float("nan"), "l1_physical": float("nan"),
                    "l1_first_step": float("nan"), "l1_last_step": float("nan")}
        normalized = np.concatenate(self.errors_normalized)  # [N, K, A]
        physical = np.concatenate(self.errors_physical)
        return {
            "loss": self.loss_sum / self.batches,
            "l1_normalized": float(normalized.mean()),
            "l1_physical": float(physical.mean()),
            "l1_first_step": float(normalized[:, 0].mean()),
            "l1_last_step": float(normalized[:, -1].mean()),
        }
