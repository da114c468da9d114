"""The full-size (openvla-7b) random checkpoint: its plan against the official names and shapes, and a real
write at full width and reduced depth that loads through the same code as the 7B model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from openvla_ros.model.full_size import draw_tensor, full_config, plan_checkpoint, write_full_checkpoint

INSTRUCTION = "pick up the red block"


@pytest.fixture(scope="module")
def plan() -> dict[str, tuple[int, ...]]:
    return {tensor.name: tensor.shape for tensor in plan_checkpoint(full_config())}


def test_the_plan_has_openvla_7b_names_and_shapes(plan: dict[str, tuple[int, ...]]) -> None:
    """The facts of openvla-7b: fused 1024 + 1152 = 2176 features, projector 2176 -> 8704 -> 4096 -> 4096,
    Llama-2-7B 4096 wide with 32 layers and an 11008 MLP, vocabulary padded to 32064, DINOv2 LayerScale
    as ``scale_factor``, and the unused last blocks, norm and attention pool still present."""
    assert plan["projector.fc1.weight"] == (8704, 2176)
    assert plan["projector.fc2.weight"] == (4096, 8704)
    assert plan["projector.fc3.weight"] == (4096, 4096)
    assert plan["language_model.model.embed_tokens.weight"] == (32064, 4096)
    assert plan["language_model.lm_head.weight"] == (32064, 4096)
    assert plan["language_model.model.layers.31.mlp.gate_proj.weight"] == (11008, 4096)
    assert plan["language_model.model.layers.31.self_attn.q_proj.weight"] == (4096, 4096)
    assert "language_model.model.layers.32.mlp.gate_proj.weight" not in plan
    assert plan["vision_backbone.featurizer.reg_token"] == (1, 4, 1024)
    assert plan["vision_backbone.featurizer.blocks.23.ls1.scale_factor"] == (1024,)
    assert plan["vision_backbone.featurizer.patch_embed.proj.weight"] == (1024, 3, 14, 14)
    assert plan["vision_backbone.fused_featurizer.blocks.26.mlp.fc1.weight"] == (4304, 1152)
    assert any(name.startswith("vision_backbone.fused_featurizer.attn_pool.") for name in plan)
    assert not any(name.endswith(".gamma") for name in plan)
    prefixes = ("vision_backbone.featurizer.", "vision_backbone.fused_featurizer.", "projector.fc",
                "language_model.model.", "language_model.lm_head.")
    assert all(name.startswith(prefixes) for name in plan)
    parameters = sum(int(np.prod(shape)) for shape in plan.values())
    assert 7.53e9 < parameters < 7.55e9


def test_the_dry_run_lists_three_shards_of_15_gb_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "7b"
    result = subprocess.run([sys.executable, "-m", "openvla_ros.tiny", str(out), "--size", "7b", "--dry-run"],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert "model-00003-of-00003.safetensors" in result.stdout and "15.08 GB in bf16" in result.stdout
    assert not out.exists()


def test_values_are_deterministic_per_seed_and_name() -> None:
    name = "language_model.model.layers.0.mlp.down_proj.weight"
    first, again = draw_tensor(name, (64, 32), seed=3), draw_tensor(name, (64, 32), seed=3)
    assert torch.equal(first, again)
    assert not torch.equal(first, draw_tensor(name, (64, 32), seed=4))
    assert not torch.equal(first, draw_tensor(name.replace("0", "1", 1), (64, 32), seed=3))


@pytest.fixture(scope="module")
def shallow_full_width(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every width of openvla-7b, one Llama layer and two blocks per tower (about 0.6 B parameters, 1.2 GB)."""
    return write_full_checkpoint(tmp_path_factory.mktemp("full") / "7b-shallow", seed=0, layers=1, vision_depth=2,
                                 max_shard_bytes=400 * 10**6)


def test_a_full_width_write_is_sharded_with_its_index_and_loads(shallow_full_width: Path) -> None:
    from openvla_ros.model.policy import OpenVLAPolicy

    index = json.loads((shallow_full_width / "model.safetensors.index.json").read_text())
    shards = sorted(path.name for path in shallow_full_width.glob("model-*.safetensors"))
    assert len(shards) >= 2 and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(path.stat().st_size for path in shallow_full_width.glob(
        "model-*.safetensors")) - sum(_header_bytes(shallow_full_width / shard) for shard in shards)
    config = json.loads((shallow_full_width / "config.json").read_text())
    assert config["text_config"]["hidden_size"] == 4096 and config["torch_dtype"] == "bfloat16"
    for name in ("tokenizer.model", "preprocessor_config.json", "dataset_statistics.json"):
        assert (shallow_full_width / name).is_file()

    # The bf16 files are cast to float32 on load: a CPU without bf16 instructions runs a float32 forward at full
    # width many times faster (the bf16 load itself: test_dtype_auto_on_the_cpu_is_bfloat16_for_a_large_model).
    policy = OpenVLAPolicy.from_pretrained(str(shallow_full_width), device="cpu", dtype="float32")
    assert next(policy.model.language_model.parameters()).dtype == torch.float32
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(120, 160, 3), dtype=np.uint8) for _ in range(2)]
    logits = [_first_logits(policy, image, INSTRUCTION) for image in images]
    assert (logits[0] - logits[1]).abs().max() > 1e-2, "the image does not change the output at full width"
    other = _first_logits(policy, images[0], "open the top drawer")
    assert (logits[0] - other).abs().max() > 1e-3, "the instruction does not change the output at full width"
    action = policy.predict_action(images[0], INSTRUCTION)
    assert action.shape == (7,) and np.isfinite(action).all()
    policy.release()


def test_the_oft_dry_run_lists_the_official_head_files_with_their_sizes(tmp_path: Path) -> None:
    """OFT-7B (LIBERO): the L1 head 151,117,831 and the proprio projector 16,818,176 parameters (FACTS-OFT), and
    FiLM's backbone file with rank-32 LoRA sublayers; nothing written."""
    out = tmp_path / "oft-7b"
    result = subprocess.run([sys.executable, "-m", "openvla_ros.tiny", str(out), "--size", "7b", "--oft", "--film",
                             "--dry-run"], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert "action_head--100_checkpoint.pt: 16 tensors, 151.1 M parameters, 0.30 GB" in result.stdout
    assert "proprio_projector--100_checkpoint.pt: 4 tensors, 16.8 M parameters, 0.07 GB" in result.stdout
    assert "vision_backbone--100_checkpoint.pt:" in result.stdout and not out.exists()


def test_the_oft_head_plan_has_the_official_keys_shapes_and_dtypes() -> None:
    from openvla_ros.model.full_size import oft_head_files
    from openvla_ros.model.oft import OFTSpec

    files = oft_head_files(full_config(), OFTSpec(chunk=8, action_dim=7, proprio_dim=8, num_images=2, film=True))
    head = {key: (shape, dtype) for key, shape, dtype in files["action_head--100_checkpoint.pt"]}
    assert head["module.model.layer_norm1.weight"] == ((28672,), torch.bfloat16)
    assert head["module.model.fc1.weight"][0] == (4096, 28672)
    assert head["module.model.mlp_resnet_blocks.1.ffn.1.weight"][0] == (4096, 4096)
    assert head["module.model.fc2.weight"][0] == (7, 4096)
    assert sum(int(np.prod(shape)) for shape, _ in head.values()) == 151_117_831
    proprio = {key: (shape, dtype) for key, shape, dtype in files["proprio_projector--100_checkpoint.pt"]}
    assert proprio["module.fc1.weight"] == ((4096, 8), torch.float32)
    assert sum(int(np.prod(shape)) for shape, _ in proprio.values()) == 16_818_176
    film = {key: shape for key, shape, _ in files["vision_backbone--100_checkpoint.pt"]}
    assert film["vision_backbone.featurizer.blocks.0.scale.weight"] == (1024, 4096)
    assert film["vision_backbone.fused_featurizer.blocks.26.shift.weight"] == (1152, 4096)
    assert film["vision_backbone.featurizer.blocks.3.block.attn.qkv.lora_A.default.weight"] == (32, 1024)
    assert film["vision_backbone.featurizer.blocks.3.block.attn.qkv.base_layer.weight"] == (3072, 1024)
    assert film["vision_backbone.featurizer.blocks.3.block.ls1.scale_factor"] == (1024,)
    film_parameters = sum(int(np.prod(shape)) for key, shape in film.items() if ".scale." in key or ".shift." in key)
    assert 450e6 < film_parameters < 460e6  # FACTS-OFT: about 255 M (SigLIP) + 201 M (DINOv2)


@pytest.fixture(scope="module")
def shallow_oft(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OFT-7B's widths (LIBERO layout, FiLM) at one Llama layer and two blocks per tower."""
    from openvla_ros.model.oft import OFTSpec

    spec = OFTSpec(chunk=8, action_dim=7, proprio_dim=8, num_images=2, film=True)
    return write_full_checkpoint(tmp_path_factory.mktemp("full") / "oft-shallow", seed=0, layers=1, vision_depth=2,
                                 max_shard_bytes=400 * 10**6, oft=spec)


def test_a_full_width_oft_write_loads_and_every_input_changes_the_chunk(shallow_oft: Path) -> None:
    """The official files load through the same code as OFT-7B's: the layout comes from config.json and the head
    shapes, FiLM's LoRA sublayers merge back to the weights in the safetensors, and the primary image, the wrist
    image, the proprio and the instruction each change the chunk."""
    from openvla_ros.model.full_size import draw_tensor
    from openvla_ros.model.oft_policy import OFTPolicy

    assert json.loads((shallow_oft / "config.json").read_text())["num_actions_chunk"] == 8
    policy = OFTPolicy.from_pretrained(str(shallow_oft), device="cpu", dtype="float32")  # as above: a faster forward
    spec = policy.model.spec
    assert (spec.chunk, spec.action_dim, spec.proprio_dim, spec.num_images, spec.film) == (8, 7, 8, 2, True)
    assert next(policy.model.action_head.parameters()).dtype == torch.float32
    qkv = "vision_backbone.featurizer.blocks.1.attn.qkv.weight"
    merged = policy.model.vla.state_dict()[qkv].float()
    torch.testing.assert_close(merged, draw_tensor(qkv, tuple(merged.shape), 0), atol=0.02, rtol=0.02)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, size=(120, 160, 3), dtype=np.uint8) for _ in range(3)]
    proprio = np.linspace(-1.0, 1.0, 8)

    def chunk(primary=0, wrist=1, state=proprio, instruction=INSTRUCTION) -> np.ndarray:
        return policy.predict_chunk(frames[primary], instruction, wrist_images=[frames[wrist]], proprio=state)

    base = chunk()
    assert base.shape == (8, 7) and np.isfinite(base).all()
    for name, other in (("primary image", chunk(primary=2)), ("wrist image", chunk(wrist=2)),
                        ("proprio", chunk(state=-proprio)), ("instruction", chunk(instruction="open the drawer"))):
        assert np.abs(other - base).max() > 1e-3, f"the {name} does not change the chunk at full width"
    policy.release()


def _header_bytes(path: Path) -> int:
    with open(path, "rb") as file:
        return 8 + int.from_bytes(file.read(8), "little")


def _first_logits(policy, image: np.ndarray, instruction: str) -> torch.Tensor:
    input_ids, pixel_values = policy.prepare_inputs(image, instruction)
    with torch.no_grad():
        logits = policy.model(input_ids, pixel_values).logits[0, -1].float()
    return logits[policy.action_tokenizer.first_action_id: policy.action_tokenizer.last_action_id + 1]


def _planned_headers() -> dict:
    from openvla_ros.model.memory import StoredTensor

    headers: dict = {}
    for tensor in plan_checkpoint(full_config()):
        headers.setdefault(Path(tensor.shard), []).append(StoredTensor(tensor.name, tensor.nbytes // 2, tensor.nbytes))
    return headers


def test_the_memory_estimate_of_openvla_7b_per_mode() -> None:
    from openvla_ros.model.memory import GIB, estimate_bytes, load_peak_bytes

    headers = _planned_headers()
    bf16 = estimate_bytes(headers, "none", torch.bfloat16)
    assert abs(bf16 - 15.08e9) < 0.01e9
    assert estimate_bytes(headers, "none", torch.float32) == 2 * bf16
    four = estimate_bytes(headers, "4bit", torch.bfloat16)
    eight = estimate_bytes(headers, "8bit", torch.bfloat16)
    assert 3.5 * GIB < four < 5.5 * GIB < eight < 9 * GIB  # the 6.5 B LLM weights quantised, the rest bf16
    assert load_peak_bytes(headers, "4bit", torch.bfloat16) - four * 1.05 < 1.1 * GIB, "one load group more, not a shard"


def test_a_load_that_does_not_fit_is_refused_before_it_starts_naming_what_fits() -> None:
    from openvla_ros.errors import CheckpointError
    from openvla_ros.model.memory import GIB, check_fits

    headers = _planned_headers()
    cpu = torch.device("cpu")
    with pytest.raises(CheckpointError, match=r"needs about 3\d\.\d GiB to load in float32 .* 12\.0 GiB are available; "
                       r".*quantization 4bit .*: use that"):
        check_fits(Path("openvla-7b"), headers, "none", torch.float32, cpu, available=12 * GIB)
    with pytest.raises(CheckpointError, match="no mode fits"):
        check_fits(Path("openvla-7b"), headers, "4bit", torch.bfloat16, cpu, available=2 * GIB)
    check_fits(Path("openvla-7b"), headers, "4bit", torch.bfloat16, cpu, available=24 * GIB)


def test_a_truncated_shard_or_a_wrong_total_size_names_the_file(shallow_full_width: Path, tmp_path: Path) -> None:
    import shutil

    from openvla_ros.errors import CheckpointError
    from openvla_ros.model.loading import load_model

    copy = tmp_path / "copy"
    shutil.copytree(shallow_full_width, copy)
    index_path = copy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["metadata"]["total_size"] += 2
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model.safetensors.index.json says total_size"):
        load_model(copy, device="cpu", dtype="bfloat16")
    shard = sorted(copy.glob("model-*.safetensors"))[-1]
    with open(shard, "r+b") as file:
        file.truncate(shard.stat().st_size - 1000)
    with pytest.raises(CheckpointError, match=f"{shard.name} is corrupt or truncated"):
        load_model(copy, device="cpu", dtype="bfloat16")


def test_dtype_auto_on_the_cpu_is_bfloat16_for_a_large_model(shallow_full_width: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from openvla_ros.model import loading

    monkeypatch.setattr(loading, "AUTO_FLOAT32_LIMIT", 10**8)  # the shallow model has about 0.6 B
    model = loading.load_model(shallow_full_width, device="cpu", dtype="auto")
    assert next(model.parameters()).dtype == torch.bfloat16
    del model


def test_the_gpu_check_runs_its_cpu_path_end_to_end(tmp_path: Path) -> None:
    """``benchmarks/gpu_check.py --device cpu --size tiny``: every row (token and OFT, bf16 / 8-bit / 4-bit, one
    image and two images + proprio) timed, one JSON, one table; so the script cannot rot unseen."""
    out = tmp_path / "gpu_check.json"
    result = subprocess.run(
        [sys.executable, str(Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"), "--device", "cpu",
         "--size", "tiny", "--steps", "2", "--warmup", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [(row["model"], row["mode"], row.get("images", 1)) for row in rows] == [
        ("token", "bf16", 1), ("token", "8bit", 1), ("token", "4bit", 1),
        ("oft", "bf16", 1), ("oft", "8bit", 1), ("oft", "4bit", 1),
        ("oft", "bf16", 2), ("oft", "8bit", 2), ("oft", "4bit", 2)]
    for row in rows:
        assert row["steps"] == 2 and row["median_ms"] > 0 and row["p95_ms"] >= row["median_ms"]
        assert row["actions_per_s"] == pytest.approx((8 if row["model"] == "oft" else 1) * row["hz"])
    assert report["info"]["device"] == "cpu" and "skipped" in report["checks"]["cuda_against_cpu"]
    assert "| oft + proprio 8 | 4bit | 2 |" in result.stdout
