"""The OFT policy: images + instruction (+ proprio) -> a chunk of K physical actions in one forward pass.

    policy = load_policy_auto("moojink/openvla-7b-oft-finetuned-libero-spatial", quantization="4bit")
    chunk = policy.predict_chunk(rgb, "put the bowl on the plate", wrist_images=[wrist], proprio=state)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from openvla_ros.errors import CheckpointError, ImageError, OpenVLAError
from openvla_ros.model.action_codec import ActionNormalizer, select_unnorm_key
from openvla_ros.model.loading import load_tokenizer, read_config, read_image_settings, resolve_checkpoint_dir
from openvla_ros.model.oft import OFTSpec, OpenVLAOFT, build_chunk_inputs
from openvla_ros.model.oft_loading import is_oft_checkpoint, load_oft_model
from openvla_ros.model.policy import OpenVLAPolicy, default_unnorm_key, trained_with_image_aug
from openvla_ros.model.processor import ImageTransform, prompt_token_ids

logger = logging.getLogger(__name__)


class ProprioError(OpenVLAError):
    """A proprio vector of the wrong length, or not finite."""


def _bounds(stats: dict[str, Any], normalization: str, what: str) -> tuple[np.ndarray, np.ndarray]:
    low_key, high_key = ("q01", "q99") if normalization == "bounds_q99" else ("min", "max")
    try:
        return np.asarray(stats[low_key], dtype=np.float64), np.asarray(stats[high_key], dtype=np.float64)
    except KeyError as exc:
        raise CheckpointError(f"{what} statistics lack {exc.args[0]!r} ({normalization} normalisation)") from exc


def chunk_normalizers(stats: dict[str, Any], spec: OFTSpec, key: str
                      ) -> tuple[ActionNormalizer, tuple[np.ndarray, np.ndarray] | None]:
    """Returns the action normaliser and the proprio bounds of one statistics entry, for ``spec``.

    Training and inference both build them here, so the two cannot normalise differently.

    Raises:
        CheckpointError: statistics missing, malformed, or of another action/proprio width.
    """
    if not isinstance(stats.get("action"), dict):
        raise CheckpointError(f"norm_stats[{key!r}] has no 'action' statistics")
    low, high = _bounds(stats["action"], spec.normalization, "action")
    mask = stats["action"].get("mask", [True] * len(low))
    try:
        normalizer = ActionNormalizer(q01=low, q99=high, mask=np.asarray(mask))
    except ValueError as exc:
        raise CheckpointError(f"norm_stats[{key!r}]['action'] is malformed: {exc}") from exc
    if normalizer.dim != spec.action_dim:
        raise CheckpointError(
            f"norm_stats[{key!r}] describes {normalizer.dim}-D actions; the action head "
            f"outputs {spec.action_dim}-D actions"
        )
    if not spec.proprio_dim:
        return normalizer, None
    if not isinstance(stats.get("proprio"), dict):
        raise CheckpointError(f"the model takes proprio, but norm_stats[{key!r}] has no 'proprio' statistics")
    bounds = _bounds(stats["proprio"], spec.normalization, "proprio")
    if bounds[0].shape != (spec.proprio_dim,) or bounds[1].shape != (spec.proprio_dim,):
        raise CheckpointError(
            f"norm_stats[{key!r}]['proprio'] describes {bounds[0].size} values; the proprio projector takes "
            f"{spec.proprio_dim}"
        )
    return normalizer, bounds


def normalize_proprio(proprio: Any, bounds: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Returns clip(2 (p - low) / (high - low + 1e-8) - 1, -1, 1), as the official inference code.

    Raises:
        ProprioError: wrong length or not finite.
    """
    low, high = bounds
    values = np.asarray(proprio, dtype=np.float64).reshape(-1)
    if values.shape[0] != low.shape[0]:
        raise ProprioError(
            f"proprio has {values.shape[0]} values; this model takes {low.shape[0]} "
            "(the state vector it was trained with)"
        )
    if not np.all(np.isfinite(values)):
        raise ProprioError(f"proprio is not finite: {values.tolist()}; check the state source")
    return np.clip(2.0 * (values - low) / (high - low + 1e-8) - 1.0, -1.0, 1.0)


class OFTPolicy:
    """A loaded OpenVLA-OFT model with its tokenizer, image transform and normalisers."""

    is_chunked = True

    def __init__(self, model: OpenVLAOFT, tokenizer, *, unnorm_key: str | None = None, center_crop: bool = False,
                 rotate_180: bool = False, image_settings=None, checkpoint_dir: Path | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.spec = model.spec
        self.config = model.config
        self.checkpoint_dir = checkpoint_dir
        self.unnorm_key = select_unnorm_key(self.config.norm_stats, unnorm_key or default_unnorm_key(self.config))
        stats = self.config.norm_stats[self.unnorm_key]
        self.normalizer, self.proprio_bounds = chunk_normalizers(stats, self.spec, self.unnorm_key)
        self.image_transform = ImageTransform(image_size=self.config.image_size, center_crop=center_crop,
                                              rotate_180=rotate_180, settings=image_settings)

    @classmethod
    def from_pretrained(cls, model: str, *, quantization: str = "none", dtype: str = "auto", device: str = "auto",
                        unnorm_key: str | None = None, center_crop: bool | None = None,
                        rotate_180: bool = False, adapter: str | None = None, **_: Any) -> OFTPolicy:
        """Loads an OFT checkpoint directory (official or our layout) or hub id.

        Raises:
            CheckpointError: also for ``adapter``: OFT fine-tuning writes its heads beside a merged model.
        """
        if adapter is not None:
            raise CheckpointError(
                f"an OFT model takes no separate adapter ({adapter}): load the run's merged/ directory, which "
                "holds the merged LoRA and the trained heads"
            )
        checkpoint_dir = resolve_checkpoint_dir(model)
        config = read_config(checkpoint_dir)
        select_unnorm_key(config.norm_stats, unnorm_key or default_unnorm_key(config))
        if center_crop is None:
            center_crop = trained_with_image_aug(config)
        network = load_oft_model(checkpoint_dir, dtype=dtype, device=device, quantization=quantization, config=config)
        return cls(network, load_tokenizer(checkpoint_dir), unnorm_key=unnorm_key, center_crop=center_crop,
                   rotate_180=rotate_180, image_settings=read_image_settings(checkpoint_dir, config),
                   checkpoint_dir=checkpoint_dir)

    @property
    def chunk_size(self) -> int:
        return self.spec.chunk

    @property
    def action_dim(self) -> int:
        return self.spec.action_dim

    @property
    def num_images(self) -> int:
        return self.spec.num_images

    @property
    def proprio_dim(self) -> int:
        return self.spec.proprio_dim

    def normalize_proprio(self, proprio: Any) -> np.ndarray:
        """Returns clip(2 (p - low) / (high - low + 1e-8) - 1, -1, 1), as the official inference code.

        Raises:
            ProprioError: wrong length or not finite.
        """
        return normalize_proprio(proprio, self.proprio_bounds)

    @torch.inference_mode()
    def predict_chunk(self, image: np.ndarray, instruction: str, wrist_images: Sequence[np.ndarray] = (),
                      proprio: Any = None) -> np.ndarray:
        """Returns the physical chunk float64[K, A].

        Raises:
            ImageError, InstructionError, ProprioError: for bad inputs.
        """
        images = [image, *wrist_images]
        if len(images) != self.spec.num_images:
            raise ImageError(
                f"this model takes {self.spec.num_images} image(s) (primary first, then wrist cameras); got "
                f"{len(images)}: pass {self.spec.num_images - 1} wrist image(s)"
            )
        if self.spec.proprio_dim and proprio is None:
            raise ProprioError(f"this model needs a proprio vector of {self.spec.proprio_dim} values")
        if not self.spec.proprio_dim and proprio is not None:
            raise ProprioError("this model takes no proprio; leave it out")
        pixels = torch.cat([self.image_transform.pixel_values(i) for i in images], dim=0)[None].to(self.model.device)
        inputs = build_chunk_inputs([prompt_token_ids(self.tokenizer, instruction)], self.spec,
                                    self.config.text_config.pad_token_id or 32000).to(self.model.device)
        proprio_tensor = None
        if self.spec.proprio_dim:
            proprio_tensor = torch.tensor(self.normalize_proprio(proprio), dtype=torch.float32,
                                          device=self.model.device)[None]
        normalized = self.model(inputs, pixels, proprio_tensor)[0].cpu().numpy().astype(np.float64)
        chunk = np.stack([self.normalizer.unnormalize(step) for step in normalized])
        if not np.all(np.isfinite(chunk)):
            raise OpenVLAError(f"the predicted chunk is not finite: {chunk.tolist()}")
        return chunk

    def predict_action(self, image: np.ndarray, instruction: str, **inputs: Any) -> np.ndarray:
        """Returns the chunk's first action float64[A]."""
        return self.predict_chunk(image, instruction, **inputs)[0]

    def release(self) -> None:
        self.model = None  # type: ignore[assignment]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def load_policy_auto(model: str, **kwargs: Any) -> OpenVLAPolicy | OFTPolicy:
    """Returns an :class:`OFTPolicy` for an OFT checkpoint, else an :class:`OpenVLAPolicy`.

    Keyword arguments are those of :meth:`OpenVLAPolicy.from_pretrained`.
    """
    checkpoint_dir = resolve_checkpoint_dir(model)
    if is_oft_checkpoint(checkpoint_dir, read_config(checkpoint_dir)):
        return OFTPolicy.from_pretrained(str(checkpoint_dir), **kwargs)
    return OpenVLAPolicy.from_pretrained(model, **kwargs)
