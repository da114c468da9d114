"""Helpers shared by the tests that talk DDS: traffic isolation, QoS profiles, a spinning driver node.

Importing this module confines DDS discovery to this machine and reserves a ROS domain for the test
run (unless the environment already sets one), so it must be imported before rclpy. Domains are
reserved with a lock file per id, so test runs side by side on one machine never share a domain, and
stay within 1-100 (higher ids can collide with Linux's ephemeral ports).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

DOMAIN_IDS = range(1, 101)
_reserved: list[int] = []  # lock file descriptors, held for the life of the process


def reserve_domain_id() -> int:
    """Returns a ROS domain id in 1-100 that no other process on this machine has reserved.

    The reservation is an exclusive lock on a file per id, held until this process exits.
    """
    lock_dir = Path(tempfile.gettempdir()) / "openvla_ros_test_domains"
    lock_dir.mkdir(exist_ok=True)
    candidates = list(DOMAIN_IDS)
    random.SystemRandom().shuffle(candidates)
    for domain_id in candidates:
        descriptor = os.open(lock_dir / f"{domain_id}.lock", os.O_CREAT | os.O_RDWR, 0o666)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(descriptor)
            continue
        _reserved.append(descriptor)
        return domain_id
    raise RuntimeError(f"every ROS domain id in {DOMAIN_IDS} is reserved by another test run")


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
