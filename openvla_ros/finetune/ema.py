"""An exponential moving average (EMA) of the trainable weights.

The average is what a run evaluates, selects and writes when ``ema_decay`` > 0: the weights of the
last steps of a run still move with every batch, and their average acts like a run that ended with a
lower learning rate, without stopping training to get there. The decay warms up as
``min(decay, (1 + step) / (10 + step))``, so the first steps are not dominated by the starting weights.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch


def ema_decay_problem(decay: float) -> str | None:
    """Returns why ``decay`` is no valid ``ema_decay`` setting (0 turns the average off), or None."""
    if not 0.0 <= decay < 1.0:
        return f"ema_decay must be in [0, 1) (0: no weight average), got {decay}"
    return None


class WeightAverage:
    """Float32 shadow copies of named weights, updated after every optimiser step."""

    def __init__(self, weights: Mapping[str, torch.Tensor], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) to average (0 turns the average off), got {decay}")
        self.decay = decay
        self.shadow = {name: tensor.detach().to(torch.float32, copy=True) for name, tensor in weights.items()}

    def update(self, weights: Mapping[str, torch.Tensor], step: int) -> None:
        """Moves the average towards ``weights`` after optimiser step ``step`` (1 for the first)."""
        decay = min(self.decay, (1.0 + step) / (10.0 + step))
        with torch.no_grad():
            shadows = [self.shadow[name] for name in weights]
            current = [tensor.detach().to(torch.float32) for tensor in weights.values()]
            torch._foreach_lerp_(shadows, current, 1.0 - decay)

    @contextmanager
    def swapped_in(self, weights: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """Puts the average into ``weights`` for the block and the trained values back after it."""
        with torch.no_grad():
            trained = {name: tensor.detach().clone() for name, tensor in weights.items()}
            self.copy_to(weights)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, tensor in weights.items():
                    tensor.copy_(trained[name])

    def copy_to(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Writes the average into ``weights`` (in their dtype and device)."""
        with torch.no_grad():
            for name, tensor in weights.items():
                tensor.copy_(self.shadow[name].to(tensor.device, tensor.dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restores a saved average; its names must be this run's trainable weights."""
        if set(state) != set(self.shadow):
            missing = sorted(set(self.shadow) - set(state))[:3]
            raise ValueError(f"the saved weight average does not match the trainable weights (missing {missing})")
        for name, tensor in state.items():
            self.shadow[name] = tensor.to(self.shadow[name].device, torch.float32)
