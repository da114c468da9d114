"""Energy training on a finished OFT model (fine-tuned here on a tiny RLDS dataset), on the CPU.

One fixture fine-tunes a tiny OFT model (two cameras, proprio, K = 4) for a few steps, as
training/finetune.py --action-head l1 does; the energy model then trains on its frozen hidden states.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from toy_rlds import write_toy_dataset

from openvla_ros.errors import TrainingError
from openvla_ros.finetune.config import FinetuneConfig
from openvla_ros.finetune.energy_training import EnergyTrainer, EnergyTrainingConfig, pair_metrics
from openvla_ros.finetune.trainer import run_finetune
from openvla_ros.model.oft_loading import ENERGY_CONFIG_NAME, ENERGY_NAME
from openvla_ros.model.oft_policy import OFTPolicy

REPO = Path(__file__).resolve().parents[1]
NAME = "toy_energy"
STEPS = 10
CHUNK = 4


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_toy_dataset(tmp_path_factory.mktemp("rlds_energy"), NAME, steps=STEPS, x_start=10, x_step=18,
                             extras=True, dz_ramp=True)


@pytest.fixture(scope="module")
def oft_model(tiny_checkpoint: Path, dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished OFT model: the tiny checkpoint fine-tuned with the L1 head (two cameras, proprio)."""
    out = tmp_path_factory.mktemp("oft_run") / "run"
    run_finetune(FinetuneConfig(
        vla_path=str(tiny_checkpoint), data_dir=str(dataset_dir), dataset_name=NAME, out=str(out), max_steps=6,
        batch_size=4, learning_rate=2e-3, lora_rank=4, save_steps=100, eval_steps=0, log_steps=5, image_aug=False,
        device="cpu", seed=3, action_head="l1", chunk=CHUNK, use_proprio=True, num_images=2,
    ))
    return out / "merged"


def _config(model: Path, data: Path, out: Path, **overrides) -> EnergyTrainingConfig:
    settings = dict(model=str(model), data_dir=str(data), dataset_name=NAME, out=str(out), max_steps=50,
                    batch_size=8, learning_rate=2e-3, hidden_dim=32, num_heads=4, save_steps=25, eval_steps=50,
                    eval_batches=2, log_steps=5, device="cpu", seed=1, write_to_model=False)
    settings.update(overrides)
    return EnergyTrainingConfig(**settings)


def _script(name: str):
    """Returns the module of ``training/<name>.py`` (the command line, run in this process)."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / "training" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _copy(model: Path, target: Path) -> Path:
    shutil.copytree(model, target)
    return target


@pytest.fixture(scope="module")
def trained(oft_model: Path, dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("energy_run")
    model = _copy(oft_model, root / "model")
    trainer = EnergyTrainer(_config(model, dataset_dir, root / "run", write_to_model=True))
    before = trainer.evaluate()
    metrics = trainer.run()
    return model, root / "run", before, metrics


def test_pair_metrics_read_the_diagonal_as_the_true_pairs() -> None:
    energies = torch.tensor([[0.2, 1.0, 1.0], [1.0, 0.3, 0.1], [1.0, 1.0, 0.5]])
    values = pair_metrics(energies, temperature=0.5)
    assert float(values["energy_positive"]) == pytest.approx((0.2 + 0.3 + 0.5) / 3)
    assert float(values["energy_negative"]) == pytest.approx((1.0 * 5 + 0.1) / 6)
    assert float(values["retrieval_accuracy"]) == pytest.approx(2 / 3), "row 1 prefers chunk 2"
    logits = -energies / 0.5
    expected = -torch.log_softmax(logits, dim=1).diagonal().mean()
    assert float(values["loss"]) == pytest.approx(float(expected))


def test_true_pairs_get_lower_energy_than_swapped_pairs_after_short_training(trained) -> None:
    _, run, before, metrics = trained
    # before training both are ~1.26 and equal to 1e-3; after 50 steps E_pos 0.64 against E_neg 0.82 (val)
    assert metrics["val"]["energy_negative"] - metrics["val"]["energy_positive"] > 0.05, metrics
    assert abs(before["energy_negative"] - before["energy_positive"]) < 0.02, before
    assert metrics["val"]["loss"] < before["loss"] - 0.02, (before, metrics)
    assert metrics["val"]["retrieval_accuracy"] > before["retrieval_accuracy"], (before, metrics)
    assert metrics["train"]["energy_positive"] < metrics["train"]["energy_negative"]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = {line["split"] for line in lines}
    assert logged == {"train", "val"} and {"energy_positive", "energy_negative", "loss",
                                           "retrieval_accuracy", "learning_rate"} <= set(lines[0])


def test_the_energy_file_lands_beside_the_head_and_the_policy_refines_with_it(trained, dataset_dir: Path) -> None:
    from openvla_ros.finetune.data import decode_image, load_frames, open_rlds

    model, run, _, _ = trained
    assert (model / ENERGY_NAME).is_file() and (run / "energy" / ENERGY_NAME).is_file()
    sizes = json.loads((model / ENERGY_CONFIG_NAME).read_text())
    assert sizes["spec"]["chunk"] == CHUNK and sizes["spec"]["action_dim"] == 7 and sizes["steps"] == 50
    weights = load_file(str(model / ENERGY_NAME))
    assert all(tensor.dtype == torch.float32 for tensor in weights.values())
    policy = OFTPolicy.from_pretrained(str(model), device="cpu", energy_steps=1)
    frame = load_frames(open_rlds(dataset_dir, NAME), "val")[0]
    prediction = policy.predict(decode_image(frame.image), frame.instruction,
                                wrist_images=[decode_image(frame.wrist_images[0])], proprio=frame.state)
    assert prediction.problem is None and prediction.energy_after <= prediction.energy_before
    assert np.all(np.isfinite(prediction.chunk))


def test_resume_continues_the_energy_optimiser_exactly(oft_model: Path, dataset_dir: Path, tmp_path: Path) -> None:
    straight = EnergyTrainer(_config(oft_model, dataset_dir, tmp_path / "straight", max_steps=8, save_steps=4,
                                     eval_steps=0))
    straight.run()
    interrupted = EnergyTrainer(_config(oft_model, dataset_dir, tmp_path / "resumed", max_steps=4, save_steps=4,
                                        eval_steps=0))
    interrupted.run()
    with pytest.raises(TrainingError, match="--resume"):
        EnergyTrainer(_config(oft_model, dataset_dir, tmp_path / "resumed", max_steps=8, eval_steps=0)).run()
    resumed = EnergyTrainer(_config(oft_model, dataset_dir, tmp_path / "resumed", max_steps=8, save_steps=4,
                                    eval_steps=0, resume=True))
    resumed.run()
    assert resumed.step == 8
    moments = [state["step"] for state in resumed.optimizer.state_dict()["state"].values()]
    assert moments and all(int(step) == 8 for step in moments), "AdamW's step count carried over"
    for name, tensor in straight.energy.state_dict().items():
        torch.testing.assert_close(resumed.energy.state_dict()[name], tensor, msg=name)
    straight_exp = straight.optimizer.state_dict()["state"][0]["exp_avg_sq"]
    torch.testing.assert_close(resumed.optimizer.state_dict()["state"][0]["exp_avg_sq"], straight_exp)


def test_bad_settings_and_an_existing_energy_file_are_refused_naming_the_way_out(
    trained, oft_model: Path, dataset_dir: Path, tmp_path: Path, tiny_checkpoint: Path
) -> None:
    model = trained[0]
    with pytest.raises(TrainingError, match="--overwrite"):
        EnergyTrainer(_config(model, dataset_dir, tmp_path / "again", write_to_model=True))
    with pytest.raises(ValueError, match="batch_size must be >= 2"):
        _config(oft_model, dataset_dir, tmp_path / "one", batch_size=1)
    with pytest.raises(TrainingError, match="not an OpenVLA-OFT model"):
        EnergyTrainer(_config(tiny_checkpoint, dataset_dir, tmp_path / "token"))


def test_the_command_line_trains_and_reports_errors_in_one_line(
    oft_model: Path, dataset_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    main = _script("train_energy").main
    command = ["--model", str(oft_model), "--data-dir", str(dataset_dir), "--dataset-name", NAME, "--out",
               str(tmp_path / "cli"), "--max-steps", "2", "--batch-size", "4", "--hidden-dim", "32", "--num-heads",
               "4", "--device", "cpu", "--no-write-to-model"]
    assert main(command) == 0, capsys.readouterr().err[-2000:]
    assert (tmp_path / "cli" / "energy" / ENERGY_NAME).is_file()
    assert not (oft_model / ENERGY_NAME).exists(), "--no-write-to-model leaves the model directory alone"
    capsys.readouterr()
    assert main([*command, "--batch-size", "1"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: batch_size must be >= 2")


def test_evaluate_reports_l1_with_and_without_the_correction_and_e_pos_against_e_neg(
    trained, dataset_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    model = trained[0]
    command = ["--model", str(model), "--data-dir", str(dataset_dir), "--dataset-name", NAME, "--device", "cpu",
               "--plot", str(tmp_path / "plot.png"), "--max-steps", "40", "--energy-steps", "2",
               "--energy-step-size", "5.0"]
    capsys.readouterr()
    assert _script("evaluate").main(command) == 0, capsys.readouterr().err[-2000:]
    report = json.loads(capsys.readouterr().out)
    energy = report["energy"]
    assert energy["steps"] == 2 and energy["fallbacks"] == 0
    assert energy["energy_positive"] < energy["energy_negative"], energy
    assert energy["energy_refined_chunk"] < energy["energy_head_chunk"], "the correction lowers the energy"
    assert energy["l1_corrected"] != energy["l1_uncorrected"]
    assert report["l1_mean"] == pytest.approx(energy["l1_corrected"]), "the main figures are the corrected chunks'"
    assert len(energy["l1_per_chunk_step_corrected"]) == CHUNK and energy["negatives_per_window"] >= 1


def test_predict_refines_on_request_and_reports_the_energies(
    trained, dataset_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from openvla_ros.finetune.data import load_frames, open_rlds
    from openvla_ros.predict import main

    model = trained[0]
    frame = load_frames(open_rlds(dataset_dir, NAME), "val")[0]
    paths = []
    for name, data in (("image.jpg", frame.image), ("wrist.jpg", frame.wrist_images[0])):
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    proprio = ",".join(str(v) for v in frame.state)
    base = ["--model", str(model), "--image", paths[0], "--wrist-image", paths[1], "--proprio", proprio,
            "--instruction", frame.instruction, "--device", "cpu", "--json"]
    assert main([*base, "--energy-steps", "1", "--energy-max-step-fraction", "3"]) == 2, "a fraction above 1"
    assert "energy_max_step_fraction must be in [0, 1]" in capsys.readouterr().err
    assert main([*base, "--energy-steps", "2"]) == 0
    done = capsys.readouterr()
    chunk = np.array(json.loads(done.out))
    assert chunk.shape == (CHUNK, 7) and np.all(np.isfinite(chunk))
    line = next(line for line in done.err.splitlines() if line.startswith("energy:"))
    before, after = (float(line.split(word)[1].split()[0].rstrip(",")) for word in ("before", "after"))
    assert after <= before and "2 step(s)" in line


@pytest.mark.parametrize("at_save", [1, 2])
def test_sigterm_during_a_checkpoint_keeps_the_previous_one_and_resume_finishes(
    oft_model: Path, dataset_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch, at_save: int
) -> None:
    import os
    import signal

    from openvla_ros.finetune import energy_training

    main = _script("train_energy").main
    out = tmp_path / "cli"
    command = ["--model", str(oft_model), "--data-dir", str(dataset_dir), "--dataset-name", NAME, "--out", str(out),
               "--max-steps", "6", "--save-steps", "2", "--batch-size", "4", "--hidden-dim", "32", "--num-heads",
               "4", "--device", "cpu", "--no-write-to-model"]
    real_save = torch.save
    saves = []

    def save_then_terminated(value, path, *args, **kwargs):
        saves.append(path)
        real_save(value, path, *args, **kwargs)
        if len(saves) == at_save:  # this checkpoint is written into its staging directory, not yet in place
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(energy_training.torch, "save", save_then_terminated)
    capsys.readouterr()
    assert main(command) == 143
    stderr = capsys.readouterr().err
    if at_save == 1:
        assert "interrupted (SIGTERM): no checkpoint was complete yet" in stderr
        assert list((out / "checkpoints").iterdir()) == []
    else:
        kept = out / "checkpoints" / "step-000002"
        assert f"interrupted (SIGTERM): the newest complete checkpoint is {kept}" in stderr
        assert [path.name for path in (out / "checkpoints").iterdir()] == ["step-000002"]
    assert not (out / "energy").exists()
    monkeypatch.setattr(energy_training.torch, "save", real_save)
    again = [*command, "--resume"] if at_save > 1 else [*command]
    assert main(again) == 0, capsys.readouterr().err[-2000:]
    assert (out / "energy" / ENERGY_NAME).is_file()
    assert not list((out / "checkpoints").glob(".staging-*"))
