"""A loaded policy behind request validation and batched inference; no web code (see :mod:`.app`).

A request (the JSON body of ``POST /act``) is checked completely in :meth:`Engine.parse`, before it
joins a batch, so a bad request fails alone with a 4xx and the reason; :meth:`Engine.run` then
runs any mix of valid requests as one batch.

Request fields:

- ``image``: json-numpy uint8 HxWx3 RGB (OpenVLA's ``deploy.py`` API), or ``image_jpeg``: base64 JPEG;
- ``instruction``: what to do (1..1000 characters, as the model's prompt takes it);
- ``unnorm_key`` (optional): whose statistics un-normalise the action (the model's default when left out);
- OpenVLA-OFT models: ``wrist_images`` (json-numpy list) or ``wrist_images_jpeg`` (base64 list), one per
  wrist camera the model takes, and ``proprio`` (json-numpy or a list of numbers) when it takes proprio;
- ``encoded``: the whole request as one JSON string (``deploy.py``'s double encoding); the answer is then
  a JSON string too.

The answer is the action as json-numpy: float64[7] for a token model, the chunk float64[K, A] for OFT.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from openvla_ros.errors import ImageError, InstructionError, OpenVLAError
from openvla_ros.model.action_codec import ActionNormalizer
from openvla_ros.model.processor import MAX_INSTRUCTION_CHARS, validate_image, validate_instruction
from openvla_ros.serve.arrays import ArrayFormatError, decode_array

MAX_IMAGE_SIDE = 4096
FIELDS = {"image", "image_jpeg", "instruction", "unnorm_key", "wrist_images", "wrist_images_jpeg", "proprio"}


class RequestError(Exception):
    """A request the server refuses: an HTTP status and a message naming the problem and the way out."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Job:
    """One validated request, ready to join a batch."""

    image: np.ndarray
    instruction: str
    unnorm_key: str
    wrist_images: list[np.ndarray] = field(default_factory=list)
    proprio: np.ndarray | None = None  # normalised with the unnorm key's bounds
    encoded: bool = False


def _decode_jpeg(value: Any, name: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if not isinstance(value, str):
        raise RequestError(422, f"{name} must be a base64 string of a JPEG file, got {type(value).__name__}")
    try:
        data = base64.b64decode(value, validate=True)
        with Image.open(io.BytesIO(data)) as picture:
            if picture.width > MAX_IMAGE_SIDE or picture.height > MAX_IMAGE_SIDE:
                raise RequestError(422, f"{name} is {picture.width}x{picture.height}; the largest side accepted is "
                                        f"{MAX_IMAGE_SIDE}: resize it first")
            return np.asarray(picture.convert("RGB"))
    except RequestError:
        raise
    except (binascii.Error, ValueError, OSError, UnidentifiedImageError) as exc:
        raise RequestError(422, f"{name} is not a readable base64 JPEG: {exc}") from exc


def _image(value: Any, name: str) -> np.ndarray:
    try:
        array = decode_array(value, name)
        image = validate_image(array)
    except (ArrayFormatError, ImageError) as exc:
        raise RequestError(422, f"{name}: {exc}") from exc
    if max(image.shape[:2]) > MAX_IMAGE_SIDE:
        raise RequestError(422, f"{name} is {image.shape[1]}x{image.shape[0]}; the largest side accepted is "
                                f"{MAX_IMAGE_SIDE}: resize it first")
    return image


class Engine:
    """A policy (token or OpenVLA-OFT) that validates requests and runs them in batches.

    Args:
        policy: an :class:`~openvla_ros.model.policy.OpenVLAPolicy` or
            :class:`~openvla_ros.model.oft_policy.OFTPolicy`.
        model_name: what ``/health`` reports as the model.
        mode: the precision it runs in (``bf16``, ``4bit``...), for ``/health``.
    """

    def __init__(self, policy: Any, model_name: str, mode: str) -> None:
        self.policy = policy
        self.model_name = model_name
        self.mode = mode
        self.chunked = bool(getattr(policy, "is_chunked", False))
        self.norm_stats: dict[str, Any] = policy.config.norm_stats
        self.default_key: str = policy.unnorm_key
        self._normalizers: dict[str, Any] = {}

    @property
    def chunk_size(self) -> int:
        return self.policy.chunk_size if self.chunked else 1

    @property
    def device(self) -> str:
        return str(self.policy.model.device)

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"model": self.model_name, "mode": self.mode, "device": self.device,
                                "kind": "oft" if self.chunked else "token", "chunk_size": self.chunk_size,
                                "unnorm_keys": sorted(self.norm_stats), "default_unnorm_key": self.default_key}
        if self.chunked:
            info |= {"images": self.policy.num_images, "proprio_dim": self.policy.proprio_dim,
                     "action_dim": self.policy.action_dim}
        return info

    def _normalizers_for(self, key: str) -> Any:
        """Token model: the ActionNormalizer; OFT: (normaliser, proprio bounds). Built once per key."""
        if key not in self._normalizers:
            if self.chunked:
                from openvla_ros.model.oft_policy import chunk_normalizers

                self._normalizers[key] = chunk_normalizers(self.norm_stats[key], self.policy.spec, key)
            else:
                self._normalizers[key] = ActionNormalizer.from_stats(self.norm_stats[key]["action"])
        return self._normalizers[key]

    def parse(self, payload: Any) -> Job:
        """Returns the validated job of a request body (already JSON-decoded).

        Raises:
            RequestError: 400 for a body of the wrong form, 422 for a field with a wrong value.
        """
        encoded = False
        if isinstance(payload, dict) and "encoded" in payload:
            if len(payload) != 1 or not isinstance(payload["encoded"], str):
                raise RequestError(400, "an 'encoded' request holds only 'encoded': the request as a JSON string")
            try:
                payload = json.loads(payload["encoded"])
            except ValueError as exc:
                raise RequestError(400, f"'encoded' is not valid JSON: {exc}") from exc
            encoded = True
        if not isinstance(payload, dict):
            raise RequestError(400, f"the body must be a JSON object, got {type(payload).__name__}")
        unknown = sorted(set(payload) - FIELDS)
        if unknown:
            raise RequestError(400, f"unknown field(s) {unknown}; accepted: {', '.join(sorted(FIELDS))}")
        if ("image" in payload) == ("image_jpeg" in payload):
            raise RequestError(400, "give the camera image as 'image' (json-numpy uint8 HxWx3) or as 'image_jpeg' "
                                    "(base64 JPEG), exactly one of them")
        image = (_image(payload["image"], "image") if "image" in payload
                 else _decode_jpeg(payload["image_jpeg"], "image_jpeg"))
        if "instruction" not in payload:
            raise RequestError(400, "the request has no 'instruction': say what the robot should do")
        try:
            instruction = validate_instruction(payload["instruction"], MAX_INSTRUCTION_CHARS)
        except InstructionError as exc:
            raise RequestError(422, f"instruction: {exc}") from exc
        key = payload.get("unnorm_key") or self.default_key
        if not isinstance(key, str) or key not in self.norm_stats:
            raise RequestError(422, f"unknown unnorm_key {key!r}; this model has statistics for "
                                    f"{', '.join(sorted(self.norm_stats))}")
        job = Job(image, instruction, key, encoded=encoded)
        if not self.chunked:
            extra = sorted({"wrist_images", "wrist_images_jpeg", "proprio"} & set(payload))
            if extra:
                raise RequestError(422, f"{', '.join(extra)}: this is a token model, it takes one image and no "
                                        "proprio; leave them out")
            try:
                self._normalizers_for(key)
            except (KeyError, ValueError) as exc:
                raise RequestError(422, f"unnorm_key {key!r} has no usable action statistics: {exc}") from exc
            return job
        return self._parse_oft(payload, job)

    def _parse_oft(self, payload: dict[str, Any], job: Job) -> Job:
        wanted = self.policy.num_images - 1
        if "wrist_images" in payload and "wrist_images_jpeg" in payload:
            raise RequestError(400, "give 'wrist_images' or 'wrist_images_jpeg', not both")
        name = "wrist_images_jpeg" if "wrist_images_jpeg" in payload else "wrist_images"
        given = payload.get(name, [])
        if not isinstance(given, list):
            raise RequestError(422, f"{name} must be a list with one image per wrist camera")
        if len(given) != wanted:
            raise RequestError(422, f"this model takes {self.policy.num_images} image(s): 'image' and {wanted} wrist "
                                    f"image(s) in {name}; got {len(given)}")
        decode = _decode_jpeg if name == "wrist_images_jpeg" else _image
        job.wrist_images = [decode(value, f"{name}[{index}]") for index, value in enumerate(given)]
        _, bounds = self._normalizers_for(job.unnorm_key)
        if self.policy.proprio_dim:
            if "proprio" not in payload:
                raise RequestError(422, f"this model needs 'proprio': {self.policy.proprio_dim} numbers (the robot "
                                        "state it was trained with)")
            try:
                raw = np.asarray(decode_array(payload["proprio"], "proprio"), dtype=np.float64).reshape(-1)
                from openvla_ros.model.oft_policy import normalize_proprio

                job.proprio = normalize_proprio(raw, bounds)
            except (ArrayFormatError, OpenVLAError, ValueError) as exc:
                raise RequestError(422, f"proprio: {exc}") from exc
        elif "proprio" in payload:
            raise RequestError(422, "this model takes no proprio; leave 'proprio' out")
        return job

    def run(self, jobs: list[Job]) -> list[np.ndarray]:
        """Runs valid jobs as one batch and returns each one's physical action (or chunk), float64.

        Raises:
            OpenVLAError: the model failed or gave a non-finite result (the whole batch).
        """
        if self.chunked:
            normalized = self.policy.normalized_chunks(
                [(job.image, job.instruction, job.wrist_images, job.proprio) for job in jobs])
            results = []
            for job, chunk in zip(jobs, normalized, strict=True):
                normalizer, _ = self._normalizers_for(job.unnorm_key)
                results.append(np.stack([normalizer.unnormalize(step) for step in chunk]).astype(np.float64))
        else:
            ids = self.policy.predict_action_ids_batch([job.image for job in jobs], [job.instruction for job in jobs])
            tokenizer = self.policy.action_tokenizer
            results = [self._normalizers_for(job.unnorm_key).unnormalize(tokenizer.decode(row)).astype(np.float64)
                       for job, row in zip(jobs, ids, strict=True)]
        for job, result in zip(jobs, results, strict=True):
            if not np.all(np.isfinite(result)):
                raise OpenVLAError(f"the model's action for {job.instruction!r} is not finite; check the checkpoint's "
                                   f"statistics for {job.unnorm_key!r}")
        return results
