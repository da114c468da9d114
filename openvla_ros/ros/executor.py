"""The policy node's executor: rclpy's MultiThreadedExecutor without its busy loop.

rclpy's ``MultiThreadedExecutor`` (9.x) hands each ready callback to its thread pool and waits again at
once. Until a pool thread has actually started the callback, the wait yields that same callback again,
so the spinning thread loops without sleeping, holding the GIL most of the time. On a 2-core machine
that loop takes most of a core, and every other Python thread (the model worker among them) waits for
the GIL at each torch operation it runs: a 12 ms forward pass of the tiny model took over a second.

``HandoffExecutor`` waits, without holding the GIL, until the callback it handed over has started
before it waits for new work. When every pool thread is busy, new work could only queue anyway.
"""

from __future__ import annotations

import time
from typing import Any

from rclpy.executors import (
    ConditionReachedException,
    ExternalShutdownException,
    MultiThreadedExecutor,
    ShutdownException,
    TimeoutException,
)
from rclpy.task import Task

HANDOFF_POLL_S = 0.0005  # how often the spinning thread looks whether a pool thread took the callback


class HandoffExecutor(MultiThreadedExecutor):
    """A ``MultiThreadedExecutor`` that hands a callback to its pool and lets it start before waiting again.

    Callback groups, the pool and ``shutdown`` are those of ``MultiThreadedExecutor``.
    Attributes:
        handoffs: callbacks handed to the pool so far (each ready callback once).
    """

    def __init__(self, num_threads: int = 2, *, context: Any = None) -> None:
        super().__init__(num_threads=num_threads, context=context)
        self.handoffs = 0
        self._waiting_to_start: Task | None = None

    def spin_once(self, timeout_sec: float | None = None) -> None:
        """Waits up to ``timeout_sec`` for a callback to start on a pool thread (None: no limit).

        Raises the exception of a callback that failed (as ``MultiThreadedExecutor`` does).
        """
        deadline = None if timeout_sec is None else time.monotonic() + timeout_sec
        if not self._wait_until_started(deadline):
            return  # every pool thread is still busy: nothing new could start
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            handler, _, _ = self.wait_for_ready_callbacks(timeout_sec=remaining)
        except (ExternalShutdownException, ShutdownException, TimeoutException, ConditionReachedException):
            return
        self._executor.submit(handler)
        self._futures.append(handler)
        self.handoffs += 1
        self._waiting_to_start = handler
        self._wait_until_started(deadline)
        for future in self._futures[:]:
            if future.done():
                self._futures.remove(future)
                future.result()  # raises the callback's exception

    def _wait_until_started(self, deadline: float | None) -> bool:
        """Sleeps until the last handed-over callback has started or ended; False if ``deadline`` came first."""
        task = self._waiting_to_start
        while task is not None and not (task.executing() or task.done()):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(HANDOFF_POLL_S)
        self._waiting_to_start = None
        return True
