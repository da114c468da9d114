"""Signal handling and executor shut-down of the policy node's process."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
from typing import Any, Protocol

from rclpy.executors import MultiThreadedExecutor


class StoppableNode(Protocol):
    """What the signal handler needs of the node: its logger and an immediate stop."""

    def get_logger(self) -> Any: ...

    def stop_now(self, reason: str) -> None: ...


class ShutdownSignals:
    """SIGINT/SIGTERM handling that holds under repeated signals.

    Before the node spins (model loading) the first signal aborts start-up as a KeyboardInterrupt:
    nothing has been published. Once it spins, the first signal stops the output at once (the zero
    delta goes out from the handler, before anything slow) and ends the spin loop; every later signal
    is logged and ignored, so clean-up always runs to the end and the process exits with status 0.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.node: StoppableNode | None = None
        self.closing = False  # clean-up has begun: every signal is ignored
        self.requested = threading.Event()
        self.ignored = 0

    def install(self) -> None:
        for signum in self.SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.closing or self.requested.is_set():
            self.ignored += 1
            if self.node is not None:
                self.node.get_logger().warning(f"{name} again: already shutting down, output is stopped")
            return
        if self.node is None:
            raise KeyboardInterrupt
        self.requested.set()
        self.node.get_logger().info(f"{name}: stopping")
        self.node.stop_now(f"shutdown on {name}")


def finish_callbacks(executor: MultiThreadedExecutor) -> None:
    """Lets the callbacks already handed to the executor's threads finish before it shuts down.

    ``MultiThreadedExecutor.shutdown`` destroys its guard condition before its thread pool has run the
    callbacks already queued there; each of those then fails on the destroyed guard and rclpy prints
    "The following exception was never retrieved" at exit. Emptying the pool first avoids that.
    """
    pool = getattr(executor, "_executor", None)  # the executor's ThreadPoolExecutor
    if pool is not None:
        pool.shutdown(wait=True)


def exit_now(status: int = 0) -> None:
    """Ends the process at once with ``status`` after flushing every output stream.

    For the end of a clean stop only: Python's own finalisation (torch's and CUDA's finalisers, the
    module teardown) is skipped, so call it once everything that matters is done and released.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken: nothing more can be written there
            pass
    try:
        ctypes.CDLL(None).fflush(None)  # C stdio buffers (rcutils' log stream, when buffered)
    except (OSError, AttributeError):
        pass
    os._exit(status)
