"""Camera messages to the policy's input: ``sensor_msgs/Image`` or ``CompressedImage`` -> RGB uint8.

A pure conversion library in the spirit of cv_bridge: functions take a message and return a
C-contiguous ``uint8`` array of shape ``(height, width, 3)`` in RGB order, or raise
:class:`ImageConversionError` saying what is wrong with the message.

Raw images are converted with the ROS install's ``cv_bridge`` when it imports and passes a self-check,
and with numpy otherwise; both give the same pixels (the numpy path validates first, so both reject the same
messages). Compressed images are decoded with OpenCV (JPEG, PNG and anything else ``cv2.imdecode``
reads), as ``image_transport``'s compressed plugin does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from openvla_ros.errors import ImageError

# Encodings of sensor_msgs/Image the policy accepts, with their channel count.
ENCODING_CHANNELS: dict[str, int] = {
    "rgb8": 3,
    "bgr8": 3,
    "rgba8": 4,
    "bgra8": 4,
    "mono8": 1,
}
SUPPORTED_ENCODINGS = tuple(ENCODING_CHANNELS)
BACKENDS = ("auto", "cv_bridge", "numpy")

_cv_bridge_state: dict[str, Any] = {}


class ImageConversionError(ImageError):
    """A camera message cannot be turned into an RGB image (encoding, size or data problem)."""


def cv_bridge_available() -> bool:
    """Returns True when the ROS install's cv_bridge imports and converts correctly (checked once, lazily).

    A cv_bridge that imports but gives wrong pixels (PyPI's ROS 1 port fails with numpy 2) is not
    used: conversions fall back to numpy and :func:`cv_bridge_status` says why.
    """
    return _cv_bridge() is not None


def cv_bridge_status() -> str:
    """Returns ``"in use"``, or why raw images are converted with numpy instead of cv_bridge."""
    _cv_bridge()
    return _cv_bridge_state["status"]


def _cv_bridge() -> Any | None:
    if "bridge" not in _cv_bridge_state:
        _cv_bridge_state["bridge"] = None
        try:
            from cv_bridge import CvBridge

            bridge = CvBridge()
        except ImportError:
            _cv_bridge_state["status"] = "cv_bridge is not installed"
        except Exception as exc:  # a broken install can fail in any way at import time
            _cv_bridge_state["status"] = f"cv_bridge failed to load ({type(exc).__name__}: {exc})"
        else:
            problem = _cv_bridge_self_check(bridge)
            _cv_bridge_state["status"] = problem or "in use"
            if problem is None:
                _cv_bridge_state["bridge"] = bridge
    return _cv_bridge_state["bridge"]


def _cv_bridge_self_check(bridge: Any) -> str | None:
    """Converts small known images with ``bridge``; returns None when it agrees with numpy, else why not."""
    from sensor_msgs.msg import Image

    pixels = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for encoding, channels in (("bgr8", 3), ("rgba8", 4), ("mono8", 1)):
        data = pixels[:, :, :channels]
        msg = Image(height=2, width=3, encoding=encoding, step=3 * channels, data=data.tobytes())
        try:
            converted = np.asarray(bridge.imgmsg_to_cv2(msg, desired_encoding="rgb8"))
        except Exception as exc:
            return f"cv_bridge failed a self-check on {encoding} ({type(exc).__name__}: {exc})"
        expected = _rows_to_rgb(data.reshape(2, -1), 3, encoding)
        if converted.shape != expected.shape or not np.array_equal(converted, expected):
            return f"cv_bridge converts {encoding} wrongly (a ROS 1 port or a numpy mismatch)"
    return None


def image_to_rgb(msg: Any, *, backend: str = "auto") -> np.ndarray:
    """Returns the pixels of a ``sensor_msgs/Image`` as RGB uint8 ``(height, width, 3)``.

    Args:
        msg: a ``sensor_msgs/Image`` with encoding rgb8, bgr8, rgba8, bgra8 or mono8. Rows may be
            padded (``step`` > width x channels); alpha is dropped, grey is replicated to RGB.
        backend: ``auto`` (cv_bridge when importable, else numpy), ``cv_bridge`` or ``numpy``.

    Raises:
        ImageConversionError: for an unsupported encoding, a zero size, a ``step`` shorter than a row,
            data whose length is not height x step, or ``backend="cv_bridge"`` without cv_bridge.
        ValueError: for an unknown backend name.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    rows = _validated_rows(msg)
    bridge = _cv_bridge() if backend in ("auto", "cv_bridge") else None
    if backend == "cv_bridge" and bridge is None:
        raise ImageConversionError(f"backend 'cv_bridge' requested but cv_bridge is not usable: {cv_bridge_status()}")
    if bridge is not None:
        try:
            converted = bridge.imgmsg_to_cv2(msg, desired_encoding="rgb8")
        except Exception as exc:  # cv_bridge raises its own CvBridgeError and cv2.error
            raise ImageConversionError(f"cv_bridge could not convert a {msg.encoding} image: {exc}") from exc
        return np.ascontiguousarray(converted, dtype=np.uint8)
    return _rows_to_rgb(rows, int(msg.width), msg.encoding)


def compressed_image_to_rgb(msg: Any) -> np.ndarray:
    """Returns the decoded pixels of a ``sensor_msgs/CompressedImage`` as RGB uint8 ``(h, w, 3)``.

    Grey images are replicated to RGB and alpha is dropped.

    Raises:
        ImageConversionError: when the data is empty or cannot be decoded (corrupt or truncated
            headers, unknown format).
    """
    import cv2

    data = np.frombuffer(msg.data, dtype=np.uint8)
    if data.size == 0:
        raise ImageConversionError(f"compressed image (format {msg.format!r}) has no data")
    try:
        decoded = cv2.imdecode(data, cv2.IMREAD_COLOR)
    except cv2.error as exc:
        decoded = None
        detail = f": {exc}"
    else:
        detail = ""
    if decoded is None:
        raise ImageConversionError(
            f"could not decode {data.size}-byte compressed image (format {msg.format!r}){detail}; "
            "the data is corrupt or not an image OpenCV can read"
        )
    return np.ascontiguousarray(cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB))


def message_to_rgb(msg: Any) -> np.ndarray:
    """Returns RGB uint8 pixels of an ``Image`` or ``CompressedImage`` (dispatching on its type).

    Raises:
        ImageConversionError: see :func:`image_to_rgb` and :func:`compressed_image_to_rgb`.
    """
    if hasattr(msg, "format") and not hasattr(msg, "encoding"):
        return compressed_image_to_rgb(msg)
    return image_to_rgb(msg)


def _validated_rows(msg: Any) -> np.ndarray:
    """Returns the message data as a (height, step) uint8 view after checking it is consistent."""
    encoding = msg.encoding
    if encoding not in ENCODING_CHANNELS:
        raise ImageConversionError(
            f"unsupported image encoding {encoding!r}; the policy accepts {', '.join(SUPPORTED_ENCODINGS)}"
        )
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height == 0 or width == 0:
        raise ImageConversionError(f"image has zero size ({width}x{height})")
    row_bytes = width * ENCODING_CHANNELS[encoding]
    if step < row_bytes:
        raise ImageConversionError(
            f"step {step} is shorter than one row of a {width}-pixel {encoding} image ({row_bytes} bytes)"
        )
    data = np.frombuffer(msg.data, dtype=np.uint8)
    if data.size != height * step:
        raise ImageConversionError(
            f"{encoding} image {width}x{height} with step {step} needs {height * step} bytes of data, "
            f"got {data.size}"
        )
    return data.reshape(height, step)


def _rows_to_rgb(rows: np.ndarray, width: int, encoding: str) -> np.ndarray:
    """Returns RGB pixels from validated (height, step) rows, dropping any row padding."""
    channels = ENCODING_CHANNELS[encoding]
    height = rows.shape[0]
    pixels = rows[:, : width * channels].reshape(height, width, channels)
    if encoding == "rgb8":
        rgb = pixels
    elif encoding == "bgr8":
        rgb = pixels[..., ::-1]
    elif encoding == "rgba8":
        rgb = pixels[..., :3]
    elif encoding == "bgra8":
        rgb = pixels[..., 2::-1]
    else:  # mono8
        rgb = np.repeat(pixels, 3, axis=2)
    return np.ascontiguousarray(rgb)
