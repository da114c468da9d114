"""The actions of predicted chunks, one per control tick, without ROS.

A chunk of K actions is placed on the ticks from its *start*: the tick after the last planned action
of the chunk before it (the next chunk continues where the plan ends, as OpenVLA-OFT runs a chunk
open-loop from its first action), or the next tick when it comes later than that. Of each chunk
``actions_per_inference`` actions are *planned*; the rest are kept as a reserve that the control loop
uses only while the next chunk is late.

Blending (``chunk_blend``):
    ``none``      a chunk replaces whatever is queued from its start on (the previous chunk's reserve).
    ``ensemble``  temporal ensembling (ACT): every chunk's prediction for a tick is kept, and the tick's
                  action is their weighted average with weights ``exp(-decay * i)``, i = 0 for the
                  oldest prediction; a larger decay leans on older predictions, 0 is a plain mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from openvla_ros.ros.control import CHUNK_BLENDS


@dataclass(frozen=True)
class Placed:
    """Where a chunk went: its first tick and how many of its actions are planned."""

    start_tick: int
    planned: int


class ChunkQueue:
    """Per-tick predictions from chunks; not thread-safe (the node calls it under its lock)."""

    def __init__(self, blend: str = "none", decay: float = 0.01) -> None:
        if blend not in CHUNK_BLENDS:
            raise ValueError(f"chunk_blend must be one of {', '.join(CHUNK_BLENDS)}; got {blend!r}")
        if not math.isfinite(decay) or decay < 0.0:
            raise ValueError(f"the ensemble decay must be a finite number >= 0, got {decay}")
        self.blend = blend
        self.decay = decay
        # tick -> predictions for it, oldest first
        self._predictions: dict[int, list[np.ndarray]] = {}
        self._plan_end: int | None = None  # the tick after the last planned action
        self.chunks_added = 0

    def add(self, chunk: np.ndarray, next_tick: int, actions_per_inference: int) -> Placed:
        """Queues ``chunk`` ([K, A]) from ``max(end of the plan, next_tick)``; returns where it went.

        Raises:
            ValueError: for a chunk that is not 2-D, or ``actions_per_inference`` outside 1..K.
        """
        chunk = np.asarray(chunk, dtype=np.float64)
        if chunk.ndim != 2 or chunk.shape[0] < 1:
            raise ValueError(f"a chunk must be a [K, A] array with K >= 1; got shape {chunk.shape}")
        size = chunk.shape[0]
        if not 1 <= actions_per_inference <= size:
            raise ValueError(
                f"actions_per_inference must be within 1..{size} (the chunk size); got {actions_per_inference}"
            )
        start = next_tick if self._plan_end is None else max(self._plan_end, next_tick)
        self.drop_before(next_tick)
        if self.blend == "none":
            for tick in [tick for tick in self._predictions if tick >= start]:
                del self._predictions[tick]
        for offset in range(size):
            self._predictions.setdefault(start + offset, []).append(chunk[offset])
        self._plan_end = start + actions_per_inference
        self.chunks_added += 1
        return Placed(start, actions_per_inference)

    def pop(self, tick: int) -> np.ndarray | None:
        """Returns the action for ``tick`` (None when nothing is queued for it); forgets it and older ticks."""
        self.drop_before(tick)
        predictions = self._predictions.pop(tick, None)
        return None if predictions is None else self._blend(predictions)

    def drop_before(self, tick: int) -> None:
        """Forgets the predictions for ticks before ``tick`` (ticks that passed without using them)."""
        for past in [past for past in self._predictions if past < tick]:
            del self._predictions[past]

    def _blend(self, predictions: list[np.ndarray]) -> np.ndarray:
        if self.blend == "none" or len(predictions) == 1:
            return predictions[-1].copy()
        weights = np.exp(-self.decay * np.arange(len(predictions)))
        return (weights[:, None] * np.stack(predictions)).sum(axis=0) / weights.sum()

    def planned(self, from_tick: int) -> int:
        """Returns how many planned actions are queued for ``from_tick`` and later."""
        return 0 if self._plan_end is None else max(0, self._plan_end - from_tick)

    def depth(self, from_tick: int) -> int:
        """Returns how many ticks from ``from_tick`` on have an action queued (planned and reserve)."""
        return sum(1 for tick in self._predictions if tick >= from_tick)

    def clear(self) -> None:
        """Drops every queued action and the plan: the next chunk starts on the tick after it arrives."""
        self._predictions.clear()
        self._plan_end = None
