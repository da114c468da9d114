"""The real policy node with its model replaced by a stand-in whose step time is known.

    python test/standin_policy_node.py STEP_S [chunk=K action_dim=A num_images=N proprio_dim=P] --ros-args ...

Everything but the model is the node as shipped (parameters, lifecycle, DDS, scheduling, safety), so
tests of its timing logic do not depend on how fast this machine runs the model. With ``chunk=K`` the
stand-in is a chunked policy (chunk mode): each inference sleeps STEP_S and returns K actions whose
values say where they came from (see :func:`standin_chunk`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from openvla_ros.errors import ImageError, OpenVLAError
from openvla_ros.model.processor import validate_image, validate_instruction
from openvla_ros.ros import policy_node

# Translations and rotations inside the shipped limits, a gripper value in [0, 1].
STANDIN_ACTION = (0.01, -0.02, 0.03, 0.1, -0.2, 0.15, 0.7)
# Chunk actions: dx = STEP_UNIT * (index in the chunk + 1), dy = CHUNK_UNIT * (chunk number + 1), the
# rest as STANDIN_ACTION; inside the shipped limits for K <= 50 and the first 500 chunks.
STEP_UNIT = 0.001
CHUNK_UNIT = 0.0001


def standin_chunk(number: int, size: int, action_dim: int = 7) -> np.ndarray:
    """Returns stand-in chunk ``number`` (0-based): [size, action_dim] float64 encoding index and number."""
    chunk = np.tile(np.resize(np.array(STANDIN_ACTION), action_dim), (size, 1))
    chunk[:, 0] = STEP_UNIT * (np.arange(size) + 1)
    chunk[:, 1] = CHUNK_UNIT * (number % 500 + 1)
    return chunk


def decode_action(values: Sequence[float]) -> tuple[int, int]:
    """Returns (chunk number, index in the chunk) of a published stand-in chunk action."""
    return round(values[1] / CHUNK_UNIT) - 1, round(values[0] / STEP_UNIT) - 1


class StandInPolicy:
    """``predict_action`` validates its inputs like the real policy, sleeps ``step_s`` and returns a fixed action."""

    unnorm_key = "standin"

    def __init__(self, step_s: float) -> None:
        self.step_s = step_s
        self.calls = 0

    def predict_action(self, rgb: np.ndarray, instruction: str) -> np.ndarray:
        validate_image(rgb)
        validate_instruction(instruction)
        self.calls += 1
        time.sleep(self.step_s)
        return np.array(STANDIN_ACTION, dtype=np.float64)

    def release(self) -> None:
        pass


class StandInChunkPolicy:
    """A chunked stand-in: ``predict_chunk`` checks its inputs as the OFT policy does and sleeps ``step_s``."""

    unnorm_key = "standin"
    is_chunked = True

    def __init__(self, step_s: float, chunk: int, action_dim: int = 7, num_images: int = 1, proprio_dim: int = 0):
        self.step_s = step_s
        self.chunk_size = chunk
        self.action_dim = action_dim
        self.num_images = num_images
        self.proprio_dim = proprio_dim
        self.calls = 0

    def predict_chunk(
        self, image: np.ndarray, instruction: str, wrist_images: Sequence[np.ndarray] = (), proprio: Any = None
    ) -> np.ndarray:
        for rgb in (image, *wrist_images):
            validate_image(rgb)
        validate_instruction(instruction)
        if 1 + len(wrist_images) != self.num_images:
            raise ImageError(f"this model takes {self.num_images} image(s); got {1 + len(wrist_images)}")
        if self.proprio_dim:
            values = np.asarray(proprio, dtype=np.float64).reshape(-1)
            if values.shape[0] != self.proprio_dim or not np.all(np.isfinite(values)):
                raise OpenVLAError(f"proprio must be {self.proprio_dim} finite values; got {values.tolist()}")
        number = self.calls
        self.calls += 1
        time.sleep(self.step_s)
        return standin_chunk(number, self.chunk_size, self.action_dim)

    def predict_action(self, image: np.ndarray, instruction: str, **inputs: Any) -> np.ndarray:
        return self.predict_chunk(image, instruction, **inputs)[0]

    def release(self) -> None:
        pass


def main() -> None:
    step_s = float(sys.argv[1])
    options = {}
    rest = sys.argv[2:]
    while rest and "=" in rest[0] and not rest[0].startswith("-"):
        key, value = rest.pop(0).split("=", 1)
        options[key] = int(value)

    def load(values: dict[str, Any]) -> StandInPolicy | StandInChunkPolicy:
        if "chunk" in options:
            return StandInChunkPolicy(step_s, **options)
        return StandInPolicy(step_s)

    policy_node.main([sys.argv[0], *rest], policy_loader=load)


if __name__ == "__main__":
    main()
