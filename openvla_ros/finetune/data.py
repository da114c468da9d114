"""RLDS episodes -> training batches, through the core's image transform, prompt and action codec.

One training sequence per frame, exactly as OpenVLA was trained::

    [BOS] In: What action should the robot take to {instruction}?\\nOut:[29871] a1 .. a7 </s>

with labels -100 everywhere except the 7 action tokens and EOS. Actions are normalised with the
dataset's statistics (BOUNDS_Q99) and tokenised by the shared :class:`ActionTokenizer`.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from openvla_ros.errors import DatasetError
from openvla_ros.model.action_codec import ACTION_DIM, ActionNormalizer, ActionTokenizer
from openvla_ros.model.modeling_openvla import IGNORE_INDEX
from openvla_ros.model.processor import ImageSettings, ImageTransform, crop_and_resize, prompt_token_ids

EOS_TOKEN_ID = 2
CROP_AREA = 0.9
STATISTICS_NAME = "dataset_statistics.json"


@dataclass(frozen=True)
class Frame:
    """One recorded step: encoded images, physical action, instruction and (when recorded) robot state.

    Attributes:
        wrist_images: the encoded images of every ``observation`` key containing "wrist", in the
            dataset's key order (the order OFT feeds them after the primary image).
        state: ``observation/state`` as float64, or None when the dataset has no state.
    """

    episode: int
    step: int
    image: bytes
    action: np.ndarray
    instruction: str
    wrist_images: tuple[bytes, ...] = ()
    state: np.ndarray | None = None


def open_rlds(data_dir: str | Path, name: str):
    """Returns the tfds builder of ``DATA_DIR/NAME`` after checking the OpenVLA step layout.

    Raises:
        DatasetError: when the dataset does not exist or lacks steps/observation/image, a 7-D action
            or language_instruction.
    """
    import tensorflow_datasets as tfds

    root = Path(data_dir) / name
    if not root.is_dir():
        raise DatasetError(
            f"no dataset {name!r} in {data_dir} (expected {root}/<version>/); convert recordings with "
            "training/bag_to_rlds.py or pass the right --data-dir/--dataset-name"
        )
    try:
        builder = tfds.builder(name, data_dir=str(data_dir))
    except Exception as exc:  # tfds raises many types for unreadable folders
        raise DatasetError(f"cannot open the RLDS dataset {root}: {exc}") from exc
    features = builder.info.features
    try:
        steps = features["steps"]
        image = steps["observation"]["image"]
        action = steps["action"]
        steps["language_instruction"]
    except (KeyError, TypeError) as exc:
        raise DatasetError(
            f"{root} does not have the RLDS step layout OpenVLA needs (steps/observation/image, steps/action, "
            f"steps/language_instruction): missing {exc}"
        ) from exc
    if tuple(action.shape) != (ACTION_DIM,):
        raise DatasetError(f"{root}: steps/action has shape {tuple(action.shape)}, expected ({ACTION_DIM},)")
    if len(image.shape) != 3 or image.shape[-1] != 3:
        raise DatasetError(f"{root}: steps/observation/image has shape {image.shape}, expected (H, W, 3)")
    return builder


def load_statistics(builder, name: str) -> dict[str, Any]:
    """Returns the dataset's statistics entry (``{"action": {...}, ...}``) for ``name``.

    Looked for as ``dataset_statistics.json`` in the version directory, then in its parents.

    Raises:
        DatasetError: when no statistics file exists or it has no entry for ``name``.
    """
    version_dir = Path(builder.data_dir)
    candidates = [version_dir / STATISTICS_NAME, version_dir.parent / STATISTICS_NAME,
                  version_dir.parent.parent / STATISTICS_NAME]
    for path in candidates:
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise DatasetError(f"{path} is not valid JSON: {exc}") from exc
            entry = data.get(name, data if "action" in data else None)
            if not isinstance(entry, dict) or "action" not in entry:
                raise DatasetError(f"{path} has no action statistics for {name!r}; keys: {sorted(data)}")
            return entry
    raise DatasetError(
        f"no {STATISTICS_NAME} for dataset {name!r} (looked in {', '.join(str(c.parent) for c in candidates)}); "
        "re-run training/bag_to_rlds.py, which writes it"
    )


def load_frames(builder, split: str) -> list[Frame]:
    """Returns every step of ``split`` with its image still JPEG/PNG-encoded (decoded per sample).

    Raises:
        DatasetError: when the split does not exist or is empty.
    """
    import tensorflow_datasets as tfds

    if split not in builder.info.splits:
        raise DatasetError(
            f"dataset {builder.name} has no {split!r} split (splits: {', '.join(builder.info.splits)})"
        )
    observation = builder.info.features["steps"]["observation"]
    keys = list(observation.keys())
    wrist_keys = wrist_image_keys(keys)
    has_state = "state" in keys
    decoders = {"steps": {"observation": {k: tfds.decode.SkipDecoding() for k in ("image", *wrist_keys)}}}
    dataset = builder.as_dataset(split=split, decoders=decoders, shuffle_files=False)
    frames: list[Frame] = []
    for episode_index, episode in enumerate(dataset):
        for step_index, step in enumerate(episode["steps"]):
            instruction = step["language_instruction"].numpy().decode("utf-8")
            obs = step["observation"]
            frames.append(Frame(
                episode=episode_index,
                step=step_index,
                image=obs["image"].numpy(),
                action=step["action"].numpy().astype(np.float64),
                instruction=instruction,
                wrist_images=tuple(obs[k].numpy() for k in wrist_keys),
                state=obs["state"].numpy().astype(np.float64) if has_state else None,
            ))
    if not frames:
        raise DatasetError(f"split {split!r} of dataset {builder.name} has no steps")
    return frames


def wrist_image_keys(observation_keys: Sequence[str]) -> list[str]:
    """Returns the observation keys holding wrist cameras, in order (every key containing "wrist")."""
    return [key for key in observation_keys if "wrist" in key]


def decode_image(data: bytes) -> np.ndarray:
    """Returns an encoded image as uint8 HxWx3 RGB."""
    with Image.open(io.BytesIO(data)) as image:
        return np.array(image.convert("RGB"))


def augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Returns a random 90%-area square crop resized back, with mild brightness/contrast/saturation jitter.

    The crop matches the centre crop used at inference (same area, same resampling).
    """
    side = float(np.sqrt(CROP_AREA))
    top, left = rng.uniform(0.0, 1.0 - side, size=2)
    cropped = crop_and_resize(image, (top, left, top + side, left + side)).astype(np.float32) / 255.0
    cropped = cropped + rng.uniform(-0.2, 0.2)
    mean = cropped.mean()
    cropped = (cropped - mean) * rng.uniform(0.8, 1.2) + mean
    grey = cropped.mean(axis=2, keepdims=True)
    cropped = (cropped - grey) * rng.uniform(0.8, 1.2) + grey
    return np.clip(np.rint(cropped * 255.0), 0, 255).astype(np.uint8)


class SampleBuilder:
    """Turns a :class:`Frame` into model inputs and labels (shared by training and validation).

    ``image_settings`` must be the base checkpoint's (``loading.read_image_settings``): the same resize
    and normalisation constants the policy applies at inference.
    """

    def __init__(self, tokenizer, statistics: dict[str, Any], image_settings: ImageSettings, image_aug: bool) -> None:
        self.tokenizer = tokenizer
        self.normalizer = ActionNormalizer.from_stats(statistics["action"])
        self.action_tokenizer = ActionTokenizer(vocab_size=min(32000, len(tokenizer)))
        self.transform = ImageTransform(settings=image_settings)
        self.image_aug = image_aug
        self._prompt_cache: dict[str, list[int]] = {}

    def action_ids(self, action: np.ndarray) -> np.ndarray:
        """Returns the 7 token ids of a physical action."""
        return self.action_tokenizer.encode(self.normalizer.normalize(action))

    def __call__(self, frame: Frame, rng: np.random.Generator | None) -> dict[str, torch.Tensor]:
        image = self.transform.model_image(decode_image(frame.image))
        if self.image_aug and rng is not None:
            image = augment(image, rng)
        prompt = self._prompt_cache.get(frame.instruction)
        if prompt is None:
            prompt = prompt_token_ids(self.tokenizer, frame.instruction)
            self._prompt_cache[frame.instruction] = prompt
        targets = [*self.action_ids(frame.action).tolist(), EOS_TOKEN_ID]
        input_ids = torch.tensor(prompt + targets, dtype=torch.long)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[-len(targets):] = input_ids[-len(targets):]
        return {"input_ids": input_ids, "labels": labels, "pixel_values": self.transform.settings.normalize(image)}


def collate(samples: Sequence[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Returns a right-padded batch with attention mask; padded labels are ignored."""
    length = max(s["input_ids"].shape[0] for s in samples)
    batch = len(samples)
    input_ids = torch.full((batch, length), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    for row, sample in enumerate(samples):
        size = sample["input_ids"].shape[0]
        input_ids[row, :size] = sample["input_ids"]
        labels[row, :size] = sample["labels"]
        attention_mask[row, :size] = 1
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
    }


def epoch_order(num_frames: int, seed: int, epoch: int) -> np.ndarray:
    """Returns the frame order of an epoch: a permutation fixed by (seed, epoch), so runs resume exactly."""
    return np.random.default_rng([seed, epoch]).permutation(num_frames)


def sample_rng(seed: int, sample_number: int) -> np.random.Generator:
    """Returns the augmentation RNG of the n-th sample drawn in a run (independent of restarts)."""
    return np.random.default_rng([seed, 1_000_003, sample_number])
