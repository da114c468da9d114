"""OpenVLA-OFT model core on tiny checkpoints: layout, bidirectional attention, shift, loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from openvla_ros.errors import CheckpointError
from openvla_ros.model.oft import build_chunk_inputs
from openvla_ros.model.oft_loading import load_oft_model
from openvla_ros.model.tiny_oft import make_tiny_oft_checkpoint, tiny_oft_model

PROMPT = [1, 512, 900, 1300, 29871]


@pytest.fixture(scope="module")
def official_film_dir(tmp_path_factory) -> Path:
    return make_tiny_oft_checkpoint(tmp_path_factory.mktemp("oft") / "film", chunk=4, proprio_dim=8,
                                    num_images=2, film=True)


def _inputs(model, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn((1, 6 * model.spec.num_images, 224, 224), generator=generator)
    proprio = torch.rand((1, model.spec.proprio_dim), generator=generator) * 2 - 1 if model.spec.proprio_dim else None
    return build_chunk_inputs([PROMPT], model.spec, 32000), pixels, proprio


def test_official_layout_loads_without_missing_keys_and_merges_film_lora(official_film_dir: Path) -> None:
    loaded = load_oft_model(official_film_dir)
    assert (loaded.spec.chunk, loaded.spec.action_dim, loaded.spec.proprio_dim, loaded.spec.num_images) == (4, 7, 8, 2)
    assert loaded.spec.film
    reference = tiny_oft_model(0, "tiny", 4, 8, 2, True)
    # The merged LoRA (base + B @ A) reproduces the vision weights of the in-memory model.
    name = "vla.vision_backbone.featurizer.blocks.0.attn.qkv.weight"
    assert torch.allclose(loaded.state_dict()[name], reference.state_dict()[name], atol=1e-5)
    with torch.no_grad():
        chunk = loaded(*_inputs(loaded))
    assert chunk.shape == (1, 4, 7) and torch.isfinite(chunk).all()


def test_sdpa_and_eager_agree_and_attention_is_bidirectional() -> None:
    model = tiny_oft_model(0, "tiny", 2, 0, 1, False)
    inputs, pixels, _ = _inputs(model)
    with torch.no_grad():
        sdpa = model(inputs, pixels)
        model.vla.language_model.config._attn_implementation = "eager"
        eager = model(inputs, pixels)
        model.vla.language_model.config._attn_implementation = "sdpa"
        embeds, key_mask, num_prefix = model.multimodal_inputs(inputs, pixels)
        from openvla_ros.model.oft import bidirectional_mask

        def first_patch_state(embeddings):
            return model.vla.language_model.model(
                inputs_embeds=embeddings, attention_mask=bidirectional_mask(key_mask, embeddings.dtype)
            ).last_hidden_state[0, 1]

        changed = embeds.clone()
        changed[0, -1] += 1.0  # the stop token, after every placeholder
        moved = (first_patch_state(changed) - first_patch_state(embeds)).abs().max()
    assert torch.allclose(sdpa, eager, atol=1e-4)
    assert moved > 1e-4  # with a causal mask the first patch could not see the stop token


def test_swapped_images_give_another_chunk_and_bad_head_is_refused(official_film_dir: Path, tmp_path) -> None:
    model = load_oft_model(official_film_dir)
    inputs, pixels, proprio = _inputs(model)
    swapped = torch.cat([pixels[:, 6:], pixels[:, :6]], dim=1)
    with torch.no_grad():
        assert (model(inputs, pixels, proprio) - model(inputs, swapped, proprio)).abs().max() > 1e-4
    broken = make_tiny_oft_checkpoint(tmp_path / "broken", chunk=2)
    head = next(broken.glob("action_head--*"))
    state = torch.load(head, weights_only=True)
    state["module.model.layer_norm1.weight"] = state["module.model.layer_norm1.weight"][:-64]
    torch.save(state, head)
    with pytest.raises(CheckpointError, match="another base model"):
        load_oft_model(broken)
