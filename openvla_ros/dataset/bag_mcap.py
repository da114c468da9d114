"""One mcap storage file of a rosbag2 bag, read from its own framing (no schema is ever parsed).

The file's :class:`~openvla_ros.dataset.mcap_index.McapIndex` says where each message of the wanted
channels lies. A message in an uncompressed chunk is read alone with one seek; a compressed chunk
(``zstd`` or ``lz4``, as rosbag2 writes by default) is decompressed only as far as the small messages
a scan needs from it (a rosbag2 chunk usually ends with its camera frame), and whole when a frame is
read, kept in a small cache for the frames that follow.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Collection, Iterator
from pathlib import Path

import numpy as np

from openvla_ros.dataset.bag_common import BagError, Entry, StorageTopic
from openvla_ros.dataset.mcap_index import (
    MAGIC,
    MESSAGE,
    MESSAGE_HEADER,
    RECORD_HEADER,
    WAY_OUT,
    McapIndex,
    group_max,
)

_CACHE_BYTES = 64 << 20  # decompressed chunks kept for frame reads
_SMALL_READ = 2 << 10  # one read fetches a message of up to this size with its header
_PREFIX_MARGIN = 4 << 10  # decompressed past the start of the last small message a scan needs from a chunk


class McapFile:
    """An ``.mcap`` file opened for reading.

    Raises (from the constructor):
        BagError: when the file is not an mcap file or its summary is inconsistent.
    """

    def __init__(self, path: Path, bag: Path | None = None) -> None:
        self.path = path
        self._where = f"bag {bag}: {path.name}" if bag is not None and bag != path else f"bag {path}"
        self._lock = threading.Lock()
        self._readers = 0
        self._closing: int | None = None
        try:
            self._fd: int | None = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise BagError(f"{self._where} cannot be opened ({exc.strerror or exc})") from exc
        self._size = os.fstat(self._fd).st_size
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        try:
            if self._pread(len(MAGIC), 0) != MAGIC:
                raise BagError(f"{self._where} does not start with the mcap magic; {WAY_OUT}")
            self._index = McapIndex(self._pread, self._size, self._where)
        except BaseException:
            self.close()
            raise
        self.warnings = self._index.warnings
        self._chunks = self._index.chunks

    # ------------------------------------------------------------------------------------------ file access

    def _pread(self, size: int, offset: int, *, exact: bool = True) -> bytes:
        """Returns ``size`` bytes at ``offset`` (fewer at the end of the file when not ``exact``).

        Reads run without holding the lock (threads read side by side); a close that comes meanwhile
        leaves the descriptor to the last reader to close.
        """
        with self._lock:
            if self._fd is None:
                raise BagError(f"{self._where} is closed")
            fd = self._fd
            self._readers += 1
        try:
            data = os.pread(fd, size, offset)
        finally:
            with self._lock:
                self._readers -= 1
                close_now = self._fd is None and self._readers == 0 and self._closing == fd
            if close_now:
                self._closing = None
                os.close(fd)
        if exact and len(data) != size:
            raise BagError(f"{self._where} ends at byte {self._size}, inside a record at byte {offset}; {WAY_OUT}")
        return data

    def close(self) -> None:
        """Closes the file (once reads in progress end); later reads raise BagError."""
        with self._lock:
            fd, self._fd = self._fd, None
            self._cache.clear()
            if fd is not None and self._readers:
                self._closing, fd = fd, None
        if fd is not None:
            os.close(fd)

    def topics(self) -> dict[str, StorageTopic]:
        """Returns ``{topic: StorageTopic}``; counts from the summary's statistics (None without them)."""
        return self._index.topics()

    def entries(self, topics: Collection[str], payload: Collection[str]) -> Iterator[Entry]:
        """Yields ``(log time, topic, (chunk, offset), data or None)`` of ``topics`` in time order.

        Raises:
            BagError: when a record is not where the index says or a chunk does not decompress.
        """
        channels = self._index.channels
        wanted = {channel_id for channel_id, (name, _) in channels.items() if name in topics}
        with_data = {channel_id for channel_id, (name, _) in channels.items() if name in payload}
        rows = self._index.rows(wanted)
        needs = rows[np.isin(rows[:, 3], list(with_data))]
        prefix = {int(chunk): int(end) for chunk, end in zip(*group_max(needs[:, 1], needs[:, 2]), strict=True)}
        recent: OrderedDict[int, bytes | memoryview] = OrderedDict()
        names = {channel_id: name for channel_id, (name, _) in channels.items()}
        for time_ns, chunk, offset, channel_id in rows.tolist():
            data = None
            if channel_id in with_data:
                if self._chunks[chunk].compression:
                    records = recent.get(chunk)
                    if records is None:
                        records = recent[chunk] = self._index.chunk_records(chunk, prefix[chunk] + _PREFIX_MARGIN)
                        if len(recent) > 4:
                            recent.popitem(last=False)
                    data = self._message_in(records, chunk, offset, channel_id)
                else:
                    data = self._read_uncompressed(chunk, offset, channel_id)
            yield time_ns, names[channel_id], (chunk, offset), data

    # ------------------------------------------------------------------------------------------ messages

    def read(self, locator: tuple[int, int]) -> bytes | memoryview:
        """Returns the data of the message record at ``(chunk, offset)``; thread-safe.

        Raises:
            BagError: when the file is closed or damaged there.
        """
        chunk, offset = locator
        if not self._chunks[chunk].compression:
            return self._read_uncompressed(chunk, offset, None)
        with self._lock:
            records = self._cache.get(chunk)
            if records is not None:
                self._cache.move_to_end(chunk)
        if records is None:
            records = self._index.chunk_records(chunk)
            with self._lock:
                self._cache[chunk] = records
                while len(self._cache) > 1 and sum(len(item) for item in self._cache.values()) > _CACHE_BYTES:
                    self._cache.popitem(last=False)
        return self._message_in(records, chunk, offset, None)

    def _read_uncompressed(self, chunk: int, offset: int, channel_id: int | None) -> bytes | memoryview:
        """Reads a message in one go when it is small (one guess of its size), else header then data."""
        at = self._chunks[chunk].data_offset + offset
        head = self._pread(_SMALL_READ, at, exact=False)
        if len(head) < MESSAGE_HEADER.size:
            raise BagError(f"{self._where} ends at byte {self._size}, inside a record at byte {at}; {WAY_OUT}")
        opcode, length, found, _, _, _ = MESSAGE_HEADER.unpack_from(head)
        self._check_message(opcode, found, channel_id, chunk, offset)
        end = RECORD_HEADER.size + length
        if end <= len(head):
            return memoryview(head)[MESSAGE_HEADER.size : end]
        return self._pread(end - MESSAGE_HEADER.size, at + MESSAGE_HEADER.size)

    def _message_in(self, records: bytes | memoryview, chunk: int, offset: int,
                    channel_id: int | None) -> memoryview:
        if offset + MESSAGE_HEADER.size > len(records):
            records = self._index.chunk_records(chunk)
        opcode, length, found, _, _, _ = MESSAGE_HEADER.unpack_from(records, offset)
        self._check_message(opcode, found, channel_id, chunk, offset)
        end = offset + RECORD_HEADER.size + length
        if end > len(records):
            records = self._index.chunk_records(chunk)
            if end > len(records):
                raise BagError(f"{self._where}: a message overruns chunk {chunk}; {WAY_OUT}")
        return memoryview(records)[offset + MESSAGE_HEADER.size : end]

    def _check_message(self, opcode: int, found: int, channel_id: int | None, chunk: int, offset: int) -> None:
        if opcode != MESSAGE or (channel_id is not None and found != channel_id):
            raise BagError(
                f"{self._where}: no message record at offset {offset} of chunk {chunk}, where the index "
                f"points; {WAY_OUT}"
            )
