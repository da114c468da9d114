"""Chunk mode's checks of a policy against the node's parameters, without ROS."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from openvla_ros.ros.chunk_mode import (
    ChunkModel,
    chunk_model_of,
    chunk_problem,
    configuration_problems,
    proprio_from_array,
    proprio_from_joint_state,
)
from openvla_ros.ros.parameters import PARAMETERS

DEFAULTS = {spec.name: spec.default for spec in PARAMETERS}
OFT = ChunkModel(chunk_size=8, action_dim=7, num_images=1, proprio_dim=0)


def test_a_token_policy_has_no_chunk_model_and_a_chunked_one_says_its_shape() -> None:
    assert chunk_model_of(SimpleNamespace(predict_action=None)) is None
    policy = SimpleNamespace(is_chunked=True, chunk_size=25, action_dim=14, num_images=3, proprio_dim=14)
    assert chunk_model_of(policy) == ChunkModel(25, 14, 3, 14)


def test_the_shipped_parameters_fit_a_plain_chunk_model_and_a_token_model() -> None:
    assert configuration_problems(OFT, DEFAULTS) == ([], [])
    assert configuration_problems(None, DEFAULTS) == ([], [])


@pytest.mark.parametrize(
    ("model", "values", "message"),
    [
        (ChunkModel(8, 14, 1, 0), {}, "the model predicts 14-D actions; the node publishes 7-DoF deltas"),
        (OFT, {"actions_per_inference": 9}, "actions_per_inference 9 is more than the model's chunk size K = 8"),
        (ChunkModel(8, 7, 3, 0), {"wrist_image_topics": ["/left"]}, "the model takes 3 image(s): the camera and 2"),
        (OFT, {"wrist_image_topics": ["/left"]}, "wrist_image_topics names 1"),
        (ChunkModel(8, 7, 1, 8), {}, "the model takes a proprio vector of 8 values: set proprio_topic"),
        (None, {"rate_hz": 50.0}, "rate_hz 50 is above 30 Hz, the limit for a token-by-token model"),
    ],
)
def test_a_misfit_is_an_error_that_names_the_parameter(model: ChunkModel | None, values: dict, message: str) -> None:
    errors, _ = configuration_problems(model, DEFAULTS | values)
    assert any(message in error for error in errors), errors


def test_inputs_the_model_does_not_take_are_warned_about() -> None:
    _, warnings = configuration_problems(OFT, DEFAULTS | {"proprio_topic": "/joint_states"})
    assert warnings == ["proprio_topic '/joint_states' is ignored: this model takes no proprio"]
    _, warnings = configuration_problems(None, DEFAULTS | {"wrist_image_topics": ["/wrist"]})
    assert warnings and "ignored" in warnings[0]
    assert configuration_problems(OFT, DEFAULTS | {"rate_hz": 100.0}) == ([], []), "chunk mode goes to 100 Hz"


def test_a_predicted_chunk_must_be_k_by_7_and_finite() -> None:
    assert chunk_problem(np.zeros((8, 7)), OFT) is None
    assert "shape (8, 6)" in chunk_problem(np.zeros((8, 6)), OFT)
    assert "has 4 actions" in chunk_problem(np.zeros((4, 7)), OFT)
    bad = np.zeros((8, 7))
    bad[3, 2] = np.nan
    bad[5, 0] = np.inf
    assert chunk_problem(bad, OFT) == "the predicted chunk has 2 non-finite value(s)"


def test_proprio_from_a_joint_state_is_aged_by_its_stamp_and_from_an_array_by_its_arrival() -> None:
    stamped = SimpleNamespace(header=SimpleNamespace(stamp=SimpleNamespace(sec=3, nanosec=5)), position=[0.1, 0.2])
    reading = proprio_from_joint_state(stamped, received_ns=9)
    np.testing.assert_array_equal(reading.values, [0.1, 0.2])
    assert reading.stamp_ns == 3_000_000_005
    unstamped = SimpleNamespace(header=SimpleNamespace(stamp=SimpleNamespace(sec=0, nanosec=0)), position=[1.0])
    assert proprio_from_joint_state(unstamped, received_ns=9).stamp_ns == 9, "an unset stamp: arrival time"
    assert proprio_from_array(SimpleNamespace(data=[1.0, 2.0]), received_ns=7).stamp_ns == 7
