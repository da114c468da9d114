"""The pretraining's auxiliary localisation losses: targets found in real rendered frames, and what they train."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from openvla_ros.model.loading import load_tokenizer, read_config, read_image_settings
from openvla_ros.model.oft import OFTInternals
from openvla_ros.model.processor import ImageTransform, prompt_token_ids
from openvla_ros.sim.localisation import LocalisationLoss
from openvla_ros.sim.render import CameraModel, TabletopRenderer
from openvla_ros.sim.scene import SceneConfig, TabletopScene, make_instruction

VISION, LLM, ACTION_TOKENS = 80, 64, 56


@pytest.fixture(scope="module")
def parts(tiny_checkpoint: Path):
    settings = read_image_settings(tiny_checkpoint, read_config(tiny_checkpoint))
    return load_tokenizer(tiny_checkpoint), settings


def _loss(parts, patch_weight: float = 0.1, point_weight: float = 0.5) -> LocalisationLoss:
    tokenizer, settings = parts
    return LocalisationLoss(VISION, LLM, 14, tokenizer, settings, patch_weight, point_weight, seed=0)


def _batch(parts, image: np.ndarray, instructions: list[str]):
    tokenizer, settings = parts
    pixels = ImageTransform(settings=settings).pixel_values(image)
    prompts = [prompt_token_ids(tokenizer, text) for text in instructions]
    width = max(len(p) for p in prompts) + 3
    ids = torch.tensor([p + [0] * (width - len(p)) for p in prompts])
    return pixels[None].expand(len(prompts), -1, -1, -1), ids, torch.tensor([len(p) for p in prompts])


def _centre(target: torch.Tensor) -> tuple[float, float]:
    side = round(target.shape[-1] ** 0.5)
    grid = target.reshape(side, side)
    rows, cols = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32),
                                indexing="ij")
    return float((grid * cols).sum()), float((grid * rows).sum())


@pytest.mark.parametrize("upside_down", [False, True])
def test_the_targets_find_each_named_block_where_the_camera_shows_it(parts, upside_down: bool) -> None:
    """In a rendered frame, each colour's target sits where that block is: left-right and up-down in the order
    of the blocks' table positions (mirrored for the upside-down camera), with nothing on the other patches."""
    scene = TabletopScene(SceneConfig(num_blocks=4))
    scene.reset(seed=5, task="reach")
    image = TabletopRenderer(CameraModel(upside_down=upside_down)).render(scene)
    colours = sorted(scene.blocks)
    loss = _loss(parts)
    target, valid = loss.targets(*_batch(parts, image, [make_instruction("reach", c) for c in colours]))
    assert valid.all() and torch.allclose(target.sum(dim=1), torch.ones(len(colours)))
    centres = [_centre(row) for row in target]
    sign = -1 if upside_down else 1
    for (a, ca), (b, cb) in zip(zip(colours, centres, strict=True), zip(colours[1:], centres[1:], strict=True),
                                strict=False):
        dx = scene.blocks[b].position[0] - scene.blocks[a].position[0]
        dy = scene.blocks[b].position[1] - scene.blocks[a].position[1]
        if abs(dx) > 0.03:  # blocks are 4 cm: a column apart at least
            assert np.sign(cb[0] - ca[0]) == sign * np.sign(dx), (a, b, ca, cb)
        if abs(dy) > 0.03:  # the image's rows run against the table's y
            assert np.sign(cb[1] - ca[1]) == -sign * np.sign(dy), (a, b, ca, cb)
    for row in target:  # a block covers a few patches of the 256, not a smear over the image
        assert int((row > 0).sum()) <= 9 and float(row.max()) > 0.2


def test_an_instruction_without_a_scene_colour_or_a_hidden_block_adds_nothing(parts) -> None:
    scene = TabletopScene(SceneConfig(num_blocks=1))
    scene.reset(seed=1, task="reach")
    image = TabletopRenderer().render(scene)
    (present,) = scene.blocks
    absent = next(c for c in ("red", "green", "blue", "yellow") if c != present)
    loss = _loss(parts)
    _, valid = loss.targets(*_batch(parts, image, [make_instruction("reach", present), "move up a little",
                                                   make_instruction("reach", absent)]))
    assert valid.tolist() == [True, False, False]
    assert loss.named_colour(prompt_token_ids(parts[0], "put the blue block on the red block")) == "blue"
    pixels, ids, lengths = _batch(parts, image, ["move up a little"])
    internals = OFTInternals(torch.zeros(1, 8, 7), torch.randn(1, 256, VISION), torch.randn(1, ACTION_TOKENS, LLM))
    assert float(loss(pixels, ids, lengths, internals)) == 0.0 and loss.last["samples"] == 0


def test_the_loss_reaches_the_patch_features_and_the_first_action_state_only(parts) -> None:
    scene = TabletopScene()
    scene.reset(seed=2, task="reach")
    image = TabletopRenderer().render(scene)
    colour = sorted(scene.blocks)[0]
    pixels, ids, lengths = _batch(parts, image, [make_instruction("reach", colour)] * 2)
    features = torch.randn(2, 256, VISION, requires_grad=True)
    hidden = torch.randn(2, ACTION_TOKENS, LLM, requires_grad=True)
    loss = _loss(parts)
    value = loss(pixels, ids, lengths, OFTInternals(torch.zeros(2, 8, 7), features, hidden))
    assert torch.isfinite(value.detach()) and float(value.detach()) > 0 and loss.last["samples"] == 2
    assert float(value.detach()) == pytest.approx(0.1 * loss.last["patch_ce"] + 0.5 * loss.last["point_l1"], rel=1e-5)
    value.backward()
    assert features.grad.abs().sum() > 0
    assert hidden.grad[:, 0].abs().sum() > 0 and hidden.grad[:, 1:].abs().sum() == 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.parameters())
    none = _loss(parts, 0.0, 0.0)(pixels, ids, lengths, OFTInternals(torch.zeros(2, 8, 7), features, hidden))
    assert float(none.detach()) == 0.0
    with pytest.raises(ValueError, match="localisation weights must be >= 0"):
        _loss(parts, -0.1, 0.5)

