"""Camera messages straight from their CDR bytes to numpy, without building a message object.

ROS 2 stores ``sensor_msgs/Image`` and ``sensor_msgs/CompressedImage`` in bags as CDR: a 4-byte
encapsulation header, then the fields in order, each aligned to its own size (counted from the end
of the header); a string is a uint32 length (with its NUL) and the bytes; a ``uint8[]`` is a uint32
length and the bytes. Parsing the few fixed fields in front of the pixel data is enough to view that
data as an array in place.

:func:`image_array` gives the pixels in the message's own encoding (what ``rosbags-image``'s
``message_to_cvimage(msg)`` gives); :func:`image_rgb` and :func:`compressed_rgb` give the RGB uint8
image the converter stores (8-bit encodings exactly as the policy node converts them; 16-bit ones
scaled as ``cv_bridge`` and ``rosbags-image`` convert to ``rgb8``). Every problem raises
:class:`CdrError` saying what is wrong.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

import numpy as np

from openvla_ros.errors import ImageError

# Encapsulation ids of plain CDR (XCDR1), which ROS 2 middlewares write for ROS messages.
_LITTLE_ENDIAN_ID = 0x0001
_BIG_ENDIAN_ID = 0x0000
_HEADER_BYTES = 4

# encoding -> (numpy dtype name, channels, channel order of R, G, B, or None for grey)
_NAMED_ENCODINGS: dict[str, tuple[str, int, tuple[int, int, int] | None]] = {
    "rgb8": ("uint8", 3, (0, 1, 2)),
    "bgr8": ("uint8", 3, (2, 1, 0)),
    "rgba8": ("uint8", 4, (0, 1, 2)),
    "bgra8": ("uint8", 4, (2, 1, 0)),
    "mono8": ("uint8", 1, None),
    "rgb16": ("uint16", 3, (0, 1, 2)),
    "bgr16": ("uint16", 3, (2, 1, 0)),
    "rgba16": ("uint16", 4, (0, 1, 2)),
    "bgra16": ("uint16", 4, (2, 1, 0)),
    "mono16": ("uint16", 1, None),
}
RGB_ENCODINGS = tuple(_NAMED_ENCODINGS)
_GENERIC_ENCODING = re.compile(r"(8U|8S|16U|16S|32S|32F|64F)(?:C([0-9]+))?")
_GENERIC_DTYPES = {"8U": "uint8", "8S": "int8", "16U": "uint16", "16S": "int16", "32S": "int32",
                   "32F": "float32", "64F": "float64"}


class CdrError(ImageError):
    """The bytes are not a well-formed CDR camera message, or its encoding cannot be converted."""


@dataclass(frozen=True)
class ImageLayout:
    """The fixed fields of a serialised ``sensor_msgs/Image`` and where its pixel bytes lie."""

    height: int
    width: int
    encoding: str
    is_bigendian: bool
    step: int
    data_offset: int
    data_length: int


class CdrReader:
    """Reads aligned CDR fields in order from a serialised message; raises CdrError past its end."""

    def __init__(self, data: bytes | memoryview) -> None:
        if len(data) < _HEADER_BYTES:
            raise CdrError(f"{len(data)} bytes are too short for a CDR message")
        kind = int.from_bytes(bytes(data[:2]), "big")
        if kind not in (_LITTLE_ENDIAN_ID, _BIG_ENDIAN_ID):
            raise CdrError(f"CDR encapsulation 0x{kind:04x} is not plain CDR (XCDR2 and parameter lists are not read)")
        self.order = "<" if kind == _LITTLE_ENDIAN_ID else ">"
        self._uint32 = struct.Struct(self.order + "I")
        self._float64 = struct.Struct(self.order + "d")
        self.data = data
        self.position = _HEADER_BYTES

    def _take(self, size: int, align: int) -> int:
        """Aligns to ``align``, checks that ``size`` bytes follow, and returns where they start."""
        self.position += -(self.position - _HEADER_BYTES) % align
        start = self.position
        if start + size > len(self.data):
            raise CdrError(f"CDR message ends after {len(self.data)} bytes, inside a field at byte {start}")
        self.position = start + size
        return start

    def uint32(self) -> int:
        return self._uint32.unpack_from(self.data, self._take(4, 4))[0]

    def uint8(self) -> int:
        return self.data[self._take(1, 1)]

    def float64(self) -> float:
        return self._float64.unpack_from(self.data, self._take(8, 8))[0]

    def float32(self) -> float:
        return struct.unpack_from(self.order + "f", self.data, self._take(4, 4))[0]

    def float64_array(self, count: int) -> np.ndarray:
        """Returns ``count`` float64 values (a copy in native byte order)."""
        start = self._take(8 * count, 8) if count else self.position
        return np.frombuffer(self.data, np.dtype(self.order + "f8"), count, start).astype(np.float64)

    def float64_sequence(self) -> np.ndarray:
        return self.float64_array(self.uint32())

    def string(self) -> str:
        size = self.uint32()
        start = self._take(size, 1)
        return bytes(self.data[start : start + size]).rstrip(b"\x00").decode("utf-8", errors="replace")

    def byte_sequence(self) -> tuple[int, int]:
        """Returns ``(offset, length)`` of a ``uint8[]`` field and moves past it."""
        size = self.uint32()
        return self._take(size, 1), size

    def skip_header(self) -> None:
        """Moves past a ``std_msgs/Header`` (stamp seconds, nanoseconds, frame id)."""
        self.uint32()
        self.uint32()
        self.string()


def image_layout(data: bytes | memoryview) -> ImageLayout:
    """Returns the fixed fields of a serialised ``sensor_msgs/Image``.

    Raises:
        CdrError: when the bytes are not a complete CDR ``Image``.
    """
    cursor = CdrReader(data)
    cursor.skip_header()
    height, width = cursor.uint32(), cursor.uint32()
    encoding = cursor.string()
    is_bigendian = bool(cursor.uint8())
    step = cursor.uint32()
    offset, length = cursor.byte_sequence()
    return ImageLayout(height, width, encoding, is_bigendian, step, offset, length)


def compressed_payload(data: bytes | memoryview) -> tuple[str, memoryview]:
    """Returns ``(format, compressed bytes)`` of a serialised ``sensor_msgs/CompressedImage``.

    Raises:
        CdrError: when the bytes are not a complete CDR ``CompressedImage``.
    """
    cursor = CdrReader(data)
    cursor.skip_header()
    image_format = cursor.string()
    offset, length = cursor.byte_sequence()
    return image_format, memoryview(data)[offset : offset + length]


def _dtype_and_channels(encoding: str) -> tuple[str, int]:
    named = _NAMED_ENCODINGS.get(encoding)
    if named is not None:
        return named[0], named[1]
    generic = _GENERIC_ENCODING.fullmatch(encoding)
    if generic is not None:
        return _GENERIC_DTYPES[generic.group(1)], int(generic.group(2) or 1)
    raise CdrError(
        f"unsupported image encoding {encoding!r}; supported: {', '.join(RGB_ENCODINGS)} and nUCm-style encodings"
    )


def _pixels(data: bytes | memoryview, layout: ImageLayout, dtype_name: str, channels: int) -> np.ndarray:
    """Returns the (height, width[, channels]) pixel view, dropping row padding and fixing byte order."""
    height, width, step = layout.height, layout.width, layout.step
    if height == 0 or width == 0:
        raise CdrError(f"image has zero size ({width}x{height})")
    dtype = np.dtype(dtype_name).newbyteorder(">" if layout.is_bigendian else "<")
    row_bytes = width * channels * dtype.itemsize
    if step < row_bytes:
        raise CdrError(f"step {step} is shorter than one row of a {width}-pixel {layout.encoding} image ({row_bytes} bytes)")
    if layout.data_length != height * step:
        raise CdrError(
            f"{layout.encoding} image {width}x{height} with step {step} needs {height * step} bytes of data, "
            f"got {layout.data_length}"
        )
    rows = np.frombuffer(data, dtype=np.uint8, count=layout.data_length, offset=layout.data_offset)
    rows = rows.reshape(height, step)[:, :row_bytes]
    if step != row_bytes and dtype.itemsize > 1:
        rows = np.ascontiguousarray(rows)
    pixels = rows.view(dtype).reshape((height, width) if channels == 1 else (height, width, channels))
    if not pixels.dtype.isnative:
        pixels = pixels.astype(pixels.dtype.newbyteorder("="))
    return pixels


def image_array(data: bytes | memoryview) -> np.ndarray:
    """Returns the pixels of a serialised ``sensor_msgs/Image`` in its own encoding and native byte order.

    Shape ``(height, width)`` for one channel, else ``(height, width, channels)``; row padding is dropped.
    The array may share memory with ``data``.

    Raises:
        CdrError: for malformed bytes, an unknown encoding or data that does not match the size fields.
    """
    layout = image_layout(data)
    dtype_name, channels = _dtype_and_channels(layout.encoding)
    return _pixels(data, layout, dtype_name, channels)


def image_rgb(data: bytes | memoryview) -> np.ndarray:
    """Returns a serialised ``sensor_msgs/Image`` as a C-contiguous RGB uint8 ``(height, width, 3)`` array.

    Alpha is dropped and grey is replicated; 16-bit values ``v`` become ``int(v * 255 / 65535)``
    (``cv_bridge``'s and ``rosbags-image``'s ``rgb8`` conversion).

    Raises:
        CdrError: for malformed bytes, an encoding other than those in :data:`RGB_ENCODINGS`, or data
            that does not match the size fields.
    """
    layout = image_layout(data)
    named = _NAMED_ENCODINGS.get(layout.encoding)
    if named is None:
        raise CdrError(f"unsupported image encoding {layout.encoding!r}; the converter accepts {', '.join(RGB_ENCODINGS)}")
    dtype_name, channels, order = named
    pixels = _pixels(data, layout, dtype_name, channels)
    if order is None:
        rgb = np.repeat(pixels[:, :, None], 3, axis=2)
    elif order == (0, 1, 2):
        rgb = pixels[:, :, :3]
    else:
        rgb = pixels[:, :, 2::-1]
    if rgb.dtype != np.uint8:
        return np.multiply(rgb, 255.0 / 65535.0).astype(np.uint8)
    return np.ascontiguousarray(rgb)


def compressed_rgb(data: bytes | memoryview) -> np.ndarray:
    """Returns a serialised ``sensor_msgs/CompressedImage`` decoded to RGB uint8 ``(height, width, 3)``.

    Decoded with OpenCV (JPEG, PNG and whatever else ``cv2.imdecode`` reads), as the policy node does.

    Raises:
        CdrError: for malformed bytes, empty data or data OpenCV cannot decode.
    """
    import cv2

    image_format, payload = compressed_payload(data)
    if len(payload) == 0:
        raise CdrError(f"compressed image (format {image_format!r}) has no data")
    rgb_flag = getattr(cv2, "IMREAD_COLOR_RGB", None)  # OpenCV >= 4.10 decodes to RGB directly (same pixels)
    buffer = np.frombuffer(payload, dtype=np.uint8)
    decoded = cv2.imdecode(buffer, cv2.IMREAD_COLOR if rgb_flag is None else rgb_flag)
    if decoded is None:
        raise CdrError(
            f"could not decode {len(payload)}-byte compressed image (format {image_format!r}); the data is corrupt "
            "or not an image OpenCV can read"
        )
    return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB) if rgb_flag is None else decoded
