"""Full-size random checkpoints: openvla-7b's exact shapes, names and file layout, written offline.

    python -m openvla_ros.tiny OUT --size 7b [--seed N] [--dry-run]
    python -m openvla_ros.tiny OUT --size 7b --oft [--film] [--chunk K] [--proprio-dim N] [--images N]

The model is DINOv2 ViT-L/14-reg4 + SigLIP so400m/14 at 224 px, the fused projector 2176 -> 8704 ->
4096 -> 4096 and Llama-2-7B (4096 wide, 32 layers, 32 heads, MLP 11008, vocabulary 32064): 7.54 B
parameters, 15.1 GB in bf16. Nothing of that size is ever held in memory: the names and shapes come
from a model built on the ``meta`` device, and each tensor is drawn (deterministically per seed and
name), converted to bf16 and appended to its safetensors shard before the next one is drawn, so the
writer's peak memory is about one tensor (the 0.5 GB embedding in float32), not the model.

The values follow the tiny checkpoint's rules (:mod:`openvla_ros.model.tiny`): fan-in scaled matrices,
non-trivial norms, biases and LayerScale, grid position embeddings and ordered action rows, so images
and instructions change the output at full size too. ``layers`` and ``vision_depth`` shrink the depth
(never the widths) for tests that write and load a real file of the full widths.

With an :class:`~openvla_ros.model.oft.OFTSpec` the checkpoint is an OpenVLA-OFT-7B fine-tune in the
official layout (by default LIBERO's: 2 images, proprio 8, K = 8): the same VLA files plus
``action_head--100_checkpoint.pt`` (the L1 MLP-ResNet head, 151 M parameters, bf16, DDP ``module.``
prefix), ``proprio_projector--100_checkpoint.pt`` (fp32) and, with FiLM,
``vision_backbone--100_checkpoint.pt`` (the whole FiLM-wrapped vision backbone in bf16 with rank-32 LoRA
sublayers whose merged value is the weights in the safetensors, 2.3 GB). These head files are built in
memory one at a time (the largest, FiLM's, holds 1.2 B parameters).
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from openvla_ros.errors import CheckpointError
from openvla_ros.model.configuration_openvla import DEFAULT_TIMM_IDS, OpenVLAConfig, make_text_config
from openvla_ros.model.loading import (
    CONFIG_NAME,
    INDEX_NAME,
    PREPROCESSOR_NAME,
    STATISTICS_NAME,
    internal_to_official_key,
    staged_directory,
)
from openvla_ros.model.modeling_openvla import OpenVLAForActionPrediction
from openvla_ros.model.oft import OFTSpec, OpenVLAOFT
from openvla_ros.model.prismatic_config import LLAMA2_7B_TEXT_CONFIG
from openvla_ros.model.processor import default_image_settings
from openvla_ros.model.tiny import (
    TINY_UNNORM_KEY,
    grid_position_embedding,
    make_tiny_tokenizer,
    order_action_rows,
    tiny_norm_stats,
)

# The official checkpoint's three shards hold 6.9 + 6.9 + 1.3 GB.
FULL_SHARD_BYTES = 7 * 10**9
# OpenVLA-OFT-7B for LIBERO: two images (third-person + wrist), 8-D proprio, chunks of 8 actions.
LIBERO_OFT = {"chunk": 8, "proprio_dim": 8, "num_images": 2}
# The official fine-tuning's LoRA rank (its FiLM file holds rank-32 LoRA sublayers).
OFFICIAL_LORA_RANK = 32
_SAFETENSORS_DTYPE = {torch.bfloat16: "BF16", torch.float32: "F32"}


def full_config(layers: int = 32, vision_depth: int | None = None) -> OpenVLAConfig:
    """Returns openvla-7b's config; ``layers`` (LLM) and ``vision_depth`` (both towers) shrink only the depth."""
    text = dict(LLAMA2_7B_TEXT_CONFIG, num_hidden_layers=layers)
    overrides = None if vision_depth is None else [{"depth": vision_depth}, {"depth": vision_depth}]
    return OpenVLAConfig(
        timm_model_ids=list(DEFAULT_TIMM_IDS), image_sizes=[224, 224], use_fused_vision_backbone=True,
        llm_backbone_id="llama2-7b-pure", text_config=make_text_config(text), norm_stats=tiny_norm_stats(),
        timm_override_args=overrides,
    )


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the checkpoint: its official name, shape, the internal name it is drawn under, and shard."""

    name: str
    internal_name: str
    shape: tuple[int, ...]
    shard: str

    @property
    def nbytes(self) -> int:
        count = 1
        for side in self.shape:
            count *= side
        return count * 2  # bf16


def plan_checkpoint(config: OpenVLAConfig, max_shard_bytes: int = FULL_SHARD_BYTES) -> list[PlannedTensor]:
    """Returns every tensor the checkpoint of ``config`` holds, in file order, with its shard file name.

    Built on the ``meta`` device: no memory is used for the weights.
    """
    with torch.device("meta"):
        model = OpenVLAForActionPrediction(config)
    entries = sorted((internal_to_official_key(key), key, tuple(tensor.shape))
                     for key, tensor in model.state_dict().items())
    shards: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, internal, shape in entries:
        nbytes = 2 * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, internal, shape))
        size += nbytes
    planned = []
    for number, shard in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        planned += [PlannedTensor(name, internal, shape, file) for name, internal, shape in shard]
    return planned


def draw_tensor(internal_name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Returns the float32 values of one tensor, the same for the same (seed, name) on every machine."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(internal_name.encode()))
    name = internal_name
    if name.endswith(("ls1.gamma", "ls2.gamma")):
        return 0.5 + torch.rand(shape, generator=generator)
    if name.endswith(".bias"):
        return 0.1 * torch.randn(shape, generator=generator)
    if len(shape) == 1 and ("norm" in name or name.startswith("action_head.")):  # norms (the head's LayerNorms)
        return 1.0 + 0.3 * torch.randn(shape, generator=generator)
    if name.endswith("pos_embed"):
        return grid_position_embedding(shape[1], shape[2])
    if name.endswith("embed_tokens.weight"):
        return torch.randn(shape, generator=generator)
    if name.endswith("lm_head.weight"):
        values = torch.randn(shape, generator=generator)
        order_action_rows(values, generator)
        return values
    if len(shape) >= 2:
        fan_in = 1
        for side in shape[1:]:
            fan_in *= side
        # FiLM's scale and shift stay moderate, so that 1 + scale(e) stays near 1 (as the tiny model's)
        gain = 0.3 if name.startswith("film.") else 1.0
        return gain * torch.randn(shape, generator=generator) / fan_in**0.5
    return 0.02 * torch.randn(shape, generator=generator)  # cls and register tokens


def _write_shard(path: Path, tensors: list[PlannedTensor], seed: int) -> None:
    """Writes one safetensors file tensor by tensor: the header first (offsets are known from the shapes)."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tensor in tensors:
        header[tensor.name] = {"dtype": "BF16", "shape": list(tensor.shape), "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)))
        file.write(encoded)
        for tensor in tensors:
            values = draw_tensor(tensor.internal_name, tensor.shape, seed).to(torch.bfloat16).contiguous()
            file.write(values.view(torch.int16).numpy().tobytes())


def _shards(plan: list[PlannedTensor]) -> Iterator[tuple[str, list[PlannedTensor]]]:
    current: list[PlannedTensor] = []
    for tensor in plan:
        if current and tensor.shard != current[-1].shard:
            yield current[-1].shard, current
            current = []
        current.append(tensor)
    if current:
        yield current[-1].shard, current


def oft_head_files(config: OpenVLAConfig, spec: OFTSpec) -> dict[str, list[tuple[str, tuple[int, ...], torch.dtype]]]:
    """Returns the official OFT head files of a full-size model: {file name: [(key, shape, dtype)]}.

    Built on the ``meta`` device; the FiLM file's entries come from
    :func:`~openvla_ros.model.tiny_oft.official_film_names`.
    """
    from openvla_ros.model.tiny_oft import STEP, official_film_names

    with torch.device("meta"):
        model = OpenVLAOFT(OpenVLAForActionPrediction(config), spec)
    files = {f"action_head--{STEP}_checkpoint.pt": [(f"module.{key}", tuple(tensor.shape), torch.bfloat16)
                                                   for key, tensor in model.action_head.state_dict().items()]}
    if model.proprio_projector is not None:
        files[f"proprio_projector--{STEP}_checkpoint.pt"] = [
            (f"module.{key}", tuple(tensor.shape), torch.float32)
            for key, tensor in model.proprio_projector.state_dict().items()]
    if model.film is not None:
        files[f"vision_backbone--{STEP}_checkpoint.pt"] = [
            (key, shape, torch.bfloat16) for key, _, _, shape in official_film_names(model, OFFICIAL_LORA_RANK)]
    return files


def _write_oft_heads(directory: Path, config: OpenVLAConfig, spec: OFTSpec, seed: int) -> None:
    """Writes the official head files, each drawn with the same rules (and names) as the VLA's tensors."""
    from openvla_ros.model.tiny_oft import STEP, official_film_state

    with torch.device("meta"):
        model = OpenVLAOFT(OpenVLAForActionPrediction(config), spec)

    def drawn(prefix: str, module: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {f"module.{key}": draw_tensor(f"{prefix}.{key}", tuple(tensor.shape), seed).to(dtype)
                for key, tensor in module.state_dict().items()}

    torch.save(drawn("action_head", model.action_head, torch.bfloat16), directory / f"action_head--{STEP}_checkpoint.pt")
    if model.proprio_projector is not None:
        torch.save(drawn("proprio_projector", model.proprio_projector, torch.float32),
                   directory / f"proprio_projector--{STEP}_checkpoint.pt")
    if model.film is not None:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + 2)
        state = official_film_state(model, generator, rank=OFFICIAL_LORA_RANK, dtype=torch.bfloat16,
                                    value=lambda name, shape: draw_tensor(name, shape, seed))
        torch.save(state, directory / f"vision_backbone--{STEP}_checkpoint.pt")
        del state


def write_full_checkpoint(out_dir: str | Path, seed: int = 0, layers: int = 32, vision_depth: int | None = None,
                          max_shard_bytes: int = FULL_SHARD_BYTES, oft: OFTSpec | None = None) -> Path:
    """Writes the full-size random checkpoint (bf16, sharded with its index) and returns ``out_dir``.

    With ``oft``, the official OpenVLA-OFT head files are written beside it (see the module's docstring).
    Written beside ``out_dir`` and renamed into place at the end, so an interrupted write leaves nothing
    that looks like a checkpoint.

    Raises:
        CheckpointError: when ``out_dir`` exists and is not empty.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CheckpointError(f"{out_dir} exists and is not empty; choose a new directory or remove it")
    config = full_config(layers, vision_depth)
    if oft is not None:
        from openvla_ros.model.tiny_oft import tiny_proprio_stats

        config.extra.update(num_actions_chunk=oft.chunk, num_images_in_input=oft.num_images)
        if oft.proprio_dim:
            config.norm_stats[TINY_UNNORM_KEY]["proprio"] = tiny_proprio_stats(oft.proprio_dim)
    plan = plan_checkpoint(config, max_shard_bytes)
    with staged_directory(out_dir) as staging:
        for file, tensors in _shards(plan):
            _write_shard(staging / file, tensors, seed)
        index = {"metadata": {"total_size": sum(t.nbytes for t in plan)},
                 "weight_map": {t.name: t.shard for t in plan}}
        (staging / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
        config_dict = config.to_dict()
        config_dict["torch_dtype"] = "bfloat16"
        (staging / CONFIG_NAME).write_text(json.dumps(config_dict, indent=2))
        (staging / STATISTICS_NAME).write_text(json.dumps(config.norm_stats, indent=2))
        settings = default_image_settings(True, config.image_size)
        (staging / PREPROCESSOR_NAME).write_text(json.dumps(settings.to_preprocessor_config(True), indent=2))
        with tempfile.TemporaryDirectory() as scratch:
            tokenizer = make_tiny_tokenizer(Path(scratch) / "tokenizer", seed=seed)
            tokenizer.save_pretrained(str(staging))
            shutil.copyfile(tokenizer.vocab_file, staging / "tokenizer.model")
        if oft is not None:
            _write_oft_heads(staging, config, oft, seed)
    return out_dir
