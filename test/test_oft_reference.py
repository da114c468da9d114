"""The OFT chunk against a forward pass written out here in plain torch; round trips; refused checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from openvla_ros.errors import CheckpointError
from openvla_ros.model.oft import OpenVLAOFT, build_chunk_inputs
from openvla_ros.model.oft_loading import (
    FILM_NAME,
    HEAD_NAME,
    PROPRIO_NAME,
    load_oft_model,
    save_oft_checkpoint,
)
from openvla_ros.model.oft_policy import OFTPolicy
from openvla_ros.model.tiny_oft import make_tiny_oft_checkpoint, tiny_oft_model

PROMPTS = [[1, 512, 900, 1300, 29871], [1, 700, 29871]]  # two lengths: the second row is right-padded


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding, Llama convention: halves rotated, frequencies theta^(-2i/d)."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    angles = positions.double()[:, None] * inv_freq[None]
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1).float()
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1).float()
    first, second = x[..., : dim // 2], x[..., dim // 2:]
    return x * cos + torch.cat([-second, first], dim=-1) * sin


def _layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    return x @ layer.weight.T + (layer.bias if layer.bias is not None else 0.0)


def reference_chunk(model: OpenVLAOFT, prompts, pixels: torch.Tensor, proprio: torch.Tensor | None,
                    shift: int = -1) -> torch.Tensor:
    """The OFT forward for each row on its own, without padding, with attention written out."""
    spec, vla = model.spec, model.vla
    text = vla.config.text_config
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    theta = (getattr(text, "rope_parameters", None) or {}).get("rope_theta") or getattr(text, "rope_theta", 10000.0)
    embed = vla.language_model.get_input_embeddings().weight
    n_actions = spec.num_action_tokens
    chunks = []
    for row, prompt in enumerate(prompts):
        # BOS | patches of every image in order | proprio | prompt after BOS | zeros for A*K | </s>
        patches = [vla.projector(vla.vision_backbone(image[None]))[0]
                   for image in torch.split(pixels[row], 6, dim=0)]
        prefix = torch.cat(patches)
        if proprio is not None:
            p = proprio[row]
            projector = model.proprio_projector
            hidden_p = torch.nn.functional.gelu(_linear(p, projector.fc1))
            prefix = torch.cat([prefix, _linear(hidden_p, projector.fc2)[None]])
        tokens = embed[torch.tensor(prompt)]
        x = torch.cat([tokens[:1], prefix, tokens[1:], torch.zeros(n_actions, embed.shape[1]), embed[2][None]])
        length = x.shape[0]
        positions = torch.arange(length)
        for layer in vla.language_model.model.layers:
            attn = layer.self_attn
            h = _rms_norm(x, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
            q = _linear(h, attn.q_proj).view(length, heads, head_dim).transpose(0, 1)
            k = _linear(h, attn.k_proj).view(length, kv_heads, head_dim).transpose(0, 1)
            v = _linear(h, attn.v_proj).view(length, kv_heads, head_dim).transpose(0, 1)
            q, k = _rotate(q, positions, theta), _rotate(k, positions, theta)
            k = k.repeat_interleave(heads // kv_heads, dim=0)
            v = v.repeat_interleave(heads // kv_heads, dim=0)
            weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(head_dim), dim=-1)  # full: no causal mask
            x = x + _linear((weights @ v).transpose(0, 1).reshape(length, heads * head_dim), attn.o_proj)
            h = _rms_norm(x, layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)
            mlp = layer.mlp
            x = x + _linear(torch.nn.functional.silu(_linear(h, mlp.gate_proj)) * _linear(h, mlp.up_proj),
                            mlp.down_proj)
        final = vla.language_model.model.norm
        x = _rms_norm(x, final.weight, final.variance_epsilon)
        first = prefix.shape[0] + len(prompt) + shift
        action_hidden = x[first:first + n_actions]  # [A*K, D]
        net = model.action_head.model
        y = action_hidden.reshape(spec.chunk, spec.action_dim * x.shape[1])
        y = torch.relu(_linear(_layer_norm(y, net.layer_norm1), net.fc1))
        for block in net.mlp_resnet_blocks:
            norm, linear = block.ffn[0], block.ffn[1]
            y = y + torch.relu(_linear(_layer_norm(y, norm), linear))
        chunks.append(_linear(_layer_norm(y, net.layer_norm2), net.fc2))
    return torch.stack(chunks)


@pytest.fixture(scope="module")
def model() -> OpenVLAOFT:
    return tiny_oft_model(seed=0, size="tiny", chunk=3, proprio_dim=5, num_images=2, film=False).eval()


def _batch(model: OpenVLAOFT, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn((len(PROMPTS), 12, 224, 224), generator=generator)
    proprio = torch.rand((len(PROMPTS), 5), generator=generator) * 2 - 1
    return pixels, proprio


def test_the_chunk_equals_a_plain_torch_forward_with_full_attention(model: OpenVLAOFT) -> None:
    pixels, proprio = _batch(model)
    inputs = build_chunk_inputs(PROMPTS, model.spec, 32000)
    with torch.no_grad():
        chunk = model(inputs, pixels, proprio)
        expected = reference_chunk(model, PROMPTS, pixels, proprio)
        model.vla.language_model.config._attn_implementation = "eager"
        try:
            eager = model(inputs, pixels, proprio)
        finally:
            model.vla.language_model.config._attn_implementation = "sdpa"
    assert chunk.shape == (2, 3, 7)
    torch.testing.assert_close(chunk, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(eager, expected, rtol=1e-4, atol=1e-4)


def test_the_head_reads_one_position_left_of_the_placeholders(model: OpenVLAOFT) -> None:
    pixels, proprio = _batch(model, seed=1)
    inputs = build_chunk_inputs(PROMPTS, model.spec, 32000)
    with torch.no_grad():
        chunk = model(inputs, pixels, proprio)
        unshifted = reference_chunk(model, PROMPTS, pixels, proprio, shift=0)
        shifted = reference_chunk(model, PROMPTS, pixels, proprio, shift=-1)
    assert (unshifted - shifted).abs().max() > 1e-3, "reading the placeholders themselves gives another chunk"
    torch.testing.assert_close(chunk, shifted, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def official_dir(tmp_path_factory) -> Path:
    return make_tiny_oft_checkpoint(tmp_path_factory.mktemp("oft_ref") / "official", seed=2, chunk=4,
                                    proprio_dim=8, num_images=2, film=True)


def _policy_chunk(directory: Path) -> np.ndarray:
    policy = OFTPolicy.from_pretrained(str(directory), device="cpu")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    wrist = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    return policy.predict_chunk(image, "pick up the cup", wrist_images=[wrist], proprio=np.linspace(-0.5, 0.5, 8))


def _copy_ours(official_dir: Path, tmp_path: Path, name: str) -> Path:
    from openvla_ros.model.loading import load_tokenizer, read_config, read_image_settings

    settings = read_image_settings(official_dir, read_config(official_dir))
    return save_oft_checkpoint(load_oft_model(official_dir, device="cpu"), tmp_path / name,
                               tokenizer=load_tokenizer(official_dir), image_settings=settings)


def test_save_then_load_in_our_layout_gives_the_same_chunk(official_dir: Path, tmp_path: Path) -> None:
    ours = _copy_ours(official_dir, tmp_path, "ours")
    assert {HEAD_NAME, PROPRIO_NAME, FILM_NAME} <= {p.name for p in ours.iterdir()}
    assert not list(ours.glob("*.pt")), "our layout holds no pickle files"
    config = json.loads((ours / "config.json").read_text())
    assert config["oft"]["chunk"] == 4 and config["oft"]["film"] is True
    np.testing.assert_allclose(_policy_chunk(ours), _policy_chunk(official_dir), rtol=1e-5, atol=1e-6)


def test_damaged_or_mismatched_oft_checkpoints_are_refused_by_name(official_dir: Path, tmp_path: Path) -> None:
    missing_head = _copy_ours(official_dir, tmp_path, "missing_head")
    (missing_head / HEAD_NAME).unlink()
    with pytest.raises(CheckpointError, match="without its action head"):
        load_oft_model(missing_head)
    missing_proprio = _copy_ours(official_dir, tmp_path, "missing_proprio")
    (missing_proprio / PROPRIO_NAME).unlink()
    with pytest.raises(CheckpointError, match=f"8-value proprio input, but there is no {PROPRIO_NAME}"):
        load_oft_model(missing_proprio)
    missing_film = _copy_ours(official_dir, tmp_path, "missing_film")
    (missing_film / FILM_NAME).unlink()
    with pytest.raises(CheckpointError, match=f"states FiLM, but there is no {FILM_NAME}"):
        load_oft_model(missing_film)
    other_proprio = _copy_ours(official_dir, tmp_path, "other_proprio")
    from safetensors.torch import load_file, save_file

    state = load_file(str(other_proprio / PROPRIO_NAME))
    state["fc1.weight"] = state["fc1.weight"][:, :6].contiguous()
    save_file(state, str(other_proprio / PROPRIO_NAME))
    with pytest.raises(CheckpointError, match="takes 6"):
        load_oft_model(other_proprio)
    pickled = make_tiny_oft_checkpoint(tmp_path / "pickled", chunk=2)
    head = next(pickled.glob("action_head--*"))
    torch.save({"module.model.fc1.weight": torch.zeros(1), "code": print}, head)
    with pytest.raises(CheckpointError, match="weights-only"):
        load_oft_model(pickled)
    truncated = make_tiny_oft_checkpoint(tmp_path / "truncated", chunk=2)
    head = next(truncated.glob("action_head--*"))
    head.write_bytes(head.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_oft_model(truncated)
    two = make_tiny_oft_checkpoint(tmp_path / "two_heads", chunk=2)
    head = next(two.glob("action_head--*"))
    (two / "action_head--200_checkpoint.pt").write_bytes(head.read_bytes())
    with pytest.raises(CheckpointError, match="keep the one of the step"):
        load_oft_model(two)
