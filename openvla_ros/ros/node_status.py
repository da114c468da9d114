"""The policy node's one-line status for ``/diagnostics``: its level and summary, without ROS."""

from __future__ import annotations

import math
from typing import Any

from diagnostic_msgs.msg import DiagnosticStatus

# Problems that only mean "waiting": not yet an instruction or a first camera image.
WAITING_PROBLEMS = ("no_instruction", "no_image")


def status_summary(
    state_label: str, enabled: bool, model_failure: str | None, problems: dict[str, str]
) -> tuple[bytes, str]:
    """Returns (DiagnosticStatus level, summary) of the node.

    ``model_failure`` is the model status when loading failed and no model is loaded, else None;
    ``problems`` are the active problems by key (see :class:`~openvla_ros.ros.control.ProblemTracker`).
    A failed model is an error; any other problem but waiting for inputs is a warning.
    """
    errors = {key: message for key, message in problems.items() if key not in WAITING_PROBLEMS}
    if model_failure is not None:
        return DiagnosticStatus.ERROR, f"model {model_failure}"
    if errors:
        return DiagnosticStatus.WARN, "; ".join(errors.values())
    if state_label != "active":
        return DiagnosticStatus.OK, state_label
    if not enabled:
        return DiagnosticStatus.OK, "active, output disabled"
    if problems:
        return DiagnosticStatus.OK, "; ".join(problems.values())
    return DiagnosticStatus.OK, "running"


class EnergyStats:
    """What energy refinement did to the chunks, for ``/diagnostics`` (the worker records, the timer reads)."""

    def __init__(self) -> None:
        self.before = math.nan
        self.after = math.nan
        self.refined = 0
        self.fallbacks = 0
        self.problem = ""

    def record(self, prediction: Any) -> bool:
        """Adds one chunk's :class:`~openvla_ros.model.oft_policy.ChunkPrediction` (None or without energy: ignored).

        Returns True when the correction was abandoned for this chunk (the uncorrected chunk was used).
        """
        if prediction is None or (prediction.energy_before is None and prediction.problem is None):
            return False
        self.before = math.nan if prediction.energy_before is None else float(prediction.energy_before)
        self.after = math.nan if prediction.energy_after is None else float(prediction.energy_after)
        if prediction.problem:
            self.fallbacks += 1
            self.problem = str(prediction.problem)
            return True
        self.refined += 1
        return False

    def values(self, steps: int) -> dict[str, str]:
        """Returns the diagnostic key/values: energy of the last chunk before and after refinement, counts."""
        return {
            "energy_steps": str(steps),
            "energy_before_last": f"{self.before:.6f}",
            "energy_after_last": f"{self.after:.6f}",
            "energy_refined_chunks": str(self.refined),
            "energy_fallbacks": str(self.fallbacks),
            "energy_last_problem": self.problem,
        }
