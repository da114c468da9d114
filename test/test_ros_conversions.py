"""Camera message conversion: every supported encoding, padded rows, compressed images, bad input.

References: an RGB array built independently of the code under test, rosbags-image's conversion
(``message_to_cvimage``) and, where a ROS install provides it, cv_bridge.
"""

from __future__ import annotations

import sys

import cv2
import numpy as np
import pytest
from rosbags.image import message_to_cvimage
from sensor_msgs.msg import CompressedImage, Image

from openvla_ros.errors import ImageError, OpenVLAError
from openvla_ros.ros.ros_conversions import (
    SUPPORTED_ENCODINGS,
    ImageConversionError,
    compressed_image_to_rgb,
    cv_bridge_available,
    image_to_rgb,
    message_to_rgb,
)

HEIGHT, WIDTH = 6, 5


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)


def encode(rgb: np.ndarray, encoding: str, padding: int = 0) -> Image:
    """Builds an Image message of ``rgb`` in ``encoding`` (mono8 uses the red channel as grey)."""
    if encoding == "rgb8":
        pixels = rgb
    elif encoding == "bgr8":
        pixels = rgb[..., ::-1]
    elif encoding == "rgba8":
        pixels = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 200, np.uint8)], axis=2)
    elif encoding == "bgra8":
        pixels = np.concatenate([rgb[..., ::-1], np.full(rgb.shape[:2] + (1,), 7, np.uint8)], axis=2)
    elif encoding == "mono8":
        pixels = rgb[..., :1]
    else:
        raise AssertionError(encoding)
    rows = pixels.reshape(rgb.shape[0], -1)
    rows = np.concatenate([rows, np.full((rows.shape[0], padding), 99, np.uint8)], axis=1)
    message = Image(height=rgb.shape[0], width=rgb.shape[1], encoding=encoding, step=rows.shape[1])
    message.data = rows.tobytes()
    return message


def expected_rgb(rgb: np.ndarray, encoding: str) -> np.ndarray:
    return np.repeat(rgb[..., :1], 3, axis=2) if encoding == "mono8" else rgb


@pytest.mark.parametrize("encoding", SUPPORTED_ENCODINGS)
def test_every_encoding_gives_the_same_rgb_pixels(rgb: np.ndarray, encoding: str) -> None:
    converted = image_to_rgb(encode(rgb, encoding), backend="numpy")
    assert converted.dtype == np.uint8
    assert converted.shape == (HEIGHT, WIDTH, 3)
    assert converted.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(converted, expected_rgb(rgb, encoding))


@pytest.mark.parametrize("encoding", SUPPORTED_ENCODINGS)
def test_numpy_conversion_matches_rosbags_image(rgb: np.ndarray, encoding: str) -> None:
    message = encode(rgb, encoding)
    reference = message_to_cvimage(message, "rgb8")
    np.testing.assert_array_equal(image_to_rgb(message, backend="numpy"), reference)


@pytest.mark.parametrize("encoding", SUPPORTED_ENCODINGS)
def test_padded_rows_are_cropped(rgb: np.ndarray, encoding: str) -> None:
    message = encode(rgb, encoding, padding=3)
    assert len(message.data) == HEIGHT * message.step > HEIGHT * WIDTH * (1 if encoding == "mono8" else 3)
    np.testing.assert_array_equal(image_to_rgb(message, backend="numpy"), expected_rgb(rgb, encoding))


@pytest.mark.parametrize("encoding", SUPPORTED_ENCODINGS)
def test_cv_bridge_gives_the_same_pixels(rgb: np.ndarray, encoding: str) -> None:
    if not cv_bridge_available():
        pytest.skip("cv_bridge is not importable here (it comes with a ROS install)")
    message = encode(rgb, encoding)
    np.testing.assert_array_equal(
        image_to_rgb(message, backend="cv_bridge"), image_to_rgb(message, backend="numpy")
    )


def test_auto_backend_equals_numpy_backend(rgb: np.ndarray) -> None:
    message = encode(rgb, "bgra8")
    np.testing.assert_array_equal(image_to_rgb(message), image_to_rgb(message, backend="numpy"))
    np.testing.assert_array_equal(message_to_rgb(message), rgb)


def test_cv_bridge_backend_without_cv_bridge_is_a_clear_error(rgb: np.ndarray) -> None:
    if cv_bridge_available():
        pytest.skip("cv_bridge is importable here")
    with pytest.raises(ImageConversionError, match="cv_bridge is not usable"):
        image_to_rgb(encode(rgb, "rgb8"), backend="cv_bridge")
    with pytest.raises(ValueError, match="backend must be one of"):
        image_to_rgb(encode(rgb, "rgb8"), backend="pil")


@pytest.mark.parametrize("encoding", ["16UC1", "mono16", "yuv422", "bayer_rggb8", "32FC1", ""])
def test_unsupported_encodings_are_rejected_by_name(rgb: np.ndarray, encoding: str) -> None:
    message = encode(rgb, "rgb8")
    message.encoding = encoding
    with pytest.raises(ImageConversionError, match=f"unsupported image encoding '{encoding}'"):
        image_to_rgb(message)


def test_data_length_must_match_height_times_step(rgb: np.ndarray) -> None:
    message = encode(rgb, "rgb8")
    message.data = bytes(message.data)[:-1]
    with pytest.raises(ImageConversionError, match=r"needs 90 bytes of data, got 89"):
        image_to_rgb(message)
    message = encode(rgb, "rgb8")
    message.height = HEIGHT + 1
    with pytest.raises(ImageConversionError, match="needs 105 bytes"):
        image_to_rgb(message)


def test_step_shorter_than_a_row_and_zero_size_are_rejected(rgb: np.ndarray) -> None:
    message = encode(rgb, "rgba8")
    message.step = WIDTH * 3
    with pytest.raises(ImageConversionError, match="shorter than one row"):
        image_to_rgb(message)
    empty = Image(height=0, width=WIDTH, encoding="rgb8", step=WIDTH * 3)
    with pytest.raises(ImageConversionError, match="zero size"):
        image_to_rgb(empty)


def test_conversion_error_belongs_to_the_core_error_family() -> None:
    assert issubclass(ImageConversionError, ImageError)
    assert issubclass(ImageConversionError, OpenVLAError)


def compressed(data: bytes, fmt: str) -> CompressedImage:
    message = CompressedImage(format=fmt)
    message.data = data
    return message


def test_png_decodes_losslessly_to_rgb(rgb: np.ndarray) -> None:
    ok, png = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    assert ok
    message = compressed(png.tobytes(), "rgb8; png compressed bgr8")
    np.testing.assert_array_equal(compressed_image_to_rgb(message), rgb)
    np.testing.assert_array_equal(message_to_rgb(message), rgb)
    np.testing.assert_array_equal(message_to_rgb(message), message_to_cvimage(message, "rgb8"))


def test_jpeg_decodes_close_to_the_original() -> None:
    smooth = np.zeros((32, 48, 3), np.uint8)
    smooth[..., 0] = 200  # a flat red image survives JPEG almost exactly
    smooth[..., 2] = 30
    ok, jpeg = cv2.imencode(".jpg", smooth[..., ::-1].copy(), [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    decoded = compressed_image_to_rgb(compressed(jpeg.tobytes(), "jpeg"))
    assert decoded.shape == (32, 48, 3)
    assert np.abs(decoded.astype(int) - smooth.astype(int)).max() <= 3
    assert decoded[..., 0].mean() > 190, "channels must come out in RGB order"


def test_grey_png_is_replicated_to_rgb(rgb: np.ndarray) -> None:
    grey = rgb[..., 0].copy()
    ok, png = cv2.imencode(".png", grey)
    assert ok
    np.testing.assert_array_equal(
        compressed_image_to_rgb(compressed(png.tobytes(), "png")), np.stack([grey] * 3, 2)
    )


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image at all", b"\xff\xd8\xff\xe0" + b"\x00" * 40, b"\x89PNG\r\n\x1a\n" + b"\x01" * 30],
    ids=["empty", "text", "jpeg-header-only", "png-header-only"],
)
def test_corrupt_compressed_images_are_rejected(data: bytes) -> None:
    with pytest.raises(ImageConversionError, match="no data|could not decode"):
        compressed_image_to_rgb(compressed(data, "jpeg"))


def test_a_cv_bridge_that_converts_wrongly_is_not_used(rgb: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    """PyPI's ROS 1 cv_bridge port imports but fails with numpy 2: the numpy path must take over."""
    import types

    from openvla_ros.ros import ros_conversions

    class SwappedChannelsBridge:  # what a broken port does: hands back the raw channel order
        def imgmsg_to_cv2(self, msg, desired_encoding="passthrough"):
            return np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.width, -1)

    monkeypatch.setitem(sys.modules, "cv_bridge", types.SimpleNamespace(CvBridge=SwappedChannelsBridge))
    monkeypatch.setattr(ros_conversions, "_cv_bridge_state", {})
    assert not cv_bridge_available()
    assert "converts bgr8 wrongly" in ros_conversions.cv_bridge_status()
    np.testing.assert_array_equal(image_to_rgb(encode(rgb, "bgr8")), rgb)
    with pytest.raises(ImageConversionError, match="not usable: cv_bridge converts bgr8 wrongly"):
        image_to_rgb(encode(rgb, "bgr8"), backend="cv_bridge")
