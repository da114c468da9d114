"""A tiny, randomly initialised OpenVLA checkpoint with the official layout, built offline.

    python -m openvla_ros.tiny OUT_DIR [--seed N] [--prismatic]   (the command: :mod:`openvla_ros.tiny`)
    python -m openvla_ros.tiny OUT_DIR --oft [--chunk K] [--proprio-dim N] [--images N] [--film] [--ours]

The checkpoint has the same structure as OpenVLA-7B at toy sizes: the same timm architectures
(DINOv2-reg4 and SigLIP, patch 14 at 224x224, so 256 patches each) with small widths and depths, the
3-layer projector, a 2-layer Llama with the padded 32064-token vocabulary, and a SentencePiece BPE
tokenizer trained here with Llama-2's settings, so that id 29871 is the bare-space piece and the
action tokens are ids 31744..31999. It carries ``norm_stats`` for the key ``tiny_demo`` and a matching
``dataset_statistics.json``. It loads through exactly the same code as the official checkpoints.

Random weights at the libraries' default initialisation make the image barely matter (LayerScale
1e-5, unit norms, zero biases); those are redrawn so that images and instructions visibly change the
output, the action tokens' output rows are ordered by bin (see :func:`order_action_rows`) and the
ViTs' position embeddings are a 2D sine-cosine grid (see :func:`grid_position_embedding`).

With ``--prismatic`` the same model is written as a run directory of the original Prismatic training
code instead (see :func:`make_tiny_prismatic_run`), the input of :mod:`openvla_ros.model.convert_prismatic`.
With ``--oft`` it gets OpenVLA-OFT heads, written in the official OFT layout (see
:mod:`openvla_ros.model.tiny_oft`).
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from openvla_ros.model.action_codec import DEFAULT_MASK
from openvla_ros.model.configuration_openvla import DEFAULT_TIMM_IDS, OpenVLAConfig, make_text_config
from openvla_ros.model.loading import save_checkpoint, staged_directory
from openvla_ros.model.modeling_openvla import OpenVLAForActionPrediction

TINY_UNNORM_KEY = "tiny_demo"
VOCAB_SIZE = 32000
PADDED_VOCAB_SIZE = 32064
# Llama-2's vocabulary ends with 2129 single characters, "▁" first (id 29871); the generated text
# therefore uses exactly 2128 other characters and no newline (newlines fall back to byte pieces).
_NUM_OTHER_CHARACTERS = VOCAB_SIZE - 29871 - 1

TINY_TEXT_CONFIG = {
    "vocab_size": PADDED_VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    "pad_token_id": VOCAB_SIZE,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
TINY_VIT_OVERRIDES = [
    {"embed_dim": 32, "depth": 3, "num_heads": 2},
    {"embed_dim": 48, "depth": 3, "num_heads": 2},
]
# Physical ranges of the tiny demo's actions: metres and radians per step, gripper 0 (closed)..1 (open).
TINY_Q01 = [-0.02, -0.02, -0.02, -0.1, -0.1, -0.1, 0.0]
TINY_Q99 = [0.02, 0.02, 0.02, 0.1, 0.1, 0.1, 1.0]


def tiny_norm_stats() -> dict:
    """Returns the ``norm_stats`` entry of the tiny checkpoint (OpenVLA's statistics format)."""
    q01 = np.array(TINY_Q01)
    q99 = np.array(TINY_Q99)
    return {
        TINY_UNNORM_KEY: {
            "action": {
                "mean": ((q01 + q99) / 2).tolist(),
                "std": ((q99 - q01) / 4).tolist(),
                "max": (q99 * 1.1).tolist(),
                "min": (q01 * 1.1).tolist(),
                "q01": q01.tolist(),
                "q99": q99.tolist(),
                "mask": list(DEFAULT_MASK),
            },
            "num_transitions": 1000,
            "num_trajectories": 10,
        }
    }


def tiny_config() -> OpenVLAConfig:
    """Returns the config of the tiny checkpoint."""
    return OpenVLAConfig(
        timm_model_ids=list(DEFAULT_TIMM_IDS),
        image_sizes=[224, 224],
        use_fused_vision_backbone=True,
        llm_backbone_id="tiny-llama",
        text_config=make_text_config(dict(TINY_TEXT_CONFIG)),
        norm_stats=tiny_norm_stats(),
        timm_override_args=[dict(o) for o in TINY_VIT_OVERRIDES],
    )


def small_config() -> OpenVLAConfig:
    """Returns the tiny config with a 4-layer Llama: the pretrained base's size.

    Reaching the named block needs a few hops (the instruction's colour word to the matching patches to
    their position): with 2 layers the trained tiny model pointed at the named block no more often than
    at another one; with 4 it starts to bind them.
    """
    config = tiny_config()
    text = dict(TINY_TEXT_CONFIG)
    text.update(num_hidden_layers=4)
    config.text_config = make_text_config(text)
    config.llm_backbone_id = "small-llama"
    return config


def mid_config() -> OpenVLAConfig:
    """Returns a ~200M-parameter config for benchmarks: ViT-S-sized backbones, an 8-layer 1024-wide Llama."""
    config = tiny_config()
    config.timm_override_args = [
        {"embed_dim": 384, "depth": 12, "num_heads": 6},
        {"embed_dim": 384, "depth": 12, "num_heads": 6},
    ]
    text = dict(TINY_TEXT_CONFIG)
    text.update(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                num_key_value_heads=16, max_position_embeddings=1024)
    config.text_config = make_text_config(text)
    config.llm_backbone_id = "mid-llama"
    return config


SIZES = {"tiny": tiny_config, "small": small_config, "mid": mid_config}


def _training_text(rng: np.random.Generator) -> list[str]:
    extra = [chr(c) for c in range(33, 127)]
    extra += [chr(0x4E00 + i) for i in range(_NUM_OTHER_CHARACTERS - len(extra))]
    onsets = "bcdfghjklmnprstvwz"
    vowels = "aeiou"
    syllables = [a + b for a in onsets for b in vowels] + [a + b + c for a in onsets for b in vowels for c in "nrst"]
    words = ["".join(rng.choice(syllables, size=int(rng.integers(1, 4)))) for _ in range(40000)]
    common = (
        "in what action should the robot take to pick up place put move push open close the a red green "
        "blue yellow block cup drawer on into left right of out"
    ).split()
    lines = []
    for _ in range(60000):
        picks = rng.zipf(1.2, size=int(rng.integers(4, 14))) % len(words)
        lines.append(" ".join(words[i] if i % 3 else common[i % len(common)] for i in picks))
    lines.append(" ".join(extra))
    lines.extend(["In: What action should the robot take to pick up the red block? Out:"] * 50)
    return lines


def make_tiny_tokenizer(out_dir: Path, seed: int = 0):
    """Trains a Llama-2-layout SentencePiece BPE tokenizer (32000 pieces + ``<PAD>``) and returns it.

    Raises:
        RuntimeError: when the trained vocabulary does not have Llama-2's layout.
    """
    import sentencepiece as spm
    from transformers import AutoTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_text(np.random.default_rng(seed))),
        model_writer=proto,
        vocab_size=VOCAB_SIZE,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
        max_sentence_length=100000,
    )
    (out_dir / "tokenizer.model").write_bytes(proto.getvalue())
    (out_dir / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "LlamaTokenizer", "add_bos_token": true, "add_eos_token": false, '
        '"legacy": false, "model_max_length": 2048, "padding_side": "right"}'
    )
    tokenizer = AutoTokenizer.from_pretrained(str(out_dir))
    tokenizer.add_special_tokens({"pad_token": "<PAD>"})
    if tokenizer.convert_ids_to_tokens(29871) != "\u2581" or len(tokenizer) != VOCAB_SIZE + 1:
        raise RuntimeError("the tiny tokenizer does not reproduce Llama-2's vocabulary layout")
    return tokenizer


def _redraw_parameters(model: OpenVLAForActionPrediction, generator: torch.Generator) -> None:
    """Gives LayerScale, norm weights and biases non-trivial random values so every input matters."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith((".gamma", "ls1.gamma", "ls2.gamma")):
                parameter.copy_(0.5 + torch.rand(parameter.shape, generator=generator))
            elif name.endswith(".bias"):
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
            elif parameter.ndim == 1 and "norm" in name:
                parameter.copy_(1.0 + 0.3 * torch.randn(parameter.shape, generator=generator))
            elif name.endswith("embed_tokens.weight") or name.endswith("lm_head.weight"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
            elif parameter.ndim == 2:
                fan_in = parameter.shape[1]
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / fan_in**0.5)
        order_action_rows(model.language_model.lm_head.weight, generator)
        for vit in (model.vision_backbone.featurizer, model.vision_backbone.fused_featurizer):
            if vit is not None:
                vit.pos_embed.copy_(grid_position_embedding(vit.pos_embed.shape[1], vit.pos_embed.shape[2]))


def grid_position_embedding(num_patches: int, dim: int) -> torch.Tensor:
    """Returns [1, N, dim] 2D sine-cosine embeddings of a square patch grid (x in the first half, y in the second).

    A random position embedding at the default scale (std 0.02) is drowned by the patch content, so a
    random tower's features barely say where a patch is; a pretrained ViT's do. With these, where
    something is in the image (left or right of the gripper, say) is readable from the features
    after a short fine-tune, as it is for the real model.
    """
    side = int(round(num_patches**0.5))
    if side * side != num_patches:
        raise ValueError(f"grid_position_embedding needs a square grid, got {num_patches} patches")
    quarter = dim // 4
    frequencies = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float64) / max(1, quarter)))
    ys, xs = torch.meshgrid(torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64),
                            indexing="ij")
    parts = []
    for coordinate in (xs.reshape(-1), ys.reshape(-1)):
        angles = coordinate[:, None] * frequencies[None]
        parts += [angles.sin(), angles.cos()]
    embedding = torch.cat(parts, dim=1)
    padding = torch.zeros(num_patches, dim - embedding.shape[1], dtype=embedding.dtype)
    return torch.cat([embedding, padding], dim=1).float()[None]


def order_action_rows(lm_head: torch.Tensor, generator: torch.Generator) -> None:
    """Lays the 256 action tokens' output rows on an arc, so that neighbouring bins score alike.

    Independent random rows make every bin unrelated to its neighbours, so a fine-tune on a few
    hundred continuous actions (each bin seen about twice) cannot learn them: with the rows ordered,
    a one-bin error is cheap, as it becomes in a model trained on many demonstrations. In the
    ``make pipeline`` run this halved the training loss (4.2 to 2.4). Rows keep their random length.
    """
    first = VOCAB_SIZE - 256
    rows = lm_head[first:VOCAB_SIZE]
    basis = torch.linalg.qr(torch.randn(lm_head.shape[1], 2, generator=generator)).Q  # two orthonormal columns
    angle = torch.pi * (VOCAB_SIZE - 1 - torch.arange(first, VOCAB_SIZE, dtype=lm_head.dtype)) / 255.0
    arc = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1) @ basis.T
    noise = 0.2 * torch.randn(rows.shape, generator=generator)
    lm_head[first:VOCAB_SIZE] = rows.norm(dim=1).mean() * arc + noise


def make_tiny_checkpoint(out_dir: str | Path, seed: int = 0, size: str = "tiny") -> Path:
    """Builds the tiny (or ``size="mid"``) checkpoint in ``out_dir`` and returns its path.

    Deterministic for a given seed.

    Raises:
        CheckpointError: when ``out_dir`` exists and is not empty.
        ValueError: for an unknown size.
    """
    out_dir = Path(out_dir)
    model = _tiny_model(seed, size)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = make_tiny_tokenizer(Path(scratch) / "tokenizer", seed=seed)
        shard_bytes = 6 * 1024**2 if size == "tiny" else 1024**3
        save_checkpoint(model, out_dir, tokenizer=tokenizer, max_shard_bytes=shard_bytes)
    return out_dir


def _tiny_model(seed: int, size: str) -> OpenVLAForActionPrediction:
    """Returns the randomly initialised model of :func:`make_tiny_checkpoint`.

    Raises:
        ValueError: for an unknown size.
    """
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
    torch.manual_seed(seed)
    model = OpenVLAForActionPrediction(SIZES[size]())
    _redraw_parameters(model, torch.Generator().manual_seed(seed))
    return model


def _prismatic_state(model: OpenVLAForActionPrediction) -> dict[str, dict[str, torch.Tensor]]:
    """Returns the weights as the Prismatic training code saves them: one state dict per module.

    Prismatic names the towers ``dino_featurizer`` / ``siglip_featurizer``, the projector's layers by
    their index in an ``nn.Sequential`` (``projector.0/2/4``, GELUs between), the LLM ``llm.*``, and keeps
    timm's LayerScale name ``gamma``.
    """
    towers = {"featurizer": "dino_featurizer", "fused_featurizer": "siglip_featurizer"}
    layers = {"fc1": "0", "fc2": "2", "fc3": "4"}
    groups: dict[str, dict[str, torch.Tensor]] = {"vision_backbone": {}, "projector": {}, "llm_backbone": {}}
    for name, tensor in model.state_dict().items():
        module, _, rest = name.partition(".")
        if module == "vision_backbone":
            tower, _, rest = rest.partition(".")
            groups["vision_backbone"][f"{towers[tower]}.{rest}"] = tensor
        elif module == "projector":
            layer, _, parameter = rest.partition(".")
            groups["projector"][f"projector.{layers[layer]}.{parameter}"] = tensor
        else:
            groups["llm_backbone"][f"llm.{rest}"] = tensor
    return groups


def make_tiny_prismatic_run(out_dir: str | Path, seed: int = 0, size: str = "tiny") -> Path:
    """Writes the tiny model as a Prismatic training run directory and returns its path.

    The weights equal :func:`make_tiny_checkpoint`'s for the same seed and size. The directory holds
    ``config.json`` (a ``vla`` section with the Prismatic backbone ids, plus the converter's
    ``openvla_ros_model`` section for what those ids cannot say: the narrowed towers, the toy Llama and
    the tokenizer directory), ``dataset_statistics.json``, ``tokenizer/`` and
    ``checkpoints/latest-checkpoint.pt`` (``{"model": {"vision_backbone", "projector", "llm_backbone"}}``).
    It is written beside ``out_dir`` and renamed into place.

    Raises:
        CheckpointError: when ``out_dir`` exists and is not empty.
        ValueError: for an unknown size.
    """
    from openvla_ros.errors import CheckpointError
    from openvla_ros.model.prismatic_config import OVERRIDE_KEY

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CheckpointError(f"{out_dir} exists and is not empty; choose a new directory or remove it")
    model = _tiny_model(seed, size)
    config = model.config.to_dict()
    run_config = {
        "vla": {
            "vla_id": f"{size}-dinosiglip-224px+mx-{TINY_UNNORM_KEY}",
            "base_vlm": f"{size}-dinosiglip-224px",
            "vision_backbone_id": "dinosiglip-vit-so-224px",
            "llm_backbone_id": model.config.llm_backbone_id,
            "arch_specifier": "no-align+fused-gelu-mlp",
            "image_resize_strategy": model.config.image_resize_strategy,
            "data_mix": TINY_UNNORM_KEY,
            "freeze_vision_backbone": False,
            "freeze_llm_backbone": False,
        },
        "run_id": out_dir.name,
        "seed": seed,
        OVERRIDE_KEY: {
            "timm_model_ids": config["timm_model_ids"],
            "timm_override_args": config["timm_override_args"],
            "image_sizes": config["image_sizes"],
            "text_config": config["text_config"],
            "tokenizer": "tokenizer",
        },
    }
    with staged_directory(out_dir) as staging:
        tokenizer = make_tiny_tokenizer(staging / "scratch", seed=seed)
        tokenizer.save_pretrained(str(staging / "tokenizer"))
        shutil.copyfile(tokenizer.vocab_file, staging / "tokenizer" / "tokenizer.model")
        shutil.rmtree(staging / "scratch")
        (staging / "checkpoints").mkdir()
        torch.save({"model": _prismatic_state(model)}, staging / "checkpoints" / "latest-checkpoint.pt")
        (staging / "config.json").write_text(json.dumps(run_config, indent=2))
        (staging / "dataset_statistics.json").write_text(json.dumps(config["norm_stats"], indent=2))
    return out_dir
