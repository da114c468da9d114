"""The OpenVLA architecture (Prismatic VLM) on current timm and transformers.

One image goes through two ViTs (DINOv2 with registers and SigLIP), each giving 256 patch tokens from
its second-to-last block; the features are concatenated on the channel axis, projected by a 3-layer
MLP into the Llama embedding space and placed after BOS:

    [embed(BOS), projector(patches) x 256, embed(rest of prompt)] -> Llama-2 -> next-token logits

Weight names match the official checkpoints (``vision_backbone.featurizer.*``,
``vision_backbone.fused_featurizer.*``, ``projector.fc1/fc2/fc3``, ``language_model.*``), so a state
dict loads with only the LayerScale rename (see :mod:`openvla_ros.model.loading`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import timm
import torch
from torch import nn
from transformers import LlamaForCausalLM

from openvla_ros.model.configuration_openvla import OpenVLAConfig

IGNORE_INDEX = -100


def make_vit(timm_model_id: str, image_size: int, overrides: dict[str, Any] | None = None) -> nn.Module:
    """Returns a randomly initialised timm ViT with the structure of ``timm_model_id`` (no download)."""
    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 0, "img_size": image_size}
    kwargs.update(overrides or {})
    return timm.create_model(timm_model_id, **kwargs)


@dataclass
class ActionLossOutput:
    """Training output: the loss and the logits at the labelled positions only.

    Attributes:
        loss: mean cross-entropy over the labelled tokens (the 7 actions and EOS per sequence).
        logits: [N, vocab] logits predicting each labelled token, in row-major order over the batch.
        targets: [N] the labelled token ids.
    """

    loss: torch.Tensor
    logits: torch.Tensor
    targets: torch.Tensor


class VisionBackbone(nn.Module):
    """DINOv2 (+ SigLIP when fused) patch features from the second-to-last block, prefix tokens dropped."""

    def __init__(self, config: OpenVLAConfig) -> None:
        super().__init__()
        overrides = config.timm_override_args or [None] * len(config.timm_model_ids)
        self.featurizer = make_vit(config.timm_model_ids[0], config.image_size, overrides[0])
        self.fused_featurizer = (
            make_vit(config.timm_model_ids[1], config.image_size, overrides[1])
            if config.use_fused_vision_backbone
            else None
        )
        self.embed_dim = self.featurizer.embed_dim + (
            self.fused_featurizer.embed_dim if self.fused_featurizer is not None else 0
        )

    @staticmethod
    def _patch_features(vit: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        second_to_last = len(vit.blocks) - 2
        return vit.get_intermediate_layers(pixels, n=[second_to_last])[0]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Returns [B, num_patches, embed_dim] features of [B, 6, S, S] (or [B, 3, S, S]) pixels."""
        dtype = self.featurizer.patch_embed.proj.weight.dtype
        pixel_values = pixel_values.to(dtype)
        if self.fused_featurizer is None:
            return self._patch_features(self.featurizer, pixel_values[:, :3])
        first, second = torch.split(pixel_values, [3, 3], dim=1)
        return torch.cat(
            [self._patch_features(self.featurizer, first), self._patch_features(self.fused_featurizer, second)],
            dim=2,
        )


class Projector(nn.Module):
    """Vision features -> LLM embeddings: 3-layer GELU MLP when fused, 2-layer otherwise."""

    def __init__(self, vision_dim: int, llm_dim: int, fused: bool) -> None:
        super().__init__()
        self.fused = fused
        if fused:
            self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
            self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
            self.fc3 = nn.Linear(llm_dim, llm_dim)
            self.act_fn1 = nn.GELU()
            self.act_fn2 = nn.GELU()
        else:
            self.fc1 = nn.Linear(vision_dim, llm_dim)
            self.fc2 = nn.Linear(llm_dim, llm_dim)
            self.act_fn1 = nn.GELU()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return self.fc3(self.act_fn2(self.fc2(self.act_fn1(self.fc1(features)))))
        return self.fc2(self.act_fn1(self.fc1(features)))


class OpenVLAForActionPrediction(nn.Module):
    """OpenVLA: vision backbone + projector + Llama causal LM."""

    def __init__(self, config: OpenVLAConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_backbone = VisionBackbone(config)
        self.projector = Projector(
            self.vision_backbone.embed_dim, config.text_config.hidden_size, config.use_fused_vision_backbone
        )
        self.language_model = LlamaForCausalLM(config.text_config)

    @property
    def device(self) -> torch.device:
        return self.projector.fc1.weight.device

    def embed_multimodal(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor
    ) -> torch.Tensor:
        """Returns [B, T + P, H] embeddings: BOS, P projected patches, then the rest of ``input_ids``."""
        patches = self.projector(self.vision_backbone(pixel_values))
        tokens = self.language_model.get_input_embeddings()(input_ids)
        patches = patches.to(tokens.dtype)
        return torch.cat([tokens[:, :1], patches, tokens[:, 1:]], dim=1)

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        """Runs the multimodal forward.

        Without ``labels`` it returns the language model's output (logits over every position). With
        ``labels`` (over ``input_ids``; -100 where no loss is taken) it returns an
        :class:`ActionLossOutput`: the lm_head runs only at the labelled positions, which is what makes
        training cheap (a handful of labels per sequence against 32064-way logits at every position).
        ``attention_mask`` is given over ``input_ids``; the patch positions are always attended to.
        """
        embeds = self.embed_multimodal(input_ids, pixel_values)
        num_patches = embeds.shape[1] - input_ids.shape[1]
        if attention_mask is not None:
            patch_mask = attention_mask.new_ones((attention_mask.shape[0], num_patches))
            attention_mask = torch.cat([attention_mask[:, :1], patch_mask, attention_mask[:, 1:]], dim=1)
        if labels is None:
            return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)
        patch_labels = labels.new_full((labels.shape[0], num_patches), IGNORE_INDEX)
        targets = torch.cat([labels[:, :1], patch_labels, labels[:, 1:]], dim=1)[:, 1:]
        hidden = self.language_model.model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        labelled = targets != IGNORE_INDEX
        logits = self.language_model.lm_head(hidden[:, :-1][labelled])
        loss = nn.functional.cross_entropy(logits.float(), targets[labelled])
        return ActionLossOutput(loss=loss, logits=logits, targets=targets[labelled])

    def embed_multimodal_left_padded(
        self, prompts: list[torch.Tensor], pixel_values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (embeddings [B, L, H], attention mask [B, L] long) of several requests, left-padded.

        ``prompts`` are the requests' 1-D prompt ids (each starting with BOS, lengths may differ) and
        ``pixel_values`` their images [B, C, S, S]. Each row is BOS, its patches, the rest of its prompt,
        with zero embeddings (masked out) in front, so that every row ends at the last position.
        """
        patches = self.projector(self.vision_backbone(pixel_values))
        embed = self.language_model.get_input_embeddings()
        rows = []
        for prompt, row_patches in zip(prompts, patches, strict=True):
            tokens = embed(prompt.to(patches.device)[None])[0]
            rows.append(torch.cat([tokens[:1], row_patches.to(tokens.dtype), tokens[1:]], dim=0))
        length = max(row.shape[0] for row in rows)
        embeds = rows[0].new_zeros((len(rows), length, rows[0].shape[1]))
        mask = torch.zeros((len(rows), length), dtype=torch.long, device=embeds.device)
        for index, row in enumerate(rows):
            embeds[index, length - row.shape[0]:] = row
            mask[index, length - row.shape[0]:] = 1
        return embeds, mask

    @torch.inference_mode()
    def generate_action_ids_batch(
        self, prompts: list[torch.Tensor], pixel_values: torch.Tensor, first_action_id: int, last_action_id: int,
        num_tokens: int = 7,
    ) -> torch.Tensor:
        """Greedy-decodes ``num_tokens`` action ids for several requests at once: LongTensor [B, num_tokens].

        The prompts are left-padded; the padding is masked out and every row's positions count from its own
        BOS, so each row's ids are those of :meth:`generate_action_ids` run on it alone (restricted to the
        action ids).
        """
        embeds, mask = self.embed_multimodal_left_padded(prompts, pixel_values)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        output = self.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                     use_cache=True, logits_to_keep=1)
        next_position = positions[:, -1:] + 1
        generated = []
        for step in range(num_tokens):
            next_ids = output.logits[:, -1, first_action_id: last_action_id + 1].argmax(dim=-1) + first_action_id
            generated.append(next_ids)
            if step + 1 == num_tokens:
                break
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            output = self.language_model(input_ids=next_ids[:, None], attention_mask=mask,
                                         position_ids=next_position, past_key_values=output.past_key_values,
                                         use_cache=True, logits_to_keep=1)
            next_position = next_position + 1
        return torch.stack(generated, dim=1)

    @torch.inference_mode()
    def generate_action_ids(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        first_action_id: int,
        last_action_id: int,
        num_tokens: int = 7,
        restrict_to_actions: bool = True,
        eos_token_id: int | None = None,
    ) -> torch.Tensor:
        """Greedy-decodes up to ``num_tokens`` ids with a KV cache.

        With ``restrict_to_actions`` (the default) each step chooses among [first_action_id,
        last_action_id] only. Without it the argmax runs over the whole (padded) vocabulary, as the
        official ``generate()`` does, and decoding ends early when ``eos_token_id`` is chosen (the EOS id
        is the last one returned).

        Returns:
            LongTensor [B, n] of generated ids, n <= ``num_tokens`` (n == ``num_tokens`` when restricted).
        """
        embeds = self.embed_multimodal(input_ids, pixel_values)
        output = self.language_model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
        generated = []
        for step in range(num_tokens):
            if restrict_to_actions:
                next_ids = output.logits[:, -1, first_action_id : last_action_id + 1].argmax(dim=-1) + first_action_id
            else:
                next_ids = output.logits[:, -1].argmax(dim=-1)
            generated.append(next_ids)
            if step + 1 == num_tokens:
                break
            if not restrict_to_actions and eos_token_id is not None and bool((next_ids == eos_token_id).all()):
                break
            output = self.language_model(
                input_ids=next_ids[:, None],
                past_key_values=output.past_key_values,
                use_cache=True,
                logits_to_keep=1,
            )
        return torch.stack(generated, dim=1)
