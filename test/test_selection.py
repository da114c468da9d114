"""Checkpoint selection by closed-loop success: the kept weights are those of the best validation, with a stand-in
evaluation of known scores; validation episodes never overlap the reported ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from toy_rlds import write_toy_dataset

from openvla_ros.finetune.config import FinetuneConfig
from openvla_ros.finetune.selection import ClosedLoopSelection, SelectionPoint, plot_curve
from openvla_ros.finetune.trainer import Trainer

NAME = "toy_select"


def test_more_successes_win_and_a_tie_goes_to_the_lower_val_l1(tmp_path: Path) -> None:
    selection = ClosedLoopSelection(lambda policy: (0, 0), every=2, directory=tmp_path / "selection")
    weights = {"w": torch.zeros(3)}
    for step, successes, l1 in ((2, 3, 0.30), (4, 7, 0.25), (6, 7, 0.20), (8, 7, 0.22), (10, 5, 0.10)):
        weights["w"] = torch.full((3,), float(step))
        selection.consider(SelectionPoint(step, successes, 20, l1), lambda: weights)
    assert selection.best.step == 6 and torch.equal(selection.best_state["w"], torch.full((3,), 6.0))
    assert [point.step for point in selection.curve] == [2, 4, 6, 8, 10]
    resumed = ClosedLoopSelection(lambda policy: (0, 0), every=2, directory=tmp_path / "selection")
    resumed.restore(up_to_step=8)  # a run resumed from its step-8 checkpoint goes on with the kept weights
    assert resumed.best.step == 6 and torch.equal(resumed.best_state["w"], torch.full((3,), 6.0))
    assert [point.step for point in resumed.curve] == [2, 4, 6, 8]
    early = ClosedLoopSelection(lambda policy: (0, 0), every=2, directory=tmp_path / "selection")
    early.restore(up_to_step=5)  # validations after the checkpoint are dropped (the resumed run repeats them)
    assert [point.step for point in early.curve] == [2, 4] and early.best is None
    assert (plot_curve({"run": selection.as_dict()}, tmp_path / "curve.png", "test")).stat().st_size > 1000


def test_the_trainer_writes_the_weights_of_the_best_validation_not_the_last(tiny_checkpoint: Path,
                                                                          tmp_path: Path) -> None:
    """A stand-in closed-loop evaluation scores steps 2, 4, 6 as 1, 3, 2 successes: merged/ holds step 4's head."""
    data = write_toy_dataset(tmp_path / "data", NAME, steps=10, x_start=10, x_step=18, extras=True)
    config = FinetuneConfig(vla_path=str(tiny_checkpoint), data_dir=str(data), dataset_name=NAME,
                            out=str(tmp_path / "run"), max_steps=6, batch_size=4, learning_rate=5e-3, lora_rank=4,
                            save_steps=6, eval_steps=0, eval_batches=1, log_steps=2, device="cpu", seed=3,
                            action_head="l1", chunk=4, use_proprio=True, num_images=2)
    scores = {2: 1, 4: 3, 6: 2}
    heads: dict[int, torch.Tensor] = {}
    policies = []

    def stand_in(policy) -> tuple[int, int]:
        step = trainer.step
        heads[step] = policy.model.action_head.model.fc2.weight.detach().clone()
        policies.append(policy)
        return scores[step], 5

    selection = ClosedLoopSelection(stand_in, every=2, directory=tmp_path / "run" / "selection")
    trainer = Trainer(config, selection=selection)
    last = trainer.run()
    assert [point.step for point in selection.curve] == [2, 4, 6] and selection.best.step == 4
    assert last["selected"]["best"]["step"] == 4
    assert policies[0].unnorm_key == NAME and policies[0].chunk_size == 4  # a policy of the weights in training
    written = load_file(str(tmp_path / "run" / "merged" / "action_head.safetensors"))
    fc2 = next(value for key, value in written.items() if key.endswith("fc2.weight"))
    assert torch.allclose(fc2.float(), heads[4].float()), "merged/ must hold the selected step's head"
    assert not torch.allclose(heads[4], heads[6]), "the last step's head differs (else the test proves nothing)"


def test_pretraining_validation_training_and_reported_episodes_never_overlap() -> None:
    from openvla_ros.pretrain import PretrainSettings, episode_seeds, evaluation_seeds, validation_seeds

    settings = PretrainSettings(tasks=("reach", "pick"), episodes=50, select_episodes=30, eval_episodes=40)
    trained = set(episode_seeds(settings))
    for number in range(len(settings.tasks)):
        validation, reported = set(validation_seeds(settings, number)), set(evaluation_seeds(settings, number))
        assert len(validation) == 30 and len(reported) == 40
        assert not validation & reported and not validation & trained and not reported & trained
    other_task = set(validation_seeds(settings, 1))
    assert not other_task & set(evaluation_seeds(settings, 0))


def test_pipeline_validation_and_reported_episodes_never_overlap() -> None:
    from openvla_ros.pipeline.settings import PipelineError, PipelineSettings, episode_seed_sets

    sets = episode_seed_sets(PipelineSettings())
    assert len(sets["evaluation"]) == 80 and len(sets["validation"]) == 20
    for first, second in (("recorded", "validation"), ("recorded", "evaluation"), ("validation", "evaluation")):
        assert not set(sets[first]) & set(sets[second]), f"{first} and {second} episodes overlap"
    with pytest.raises(PipelineError, match="select_seed"):
        PipelineSettings(select_seed=1, eval_seed=1)
    assert len(sets["recorded"]) == 300
