"""bitsandbytes 8-bit / 4-bit loading on CPU, and LoRA adapters (unmerged and merged)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from openvla_ros.errors import CheckpointError, QuantizationError
from openvla_ros.model.loading import load_model
from openvla_ros.model.policy import OpenVLAPolicy

INSTRUCTION = "put the green block on the blue block"


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(96, 128, 3), dtype=np.uint8)


def _action_logits(policy: OpenVLAPolicy, image: np.ndarray) -> torch.Tensor:
    input_ids, pixel_values = policy.prepare_inputs(image, INSTRUCTION)
    with torch.no_grad():
        logits = policy.model(input_ids, pixel_values).logits[0, -1].float()
    return logits[policy.action_tokenizer.first_action_id : policy.action_tokenizer.last_action_id + 1]


@pytest.fixture(scope="module")
def full_precision(tiny_checkpoint: Path) -> OpenVLAPolicy:
    return OpenVLAPolicy.from_pretrained(str(tiny_checkpoint), device="cpu")


@pytest.mark.parametrize(("quantization", "layer_type"), [("8bit", "Linear8bitLt"), ("4bit", "Linear4bit")])
def test_quantised_load_predicts_close_to_full_precision(
    tiny_checkpoint: Path, full_precision: OpenVLAPolicy, quantization: str, layer_type: str
) -> None:
    policy = OpenVLAPolicy.from_pretrained(str(tiny_checkpoint), quantization=quantization, device="cpu")
    model = policy.model
    assert type(model.language_model.model.layers[0].self_attn.q_proj).__name__ == layer_type
    assert type(model.language_model.model.layers[1].mlp.down_proj).__name__ == layer_type
    # vision, projector and lm_head stay unquantised
    assert type(model.language_model.lm_head) is nn.Linear
    assert type(model.projector.fc1) is nn.Linear
    assert type(model.vision_backbone.fused_featurizer.blocks[0].mlp.fc1) is nn.Linear
    for seed in range(3):
        image = _image(seed)
        action = policy.predict_action(image, INSTRUCTION)
        assert action.shape == (7,) and np.all(np.isfinite(action))
        quantised, reference = _action_logits(policy, image), _action_logits(full_precision, image)
        correlation = torch.corrcoef(torch.stack([quantised, reference]))[0, 1]
        assert correlation > 0.9, f"{quantization} logits diverge from fp32 (corr {correlation:.3f})"


def test_quantization_without_bitsandbytes_is_a_clear_error(tiny_checkpoint: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(QuantizationError, match="needs bitsandbytes.*pip install bitsandbytes"):
        load_model(tiny_checkpoint, quantization="4bit", device="cpu")


@pytest.fixture(scope="module")
def adapter_dir(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from peft import LoraConfig, get_peft_model

    model = load_model(tiny_checkpoint, device="cpu")
    torch.manual_seed(0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "fc1", "fc2", "fc3"]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(20.0)
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    peft_model.save_pretrained(str(out))
    return out


def test_lora_adapter_merged_equals_unmerged_and_changes_the_model(
    tiny_checkpoint: Path, full_precision: OpenVLAPolicy, adapter_dir: Path
) -> None:
    merged = OpenVLAPolicy.from_pretrained(str(tiny_checkpoint), adapter=str(adapter_dir), device="cpu")
    unmerged = OpenVLAPolicy.from_pretrained(
        str(tiny_checkpoint), adapter=str(adapter_dir), merge_adapter=False, device="cpu"
    )
    assert not any("lora_" in name for name, _ in merged.model.named_parameters())
    assert any("lora_" in name for name, _ in unmerged.model.named_parameters())
    changed = 0
    for seed in range(4):
        image = _image(seed)
        merged_logits, unmerged_logits = _action_logits(merged, image), _action_logits(unmerged, image)
        # fp32 rounding differs between W + BA and W x + B(A x); the adapter's effect is 100x larger (below)
        assert (merged_logits - unmerged_logits).abs().max() <= 1e-4 * merged_logits.abs().max() + 1e-4
        np.testing.assert_array_equal(merged.predict_action(image, INSTRUCTION), unmerged.predict_action(image, INSTRUCTION))
        base_logits = _action_logits(full_precision, image)
        changed += bool((merged_logits - base_logits).abs().max() > 1e-2 * base_logits.abs().max())
    assert changed == 4, "the adapter had no effect on the logits"


def test_adapter_on_quantised_base_stays_unmerged(tiny_checkpoint: Path, adapter_dir: Path) -> None:
    policy = OpenVLAPolicy.from_pretrained(
        str(tiny_checkpoint), adapter=str(adapter_dir), quantization="4bit", device="cpu"
    )
    assert any("lora_" in name for name, _ in policy.model.named_parameters())
    assert np.all(np.isfinite(policy.predict_action(_image(0), INSTRUCTION)))


def test_bad_adapter_directory(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a LoRA adapter directory"):
        OpenVLAPolicy.from_pretrained(str(tiny_checkpoint), adapter=str(tmp_path), device="cpu")


def test_weights_go_straight_to_the_target_device_in_the_compute_dtype(tiny_checkpoint: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA path's placement, seen here with the ``meta`` device standing in for CUDA: every weight arrives
    on the target device in the compute dtype as it is read (no CPU copy of the model to move afterwards: the
    loader moves only the buffers at the end), and a 4-bit load keeps the towers and projector in bf16."""
    from openvla_ros.model import loading

    monkeypatch.setattr(loading, "resolve_device", lambda device: torch.device("meta"))
    model = load_model(tiny_checkpoint, device="cuda", dtype="bfloat16")
    placed = {name: (tensor.device.type, tensor.dtype) for name, tensor in model.state_dict().items()}
    assert placed and all(device == "meta" for device, _ in placed.values())
    assert all(dtype == torch.bfloat16 for device, dtype in placed.values() if dtype.is_floating_point)
    assert all(buffer.device.type == "meta" for buffer in model.buffers())


def test_a_4bit_load_keeps_towers_projector_and_head_in_the_compute_dtype(tiny_checkpoint: Path) -> None:
    policy = OpenVLAPolicy.from_pretrained(str(tiny_checkpoint), quantization="4bit", dtype="bfloat16", device="cpu")
    model = policy.model
    for part in (model.vision_backbone, model.projector, model.language_model.lm_head,
                 model.language_model.model.embed_tokens):
        assert {p.dtype for p in part.parameters()} == {torch.bfloat16}
    assert model.language_model.model.layers[0].mlp.up_proj.weight.dtype == torch.uint8  # packed nf4
    input_ids, pixel_values = policy.prepare_inputs(_image(0), INSTRUCTION)
    assert pixel_values.dtype == torch.float32  # uploaded as computed; the towers cast it to their dtype
    assert model.vision_backbone(pixel_values).dtype == torch.bfloat16


def test_upload_copies_to_the_device_and_leaves_the_host_tensor_alone() -> None:
    from openvla_ros.model.processor import upload

    host = torch.arange(6, dtype=torch.float32)
    placed = upload(host, torch.device("meta"))
    assert placed.device.type == "meta" and placed.shape == host.shape and host.device.type == "cpu"
    same = upload(host, torch.device("cpu"))
    assert torch.equal(same, host)
