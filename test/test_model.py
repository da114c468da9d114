"""The OpenVLA model on tiny checkpoints: image/instruction sensitivity, decoding, loading, saving."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from openvla_ros.errors import (
    CheckpointError,
    ImageError,
    InstructionError,
    QuantizationError,
    UnnormKeyError,
)
from openvla_ros.model.loading import load_model, save_checkpoint, weight_files
from openvla_ros.model.policy import OpenVLAPolicy
from openvla_ros.model.tiny import make_tiny_checkpoint

INSTRUCTION = "pick up the red block"


@pytest.fixture(scope="module")
def policy(tiny_checkpoint: Path) -> OpenVLAPolicy:
    return OpenVLAPolicy.from_pretrained(str(tiny_checkpoint), device="cpu")


def _images(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(120, 160, 3), dtype=np.uint8) for _ in range(count)]


def _first_logits(policy: OpenVLAPolicy, image: np.ndarray, instruction: str) -> torch.Tensor:
    input_ids, pixel_values = policy.prepare_inputs(image, instruction)
    with torch.no_grad():
        logits = policy.model(input_ids, pixel_values).logits[0, -1]
    return logits[policy.action_tokenizer.first_action_id : policy.action_tokenizer.last_action_id + 1]


def test_different_images_give_different_action_logits(policy: OpenVLAPolicy) -> None:
    first, second = _images(2)
    difference = (_first_logits(policy, first, INSTRUCTION) - _first_logits(policy, second, INSTRUCTION)).abs()
    assert difference.max() > 1e-2
    ids = {tuple(policy.predict_action_ids(image, INSTRUCTION)) for image in _images(6, seed=1)}
    assert len(ids) > 1, "every image gave the same action: the image is being ignored"


def test_different_instructions_give_different_action_logits(policy: OpenVLAPolicy) -> None:
    image = _images(1)[0]
    difference = _first_logits(policy, image, INSTRUCTION) - _first_logits(policy, image, "open the top drawer")
    assert difference.abs().max() > 1e-3


def test_prompt_ends_with_bare_space_token(policy: OpenVLAPolicy) -> None:
    ids = policy.prompt_ids(INSTRUCTION)[0].tolist()
    assert ids[0] == 1 and ids[-1] == 29871
    assert policy.tokenizer.convert_ids_to_tokens(29871) == "\u2581"
    assert ids.count(29871) == 1


def test_cached_decoding_equals_full_recomputation(policy: OpenVLAPolicy) -> None:
    first, last = policy.action_tokenizer.first_action_id, policy.action_tokenizer.last_action_id
    for image in _images(3, seed=5):
        input_ids, pixel_values = policy.prepare_inputs(image, INSTRUCTION)
        cached = policy.model.generate_action_ids(input_ids, pixel_values, first, last)[0].tolist()
        sequence = input_ids
        recomputed = []
        with torch.no_grad():
            for _ in range(7):
                logits = policy.model(sequence, pixel_values).logits[0, -1, first : last + 1]
                next_id = int(logits.argmax()) + first
                recomputed.append(next_id)
                sequence = torch.cat([sequence, torch.tensor([[next_id]])], dim=1)
        assert cached == recomputed


def test_static_cache_decoding_gives_the_same_ids(policy: OpenVLAPolicy) -> None:
    """The static-KV-cache decoder (the compiled / CUDA-graph path of benchmarks/gpu_check.py) decodes the same
    ids as the growing cache, also after the prompt length changes (its cache is rebuilt) and for a batch."""
    from openvla_ros.model.static_decode import StaticActionDecoder

    tokens = policy.action_tokenizer
    decoder = StaticActionDecoder(policy.model, tokens.first_action_id, tokens.last_action_id)
    for image, instruction in zip(_images(3), [INSTRUCTION, INSTRUCTION, "open the top drawer of the cabinet"],
                                  strict=True):
        input_ids, pixel_values = policy.prepare_inputs(image, instruction)
        assert decoder(input_ids, pixel_values)[0].tolist() == policy.predict_action_ids(image, instruction).tolist()
    pairs = [policy.prepare_inputs(image, INSTRUCTION) for image in _images(2, seed=5)]
    batch = decoder(torch.cat([ids for ids, _ in pairs]), torch.cat([pixels for _, pixels in pairs]))
    assert batch.shape == (2, 7)
    for row, (ids, pixels) in zip(batch, pairs, strict=True):
        assert row.tolist() == decoder(ids, pixels)[0].tolist()


def test_generated_ids_are_action_tokens_and_actions_are_physical(policy: OpenVLAPolicy) -> None:
    assert len(policy.tokenizer) == 32001 and policy.config.text_config.vocab_size == 32064
    for image in _images(4, seed=9):
        ids = policy.predict_action_ids(image, INSTRUCTION)
        assert ids.shape == (7,) and ids.min() >= 31744 and ids.max() <= 31999
        action = policy.predict_action(image, INSTRUCTION)
        assert action.dtype == np.float64 and action.shape == (7,)
        assert np.all(np.abs(action[:3]) <= 0.02 + 1e-9) and np.all(np.abs(action[3:6]) <= 0.1 + 1e-9)
        expected = policy.normalizer.unnormalize(policy.action_tokenizer.decode(ids))
        np.testing.assert_array_equal(action, expected)


def test_checkpoint_uses_official_weight_names(tiny_checkpoint: Path) -> None:
    keys = set()
    for path in weight_files(tiny_checkpoint):
        with safe_open(str(path), framework="pt") as handle:
            keys.update(handle.keys())
    assert "vision_backbone.featurizer.blocks.0.ls1.scale_factor" in keys
    assert not any(key.endswith(".gamma") for key in keys)
    # weights that the forward never uses are still part of the layout
    assert "vision_backbone.featurizer.norm.weight" in keys
    assert any(key.startswith("vision_backbone.fused_featurizer.attn_pool.") for key in keys)
    assert {"projector.fc1.weight", "projector.fc3.weight", "language_model.lm_head.weight"} <= keys
    assert any(key.startswith("language_model.model.layers.1.") for key in keys)
    assert len(weight_files(tiny_checkpoint)) > 1  # sharded, with an index


def test_save_then_load_gives_identical_outputs(policy: OpenVLAPolicy, tmp_path: Path) -> None:
    out = save_checkpoint(policy.model, tmp_path / "copy", tokenizer=policy.tokenizer)
    reloaded = OpenVLAPolicy.from_pretrained(str(out), device="cpu")
    image = _images(1, seed=2)[0]
    assert torch.equal(_first_logits(policy, image, INSTRUCTION), _first_logits(reloaded, image, INSTRUCTION))
    np.testing.assert_array_equal(policy.predict_action(image, INSTRUCTION), reloaded.predict_action(image, INSTRUCTION))
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        save_checkpoint(policy.model, out)


def test_tiny_checkpoint_is_deterministic(tiny_checkpoint: Path, tmp_path: Path) -> None:
    again = make_tiny_checkpoint(tmp_path / "again", seed=0)
    for name in sorted(p.name for p in tiny_checkpoint.iterdir()):
        assert (tiny_checkpoint / name).read_bytes() == (again / name).read_bytes(), name


def _copy(checkpoint: Path, tmp_path: Path) -> Path:
    target = tmp_path / "broken"
    shutil.copytree(checkpoint, target)
    return target


def test_missing_directory_and_config(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        OpenVLAPolicy.from_pretrained(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json not found"):
        OpenVLAPolicy.from_pretrained(str(tmp_path / "empty"))


def test_truncated_shard_is_reported_as_corrupt(tiny_checkpoint: Path, tmp_path: Path) -> None:
    broken = _copy(tiny_checkpoint, tmp_path)
    shard = weight_files(broken)[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        OpenVLAPolicy.from_pretrained(str(broken), device="cpu")


def test_missing_shard_and_missing_weights(tiny_checkpoint: Path, tmp_path: Path) -> None:
    broken = _copy(tiny_checkpoint, tmp_path)
    weight_files(broken)[-1].unlink()
    with pytest.raises(CheckpointError, match="incomplete: missing shard"):
        load_model(broken, device="cpu")
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    last = sorted(set(index["weight_map"].values()))[-1]
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != last}
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="missing weight"):
        load_model(broken, device="cpu")


def test_config_of_other_architecture_is_rejected(tiny_checkpoint: Path, tmp_path: Path) -> None:
    broken = _copy(tiny_checkpoint, tmp_path)
    config = json.loads((broken / "config.json").read_text())
    config["text_config"]["hidden_size"] = 128
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="do not fit the architecture"):
        load_model(broken, device="cpu")
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(broken, device="cpu")


def test_unnorm_key_missing_or_ambiguous(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(UnnormKeyError, match="available keys: tiny_demo"):
        OpenVLAPolicy.from_pretrained(str(tiny_checkpoint), unnorm_key="bridge_orig")
    broken = _copy(tiny_checkpoint, tmp_path)
    stats = json.loads((broken / "dataset_statistics.json").read_text())
    stats["second"] = stats["tiny_demo"]
    (broken / "dataset_statistics.json").write_text(json.dumps(stats))
    with pytest.raises(UnnormKeyError, match="unnorm_key must be given; available keys: second, tiny_demo"):
        OpenVLAPolicy.from_pretrained(str(broken))
    assert OpenVLAPolicy.from_pretrained(str(broken), unnorm_key="second", device="cpu").unnorm_key == "second"


def test_bad_runtime_inputs(policy: OpenVLAPolicy) -> None:
    with pytest.raises(ImageError, match="shape HxWx3"):
        policy.predict_action(np.zeros((64, 64), np.uint8), INSTRUCTION)
    with pytest.raises(ImageError, match="dtype must be uint8"):
        policy.predict_action(np.zeros((64, 64, 3), np.float64), INSTRUCTION)
    with pytest.raises(InstructionError, match="empty"):
        policy.predict_action(_images(1)[0], "")
    with pytest.raises(InstructionError, match="exceeds the model's context of 512"):
        policy.predict_action(_images(1)[0], "zq9 " * 200)
    assert policy.predict_action(_images(1)[0], INSTRUCTION).shape == (7,)  # still usable


def test_bad_precision_requests(tiny_checkpoint: Path) -> None:
    with pytest.raises(QuantizationError, match="unknown quantization '3bit'"):
        load_model(tiny_checkpoint, quantization="3bit")
    with pytest.raises(QuantizationError, match="unknown dtype"):
        load_model(tiny_checkpoint, dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(QuantizationError, match="CUDA is not available"):
            load_model(tiny_checkpoint, device="cuda")


def test_training_loss_at_labelled_positions_equals_full_logits_loss(policy: OpenVLAPolicy) -> None:
    input_ids, pixel_values = policy.prepare_inputs(_images(1, seed=4)[0], INSTRUCTION)
    targets = torch.tensor([[31800, 31900, 31750, 31872, 31999, 31744, 31810, 2]])
    sequence = torch.cat([input_ids, targets], dim=1)
    labels = torch.full_like(sequence, -100)
    labels[:, -8:] = targets
    with torch.no_grad():
        output = policy.model(sequence, pixel_values, labels=labels)
        full = policy.model(sequence, pixel_values).logits[0]
    assert output.logits.shape == (8, full.shape[-1]) and output.targets.tolist() == targets[0].tolist()
    expected = torch.nn.functional.cross_entropy(full[-9:-1].float(), targets[0])
    torch.testing.assert_close(output.loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(output.logits, full[-9:-1], rtol=1e-5, atol=1e-4)


def test_vision_features_come_from_the_second_to_last_block_without_final_norm(policy: OpenVLAPolicy) -> None:
    """DINOv2 block 22 of 24 and SigLIP block 25 of 27 in the 7B: here the second-to-last of each ViT."""
    _, pixel_values = policy.prepare_inputs(_images(1, seed=5)[0], INSTRUCTION)
    backbone = policy.model.vision_backbone
    second_to_last, last = [], []
    with torch.no_grad():
        for vit, pixels in ((backbone.featurizer, pixel_values[:, :3]), (backbone.fused_featurizer, pixel_values[:, 3:])):
            tokens = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(pixels))))
            for block in vit.blocks[:-1]:
                tokens = block(tokens)
            second_to_last.append(tokens[:, vit.num_prefix_tokens :])
            last.append(vit.blocks[-1](tokens)[:, vit.num_prefix_tokens :])
        features = backbone(pixel_values)
    assert features.shape == (1, 256, backbone.featurizer.embed_dim + backbone.fused_featurizer.embed_dim)
    torch.testing.assert_close(features, torch.cat(second_to_last, dim=2))
    assert not torch.allclose(features, torch.cat(last, dim=2)), "the last block must make a difference here"


def test_config_without_llama_defaults_gets_the_official_values(tiny_checkpoint: Path, tmp_path: Path) -> None:
    checkpoint = _copy(tiny_checkpoint, tmp_path)
    config = json.loads((checkpoint / "config.json").read_text())
    for key in ("rms_norm_eps", "rope_theta", "rope_parameters", "rope_scaling"):
        config["text_config"].pop(key, None)
    (checkpoint / "config.json").write_text(json.dumps(config))
    model = load_model(checkpoint, device="cpu")
    text = model.config.text_config
    assert text.rms_norm_eps == 1e-6, "OpenVLA's Llama relies on the 1e-6 default that config.json omits"
    assert model.language_model.model.norm.variance_epsilon == 1e-6
    from openvla_ros.model.configuration_openvla import rope_theta

    assert rope_theta(text) == 10000.0


def test_code_shipped_with_a_checkpoint_is_never_run(tiny_checkpoint: Path, tmp_path: Path) -> None:
    checkpoint = _copy(tiny_checkpoint, tmp_path)
    marker = tmp_path / "remote_code_ran"
    (checkpoint / "modeling_prismatic.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((checkpoint / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_prismatic.OpenVLAConfig",
                          "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction"}
    (checkpoint / "config.json").write_text(json.dumps(config))
    policy = OpenVLAPolicy.from_pretrained(str(checkpoint), device="cpu")
    assert np.all(np.isfinite(policy.predict_action(_images(1)[0], INSTRUCTION)))
    assert not marker.exists(), "a checkpoint's Python file was executed"


def test_a_failed_write_leaves_nothing_beside_the_output_and_a_finished_one_replaces_an_empty_dir(
        tmp_path: Path) -> None:
    from openvla_ros.model.loading import move_into_place, scratch_beside

    out = tmp_path / "model"
    with pytest.raises(RuntimeError, match="disk full"):
        with scratch_beside(out, "convert-") as scratch:
            assert scratch.parent == tmp_path and scratch.name.startswith(".model.convert-")
            (scratch / "weights").write_text("half")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []

    out.mkdir()
    with scratch_beside(out) as scratch:
        (scratch / "done").mkdir()
        (scratch / "done" / "config.json").write_text("{}")
        move_into_place(scratch / "done", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert (out / "config.json").read_text() == "{}"
