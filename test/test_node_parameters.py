"""The policy node's parameter table and per-value checks, and its status summary, without ROS."""

from __future__ import annotations

from diagnostic_msgs.msg import DiagnosticStatus
from rclpy.parameter import Parameter

from openvla_ros.ros.node_status import status_summary
from openvla_ros.ros.parameters import PARAMETERS, value_problem, whole_numbers_as_floats


def test_every_parameter_has_a_description_and_its_range_or_choices_hold_the_default() -> None:
    for spec in PARAMETERS:
        assert spec.description, spec.name
        if spec.float_range:
            assert spec.float_range[0] <= spec.default <= spec.float_range[1], spec.name
        if spec.integer_range:
            assert spec.integer_range[0] <= spec.default <= spec.integer_range[1], spec.name
        if spec.choices:
            assert spec.default in spec.choices, spec.name
    assert {"actions_per_inference", "chunk_blend", "wrist_image_topics", "proprio_topic"} <= {
        spec.name for spec in PARAMETERS
    }


def test_whole_numbers_become_floats_only_for_floating_point_parameters() -> None:
    rate, actions = whole_numbers_as_floats(
        [Parameter("rate_hz", value=10), Parameter("actions_per_inference", value=4)]
    )
    assert rate.value == 10.0 and rate.type_ == Parameter.Type.DOUBLE
    assert actions.value == 4 and actions.type_ == Parameter.Type.INTEGER


def test_values_outside_their_choices_and_empty_topics_are_refused_with_the_reason() -> None:
    assert value_problem("chunk_blend", "average") == "chunk_blend must be one of none, ensemble; got 'average'"
    assert value_problem("proprio_type", "pose") is not None
    assert value_problem("image_topic", " ") == "image_topic must not be empty"
    assert value_problem("chunk_blend", "ensemble") is None
    assert value_problem("not_a_parameter", 1) is None


def test_the_status_is_an_error_for_a_failed_model_a_warning_for_a_problem_ok_while_waiting() -> None:
    assert status_summary("unconfigured", False, "failed: no such file", {}) == (
        DiagnosticStatus.ERROR, "model failed: no such file"
    )
    stale = {"stale_wrist_image_1": "wrist camera images on /wrist are older than max_image_age_s"}
    assert status_summary("active", True, None, stale)[0] == DiagnosticStatus.WARN
    waiting = {"no_instruction": "enabled but no instruction received yet"}
    assert status_summary("active", True, None, waiting) == (DiagnosticStatus.OK, waiting["no_instruction"])
    assert status_summary("active", False, None, {}) == (DiagnosticStatus.OK, "active, output disabled")
    assert status_summary("active", True, None, {}) == (DiagnosticStatus.OK, "running")
