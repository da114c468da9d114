"""The policy node's one-line status for ``/diagnostics``: its level and summary, without ROS."""

from __future__ import annotations

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
