"""Dynamic batching: requests that arrive within a window run as one batch, on one worker thread.

The worker takes the first waiting request, then keeps collecting until ``max_batch`` requests are
together or ``window_s`` has passed since the first arrived, and runs them with one call. When a
batch of several fails, each request is run again alone, so one request that breaks the model cannot
fail the others. :meth:`Batcher.close` finishes the batch that is running and fails the requests
still waiting (the server is going away).
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


def nearest_rank(ordered: list[float], q: float) -> float | None:
    """The q-quantile (0..1) of already sorted values by nearest rank, None when there are none."""
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class ServerClosingError(Exception):
    """The server stopped before the request ran."""


@dataclass
class Stats:
    """What the server has done: counts, batch sizes and the latencies of the last requests."""

    requests: int = 0
    failed: int = 0
    refused: int = 0
    batches: int = 0
    largest_batch: int = 0
    batch_sizes: collections.Counter = field(default_factory=collections.Counter)
    latencies_s: collections.deque = field(default_factory=lambda: collections.deque(maxlen=1000))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record_batch(self, size: int) -> None:
        with self.lock:
            self.batches += 1
            self.largest_batch = max(self.largest_batch, size)
            self.batch_sizes[size] += 1

    def record_request(self, latency_s: float, ok: bool) -> None:
        with self.lock:
            if ok:
                self.requests += 1
                self.latencies_s.append(latency_s)
            else:
                self.failed += 1

    def record_refusal(self) -> None:
        with self.lock:
            self.refused += 1

    def quantile(self, q: float) -> float | None:
        """The q-quantile of the recent latencies in seconds (nearest rank), None before any request."""
        with self.lock:
            ordered = sorted(self.latencies_s)
        return nearest_rank(ordered, q)

    def mean_batch(self) -> float:
        with self.lock:
            total = sum(size * count for size, count in self.batch_sizes.items())
            return total / self.batches if self.batches else 0.0


@dataclass
class _Pending:
    job: Any
    future: Future
    arrived: float


class Batcher:
    """Runs ``run_batch(jobs) -> results`` on batches of submitted jobs, on its own thread.

    Args:
        run_batch: takes a list of jobs, returns one result per job (in order) or raises.
        max_batch: the most jobs in one call.
        window_s: how long the first job of a batch waits for others.
    """

    def __init__(self, run_batch: Callable[[list[Any]], list[Any]], max_batch: int = 8, window_s: float = 0.005,
                 stats: Stats | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if window_s < 0:
            raise ValueError(f"the batch window must be >= 0, got {window_s}")
        self._run_batch = run_batch
        self.max_batch = max_batch
        self.window_s = window_s
        self.stats = stats or Stats()
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def submit(self, job: Any) -> Future:
        """Queues a job; the future gets its result, the model's exception, or ServerClosingError."""
        future: Future = Future()
        if self._closing.is_set():
            future.set_exception(ServerClosingError("the server is shutting down"))
            return future
        self._queue.put(_Pending(job, future, time.monotonic()))
        return future

    def close(self, timeout_s: float = 60.0) -> None:
        """Stops taking jobs, lets the running batch finish, fails the jobs still waiting."""
        self._closing.set()
        self._queue.put(None)
        self._thread.join(timeout=timeout_s)
        while True:
            try:
                pending = self._queue.get_nowait()
            except queue.Empty:
                break
            if pending is not None and not pending.future.done():
                pending.future.set_exception(ServerClosingError("the server shut down before this request ran"))

    def _collect(self, first: _Pending) -> list[_Pending]:
        batch = [first]
        deadline = time.monotonic() + self.window_s
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                pending = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if pending is None:  # closing: run what is collected, then stop
                self._queue.put(None)
                break
            batch.append(pending)
        return batch

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            if self._closing.is_set():
                first.future.set_exception(ServerClosingError("the server shut down before this request ran"))
                continue
            self._execute(self._collect(first))

    def _execute(self, batch: list[_Pending]) -> None:
        self.stats.record_batch(len(batch))
        try:
            results = self._run_batch([pending.job for pending in batch])
        except Exception as exc:  # the model's failure goes to the requests, never kills the worker
            if len(batch) > 1:
                logger.warning("a batch of %d failed (%s); running its requests one by one", len(batch), exc)
                for pending in batch:
                    self._execute([pending])
                return
            self._finish(batch[0], exception=exc)
            return
        for pending, result in zip(batch, results, strict=True):
            self._finish(pending, result=result)

    def _finish(self, pending: _Pending, result: Any = None, exception: BaseException | None = None) -> None:
        latency = time.monotonic() - pending.arrived
        self.stats.record_request(latency, exception is None)
        if exception is not None:
            pending.future.set_exception(exception)
        else:
            pending.future.set_result(result)
