"""The OFT policy: images + instruction (+ proprio) -> a chunk of K physical actions in one forward pass.

    policy = load_policy_auto("moojink/openvla-7b-oft-finetuned-libero-spatial", quantization="4bit")
    chunk = policy.predict_chunk(rgb, "put the bowl on the plate", wrist_images=[wrist], proprio=state)

With an energy model beside the head (``energy_model.safetensors``) and ``energy_steps > 0`` the chunk is
refined down the energy gradient in normalised space before it is un-normalised
(:func:`~openvla_ros.model.energy.refine_chunk`); ``last_prediction`` then holds the uncorrected chunk
and the energy before and after.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from openvla_ros.errors import CheckpointError, ImageError, OpenVLAError
from openvla_ros.model.action_codec import ActionNormalizer, select_unnorm_key
from openvla_ros.model.energy import EnergyModel, RefinementSettings, energy_context_mask, refine_chunk
from openvla_ros.model.loading import load_tokenizer, read_config, read_image_settings, resolve_checkpoint_dir
from openvla_ros.model.oft import OFTSpec, OpenVLAOFT, build_chunk_inputs
from openvla_ros.model.oft_loading import ENERGY_NAME, is_oft_checkpoint, load_energy_model, load_oft_model
from openvla_ros.model.policy import OpenVLAPolicy, default_unnorm_key, trained_with_image_aug
from openvla_ros.model.processor import ImageTransform, prompt_token_ids, upload

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


@dataclass(frozen=True)
class ChunkPrediction:
    """One predicted chunk with what energy refinement did to it.

    Attributes:
        chunk: the physical chunk float64[K, A] that is returned (corrected when refinement ran).
        uncorrected: the L1 head's chunk, physical float64[K, A].
        energy_before: energy of the head's chunk; None without refinement.
        energy_after: energy of the returned chunk; None without refinement.
        problem: why the correction was abandoned (the uncorrected chunk is returned), else None.
    """

    chunk: np.ndarray
    uncorrected: np.ndarray
    energy_before: float | None = None
    energy_after: float | None = None
    problem: str | None = None


def energy_settings_problem(settings: RefinementSettings, energy_model: EnergyModel | None,
                            checkpoint_dir: Path | None) -> str | None:
    """Returns why ``settings`` cannot run on a policy with ``energy_model``, or None."""
    if settings.steps and energy_model is None:
        where = f" in {checkpoint_dir}" if checkpoint_dir is not None else ""
        return (
            f"energy_steps {settings.steps} needs an energy model ({ENERGY_NAME}{where}), and this OFT model has "
            "none: train one with training/train_energy.py or set energy_steps 0"
        )
    return None


class OFTPolicy:
    """A loaded OpenVLA-OFT model with its tokenizer, image transform and normalisers (and energy model)."""

    is_chunked = True

    def __init__(self, model: OpenVLAOFT, tokenizer, *, unnorm_key: str | None = None, center_crop: bool = False,
                 rotate_180: bool = False, image_settings=None, checkpoint_dir: Path | None = None,
                 energy_model: EnergyModel | None = None, energy: RefinementSettings | None = None) -> None:
        """Raises:
            CheckpointError: ``energy`` asks for steps and there is no ``energy_model``.
        """
        self.model = model
        self.energy_model = energy_model
        self.energy = energy or RefinementSettings()
        problem = energy_settings_problem(self.energy, energy_model, checkpoint_dir)
        if problem:
            raise CheckpointError(problem)
        self.last_prediction: ChunkPrediction | None = None
        # A caller that reports fallbacks itself (the node) turns the policy's own warning off.
        self.log_energy_fallback = True
        self._energy_warned = False
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
                        rotate_180: bool = False, adapter: str | None = None, energy_steps: int = 0,
                        energy_step_size: float = 0.5, energy_max_step_fraction: float = 0.2,
                        **_: Any) -> OFTPolicy:
        """Loads an OFT checkpoint directory (official or our layout) or hub id, with its energy model if any.

        ``energy_steps`` (0 = off), ``energy_step_size`` and ``energy_max_step_fraction`` set the energy
        refinement (see :class:`~openvla_ros.model.energy.RefinementSettings`).

        Raises:
            CheckpointError: also for ``adapter`` (OFT fine-tuning writes its heads beside a merged model),
                for energy steps without an energy file and for an energy file that does not fit.
            ValueError: for energy settings out of range.
        """
        energy = RefinementSettings(int(energy_steps), float(energy_step_size), float(energy_max_step_fraction))
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
        energy_model = load_energy_model(checkpoint_dir, network.spec, config.text_config.hidden_size, network.device)
        problem = energy_settings_problem(energy, energy_model, checkpoint_dir)
        if problem:
            raise CheckpointError(problem)
        return cls(network, load_tokenizer(checkpoint_dir), unnorm_key=unnorm_key, center_crop=center_crop,
                   rotate_180=rotate_180, image_settings=read_image_settings(checkpoint_dir, config),
                   checkpoint_dir=checkpoint_dir, energy_model=energy_model, energy=energy)

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

    def configure_energy(self, steps: int, step_size: float, max_step_fraction: float) -> None:
        """Changes the energy refinement (takes effect at the next chunk).

        Raises:
            ValueError: settings out of range, or steps without an energy model (the settings stay as they were).
        """
        settings = RefinementSettings(int(steps), float(step_size), float(max_step_fraction))
        problem = energy_settings_problem(settings, self.energy_model, self.checkpoint_dir)
        if problem:
            raise ValueError(problem)
        self.energy = settings

    def _model_inputs(self, image: np.ndarray, instruction: str, wrist_images: Sequence[np.ndarray],
                      proprio: Any) -> tuple[Any, torch.Tensor, torch.Tensor | None]:
        """Returns (token inputs, pixel values, normalised proprio) of one observation, on the model's device."""
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
        pixels = upload(torch.cat([self.image_transform.pixel_values(i) for i in images], dim=0)[None],
                        self.model.device)
        inputs = build_chunk_inputs([prompt_token_ids(self.tokenizer, instruction)], self.spec,
                                    self.config.text_config.pad_token_id or 32000).to(self.model.device)
        proprio_tensor = None
        if self.spec.proprio_dim:
            proprio_tensor = torch.tensor(self.normalize_proprio(proprio), dtype=torch.float32,
                                          device=self.model.device)[None]
        return inputs, pixels, proprio_tensor

    def normalized_chunks(self, observations: Sequence[tuple[np.ndarray, str, Sequence[np.ndarray], np.ndarray | None]]
                          ) -> np.ndarray:
        """Returns the head's normalised chunks float32[B, K, A] of several observations in one forward pass.

        Each observation is (image, instruction, wrist images, *normalised* proprio or None); the prompts are
        right-padded and masked, so each row equals the observation run alone (within float rounding).
        """
        pixels, prompts, proprios = [], [], []
        for image, instruction, wrist_images, proprio in observations:
            images = [image, *wrist_images]
            if len(images) != self.spec.num_images:
                raise ImageError(f"this model takes {self.spec.num_images} image(s); got {len(images)}")
            pixels.append(torch.cat([self.image_transform.pixel_values(i) for i in images], dim=0))
            prompts.append(prompt_token_ids(self.tokenizer, instruction))
            proprios.append(proprio)
        device = self.model.device
        inputs = build_chunk_inputs(prompts, self.spec, self.config.text_config.pad_token_id or 32000).to(device)
        proprio_tensor = None
        if self.spec.proprio_dim:
            proprio_tensor = torch.tensor(np.stack(proprios), dtype=torch.float32, device=device)
        with torch.inference_mode():
            chunks = self.model(inputs, upload(torch.stack(pixels), device), proprio_tensor)
        return chunks.cpu().numpy()

    def observe(self, image: np.ndarray, instruction: str, wrist_images: Sequence[np.ndarray], proprio: Any,
                 with_context: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Returns (the head's normalised chunk [1, K, A], context hidden states [1, S, D], visible mask [1, S]).

        The context and mask (the energy model's inputs) are None unless ``with_context``.
        """
        with torch.inference_mode():
            inputs, pixels, proprio_tensor = self._model_inputs(image, instruction, wrist_images, proprio)
            hidden, key_mask, num_prefix = self.model.sequence_hidden_states(inputs, pixels, proprio_tensor)
            normalized = self.model.head_chunk(self.model.read_action_states(hidden, inputs, num_prefix))
            if not with_context:
                return normalized, None, None
            return normalized, hidden, energy_context_mask(key_mask, inputs.prompt_lengths, num_prefix)

    def _physical(self, normalized: np.ndarray) -> np.ndarray:
        return np.stack([self.normalizer.unnormalize(step) for step in normalized])

    def predict(self, image: np.ndarray, instruction: str, wrist_images: Sequence[np.ndarray] = (),
                proprio: Any = None) -> ChunkPrediction:
        """Returns the chunk with what energy refinement did (also kept as ``last_prediction``).

        A non-finite energy or gradient returns the uncorrected chunk (``problem`` says why; logged once).

        Raises:
            ImageError, InstructionError, ProprioError: for bad inputs; OpenVLAError for a non-finite chunk.
        """
        energy = self.energy
        refine = energy.steps > 0 and self.energy_model is not None
        normalized, context, visible = self.observe(image, instruction, wrist_images, proprio, refine)
        uncorrected = self._physical(normalized[0].cpu().numpy().astype(np.float64))
        if not np.all(np.isfinite(uncorrected)):
            raise OpenVLAError(f"the predicted chunk is not finite: {uncorrected.tolist()}")
        if not refine:
            self.last_prediction = ChunkPrediction(uncorrected, uncorrected)
            return self.last_prediction
        result = refine_chunk(self.energy_model, context, visible, normalized, energy)
        chunk = uncorrected
        if result.problem is None:
            chunk = self._physical(result.chunk[0].cpu().numpy().astype(np.float64))
        elif self.log_energy_fallback and not self._energy_warned:
            self._energy_warned = True
            logger.warning("energy refinement skipped, the uncorrected chunk is used: %s (said once)", result.problem)
        self.last_prediction = ChunkPrediction(chunk, uncorrected, float(result.energy_before[0]),
                                               float(result.energy_after[0]), result.problem)
        return self.last_prediction

    def predict_chunk(self, image: np.ndarray, instruction: str, wrist_images: Sequence[np.ndarray] = (),
                      proprio: Any = None) -> np.ndarray:
        """Returns the physical chunk float64[K, A] (energy-refined when ``energy.steps > 0``).

        Raises:
            ImageError, InstructionError, ProprioError: for bad inputs.
        """
        return self.predict(image, instruction, wrist_images, proprio).chunk

    def candidate_energies(self, image: np.ndarray, instruction: str, candidates: np.ndarray,
                           wrist_images: Sequence[np.ndarray] = (), proprio: Any = None) -> np.ndarray:
        """Returns float64[N]: the energy of each physical chunk ``candidates`` [N, K, A] under one observation.

        Raises:
            CheckpointError: the policy has no energy model.
        """
        if self.energy_model is None:
            raise CheckpointError(f"this OFT model has no energy model ({ENERGY_NAME})")
        _, context, visible = self.observe(image, instruction, wrist_images, proprio, True)
        candidates = np.asarray(candidates, dtype=np.float64)
        normalized = torch.tensor(self.normalizer.normalize(candidates), dtype=torch.float32,
                                  device=self.model.device)
        with torch.no_grad():
            self.energy_model.eval()
            encoded = self.energy_model.encode_context(context.clone())
            count = normalized.shape[0]
            energies = self.energy_model.energy_of_encoded(encoded.expand(count, -1, -1),
                                                           visible.expand(count, -1), normalized)
        return energies.cpu().numpy().astype(np.float64)

    def predict_action(self, image: np.ndarray, instruction: str, **inputs: Any) -> np.ndarray:
        """Returns the chunk's first action float64[A]."""
        return self.predict_chunk(image, instruction, **inputs)[0]

    def release(self) -> None:
        self.model = None  # type: ignore[assignment]
        self.energy_model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def load_policy_auto(model: str, **kwargs: Any) -> OpenVLAPolicy | OFTPolicy:
    """Returns an :class:`OFTPolicy` for an OFT checkpoint, else an :class:`OpenVLAPolicy`.

    Keyword arguments are those of :meth:`OpenVLAPolicy.from_pretrained`, plus the energy settings of
    :meth:`OFTPolicy.from_pretrained` (refused for a token model unless ``energy_steps`` is 0).
    """
    checkpoint_dir = resolve_checkpoint_dir(model)
    if is_oft_checkpoint(checkpoint_dir, read_config(checkpoint_dir)):
        return OFTPolicy.from_pretrained(str(checkpoint_dir), **kwargs)
    energy = {name: kwargs.pop(name) for name in ("energy_steps", "energy_step_size", "energy_max_step_fraction")
              if name in kwargs}
    if energy.get("energy_steps"):
        raise CheckpointError(
            f"energy_steps {energy['energy_steps']} refines OpenVLA-OFT chunks; {checkpoint_dir} is a token-by-token "
            "OpenVLA model: set energy_steps 0"
        )
    return OpenVLAPolicy.from_pretrained(model, **kwargs)
