"""Records demonstration topics into a rosbag2 bag without rosbag2: rclpy subscriptions + rosbags' writer.

    python -m openvla_ros.record --episode pick_red_01
    python -m openvla_ros.record --config config/record.yaml --output-dir demos --episode ep_003 \\
        --storage sqlite3 --duration 30

For machines without ``ros2 bag record`` (ROS 2 from PyPI wheels); on a full ROS install
``ros2 launch openvla_ros record.launch.py`` does the same. The topics are those of the config file's
``topics`` section plus ``record.extra_topics``, the bag goes to ``<output_dir>/<episode>`` in
``record.storage`` (mcap by default), as ``ros2 bag record`` would write it: serialized CDR messages
stamped with their receive time, each topic with its type, type hash and the publishers' offered
QoS in ``metadata.yaml`` (version 9). Topics are picked up whenever their first publisher appears;
subscriptions take the publishers' reliability and durability, so a latched instruction published
before the recorder started is still recorded. Stop with Ctrl-C, SIGTERM or ``--duration``; the bag
is always closed with valid metadata.
"""

from __future__ import annotations

import argparse
import importlib
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STORAGE_PLUGINS = ("mcap", "sqlite3")
BAG_VERSION = 9
DISCOVERY_PERIOD_S = 0.1
RECORD_DEPTH = 100
_INFINITE_NS = 0x7FFFFFFFFFFFFFFF


class RecordError(RuntimeError):
    """The recorder cannot start: a bad config, an existing output, an unknown storage plugin."""


@dataclass(frozen=True)
class RecordSettings:
    """What to record and where, from the config file's ``topics`` and ``record`` sections."""

    topics: tuple[str, ...]
    storage: str = "mcap"
    output_dir: str = "demos"
    max_bag_duration_s: float = 0.0

    def __post_init__(self) -> None:
        if self.storage not in STORAGE_PLUGINS:
            raise RecordError(f"storage must be one of {', '.join(STORAGE_PLUGINS)}, got {self.storage!r}")
        if not self.topics:
            raise RecordError("no topics to record")
        for topic in self.topics:
            if not topic.startswith("/"):
                raise RecordError(f"topic {topic!r} must be an absolute name starting with '/'")


@dataclass
class TopicRecord:
    """One recorded topic: its type and the messages written so far."""

    topic: str
    msgtype: str
    count: int = 0
    first_ns: int = 0
    last_ns: int = 0

    @property
    def rate_hz(self) -> float:
        span = (self.last_ns - self.first_ns) / 1e9
        return (self.count - 1) / span if self.count > 1 and span > 0 else 0.0


@dataclass
class RecordSummary:
    """What a recording wrote: the bag directory, per-topic records and topics never seen."""

    path: Path
    storage: str
    topics: dict[str, TopicRecord] = field(default_factory=dict)
    missing: tuple[str, ...] = ()
    duration_s: float = 0.0

    @property
    def message_count(self) -> int:
        return sum(record.count for record in self.topics.values())

    def describe(self) -> str:
        """Returns a multi-line human summary (one line per topic)."""
        lines = [
            f"bag {self.path} ({self.storage}): {self.message_count} messages in {self.duration_s:.1f} s"
        ]
        for record in self.topics.values():
            lines.append(
                f"  {record.topic:<28} {record.msgtype:<34} {record.count:>6}  {record.rate_hz:6.1f} Hz"
            )
        for topic in self.missing:
            lines.append(f"  {topic:<28} not recorded: no publisher appeared")
        return "\n".join(lines)


def default_config_path() -> Path:
    """Returns the package's ``config/record.yaml`` (installed share directory, else the source tree)."""
    try:
        from ament_index_python.packages import get_package_share_directory

        installed = Path(get_package_share_directory("openvla_ros")) / "config" / "record.yaml"
    except (ImportError, LookupError, OSError):  # no ament index, or the package is not installed in it
        installed = None
    if installed is not None and installed.is_file():
        return installed
    return Path(__file__).resolve().parents[2] / "config" / "record.yaml"


def load_record_settings(path: str | Path | None = None) -> RecordSettings:
    """Returns the recording settings of a ``record.yaml`` file (the package's own when None).

    Raises:
        RecordError: when the file is missing or unreadable, or its topics or record section are bad.
    """
    import yaml

    from openvla_ros.dataset.config import config_from_mapping
    from openvla_ros.errors import DatasetError

    path = Path(path) if path is not None else default_config_path()
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise RecordError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise RecordError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise RecordError(f"config file {path} must hold a mapping with topics/record sections")
    try:
        configured = config_from_mapping(data).topics
    except DatasetError as exc:
        raise RecordError(f"config file {path}: {exc}") from exc
    for name, topic in vars(configured).items():
        if topic and not topic.startswith("/"):
            raise RecordError(
                f"config file {path}: topics.{name} {topic!r} must be an absolute topic name starting with '/' "
                "to be recorded"
            )
    topics = configured.recorded_topics()
    record = data.get("record") or {}
    if not isinstance(record, dict):
        raise RecordError(f"config file {path}: section 'record' must be a mapping")
    extra = [str(topic) for topic in record.get("extra_topics") or []]
    return RecordSettings(
        topics=tuple(dict.fromkeys([*topics, *extra])),
        storage=str(record.get("storage") or "mcap"),
        output_dir=str(record.get("output_dir") or "demos"),
        max_bag_duration_s=float(record.get("max_bag_duration_s") or 0.0),
    )


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


class _WriterThread:
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


class BagRecorder:
    """Records topics of a running rclpy node into one rosbag2 bag.

    Use ``start()`` once, spin the node (any executor), then ``stop()``. Subscriptions are made on
    the node as each topic's first publisher is discovered; messages stay serialized (raw CDR) and
    are written with the node clock's receive time.
    """

    def __init__(self, node: Any, topics: Iterable[str], path: str | Path, storage: str = "mcap") -> None:
        if storage not in STORAGE_PLUGINS:
            raise RecordError(f"storage must be one of {', '.join(STORAGE_PLUGINS)}, got {storage!r}")
        self.node = node
        self.topics = tuple(dict.fromkeys(topics))
        self.path = Path(path)
        self.storage = storage
        self._lock = threading.Lock()
        self._writer: Any = None
        self._connections: dict[str, Any] = {}
        self._records: dict[str, TopicRecord] = {}
        self._subscriptions: list[Any] = []
        self._unsupported: set[str] = set()
        self._timer: Any = None
        self._started = 0.0
        self._typestore: Any = None

    def start(self) -> None:
        """Creates the bag and starts discovering the topics.

        Raises:
            RecordError: when the bag directory already exists or cannot be created.
        """
        from rosbags.typesys import Stores, get_typestore

        if self.path.exists():
            raise RecordError(f"{self.path} exists already; choose another episode name or remove it")
        self._typestore = get_typestore(Stores.ROS2_KILTED)
        writer = _WriterThread(self.path, self.storage)
        writer.open()
        self._writer = writer
        self._started = time.monotonic()
        self._discover()
        self._timer = self.node.create_timer(DISCOVERY_PERIOD_S, self._discover)

    @property
    def recording(self) -> bool:
        return self._writer is not None

    def subscribed_topics(self) -> list[str]:
        """Returns the topics subscribed so far."""
        with self._lock:
            return list(self._connections)

    def counts(self) -> dict[str, int]:
        """Returns the messages written so far per topic."""
        with self._lock:
            return {topic: record.count for topic, record in self._records.items()}

    def _discover(self) -> None:
        if self._writer is None:
            return
        pending = [t for t in self.topics if t not in self._connections and t not in self._unsupported]
        if not pending:
            return
        graph = dict(self.node.get_topic_names_and_types())
        for topic in pending:
            types = graph.get(topic)
            if not types:
                continue
            msgtype = types[0]
            publishers = self.node.get_publishers_info_by_topic(topic)
            if not publishers:
                continue
            self._subscribe(topic, msgtype, [info.qos_profile for info in publishers])

    def _subscribe(self, topic: str, msgtype: str, profiles: list[Any]) -> None:
        try:
            message_type = message_class(msgtype)
            with self._lock:
                connection = self._writer.add_connection(
                    topic,
                    msgtype,
                    typestore=self._typestore,
                    serialization_format="cdr",
                    offered_qos_profiles=[offered_qos(profile) for profile in profiles],
                )
        except Exception as exc:  # unknown to the typestore or not importable: skip the topic, say why
            self._unsupported.add(topic)
            self.node.get_logger().error(f"cannot record {topic} ({msgtype}): {exc}")
            return
        with self._lock:
            self._connections[topic] = connection
            self._records[topic] = TopicRecord(topic, msgtype)

        def on_message(data: bytes, topic: str = topic) -> None:
            self._write(topic, data)

        self._subscriptions.append(
            self.node.create_subscription(
                message_type, topic, on_message, subscription_qos(profiles), raw=True
            )
        )
        self.node.get_logger().info(f"recording {topic} ({msgtype})")

    def _write(self, topic: str, data: bytes) -> None:
        now_ns = self.node.get_clock().now().nanoseconds
        with self._lock:
            if self._writer is None:
                return
            self._writer.write(self._connections[topic], now_ns, data)
            record = self._records[topic]
            if record.count == 0:
                record.first_ns = now_ns
            record.count += 1
            record.last_ns = now_ns

    def stop(self) -> RecordSummary:
        """Stops recording, closes the bag (writing metadata.yaml) and returns what was written."""
        if self._timer is not None:
            self.node.destroy_timer(self._timer)
            self._timer = None
        for subscription in self._subscriptions:
            self.node.destroy_subscription(subscription)
        self._subscriptions = []
        with self._lock:
            writer, self._writer = self._writer, None
            records = dict(self._records)
        if writer is not None:
            writer.close()
        missing = tuple(topic for topic in self.topics if topic not in records)
        duration = time.monotonic() - self._started if self._started else 0.0
        return RecordSummary(self.path, self.storage, records, missing, duration)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m openvla_ros.record",
        description="Record the demonstration topics of a record.yaml into a rosbag2 bag (no rosbag2 needed).",
    )
    parser.add_argument("--config", help="topics file (default: the package's config/record.yaml)")
    parser.add_argument(
        "--output-dir", help="directory of the bags (default: the config's record.output_dir)"
    )
    parser.add_argument(
        "--episode", help="bag name inside the output directory (default: episode_<date>_<time>)"
    )
    parser.add_argument(
        "--storage", choices=STORAGE_PLUGINS, help="storage plugin (default: the config's, mcap)"
    )
    parser.add_argument(
        "--duration", type=float, default=0.0, help="stop after this many seconds (0: until Ctrl-C)"
    )
    parser.add_argument(
        "--topics", nargs="+", default=[], metavar="TOPIC", help="record these topics as well"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Records until Ctrl-C, SIGTERM or ``--duration``; returns the exit status (0, or 2 on bad input)."""
    args = _parse_args(argv)
    try:
        settings = load_record_settings(args.config)
    except RecordError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if settings.max_bag_duration_s > 0:
        print("note: record.max_bag_duration_s is not supported here; writing a single file", file=sys.stderr)
    topics = list(dict.fromkeys([*settings.topics, *args.topics]))
    storage = args.storage or settings.storage
    episode = args.episode or time.strftime("episode_%Y%m%d_%H%M%S")
    path = Path(args.output_dir or settings.output_dir) / episode
    if path.exists():
        print(f"error: {path} exists already; choose another --episode or remove it", file=sys.stderr)
        return 2

    import rclpy
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
    from rclpy.signals import SignalHandlerOptions

    # Own signal handling: the first Ctrl-C, SIGTERM or SIGHUP ends the loop and the bag is closed properly.
    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    node = rclpy.create_node("demo_recorder")
    recorder = BagRecorder(node, topics, path, storage)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        recorder.start()
        print(f"recording {len(topics)} topics to {path} ({storage}); Ctrl-C to stop", flush=True)
        deadline = time.monotonic() + args.duration if args.duration > 0 else float("inf")
        while not stop.is_set() and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.05)
    except RecordError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ExternalShutdownException:
        pass
    finally:
        summary = recorder.stop() if recorder.recording else None
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    if summary is not None:
        print(summary.describe(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
