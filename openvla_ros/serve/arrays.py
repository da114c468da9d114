"""Arrays on the wire as json-numpy writes them: ``{"__numpy__": base64 bytes, "dtype": descr, "shape": [...]}``.

Clients written for OpenVLA's ``deploy.py`` send images this way (``json_numpy.patch()`` before ``requests``)
and read the action back the same way. Decoding here accepts only plain numeric dtypes and checks that
the bytes fit the shape, so a request can never make the server build an object array.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np

# Little-endian or byte-order-free numeric dtypes a request may carry.
_DTYPES = {"|u1": np.uint8, "<f4": np.float32, "<f8": np.float64, "<f2": np.float16, "<i4": np.int32,
           "<i8": np.int64, "|b1": np.bool_}


class ArrayFormatError(ValueError):
    """A field that should hold a json-numpy array does not."""


def is_encoded_array(value: Any) -> bool:
    return isinstance(value, dict) and "__numpy__" in value


def decode_array(value: Any, field: str) -> np.ndarray:
    """Returns the array a json-numpy object encodes (a plain JSON list of numbers is accepted too).

    Raises:
        ArrayFormatError: naming ``field``, for anything else.
    """
    if isinstance(value, list):
        try:
            array = np.asarray(value)
        except ValueError as exc:
            raise ArrayFormatError(f"{field} is a ragged list: {exc}") from exc
        if array.dtype.kind not in "biuf":
            raise ArrayFormatError(f"{field} must hold numbers, got {array.dtype}")
        return array
    if not is_encoded_array(value):
        raise ArrayFormatError(f"{field} must be a json-numpy array ({{'__numpy__': ..., 'dtype': ..., 'shape': ...}}: "
                               f"call json_numpy.patch() before sending), got {type(value).__name__}")
    descr, shape = value.get("dtype"), value.get("shape")
    if descr not in _DTYPES:
        raise ArrayFormatError(f"{field} has dtype {descr!r}; accepted: {', '.join(sorted(_DTYPES))}")
    if not isinstance(shape, list) or not all(isinstance(side, int) and side >= 0 for side in shape):
        raise ArrayFormatError(f"{field} has an invalid shape {shape!r}")
    try:
        data = base64.b64decode(value["__numpy__"], validate=True)
    except (binascii.Error, TypeError, ValueError) as exc:
        raise ArrayFormatError(f"{field} holds invalid base64 data: {exc}") from exc
    dtype = np.dtype(_DTYPES[descr])
    count = int(np.prod(shape)) if shape else 1
    if len(data) != count * dtype.itemsize:
        raise ArrayFormatError(f"{field} holds {len(data)} bytes, its shape {shape} and dtype {descr} need "
                               f"{count * dtype.itemsize}")
    array = np.frombuffer(data, dtype=dtype)
    return array.reshape(shape) if shape else array[0]


def encode_array(array: np.ndarray) -> dict[str, Any]:
    """Returns the json-numpy object of ``array`` (what ``json_numpy.loads`` turns back into it)."""
    array = np.ascontiguousarray(array)
    return {"__numpy__": base64.b64encode(array.tobytes()).decode("ascii"),
            "dtype": np.lib.format.dtype_to_descr(array.dtype), "shape": list(array.shape)}
