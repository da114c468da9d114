"""Action codec: token layout, bins, BOUNDS_Q99 normalisation and statistics."""

from __future__ import annotations

import numpy as np
import pytest

from openvla_ros.errors import UnnormKeyError
from openvla_ros.model.action_codec import (
    ActionNormalizer,
    ActionTokenizer,
    compute_action_statistics,
    select_unnorm_key,
)


def test_token_layout_matches_official_reversed_last_256_ids() -> None:
    tokenizer = ActionTokenizer(vocab_size=32000)
    assert (tokenizer.first_action_id, tokenizer.last_action_id) == (31744, 31999)
    assert tokenizer.encode(np.array([-1.0, 1.0])).tolist() == [31999, 31744]
    decoded = tokenizer.decode(np.array([31999, 31872, 31745, 31744]))
    np.testing.assert_allclose(decoded, [-0.996078, 0.0, 0.996078, 0.996078], atol=1e-6)


def test_non_action_ids_decode_to_edge_bins() -> None:
    tokenizer = ActionTokenizer(vocab_size=32000)
    decoded = tokenizer.decode(np.array([2, 29871, 32000, 32063]))
    np.testing.assert_allclose(decoded, [0.996078, 0.996078, -0.996078, -0.996078], atol=1e-6)


def test_round_trip_within_half_a_bin_and_clipping() -> None:
    tokenizer = ActionTokenizer(vocab_size=32000)
    values = np.random.default_rng(0).uniform(-1, 1, size=10000)
    ids = tokenizer.encode(values)
    assert ids.min() >= 31744 and ids.max() <= 31999
    half_bin = (2.0 / 255) / 2
    assert np.max(np.abs(tokenizer.decode(ids) - values)) <= half_bin + 1e-12
    assert tokenizer.encode(np.array([5.0, -5.0])).tolist() == tokenizer.encode(np.array([1.0, -1.0])).tolist()


def test_normalizer_maps_q01_q99_to_unit_range_with_clipping_and_mask() -> None:
    normalizer = ActionNormalizer.from_stats(
        {"q01": [-1, -2, 0, 0, 0, 0, 0], "q99": [1, 2, 4, 1, 1, 1, 1], "mask": [1, 1, 1, 1, 1, 1, 0]}
    )
    actions = np.array([[0.5, -2.0, 4.0, 3.0, -3.0, 0.5, 0.7]])
    normalized = normalizer.normalize(actions)
    np.testing.assert_allclose(normalized, [[0.5, -1.0, 1.0, 1.0, -1.0, 0.0, 0.7]])
    restored = normalizer.unnormalize(normalized)
    np.testing.assert_allclose(restored[0, :3], [0.5, -2.0, 4.0])
    assert restored[0, 6] == pytest.approx(0.7)  # gripper passes through unchanged


def test_degenerate_dimension_normalises_to_zero() -> None:
    normalizer = ActionNormalizer.from_stats({"q01": [0.3, 0.0], "q99": [0.3, 1.0], "mask": [True, True]})
    np.testing.assert_allclose(normalizer.normalize(np.array([0.3, 0.5])), [0.0, 0.0])
    np.testing.assert_allclose(normalizer.unnormalize(np.array([0.0, 0.0])), [0.3, 0.5])


def test_normalizer_rejects_inverted_bounds() -> None:
    with pytest.raises(ValueError, match="q99 must be >= q01"):
        ActionNormalizer.from_stats({"q01": [1.0], "q99": [0.0], "mask": [True]})


def test_select_unnorm_key_errors_list_available_keys() -> None:
    stats = {"bridge_orig": {}, "fractal": {}}
    assert select_unnorm_key({"only": {}}, None) == "only"
    assert select_unnorm_key(stats, "fractal") == "fractal"
    with pytest.raises(UnnormKeyError, match="available keys: bridge_orig, fractal"):
        select_unnorm_key(stats, None)
    with pytest.raises(UnnormKeyError, match="'libero' not found; available keys: bridge_orig, fractal"):
        select_unnorm_key(stats, "libero")
    with pytest.raises(UnnormKeyError, match="no action statistics"):
        select_unnorm_key({}, None)


def test_statistics_match_hand_computation() -> None:
    actions = np.arange(700, dtype=np.float64).reshape(100, 7)
    stats = compute_action_statistics(actions, num_trajectories=4)
    assert stats["num_transitions"] == 100 and stats["num_trajectories"] == 4
    np.testing.assert_allclose(stats["action"]["mean"], actions.mean(0))
    np.testing.assert_allclose(stats["action"]["q01"], np.quantile(actions, 0.01, axis=0))
    np.testing.assert_allclose(stats["action"]["q99"], np.quantile(actions, 0.99, axis=0))
    assert stats["action"]["mask"] == [True] * 6 + [False]
    with pytest.raises(ValueError, match="NaN"):
        compute_action_statistics(np.full((3, 7), np.nan), 1)
