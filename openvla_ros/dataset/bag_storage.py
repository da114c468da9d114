"""A rosbag2 bag's storage files read as one time-ordered stream, without rosbags' metadata matching.

Topics and message counts come from the storage files themselves (sqlite3's ``topics`` and
``messages`` tables, mcap's channels, schemas and summary statistics), so a ``metadata.yaml`` whose
QoS profiles differ from the storage's (common in real bags) hides nothing, and a bag without
``metadata.yaml`` still reads. Message type definitions are never parsed: only the topics a caller
asks for are read, and their bytes are handed over undecoded.

:func:`open_bag` returns a :class:`StoredBag`; its :meth:`StoredBag.entries` yields
``(receive time ns, topic, locator, payload)`` in time order, where ``payload`` is the serialised
message for the topics asked to carry one and None for the others, which are read later, one by one
and from any thread, with :meth:`StoredBag.read`.
"""

from __future__ import annotations

import heapq
import shutil
import tempfile
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any, Protocol

from openvla_ros.dataset.bag_common import (
    ZSTD_FRAME_MAGIC,
    BagError,
    Entry,
    StorageTopic,
    decompress,
)
from openvla_ros.dataset.bag_layout import decompress_file, read_layout
from openvla_ros.dataset.bag_mcap import McapFile
from openvla_ros.dataset.bag_sqlite import SqliteFile

__all__ = ["BagError", "Entry", "StorageFile", "StorageTopic", "StoredBag", "open_bag", "open_storage_file"]

class StorageFile(Protocol):
    """One storage file of a bag (sqlite3 ``.db3`` or ``.mcap``)."""

    path: Path
    warnings: list[str]

    def topics(self) -> dict[str, StorageTopic]:
        """Returns ``{topic: StorageTopic}`` of every topic in the file."""
        ...

    def entries(self, topics: Collection[str], payload: Collection[str]) -> Iterator[Entry]:
        """Yields ``(time ns, topic, locator, payload or None)`` of ``topics`` in time order."""
        ...

    def read(self, locator: Any) -> bytes | memoryview:
        """Returns the serialised message at ``locator``; safe to call from several threads."""
        ...

    def close(self) -> None:
        """Releases the file; later reads raise BagError."""
        ...


def merge_topics(files: list[StorageFile]) -> dict[str, StorageTopic]:
    """Returns the topics of all ``files`` with types united and counts summed (None if any file has none)."""
    merged: dict[str, StorageTopic] = {}
    for storage in files:
        for name, topic in storage.topics().items():
            known = merged.get(name)
            if known is None:
                merged[name] = StorageTopic(name, topic.types, topic.count)
                continue
            known.types = tuple(dict.fromkeys(known.types + topic.types))
            known.count = None if known.count is None or topic.count is None else known.count + topic.count
    return merged


class StoredBag:
    """The storage files of one bag, opened; use :func:`open_bag`, and :meth:`close` when done."""

    def __init__(self, path: Path, files: list[StorageFile], declared: dict[str, int] | None,
                 message_compression: str, temporary: Path | None) -> None:
        self.path = path
        self.files = files
        self.declared_counts = declared
        self._message_compression = message_compression
        self._temporary = temporary
        self.topics = merge_topics(files)

    @property
    def warnings(self) -> list[str]:
        """Problems the storage files reported while reading (e.g. a truncated recording)."""
        return [warning for storage in self.files for warning in storage.warnings]

    def entries(self, topics: Collection[str], payload: Collection[str]) -> Iterator[Entry]:
        """Yields ``(time ns, topic, locator, payload)`` of ``topics`` over every file, in time order.

        ``payload`` is the serialised message for topics in ``payload``, None for the others (read
        those with :meth:`read` and the locator). Equal times keep the files' order.

        Raises:
            BagError: when a file is damaged.
        """
        def tagged(number: int, storage: StorageFile) -> Iterator[Entry]:
            for time_ns, topic, locator, data in storage.entries(topics, payload):
                if data is not None:
                    data = self._plain(data, topic)
                yield time_ns, topic, (number, locator), data

        streams = [tagged(number, storage) for number, storage in enumerate(self.files)]
        if len(streams) == 1:
            yield from streams[0]
        else:
            yield from heapq.merge(*streams, key=lambda entry: entry[0])

    def read(self, locator: tuple[int, Any], topic: str = "") -> bytes | memoryview:
        """Returns the serialised message at a locator from :meth:`entries`; thread-safe.

        Raises:
            BagError: when the bag is closed or the file is damaged.
        """
        number, local = locator
        return self._plain(self.files[number].read(local), topic)

    def _plain(self, data: bytes | memoryview, topic: str) -> bytes | memoryview:
        """Returns a stored message as serialised CDR: decompressed when the metadata says so.

        Raises:
            BagError: when it does not decompress, or is compressed although no metadata says so.
        """
        if self._message_compression:
            return self._decompress_message(data, topic)
        if bytes(data[:4]) == ZSTD_FRAME_MAGIC:
            where = "has no metadata.yaml" if self.declared_counts is None else "metadata.yaml does not say so"
            raise BagError(
                f"bag {self.path}: the messages on {topic} are zstd-compressed one by one (they start with the "
                f"zstd frame magic), but the bag {where}: the metadata that says how it was compressed is "
                "missing. Restore the bag's original metadata.yaml, or write an uncompressed copy with "
                "`ros2 bag convert`"
            )
        return data

    def _decompress_message(self, data: bytes | memoryview, topic: str) -> bytes:
        try:
            return decompress(self._message_compression, data)
        except Exception as exc:
            raise BagError(
                f"bag {self.path}: a {self._message_compression}-compressed message on {topic} does not decompress "
                f"({exc}); the bag is damaged: leave it out"
            ) from exc

    def close(self) -> None:
        """Closes every file and removes any temporary decompressed copy."""
        for storage in self.files:
            storage.close()
        if self._temporary is not None:
            shutil.rmtree(self._temporary, ignore_errors=True)
            self._temporary = None


def open_storage_file(path: Path, storage: str, bag: Path | None = None) -> StorageFile:
    """Returns the storage file at ``path`` opened with the reader of ``storage`` (``sqlite3`` or ``mcap``).

    Raises:
        BagError: when the file is not a readable file of that storage.
    """
    if storage == "mcap":
        return McapFile(path, bag)
    return SqliteFile(path, bag)


def open_bag(path: str | Path) -> StoredBag:
    """Opens a rosbag2 bag: a directory (with or without ``metadata.yaml``) or one ``.db3``/``.mcap`` file.

    Raises:
        BagError: when the path holds no readable bag; the message says what is missing.
    """
    layout = read_layout(Path(path))
    temporary: Path | None = None
    files: list[StorageFile] = []
    try:
        paths = layout.files
        if layout.compression_mode == "file":
            temporary = Path(tempfile.mkdtemp(prefix="bag-decompressed-"))
            paths = [decompress_file(layout, file, temporary) for file in layout.files]
        for file in paths:
            files.append(open_storage_file(file, layout.storage, layout.path))
    except BaseException:
        for storage in files:
            storage.close()
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
        raise
    message_compression = layout.compression_format if layout.compression_mode == "message" else ""
    return StoredBag(layout.path, files, layout.declared_counts, message_compression, temporary)
