"""The index of an mcap file: its schemas and channels, its chunks, and where each message lies.

An mcap file is a magic, then records ``opcode (u8), length (u64 LE), body``. Messages live in Chunk
records, each optionally compressed (``zstd`` or ``lz4``), each followed by one Message Index record
per channel (``(log time, offset in the chunk)`` pairs). The summary section at the end holds the
Schema and Channel records, a Chunk Index per chunk and the Statistics (message count per channel);
the Footer, just before the closing magic, says where the summary starts.

:class:`McapIndex` reads the summary when there is one, and then only the message indexes of the
channels asked for; without a usable summary (a recording that did not finish, or a writer that
indexes nothing) it scans the file record by record and reports a truncated tail as a warning.
Schemas are known by name only: their definitions are never parsed.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from openvla_ros.dataset.bag_common import BagError, StorageTopic, decompress

MAGIC = b"\x89MCAP0\r\n"
SCHEMA, CHANNEL, MESSAGE, CHUNK, MESSAGE_INDEX, CHUNK_INDEX, STATISTICS = 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x0B
FOOTER, DATA_END = 0x02, 0x0F
RECORD_HEADER = struct.Struct("<BQ")  # opcode, length
MESSAGE_HEADER = struct.Struct("<BQHIQQ")  # record header + channel id, sequence, log time, publish time
_CHUNK_HEAD = struct.Struct("<QQQI")  # start time, end time, uncompressed size, crc
_U16, _U32, _U64 = struct.Struct("<H"), struct.Struct("<I"), struct.Struct("<Q")
_INDEX_PAIR = np.dtype([("time", "<u8"), ("offset", "<u8")])
WAY_OUT = "the file is damaged: leave this bag out, or try `mcap recover` on it"


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


class McapIndex:
    """Schemas, channels, chunks and message positions of one mcap file.

    Args:
        read: ``read(size, offset)`` returning exactly ``size`` bytes of the file (raising BagError otherwise).
        size: the file's size in bytes.
        where: how messages name the file (``bag B: F``).

    Raises (from the constructor):
        BagError: when the file holds no channel records or a chunk cannot be read.
    """

    def __init__(self, read: Callable[[int, int], bytes], size: int, where: str) -> None:
        self._pread, self._size, self._where = read, size, where
        self.warnings: list[str] = []
        self.schemas: dict[int, str] = {}
        self.channels: dict[int, tuple[str, int]] = {}  # id -> (topic, schema id)
        self.chunks: list[Chunk] = []
        self._chunk_indexes: list[tuple[int, int, dict[int, int]]] = []  # per chunk: index start, length, offsets
        self._counts: dict[int, int] | None = None
        self._scanned: dict[int, list[tuple[int, int, int]]] | None = None  # channel -> (time, chunk, offset)
        self._outside_chunks: int | None = None
        self._summary_problem = ""  # why the summary could not be used, when the file is damaged
        if not self._read_summary():
            self._scan_file()

    def _read_summary(self) -> bool:
        """Reads schemas, channels, chunk indexes and statistics from the summary; False when unusable."""
        footer_at = self._size - len(MAGIC) - 29
        if footer_at < len(MAGIC) or self._pread(len(MAGIC), self._size - len(MAGIC)) != MAGIC:
            self._summary_problem = "does not end with the mcap footer and closing magic (the file was cut)"
            return False
        opcode, length, summary_start, _, _ = struct.unpack("<BQQQI", self._pread(29, footer_at))
        if opcode != FOOTER or length != 20 or summary_start >= footer_at:
            self._summary_problem = "has a damaged footer"
            return False
        if summary_start < len(MAGIC):
            return False  # a complete file whose writer wrote no summary
        summary = self._pread(footer_at - summary_start, summary_start)
        position, chunk_indexes = 0, []
        while position + RECORD_HEADER.size <= len(summary):
            opcode, length = RECORD_HEADER.unpack_from(summary, position)
            body = memoryview(summary)[position + RECORD_HEADER.size : position + RECORD_HEADER.size + length]
            position += RECORD_HEADER.size + length
            if len(body) != length:
                self._summary_problem = "has a cut or damaged summary section"
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
        if not self.channels or (not chunk_indexes and declared != 0):
            return False  # nothing to go by, or messages outside chunks: scan the file instead
        for chunk, _ in chunk_indexes:
            _check_compression(self._where, chunk.compression)
        chunk_indexes.sort(key=lambda item: item[0].data_offset)
        self.chunks = [chunk for chunk, _ in chunk_indexes]
        self._chunk_indexes = [index for _, index in chunk_indexes]
        return True

    def _add_schema(self, body: _Body) -> None:
        schema_id = body.integer(_U16)
        self.schemas[schema_id] = body.string()

    def _add_channel(self, body: _Body) -> None:
        channel_id, schema_id = body.integer(_U16), body.integer(_U16)
        self.channels[channel_id] = (body.string(), schema_id)

    def _chunk_index(self, body: _Body) -> tuple[Chunk, tuple[int, int, dict[int, int]]]:
        body.position += 16  # message start and end times
        chunk_start, chunk_length = body.integer(_U64), body.integer(_U64)
        offsets = body.id_map(_U64)
        index_length = body.integer(_U64)
        compression = body.string()
        stored, size = body.integer(_U64), body.integer(_U64)
        data_offset = chunk_start + RECORD_HEADER.size + _CHUNK_HEAD.size + 4 + len(compression.encode()) + 8
        return Chunk(data_offset, stored, size, compression), (chunk_start + chunk_length, index_length, offsets)

    def _scan_file(self) -> None:
        """Finds every record by reading the file from the start (no usable summary)."""
        self._scanned = {}
        position = len(MAGIC)
        while position + RECORD_HEADER.size <= self._size:
            opcode, length = RECORD_HEADER.unpack(self._pread(RECORD_HEADER.size, position))
            body_at = position + RECORD_HEADER.size
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
        if not self.channels:
            raise BagError(f"{self._where} holds no channel records, so no topic can be read; {WAY_OUT}")
        if self._summary_problem and not self.warnings:
            self.warnings.append(
                f"{self._where} {self._summary_problem}: its summary cannot be used, so the file was read record "
                f"by record; every message before byte {position} was read, but whether the recording is "
                "complete is unknown"
            )

    def _file_chunk(self) -> int:
        """Returns the pseudo-chunk that addresses records outside chunks by their file offset."""
        if self._outside_chunks is None:
            self._outside_chunks = len(self.chunks)
            self.chunks.append(Chunk(0, self._size, self._size, ""))
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
        number = len(self.chunks)
        self.chunks.append(chunk)
        for channel_id, found in self._chunk_messages(number).items():
            self._scanned.setdefault(channel_id, []).extend(found)

    def _chunk_messages(self, number: int) -> dict[int, list[tuple[int, int, int]]]:
        """Returns ``{channel: [(log time, chunk, offset)]}`` found by reading a chunk's records (and
        registers the schemas and channels it holds)."""
        records = self.chunk_records(number)
        found: dict[int, list[tuple[int, int, int]]] = {}
        position = 0
        while position + RECORD_HEADER.size <= len(records):
            opcode, record_length = RECORD_HEADER.unpack_from(records, position)
            body = _Body(records, position + RECORD_HEADER.size)
            if opcode == MESSAGE:
                channel_id, _, log_time = struct.unpack_from("<HIQ", records, body.position)
                found.setdefault(channel_id, []).append((log_time, number, position))
            elif opcode == SCHEMA:
                self._add_schema(body)
            elif opcode == CHANNEL:
                self._add_channel(body)
            position += RECORD_HEADER.size + record_length
        return found

    def topics(self) -> dict[str, StorageTopic]:
        """Returns ``{topic: StorageTopic}``; counts from the summary's statistics (None without them)."""
        topics: dict[str, StorageTopic] = {}
        for channel_id, (name, schema_id) in sorted(self.channels.items()):
            msgtype = self.schemas.get(schema_id, "")
            count = None if self._counts is None else self._counts.get(channel_id, 0)
            known = topics.get(name)
            if known is None:
                topics[name] = StorageTopic(name, (msgtype,), count)
            else:
                known.types = tuple(dict.fromkeys((*known.types, msgtype)))
                known.count = None if known.count is None or count is None else known.count + count
        return topics

    def rows(self, channel_ids: set[int]) -> np.ndarray:
        """Returns ``(time, chunk, offset, channel)`` rows of ``channel_ids``' messages, in time then file order."""
        parts: list[np.ndarray] = []
        if self._scanned is not None:
            for channel_id in channel_ids:
                rows = np.asarray(self._scanned.get(channel_id, []), dtype=np.int64).reshape(-1, 3)
                parts.append(np.column_stack([rows, np.full(len(rows), channel_id, np.int64)]))
        else:
            for number, (start, length, offsets) in enumerate(self._chunk_indexes):
                if not offsets:  # a chunk written without message indexes: read its records
                    found = self._chunk_messages(number)
                    for channel_id in channel_ids & set(found):
                        rows = np.asarray(found[channel_id], dtype=np.int64)
                        parts.append(np.column_stack([rows, np.full(len(rows), channel_id, np.int64)]))
                    continue
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
            opcode, _ = RECORD_HEADER.unpack_from(region, at)
            found, size = struct.unpack_from("<HI", region, at + RECORD_HEADER.size)
            if opcode != MESSAGE_INDEX or found != channel_id:
                raise BagError(f"{self._where}: the message index of chunk {number} is inconsistent; {WAY_OUT}")
            pairs = np.frombuffer(region, _INDEX_PAIR, size // 16, at + RECORD_HEADER.size + 6)
            rows = np.empty((len(pairs), 4), np.int64)
            rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3] = pairs["time"], number, pairs["offset"], channel_id
            parts.append(rows)
        return parts

    def chunk_records(self, number: int, prefix: int | None = None) -> bytes:
        """Returns a chunk's records decompressed (only the first ``prefix`` bytes or more, when given)."""
        chunk = self.chunks[number]
        stored = self._pread(chunk.stored_size, chunk.data_offset)
        if not chunk.compression:
            return stored
        try:
            if prefix is not None and prefix < chunk.size:
                return _decompress_prefix(chunk.compression, stored, prefix)
            data = decompress(chunk.compression, stored)
        except BagError:
            raise
        except Exception as exc:
            raise BagError(
                f"{self._where}: chunk {number} ({chunk.compression}) does not decompress "
                f"({type(exc).__name__}: {exc}); {WAY_OUT}"
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


def group_max(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns the distinct ``keys`` and the largest value of each."""
    if len(keys) == 0:
        return keys, values
    unique, inverse = np.unique(keys, return_inverse=True)
    largest = np.full(len(unique), np.iinfo(np.int64).min)
    np.maximum.at(largest, inverse, values)
    return unique, largest
