"""One mcap storage file of a rosbag2 bag, read from its own framing (no schema is ever parsed).

An mcap file is a magic, then records ``opcode (u8), length (u64 LE), body``. Messages live in Chunk
records, each optionally compressed (``zstd`` or ``lz4``, as rosbag2 writes by default), followed by
one Message Index record per channel (``(log time, offset in the chunk)`` pairs). The summary section
at the end holds the Schema and Channel records, a Chunk Index per chunk and the Statistics (message
count per channel); the Footer, just before the closing magic, says where the summary starts.

With a summary, only the message indexes of the wanted channels are read to find the messages, and a
message is read by seeking into its chunk: an uncompressed chunk's message is read alone; a compressed
chunk is decompressed only as far as the messages needed from it (frames are usually last in a
rosbag2 chunk). Without a summary (a recording that did not finish, or an unindexed writer) the file
is scanned record by record instead, and a truncated tail is reported as a warning.
"""

from __future__ import annotations

import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from openvla_ros.dataset.bag_storage import BagError, Entry, StorageTopic

MAGIC = b"\x89MCAP0\r\n"
SCHEMA, CHANNEL, MESSAGE, CHUNK, MESSAGE_INDEX, CHUNK_INDEX, STATISTICS = 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x0B
FOOTER, DATA_END = 0x02, 0x0F
_RECORD = struct.Struct("<BQ")  # opcode, length
_MESSAGE = struct.Struct("<BQHIQQ")  # record header + channel id, sequence, log time, publish time
_CHUNK_HEAD = struct.Struct("<QQQI")  # start time, end time, uncompressed size, crc
_U16, _U32, _U64 = struct.Struct("<H"), struct.Struct("<I"), struct.Struct("<Q")
_INDEX_PAIR = np.dtype([("time", "<u8"), ("offset", "<u8")])
_CACHE_BYTES = 64 << 20  # decompressed chunks kept for frame reads
_PREFIX_MARGIN = 64 << 10  # decompressed past the last small message a scan needs from a chunk
_WAY_OUT = "the file is damaged: leave this bag out, or try `mcap recover` on it"


@dataclass(frozen=True)
class Chunk:
    """Where a chunk's records lie: ``data_offset`` in the file, their stored and decompressed sizes."""

    data_offset: int
    stored_size: int
    size: int
    compression: str


class _Body:
    """Reads the fields of one record body."""

    def __init__(self, data: bytes | memoryview, position: int = 0) -> None:
        self.data, self.position = data, position

    def integer(self, codec: struct.Struct) -> int:
        (value,) = codec.unpack_from(self.data, self.position)
        self.position += codec.size
        return value

    def string(self) -> str:
        size = self.integer(_U32)
        text = bytes(self.data[self.position : self.position + size]).decode("utf-8", errors="replace")
        self.position += size
        return text

    def id_map(self, value: struct.Struct) -> dict[int, int]:
        """Reads a ``Map<uint16, value>`` (byte length first)."""
        end = self.position + self.integer(_U32)
        result = {}
        while self.position < end:
            key = self.integer(_U16)
            result[key] = self.integer(value)
        return result


class McapFile:
    """An ``.mcap`` file opened for reading.

    Raises (from the constructor):
        BagError: when the file is not an mcap file or its summary is inconsistent.
    """

    def __init__(self, path: Path, bag: Path | None = None) -> None:
        self.path = path
        self._where = f"bag {bag}: {path.name}" if bag is not None and bag != path else f"bag {path}"
        self.warnings: list[str] = []
        self._lock = threading.Lock()
        try:
            self._fd: int | None = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise BagError(f"{self._where} cannot be opened ({exc.strerror or exc})") from exc
        self._size = os.fstat(self._fd).st_size
        self._schemas: dict[int, str] = {}
        self._channels: dict[int, tuple[str, int]] = {}  # id -> (topic, schema id)
        self._chunks: list[Chunk] = []
        self._chunk_indexes: list[tuple[int, int, dict[int, int]]] = []  # per chunk: index start, length, offsets
        self._counts: dict[int, int] | None = None
        self._scanned: dict[int, list[tuple[int, int, int]]] | None = None  # channel -> (time, chunk, offset)
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._outside_chunks: int | None = None
        try:
            if self._pread(len(MAGIC), 0) != MAGIC:
                raise BagError(f"{self._where} does not start with the mcap magic; {_WAY_OUT}")
            if not self._read_summary():
                self._scan_file()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------------------------------ file access

    def _pread(self, size: int, offset: int) -> bytes:
        with self._lock:
            if self._fd is None:
                raise BagError(f"{self._where} is closed")
            data = os.pread(self._fd, size, offset)
        if len(data) != size:
            raise BagError(f"{self._where} ends at byte {self._size}, inside a record at byte {offset}; {_WAY_OUT}")
        return data

    def close(self) -> None:
        """Closes the file; later reads raise BagError."""
        with self._lock:
            fd, self._fd = self._fd, None
            self._cache.clear()
        if fd is not None:
            os.close(fd)

    # ------------------------------------------------------------------------------------------ summary

    def _read_summary(self) -> bool:
        """Reads schemas, channels, chunk indexes and statistics from the summary; False when unusable."""
        footer_at = self._size - len(MAGIC) - 29
        if footer_at < len(MAGIC) or self._pread(len(MAGIC), self._size - len(MAGIC)) != MAGIC:
            return False
        opcode, length, summary_start, _, _ = struct.unpack("<BQQQI", self._pread(29, footer_at))
        if opcode != FOOTER or length != 20 or not len(MAGIC) <= summary_start < footer_at:
            return False
        summary = self._pread(footer_at - summary_start, summary_start)
        position, chunk_indexes = 0, []
        while position + _RECORD.size <= len(summary):
            opcode, length = _RECORD.unpack_from(summary, position)
            body = memoryview(summary)[position + _RECORD.size : position + _RECORD.size + length]
            position += _RECORD.size + length
            if len(body) != length:
                return False
            if opcode == SCHEMA:
                self._add_schema(_Body(body))
            elif opcode == CHANNEL:
                self._add_channel(_Body(body))
            elif opcode == STATISTICS:
                fields = _Body(body, 42)
                self._counts = fields.id_map(_U64)
            elif opcode == CHUNK_INDEX:
                chunk_indexes.append(self._chunk_index(_Body(body)))
        declared = sum(self._counts.values()) if self._counts is not None else None
        if not self._channels or (not chunk_indexes and declared != 0):
            return False  # nothing to go by, or messages outside chunks: scan the file instead
        for chunk, _ in chunk_indexes:
            _check_compression(self._where, chunk.compression)
        chunk_indexes.sort(key=lambda item: item[0].data_offset)
        self._chunks = [chunk for chunk, _ in chunk_indexes]
        self._chunk_indexes = [index for _, index in chunk_indexes]
        return True

    def _add_schema(self, body: _Body) -> None:
        schema_id = body.integer(_U16)
        self._schemas[schema_id] = body.string()

    def _add_channel(self, body: _Body) -> None:
        channel_id, schema_id = body.integer(_U16), body.integer(_U16)
        self._channels[channel_id] = (body.string(), schema_id)

    def _chunk_index(self, body: _Body) -> tuple[Chunk, tuple[int, int, dict[int, int]]]:
        body.position += 16  # message start and end times
        chunk_start, chunk_length = body.integer(_U64), body.integer(_U64)
        offsets = body.id_map(_U64)
        index_length = body.integer(_U64)
        compression = body.string()
        stored, size = body.integer(_U64), body.integer(_U64)
        data_offset = chunk_start + _RECORD.size + _CHUNK_HEAD.size + 4 + len(compression.encode()) + 8
        return Chunk(data_offset, stored, size, compression), (chunk_start + chunk_length, index_length, offsets)

    # ------------------------------------------------------------------------------------------ linear scan

    def _scan_file(self) -> None:
        """Finds every record by reading the file from the start (no usable summary)."""
        self._scanned = {}
        position = len(MAGIC)
        while position + _RECORD.size <= self._size:
            opcode, length = _RECORD.unpack(self._pread(_RECORD.size, position))
            body_at = position + _RECORD.size
            if body_at + length > self._size:
                self.warnings.append(
                    f"{self._where} is truncated at byte {self._size} (the recording did not finish); the "
                    f"messages before byte {position} were read"
                )
                break
            if opcode in (DATA_END, FOOTER):
                break
            if opcode in (SCHEMA, CHANNEL):
                body = _Body(self._pread(length, body_at))
                (self._add_schema if opcode == SCHEMA else self._add_channel)(body)
            elif opcode == MESSAGE:
                channel_id, _, log_time = struct.unpack("<HIQ", self._pread(14, body_at))
                self._scanned.setdefault(channel_id, []).append((log_time, self._file_chunk(), position))
            elif opcode == CHUNK:
                self._scan_chunk(body_at, length)
            position = body_at + length
        if not self._channels:
            raise BagError(f"{self._where} holds no channel records, so no topic can be read; {_WAY_OUT}")

    def _file_chunk(self) -> int:
        """Returns the pseudo-chunk that addresses records outside chunks by their file offset."""
        if self._outside_chunks is None:
            self._outside_chunks = len(self._chunks)
            self._chunks.append(Chunk(0, self._size, self._size, ""))
        return self._outside_chunks

    def _scan_chunk(self, body_at: int, length: int) -> None:
        head = self._pread(min(length, _CHUNK_HEAD.size + 4 + 64), body_at)
        _, _, size, _ = _CHUNK_HEAD.unpack_from(head)
        compression_length = _U32.unpack_from(head, _CHUNK_HEAD.size)[0]
        header_size = _CHUNK_HEAD.size + 4 + compression_length + 8
        compression = self._pread(compression_length, body_at + _CHUNK_HEAD.size + 4).decode()
        stored = _U64.unpack(self._pread(8, body_at + header_size - 8))[0]
        chunk = Chunk(body_at + header_size, stored, size, compression)
        _check_compression(self._where, compression)
        number = len(self._chunks)
        self._chunks.append(chunk)
        records = self._chunk_data(number, size)
        position = 0
        while position + _RECORD.size <= len(records):
            opcode, record_length = _RECORD.unpack_from(records, position)
            body = _Body(records, position + _RECORD.size)
            if opcode == MESSAGE:
                channel_id, _, log_time = struct.unpack_from("<HIQ", records, body.position)
                self._scanned.setdefault(channel_id, []).append((log_time, number, position))
            elif opcode == SCHEMA:
                self._add_schema(body)
            elif opcode == CHANNEL:
                self._add_channel(body)
            position += _RECORD.size + record_length

    # ------------------------------------------------------------------------------------------ topics, index

    def topics(self) -> dict[str, StorageTopic]:
        """Returns ``{topic: StorageTopic}``; counts from the summary's statistics (None without them)."""
        topics: dict[str, StorageTopic] = {}
        for channel_id, (name, schema_id) in sorted(self._channels.items()):
            msgtype = self._schemas.get(schema_id, "")
            count = None if self._counts is None else self._counts.get(channel_id, 0)
            known = topics.get(name)
            if known is None:
                topics[name] = StorageTopic(name, (msgtype,), count)
            else:
                known.types = tuple(dict.fromkeys((*known.types, msgtype)))
                known.count = None if known.count is None or count is None else known.count + count
        return topics

    def _index(self, channel_ids: set[int]) -> np.ndarray:
        """Returns ``(time, chunk, offset, channel)`` rows of ``channel_ids``' messages, in time then file order."""
        parts: list[np.ndarray] = []
        if self._scanned is not None:
            for channel_id in channel_ids:
                rows = np.asarray(self._scanned.get(channel_id, []), dtype=np.int64).reshape(-1, 3)
                parts.append(np.column_stack([rows, np.full(len(rows), channel_id, np.int64)]))
        else:
            for number, (start, length, offsets) in enumerate(self._chunk_indexes):
                present = [channel_id for channel_id in channel_ids if channel_id in offsets]
                if present:
                    parts.extend(self._chunk_message_index(number, start, length, offsets, present))
        if not parts:
            return np.zeros((0, 4), np.int64)
        rows = np.concatenate(parts)
        return rows[np.lexsort((rows[:, 2], rows[:, 1], rows[:, 0]))]

    def _chunk_message_index(self, number: int, start: int, length: int, offsets: dict[int, int],
                             channel_ids: list[int]) -> list[np.ndarray]:
        region = self._pread(length, start)
        parts = []
        for channel_id in channel_ids:
            at = offsets[channel_id] - start
            opcode, _ = _RECORD.unpack_from(region, at)
            found, size = struct.unpack_from("<HI", region, at + _RECORD.size)
            if opcode != MESSAGE_INDEX or found != channel_id:
                raise BagError(f"{self._where}: the message index of chunk {number} is inconsistent; {_WAY_OUT}")
            pairs = np.frombuffer(region, _INDEX_PAIR, size // 16, at + _RECORD.size + 6)
            rows = np.empty((len(pairs), 4), np.int64)
            rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3] = pairs["time"], number, pairs["offset"], channel_id
            parts.append(rows)
        return parts

    def entries(self, topics: Collection[str], payload: Collection[str]) -> Iterator[Entry]:
        """Yields ``(log time, topic, (chunk, offset), data or None)`` of ``topics`` in time order.

        Raises:
            BagError: when a record is not where the index says or a chunk does not decompress.
        """
        wanted = {channel_id for channel_id, (name, _) in self._channels.items() if name in topics}
        with_data = {channel_id for channel_id, (name, _) in self._channels.items() if name in payload}
        rows = self._index(wanted)
        needs = rows[np.isin(rows[:, 3], list(with_data))]
        prefix = {int(chunk): int(end) for chunk, end in zip(*_group_max(needs[:, 1], needs[:, 2]), strict=True)}
        recent: OrderedDict[int, bytes | memoryview] = OrderedDict()
        names = {channel_id: name for channel_id, (name, _) in self._channels.items()}
        for time_ns, chunk, offset, channel_id in rows.tolist():
            data = None
            if channel_id in with_data:
                if self._chunks[chunk].compression:
                    records = recent.get(chunk)
                    if records is None:
                        records = recent[chunk] = self._chunk_data(chunk, prefix[chunk] + _PREFIX_MARGIN)
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
            records = self._chunk_data(chunk)
            with self._lock:
                self._cache[chunk] = records
                while len(self._cache) > 1 and sum(len(item) for item in self._cache.values()) > _CACHE_BYTES:
                    self._cache.popitem(last=False)
        return self._message_in(records, chunk, offset, None)

    def _read_uncompressed(self, chunk: int, offset: int, channel_id: int | None) -> bytes:
        at = self._chunks[chunk].data_offset + offset
        opcode, length, found, _, _, _ = _MESSAGE.unpack(self._pread(_MESSAGE.size, at))
        self._check_message(opcode, found, channel_id, chunk, offset)
        return self._pread(length - (_MESSAGE.size - _RECORD.size), at + _MESSAGE.size)

    def _message_in(self, records: bytes | memoryview, chunk: int, offset: int,
                    channel_id: int | None) -> memoryview:
        if offset + _MESSAGE.size > len(records):
            records = self._chunk_data(chunk)
        opcode, length, found, _, _, _ = _MESSAGE.unpack_from(records, offset)
        self._check_message(opcode, found, channel_id, chunk, offset)
        end = offset + _RECORD.size + length
        if end > len(records):
            records = self._chunk_data(chunk)
            if end > len(records):
                raise BagError(f"{self._where}: a message overruns chunk {chunk}; {_WAY_OUT}")
        return memoryview(records)[offset + _MESSAGE.size : end]

    def _check_message(self, opcode: int, found: int, channel_id: int | None, chunk: int, offset: int) -> None:
        if opcode != MESSAGE or (channel_id is not None and found != channel_id):
            raise BagError(
                f"{self._where}: no message record at offset {offset} of chunk {chunk}, where the index "
                f"points; {_WAY_OUT}"
            )

    def _chunk_data(self, number: int, prefix: int | None = None) -> bytes:
        """Returns a chunk's records decompressed (only the first ``prefix`` bytes or more, when given)."""
        chunk = self._chunks[number]
        stored = self._pread(chunk.stored_size, chunk.data_offset)
        if not chunk.compression:
            return stored
        try:
            if prefix is not None and prefix < chunk.size:
                return _decompress_prefix(chunk.compression, stored, prefix)
            from openvla_ros.dataset.bag_layout import decompress

            data = decompress(chunk.compression, stored)
        except BagError:
            raise
        except Exception as exc:
            raise BagError(
                f"{self._where}: chunk {number} ({chunk.compression}) does not decompress "
                f"({type(exc).__name__}: {exc}); {_WAY_OUT}"
            ) from exc
        if len(data) != chunk.size:
            raise BagError(f"{self._where}: chunk {number} decompresses to {len(data)} bytes, not {chunk.size}")
        return data


def _check_compression(where: str, compression: str) -> None:
    if compression not in ("", "zstd", "lz4"):
        raise BagError(
            f"{where} has chunks compressed with {compression!r}, which cannot be read (zstd and lz4 can); "
            "re-compress it with `mcap convert`"
        )


def _decompress_prefix(compression: str, stored: bytes, size: int) -> bytes:
    """Returns at least the first ``size`` decompressed bytes of a zstd or lz4 frame."""
    if compression == "zstd":
        from backports import zstd

        decompressor = zstd.ZstdDecompressor()
    elif compression == "lz4":
        import lz4.frame

        decompressor = lz4.frame.LZ4FrameDecompressor()
    else:
        raise BagError(f"chunk compression {compression!r} is not supported (zstd and lz4 are)")
    return decompressor.decompress(stored, max_length=size)


def _group_max(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns the distinct ``keys`` and the largest value of each."""
    if len(keys) == 0:
        return keys, values
    unique, inverse = np.unique(keys, return_inverse=True)
    largest = np.full(len(unique), np.iinfo(np.int64).min)
    np.maximum.at(largest, inverse, values)
    return unique, largest
