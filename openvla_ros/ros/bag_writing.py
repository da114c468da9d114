"""Writing a rosbag2 bag as ``ros2 bag record`` does: QoS in metadata.yaml, the subscription QoS, and a
writer thread that owns the rosbags writer."""

from __future__ import annotations

import importlib
import queue
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from openvla_ros.ros.record_settings import RecordError

BAG_VERSION = 9
RECORD_DEPTH = 100
_INFINITE_NS = 0x7FFFFFFFFFFFFFFF


def message_class(msgtype: str) -> Any:
    """Returns the Python message class of a ROS type name such as ``sensor_msgs/msg/Image``.

    Raises:
        RecordError: when the type's Python package is not installed.
    """
    package, _, name = msgtype.rpartition("/")
    try:
        return getattr(importlib.import_module(package.replace("/", ".")), name)
    except (ImportError, AttributeError) as exc:
        raise RecordError(f"message type {msgtype} is not importable here: {exc}") from exc


def _qos_time(duration: Any) -> Any:
    from rosbags.interfaces import QosTime

    nanoseconds = int(getattr(duration, "nanoseconds", 0))
    if nanoseconds >= _INFINITE_NS or nanoseconds < 0:
        return QosTime(sec=2147483647, nsec=4294967295)
    return QosTime(sec=nanoseconds // 1_000_000_000, nsec=nanoseconds % 1_000_000_000)


def offered_qos(profile: Any) -> Any:
    """Returns a publisher's rclpy ``QoSProfile`` as the rosbags ``Qos`` written to metadata.yaml."""
    from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability

    return Qos(
        history=QosHistory(int(profile.history)),
        depth=int(profile.depth),
        reliability=QosReliability(int(profile.reliability)),
        durability=QosDurability(int(profile.durability)),
        deadline=_qos_time(profile.deadline),
        lifespan=_qos_time(profile.lifespan),
        liveliness=QosLiveliness(int(profile.liveliness)),
        liveliness_lease_duration=_qos_time(profile.liveliness_lease_duration),
        avoid_ros_namespace_conventions=bool(profile.avoid_ros_namespace_conventions),
    )


def subscription_qos(publisher_profiles: Iterable[Any]) -> Any:
    """Returns the QoS that receives from all given publishers, as ``ros2 bag record`` chooses it.

    Reliable only if every publisher is reliable, transient-local only if every publisher is (so a
    latched message is replayed to the recorder), keep-last with a deep queue.
    """
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

    profiles = list(publisher_profiles)
    reliable = bool(profiles) and all(p.reliability == ReliabilityPolicy.RELIABLE for p in profiles)
    latched = bool(profiles) and all(p.durability == DurabilityPolicy.TRANSIENT_LOCAL for p in profiles)
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=RECORD_DEPTH,
        reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT,
        durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE,
    )


class BagWriterThread:
    """Owns a rosbags ``Writer`` in a thread of its own.

    The sqlite3 storage may only be used from the thread that opened it, and subscription callbacks
    may run on any executor thread: every writer call therefore goes through this thread's queue.
    """

    def __init__(self, path: Path, storage: str) -> None:
        self.path = path
        self.storage = storage
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="bag-writer", daemon=True)
        self._writer: Any = None
        self.error: BaseException | None = None

    def open(self) -> None:
        """Creates the bag. Raises RecordError when it cannot be created."""
        from rosbags.rosbag2 import StoragePlugin, Writer
        from rosbags.rosbag2.errors import WriterError

        plugin = StoragePlugin.MCAP if self.storage == "mcap" else StoragePlugin.SQLITE3

        def open_writer() -> None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            writer = Writer(self.path, version=BAG_VERSION, storage_plugin=plugin)
            writer.open()
            self._writer = writer

        self._thread.start()
        try:
            self.call(open_writer)
        except (OSError, WriterError) as exc:
            self._queue.put(None)
            raise RecordError(f"cannot create the bag {self.path}: {exc}") from exc

    def call(self, function: Callable[[], Any]) -> Any:
        """Runs ``function`` in the writer thread and returns its result (or raises its exception)."""
        done = threading.Event()
        outcome: dict[str, Any] = {}

        def job() -> None:
            try:
                outcome["result"] = function()
            except BaseException as exc:  # handed back to the calling thread
                outcome["error"] = exc
            done.set()

        self._queue.put(job)
        done.wait()
        if "error" in outcome:
            raise outcome["error"]
        return outcome.get("result")

    def add_connection(self, topic: str, msgtype: str, **options: Any) -> Any:
        return self.call(lambda: self._writer.add_connection(topic, msgtype, **options))

    def write(self, connection: Any, time_ns: int, data: bytes) -> None:
        """Queues one message (returns at once)."""
        self._queue.put(lambda: self._writer.write(connection, time_ns, data))

    def close(self) -> None:
        """Writes the queued messages, closes the bag (writing metadata.yaml) and ends the thread."""
        try:
            self.call(self._writer.close)
        finally:
            self._queue.put(None)
            self._thread.join()
        if self.error is not None:
            raise RecordError(f"writing {self.path} failed: {self.error}") from self.error

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                job()
            except BaseException as exc:  # a failed write: remembered and reported on close
                if self.error is None:
                    self.error = exc
