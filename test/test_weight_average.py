"""The weight average (ema_decay): its arithmetic, and a run that evaluates, writes and resumes the average."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from toy_rlds import write_toy_dataset

from openvla_ros.errors import TrainingError
from openvla_ros.finetune.config import FinetuneConfig
from openvla_ros.finetune.ema import WeightAverage
from openvla_ros.finetune.trainer import Trainer

NAME = "toy_average"


def test_the_average_follows_the_warmed_up_decay_and_a_swap_puts_the_trained_weights_back() -> None:
    weights = {"w": torch.zeros(2), "b": torch.ones(1, dtype=torch.bfloat16)}
    average = WeightAverage(weights, decay=0.9)
    expected = torch.zeros(2)
    for step in range(1, 40):
        weights["w"] = torch.full((2,), float(step))
        average.update(weights, step)
        decay = min(0.9, (1 + step) / (10 + step))
        expected = decay * expected + (1 - decay) * step
    assert torch.allclose(average.shadow["w"], expected) and average.shadow["b"].dtype == torch.float32
    assert 30.0 < float(expected[0]) < 38.0, "the average lags the last weights (39)"
    with average.swapped_in(weights):
        assert torch.allclose(weights["w"], expected)
    assert torch.equal(weights["w"], torch.full((2,), 39.0)), "the trained weights come back after the block"
    with pytest.raises(ValueError, match="ema_decay"):
        WeightAverage(weights, decay=1.0)
    with pytest.raises(ValueError, match="missing"):
        average.load_state_dict({"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="ema_decay"):
        FinetuneConfig(data_dir="d", dataset_name="n", ema_decay=1.5)


def _config(checkpoint: Path, data: Path, out: Path, **overrides) -> FinetuneConfig:
    values = dict(vla_path=str(checkpoint), data_dir=str(data), dataset_name=NAME, out=str(out), max_steps=6,
                  batch_size=4, learning_rate=5e-3, lora_rank=4, save_steps=3, eval_steps=0, eval_batches=1,
                  log_steps=3, device="cpu", seed=3, action_head="l1", chunk=4, use_proprio=True, num_images=2,
                  keep_checkpoints=2, ema_decay=0.5)
    values.update(overrides)
    return FinetuneConfig(**values)


def _head(directory: Path) -> torch.Tensor:
    written = load_file(str(directory / "merged" / "action_head.safetensors"))
    return next(value for key, value in written.items() if key.endswith("fc2.weight")).float()


def test_a_run_writes_the_average_and_a_resumed_run_continues_it(tiny_checkpoint: Path, tmp_path: Path) -> None:
    data = write_toy_dataset(tmp_path / "data", NAME, steps=10, x_start=10, x_step=18, extras=True)
    trainer = Trainer(_config(tiny_checkpoint, data, tmp_path / "run"))
    trainer.run()
    name = next(n for n in trainer.average.shadow if n.startswith("action_head.") and n.endswith("fc2.weight"))
    average, trained = trainer.average.shadow[name], dict(trainer.network.named_parameters())[name]
    assert torch.allclose(_head(tmp_path / "run"), average), "merged/ holds the average"
    last = torch.load(tmp_path / "run" / "checkpoints" / "step-000006" / "training_state.pt", weights_only=False)
    assert last["step"] == 6
    assert torch.allclose(trained.float(), average), "after the run the model holds the average it wrote"

    # The same run stopped after step 3 and resumed: the average carries on from its checkpoint.
    trainer = Trainer(_config(tiny_checkpoint, data, tmp_path / "resumed", max_steps=3))
    trainer.run()
    assert not torch.allclose(_head(tmp_path / "resumed"), average), "3 steps give another average (else no test)"
    resumed = Trainer(_config(tiny_checkpoint, data, tmp_path / "resumed", max_steps=6, resume=True))
    resumed.run()
    assert torch.allclose(_head(tmp_path / "resumed"), average, atol=1e-6), "resuming gives the uninterrupted average"

    # A checkpoint without an average cannot resume a run that averages.
    Trainer(_config(tiny_checkpoint, data, tmp_path / "plain", max_steps=3, ema_decay=0.0)).run()
    with pytest.raises(TrainingError, match="weight average"):
        Trainer(_config(tiny_checkpoint, data, tmp_path / "plain", max_steps=6, resume=True)).run()
