"""The policy: image + instruction -> 7-DoF physical action, stringing model, processor and codec.

    policy = OpenVLAPolicy.from_pretrained("openvla/openvla-7b", quantization="4bit",
                                           unnorm_key="bridge_orig")
    action = policy.predict_action(rgb_uint8_image, "pick up the red block")  # float64[7]
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from openvla_ros.errors import CheckpointError, InstructionError, OpenVLAError, QuantizationError
from openvla_ros.model.action_codec import ACTION_DIM, ActionNormalizer, ActionTokenizer, select_unnorm_key
from openvla_ros.model.configuration_openvla import OpenVLAConfig
from openvla_ros.model.loading import (
    load_model,
    load_tokenizer,
    read_config,
    read_image_settings,
    resolve_checkpoint_dir,
)
from openvla_ros.model.modeling_openvla import OpenVLAForActionPrediction
from openvla_ros.model.processor import ImageSettings, ImageTransform, prompt_token_ids, upload

logger = logging.getLogger(__name__)

# The action ids are the last 256 of the unpadded Llama vocabulary (32000), whatever the padding.
BASE_VOCAB_SIZE = 32000
EOS_TOKEN_ID = 2
# actions_only: each of the 7 steps chooses among the 256 action ids (never a word, never an early end).
# official: the official generate(): argmax over the whole vocabulary, stopping at EOS; a non-action id
# decodes to an edge bin, and after an early EOS the last 7 ids of prompt + output are read.
DECODINGS = ("actions_only", "official")


class OpenVLAPolicy:
    """A loaded OpenVLA model with its tokenizer, image transform and action codec.

    Build it with :meth:`from_pretrained`; call :meth:`predict_action` per control step.
    """

    def __init__(
        self,
        model: OpenVLAForActionPrediction,
        tokenizer,
        *,
        unnorm_key: str | None = None,
        center_crop: bool = False,
        rotate_180: bool = False,
        checkpoint_dir: Path | None = None,
        image_settings: ImageSettings | None = None,
        decoding: str = "actions_only",
    ) -> None:
        if decoding not in DECODINGS:
            raise ValueError(f"decoding must be one of {', '.join(DECODINGS)}, got {decoding!r}")
        self.model = model
        self.decoding = decoding
        self.tokenizer = tokenizer
        self.config: OpenVLAConfig = model.config
        self.checkpoint_dir = checkpoint_dir
        self.unnorm_key = select_unnorm_key(self.config.norm_stats, unnorm_key or default_unnorm_key(self.config))
        action_stats = self.config.norm_stats[self.unnorm_key].get("action")
        if not isinstance(action_stats, dict):
            raise CheckpointError(f"norm_stats[{self.unnorm_key!r}] has no 'action' statistics")
        try:
            self.normalizer = ActionNormalizer.from_stats(action_stats)
        except ValueError as exc:
            raise CheckpointError(f"norm_stats[{self.unnorm_key!r}]['action'] is malformed: {exc}") from exc
        if self.normalizer.dim != ACTION_DIM:
            raise CheckpointError(
                f"norm_stats[{self.unnorm_key!r}] describes {self.normalizer.dim}-D actions; "
                f"this policy produces {ACTION_DIM}-D end-effector deltas"
            )
        self.action_tokenizer = ActionTokenizer(vocab_size=min(BASE_VOCAB_SIZE, len(tokenizer)))
        self.image_transform = ImageTransform(
            image_size=self.config.image_size,
            center_crop=center_crop,
            rotate_180=rotate_180,
            settings=image_settings,
        )
        self._prompt_cache: tuple[str, torch.Tensor] | None = None

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        *,
        quantization: str = "none",
        dtype: str = "auto",
        device: str = "auto",
        adapter: str | None = None,
        merge_adapter: bool = True,
        unnorm_key: str | None = None,
        center_crop: bool | None = None,
        rotate_180: bool = False,
        decoding: str = "actions_only",
    ) -> OpenVLAPolicy:
        """Loads a checkpoint directory or hub id (safetensors only, no remote code).

        Args:
            model: checkpoint directory or hub id (e.g. ``openvla/openvla-7b``).
            quantization: ``none``, ``8bit`` or ``4bit`` (bitsandbytes; LLM layers only).
            dtype: ``auto`` (bf16 on CUDA, fp32 on CPU), ``bfloat16``, ``float16`` or ``float32``.
            device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
            adapter: optional directory of a peft LoRA adapter trained on this base.
            merge_adapter: merge the adapter into the weights (not possible on a quantised base, where
                it stays a separate branch).
            unnorm_key: which dataset's statistics un-normalise actions (may be None with one key).
            center_crop: take the centre 90%-area crop (models trained with crop augmentation); None
                (the default) turns it on exactly when the checkpoint records that it was fine-tuned
                with image augmentation (``training/finetune.py --image-aug``), and logs it.
            rotate_180: rotate camera images by 180 degrees first.
            decoding: ``actions_only`` (choose among the 256 action ids; the default) or ``official``
                (argmax over the whole vocabulary, as the official code: reproduces its outputs exactly).

        The image resize and normalisation settings come from the checkpoint's
        ``preprocessor_config.json`` (textbook values when it has none), as the official processor.

        Raises:
            CheckpointError, QuantizationError, UnnormKeyError: with the problem and the way out.
            ValueError: for an unknown ``decoding``.
        """
        if decoding not in DECODINGS:
            raise ValueError(f"decoding must be one of {', '.join(DECODINGS)}, got {decoding!r}")
        checkpoint_dir = resolve_checkpoint_dir(model)
        config = read_config(checkpoint_dir)
        from openvla_ros.model.oft_loading import is_oft_checkpoint

        if is_oft_checkpoint(checkpoint_dir, config):
            raise CheckpointError(
                f"{checkpoint_dir} is an OpenVLA-OFT checkpoint (an action-chunk head, not action tokens); load "
                "it with openvla_ros.model.oft_policy.load_policy_auto (or OFTPolicy.from_pretrained)"
            )
        select_unnorm_key(config.norm_stats, unnorm_key or default_unnorm_key(config))  # fail before the weight load
        image_settings = read_image_settings(checkpoint_dir, config)
        if center_crop is None:
            center_crop = trained_with_image_aug(config)
            if center_crop:
                logger.info(
                    "center_crop on: %s was fine-tuned with image augmentation (random 90%%-area crops); "
                    "pass center_crop=False to turn it off",
                    model,
                )
        tokenizer = load_tokenizer(checkpoint_dir)
        network = load_model(checkpoint_dir, dtype=dtype, device=device, quantization=quantization, config=config)
        if adapter:
            network = attach_adapter(network, Path(adapter), merge=merge_adapter and quantization == "none")
        return cls(
            network,
            tokenizer,
            unnorm_key=unnorm_key,
            center_crop=center_crop,
            rotate_180=rotate_180,
            checkpoint_dir=checkpoint_dir,
            image_settings=image_settings,
            decoding=decoding,
        )

    @property
    def device(self) -> torch.device:
        return self.model.device

    def prompt_ids(self, instruction: str) -> torch.Tensor:
        """Returns the [1, T] prompt ids of an instruction (the last one is cached).

        Raises:
            InstructionError: when the instruction is empty or too long.
        """
        if self._prompt_cache is not None and self._prompt_cache[0] == instruction:
            return self._prompt_cache[1]
        ids = torch.tensor([prompt_token_ids(self.tokenizer, instruction)], dtype=torch.long, device=self.device)
        max_length = self.config.text_config.max_position_embeddings
        num_patches = (self.config.image_size // 14) ** 2
        if ids.shape[1] + num_patches + ACTION_DIM > max_length:
            raise InstructionError(
                f"instruction takes {ids.shape[1]} tokens; with {num_patches} image patches and "
                f"{ACTION_DIM} actions it exceeds the model's context of {max_length}; shorten it"
            )
        self._prompt_cache = (instruction, ids)
        return ids

    def prepare_inputs(self, image: np.ndarray, instruction: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(input_ids [1, T], pixel_values [1, 6, S, S])`` on the model's device.

        Raises:
            ImageError, InstructionError: for bad inputs.
        """
        pixel_values = upload(self.image_transform.pixel_values(image)[None], self.device)
        return self.prompt_ids(instruction), pixel_values

    def predict_action_ids(self, image: np.ndarray, instruction: str) -> np.ndarray:
        """Returns the 7 greedily decoded token ids (int64) that :meth:`predict_action` decodes.

        With ``decoding="official"`` these may include non-action ids (decoded to an edge bin) and,
        after an early EOS, the prompt's last ids, exactly as the official ``predict_action`` reads them.

        Raises:
            ImageError, InstructionError: for bad inputs.
        """
        input_ids, pixel_values = self.prepare_inputs(image, instruction)
        official = self.decoding == "official"
        ids = self.model.generate_action_ids(
            input_ids,
            pixel_values,
            self.action_tokenizer.first_action_id,
            self.action_tokenizer.last_action_id,
            num_tokens=ACTION_DIM,
            restrict_to_actions=not official,
            eos_token_id=EOS_TOKEN_ID if official else None,
        )
        if ids.shape[1] < ACTION_DIM:  # official decoding ended early at EOS
            ids = torch.cat([input_ids, ids], dim=1)[:, -ACTION_DIM:]
        return ids[0].cpu().numpy()

    def predict_action_ids_batch(self, images: Sequence[np.ndarray], instructions: Sequence[str]) -> np.ndarray:
        """Returns the action ids int64[B, 7] of several (image, instruction) pairs decoded together.

        Each row equals :meth:`predict_action_ids` of its pair alone (``actions_only`` decoding).

        Raises:
            ImageError, InstructionError: for bad inputs.
        """
        prompts = [self.prompt_ids(instruction)[0] for instruction in instructions]
        pixels = upload(torch.stack([self.image_transform.pixel_values(image) for image in images]), self.device)
        ids = self.model.generate_action_ids_batch(prompts, pixels, self.action_tokenizer.first_action_id,
                                                   self.action_tokenizer.last_action_id, num_tokens=ACTION_DIM)
        return ids.cpu().numpy()

    def predict_action(self, image: np.ndarray, instruction: str) -> np.ndarray:
        """Returns the physical action float64[7] = [dx, dy, dz, droll, dpitch, dyaw, gripper].

        Raises:
            ImageError: when ``image`` is not a uint8 HxWx3 RGB array.
            InstructionError: when the instruction is empty or too long.
        """
        ids = self.predict_action_ids(image, instruction)
        action = self.normalizer.unnormalize(self.action_tokenizer.decode(ids))
        if not np.all(np.isfinite(action)):
            raise OpenVLAError(f"decoded action is not finite: {action}; check the checkpoint's norm_stats")
        return action.astype(np.float64)

    def release(self) -> None:
        """Drops the model and frees accelerator memory; the policy is unusable afterwards."""
        self.model = None  # type: ignore[assignment]
        self._prompt_cache = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def default_unnorm_key(config: OpenVLAConfig) -> str | None:
    """Returns the dataset a fine-tuned checkpoint was adapted to (recorded by finetune), else None.

    A model fine-tuned by ``training/finetune.py`` keeps the base model's statistics beside its own;
    without an explicit ``unnorm_key`` it un-normalises with its own dataset's.
    """
    trained_on = (config.extra.get("openvla_ros") or {}).get("dataset_name")
    return trained_on if trained_on in config.norm_stats else None


def trained_with_image_aug(config: OpenVLAConfig) -> bool:
    """Returns True when ``training/finetune.py --image-aug`` produced this checkpoint (recorded in its config)."""
    return bool((config.extra.get("openvla_ros") or {}).get("trained_with_image_aug"))


def attach_adapter(model: OpenVLAForActionPrediction, adapter_dir: Path, merge: bool) -> OpenVLAForActionPrediction:
    """Returns ``model`` with a peft LoRA adapter applied (merged into the weights when ``merge``).

    Raises:
        CheckpointError: when the adapter directory is missing or does not fit the model.
        QuantizationError: when peft is not installed.
    """
    try:
        from peft import PeftModel
    except ImportError as exc:
        raise QuantizationError(f"loading an adapter needs peft ({exc}); pip install peft") from exc
    if not (adapter_dir / "adapter_config.json").is_file():
        raise CheckpointError(
            f"{adapter_dir} is not a LoRA adapter directory (no adapter_config.json); pass the "
            "`adapter/` folder written by training/finetune.py"
        )
    try:
        wrapped = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except Exception as exc:  # peft raises several types for a mismatching adapter
        raise CheckpointError(f"adapter {adapter_dir} does not fit this model: {exc}") from exc
    if merge:
        return wrapped.merge_and_unload()
    return wrapped.base_model.model
