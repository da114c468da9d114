"""Records demonstration topics into a rosbag2 bag without rosbag2: rclpy subscriptions + rosbags' writer.

    python -m openvla_ros.record --episode pick_red_01
    python -m openvla_ros.record --config config/record.yaml --output-dir demos --episode ep_003 \\
        --storage sqlite3 --duration 30

For machines without ``ros2 bag record`` (ROS 2 from PyPI wheels); on a full ROS install
``ros2 launch openvla_ros record.launch.py`` does the same. The topics are those of the config file's
``topics`` section plus ``record.extra_topics``, the bag goes to ``<output_dir>/<episode>`` in
``record.storage`` (mcap by default), as ``ros2 bag record`` would write it: serialized CDR messages
stamped with their receive time (the time the middleware received each one, so a busy recorder does
not shift or reorder them), each topic with its type, type hash and the publishers' offered
QoS in ``metadata.yaml`` (version 9). Topics are picked up whenever their first publisher appears;
subscriptions take the publishers' reliability and durability, so a latched instruction published
before the recorder started is still recorded. Stop with Ctrl-C, SIGTERM or ``--duration``; the bag
is always closed with valid metadata.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from openvla_ros.ros.bag_writing import BagWriterThread, message_class, offered_qos, subscription_qos
from openvla_ros.ros.record_settings import (
    STORAGE_PLUGINS,
    RecordError,
    RecordSummary,
    TopicRecord,
    load_record_settings,
)

DISCOVERY_PERIOD_S = 0.1


class BagRecorder:
    """Records topics of a running rclpy node into one rosbag2 bag.

    Use ``start()`` once, spin the node (any executor), then ``stop()``. Subscriptions are made on
    the node as each topic's first publisher is discovered; messages stay serialized (raw CDR) and
    are written with their receive time: the time the middleware received the message, so that a
    callback the executor runs late (a busy machine, a slow callback before it) keeps the time and
    the order in which messages arrived. Under simulated time (``use_sim_time``), or where the
    middleware gives no receive time, the node clock at the callback is used.
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
        writer = BagWriterThread(self.path, self.storage)
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

        self._subscriptions.append(
            self.node.create_subscription(
                message_type, topic, self._writer_of(topic), subscription_qos(profiles), raw=True
            )
        )
        self.node.get_logger().info(f"recording {topic} ({msgtype})")

    def _writer_of(self, topic: str) -> Any:
        """The subscription callback of ``topic``: it takes the message info (two parameters) for the receive time."""

        def on_message(data: bytes, info: Any) -> None:
            self._write(topic, data, int(info.get("received_timestamp") or 0))

        return on_message

    def _receive_time_ns(self, received_ns: int) -> int:
        clock = self.node.get_clock()
        if received_ns > 0 and not getattr(clock, "ros_time_is_active", False):  # the middleware's is system time
            return received_ns
        return clock.now().nanoseconds

    def _write(self, topic: str, data: bytes, received_ns: int) -> None:
        now_ns = self._receive_time_ns(received_ns)
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
