"""The pipeline's child processes (the sim and policy nodes) and its own rclpy session."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from openvla_ros.pipeline.settings import SIM_NODE, PipelineError, WaitTimeoutError
from openvla_ros.ros.child_nodes import ChildNode


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str, alive: Callable[[], None]) -> None:
    """Polls ``condition`` until it holds; ``alive`` raises when a child process died.

    Raises:
        WaitTimeoutError: after ``timeout_s`` seconds.
    """
    deadline = time.monotonic() + timeout_s
    while not condition():
        alive()
        if time.monotonic() > deadline:
            raise WaitTimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.02)


class ChildProcess(ChildNode):
    """A child node whose death is a pipeline failure (:meth:`check_alive`)."""

    def check_alive(self) -> None:
        """Raises PipelineError (with the log's tail) when the process has exited."""
        report = self.exit_report()
        if report is not None:
            raise PipelineError(report)


class RosSession:
    """An rclpy context, one node spun on a background thread, and helpers to call services."""

    def __init__(self, node_name: str, domain_id: int | None = None) -> None:
        """Starts the session on ``domain_id`` (None: the environment's ROS_DOMAIN_ID)."""
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.signals import SignalHandlerOptions

        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id, signal_handler_options=SignalHandlerOptions.NO)
        self.node = rclpy.create_node(node_name, context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self._spin, name="pipeline-ros", daemon=True)
        self._thread.start()
        self.task_state: dict[str, str] = {}
        from diagnostic_msgs.msg import DiagnosticStatus

        self.node.create_subscription(DiagnosticStatus, f"/{SIM_NODE}/task_state", self._on_task_state, 10)

    def _spin(self) -> None:
        from rclpy.executors import ExternalShutdownException

        try:
            self.executor.spin()
        except ExternalShutdownException:
            pass

    def _on_task_state(self, message: Any) -> None:
        self.task_state = {item.key: item.value for item in message.values}

    def call(self, service: str, kind: Any, request: Any, timeout_s: float, alive: Callable[[], None]) -> Any:
        """Calls ``service`` and returns the response.

        Raises:
            PipelineError: when the service does not appear or answer within ``timeout_s``.
        """
        client = self.node.create_client(kind, service)
        try:
            wait_for(lambda: client.service_is_ready(), timeout_s, f"service {service}", alive)
            future = client.call_async(request)
            wait_for(future.done, timeout_s, f"the answer of {service}", alive)
            return future.result()
        finally:
            self.node.destroy_client(client)

    def close(self) -> None:
        import rclpy

        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)
        self._thread.join(timeout=5)


# ------------------------------------------------------------------------------------------ stages
