"""Converting Prismatic training checkpoints: equal outputs after conversion, one clear error otherwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from openvla_ros.errors import CheckpointError
from openvla_ros.model import convert_prismatic
from openvla_ros.model.convert_prismatic import ConversionResult, convert_prismatic_checkpoint, main
from openvla_ros.model.loading import weight_files
from openvla_ros.model.policy import OpenVLAPolicy
from openvla_ros.model.prismatic_config import build_config, model_settings, read_run_config
from openvla_ros.model.tiny import make_tiny_prismatic_run

INSTRUCTION = "pick up the red block"
TINY_SETTINGS = {
    "vision_backbone_id": "dinosiglip-vit-so-224px",
    "llm_backbone_id": "llama2-7b-pure",
    "arch_specifier": "no-align+fused-gelu-mlp",
    "image_resize_strategy": "resize-naive",
}


@pytest.fixture(scope="module")
def prismatic_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_prismatic_run(tmp_path_factory.mktemp("prismatic") / "run", seed=0)


@pytest.fixture(scope="module")
def converted(prismatic_run: Path, tmp_path_factory: pytest.TempPathFactory) -> ConversionResult:
    return convert_prismatic_checkpoint(prismatic_run, tmp_path_factory.mktemp("out") / "converted", dtype="fp32")


def _weights(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in weight_files(checkpoint_dir):
        with safe_open(str(path), framework="pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})
    return tensors


def _variant(run: Path, out: Path, mutate: Callable[[dict], None]) -> Path:
    """Returns a copy of the run whose checkpoint ``mutate`` changed in place."""
    (out / "checkpoints").mkdir(parents=True)
    for name in ("config.json", "dataset_statistics.json"):
        (out / name).write_bytes((run / name).read_bytes())
    (out / "tokenizer").symlink_to(run / "tokenizer")
    data = torch.load(run / "checkpoints" / "latest-checkpoint.pt", weights_only=True)
    mutate(data)
    torch.save(data, out / "checkpoints" / "latest-checkpoint.pt")
    return out


def test_converted_run_has_the_tiny_checkpoints_weights_and_config(
    converted: ConversionResult, tiny_checkpoint: Path
) -> None:
    out = converted.out_dir
    original, result = _weights(tiny_checkpoint), _weights(out)
    assert sorted(result) == sorted(original) and converted.num_weights == len(original)
    assert all(torch.equal(result[key], original[key]) for key in original)
    assert "vision_backbone.featurizer.blocks.0.ls1.scale_factor" in result
    config, tiny = (json.loads((path / "config.json").read_text()) for path in (out, tiny_checkpoint))
    assert config["model_type"] == "openvla" and config["torch_dtype"] == "float32"
    for key in ("timm_model_ids", "image_sizes", "use_fused_vision_backbone", "timm_override_args", "text_config",
                "norm_stats", "llm_backbone_id"):
        assert config[key] == tiny[key], key
    assert config["vision_backbone_id"] == "dinosiglip-vit-so-224px"
    assert config["arch_specifier"] == "no-align+fused-gelu-mlp"
    statistics = json.loads((out / "dataset_statistics.json").read_text())
    assert statistics == json.loads((tiny_checkpoint / "dataset_statistics.json").read_text())
    written = json.loads((out / "preprocessor_config.json").read_text())
    assert {key: value for key, value in written.items() if not key.startswith("tvf_")} == {
        "image_processor_type": "PrismaticImageProcessor",
        "processor_class": "PrismaticProcessor",
        "use_fused_vision_backbone": True,
        "image_resize_strategy": "resize-naive",
        "input_sizes": [[3, 224, 224], [3, 224, 224]],
        "interpolations": ["bicubic", "bicubic"],
        "means": [[0.485, 0.456, 0.406], [0.5, 0.5, 0.5]],
        "stds": [[0.229, 0.224, 0.225], [0.5, 0.5, 0.5]],
    }
    # and the form the official processor's apply_transform reads
    assert written["tvf_normalize_params"] == [
        {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "inplace": False},
        {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "inplace": False},
    ]
    assert written["tvf_resize_params"][0]["size"] == [224, 224] and written["tvf_do_letterbox"] is False
    assert (out / "tokenizer.model").read_bytes() == (tiny_checkpoint / "tokenizer.model").read_bytes()
    assert sorted(p.name for p in out.parent.iterdir()) == ["converted"]  # no staging left beside it


def test_converted_run_gives_the_same_logits_and_actions(converted: ConversionResult, tiny_checkpoint: Path) -> None:
    original = OpenVLAPolicy.from_pretrained(str(tiny_checkpoint), device="cpu")
    result = OpenVLAPolicy.from_pretrained(str(converted.out_dir), device="cpu")
    rng = np.random.default_rng(3)
    for image in [rng.integers(0, 256, size=(120, 160, 3), dtype=np.uint8) for _ in range(3)]:
        input_ids, pixel_values = original.prepare_inputs(image, INSTRUCTION)
        converted_ids, converted_pixels = result.prepare_inputs(image, INSTRUCTION)
        assert torch.equal(input_ids, converted_ids) and torch.equal(pixel_values, converted_pixels)
        with torch.no_grad():
            logits = original.model(input_ids, pixel_values).logits
            assert torch.equal(result.model(input_ids, pixel_values).logits, logits)
        np.testing.assert_array_equal(result.predict_action(image, INSTRUCTION), original.predict_action(image, INSTRUCTION))
    test_image = np.random.default_rng(0).integers(0, 256, size=(224, 224, 3), dtype=np.uint8)
    assert converted.unnorm_key == "tiny_demo"
    np.testing.assert_array_equal(converted.action, original.predict_action(test_image, convert_prismatic.SELF_CHECK_INSTRUCTION))


def _drop_projector_layer(data: dict) -> None:
    del data["model"]["projector"]["projector.4.weight"], data["model"]["projector"]["projector.4.bias"]


def _extra_llm_block(data: dict) -> None:
    data["model"]["llm_backbone"]["llm.model.layers.2.mlp.up_proj.weight"] = torch.zeros(128, 64)


def _extra_module(data: dict) -> None:
    data["model"]["action_head"] = {"head.fc.weight": torch.zeros(7, 64)}


def _wrong_shape(data: dict) -> None:
    data["model"]["llm_backbone"]["llm.lm_head.weight"] = torch.zeros(32000, 64)


def _frozen_vision(data: dict) -> None:
    del data["model"]["vision_backbone"]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (_drop_projector_layer, ["2 missing weight(s) [projector:projector.4.weight, projector:projector.4.bias]"]),
        (_extra_llm_block, ["1 unknown weight(s) [llm_backbone:llm.model.layers.2.mlp.up_proj.weight]"]),
        (_extra_module, ["1 unknown weight(s) [action_head:head.fc.weight]"]),
        (_wrong_shape, ["1 weight(s) with the wrong shape [llm_backbone:llm.lm_head.weight [32000, 64] (expected [32064, 64])]"]),
        (_frozen_vision, ["missing weight(s) [vision_backbone:dino_featurizer.", "no vision_backbone weights at all"]),
    ],
)
def test_weights_that_do_not_fit_are_named_and_nothing_is_written(
    prismatic_run: Path, tmp_path: Path, mutate: Callable[[dict], None], expected: list[str]
) -> None:
    run = _variant(prismatic_run, tmp_path / "run", mutate)
    out = tmp_path / "out" / "converted"
    with pytest.raises(CheckpointError) as error:
        convert_prismatic_checkpoint(run, out, dtype="fp32")
    assert all(part in str(error.value) for part in expected), str(error.value)
    assert "nothing was written" in str(error.value)
    assert not out.exists() and (not out.parent.exists() or list(out.parent.iterdir()) == [])


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (str(self.marker),)


def test_pickle_with_a_python_object_is_refused_without_running_it(prismatic_run: Path, tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    run = _variant(prismatic_run, tmp_path / "run", lambda data: data["model"].update(extra=_RunsCodeWhenUnpickled(marker)))
    with pytest.raises(CheckpointError, match=r"is refused: .*other than tensors.*\(os\.makedirs\).*weights_only=True"):
        convert_prismatic_checkpoint(run, tmp_path / "out", dtype="fp32")
    assert not marker.exists() and not (tmp_path / "out").exists()
    strings = _variant(prismatic_run, tmp_path / "run2", lambda data: data["model"]["projector"].update(step="12"))
    with pytest.raises(CheckpointError, match=r"not tensors: \[projector:step\]"):
        convert_prismatic_checkpoint(strings, tmp_path / "out", dtype="fp32")


def test_featurizer_and_fused_featurizer_names_convert_too(prismatic_run: Path, tmp_path: Path, converted) -> None:
    def rename(data: dict) -> None:
        towers = {"dino_featurizer.": "featurizer.", "siglip_featurizer.": "fused_featurizer."}
        vision = data["model"]["vision_backbone"]
        for key in list(vision):
            prefix = next(p for p in towers if key.startswith(p))
            vision[towers[prefix] + key[len(prefix):]] = vision.pop(key)

    run = _variant(prismatic_run, tmp_path / "run", rename)
    result = convert_prismatic_checkpoint(run / "checkpoints" / "latest-checkpoint.pt", tmp_path / "out", check=False)
    assert result.action is None and result.dtype == "bfloat16"
    weights, reference = _weights(tmp_path / "out"), _weights(converted.out_dir)
    assert sorted(weights) == sorted(reference)
    assert all(weights[key].dtype == torch.bfloat16 and torch.equal(weights[key], reference[key].bfloat16())
               for key in reference)


def test_a_failed_self_check_leaves_nothing(prismatic_run: Path, tmp_path: Path, monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise CheckpointError("the converted checkpoint fails its self-check: broken")

    monkeypatch.setattr(convert_prismatic, "self_check", fail)
    (tmp_path / "out").mkdir()  # an empty OUT_DIR is accepted, and kept empty on failure
    with pytest.raises(CheckpointError, match="self-check"):
        convert_prismatic_checkpoint(prismatic_run, tmp_path / "out", dtype="fp32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and list((tmp_path / "out").iterdir()) == []


def test_cli_converts_a_pt_file_and_prints_the_self_check(prismatic_run: Path, tmp_path: Path, capsys) -> None:
    code = main([str(prismatic_run / "checkpoints" / "latest-checkpoint.pt"), str(tmp_path / "out"), "--dtype", "fp32",
                 "--tokenizer-from", str(prismatic_run / "tokenizer")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and lines[0].startswith(f"wrote {tmp_path / 'out'} (130 weights, float32)")
    names = [field.split("=")[0] for field in lines[1].split(": ", 1)[1].split()]
    assert lines[1].startswith("self-check (tiny_demo") and names == ["dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "does not exist; pass a Prismatic run directory"),
        ("not-empty", "exists and is not empty"),
        ("no-run-config", "has no config.json or config.yaml"),
    ],
)
def test_cli_bad_input_gets_one_error_line(prismatic_run: Path, tmp_path: Path, capsys, case: str, message: str) -> None:
    source, out = prismatic_run, tmp_path / "out"
    if case == "missing":
        source = tmp_path / "nowhere"
    elif case == "not-empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    else:
        (tmp_path / "checkpoints").mkdir()
        (tmp_path / "checkpoints" / "step-000010.pt").write_bytes(b"")
        source = tmp_path / "checkpoints" / "step-000010.pt"
    code = main([str(source), str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert case == "not-empty" or not out.exists()


def _run_cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "openvla_ros.convert_prismatic", *args],
                          capture_output=True, text=True, timeout=300, env=env)


def test_cli_refuses_an_unsafe_pickle_without_a_traceback(prismatic_run: Path, tmp_path: Path) -> None:
    run = _variant(prismatic_run, tmp_path / "run", lambda data: data.update(model=_RunsCodeWhenUnpickled(tmp_path / "x")))
    result = _run_cli(str(run), str(tmp_path / "out"), home=tmp_path / "hf")
    err = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(err) == 1 and err[0].startswith("error: ") and "refused" in err[0], result.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "out").exists()


def test_default_tokenizer_offline_names_the_hub_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest-checkpoint.pt").write_bytes(b"")
    (run / "config.json").write_text(json.dumps({"vla": {"base_vlm": "prism-dinosiglip-224px+7b"}}))
    (run / "dataset_statistics.json").write_text(json.dumps({"bridge_orig": {"action": {}}}))
    result = _run_cli(str(run), str(tmp_path / "out"), home=tmp_path / "hf")
    err = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(err) == 1 and err[0].startswith("error: "), result.stderr
    assert "meta-llama/Llama-2-7b-hf" in err[0] and "hf download" in err[0] and "--tokenizer-from" in err[0]
    assert not (tmp_path / "out").exists()


def test_run_settings_come_from_the_section_or_the_base_vlm(tmp_path: Path) -> None:
    assert model_settings({"vla": {"base_vlm": "prism-dinosiglip-224px+7b"}}, tmp_path) == TINY_SETTINGS
    base = tmp_path / "base-vlm"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model": {**TINY_SETTINGS, "llm_backbone_id": "llama2-7b-chat"}}))
    assert model_settings({"vla": {"base_vlm": str(base)}}, tmp_path)["llm_backbone_id"] == "llama2-7b-chat"
    (tmp_path / "config.yaml").write_text("vla:\n  base_vlm: prism-dinosiglip-224px+7b\n  vision_backbone_id: dinov2-vit-l\n")
    assert model_settings(read_run_config(tmp_path), tmp_path)["vision_backbone_id"] == "dinov2-vit-l"
    with pytest.raises(CheckpointError, match="does not name vision_backbone_id.*base_vlm 'mystery'"):
        model_settings({"vla": {"base_vlm": "mystery"}}, tmp_path)


def test_backbone_ids_map_to_the_openvla_architecture() -> None:
    config = build_config(TINY_SETTINGS, {}, {"bridge_orig": {"action": {}}})
    assert config.timm_model_ids == ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"]
    assert config.use_fused_vision_backbone and config.image_sizes == [224, 224]
    text = config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.vocab_size, text.pad_token_id) == (4096, 32, 32064, 32000)
    assert config.extra["hf_llm_id"] == "meta-llama/Llama-2-7b-hf"
    single = build_config({**TINY_SETTINGS, "vision_backbone_id": "siglip-vit-so400m", "arch_specifier": "gelu-mlp"},
                          {}, {})
    assert single.timm_model_ids == ["vit_so400m_patch14_siglip_224"] and not single.use_fused_vision_backbone
    with pytest.raises(CheckpointError, match="'clip-vit-l' is not supported; supported: dinosiglip-vit-so-224px, "
                                              "siglip-vit-so400m, dinov2-vit-l"):
        build_config({**TINY_SETTINGS, "vision_backbone_id": "clip-vit-l"}, {}, {})
    with pytest.raises(CheckpointError, match="LLM backbone 'phi-2-3b' is not supported"):
        build_config({**TINY_SETTINGS, "llm_backbone_id": "phi-2-3b"}, {}, {})
    with pytest.raises(CheckpointError, match="uses a fused-gelu-mlp projector with 2 vision tower"):
        build_config({**TINY_SETTINGS, "arch_specifier": "no-align+gelu-mlp"}, {}, {})
