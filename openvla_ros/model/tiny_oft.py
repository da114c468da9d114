"""Tiny OpenVLA-OFT checkpoints, built offline, in the official OFT layout (or ours).

    python -m openvla_ros.tiny OUT_DIR --oft [--chunk K] [--proprio-dim N] [--images N] [--film]

The official layout is what the OFT training code writes after merging its LoRA: the merged VLA in
safetensors, ``config.json``, ``dataset_statistics.json`` (action and proprio statistics),
``action_head--100_checkpoint.pt`` (bf16, DDP ``module.`` prefix), ``proprio_projector--100_checkpoint.pt``
(fp32, ``module.``) and, with FiLM, ``vision_backbone--100_checkpoint.pt``: the whole FiLM-wrapped vision
backbone with LoRA sublayers (``base_layer``, ``lora_A.default``, ``lora_B.default``) on the ViT blocks'
linear layers, whose merged value equals the weights in the safetensors. ``config.json`` states
``num_actions_chunk`` and ``num_images_in_input``, which no weight shape carries.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from openvla_ros.errors import CheckpointError
from openvla_ros.model.loading import (
    internal_to_official_key,
    move_into_place,
    save_checkpoint,
    scratch_beside,
)
from openvla_ros.model.oft import OFTSpec, OpenVLAOFT
from openvla_ros.model.oft_loading import save_oft_checkpoint
from openvla_ros.model.tiny import TINY_UNNORM_KEY, _tiny_model, make_tiny_tokenizer

STEP = 100
FILM_LORA_RANK = 4
FILM_LORA_LAYERS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def tiny_proprio_stats(proprio_dim: int) -> dict[str, list[float]]:
    """Returns OpenVLA-format proprio statistics for a tiny model: joint-like ranges of +-1.5."""
    q01 = np.full(proprio_dim, -1.5)
    q99 = np.full(proprio_dim, 1.5)
    return {
        "mean": np.zeros(proprio_dim).tolist(), "std": np.full(proprio_dim, 0.75).tolist(),
        "max": (q99 * 1.1).tolist(), "min": (q01 * 1.1).tolist(), "q01": q01.tolist(), "q99": q99.tolist(),
    }


def _redraw_heads(model: OpenVLAOFT, generator: torch.Generator) -> None:
    """Non-trivial norms and biases in the heads and FiLM, so that every input visibly matters."""
    with torch.no_grad():
        for module in (model.action_head, model.proprio_projector, model.film):
            if module is None:
                continue
            for name, parameter in module.named_parameters():
                if name.endswith(".bias"):
                    parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
                elif parameter.ndim == 1:
                    parameter.copy_(1.0 + 0.3 * torch.randn(parameter.shape, generator=generator))
                else:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) / parameter.shape[1] ** 0.5)
        if model.film is not None:  # keep FiLM's modulation moderate: 1 + scale stays near 1
            for towers in (model.film.featurizer, model.film.fused_featurizer):
                for layer in towers or ():
                    layer.scale.weight.mul_(0.3)
                    layer.shift.weight.mul_(0.3)


def tiny_oft_model(seed: int = 0, size: str = "tiny", chunk: int = 8, proprio_dim: int = 0,
                   num_images: int = 1, film: bool = False) -> OpenVLAOFT:
    """Returns the randomly initialised tiny OFT model (deterministic for a seed)."""
    vla = _tiny_model(seed, size)
    spec = OFTSpec(chunk=chunk, action_dim=7, proprio_dim=proprio_dim, num_images=num_images, film=film)
    torch.manual_seed(seed + 1)
    model = OpenVLAOFT(vla, spec)
    _redraw_heads(model, torch.Generator().manual_seed(seed + 1))
    if proprio_dim:
        vla.config.norm_stats[TINY_UNNORM_KEY]["proprio"] = tiny_proprio_stats(proprio_dim)
    return model.eval()


def _module_state(module: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {f"module.{k}": v.detach().to(dtype).clone() for k, v in module.state_dict().items()}


def official_film_names(model: OpenVLAOFT, rank: int = FILM_LORA_RANK
                        ) -> list[tuple[str, str, str, tuple[int, ...]]]:
    """Returns what an official FiLM ``vision_backbone`` file of ``model`` holds, in order.

    Each entry is (official key, role, model tensor name, shape). ``role`` is ``plain`` (a copy of the
    model tensor), ``film`` (a FiLM layer's tensor), ``lora_base`` (the base weight: the model weight minus
    the LoRA update), ``lora_A`` or ``lora_B`` (the LoRA factors of that weight; the name is the weight's).
    Works on a model built on the ``meta`` device.
    """
    names: list[tuple[str, str, str, tuple[int, ...]]] = []
    backbone = model.vla.vision_backbone
    towers = [("featurizer", backbone.featurizer, model.film.featurizer)]
    if backbone.fused_featurizer is not None:
        towers.append(("fused_featurizer", backbone.fused_featurizer, model.film.fused_featurizer))
    for tower, vit, film in towers:
        for key, tensor in vit.state_dict().items():
            internal = f"vision_backbone.{tower}.{key}"
            name = internal_to_official_key(internal)[len("vision_backbone."):]
            parts = name.split(".")
            if parts[1] == "blocks":
                name = ".".join(parts[:3] + ["block"] + parts[3:])
            layer, _, param = name.rpartition(".")
            shape = tuple(tensor.shape)
            if any(layer.endswith(f".block.{lora}") for lora in FILM_LORA_LAYERS):
                if param == "weight":
                    names.append((f"vision_backbone.{layer}.base_layer.weight", "lora_base", internal, shape))
                    names.append((f"vision_backbone.{layer}.lora_A.default.weight", "lora_A", internal,
                                  (rank, shape[1])))
                    names.append((f"vision_backbone.{layer}.lora_B.default.weight", "lora_B", internal,
                                  (shape[0], rank)))
                else:
                    names.append((f"vision_backbone.{layer}.base_layer.{param}", "plain", internal, shape))
                continue
            names.append((f"vision_backbone.{name}", "plain", internal, shape))
        for index, layer in enumerate(film):
            for key, tensor in layer.state_dict().items():
                names.append((f"vision_backbone.{tower}.blocks.{index}.{key}", "film",
                              f"film.{tower}.{index}.{key}", tuple(tensor.shape)))
    return names


def official_film_state(model: OpenVLAOFT, generator: torch.Generator, rank: int = FILM_LORA_RANK,
                        value: Callable[[str, tuple[int, ...]], torch.Tensor] | None = None,
                        dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Returns the official FiLM ``vision_backbone`` state dict of the model (LoRA sublayers included).

    ``value(name, shape)`` gives a model tensor by name (default: the model's own values); the LoRA
    factors are drawn from ``generator`` and the base weights are set so that the merged weight
    (``base + min(rank, 16) / rank * B @ A``, the official alpha) equals the model weight.
    """
    if value is None:
        own = {**{f"vision_backbone.{k}": v for k, v in model.vla.vision_backbone.state_dict().items()},
               **{f"film.{k}": v for k, v in model.film.state_dict().items()}}

        def value(name: str, shape: tuple[int, ...]) -> torch.Tensor:
            return own[name]

    scale = min(rank, 16) / rank
    state: dict[str, torch.Tensor] = {}
    factors: dict[str, torch.Tensor] = {}
    for key, role, internal, shape in official_film_names(model, rank):
        if role == "lora_A":
            factors["A"] = torch.randn(shape, generator=generator) * 0.05
            state[key] = factors["A"].to(dtype)
        elif role == "lora_B":
            factors["B"] = torch.randn(shape, generator=generator) * 0.05
            state[key] = factors["B"].to(dtype)
            base_key = key.replace(".lora_B.default.weight", ".base_layer.weight")
            weight_shape = (shape[0], factors["A"].shape[1])
            state[base_key] = (value(internal, weight_shape).float() - scale * factors["B"] @ factors["A"]).to(dtype)
        elif role == "lora_base":
            state[key] = torch.empty(0)  # a placeholder, filled once both factors are drawn (keeps file order)
        else:
            state[key] = value(internal, shape).detach().to(dtype).clone()
    return state


def make_tiny_oft_checkpoint(out_dir: str | Path, seed: int = 0, size: str = "tiny", chunk: int = 8,
                             proprio_dim: int = 0, num_images: int = 1, film: bool = False,
                             official: bool = True) -> Path:
    """Writes a tiny OFT checkpoint (official layout by default, ours with ``official=False``).

    Raises:
        CheckpointError: when ``out_dir`` exists and is not empty.
        ValueError: for an invalid layout or size.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CheckpointError(f"{out_dir} exists and is not empty; choose a new directory or remove it")
    model = tiny_oft_model(seed, size, chunk, proprio_dim, num_images, film)
    with scratch_beside(out_dir) as staging:
        tokenizer = make_tiny_tokenizer(staging / "tokenizer", seed=seed)
        target = staging / "model"
        shard_bytes = 6 * 1024**2 if size == "tiny" else 1024**3
        if not official:
            save_oft_checkpoint(model, target, tokenizer=tokenizer, max_shard_bytes=shard_bytes)
        else:
            model.vla.config.extra.update(num_actions_chunk=chunk, num_images_in_input=num_images)
            save_checkpoint(model.vla, target, tokenizer=tokenizer, max_shard_bytes=shard_bytes)
            torch.save(_module_state(model.action_head, torch.bfloat16), target / f"action_head--{STEP}_checkpoint.pt")
            if model.proprio_projector is not None:
                torch.save(_module_state(model.proprio_projector, torch.float32),
                           target / f"proprio_projector--{STEP}_checkpoint.pt")
            if model.film is not None:
                generator = torch.Generator().manual_seed(seed + 2)
                torch.save(official_film_state(model, generator), target / f"vision_backbone--{STEP}_checkpoint.pt")
        move_into_place(target, out_dir)
    return out_dir
