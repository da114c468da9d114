"""OpenVLA-OFT: parallel decoding of a whole action chunk in one bidirectional forward pass.

The language model sees, for each sample (batch rows right-padded):

    BOS | 256 patches per image (primary first, then wrist cameras) | [proprio token] |
    prompt tokens ending in the bare space 29871 | A*K zero-embedding placeholders | </s>

with full bidirectional attention over every non-pad position (an explicit 4D mask, never the causal
default). The hidden states after the final norm are read one position to the left of the
placeholders (the 29871 token and the first A*K-1 placeholders: next-token alignment, as training
reads ``hidden[:, P:-1]`` against ``labels[:, 1:]``), reshaped row-major to [B, K, A*D] and mapped by
the L1 regression head (an MLP-ResNet) to [B, K, A] normalised actions. FiLM (optional) scales and
shifts every ViT block's output by a projection of the mean prompt embedding.

:func:`build_chunk_inputs` lays out the token sequence and :meth:`OpenVLAOFT.action_hidden_states`
runs it; training (:mod:`openvla_ros.finetune`) and inference (:mod:`openvla_ros.model.oft_policy`)
both go through them, so the layout, mask and shift cannot differ between the two.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from openvla_ros.model.modeling_openvla import OpenVLAForActionPrediction

PLACEHOLDER_ID = 1  # any id: placeholder embeddings are replaced by exact zeros
STOP_TOKEN_ID = 2
HEADS = ("l1",)
NORMALIZATIONS = ("bounds_q99", "bounds")


@dataclass(frozen=True)
class OFTSpec:
    """The chunk layout of an OFT model, read from its weights and config (never guessed from argv).

    Attributes:
        chunk: K, actions per forward pass.
        action_dim: A, dimensions per action.
        proprio_dim: length of the proprio vector; 0 when the model takes none.
        num_images: images per observation (primary first, then wrist cameras).
        film: language-conditioned FiLM in every ViT block.
        head: ``l1`` (the L1 regression MLP-ResNet).
        normalization: ``bounds_q99`` (q01/q99 -> [-1, 1]) or ``bounds`` (min/max), for actions and proprio.
        head_hidden_dim: width of the head's MLP (the LLM hidden size in the official models).
    """

    chunk: int
    action_dim: int
    proprio_dim: int = 0
    num_images: int = 1
    film: bool = False
    head: str = "l1"
    normalization: str = "bounds_q99"
    head_hidden_dim: int = 0

    def __post_init__(self) -> None:
        if self.chunk < 1 or self.action_dim < 1 or self.num_images < 1 or self.proprio_dim < 0:
            raise ValueError(f"invalid OFT layout {self}: chunk, action_dim and num_images must be >= 1")
        if self.head not in HEADS:
            raise ValueError(f"unknown OFT action head {self.head!r}; supported: {', '.join(HEADS)}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown normalisation {self.normalization!r}; use one of {', '.join(NORMALIZATIONS)}")

    @property
    def num_action_tokens(self) -> int:
        return self.chunk * self.action_dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OFTSpec:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown OFT config field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)


class MLPResNetBlock(nn.Module):
    """x + ReLU(Linear(LayerNorm(x))), the official block (``ffn.0`` LayerNorm, ``ffn.1`` Linear)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(x)


class MLPResNet(nn.Module):
    """LayerNorm -> Linear -> ReLU -> blocks -> LayerNorm -> Linear; no output squashing."""

    def __init__(self, num_blocks: int, input_dim: int, hidden_dim: int, output_dim: int) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(input_dim)
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.relu = nn.ReLU()
        self.mlp_resnet_blocks = nn.ModuleList(MLPResNetBlock(hidden_dim) for _ in range(num_blocks))
        self.layer_norm2 = nn.LayerNorm(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.fc1(self.layer_norm1(x)))
        for block in self.mlp_resnet_blocks:
            x = block(x)
        return self.fc2(self.layer_norm2(x))


class L1RegressionActionHead(nn.Module):
    """Maps the A*K action hidden states [B, A*K, D] to a normalised chunk [B, K, A]."""

    def __init__(self, llm_dim: int, hidden_dim: int, action_dim: int, num_blocks: int = 2) -> None:
        super().__init__()
        self.action_dim = action_dim
        self.model = MLPResNet(num_blocks, llm_dim * action_dim, hidden_dim, action_dim)

    def forward(self, action_hidden: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = action_hidden.shape
        chunk = tokens // self.action_dim
        # Step k reads the hidden states of slots A*k .. A*k+A-1, concatenated in order (row-major).
        return self.model(action_hidden.reshape(batch, chunk, self.action_dim * width))


class ProprioProjector(nn.Module):
    """Proprio vector [B, N] -> one LLM token [B, D]: Linear, GELU, Linear."""

    def __init__(self, llm_dim: int, proprio_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(proprio_dim, llm_dim)
        self.act_fn1 = nn.GELU()
        self.fc2 = nn.Linear(llm_dim, llm_dim)

    def forward(self, proprio: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act_fn1(self.fc1(proprio)))


class FiLMLayer(nn.Module):
    """Per-block FiLM parameters: ``scale`` and ``shift``, Linear(D -> vision width) each."""

    def __init__(self, llm_dim: int, vision_dim: int) -> None:
        super().__init__()
        self.scale = nn.Linear(llm_dim, vision_dim)
        self.shift = nn.Linear(llm_dim, vision_dim)


class VisionFiLM(nn.Module):
    """FiLM layers for every block of each ViT, keyed like the towers (``featurizer``, ``fused_featurizer``)."""

    def __init__(self, vla: OpenVLAForActionPrediction) -> None:
        super().__init__()
        llm_dim = vla.config.text_config.hidden_size
        backbone = vla.vision_backbone
        self.featurizer = nn.ModuleList(
            FiLMLayer(llm_dim, backbone.featurizer.embed_dim) for _ in backbone.featurizer.blocks
        )
        self.fused_featurizer = (
            nn.ModuleList(FiLMLayer(llm_dim, backbone.fused_featurizer.embed_dim)
                          for _ in backbone.fused_featurizer.blocks)
            if backbone.fused_featurizer is not None
            else None
        )


def film_patch_features(vit: nn.Module, pixels: torch.Tensor, film: nn.ModuleList,
                        language: torch.Tensor) -> torch.Tensor:
    """Returns the second-to-last block's patch tokens of a timm ViT with FiLM after every attention.

    Per block: x + attn branch; x * (1 + scale(e)) + shift(e); x + MLP branch. The blocks after the
    second-to-last never contribute and are not run.
    """
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(pixels))))
    language = language.to(x.dtype)
    for block, layer in zip(list(vit.blocks)[: len(vit.blocks) - 1], film, strict=False):
        x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
        x = x * (1 + layer.scale(language)[:, None, :]) + layer.shift(language)[:, None, :]
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x[:, vit.num_prefix_tokens:]


@dataclass
class ChunkInputs:
    """The token side of an OFT batch (right-padded).

    Attributes:
        input_ids: [B, L] prompt (BOS ... 29871), A*K placeholders, ``</s>``, then padding.
        attention_mask: [B, L] bool, False at padding.
        action_mask: [B, L] bool, True at the placeholders.
        prompt_lengths: [B] number of prompt ids including BOS.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    action_mask: torch.Tensor
    prompt_lengths: torch.Tensor

    def to(self, device: torch.device | str) -> ChunkInputs:
        return ChunkInputs(*(t.to(device) for t in (self.input_ids, self.attention_mask,
                                                    self.action_mask, self.prompt_lengths)))


def build_chunk_inputs(prompts: Sequence[Sequence[int]], spec: OFTSpec, pad_token_id: int) -> ChunkInputs:
    """Lays out prompts (each BOS ... 29871, from :func:`~openvla_ros.model.processor.prompt_token_ids`)
    followed by the placeholders and the stop token, right-padded to one length."""
    if not prompts:
        raise ValueError("build_chunk_inputs needs at least one prompt")
    n_actions = spec.num_action_tokens
    rows = [list(p) + [PLACEHOLDER_ID] * n_actions + [STOP_TOKEN_ID] for p in prompts]
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.bool)
    action_mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, (prompt, row) in enumerate(zip(prompts, rows, strict=True)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = True
        action_mask[i, len(prompt): len(prompt) + n_actions] = True
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    return ChunkInputs(input_ids, attention_mask, action_mask, lengths)


def bidirectional_mask(key_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Returns the additive [B, 1, L, L] mask letting every position attend to every non-pad key.

    Additive floats (0 / dtype min) work for both the SDPA and the eager attention of transformers;
    a boolean mask would be added as 0/1 by eager attention, and a 2D mask would become causal.
    """
    blocked = torch.finfo(dtype).min
    mask = torch.zeros(key_mask.shape, dtype=dtype, device=key_mask.device)
    mask = mask.masked_fill(~key_mask, blocked)
    length = key_mask.shape[1]
    return mask[:, None, None, :].expand(-1, 1, length, length)


class OpenVLAOFT(nn.Module):
    """An OpenVLA model with the OFT chunk head: one forward pass -> K continuous actions.

    Submodules: ``vla`` (the OpenVLA VLM, its lm_head unused), ``action_head``, ``proprio_projector``
    (when ``spec.proprio_dim``), ``film`` (when ``spec.film``).
    """

    def __init__(self, vla: OpenVLAForActionPrediction, spec: OFTSpec) -> None:
        super().__init__()
        if spec.num_images > 1 and vla.vision_backbone.fused_featurizer is None:
            raise ValueError("several input images need the fused (DINOv2 + SigLIP) vision backbone")
        self.vla = vla
        self.spec = spec
        llm_dim = vla.config.text_config.hidden_size
        hidden = spec.head_hidden_dim or llm_dim
        if spec.head_hidden_dim == 0:
            self.spec = spec = OFTSpec(**{**spec.to_dict(), "head_hidden_dim": llm_dim})
        self.action_head = L1RegressionActionHead(llm_dim, hidden, spec.action_dim)
        self.proprio_projector = ProprioProjector(llm_dim, spec.proprio_dim) if spec.proprio_dim else None
        self.film = VisionFiLM(vla) if spec.film else None

    @property
    def config(self):
        return self.vla.config

    @property
    def device(self) -> torch.device:
        return self.vla.device

    @property
    def llm_dtype(self) -> torch.dtype:
        return self.vla.language_model.get_input_embeddings().weight.dtype

    def _image_features(self, pixel_values: torch.Tensor, language: torch.Tensor | None) -> torch.Tensor:
        """Returns [B, 256 * N, vision width] features of [B, C * N, S, S] pixels (C = 6 or 3)."""
        backbone = self.vla.vision_backbone
        per_image = 6 if backbone.fused_featurizer is not None else 3
        if pixel_values.shape[1] != per_image * self.spec.num_images:
            raise ValueError(
                f"pixel_values have {pixel_values.shape[1]} channels; this model takes "
                f"{self.spec.num_images} image(s) of {per_image} channels"
            )
        dtype = backbone.featurizer.patch_embed.proj.weight.dtype
        features = []
        for image in torch.split(pixel_values.to(dtype), per_image, dim=1):
            if self.film is None:
                features.append(backbone(image))
                continue
            towers = [film_patch_features(backbone.featurizer, image[:, :3], self.film.featurizer, language)]
            if backbone.fused_featurizer is not None:
                towers.append(film_patch_features(backbone.fused_featurizer, image[:, 3:],
                                                  self.film.fused_featurizer, language))
            features.append(torch.cat(towers, dim=2))
        return torch.cat(features, dim=1)

    def multimodal_inputs(
        self, inputs: ChunkInputs, pixel_values: torch.Tensor, proprio: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Returns (embeddings [B, L + P, D], key mask [B, L + P], P) of the OFT sequence.

        ``proprio`` is the normalised [B, proprio_dim] vector (required exactly when the model has a
        proprio projector).
        """
        embeds, key_mask, num_prefix, _ = self._multimodal(inputs, pixel_values, proprio)
        return embeds, key_mask, num_prefix

    def _multimodal(
        self, inputs: ChunkInputs, pixel_values: torch.Tensor, proprio: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
        """:meth:`multimodal_inputs` plus the vision features [B, 256 * N, vision width] before the projector."""
        embed = self.vla.language_model.get_input_embeddings()
        tokens = embed(inputs.input_ids)
        tokens = tokens * (~inputs.action_mask)[..., None].to(tokens.dtype)  # exact zeros at the placeholders
        language = None
        if self.film is not None:
            keep = (inputs.attention_mask & ~inputs.action_mask)[..., None].to(tokens.dtype)
            language = (tokens * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1)
        features = self._image_features(pixel_values, language)
        prefix = self.vla.projector(features).to(tokens.dtype)
        if self.proprio_projector is not None:
            if proprio is None:
                raise ValueError(f"this model needs a proprio vector of length {self.spec.proprio_dim}")
            projected = self.proprio_projector(proprio.to(self.proprio_projector.fc1.weight.dtype))
            prefix = torch.cat([prefix, projected.to(tokens.dtype)[:, None, :]], dim=1)
        elif proprio is not None:
            raise ValueError("this model takes no proprio input; leave it out")
        embeds = torch.cat([tokens[:, :1], prefix, tokens[:, 1:]], dim=1)
        prefix_mask = inputs.attention_mask.new_ones((tokens.shape[0], prefix.shape[1]))
        key_mask = torch.cat([inputs.attention_mask[:, :1], prefix_mask, inputs.attention_mask[:, 1:]], dim=1)
        return embeds, key_mask, prefix.shape[1], features

    def _language_model(self, embeds: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        mask = bidirectional_mask(key_mask, embeds.dtype)
        positions = torch.arange(embeds.shape[1], device=embeds.device)[None].expand(embeds.shape[0], -1)
        return self.vla.language_model.model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False
        ).last_hidden_state

    def sequence_hidden_states(
        self, inputs: ChunkInputs, pixel_values: torch.Tensor, proprio: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Returns (final-norm hidden states [B, L + P, D], key mask [B, L + P], P) of the whole sequence."""
        embeds, key_mask, num_prefix = self.multimodal_inputs(inputs, pixel_values, proprio)
        return self._language_model(embeds, key_mask), key_mask, num_prefix

    def read_action_states(self, hidden: torch.Tensor, inputs: ChunkInputs, num_prefix: int) -> torch.Tensor:
        """Returns [B, A*K, D]: the hidden states one position left of each placeholder."""
        # Placeholder j of row b sits at num_prefix + prompt_length_b + j; its state is read one to the left.
        start = num_prefix + inputs.prompt_lengths.to(hidden.device) - 1
        index = start[:, None] + torch.arange(self.spec.num_action_tokens, device=hidden.device)[None]
        return hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))

    def action_hidden_states(
        self, inputs: ChunkInputs, pixel_values: torch.Tensor, proprio: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Returns [B, A*K, D]: final-norm hidden states one position left of each placeholder."""
        hidden, _, num_prefix = self.sequence_hidden_states(inputs, pixel_values, proprio)
        return self.read_action_states(hidden, inputs, num_prefix)

    def head_chunk(self, action_hidden: torch.Tensor) -> torch.Tensor:
        """Returns the normalised chunk [B, K, A] (float32) of the action hidden states [B, A*K, D]."""
        head_dtype = self.action_head.model.fc1.weight.dtype
        return self.action_head(action_hidden.to(head_dtype)).float()

    def forward(
        self, inputs: ChunkInputs, pixel_values: torch.Tensor, proprio: torch.Tensor | None = None,
        internals: bool = False,
    ) -> torch.Tensor | OFTInternals:
        """Returns the normalised chunk [B, K, A] (float32); with ``internals``, an :class:`OFTInternals`
        holding it and the intermediate states an auxiliary training loss reads (one forward pass, through
        ``forward`` so that a DistributedDataParallel wrapper sees it)."""
        if not internals:
            return self.head_chunk(self.action_hidden_states(inputs, pixel_values, proprio))
        embeds, key_mask, num_prefix, features = self._multimodal(inputs, pixel_values, proprio)
        action_hidden = self.read_action_states(self._language_model(embeds, key_mask), inputs, num_prefix)
        return OFTInternals(chunk=self.head_chunk(action_hidden), vision_features=features, action_hidden=action_hidden)


@dataclass
class OFTInternals:
    """One forward pass of :class:`OpenVLAOFT` with what happened on the way.

    Attributes:
        chunk: [B, K, A] normalised actions (float32), what ``forward`` returns.
        vision_features: [B, 256 * N, vision width] patch features of the towers (after FiLM), before the
            projector; the primary image's patches first, row-major.
        action_hidden: [B, A*K, D] the hidden states the action head reads.
    """

    chunk: torch.Tensor
    vision_features: torch.Tensor
    action_hidden: torch.Tensor
