"""The real policy node with its model replaced by a stand-in whose step time is known.

    python test/standin_policy_node.py STEP_S --ros-args ...

Everything but the model is the node as shipped (parameters, lifecycle, DDS, scheduling, safety), so
tests of its timing logic do not depend on how fast this machine runs the model.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np

from openvla_ros.model.processor import validate_image, validate_instruction
from openvla_ros.ros import policy_node

# Translations and rotations inside the shipped limits, a gripper value in [0, 1].
STANDIN_ACTION = (0.01, -0.02, 0.03, 0.1, -0.2, 0.15, 0.7)


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


def main() -> None:
    step_s = float(sys.argv[1])

    def load(values: dict[str, Any]) -> StandInPolicy:
        return StandInPolicy(step_s)

    policy_node.main([sys.argv[0], *sys.argv[2:]], policy_loader=load)


if __name__ == "__main__":
    main()
