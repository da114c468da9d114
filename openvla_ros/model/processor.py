"""Image and prompt preprocessing, identical at inference and in training.

Images: uint8 HxWx3 RGB -> optional 180 degree rotation -> PIL resize to the model's size with the
checkpoint's resize strategy and interpolation (official default ``resize-naive``, bicubic: aspect ratio
not kept) -> optional centre crop of 90% area (TensorFlow ``crop_and_resize`` reproduced in numpy) ->
x / 255 -> one normalisation per vision tower (DINOv2 then SigLIP), stacked to [6, S, S]. The
normalisation constants, sizes, strategy and interpolation come from the checkpoint's
``preprocessor_config.json`` as the official processor applies them: its ``tvf_*`` fields (resize,
crop, normalisation, letterbox) win over ``means``/``stds``/``interpolations`` where both are present
(checkpoints saved by the original training code keep the textbook ``means`` but normalise with the
DINOv2 constants rounded to bfloat16 in ``tvf_normalize_params``); :data:`DEFAULT_IMAGE_SETTINGS` holds
the textbook values used when a checkpoint has no such file.

Prompts: ``In: What action should the robot take to {instruction}?\\nOut:`` tokenised with BOS, with
the bare-space token appended as the official inference code does. The instruction is lower-cased and
otherwise taken as given, as the official code does (``strip=True`` removes surrounding whitespace).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

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
# Literal special-token text (after the prompt's lower-casing) is tokenised differently by the
# official fast tokenizer and ours.
SPECIAL_TOKEN_TEXTS = ("<s>", "</s>", "<unk>")
RESIZE_STRATEGIES = ("resize-naive", "letterbox", "resize-crop")
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
# ``tvf_resize_params[i]["interpolation"]`` holds PIL's integer filter code (torchvision's
# ``pil_modes_mapping``), e.g. 3 for bicubic.
INTERPOLATION_BY_CODE = {int(code): name for name, code in INTERPOLATIONS.items()}


@dataclass(frozen=True)
class ImageSettings:
    """How camera images become model input: the settings of the official image processor.

    Attributes:
        image_size: side of the square model input (224 for OpenVLA).
        resize_strategy: ``resize-naive`` (stretch to a square, OpenVLA's), ``letterbox`` (pad to a
            square with the first tower's mean colour, then resize) or ``resize-crop`` (resize the short
            side, then take the centre square).
        interpolation: PIL resampling filter name (``bicubic`` for OpenVLA).
        means, stds: one RGB triple per vision tower, in tower order (DINOv2 then SigLIP when fused).
        letterbox_fill: the padding colour of ``letterbox`` (uint8 RGB); None takes the last tower's
            mean colour, as the official processor does.
    """

    image_size: int = 224
    resize_strategy: str = "resize-naive"
    interpolation: str = "bicubic"
    means: tuple[tuple[float, float, float], ...] = (DINOV2_MEAN, SIGLIP_MEAN)
    stds: tuple[tuple[float, float, float], ...] = (DINOV2_STD, SIGLIP_STD)
    letterbox_fill: tuple[int, int, int] | None = None
    _mean_tensor: torch.Tensor = field(init=False, repr=False, compare=False)
    _std_tensor: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if int(self.image_size) < 2:
            raise ValueError(f"image_size must be >= 2, got {self.image_size}")
        if self.resize_strategy not in RESIZE_STRATEGIES:
            raise ValueError(
                f"image_resize_strategy {self.resize_strategy!r} is not supported; use one of "
                f"{', '.join(RESIZE_STRATEGIES)}"
            )
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation {self.interpolation!r} is not supported; use one of {', '.join(INTERPOLATIONS)}"
            )
        means = tuple(tuple(float(v) for v in triple) for triple in self.means)
        stds = tuple(tuple(float(v) for v in triple) for triple in self.stds)
        if not means or len(means) != len(stds) or any(len(t) != 3 for t in means + stds):
            raise ValueError(
                f"means and stds need one RGB triple per vision tower, got {len(means)} means and {len(stds)} stds"
            )
        if any(v <= 0 for triple in stds for v in triple):
            raise ValueError(f"stds must be positive, got {stds}")
        object.__setattr__(self, "means", means)
        object.__setattr__(self, "stds", stds)
        if self.letterbox_fill is None:
            fill = tuple(int(value * 255) for value in means[-1])
        else:
            fill = tuple(int(value) for value in self.letterbox_fill)
            if len(fill) != 3 or any(not 0 <= value <= 255 for value in fill):
                raise ValueError(f"letterbox_fill must be three values in 0..255, got {self.letterbox_fill}")
        object.__setattr__(self, "letterbox_fill", fill)
        object.__setattr__(self, "_mean_tensor", torch.tensor(means, dtype=torch.float32).view(-1, 3, 1, 1))
        object.__setattr__(self, "_std_tensor", torch.tensor(stds, dtype=torch.float32).view(-1, 3, 1, 1))

    @property
    def num_towers(self) -> int:
        return len(self.means)

    @classmethod
    def from_preprocessor_config(cls, data: Mapping[str, Any], num_towers: int | None = None) -> ImageSettings:
        """Returns the settings the official processor applies for a ``preprocessor_config.json`` dict.

        The ``tvf_*`` fields are what the official ``apply_transform`` uses, so each one that is present
        wins: ``tvf_resize_params`` (size and PIL filter code), ``tvf_crop_params``,
        ``tvf_normalize_params`` (mean/std per tower), ``tvf_do_letterbox`` and ``tvf_letterbox_fill``.
        Where one is absent, ``input_sizes``, ``image_resize_strategy``, ``interpolations``, ``means``
        and ``stds`` apply; a field missing from both keeps its default.

        Raises:
            ValueError: when a field is malformed, the towers disagree on size or interpolation, the
                number of towers differs from ``num_towers``, or the ``tvf_*`` fields describe a resize
                the model cannot take (not a square of one size for every tower).
        """
        defaults = cls()
        means = data.get("means", defaults.means)
        stds = data.get("stds", defaults.stds)
        if num_towers is not None and "means" not in data:
            means, stds = means[:num_towers], stds[:num_towers]
        sizes = data.get("input_sizes")
        if sizes is not None:
            squares = {tuple(int(v) for v in size[-2:]) for size in sizes}
            if len(squares) != 1 or len(next(iter(squares))) != 2 or len(set(next(iter(squares)))) != 1:
                raise ValueError(f"input_sizes must be one square size for every tower, got {sizes}")
            image_size = next(iter(squares))[0]
        else:
            image_size = defaults.image_size
        interpolations = data.get("interpolations", [defaults.interpolation])
        if isinstance(interpolations, str):
            interpolations = [interpolations]
        if len(set(interpolations)) != 1:
            raise ValueError(f"interpolations must be the same for every tower, got {interpolations}")
        fields: dict[str, Any] = {
            "image_size": image_size,
            "resize_strategy": str(data.get("image_resize_strategy", defaults.resize_strategy)),
            "interpolation": str(interpolations[0]),
            "means": tuple(tuple(m) for m in means),
            "stds": tuple(tuple(s) for s in stds),
        }
        fields.update(_tvf_fields(data, num_towers))
        settings = cls(**fields)
        if num_towers is not None and settings.num_towers != num_towers:
            raise ValueError(
                f"means/stds describe {settings.num_towers} vision tower(s), the model has {num_towers}"
            )
        return settings

    def to_preprocessor_config(self, use_fused_vision_backbone: bool) -> dict[str, Any]:
        """Returns the official ``preprocessor_config.json`` content for these settings.

        Both forms are written, as the official processor saves itself: the constructor arguments
        (``means``, ``stds``, ...) and the ``tvf_*`` parameters its ``apply_transform`` reads.
        """
        size = self.image_size
        resize_size: int | list[int] = [size, size] if self.resize_strategy == "resize-naive" else size
        filter_code = int(INTERPOLATIONS[self.interpolation])
        letterbox = self.resize_strategy == "letterbox"
        return {
            "image_processor_type": "PrismaticImageProcessor",
            "processor_class": "PrismaticProcessor",
            "use_fused_vision_backbone": bool(use_fused_vision_backbone),
            "image_resize_strategy": self.resize_strategy,
            "input_sizes": [[3, size, size] for _ in self.means],
            "interpolations": [self.interpolation for _ in self.means],
            "means": [list(m) for m in self.means],
            "stds": [list(s) for s in self.stds],
            "tvf_resize_params": [
                {"size": resize_size, "interpolation": filter_code, "max_size": None, "antialias": True}
                for _ in self.means
            ],
            "tvf_crop_params": [{"output_size": [size, size]} for _ in self.means],
            "tvf_normalize_params": [
                {"mean": list(mean), "std": list(std), "inplace": False} for mean, std in zip(self.means, self.stds, strict=True)
            ],
            "tvf_do_letterbox": letterbox,
            "tvf_letterbox_fill": list(self.letterbox_fill) if letterbox else None,
        }

    def normalize(self, model_image: np.ndarray) -> torch.Tensor:
        """Returns the [3 * towers, S, S] float32 tensor of a resized uint8 [S, S, 3] image."""
        pixels = torch.from_numpy(np.ascontiguousarray(model_image)).permute(2, 0, 1).to(torch.float32) / 255.0
        normalized = (pixels[None] - self._mean_tensor) / self._std_tensor
        return normalized.reshape(-1, *pixels.shape[1:])


def _per_tower(data: Mapping[str, Any], key: str, num_towers: int | None) -> list[Mapping[str, Any]] | None:
    """Returns the list of per-tower dicts stored under ``key``, or None when the file has none."""
    entries = data.get(key)
    if entries is None:
        return None
    if not isinstance(entries, list | tuple) or not entries or not all(isinstance(e, Mapping) for e in entries):
        raise ValueError(f"{key} must be a list of one dict per vision tower, got {entries!r}")
    if num_towers is not None and len(entries) != num_towers:
        raise ValueError(f"{key} describes {len(entries)} vision tower(s), the model has {num_towers}")
    return list(entries)


def _one_value(entries: list[Mapping[str, Any]], key: str, field_name: str) -> Any:
    """Returns ``entries[i][field_name]``, which must be the same for every tower."""
    values = [entry.get(field_name) for entry in entries]
    if any(value != values[0] for value in values):
        raise ValueError(f"{key}: '{field_name}' must be the same for every tower, got {values}")
    return values[0]


def _square_side(value: Any, key: str) -> tuple[int, bool]:
    """Returns ``(side, is_pair)`` of a torchvision size: an int (the short side) or [h, w] with h == w."""
    if isinstance(value, bool):
        raise ValueError(f"{key}: size must be an integer or [height, width], got {value!r}")
    if isinstance(value, int):
        return value, False
    if isinstance(value, list | tuple) and len(value) == 1 and isinstance(value[0], int):
        return value[0], False
    if isinstance(value, list | tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        if value[0] != value[1]:
            raise ValueError(f"{key}: the model takes a square input, got size {list(value)}")
        return value[0], True
    raise ValueError(f"{key}: size must be an integer or [height, width], got {value!r}")


def _tvf_fields(data: Mapping[str, Any], num_towers: int | None) -> dict[str, Any]:
    """Returns the :class:`ImageSettings` fields that a file's ``tvf_*`` parameters set.

    Only the combinations the official processor writes are accepted: ``resize-naive`` resizes to
    [S, S]; ``resize-crop`` and ``letterbox`` resize the short side to S; all three crop [S, S].

    Raises:
        ValueError: naming the field, for anything else.
    """
    fields: dict[str, Any] = {}
    normalize = _per_tower(data, "tvf_normalize_params", num_towers)
    if normalize is not None:
        try:
            fields["means"] = tuple(tuple(float(v) for v in entry["mean"]) for entry in normalize)
            fields["stds"] = tuple(tuple(float(v) for v in entry["std"]) for entry in normalize)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"tvf_normalize_params needs 'mean' and 'std' triples per tower: {exc!r}") from exc
    crop = _per_tower(data, "tvf_crop_params", num_towers)
    if crop is not None:
        crop_side, _ = _square_side(_one_value(crop, "tvf_crop_params", "output_size"), "tvf_crop_params")
        fields["image_size"] = crop_side
    letterbox = data.get("tvf_do_letterbox")
    if letterbox is not None and not isinstance(letterbox, bool):
        raise ValueError(f"tvf_do_letterbox must be true or false, got {letterbox!r}")
    resize = _per_tower(data, "tvf_resize_params", num_towers)
    if resize is not None:
        if _one_value(resize, "tvf_resize_params", "max_size") is not None:
            raise ValueError("tvf_resize_params: 'max_size' is not supported; set it to null")
        code = _one_value(resize, "tvf_resize_params", "interpolation")
        name = INTERPOLATION_BY_CODE.get(code) if isinstance(code, int) else code
        if name not in INTERPOLATIONS:
            raise ValueError(
                f"tvf_resize_params: interpolation {code!r} is not a PIL filter code "
                f"({', '.join(f'{c} {n}' for c, n in sorted(INTERPOLATION_BY_CODE.items()))})"
            )
        fields["interpolation"] = name
        side, is_pair = _square_side(_one_value(resize, "tvf_resize_params", "size"), "tvf_resize_params")
        if crop is not None and side != fields["image_size"]:
            raise ValueError(
                f"tvf_resize_params resizes to {side} but tvf_crop_params crops {fields['image_size']}; "
                "the model takes one square size"
            )
        fields["image_size"] = side
        if is_pair and letterbox:
            raise ValueError("tvf_do_letterbox with a [height, width] resize size is not what the official processor writes")
        fields["resize_strategy"] = "resize-naive" if is_pair else ("letterbox" if letterbox else "resize-crop")
    elif letterbox is not None:
        if letterbox:
            fields["resize_strategy"] = "letterbox"
        elif str(data.get("image_resize_strategy", "")) == "letterbox":
            raise ValueError("tvf_do_letterbox is false but image_resize_strategy is letterbox; make them agree")
    fill = data.get("tvf_letterbox_fill")
    if fill is not None:
        if not isinstance(fill, list | tuple) or len(fill) != 3:
            raise ValueError(f"tvf_letterbox_fill must be an RGB triple, got {fill!r}")
        fields["letterbox_fill"] = tuple(int(v) for v in fill)
    return fields


DEFAULT_IMAGE_SETTINGS = ImageSettings()


def default_image_settings(use_fused_vision_backbone: bool, image_size: int = 224) -> ImageSettings:
    """Returns the textbook settings (no ``preprocessor_config.json``): DINOv2 + SigLIP, or one tower."""
    towers = 2 if use_fused_vision_backbone else 1
    return ImageSettings(
        image_size=image_size, means=DEFAULT_IMAGE_SETTINGS.means[:towers], stds=DEFAULT_IMAGE_SETTINGS.stds[:towers]
    )


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
        image_size: side of the square model input (224 for OpenVLA); ``settings.image_size`` wins
            when ``settings`` is given.
        center_crop: take the centre 90%-area crop (use with models trained with random crops).
        rotate_180: rotate the camera image by 180 degrees first (upside-down mounted cameras).
        settings: resize and normalisation settings, normally the checkpoint's (see
            ``openvla_ros.loading.read_image_settings``); the textbook values when None.
    """

    image_size: int = 224
    center_crop: bool = False
    rotate_180: bool = False
    settings: ImageSettings | None = None

    def __post_init__(self) -> None:
        settings = self.settings
        if settings is None:
            settings = ImageSettings(image_size=self.image_size)
        object.__setattr__(self, "settings", settings)
        object.__setattr__(self, "image_size", settings.image_size)

    def model_image(self, image: np.ndarray) -> np.ndarray:
        """Returns the uint8 [S, S, 3] image the model sees (rotated, resized, optionally cropped).

        Raises:
            ImageError: when ``image`` is not a uint8 HxWx3 array.
        """
        image = validate_image(image)
        if self.rotate_180:
            image = np.ascontiguousarray(image[::-1, ::-1])
        image = resize_to_square(image, self.settings)
        if self.center_crop:
            image = center_crop_and_resize(image)
        return image

    def pixel_values(self, image: np.ndarray) -> torch.Tensor:
        """Returns the float32 [3 * towers, S, S] model input (DINOv2 then SigLIP normalisation when fused).

        Raises:
            ImageError: when ``image`` is not a uint8 HxWx3 array.
        """
        return self.settings.normalize(self.model_image(image))


def resize_to_square(image: np.ndarray, settings: ImageSettings) -> np.ndarray:
    """Returns ``image`` resized to [S, S, 3] by ``settings.resize_strategy`` with PIL's filter.

    As the official processor: ``resize-naive`` stretches to [S, S]; ``resize-crop`` resizes the short
    side to S (torchvision's rounding) and takes the centre square; ``letterbox`` first pads both sides
    symmetrically by ``int((long - short) / 2)`` with ``settings.letterbox_fill``, then does the same.
    An image already of the model's size is returned unchanged under every strategy.
    """
    size = settings.image_size
    if image.shape[:2] == (size, size):
        return image
    resample = INTERPOLATIONS[settings.interpolation]
    pil = Image.fromarray(image)
    if settings.resize_strategy == "resize-naive":
        return np.array(pil.resize((size, size), resample))
    if settings.resize_strategy == "letterbox":
        width, height = pil.size
        side = max(width, height)
        pad_x, pad_y = int((side - width) / 2), int((side - height) / 2)
        padded = Image.new("RGB", (width + 2 * pad_x, height + 2 * pad_y), settings.letterbox_fill)
        padded.paste(pil, (pad_x, pad_y))
        pil = padded
    width, height = pil.size
    if width <= height:
        new_size = (size, int(size * height / width))
    else:
        new_size = (int(size * width / height), size)
    if new_size != pil.size:
        pil = pil.resize(new_size, resample)
    left = int(round((pil.size[0] - size) / 2.0))
    top = int(round((pil.size[1] - size) / 2.0))
    return np.array(pil.crop((left, top, left + size, top + size)))


def normalize_model_image(model_image: np.ndarray, settings: ImageSettings | None = None) -> torch.Tensor:
    """Returns the normalised float32 tensor of an already resized uint8 [S, S, 3] image.

    ``settings`` defaults to the textbook DINOv2 + SigLIP constants; pass the checkpoint's.
    """
    return (settings or DEFAULT_IMAGE_SETTINGS).normalize(model_image)


def upload(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Returns a host tensor on ``device``: to a CUDA device through page-locked memory, without waiting for
    the copy (the kernels that read it run after it on the same stream); elsewhere a plain copy."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def validate_instruction(instruction: str, max_chars: int = MAX_INSTRUCTION_CHARS, *, strip: bool = False) -> str:
    """Returns the instruction as the prompt will use it: as given, or without surrounding whitespace.

    The official code builds the prompt from the instruction as given (only lower-cased), so
    ``strip`` is off by default: ``" pick"`` and ``"pick"`` give different prompt ids there and here.

    Raises:
        InstructionError: when it is not a string, is empty or only whitespace, is longer than
            ``max_chars`` or holds a literal special token such as ``</s>`` (tokenisers disagree on such
            text, so the model would not see what the official code gives it).
    """
    if not isinstance(instruction, str):
        raise InstructionError(f"instruction must be a string, got {type(instruction).__name__}")
    if not instruction.strip():
        raise InstructionError("instruction is empty; say what the robot should do, e.g. 'pick up the cup'")
    text = instruction.strip() if strip else instruction
    if len(text) > max_chars:
        raise InstructionError(
            f"instruction is {len(text)} characters long, the limit is {max_chars}; shorten it"
        )
    special = [token for token in SPECIAL_TOKEN_TEXTS if token in text.lower()]
    if special:
        raise InstructionError(
            f"instruction contains the special-token text {special[0]!r}, which tokenisers treat "
            "inconsistently; remove it or write it another way (e.g. 's' instead of '<s>')"
        )
    return text


def build_prompt(instruction: str, *, strip: bool = False) -> str:
    """Returns the official OpenVLA prompt for an instruction (lower-cased, without trailing space).

    ``strip`` removes whitespace around the instruction first (not what the official code does).

    Raises:
        InstructionError: when the instruction is empty or too long.
    """
    return PROMPT_TEMPLATE.format(instruction=validate_instruction(instruction, strip=strip).lower())


def prompt_token_ids(tokenizer, instruction: str, *, strip: bool = False) -> list[int]:
    """Returns the prompt ids with BOS, ending in the bare-space id 29871 as the model was trained.

    The id is appended only when the tokenizer's vocabulary contains it (>= 29872 ids).

    Raises:
        InstructionError: when the instruction is empty or too long.
    """
    ids = list(tokenizer(build_prompt(instruction, strip=strip), add_special_tokens=True)["input_ids"])
    if len(tokenizer) > BARE_SPACE_TOKEN_ID and ids[-1] != BARE_SPACE_TOKEN_ID:
        ids.append(BARE_SPACE_TOKEN_ID)
    return ids
