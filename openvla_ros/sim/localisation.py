"""Auxiliary localisation losses for pretraining on the tabletop: where the named block is, taught directly.

Trained on the action loss alone, the tiny base spent 2,000-2,500 of its 4,000 steps (batch 16) on a
plateau (see docs/results.md) before it learned where a block is at all, and where in that range it
left decided whether the build ended up good. The scene's colours are known, so the named block's pixels
can be found in every training image and two small heads can be taught from them beside the action
loss:

- **patch**: a linear score of every patch feature of the primary image (after FiLM, before the
  projector), softmaxed over the patches, against the share of the named block's pixels in each
  patch (cross-entropy): the vision towers learn to single out the named block;
- **point**: a linear map of the hidden state the action head reads for the first action, against
  the block's centre in the image (x and y in -1..1, L1): the language model learns to gather where it
  is.

Only the training uses them: the heads live beside the model, and the model written is the same
layout as without them. A sample whose instruction names no colour, or whose named block is hidden
(under the gripper), adds nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional

from openvla_ros.model.oft import OFTInternals, OpenVLAOFT
from openvla_ros.model.processor import ImageSettings
from openvla_ros.sim.scene import COLORS

# Largest per-channel difference (0-255) from the scene colour that still counts as the block's pixel:
# the renderer fills blocks flat, and resizing blends only their edges.
COLOUR_TOLERANCE = 45.0


class LocalisationLoss(nn.Module):
    """The weighted sum of the patch and point terms (module docstring) for one batch.

    ``last`` holds the unweighted terms of the latest batch (``patch_ce``, ``point_l1``, ``samples``).
    """

    def __init__(self, vision_width: int, llm_dim: int, patch_size: int, tokenizer: Any,
                 image_settings: ImageSettings, patch_weight: float, point_weight: float, seed: int,
                 colours: dict[str, tuple[int, int, int]] | None = None) -> None:
        super().__init__()
        if patch_weight < 0 or point_weight < 0:
            raise ValueError(f"localisation weights must be >= 0, got {patch_weight} and {point_weight}")
        self.patch_weight = float(patch_weight)
        self.point_weight = float(point_weight)
        self.patch_size = int(patch_size)
        self.tokenizer = tokenizer
        self.colours = dict(colours or COLORS)
        self.patch_score = nn.Linear(vision_width, 1, bias=False)  # a softmax over patches ignores a shared bias
        self.point = nn.Linear(llm_dim, 2)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in (self.patch_score, self.point):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) / layer.weight.shape[1] ** 0.5)
        nn.init.zeros_(self.point.bias)
        self.register_buffer("_mean", torch.tensor(image_settings.means[0], dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("_std", torch.tensor(image_settings.stds[0], dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self._named: dict[tuple[int, ...], str | None] = {}
        self.last: dict[str, float] = {}

    def named_colour(self, prompt_ids: list[int]) -> str | None:
        """Returns the scene colour the prompt names first (``None`` when it names none)."""
        key = tuple(prompt_ids)
        if key not in self._named:
            text = self.tokenizer.decode(list(key)).lower()
            places = {text.find(name): name for name in self.colours if name in text}
            self._named[key] = places[min(places)] if places else None
        return self._named[key]

    def targets(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                prompt_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (share of the named block's pixels per patch [B, G*G] summing to 1 where valid, valid [B]).

        ``pixel_values`` are the model's normalised input [B, C, S, S]; the first three channels, the first
        tower's, are taken back to 0-255 RGB.
        """
        rgb = (pixel_values[:, :3].float() * self._std + self._mean) * 255.0
        masks = torch.zeros(rgb.shape[0], 1, *rgb.shape[-2:], device=rgb.device)
        for row, (ids, length) in enumerate(zip(input_ids.tolist(), prompt_lengths.tolist(), strict=True)):
            name = self.named_colour(ids[:length])
            if name is not None:
                colour = torch.tensor(self.colours[name], dtype=torch.float32, device=rgb.device).view(3, 1, 1)
                masks[row, 0] = ((rgb[row] - colour).abs().amax(dim=0) < COLOUR_TOLERANCE).float()
        shares = functional.avg_pool2d(masks, self.patch_size).flatten(1)
        total = shares.sum(dim=1)
        valid = total > 0
        return shares / total.clamp(min=1e-12)[:, None], valid

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, prompt_lengths: torch.Tensor,
                internals: OFTInternals) -> torch.Tensor:
        target, valid = self.targets(pixel_values, input_ids, prompt_lengths)
        zero = internals.chunk.new_zeros(())
        if not bool(valid.any()):
            self.last = {"patch_ce": float("nan"), "point_l1": float("nan"), "samples": 0}
            return zero
        target = target[valid]
        patches = target.shape[1]
        side = round(patches**0.5)
        scores = self.patch_score(internals.vision_features[valid, :patches].float()).squeeze(-1)
        patch_ce = -(target * functional.log_softmax(scores, dim=-1)).sum(dim=-1).mean()
        centres = (torch.arange(side, dtype=torch.float32, device=target.device) + 0.5) / side * 2.0 - 1.0
        ys, xs = torch.meshgrid(centres, centres, indexing="ij")
        centre = torch.stack([(target * xs.reshape(1, -1)).sum(-1), (target * ys.reshape(1, -1)).sum(-1)], dim=-1)
        point_l1 = (self.point(internals.action_hidden[valid, 0].float()) - centre).abs().mean()
        self.last = {"patch_ce": patch_ce.item(), "point_l1": point_l1.item(), "samples": int(valid.sum())}
        return self.patch_weight * patch_ce + self.point_weight * point_l1


HEADS_SEED_OFFSET = 991


def heads_seed(training_seed: int) -> int:
    """The seed of the heads' initial weights for a build trained with ``training_seed``.

    Offset from the training seed so the heads never start from the same draws as the model's own layers.
    """
    return training_seed + HEADS_SEED_OFFSET


def localisation_loss(patch_weight: float, point_weight: float, seed: int
                      ) -> Callable[[OpenVLAOFT, Any, ImageSettings], LocalisationLoss]:
    """Returns the factory the trainer calls with its model, tokenizer and image settings."""

    def build(network: OpenVLAOFT, tokenizer: Any, image_settings: ImageSettings) -> LocalisationLoss:
        backbone = network.vla.vision_backbone
        towers = [t for t in (backbone.featurizer, backbone.fused_featurizer) if t is not None]
        return LocalisationLoss(
            vision_width=sum(t.embed_dim for t in towers), llm_dim=network.vla.config.text_config.hidden_size,
            patch_size=int(backbone.featurizer.patch_embed.patch_size[0]), tokenizer=tokenizer,
            image_settings=image_settings, patch_weight=patch_weight, point_weight=point_weight, seed=seed,
        )

    return build
