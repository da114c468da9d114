"""Image and prompt preprocessing against the official pipeline's definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from openvla_ros.errors import ImageError, InstructionError
from openvla_ros.model.processor import (
    ImageTransform,
    build_prompt,
    center_crop_and_resize,
    normalize_model_image,
    validate_image,
)


def _image(height: int = 480, width: int = 640, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def test_pixel_values_equal_pil_bicubic_then_both_normalisations() -> None:
    image = _image()
    pixels = ImageTransform().pixel_values(image)
    assert pixels.shape == (6, 224, 224) and pixels.dtype == torch.float32
    resized = np.asarray(Image.fromarray(image).resize((224, 224), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    dino = (resized - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    siglip = (resized - 0.5) / 0.5
    np.testing.assert_allclose(pixels[:3].numpy(), dino.transpose(2, 0, 1), atol=1e-6)
    np.testing.assert_allclose(pixels[3:].numpy(), siglip.transpose(2, 0, 1), atol=1e-6)


def test_rotate_180_flips_both_axes() -> None:
    image = _image(224, 224)
    rotated = ImageTransform(rotate_180=True).model_image(image)
    np.testing.assert_array_equal(rotated, image[::-1, ::-1])


def test_center_crop_matches_tensorflow_crop_and_resize() -> None:
    tf = pytest.importorskip("tensorflow")
    image = _image(224, 224, seed=3)
    side = tf.clip_by_value(tf.sqrt(tf.constant([0.9])), 0, 1)
    offset = (1 - side) / 2
    boxes = tf.stack([offset, offset, offset + side, offset + side], axis=1)
    as_float = tf.image.convert_image_dtype(image[None], tf.float32)
    cropped = tf.image.crop_and_resize(as_float, boxes, tf.range(1), (224, 224))
    expected = tf.image.convert_image_dtype(tf.clip_by_value(cropped, 0, 1), tf.uint8, saturate=True)[0].numpy()
    ours = center_crop_and_resize(image)
    assert np.abs(ours.astype(int) - expected.astype(int)).max() <= 1
    assert np.mean(ours == expected) > 0.999
    assert not np.array_equal(ours, image)


def test_center_crop_is_applied_after_resize() -> None:
    image = _image()
    transform = ImageTransform(center_crop=True)
    np.testing.assert_array_equal(
        transform.model_image(image), center_crop_and_resize(ImageTransform().model_image(image))
    )
    assert torch.equal(transform.pixel_values(image), normalize_model_image(transform.model_image(image)))


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.zeros((32, 32, 3), np.float32), "dtype must be uint8"),
        (np.zeros((32, 32), np.uint8), r"shape HxWx3"),
        (np.zeros((32, 32, 4), np.uint8), r"shape HxWx3"),
        (np.zeros((1, 32, 3), np.uint8), "too small"),
        ([[0, 1, 2]], "numpy uint8 HxWx3"),
    ],
)
def test_bad_images_get_one_clear_error(bad, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        validate_image(bad)


def test_prompt_format_and_instruction_validation() -> None:
    # As the official code: the instruction as given, lower-cased, whitespace kept.
    assert build_prompt("  Pick up the RED block\n") == (
        "In: What action should the robot take to   pick up the red block\n?\nOut:"
    )
    assert build_prompt("  Pick up the RED block\n", strip=True) == (
        "In: What action should the robot take to pick up the red block?\nOut:"
    )
    for strip in (False, True):
        with pytest.raises(InstructionError, match="empty"):
            build_prompt(" \n ", strip=strip)
    with pytest.raises(InstructionError, match="limit is 1000"):
        build_prompt("x" * 1001)
