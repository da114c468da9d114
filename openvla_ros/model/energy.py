"""An energy model over (observation, action chunk) pairs, and energy-guided refinement of OFT chunks.

``E(context, chunk)`` is a scalar per sample, lower for chunks that fit the observation. The context is
the frozen VLA's final-norm hidden states of the whole OFT sequence, of which only the observation and
prompt positions are visible (BOS, image patches, proprio, prompt tokens but the last: see
:func:`energy_context_mask`). The structure is the published one:

    context [B, S, D] --MLP-ResNet--> [B, S, H]                              (keys and values)
    chunk   [B, K, A] --MLP-ResNet--> [B, K, H] + sinusoidal position, dropout (queries)
    cross-attention (queries = the K action steps, no residual) -> MLP-ResNet -> raw [B, K]
    E = mean_k (2 * sigmoid(raw_k / 2) + 0.1)                                 each term in (0.1, 2.1)

Everything runs in float32 whatever the VLA's dtype. :func:`refine_chunk` moves a normalised chunk down
the energy gradient, ``a <- a - clip(alpha * dE/da)``, with each step's L2 norm capped at a fraction of
the uncorrected chunk's norm, the model in eval mode (no dropout: the same input gives the same chunk).
It works in the normalised space the model was trained in; the caller un-normalises afterwards.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

# Visible context positions end one before the first placeholder: that position's hidden state is the one
# the head reads for action 1 (see :mod:`openvla_ros.model.oft`).
ENERGY_FLOOR = 0.1
ENERGY_SPAN = 2.0


@dataclass(frozen=True)
class EnergySpec:
    """The shape of an energy model; stored beside its weights.

    Attributes:
        context_dim: D, width of the VLA hidden states it reads.
        action_dim: A, dimensions per action.
        chunk: K, actions per chunk.
        hidden_dim: H, width of the encoders and the attention.
        num_heads: attention heads (H must divide by it).
        dropout: dropout after the positional encoding of the actions (training only).
    """

    context_dim: int
    action_dim: int
    chunk: int
    hidden_dim: int = 512
    num_heads: int = 8
    dropout: float = 0.2

    def __post_init__(self) -> None:
        if min(self.context_dim, self.action_dim, self.chunk, self.hidden_dim, self.num_heads) < 1:
            raise ValueError(f"invalid energy model {self}: every size must be >= 1")
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"hidden_dim {self.hidden_dim} is not divisible by num_heads {self.num_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EnergySpec:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown energy model field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)


class ResidualBlock(nn.Module):
    """x + SiLU(Linear(LayerNorm(x)))."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.SiLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(x)


class ResidualMLP(nn.Module):
    """LayerNorm -> Linear -> SiLU -> residual blocks -> LayerNorm -> Linear, applied per token."""

    def __init__(self, num_blocks: int, input_dim: int, hidden_dim: int, output_dim: int) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(input_dim)
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.act = nn.SiLU()
        self.blocks = nn.ModuleList(ResidualBlock(hidden_dim) for _ in range(num_blocks))
        self.layer_norm2 = nn.LayerNorm(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc1(self.layer_norm1(x)))
        for block in self.blocks:
            x = block(x)
        return self.fc2(self.layer_norm2(x))


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """Returns the fixed [length, dim] table: sin(p / 10000^(2i/dim)) at even channels, cos at odd ones."""
    positions = torch.arange(length, dtype=torch.float32)[:, None]
    rates = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(positions * rates)
    table[:, 1::2] = torch.cos(positions * rates)[:, : dim // 2]
    return table


class EnergyModel(nn.Module):
    """E(context, chunk) -> [B] energies (float32); see the module docstring for the structure."""

    def __init__(self, spec: EnergySpec) -> None:
        super().__init__()
        self.spec = spec
        hidden = spec.hidden_dim
        self.context_encoder = ResidualMLP(1, spec.context_dim, hidden, hidden)
        self.action_encoder = ResidualMLP(1, spec.action_dim, hidden, hidden)
        # not a parameter and not saved: it is a function of the chunk length and width alone
        self.register_buffer("positions", sinusoidal_positions(spec.chunk, hidden), persistent=False)
        self.action_dropout = nn.Dropout(spec.dropout)
        self.cross_attention = nn.MultiheadAttention(hidden, spec.num_heads, batch_first=True)
        self.energy_head = ResidualMLP(2, hidden, hidden, 1)

    def encode_context(self, context: torch.Tensor) -> torch.Tensor:
        """Returns the per-token context features [B, S, H] of hidden states [B, S, D] (any float dtype)."""
        if context.ndim != 3 or context.shape[-1] != self.spec.context_dim:
            raise ValueError(f"context must be [B, S, {self.spec.context_dim}]; got {tuple(context.shape)}")
        return self.context_encoder(context.float())

    def energy_of_encoded(self, encoded: torch.Tensor, visible: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
        """Returns [B] energies of chunks [B, K, A] against encoded contexts [B, S, H].

        ``visible`` [B, S] is True where the context may be attended to.

        Raises:
            ValueError: for shapes that do not fit, or a row with no visible position.
        """
        spec = self.spec
        if chunk.ndim != 3 or chunk.shape[1:] != (spec.chunk, spec.action_dim):
            raise ValueError(f"chunk must be [B, {spec.chunk}, {spec.action_dim}]; got {tuple(chunk.shape)}")
        if visible.shape != encoded.shape[:2] or chunk.shape[0] != encoded.shape[0]:
            raise ValueError(
                f"context {tuple(encoded.shape[:2])}, mask {tuple(visible.shape)} and chunk batch {chunk.shape[0]} "
                "do not match"
            )
        if not bool(visible.any(dim=1).all()):
            raise ValueError("a context row has no visible position; the energy would be undefined")
        queries = self.action_dropout(self.action_encoder(chunk.float()) + self.positions)
        mixed, _ = self.cross_attention(queries, encoded, encoded, key_padding_mask=~visible.bool(),
                                        need_weights=False)
        raw = self.energy_head(mixed).squeeze(-1)  # [B, K]
        return (ENERGY_SPAN * torch.sigmoid(0.5 * raw) + ENERGY_FLOOR).mean(dim=1)

    def forward(self, context: torch.Tensor, visible: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
        """Returns [B] energies of chunks [B, K, A] under contexts [B, S, D] with visibility [B, S]."""
        return self.energy_of_encoded(self.encode_context(context), visible, chunk)

    def energy_matrix(self, encoded: torch.Tensor, visible: torch.Tensor, chunks: torch.Tensor) -> torch.Tensor:
        """Returns [B, B]: entry (i, j) is the energy of chunk j under context i.

        The context encoder runs once per context (it is per-token and has no dropout); only its output
        is repeated for the B x B pairs.
        """
        batch = encoded.shape[0]
        pairs_encoded = encoded[:, None].expand(-1, batch, -1, -1).reshape(batch * batch, *encoded.shape[1:])
        pairs_visible = visible[:, None].expand(-1, batch, -1).reshape(batch * batch, -1)
        pairs_chunks = chunks[None].expand(batch, -1, -1, -1).reshape(batch * batch, *chunks.shape[1:])
        return self.energy_of_encoded(pairs_encoded, pairs_visible, pairs_chunks).view(batch, batch)


def energy_context_mask(key_mask: torch.Tensor, prompt_lengths: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Returns [B, L] True at the context positions the energy model sees.

    ``key_mask`` [B, L] is the OFT sequence's non-pad mask, ``prompt_lengths`` [B] the prompt ids per row
    (BOS included) and ``num_prefix`` the patch (+ proprio) tokens after BOS. Visible: BOS, every patch and
    proprio token and the prompt tokens but the last (whose state predicts action 1). Hidden: the
    placeholders' positions, the stop token and padding.
    """
    length = key_mask.shape[1]
    first_hidden = num_prefix + prompt_lengths.to(key_mask.device) - 1  # the last prompt token's position
    positions = torch.arange(length, device=key_mask.device)[None]
    return key_mask.bool() & (positions < first_hidden[:, None])


@dataclass(frozen=True)
class RefinementSettings:
    """How :func:`refine_chunk` moves a chunk.

    Attributes:
        steps: gradient steps; 0 = off.
        step_size: alpha in ``a <- a - alpha * dE/da``.
        max_step_fraction: each step's L2 norm is at most this fraction of the uncorrected chunk's norm.
    """

    steps: int = 0
    step_size: float = 0.5
    max_step_fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"energy_steps must be >= 0; got {self.steps}")
        if not (math.isfinite(self.step_size) and self.step_size >= 0):
            raise ValueError(f"energy_step_size must be a finite number >= 0; got {self.step_size}")
        if not (math.isfinite(self.max_step_fraction) and 0 <= self.max_step_fraction <= 1):
            raise ValueError(f"energy_max_step_fraction must be in [0, 1]; got {self.max_step_fraction}")


@dataclass(frozen=True)
class Refinement:
    """The outcome of :func:`refine_chunk` for a batch.

    Attributes:
        chunk: [B, K, A] normalised chunks: corrected, or the input where the correction was abandoned.
        energy_before: [B] energies of the input chunks (NaN where not finite).
        energy_after: [B] energies of the returned chunks.
        problem: why the correction was abandoned (non-finite energy or gradient), else None.
    """

    chunk: torch.Tensor
    energy_before: torch.Tensor
    energy_after: torch.Tensor
    problem: str | None = None


def refine_chunk(model: EnergyModel, context: torch.Tensor, visible: torch.Tensor, chunk: torch.Tensor,
                 settings: RefinementSettings) -> Refinement:
    """Returns the chunks [B, K, A] after ``settings.steps`` capped energy-descent steps, in float32.

    ``chunk`` is normalised (the L1 head's output). The model runs in eval mode (restored afterwards), so
    the result is deterministic. If an energy or gradient is not finite, the input chunk comes back
    unchanged with ``problem`` set; a NaN never leaves this function in ``chunk``.
    """
    was_training = model.training
    model.eval()
    try:
        # inference_mode tensors (the VLA's outputs) cannot enter autograd: work on plain copies
        with torch.inference_mode(False), torch.enable_grad():
            context = context.detach().clone()
            visible = visible.detach().clone()
            original = chunk.detach().float().clone()
            with torch.no_grad():
                encoded = model.encode_context(context)
            cap = settings.max_step_fraction * original.flatten(1).norm(dim=1)  # [B]
            current = original.clone()
            before = None
            energy = None
            for _ in range(settings.steps):
                current.requires_grad_(True)
                energy = model.energy_of_encoded(encoded, visible, current)
                if before is None:
                    before = energy.detach()
                if not bool(torch.isfinite(energy).all()):
                    return _abandoned(model, encoded, visible, original, "the energy is not finite")
                (gradient,) = torch.autograd.grad(energy.sum(), current)
                if not bool(torch.isfinite(gradient).all()):
                    return _abandoned(model, encoded, visible, original, "the energy gradient is not finite")
                step = settings.step_size * gradient
                norm = step.flatten(1).norm(dim=1)
                scale = torch.where(norm > cap, cap / norm.clamp(min=1e-12), torch.ones_like(norm))
                current = (current.detach() - step * scale[:, None, None]).detach()
            with torch.no_grad():
                after = model.energy_of_encoded(encoded, visible, current)
                if before is None:
                    before = after
            if not (bool(torch.isfinite(after).all()) and bool(torch.isfinite(current).all())):
                return _abandoned(model, encoded, visible, original, "the corrected chunk's energy is not finite")
            return Refinement(current, before, after)
    finally:
        model.train(was_training)


def _abandoned(model: EnergyModel, encoded: torch.Tensor, visible: torch.Tensor, original: torch.Tensor,
               problem: str) -> Refinement:
    with torch.no_grad():
        energy = model.energy_of_encoded(encoded, visible, original)
    energy = torch.where(torch.isfinite(energy), energy, torch.full_like(energy, math.nan))
    return Refinement(original, energy, energy, problem)
