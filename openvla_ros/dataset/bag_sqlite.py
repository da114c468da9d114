"""One sqlite3 storage file (``.db3``) of a rosbag2 bag, read with the standard library.

rosbag2's sqlite3 layout: ``topics(id, name, type, serialization_format, ...)`` and
``messages(id, topic_id, timestamp, data)``. Topics are matched to messages by ``topic_id`` alone
(QoS profiles are ignored). The time-ordered scan selects the ``data`` column only for the topics
that need it, so SQLite never reads the overflow pages of the camera frames it skips; a frame is
later read as a blob by its rowid on a second connection that worker threads share under a lock.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Collection, Iterator
from pathlib import Path

from openvla_ros.dataset.bag_common import BagError, Entry, StorageTopic

_WAY_OUT = "the file is damaged or not a rosbag2 sqlite3 file: leave this bag out, or re-record it"


class SqliteFile:
    """A ``.db3`` file opened read-only.

    Raises (from the constructor):
        BagError: when the file is not an SQLite database or lacks the ``topics``/``messages`` tables.
    """

    def __init__(self, path: Path, bag: Path | None = None) -> None:
        self.path = path
        self._where = f"bag {bag}: {path.name}" if bag is not None and bag != path else f"bag {path}"
        self.warnings: list[str] = []
        self._lock = threading.Lock()
        self._scan = self._connect()
        self._reader: sqlite3.Connection | None = None
        try:
            self._reader = self._connect()
        except BagError:
            self._scan.close()
            raise
        try:
            tables = {row[0] for row in self._scan.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.Error as exc:
            self.close()
            raise BagError(f"{self._where} cannot be read as SQLite ({exc}); {_WAY_OUT}") from exc
        missing = {"topics", "messages"} - tables
        if missing:
            self.close()
            raise BagError(f"{self._where} has no {' or '.join(sorted(missing))} table; {_WAY_OUT}")
        self._topics = self._read_topics()

    def _connect(self) -> sqlite3.Connection:
        try:
            return sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
        except sqlite3.Error as exc:
            raise BagError(f"{self._where} cannot be opened ({exc}); {_WAY_OUT}") from exc

    def _read_topics(self) -> dict[str, StorageTopic]:
        try:
            rows = self._scan.execute("SELECT id, name, type FROM topics ORDER BY id").fetchall()
            counts = dict(self._scan.execute("SELECT topic_id, COUNT(*) FROM messages GROUP BY topic_id").fetchall())
        except sqlite3.Error as exc:
            self.close()
            raise BagError(f"{self._where}: cannot read its topics ({exc}); {_WAY_OUT}") from exc
        self._ids: dict[str, list[int]] = {}
        self._names: dict[int, str] = {}
        topics: dict[str, StorageTopic] = {}
        for topic_id, name, msgtype in rows:
            self._ids.setdefault(name, []).append(int(topic_id))
            self._names[int(topic_id)] = name
            count = int(counts.get(topic_id, 0))
            known = topics.get(name)
            if known is None:
                topics[name] = StorageTopic(name, (str(msgtype),), count)
            else:
                known.types = tuple(dict.fromkeys((*known.types, str(msgtype))))
                known.count = (known.count or 0) + count
        return topics

    def topics(self) -> dict[str, StorageTopic]:
        """Returns ``{topic: StorageTopic}``, counts from ``COUNT(*)`` over the messages table."""
        return self._topics

    def entries(self, topics: Collection[str], payload: Collection[str]) -> Iterator[Entry]:
        """Yields ``(timestamp, topic, rowid, data or None)`` of ``topics`` ordered by timestamp, then rowid.

        Raises:
            BagError: when SQLite reports the file damaged while reading.
        """
        wanted = [topic_id for name in topics for topic_id in self._ids.get(name, [])]
        with_data = [topic_id for name in payload for topic_id in self._ids.get(name, [])]
        if not wanted:
            return
        query = (
            f"SELECT rowid, topic_id, timestamp, CASE WHEN topic_id IN ({','.join('?' * len(with_data)) or 'NULL'}) "
            f"THEN data END FROM messages WHERE topic_id IN ({','.join('?' * len(wanted))}) ORDER BY timestamp, rowid"
        )
        names = self._names
        try:
            cursor = self._scan.execute(query, (*with_data, *wanted))
            while rows := cursor.fetchmany(512):
                for row_id, topic_id, timestamp, data in rows:
                    yield int(timestamp), names[topic_id], row_id, data
        except sqlite3.Error as exc:
            raise BagError(f"{self._where}: reading messages failed ({exc}); {_WAY_OUT}") from exc

    def read(self, locator: int) -> bytes:
        """Returns the ``data`` of the message at rowid ``locator`` (read as a blob, without a query).

        Raises:
            BagError: when the file is closed, the row is gone or SQLite reports damage.
        """
        with self._lock:
            if self._reader is None:
                raise BagError(f"{self._where} is closed")
            try:
                with self._reader.blobopen("messages", "data", locator, readonly=True) as blob:
                    return blob.read()
            except sqlite3.Error as exc:
                raise BagError(f"{self._where}: reading message {locator} failed ({exc}); {_WAY_OUT}") from exc

    def close(self) -> None:
        """Closes both connections."""
        with self._lock:
            reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()
        self._scan.close()
