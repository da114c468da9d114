"""Chunk mode's control state, without ROS: the queue, when to request, the tick count and the counters.

The node calls :meth:`ChunkControl.next_tick` on each control tick (it returns the tick's action and
whether to request a chunk) and :meth:`ChunkControl.add_chunk` when a chunk is ready; a stop calls
:meth:`ChunkControl.clear`. Not thread-safe: the node calls it under its lock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from openvla_ros.ros.chunk_queue import ChunkQueue, Placed
from openvla_ros.ros.control import LatencyStats, RateMeter
from openvla_ros.ros.tick_schedule import ChunkRequestSchedule


@dataclass(frozen=True)
class TickPlan:
    """What one control tick does: publish ``action`` (None: nothing queued), request a chunk if ``request``."""

    tick: int
    action: np.ndarray | None
    stamp: Any  # the image stamp of the newest queued chunk
    request: bool


class ChunkControl:
    """The queue of one chunked model, the request schedule and what diagnostics report of them."""

    def __init__(self, chunk_size: int, schedule: ChunkRequestSchedule | None = None) -> None:
        self.chunk_size = chunk_size
        self.queue = ChunkQueue()
        self.schedule = schedule or ChunkRequestSchedule()
        self.tick = 0
        self.stamp: Any = None
        self.chunks = 0
        self.discarded = 0  # chunks computed for a stopped, disabled or re-instructed output
        self.starved = 0  # ticks that found the queue empty while driving: the model was too slow
        self.latency_ms = LatencyStats()
        self.inference_rate = RateMeter(window_s=5.0)

    def set_blend(self, blend: str, decay: float) -> None:
        """Applies ``chunk_blend`` and ``ensemble_decay`` (from the next action on)."""
        self.queue.blend, self.queue.decay = blend, decay

    def next_tick(self, period_s: float, busy: bool, driving: bool) -> TickPlan:
        """Advances to the next tick; returns its action and whether to request a chunk now.

        ``busy``: a chunk is being computed. ``driving``: actions are being published (an empty queue
        then counts as a starved tick).
        """
        self.tick += 1
        action = self.queue.pop(self.tick)
        if action is None and driving:
            self.starved += 1
        request = self.schedule.due(self.queue.planned(self.tick + 1), period_s, busy)
        return TickPlan(self.tick, action, self.stamp, request)

    def add_chunk(self, chunk: np.ndarray, actions_per_inference: int, stamp: Any, latency_s: float) -> Placed:
        """Queues a predicted chunk from the next tick on; ``actions_per_inference`` 0 means all K.

        ``latency_s`` is how long it took from its request; it sets how early the next one is asked for.
        """
        placed = self.queue.add(chunk, self.tick + 1, actions_per_inference or self.chunk_size)
        self.stamp = stamp
        self.schedule.add_latency(latency_s)
        self.chunks += 1
        self.latency_ms.add(latency_s * 1e3)
        self.inference_rate.tick()
        return placed

    def depth(self) -> int:
        """Returns how many ticks from the next one on have an action queued."""
        return self.queue.depth(self.tick + 1)

    def clear(self) -> None:
        """Drops every queued action (a stop, or a new instruction)."""
        self.queue.clear()

    def diagnostic_values(self, actions_per_inference: int) -> dict[str, str]:
        """Returns the chunk-mode values of ``/diagnostics``."""
        return {
            "chunk_size": str(self.chunk_size),
            "actions_per_inference": str(actions_per_inference or self.chunk_size),
            "inference_rate_hz": f"{self.inference_rate.rate_hz():.2f}",
            "chunk_latency_ms_last": f"{self.latency_ms.last:.1f}",
            "chunk_latency_ms_median": f"{self.latency_ms.percentile(50):.1f}",
            "queue_depth": str(self.depth()),
            "chunks": str(self.chunks),
            "discarded_chunks": str(self.discarded),
            "starved_ticks": str(self.starved),
        }
