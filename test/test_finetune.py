"""LoRA / QLoRA fine-tuning on a tiny RLDS dataset written by the converter's writer, on the CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from toy_rlds import write_toy_dataset

from openvla_ros.errors import DatasetError, TrainingError
from openvla_ros.finetune.config import FinetuneConfig, load_config
from openvla_ros.finetune.data import SampleBuilder, collate, load_frames, open_rlds
from openvla_ros.finetune.evaluation import action_metrics, predict_frames
from openvla_ros.finetune.trainer import build_trainable_model, run_finetune
from openvla_ros.model.loading import load_tokenizer
from openvla_ros.model.policy import OpenVLAPolicy
from openvla_ros.model.processor import ImageSettings

REPO = Path(__file__).resolve().parents[1]
NAME = "toy_reach"


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_toy_dataset(tmp_path_factory.mktemp("rlds"), NAME, steps=8, x_start=20, x_step=20)


def _config(tiny: Path, data: Path, out: Path, **overrides) -> FinetuneConfig:
    settings = dict(vla_path=str(tiny), data_dir=str(data), dataset_name=NAME, out=str(out), max_steps=60,
                    batch_size=4, learning_rate=5e-3, lora_rank=16, save_steps=30, eval_steps=30, eval_batches=2,
                    log_steps=5, image_aug=False, device="cpu", seed=3)
    settings.update(overrides)
    return FinetuneConfig(**settings)


@pytest.fixture(scope="module")
def trained(tiny_checkpoint: Path, dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("run") / "run"
    config = _config(tiny_checkpoint, dataset_dir, out)
    from openvla_ros.finetune.trainer import Trainer

    trainer = Trainer(config)
    first = trainer.evaluate()
    metrics = trainer.run()
    return out, first, metrics


def test_loss_falls_and_action_accuracy_rises(trained) -> None:
    _, before, metrics = trained
    assert metrics["train"]["loss"] < 0.5 * before["loss"]
    assert metrics["val"]["loss"] < before["loss"]
    assert metrics["train"]["action_accuracy"] > before["action_accuracy"] + 0.3
    assert metrics["val"]["l1_normalized"] < before["l1_normalized"]


def test_run_writes_adapter_merged_model_statistics_and_logs(trained, dataset_dir: Path) -> None:
    out, _, _ = trained
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "merged" / "config.json").is_file() and (out / "merged" / "tokenizer.json").is_file()
    statistics = json.loads((out / "dataset_statistics.json").read_text())
    written = json.loads((dataset_dir / NAME / "1.0.0" / "dataset_statistics.json").read_text())
    assert statistics == written
    assert json.loads((out / "merged" / "dataset_statistics.json").read_text()) == written
    assert OpenVLAPolicy.from_pretrained(str(out / "merged"), device="cpu").unnorm_key == NAME
    merged_config = json.loads((out / "merged" / "config.json").read_text())
    assert merged_config["norm_stats"][NAME] == written[NAME] and "tiny_demo" in merged_config["norm_stats"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000030", "step-000060"]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert not list(out.glob(".*")) and not list((out / "checkpoints").glob(".*")), "staging left behind"


def test_merged_model_reproduces_training_actions_better_than_base(trained, tiny_checkpoint: Path,
                                                                   dataset_dir: Path) -> None:
    out, _, _ = trained
    frames = load_frames(open_rlds(dataset_dir, NAME), "train")
    tuned = OpenVLAPolicy.from_pretrained(str(out / "merged"), unnorm_key=NAME, device="cpu")
    base = OpenVLAPolicy.from_pretrained(str(tiny_checkpoint), device="cpu")
    base.normalizer = tuned.normalizer  # same physical units for a fair comparison
    tuned_metrics = action_metrics(tuned, frames, *predict_frames(tuned, frames))
    base_metrics = action_metrics(base, frames, *predict_frames(base, frames))
    assert tuned_metrics["token_accuracy"] > base_metrics["token_accuracy"] + 0.2
    arm = ("dx", "dy", "dz", "droll", "dpitch", "dyaw")
    tuned_arm = sum(tuned_metrics["l1_per_dimension"][name] for name in arm)
    base_arm = sum(base_metrics["l1_per_dimension"][name] for name in arm)
    assert tuned_arm < 0.5 * base_arm
    assert tuned_metrics["l1_mean"] <= base_metrics["l1_mean"]
    unmerged = OpenVLAPolicy.from_pretrained(str(tiny_checkpoint), adapter=str(out / "adapter"),
                                             merge_adapter=False, unnorm_key="tiny_demo", device="cpu")
    unmerged.normalizer = tuned.normalizer
    ids, _ = predict_frames(unmerged, frames[:6])
    np.testing.assert_array_equal(ids, predict_frames(tuned, frames[:6])[0])


def _adapter_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_resumed_training_matches_uninterrupted(tiny_checkpoint: Path, dataset_dir: Path, tmp_path: Path) -> None:
    settings = dict(max_steps=6, batch_size=2, save_steps=3, eval_steps=0, image_aug=True, learning_rate=1e-3,
                    lora_rank=4, grad_accumulation_steps=2, lr_schedule="cosine", warmup_steps=2)
    out = tmp_path / "run"
    run_finetune(_config(tiny_checkpoint, dataset_dir, out, **settings))
    straight = _adapter_weights(out)
    assert any(bool((value != 0).any()) for key, value in straight.items() if "lora_B" in key)
    # a run killed after its step-3 checkpoint: later checkpoints and outputs never happened
    for name in ("checkpoints/step-000006", "adapter", "merged"):
        shutil.rmtree(out / name)
    with pytest.raises(TrainingError, match="pass --resume"):
        run_finetune(_config(tiny_checkpoint, dataset_dir, out, **settings))
    run_finetune(_config(tiny_checkpoint, dataset_dir, out, resume=True, **settings))
    resumed = _adapter_weights(out)
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-7)


def test_resume_without_checkpoint_is_a_clear_error(tiny_checkpoint: Path, dataset_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="holds no checkpoint; drop --resume"):
        run_finetune(_config(tiny_checkpoint, dataset_dir, tmp_path / "fresh", resume=True))


def _lora_gradients(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def test_qlora_4bit_gradients_are_correct_after_an_eval_forward(tiny_checkpoint: Path, dataset_dir: Path,
                                                                  tmp_path: Path) -> None:
    config = _config(tiny_checkpoint, dataset_dir, tmp_path / "q", quantization="4bit", lora_rank=4)
    frames = load_frames(open_rlds(dataset_dir, NAME), "train")[:2]
    statistics = json.loads((dataset_dir / NAME / "1.0.0" / "dataset_statistics.json").read_text())[NAME]
    samples = SampleBuilder(load_tokenizer(tiny_checkpoint), statistics, ImageSettings(), image_aug=False)
    batch = collate([samples(frame, None) for frame in frames], pad_token_id=32000)

    fresh = build_trainable_model(config, tiny_checkpoint, "cpu")
    assert type(fresh.get_base_model().language_model.model.layers[0].mlp.up_proj.base_layer).__name__ == "Linear4bit"
    expected = _lora_gradients(fresh, batch)
    used = build_trainable_model(config, tiny_checkpoint, "cpu")
    used.eval()
    with torch.no_grad():
        used(**batch)  # an evaluation pass, as validation does between training steps
    used.train()
    actual = _lora_gradients(used, batch)
    assert expected.keys() == actual.keys() and len(expected) > 0
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)
    full = build_trainable_model(_config(tiny_checkpoint, dataset_dir, tmp_path / "f", lora_rank=4), tiny_checkpoint, "cpu")
    reference = _lora_gradients(full, batch)
    name = next(n for n in expected if "language_model" in n and "lora_B" in n)
    cosine = torch.nn.functional.cosine_similarity(expected[name].flatten(), reference[name].flatten(), dim=0)
    assert cosine > 0.9, f"4-bit LoRA gradient far from the full-precision one (cosine {cosine:.3f})"


def test_qlora_turns_off_the_cpu_repacking_path_on_every_4bit_layer(tiny_checkpoint: Path, dataset_dir: Path,
                                                                     tmp_path: Path, monkeypatch) -> None:
    """On CPUs with AVX512-BF16 bitsandbytes repacks 4-bit weights after a no-grad forward, and later
    gradients are wrong; this CPU may lack the feature, so the detection is forced on here."""
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    model = build_trainable_model(_config(tiny_checkpoint, dataset_dir, tmp_path / "q", quantization="4bit",
                                          lora_rank=4), tiny_checkpoint, "cpu")
    layers = [module for module in model.modules() if type(module).__name__ == "Linear4bit"]
    assert len(layers) >= 14, "every linear layer of the 2-layer Llama is 4-bit"
    assert [layer.support_avx512bf16_for_cpu for layer in layers] == [False] * len(layers)


def test_torchrun_two_processes_train_and_write_once(tiny_checkpoint: Path, dataset_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(REPO / "training" / "finetune.py"), "--vla-path", str(tiny_checkpoint), "--data-dir", str(dataset_dir),
               "--dataset-name", NAME, "--out", str(out), "--max-steps", "2", "--batch-size", "1", "--lora-rank", "4",
               "--save-steps", "1", "--eval-steps", "0", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("done: outputs in") == 2
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    assert (out / "merged" / "config.json").is_file()


def test_evaluate_cli_prints_json_and_writes_png(trained, dataset_dir: Path, tmp_path: Path, capsys) -> None:
    sys.path.insert(0, str(REPO / "training"))
    try:
        import evaluate
    finally:
        sys.path.remove(str(REPO / "training"))
    out, _, _ = trained
    plot = tmp_path / "plot.png"
    code = evaluate.main(["--model", str(out / "merged"), "--data-dir", str(dataset_dir), "--dataset-name", NAME,
                          "--split", "val", "--plot", str(plot), "--device", "cpu"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["unnorm_key"] == NAME and report["num_steps"] > 0
    assert set(report["l1_per_dimension"]) == {"dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"}
    assert 0.0 <= report["token_accuracy"] <= 1.0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000


def test_bad_datasets_and_settings(tiny_checkpoint: Path, dataset_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no dataset 'missing'"):
        open_rlds(dataset_dir, "missing")
    copy = tmp_path / "copy"
    shutil.copytree(dataset_dir, copy)
    (copy / NAME / "1.0.0" / "dataset_statistics.json").unlink()
    with pytest.raises(DatasetError, match="no dataset_statistics.json"):
        run_finetune(_config(tiny_checkpoint, copy, tmp_path / "out"))
    features = copy / NAME / "1.0.0" / "features.json"
    features.write_text(features.read_text().replace("language_instruction", "instruction_text"))
    with pytest.raises(DatasetError, match="does not have the RLDS step layout"):
        open_rlds(copy, NAME)
    with pytest.raises(ValueError, match="lora_rank must be >= 0"):
        load_config(["--data-dir", "d", "--dataset-name", "n", "--lora-rank", "-1"])
    settings = tmp_path / "settings.yaml"
    settings.write_text("data_dir: d\ndataset_name: n\nlearning_rate: 0.01\nbatch-size: 2\n")
    config = load_config(["--config", str(settings), "--batch-size", "3"])
    assert (config.learning_rate, config.batch_size, config.lora_alpha) == (0.01, 3, 16.0)
    # YAML reads 5e-4 as a string and 8 as an int: each setting is taken as its field's type
    settings.write_text("data_dir: d\ndataset_name: n\nlearning_rate: 5e-4\nlora_alpha: 8\nimage_aug: 'no'\n")
    config = load_config(["--config", str(settings)])
    assert (config.learning_rate, config.lora_alpha, config.image_aug) == (5e-4, 8.0, False)
    assert isinstance(config.lora_alpha, float)
    settings.write_text("data_dir: d\ndataset_name: n\nmax_steps: lots\n")
    with pytest.raises(ValueError, match="max_steps must be an int, got 'lots'"):
        load_config(["--config", str(settings)])
    settings.write_text("data_dir: d\ndataset_name: n\nlearning_rte: 0.01\n")
    with pytest.raises(ValueError, match="unknown setting 'learning_rte'"):
        load_config(["--config", str(settings)])


def test_cli_resume_continues_a_run_from_its_newest_checkpoint(tiny_checkpoint: Path, dataset_dir: Path,
                                                               tmp_path: Path) -> None:
    out = tmp_path / "cli"
    base = [sys.executable, str(REPO / "training" / "finetune.py"), "--vla-path", str(tiny_checkpoint),
            "--data-dir", str(dataset_dir), "--dataset-name", NAME, "--out", str(out), "--batch-size", "1",
            "--lora-rank", "4", "--save-steps", "1", "--eval-steps", "0", "--device", "cpu", "--image-aug", "false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run([*base, "--max-steps", "2"], capture_output=True, text=True, timeout=600, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    again = subprocess.run([*base, "--max-steps", "3"], capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 2 and "already holds checkpoints; pass --resume" in again.stderr
    resumed = subprocess.run([*base, "--max-steps", "3", "--resume"], capture_output=True, text=True, timeout=600,
                             env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "at step 2" in resumed.stderr
    assert "step-000003" in {p.name for p in (out / "checkpoints").iterdir()}
    assert (out / "merged" / "config.json").is_file()


def test_training_normalises_images_with_the_base_checkpoints_preprocessor_settings(
    tiny_checkpoint: Path, dataset_dir: Path, tmp_path: Path
) -> None:
    base = tmp_path / "base"
    shutil.copytree(tiny_checkpoint, base)
    # laid out as the original training code saves it: textbook `means`, bf16-rounded `tvf_normalize_params`
    settings = json.loads((base / "preprocessor_config.json").read_text())
    rounded = [0.484375, 0.455078125, 0.40625], [0.228515625, 0.2236328125, 0.224609375]
    settings["means"][0], settings["stds"][0] = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    settings["tvf_normalize_params"][0].update(mean=rounded[0], std=rounded[1])
    (base / "preprocessor_config.json").write_text(json.dumps(settings))
    from openvla_ros.finetune.data import decode_image
    from openvla_ros.finetune.trainer import Trainer

    trainer = Trainer(_config(base, dataset_dir, tmp_path / "run", max_steps=1, save_steps=10, eval_steps=10))
    frame = trainer.train_frames[0]
    policy = OpenVLAPolicy.from_pretrained(str(base), device="cpu")
    expected = policy.image_transform.pixel_values(decode_image(frame.image))
    torch.testing.assert_close(trainer.samples(frame, None)["pixel_values"], expected, rtol=0, atol=0)
    textbook = SampleBuilder(trainer.tokenizer, trainer.statistics, ImageSettings(), False)(frame, None)
    assert (textbook["pixel_values"] - expected).abs().max() > 1e-3  # the settings matter
    trainer.run()
    written = json.loads((tmp_path / "run" / "merged" / "preprocessor_config.json").read_text())
    assert written["tvf_normalize_params"][0]["mean"] == rounded[0] and written["means"][0] == rounded[0]
    assert written["tvf_normalize_params"][0]["std"] == rounded[1] and written["stds"][1] == [0.5, 0.5, 0.5]


def test_full_fine_tuning_trains_every_weight_resumes_exactly_and_loads(tiny_checkpoint: Path, dataset_dir: Path,
                                                                        tmp_path: Path) -> None:
    from openvla_ros.model.loading import load_model

    settings = dict(max_steps=4, batch_size=2, save_steps=2, eval_steps=0, learning_rate=1e-3, lora_rank=0)
    out = tmp_path / "full"
    run_finetune(_config(tiny_checkpoint, dataset_dir, out, **settings))
    assert not (out / "adapter").exists() and (out / "checkpoints" / "step-000002" / "model.safetensors").is_file()
    base = load_model(tiny_checkpoint, device="cpu").state_dict()
    trained = load_model(out / "merged", device="cpu").state_dict()
    for name in ("vision_backbone.featurizer.blocks.0.attn.qkv.weight", "projector.fc1.weight",
                 "language_model.model.layers.0.mlp.down_proj.weight", "language_model.model.embed_tokens.weight"):
        assert not torch.equal(base[name], trained[name]), f"{name} was not trained"
    config = json.loads((out / "merged" / "config.json").read_text())
    assert config["openvla_ros"]["training"] == "full" and NAME in config["norm_stats"]
    # killed after step 2: resuming reproduces the uninterrupted weights
    for name in ("checkpoints/step-000004", "merged"):
        shutil.rmtree(out / name)
    run_finetune(_config(tiny_checkpoint, dataset_dir, out, resume=True, **settings))
    resumed = load_model(out / "merged", device="cpu").state_dict()
    for name, value in trained.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6)
    policy = OpenVLAPolicy.from_pretrained(str(out / "merged"), unnorm_key=NAME, device="cpu")
    assert np.all(np.isfinite(policy.predict_action(np.zeros((64, 64, 3), np.uint8), "move to the red block")))
    with pytest.raises(ValueError, match="cannot use a 4bit base"):
        _config(tiny_checkpoint, dataset_dir, tmp_path / "q", lora_rank=0, quantization="4bit")


def _finetune_command(tiny: Path, data: Path, out: Path, max_steps: int) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve().parents[1] / "training" / "finetune.py"),
            "--vla-path", str(tiny), "--data-dir", str(data), "--dataset-name", NAME, "--out", str(out),
            "--max-steps", str(max_steps), "--save-steps", "2", "--eval-steps", "0", "--batch-size", "2",
            "--lora-rank", "4", "--device", "cpu", "--image-aug", "false"]


def _half_written(out: Path) -> list[str]:
    """What only an unfinished write leaves: staging directories of checkpoints, the adapter or merged/."""
    patterns = ("checkpoints/.staging-*", ".adapter-*", "..merged-new.*")
    return sorted(str(path) for pattern in patterns for path in out.glob(pattern))


@pytest.mark.parametrize("point", ["before the first checkpoint", "after a checkpoint"])
def test_sigterm_keeps_the_last_complete_checkpoint_and_resume_goes_on(
    tiny_checkpoint: Path, dataset_dir: Path, tmp_path: Path, point: str
) -> None:
    import signal
    import time

    out = tmp_path / "run"
    process = subprocess.Popen(_finetune_command(tiny_checkpoint, dataset_dir, out, max_steps=2000),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if point == "after a checkpoint":
            ready = lambda: (out / "checkpoints" / "step-000002").is_dir()  # noqa: E731
        else:
            ready = lambda: (out / "finetune_config.yaml").is_file()  # noqa: E731
        deadline = time.monotonic() + 240
        while not ready() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ready() and process.poll() is None, f"training never got {point}"
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, stderr[-2000:]
    assert _half_written(out) == []
    checkpoints = sorted((out / "checkpoints").glob("step-*")) if (out / "checkpoints").is_dir() else []
    if checkpoints:
        assert f"interrupted (SIGTERM): the newest complete checkpoint is {checkpoints[-1]}" in stderr, stderr[-2000:]
        last_step = int(checkpoints[-1].name.split("-")[1])
    else:
        assert "interrupted (SIGTERM): no checkpoint was complete yet" in stderr, stderr[-2000:]
        last_step = 0
    assert "--resume" in stderr
    metrics = run_finetune(_config(tiny_checkpoint, dataset_dir, out, max_steps=last_step + 2, save_steps=2,
                                   eval_steps=0, batch_size=2, lora_rank=4, resume=bool(checkpoints)))
    assert metrics and (out / "merged" / "config.json").is_file()


def test_a_signal_during_a_checkpoint_write_leaves_the_previous_checkpoint_whole(
    tiny_checkpoint: Path, dataset_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import signal

    from openvla_ros.finetune import trainer as trainer_module
    from openvla_ros.interrupts import Terminated, termination_as_interrupt

    out = tmp_path / "run"
    real_save = torch.save
    saves = []

    def save_then_terminated(value, path, *args, **kwargs):
        saves.append(path)
        real_save(value, path, *args, **kwargs)
        if len(saves) == 2:  # the second checkpoint's training state is on disk, not yet renamed into place
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(trainer_module.torch, "save", save_then_terminated)
    config = _config(tiny_checkpoint, dataset_dir, out, max_steps=6, save_steps=2, eval_steps=0, batch_size=2,
                     lora_rank=4)
    with pytest.raises(Terminated), termination_as_interrupt():
        run_finetune(config)
    assert [path.name for path in sorted((out / "checkpoints").iterdir())] == ["step-000002"]
    assert _half_written(out) == []
    monkeypatch.setattr(trainer_module.torch, "save", real_save)
    run_finetune(_config(tiny_checkpoint, dataset_dir, out, max_steps=4, save_steps=2, eval_steps=0, batch_size=2,
                         lora_rank=4, resume=True))
    assert (out / "checkpoints" / "step-000004").is_dir() and _half_written(out) == []
