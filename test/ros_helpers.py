"""Helpers shared by the tests that talk DDS: traffic isolation, QoS profiles, a spinning driver node.

Importing this module confines DDS discovery to this machine and reserves a ROS domain for the test
run (unless the environment already sets one), so it must be imported before rclpy. Domains are
reserved as the package's apps reserve theirs (``reserve_domain_id``: a lock file per id), so test runs
and apps side by side on one machine never share a domain.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator

from openvla_ros.ros.child_nodes import reserve_domain_id

os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
if not os.environ.get("ROS_DOMAIN_ID"):
    os.environ["ROS_DOMAIN_ID"] = str(reserve_domain_id())

import rclpy  # noqa: E402  (imported after the DDS isolation variables are set)
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402

LATCHED_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST,
    depth=1,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.TRANSIENT_LOCAL,
)


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Polls ``condition`` until it holds; raises AssertionError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


@contextlib.contextmanager
def spinning_node(name: str) -> Iterator[rclpy.node.Node]:
    """Gives a node spinning in a background thread in its own context; cleans up on exit."""
    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node(name, context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        yield node
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown(context=context)
        spinner.join(timeout=5)
