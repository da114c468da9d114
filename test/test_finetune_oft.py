"""OFT-style fine-tuning (L1 head, action chunks, proprio, wrist camera, FiLM) on a tiny RLDS dataset, on the CPU."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from toy_rlds import write_toy_dataset

from openvla_ros.errors import DatasetError, TrainingError
from openvla_ros.finetune.chunks import (
    ChunkSampleBuilder,
    check_chunk_data,
    chunk_windows,
    collate_chunks,
    padded_fraction,
)
from openvla_ros.finetune.config import FinetuneConfig
from openvla_ros.finetune.data import decode_image, load_frames, open_rlds
from openvla_ros.finetune.trainer import Trainer, run_finetune
from openvla_ros.model.oft_loading import HEAD_NAME, PROPRIO_NAME
from openvla_ros.model.oft_policy import OFTPolicy, load_policy_auto

REPO = Path(__file__).resolve().parents[1]
NAME = "toy_chunks"
STEPS = 10
CHUNK = 4


def _write(data_dir: Path, with_extras: bool) -> Path:
    return write_toy_dataset(data_dir, NAME, steps=STEPS, x_start=10, x_step=18, extras=with_extras)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write(tmp_path_factory.mktemp("rlds_oft"), with_extras=True)


def _config(tiny: Path, data: Path, out: Path, **overrides) -> FinetuneConfig:
    settings = dict(vla_path=str(tiny), data_dir=str(data), dataset_name=NAME, out=str(out), max_steps=40,
                    batch_size=4, learning_rate=2e-3, lora_rank=8, save_steps=20, eval_steps=20, eval_batches=2,
                    log_steps=5, image_aug=False, device="cpu", seed=3, action_head="l1", chunk=CHUNK,
                    use_proprio=True, num_images=2)
    settings.update(overrides)
    return FinetuneConfig(**settings)


@pytest.fixture(scope="module")
def trained(tiny_checkpoint: Path, dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("run_oft") / "run"
    trainer = Trainer(_config(tiny_checkpoint, dataset_dir, out))
    before = trainer.evaluate()
    metrics = trainer.run()
    return out, before, metrics


def test_the_loader_carries_state_and_wrist_images_and_windows_end_with_neutral_actions(dataset_dir: Path) -> None:
    frames = load_frames(open_rlds(dataset_dir, NAME), "train")
    assert all(len(f.wrist_images) == 1 and f.state is not None and f.state.shape == (3,) for f in frames)
    wrist = decode_image(frames[3].wrist_images[0])
    assert wrist.shape == (224, 224, 3) and not np.array_equal(wrist, decode_image(frames[3].image))
    windows = chunk_windows(frames, CHUNK)
    episodes = len({f.episode for f in frames})
    assert len(windows) == episodes * STEPS, "every step starts a window, as in OpenVLA's RLDS pipeline"
    for window in windows:
        assert len({f.episode for f in window.frames}) == 1
        expected_steps = list(range(window.first.step, min(window.first.step + CHUNK, STEPS)))
        assert [f.step for f in window.frames] == expected_steps
        actions = window.actions
        assert actions.shape == (CHUNK, 7)
        real = len(window.frames)
        np.testing.assert_array_equal(actions[:real], np.stack([f.action for f in window.frames]))
        # past the episode's end: zero deltas, the absolute gripper held at its last value
        assert window.padded == CHUNK - real and np.all(actions[real:, :6] == 0.0)
        np.testing.assert_array_equal(actions[real:, 6], window.frames[-1].action[6])
    last = windows[STEPS - 1]
    assert last.padded == CHUNK - 1 and np.any(last.first.action[:6] != 0.0), "the last step's move is kept"


def test_a_chunk_long_against_the_episodes_warns_that_targets_are_mostly_padding(
    dataset_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from openvla_ros.model.oft import OFTSpec

    def warnings() -> list[logging.LogRecord]:  # tensorflow-datasets logs to the same capture
        return [r for r in caplog.records if r.name == "openvla_ros.finetune.chunks" and r.levelno >= logging.WARNING]

    frames = load_frames(open_rlds(dataset_dir, NAME), "train")
    with caplog.at_level("WARNING", logger="openvla_ros.finetune.chunks"):
        windows = check_chunk_data(frames, OFTSpec(chunk=CHUNK, action_dim=7, proprio_dim=3, num_images=2), "train")
    # 10-step episodes, K = 4: 3 + 2 + 1 padded steps of 40 per episode
    assert padded_fraction(windows) == pytest.approx(6 / 40) and not warnings()
    long_chunk = 2 * STEPS - 4  # 16 steps: most of every target lies past the episode's end
    with caplog.at_level("WARNING", logger="openvla_ros.finetune.chunks"):
        windows = check_chunk_data(frames, OFTSpec(chunk=long_chunk, action_dim=7, proprio_dim=3, num_images=2),
                                   "train")
    assert len(windows) == len(frames), "a long chunk still trains on every step"
    assert padded_fraction(windows) == pytest.approx(105 / 160)
    [record] = warnings()
    assert "66% of the chunk targets are neutral actions" in record.getMessage()
    assert "--chunk 16" in record.getMessage() and "lower --chunk" in record.getMessage()


def test_samples_use_the_shared_layout_normalisation_and_image_order(tiny_checkpoint: Path, dataset_dir: Path) -> None:
    from openvla_ros.model.loading import load_tokenizer
    from openvla_ros.model.oft import OFTSpec, build_chunk_inputs
    from openvla_ros.model.processor import ImageTransform, prompt_token_ids

    builder = open_rlds(dataset_dir, NAME)
    statistics = json.loads((Path(builder.data_dir) / "dataset_statistics.json").read_text())
    statistics = statistics.get(NAME, statistics)
    frames = load_frames(builder, "train")
    spec = OFTSpec(chunk=CHUNK, action_dim=7, proprio_dim=3, num_images=2)
    tokenizer = load_tokenizer(tiny_checkpoint)
    samples = ChunkSampleBuilder(tokenizer, statistics, spec, ImageTransform().settings, False, NAME)
    window = chunk_windows(frames, CHUNK)[2]
    sample = samples(window, None)
    transform = ImageTransform()
    expected_pixels = torch.cat([transform.pixel_values(decode_image(window.first.image)),
                                 transform.pixel_values(decode_image(window.first.wrist_images[0]))])
    assert torch.equal(sample["pixel_values"], expected_pixels), "primary first, then the wrist camera"
    low, high = np.array(statistics["action"]["q01"]), np.array(statistics["action"]["q99"])
    recorded = np.stack([f.action for f in window.frames])
    expected = np.clip(2 * (recorded - low) / np.where(high > low, high - low, 1) - 1, -1, 1)
    expected = np.where(high > low, expected, 0.0)
    expected[:, 6] = recorded[:, 6]  # the gripper is masked out of normalisation
    np.testing.assert_allclose(sample["actions"].numpy(), expected, atol=1e-6)
    p_low, p_high = np.array(statistics["proprio"]["q01"]), np.array(statistics["proprio"]["q99"])
    proprio = np.clip(2 * (window.first.state - p_low) / (p_high - p_low + 1e-8) - 1, -1, 1)
    np.testing.assert_allclose(sample["proprio"].numpy(), proprio, atol=1e-6)
    batch = collate_chunks([sample, samples(chunk_windows(frames, CHUNK)[0], None)], spec, 32000)
    reference = build_chunk_inputs([prompt_token_ids(tokenizer, window.first.instruction),
                                    prompt_token_ids(tokenizer, frames[0].instruction)], spec, 32000)
    assert torch.equal(batch.inputs.input_ids, reference.input_ids), "the same layout the policy builds"


def test_l1_fine_tuning_lowers_the_loss_and_writes_a_merged_oft_model(trained) -> None:
    out, before, metrics = trained
    assert metrics["val"]["loss"] < 0.6 * before["loss"], (before, metrics)
    assert metrics["train"]["loss"] < before["loss"]
    assert {"l1_first_step", "l1_last_step", "l1_physical"} <= set(metrics["val"])
    merged = out / "merged"
    config = json.loads((merged / "config.json").read_text())
    assert config["oft"]["chunk"] == CHUNK and config["oft"]["proprio_dim"] == 3 and config["oft"]["num_images"] == 2
    assert (merged / HEAD_NAME).is_file() and (merged / PROPRIO_NAME).is_file()
    assert NAME in config["norm_stats"] and "proprio" in config["norm_stats"][NAME]
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert all((c / "heads" / HEAD_NAME).is_file() for c in checkpoints)


def test_the_merged_model_predicts_the_recorded_chunks_better_than_before(trained, tiny_checkpoint: Path,
                                                                          dataset_dir: Path) -> None:
    out = trained[0]
    policy = load_policy_auto(str(out / "merged"), device="cpu")
    assert isinstance(policy, OFTPolicy)
    assert (policy.chunk_size, policy.proprio_dim, policy.num_images) == (CHUNK, 3, 2)
    frames = load_frames(open_rlds(dataset_dir, NAME), "train")
    windows = chunk_windows(frames, CHUNK)[::3]

    def error(model: OFTPolicy) -> float:
        errors = []
        for window in windows:
            first = window.first
            chunk = model.predict_chunk(decode_image(first.image), first.instruction,
                                        wrist_images=[decode_image(first.wrist_images[0])], proprio=first.state)
            errors.append(np.abs(chunk - window.actions)[:, :6].mean())
        return float(np.mean(errors))

    trained_error = error(policy)
    # the starting point of the same run: a trainer with the same seed, before any step
    fresh = Trainer(_config(tiny_checkpoint, dataset_dir, out.parent / "unused", max_steps=1))
    fresh.network.eval()
    fresh.network.config.norm_stats = {NAME: fresh.statistics}
    untrained = OFTPolicy(fresh.network, policy.tokenizer, unnorm_key=NAME)
    assert trained_error < 0.5 * error(untrained)


def test_resumed_l1_training_matches_uninterrupted(tiny_checkpoint: Path, dataset_dir: Path, tmp_path: Path) -> None:
    settings = dict(max_steps=6, save_steps=3, eval_steps=0, log_steps=3, use_proprio=False, num_images=1)
    run_finetune(_config(tiny_checkpoint, dataset_dir, tmp_path / "straight", **settings))
    run_finetune(_config(tiny_checkpoint, dataset_dir, tmp_path / "split", **{**settings, "max_steps": 3}))
    run_finetune(_config(tiny_checkpoint, dataset_dir, tmp_path / "split", **settings, resume=True))
    straight = load_file(str(tmp_path / "straight" / "merged" / HEAD_NAME))
    split = load_file(str(tmp_path / "split" / "merged" / HEAD_NAME))
    fresh = Trainer(_config(tiny_checkpoint, dataset_dir, tmp_path / "unused", **settings)).network.action_head
    initial = {k: v.detach() for k, v in fresh.state_dict().items()}
    for key, value in straight.items():
        torch.testing.assert_close(split[key], value, rtol=1e-4, atol=1e-5)
    assert any(not torch.allclose(straight[k], initial[k]) for k in straight), "the head was trained"


def test_film_fine_tuning_trains_the_film_layers_and_loads(tiny_checkpoint: Path, dataset_dir: Path,
                                                           tmp_path: Path) -> None:
    out = tmp_path / "film"
    trainer = Trainer(_config(tiny_checkpoint, dataset_dir, out, max_steps=4, eval_steps=0, save_steps=4,
                              film=True, use_proprio=False, num_images=1))
    initial = {k: v.detach().clone() for k, v in trainer.network.film.state_dict().items()}
    trainer.run()
    film = load_file(str(out / "merged" / "film.safetensors"))
    assert set(film) == set(initial)
    assert any(not torch.allclose(film[k], initial[k]) for k in film), "FiLM is trained fully"
    policy = load_policy_auto(str(out / "merged"), device="cpu")
    assert policy.spec.film and policy.chunk_size == CHUNK
    frame = load_frames(open_rlds(dataset_dir, NAME), "val")[0]
    assert np.all(np.isfinite(policy.predict_chunk(decode_image(frame.image), frame.instruction)))


def test_bad_chunk_settings_and_datasets(tiny_checkpoint: Path, dataset_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--action-head l1"):
        FinetuneConfig(vla_path="x", data_dir="d", dataset_name="n", chunk=8)
    with pytest.raises(ValueError, match="action_head must be one of"):
        FinetuneConfig(vla_path="x", data_dir="d", dataset_name="n", action_head="diffusion")
    with pytest.raises(DatasetError, match="2 wrist camera"):
        Trainer(_config(tiny_checkpoint, dataset_dir, tmp_path / "a", num_images=3))
    plain = _write(tmp_path / "plain", with_extras=False)
    with pytest.raises(TrainingError, match="observation/state"):
        Trainer(_config(tiny_checkpoint, plain, tmp_path / "c"))
    with pytest.raises(DatasetError, match="wrist camera"):
        Trainer(_config(tiny_checkpoint, plain, tmp_path / "d", use_proprio=False))


def test_an_oft_base_keeps_its_layout(tiny_checkpoint: Path, dataset_dir: Path, tmp_path: Path) -> None:
    from openvla_ros.model.tiny_oft import make_tiny_oft_checkpoint

    base = make_tiny_oft_checkpoint(tmp_path / "oft-base", seed=1, chunk=CHUNK, proprio_dim=3, num_images=2)
    with pytest.raises(TrainingError, match="--chunk 6 .the base has 4."):
        Trainer(_config(base, dataset_dir, tmp_path / "a", chunk=6))
    # the official-layout heads are the starting point, and training continues from them
    trainer = Trainer(_config(base, dataset_dir, tmp_path / "b", chunk=0, max_steps=2, eval_steps=0, save_steps=2))
    official = OFTPolicy.from_pretrained(str(base), device="cpu").model.action_head.state_dict()
    for key, value in trainer.network.action_head.state_dict().items():
        torch.testing.assert_close(value, official[key].float())
    trainer.run()
    assert load_policy_auto(str(tmp_path / "b" / "merged"), device="cpu").chunk_size == CHUNK


def test_evaluate_cli_reports_chunk_l1_and_plots_the_chunks(trained, dataset_dir: Path, tmp_path: Path) -> None:
    out = trained[0]
    plot = tmp_path / "chunks.png"
    result = subprocess.run(
        [sys.executable, str(REPO / "training" / "evaluate.py"), "--model", str(out / "merged"), "--data-dir",
         str(dataset_dir), "--dataset-name", NAME, "--device", "cpu", "--plot", str(plot)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(result.stdout)
    assert metrics["chunk_size"] == CHUNK
    assert len(metrics["l1_per_chunk_step"]) == CHUNK and set(metrics["l1_per_dimension"]) >= {"dx", "gripper"}
    # dx is +-0.01 by the block's colour: predicting 0 (or the wrong colour) would give >= 0.01
    assert metrics["l1_per_dimension"]["dx"] < 0.003, metrics
    assert plot.is_file() and plot.stat().st_size > 10_000


def test_the_merged_model_runs_in_the_node_with_wrist_camera_and_proprio(trained, tmp_path: Path) -> None:
    import rclpy  # noqa: F401  (after conftest's DDS isolation)
    from policy_helpers import (
        Camera,
        Driver,
        Proprio,
        drive,
        latest_status,
        start_node,
        status_values,
        subscribe_diagnostics,
        wait_active,
    )
    from ros_helpers import spinning_node

    merged = trained[0] / "merged"
    name = "policy_finetuned_oft"
    node_process = start_node(
        name, tmp_path, f"model:={merged}", f"unnorm_key:={NAME}", "image_topic:=/ft_oft/camera",
        "instruction_topic:=/ft_oft/instruction", "rate_hz:=10.0", "device:=cpu",
        "wrist_image_topics:=['/ft_oft/wrist']", "proprio_topic:=/ft_oft/state",
    )
    with spinning_node("finetune_oft_driver") as ros_node:
        diagnostics = subscribe_diagnostics(ros_node)
        driver = Driver(ros_node, name, "/ft_oft/camera", "/ft_oft/instruction", compressed=False)
        wrist = Camera(ros_node, "/ft_oft/wrist")
        state = Proprio(ros_node, "/ft_oft/state", (0.3, 1.0, 0.5))
        try:
            wait_active(driver, node_process)
            values = status_values(latest_status(diagnostics, name))
            assert values["mode"] == "chunk" and values["chunk_size"] == str(CHUNK), values
            wrist.mode, state.running = "good", True
            first = drive(driver, count=CHUNK + 2, timeout_s=90.0)
            actions = np.array([action.data for _, action in driver.actions.since(first)])
            assert actions.shape[1] == 7 and np.all(np.isfinite(actions))
            assert int(status_values(latest_status(diagnostics, name))["chunks"]) >= 2
        finally:
            driver.camera.mode, wrist.mode, state.running = "stopped", "stopped", False
            assert node_process.stop() == 0, node_process.log()[-3000:]


class _PullToZero(torch.nn.Module):
    """A stand-in auxiliary loss of known form: its own head on the first action state, pulled to zero."""

    def __init__(self, network, tokenizer, image_settings) -> None:
        super().__init__()
        self.head = torch.nn.Linear(network.vla.config.text_config.hidden_size, 3)
        self.calls = 0

    def forward(self, pixel_values, input_ids, prompt_lengths, internals) -> torch.Tensor:
        self.calls += 1
        assert internals.vision_features.shape[:2] == (pixel_values.shape[0], 256)
        return self.head(internals.action_hidden[:, 0]).pow(2).mean()


def test_an_auxiliary_loss_trains_beside_the_model_is_kept_in_checkpoints_and_resumes(
        tiny_checkpoint: Path, dataset_dir: Path, tmp_path: Path) -> None:
    settings = dict(max_steps=6, save_steps=3, eval_steps=3, log_steps=3, use_proprio=False, num_images=1)
    built: list[_PullToZero] = []

    def auxiliary(*args) -> _PullToZero:
        built.append(_PullToZero(*args))
        return built[-1]

    straight = Trainer(_config(tiny_checkpoint, dataset_dir, tmp_path / "straight", **settings), auxiliary=auxiliary)
    initial = {k: v.detach().clone() for k, v in straight.auxiliary.state_dict().items()}
    straight.run()
    assert built[0].calls == 6, "once per training step, never in validation"
    assert not torch.allclose(built[0].head.weight, initial["head.weight"]), "its head trains"
    checkpoint = sorted((tmp_path / "straight" / "checkpoints").iterdir())[-1]
    assert set(torch.load(checkpoint / "auxiliary.pt", weights_only=True)) == {"head.weight", "head.bias"}
    plain = tmp_path / "plain"
    run_finetune(_config(tiny_checkpoint, dataset_dir, plain, **settings))
    assert sorted(p.name for p in (tmp_path / "straight" / "merged").iterdir()) == sorted(
        p.name for p in (plain / "merged").iterdir()), "the written model has the layout of one without it"
    assert not torch.equal(load_file(str(plain / "merged" / HEAD_NAME))["model.fc2.weight"],
                           load_file(str(tmp_path / "straight" / "merged" / HEAD_NAME))["model.fc2.weight"]), \
        "the auxiliary loss changes what the model learns"
    Trainer(_config(tiny_checkpoint, dataset_dir, tmp_path / "split", **{**settings, "max_steps": 3}),
            auxiliary=auxiliary).run()
    resumed = Trainer(_config(tiny_checkpoint, dataset_dir, tmp_path / "split", **settings, resume=True),
                      auxiliary=auxiliary)
    resumed.run()
    torch.testing.assert_close(resumed.auxiliary.head.weight, built[0].head.weight, rtol=1e-4, atol=1e-5)
    for key, value in load_file(str(tmp_path / "straight" / "merged" / HEAD_NAME)).items():
        torch.testing.assert_close(load_file(str(tmp_path / "split" / "merged" / HEAD_NAME))[key], value,
                                   rtol=1e-4, atol=1e-5)
    with pytest.raises(TrainingError, match="no auxiliary-loss weights"):
        Trainer(_config(tiny_checkpoint, dataset_dir, plain, **{**settings, "max_steps": 9}, resume=True),
                auxiliary=auxiliary).run()
    with pytest.raises(TrainingError, match="needs the OFT chunk head"):
        Trainer(_config(tiny_checkpoint, dataset_dir, tmp_path / "tokens", action_head="tokens", chunk=0,
                        use_proprio=False, num_images=1), auxiliary=auxiliary)


def test_under_torchrun_the_auxiliary_heads_stay_equal_on_every_rank(tiny_checkpoint: Path, dataset_dir: Path,
                                                                     tmp_path: Path) -> None:
    """The heads live outside the DDP wrapper, so their gradients are averaged by hand; a rank whose batch
    added nothing to them still takes part (with zeros), or the other rank would wait for it forever."""
    import os

    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(REPO / "test" / "ddp_auxiliary_worker.py"), str(tiny_checkpoint), str(dataset_dir), NAME, str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(out / f"auxiliary_rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    for key in ("head.weight", "head.bias"):
        torch.testing.assert_close(ranks[0]["initial"][key], ranks[1]["initial"][key], rtol=0, atol=0)
        torch.testing.assert_close(ranks[1]["final"][key], ranks[0]["final"][key], rtol=0, atol=0)
    assert not torch.allclose(ranks[1]["final"]["head.weight"], ranks[1]["initial"]["head.weight"]), \
        "rank 1's head learns from rank 0's batches through the average"
    assert (out / "merged" / HEAD_NAME).is_file()
