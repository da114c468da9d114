"""When the policy node runs the model, without ROS.

Token mode (one inference per action): a tick that finds the previous step still running becomes the
*late tick*, run as soon as that step ends unless the next tick comes first (:class:`LateTick`).

Chunk mode (one inference per chunk of K actions): the next chunk is requested while the queue still
holds actions for as long as the model has recently taken, plus a margin, so that it arrives before
the queue runs dry (:class:`ChunkRequestSchedule`).
"""

from __future__ import annotations

import math
from collections import deque


class LateTick:
    """At most one tick waiting for the running step (never a queue); counts the ticks skipped.

    Not thread-safe: the node calls it under its lock.
    """

    def __init__(self) -> None:
        self._tick_ns: int | None = None
        self.skipped = 0

    def note(self, tick_ns: int) -> None:
        """Records a tick that found the worker busy; a tick already waiting is skipped for it."""
        if self._tick_ns is not None:
            self.skipped += 1
        self._tick_ns = tick_ns

    def take_due(self, now_ns: int, period_ns: float) -> int | None:
        """Returns the waiting tick's time if it is still due at ``now_ns``, else None.

        A tick whose successor is due already (``period_ns`` or more ago) is skipped and counted.
        """
        tick_ns, self._tick_ns = self._tick_ns, None
        if tick_ns is None:
            return None
        if now_ns - tick_ns >= period_ns:
            self.skipped += 1
            return None
        return tick_ns

    def clear(self) -> None:
        """Forgets the waiting tick (a stop voids it)."""
        self._tick_ns = None


class ChunkRequestSchedule:
    """Decides on which control tick the next chunk is requested.

    The lead is the recent inference latency in ticks (the slowest of the last ``window`` chunks,
    times ``latency_factor``) plus ``margin_ticks``: a chunk is requested when the actions still
    planned after this tick cover no more than the lead, so it arrives while some are left. Before
    any latency is known the lead is the margin alone.

    Not thread-safe: the node calls it under its lock.
    """

    def __init__(self, margin_ticks: float = 1.0, latency_factor: float = 1.2, window: int = 8) -> None:
        if margin_ticks < 0 or latency_factor < 1.0 or window < 1:
            raise ValueError("margin_ticks >= 0, latency_factor >= 1 and window >= 1 are required")
        self.margin_ticks = margin_ticks
        self.latency_factor = latency_factor
        self._latencies_s: deque[float] = deque(maxlen=window)

    def add_latency(self, seconds: float) -> None:
        """Records how long one chunk took, from its request to its actions being queued."""
        if math.isfinite(seconds) and seconds >= 0.0:
            self._latencies_s.append(seconds)

    @property
    def latency_s(self) -> float:
        """The latency the lead is based on: the slowest recent one, 0.0 before the first chunk."""
        return max(self._latencies_s, default=0.0)

    def lead_ticks(self, period_s: float) -> int:
        """Returns how many planned actions must remain when a chunk is requested at this period."""
        return math.ceil(self.latency_s * self.latency_factor / period_s + self.margin_ticks)

    def due(self, planned_after_tick: int, period_s: float, busy: bool) -> bool:
        """Whether to request a chunk now, with ``planned_after_tick`` actions planned after this tick.

        Never while an inference runs (``busy``): one chunk is computed at a time.
        """
        return not busy and planned_after_tick <= self.lead_ticks(period_s)

    def clear(self) -> None:
        """Forgets the measured latencies (a new model)."""
        self._latencies_s.clear()
