"""What every part of the bag reader shares: its error, the storage's topic record, the stream entry
and the message decompression. The storage readers (:mod:`~openvla_ros.dataset.bag_sqlite`,
:mod:`~openvla_ros.dataset.bag_mcap`, :mod:`~openvla_ros.dataset.mcap_index`), the layout
(:mod:`~openvla_ros.dataset.bag_layout`) and :mod:`~openvla_ros.dataset.bag_storage` import this module
and not each other, so the reader's modules form no import circle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from openvla_ros.errors import DatasetError

Entry = tuple[int, str, Any, "bytes | None"]


# The first bytes of every zstd frame (RFC 8878), little-endian 0xFD2FB528.
ZSTD_FRAME_MAGIC = b"\x28\xb5\x2f\xfd"


class BagError(DatasetError):
    """A bag cannot be read: missing or damaged files, unreadable metadata, an unsupported storage feature.

    Messages name the bag (or its file), the topic where one is involved, and the way out.
    """


@dataclass
class StorageTopic:
    """One topic as a storage file records it.

    Attributes:
        name: the topic name.
        types: the message types recorded for it (more than one only in a damaged or odd bag).
        count: the number of messages the storage declares, or None when it keeps no count.
    """

    name: str
    types: tuple[str, ...]
    count: int | None

    @property
    def msgtype(self) -> str:
        """The message type (the first one when several were recorded)."""
        return self.types[0] if self.types else ""


def decompress(compression: str, data: bytes | memoryview) -> bytes:
    """Returns ``data`` decompressed with ``compression`` (``zstd`` or ``lz4`` frames).

    Raises:
        ValueError: for another compression; the libraries' errors for damaged data.
    """
    if compression == "zstd":
        from backports import zstd

        return zstd.decompress(data)
    if compression == "lz4":
        import lz4.frame

        return lz4.frame.decompress(data)
    raise ValueError(f"unknown compression {compression!r}")
