"""Image and prompt preprocessing, identical at inference and in training.

Images: uint8 HxWx3 RGB -> optional 180 degree rotation -> PIL bicubic resize to the model's size
(aspect ratio not kept, as the official ``resize-naive`` strategy) -> optional centre crop of 90% area
(TensorFlow ``crop_and_resize`` reproduced in numpy) -> x / 255 -> DINOv2 and SigLIP normalisations
stacked to [6, S, S].

Prompts: ``In: What action should the robot take to {instruction}?\\nOut:`` tokenised with BOS, with
the bare-space token appended as the official inference code does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from openvla_ros.errors import ImageError, InstructionError

DINOV2_MEAN = (0.485, 0.456, 0.406)
DINOV2_STD = (0.229, 0.224, 0.225)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
CENTER_CROP_AREA = 0.9
BARE_SPACE_TOKEN_ID = 29871
MAX_INSTRUCTION_CHARS = 1000
PROMPT_TEMPLATE = "In: What action should the robot take to {instruction}?\nOut:"


def validate_image(image: np.ndarray) -> np.ndarray:
    """Returns ``image`` as a C-contiguous uint8 HxWx3 array.

    Raises:
        ImageError: when it is not a numpy uint8 array of shape HxWx3 with H, W >= 2.
    """
    if not isinstance(image, np.ndarray):
        raise ImageError(
            f"image must be a numpy uint8 HxWx3 RGB array, got {type(image).__name__}; "
            "convert with np.asarray(pil_image.convert('RGB'))"
        )
    if image.dtype != np.uint8:
        raise ImageError(
            f"image dtype must be uint8, got {image.dtype}; scale float images to 0..255 and cast to uint8"
        )
    if image.ndim != 3 or image.shape[2] != 3:
        raise ImageError(
            f"image must have shape HxWx3 (RGB), got {image.shape}; convert grey or RGBA images to RGB first"
        )
    if image.shape[0] < 2 or image.shape[1] < 2:
        raise ImageError(f"image is too small: {image.shape[1]}x{image.shape[0]} pixels")
    return np.ascontiguousarray(image)


def center_crop_and_resize(image: np.ndarray, area_fraction: float = CENTER_CROP_AREA) -> np.ndarray:
    """Returns the central crop holding ``area_fraction`` of the image, resized back to the same size.

    Reproduces OpenVLA's evaluation crop: TensorFlow ``crop_and_resize`` (bilinear, float32 on x / 255)
    of the centred box with side ``sqrt(area_fraction)``, then conversion back to uint8 as
    ``tf.image.convert_image_dtype(..., saturate=True)`` does.
    """
    side = np.float32(np.sqrt(area_fraction))
    offset = (np.float32(1.0) - side) / np.float32(2.0)
    return crop_and_resize(image, (offset, offset, offset + side, offset + side))


def crop_and_resize(image: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """Returns the crop ``box = (top, left, bottom, right)`` (fractions of the image) resized to the image size.

    Bilinear sampling in float32 exactly as TensorFlow's ``crop_and_resize``; the same function serves
    the random crops of training and the centre crop of inference.

    Raises:
        ImageError: when ``image`` is not a uint8 HxWx3 array.
    """
    image = validate_image(image)
    height, width = image.shape[:2]
    y1, x1, y2, x2 = (np.float32(v) for v in box)
    pixels = image.astype(np.float32) * np.float32(1.0 / 255.0)

    def sample_points(start: np.float32, end: np.float32, in_size: int, out_size: int) -> np.ndarray:
        scale = (end - start) * np.float32(in_size - 1) / np.float32(out_size - 1)
        return start * np.float32(in_size - 1) + np.arange(out_size, dtype=np.float32) * scale

    ys = sample_points(y1, y2, height, height)
    xs = sample_points(x1, x2, width, width)
    y0 = np.floor(ys).astype(np.int64)
    x0 = np.floor(xs).astype(np.int64)
    y1i = np.minimum(y0 + 1, height - 1)
    x1i = np.minimum(x0 + 1, width - 1)
    wy = (ys - y0).astype(np.float32)[:, None, None]
    wx = (xs - x0).astype(np.float32)[None, :, None]
    top_rows, bottom_rows = pixels[y0], pixels[y1i]
    top = top_rows[:, x0] + (top_rows[:, x1i] - top_rows[:, x0]) * wx
    bottom = bottom_rows[:, x0] + (bottom_rows[:, x1i] - bottom_rows[:, x0]) * wx
    cropped = np.clip(top + (bottom - top) * wy, 0.0, 1.0)
    return np.clip(cropped * np.float32(255.5), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class ImageTransform:
    """The image path into the model, shared by the policy, the dataset converter and training.

    Attributes:
        image_size: side of the square model input (224 for OpenVLA).
        center_crop: take the centre 90%-area crop (use with models trained with random crops).
        rotate_180: rotate the camera image by 180 degrees first (upside-down mounted cameras).
    """

    image_size: int = 224
    center_crop: bool = False
    rotate_180: bool = False

    def __post_init__(self) -> None:
        if self.image_size < 2:
            raise ValueError(f"image_size must be >= 2, got {self.image_size}")

    def model_image(self, image: np.ndarray) -> np.ndarray:
        """Returns the uint8 [S, S, 3] image the model sees (rotated, resized, optionally cropped).

        Raises:
            ImageError: when ``image`` is not a uint8 HxWx3 array.
        """
        image = validate_image(image)
        if self.rotate_180:
            image = np.ascontiguousarray(image[::-1, ::-1])
        size = (self.image_size, self.image_size)
        if image.shape[:2] != size:
            image = np.array(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))
        if self.center_crop:
            image = center_crop_and_resize(image)
        return image

    def pixel_values(self, image: np.ndarray) -> torch.Tensor:
        """Returns the float32 [6, S, S] model input: DINOv2-normalised then SigLIP-normalised RGB.

        Raises:
            ImageError: when ``image`` is not a uint8 HxWx3 array.
        """
        return normalize_model_image(self.model_image(image))


def normalize_model_image(model_image: np.ndarray) -> torch.Tensor:
    """Returns the [6, S, S] float32 tensor of an already resized uint8 [S, S, 3] image."""
    pixels = torch.from_numpy(np.ascontiguousarray(model_image)).permute(2, 0, 1).to(torch.float32) / 255.0
    dino = (pixels - _channel_tensor(DINOV2_MEAN)) / _channel_tensor(DINOV2_STD)
    siglip = (pixels - _channel_tensor(SIGLIP_MEAN)) / _channel_tensor(SIGLIP_STD)
    return torch.cat([dino, siglip], dim=0)


def _channel_tensor(values: Sequence[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(3, 1, 1)


def validate_instruction(instruction: str, max_chars: int = MAX_INSTRUCTION_CHARS) -> str:
    """Returns the stripped instruction.

    Raises:
        InstructionError: when it is not a string, is empty or is longer than ``max_chars``.
    """
    if not isinstance(instruction, str):
        raise InstructionError(f"instruction must be a string, got {type(instruction).__name__}")
    text = instruction.strip()
    if not text:
        raise InstructionError("instruction is empty; say what the robot should do, e.g. 'pick up the cup'")
    if len(text) > max_chars:
        raise InstructionError(
            f"instruction is {len(text)} characters long, the limit is {max_chars}; shorten it"
        )
    return text


def build_prompt(instruction: str) -> str:
    """Returns the official OpenVLA prompt for an instruction (lower-cased, without trailing space).

    Raises:
        InstructionError: when the instruction is empty or too long.
    """
    return PROMPT_TEMPLATE.format(instruction=validate_instruction(instruction).lower())


def prompt_token_ids(tokenizer, instruction: str) -> list[int]:
    """Returns the prompt ids with BOS, ending in the bare-space id 29871 as the model was trained.

    The id is appended only when the tokenizer's vocabulary contains it (>= 29872 ids).

    Raises:
        InstructionError: when the instruction is empty or too long.
    """
    ids = list(tokenizer(build_prompt(instruction), add_special_tokens=True)["input_ids"])
    if len(tokenizer) > BARE_SPACE_TOKEN_ID and ids[-1] != BARE_SPACE_TOKEN_ID:
        ids.append(BARE_SPACE_TOKEN_ID)
    return ids
