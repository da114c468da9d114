"""The energy model and energy-guided refinement: structure, step cap, determinism, NaN guards, loading."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from openvla_ros.errors import CheckpointError
from openvla_ros.model.energy import (
    EnergyModel,
    EnergySpec,
    RefinementSettings,
    energy_context_mask,
    refine_chunk,
)
from openvla_ros.model.oft_loading import ENERGY_CONFIG_NAME, ENERGY_NAME, save_energy_model
from openvla_ros.model.oft_policy import OFTPolicy, load_policy_auto
from openvla_ros.model.tiny_oft import make_tiny_oft_checkpoint

CHUNK = 8
TINY_HIDDEN = 64  # the tiny VLA's hidden size
INSTRUCTION = "pick up the red block"


def _energy(seed: int = 0, context_dim: int = TINY_HIDDEN, chunk: int = CHUNK, dropout: float = 0.2) -> EnergyModel:
    torch.manual_seed(seed)
    return EnergyModel(EnergySpec(context_dim=context_dim, action_dim=7, chunk=chunk, hidden_dim=32, num_heads=4,
                                  dropout=dropout))


def _sharp(model: EnergyModel) -> EnergyModel:
    """Scales the action encoder up so that the energy has steep gradients (as after training)."""
    with torch.no_grad():
        model.action_encoder.fc1.weight.mul_(30.0)
        model.energy_head.fc2.weight.mul_(20.0)
    return model


def _inputs(batch: int = 3, length: int = 12, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    context = torch.randn(batch, length, TINY_HIDDEN, generator=generator)
    visible = torch.ones(batch, length, dtype=torch.bool)
    visible[:, -4:] = False
    chunk = torch.rand(batch, CHUNK, 7, generator=generator) * 2 - 1
    return context, visible, chunk


@pytest.fixture(scope="module")
def oft_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_oft_checkpoint(tmp_path_factory.mktemp("energy_oft") / "model", seed=0, chunk=CHUNK,
                                    official=False)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (224, 224, 3), dtype=np.uint8)


def test_the_energy_is_bounded_per_sample_and_ignores_hidden_context_positions() -> None:
    model = _energy().eval()
    context, visible, chunk = _inputs()
    energy = model(context, visible, chunk)
    assert energy.shape == (3,) and energy.dtype == torch.float32
    assert bool(((energy > 0.1) & (energy < 2.1)).all())
    changed = context.clone()
    changed[:, -4:] += 100.0  # hidden positions
    assert torch.allclose(model(changed, visible, chunk), energy, atol=1e-6)
    changed[:, 0] = torch.randn(3, TINY_HIDDEN)  # a visible position (LayerNorm ignores a constant shift)
    assert not torch.allclose(model(changed, visible, chunk), energy, atol=1e-6)
    assert not torch.allclose(model(context, visible, chunk.flip(1)), energy, atol=1e-6), "the step order matters"
    with pytest.raises(ValueError, match="no visible position"):
        model(context, torch.zeros_like(visible), chunk)
    with pytest.raises(ValueError, match=r"chunk must be \[B, 8, 7\]"):
        model(context, visible, chunk[:, :4])
    assert not any("positions" in key for key in model.state_dict()), "the sinusoid table is not saved"


def test_the_energy_matrix_pairs_every_context_with_every_chunk() -> None:
    model = _energy().eval()
    context, visible, chunk = _inputs()
    matrix = model.energy_matrix(model.encode_context(context), visible, chunk)
    for i in range(3):
        for j in range(3):
            single = model(context[i:i + 1], visible[i:i + 1], chunk[j:j + 1])
            assert torch.allclose(matrix[i, j], single[0], atol=1e-6)


def test_a_correction_step_never_moves_the_chunk_more_than_the_cap() -> None:
    model = _sharp(_energy())
    context, visible, chunk = _inputs()
    fraction = 0.05
    settings = RefinementSettings(steps=1, step_size=1e6, max_step_fraction=fraction)
    result = refine_chunk(model, context, visible, chunk, settings)
    moved = (result.chunk - chunk).flatten(1).norm(dim=1)
    cap = fraction * chunk.flatten(1).norm(dim=1)
    assert bool((moved <= cap * (1 + 1e-5)).all()), (moved, cap)
    assert bool((moved >= 0.99 * cap).all()), "a huge step size is cut down to the cap, not to nothing"
    # every single step of several stays under the cap of the uncorrected chunk
    previous = chunk
    for steps in (1, 2, 3):
        current = refine_chunk(model, context, visible, chunk, RefinementSettings(steps, 1e6, fraction)).chunk
        assert bool(((current - previous).flatten(1).norm(dim=1) <= cap * (1 + 1e-5)).all())
        previous = current
    assert bool((result.energy_after < result.energy_before).all()), "the step goes down the energy"


def test_small_steps_follow_the_negative_gradient_uncapped() -> None:
    model = _sharp(_energy())
    context, visible, chunk = _inputs(batch=1)
    probe = chunk.clone().requires_grad_(True)
    model.eval()
    (gradient,) = torch.autograd.grad(model(context, visible, probe).sum(), probe)
    alpha = 1e-4 / float(gradient.norm())
    result = refine_chunk(model, context, visible, chunk, RefinementSettings(1, alpha, 0.2))
    assert torch.allclose(result.chunk, chunk - alpha * gradient, atol=1e-7)


def test_refinement_runs_in_eval_mode_and_is_deterministic() -> None:
    model = _sharp(_energy(dropout=0.5)).train()
    context, visible, chunk = _inputs()
    settings = RefinementSettings(steps=3, step_size=0.5, max_step_fraction=0.2)
    first = refine_chunk(model, context, visible, chunk, settings)
    second = refine_chunk(model, context, visible, chunk, settings)
    assert torch.equal(first.chunk, second.chunk) and torch.equal(first.energy_after, second.energy_after)
    assert not torch.equal(first.chunk, chunk)
    assert model.training, "the caller's mode is restored"
    # in train mode dropout would make two evaluations differ: eval mode is what makes it repeatable
    assert not torch.equal(model(context, visible, chunk), model(context, visible, chunk))


def test_a_non_finite_energy_or_gradient_returns_the_uncorrected_chunk() -> None:
    model = _energy()
    context, visible, chunk = _inputs()
    with torch.no_grad():
        model.energy_head.fc2.bias.fill_(float("nan"))
    result = refine_chunk(model, context, visible, chunk, RefinementSettings(2, 0.5, 0.2))
    assert result.problem and "not finite" in result.problem
    assert torch.equal(result.chunk, chunk) and not bool(torch.isnan(result.chunk).any())
    inf_context = context.clone()
    inf_context[0, 0, 0] = float("inf")
    result = refine_chunk(_energy(), inf_context, visible, chunk, RefinementSettings(1, 0.5, 0.2))
    assert result.problem is not None and torch.equal(result.chunk, chunk)


def test_the_context_mask_shows_observation_and_prompt_but_the_last_prompt_token() -> None:
    key_mask = torch.tensor([[True] * 10, [True] * 8 + [False] * 2])
    visible = energy_context_mask(key_mask, torch.tensor([4, 3]), num_prefix=2)
    # row 0: BOS + 2 prefix + prompt ids 1..3 (4 with BOS): the last prompt id sits at 2 + 4 - 1 = 5
    assert visible[0].tolist() == [True] * 5 + [False] * 5
    assert visible[1].tolist() == [True] * 4 + [False] * 6


def test_refinement_settings_refuse_bad_values_naming_them() -> None:
    with pytest.raises(ValueError, match="energy_steps"):
        RefinementSettings(steps=-1)
    with pytest.raises(ValueError, match="energy_max_step_fraction"):
        RefinementSettings(steps=1, max_step_fraction=1.5)
    with pytest.raises(ValueError, match="energy_step_size"):
        RefinementSettings(steps=1, step_size=float("nan"))


# ------------------------------------------------------------------------------- through the policy


def _with_energy(source: Path, target: Path, model: EnergyModel) -> Path:
    import shutil

    shutil.copytree(source, target)
    save_energy_model(model, target, {"steps": 0})
    return target


def test_the_policy_refines_in_normalised_space_and_reports_both_energies(
    oft_dir: Path, image: np.ndarray, tmp_path: Path
) -> None:
    directory = _with_energy(oft_dir, tmp_path / "with_energy", _sharp(_energy()))
    policy = OFTPolicy.from_pretrained(str(directory), device="cpu", energy_steps=2, energy_step_size=5.0,
                                       energy_max_step_fraction=0.1)
    assert not policy.energy_model.training and all(p.dtype == torch.float32 for p in policy.energy_model.parameters())
    prediction = policy.predict(image, INSTRUCTION)
    assert prediction.problem is None and prediction.energy_after < prediction.energy_before
    assert not np.allclose(prediction.chunk, prediction.uncorrected)
    plain = OFTPolicy.from_pretrained(str(directory), device="cpu")
    np.testing.assert_allclose(plain.predict_chunk(image, INSTRUCTION), prediction.uncorrected, atol=1e-9)
    # the move is bounded in normalised space: 2 steps of at most 0.1 x the normalised chunk's norm
    normalize = policy.normalizer.normalize
    moved = np.linalg.norm(normalize(prediction.chunk) - normalize(prediction.uncorrected))
    assert moved <= 2 * 0.1 * np.linalg.norm(normalize(prediction.uncorrected)) + 1e-6
    again = policy.predict(image, INSTRUCTION)
    np.testing.assert_array_equal(again.chunk, prediction.chunk)
    energies = policy.candidate_energies(image, INSTRUCTION, np.stack([prediction.uncorrected, prediction.chunk]))
    # candidates go through normalize(), which clips to [-1, 1]: equal up to that clipping
    assert energies.shape == (2,) and energies == pytest.approx([prediction.energy_before, prediction.energy_after],
                                                               abs=1e-3)
    policy.configure_energy(0, 0.5, 0.2)
    np.testing.assert_allclose(policy.predict_chunk(image, INSTRUCTION), prediction.uncorrected, atol=1e-9)


def test_energy_steps_without_an_energy_file_are_refused_at_load(oft_dir: Path, tiny_checkpoint: Path) -> None:
    with pytest.raises(CheckpointError, match="energy_steps 1 needs an energy model"):
        OFTPolicy.from_pretrained(str(oft_dir), device="cpu", energy_steps=1)
    policy = OFTPolicy.from_pretrained(str(oft_dir), device="cpu")
    assert policy.energy_model is None
    with pytest.raises(ValueError, match="needs an energy model"):
        policy.configure_energy(2, 0.5, 0.2)
    assert policy.energy.steps == 0
    with pytest.raises(CheckpointError, match="token-by-token"):
        load_policy_auto(str(tiny_checkpoint), device="cpu", energy_steps=1)


def test_an_energy_file_of_another_model_is_refused_naming_the_sizes(oft_dir: Path, tmp_path: Path) -> None:
    wrong_chunk = _with_energy(oft_dir, tmp_path / "chunk", _energy(chunk=4))
    with pytest.raises(CheckpointError, match="chunks of 4.*chunks of 8"):
        OFTPolicy.from_pretrained(str(wrong_chunk), device="cpu")
    wrong_width = _with_energy(oft_dir, tmp_path / "width", _energy(context_dim=128))
    with pytest.raises(CheckpointError, match="hidden size 128"):
        OFTPolicy.from_pretrained(str(wrong_width), device="cpu", energy_steps=1)
    lying = _with_energy(oft_dir, tmp_path / "lying", _energy())
    sizes = json.loads((lying / ENERGY_CONFIG_NAME).read_text())
    sizes["spec"]["hidden_dim"] = 48
    (lying / ENERGY_CONFIG_NAME).write_text(json.dumps(sizes))
    with pytest.raises(CheckpointError, match=f"{ENERGY_NAME} does not fit"):
        OFTPolicy.from_pretrained(str(lying), device="cpu")
    (lying / ENERGY_CONFIG_NAME).unlink()
    with pytest.raises(CheckpointError, match=f"no {ENERGY_CONFIG_NAME}"):
        OFTPolicy.from_pretrained(str(lying), device="cpu")


def test_a_nan_energy_at_run_time_gives_the_uncorrected_chunk_and_one_warning(
    oft_dir: Path, image: np.ndarray, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken = _energy()
    with torch.no_grad():
        broken.energy_head.fc2.weight.fill_(float("nan"))
    directory = _with_energy(oft_dir, tmp_path / "nan", broken)
    policy = OFTPolicy.from_pretrained(str(directory), device="cpu", energy_steps=1)
    with caplog.at_level(logging.WARNING, logger="openvla_ros.model.oft_policy"):
        chunks = [policy.predict(image, INSTRUCTION) for _ in range(3)]
    for prediction in chunks:
        assert np.all(np.isfinite(prediction.chunk)) and prediction.problem
        np.testing.assert_array_equal(prediction.chunk, prediction.uncorrected)
    assert sum("energy refinement skipped" in r.message for r in caplog.records) == 1
