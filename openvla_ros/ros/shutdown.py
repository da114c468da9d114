"""The policy node's process: signal handling, the spin loop, delivery of the last output, exit."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import rclpy
from rclpy.duration import Duration
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.signals import SignalHandlerOptions

from openvla_ros.ros.executor import HandoffExecutor


class StoppableNode(Protocol):
    """What the signal handler needs of the node: its logger and an immediate stop."""

    def get_logger(self) -> Any: ...

    def stop_now(self, reason: str) -> None: ...


class ControlNode(StoppableNode, Protocol):
    """What :func:`run_node` needs of the node."""

    autostart: bool

    def start(self) -> bool: ...

    def close(self) -> None: ...

    def wait_for_delivery(self) -> bool: ...

    def destroy_node(self) -> None: ...


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


def wait_for_acknowledgement(publishers: Sequence[Any], timeout_s: float, logger: Any) -> bool:
    """Waits until the reliable subscribers of ``publishers`` acknowledged everything published, at most
    ``timeout_s`` in all; returns True when they all did.

    A reliable publisher destroyed right after its last message can lose it (the zero delta of a stop):
    call this before the publishers go. False is not proof of a loss (rclpy can report it although the
    message arrived), only that the wait ended: it never holds a shutdown longer.
    """
    deadline = time.monotonic() + timeout_s
    acknowledged = True
    for publisher in publishers:
        remaining_ns = max(0, int((deadline - time.monotonic()) * 1e9))
        try:
            acknowledged = publisher.wait_for_all_acked(Duration(nanoseconds=remaining_ns)) and acknowledged
        except Exception as exc:  # the context may be shut down already: nothing more can be waited for
            logger.warning(f"could not wait for the outputs' delivery: {exc}")
            return False
    if not acknowledged:  # common and harmless: Fast DDS readers acknowledge on the writer's heartbeat
        logger.debug(f"not every subscriber acknowledged the last output within {timeout_s:g} s")
    return acknowledged


def run_node(make_node: Callable[[], ControlNode], args: list[str] | None = None) -> None:
    """Runs the node ``make_node`` builds until shutdown (SIGINT, SIGTERM or an external shutdown), then
    stops its output, waits for the zero delta's delivery and ends the process with status 0."""
    # rclpy's own SIGINT handler would shut the context down before the final zero delta could be
    # published: the node's handlers stop the output first (see ShutdownSignals).
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    signals = ShutdownSignals()
    signals.install()
    node: ControlNode | None = None
    executor: HandoffExecutor | None = None
    try:
        node = make_node()
        if node.autostart and not node.start():
            node.get_logger().error("autostart did not reach the active state; see the errors above")
        executor = HandoffExecutor(num_threads=2)
        executor.add_node(node)
        signals.node = node
        while not signals.requested.is_set() and rclpy.ok():
            executor.spin_once(timeout_sec=0.1)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        signals.closing = True
        if node is not None:
            signals.node = node
            node.stop_now("shutdown")
        if executor is not None:
            finish_callbacks(executor)
            executor.shutdown(timeout_sec=10.0)
        if node is not None:
            node.close()
            node.wait_for_delivery()  # the zero delta of the stop must arrive before the publishers go
            node.destroy_node()
        rclpy.try_shutdown()
        # The process ends now: a signal that comes late (ros2 launch forwards the terminal's Ctrl-C a
        # moment after the terminal delivered it) must not turn a clean exit into death by signal.
        for signum in ShutdownSignals.SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
    # Reached only after a clean stop (an error above propagates with its traceback instead): the
    # outputs are stopped and delivered, the model released and the context shut down. Exit at once:
    # the interpreter's own teardown (torch's finalisers) takes seconds on a busy machine, longer than
    # `ros2 launch` waits before it escalates to SIGTERM and SIGKILL.
    exit_now(0)
