"""Action codec shared by inference and training: tokens <-> normalised <-> physical actions.

OpenVLA discretises each normalised action dimension in [-1, 1] into 256 uniform bins and maps the
bins onto the LAST 256 ids of the unpadded Llama vocabulary, in reverse order (a = -1 is the highest
id). Physical actions are normalised per dimension with the BOUNDS_Q99 scheme: [q01, q99] maps to
[-1, 1] with clipping, and dimensions whose mask is False (the gripper) pass through unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from openvla_ros.errors import UnnormKeyError

ACTION_DIM = 7
ACTION_NAMES = ("dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper")
DEFAULT_MASK = (True, True, True, True, True, True, False)
# EEF_POS actions: the six pose dimensions are deltas, the gripper is absolute (1 = open, 0 = closed)
ABSOLUTE_DIMENSIONS = (False, False, False, False, False, False, True)


def neutral_action(last: np.ndarray) -> np.ndarray:
    """Returns the action that changes nothing after ``last``: zero deltas, the absolute gripper held.

    Dimensions past the seventh (another action space) count as deltas.
    """
    absolute = np.zeros(last.shape[-1], dtype=bool)
    absolute[: len(ABSOLUTE_DIMENSIONS)] = ABSOLUTE_DIMENSIONS[: last.shape[-1]]
    return np.where(absolute, last, 0.0).astype(last.dtype)


@dataclass(frozen=True)
class ActionTokenizer:
    """Maps normalised actions in [-1, 1] to token ids and back.

    Attributes:
        vocab_size: size of the unpadded vocabulary (32000 for Llama-2); the action ids are
            ``vocab_size - n_bins .. vocab_size - 1``.
        n_bins: number of bin edges (256).
    """

    vocab_size: int = 32000
    n_bins: int = 256
    bins: np.ndarray = field(init=False, repr=False, compare=False)
    bin_centers: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.n_bins < 2 or self.vocab_size <= self.n_bins:
            raise ValueError(
                f"ActionTokenizer needs 2 <= n_bins < vocab_size, got n_bins={self.n_bins}, "
                f"vocab_size={self.vocab_size}"
            )
        bins = np.linspace(-1.0, 1.0, self.n_bins)
        object.__setattr__(self, "bins", bins)
        object.__setattr__(self, "bin_centers", (bins[:-1] + bins[1:]) / 2.0)

    @property
    def first_action_id(self) -> int:
        """The smallest action-token id (31744 for Llama-2)."""
        return self.vocab_size - self.n_bins

    @property
    def last_action_id(self) -> int:
        """The largest action-token id (31999 for Llama-2)."""
        return self.vocab_size - 1

    def encode(self, normalized_actions: np.ndarray) -> np.ndarray:
        """Returns the token ids (int64, same shape) of normalised actions; values are clipped to [-1, 1]."""
        clipped = np.clip(np.asarray(normalized_actions, dtype=np.float64), -1.0, 1.0)
        return (self.vocab_size - np.digitize(clipped, self.bins)).astype(np.int64)

    def decode(self, token_ids: np.ndarray) -> np.ndarray:
        """Returns the normalised actions (float64, bin centres) of token ids.

        Ids outside the action range map to the nearest edge bin, as the official decoder does.
        """
        ids = np.asarray(token_ids, dtype=np.int64)
        index = np.clip(self.vocab_size - ids - 1, 0, self.bin_centers.shape[0] - 1)
        return self.bin_centers[index]


@dataclass(frozen=True)
class ActionNormalizer:
    """BOUNDS_Q99 normalisation of physical actions.

    Attributes:
        q01, q99: per-dimension 1st and 99th percentiles of the recorded actions.
        mask: per-dimension flag; False dimensions (the gripper) are not normalised.
    """

    q01: np.ndarray
    q99: np.ndarray
    mask: np.ndarray

    def __post_init__(self) -> None:
        q01 = np.asarray(self.q01, dtype=np.float64)
        q99 = np.asarray(self.q99, dtype=np.float64)
        mask = np.asarray(self.mask, dtype=bool)
        if not (q01.shape == q99.shape == mask.shape) or q01.ndim != 1:
            raise ValueError(
                f"ActionNormalizer: q01 {q01.shape}, q99 {q99.shape} and mask {mask.shape} must be "
                "1-D and of equal length"
            )
        if not (np.all(np.isfinite(q01)) and np.all(np.isfinite(q99))):
            raise ValueError("ActionNormalizer: q01 and q99 must be finite")
        if np.any(q99 < q01):
            raise ValueError("ActionNormalizer: q99 must be >= q01 in every dimension")
        object.__setattr__(self, "q01", q01)
        object.__setattr__(self, "q99", q99)
        object.__setattr__(self, "mask", mask)

    @classmethod
    def from_stats(cls, action_stats: Mapping[str, Any]) -> ActionNormalizer:
        """Builds a normaliser from an ``{"q01", "q99", "mask"?}`` dict (``norm_stats[key]["action"]``).

        Without a ``mask`` every dimension is (un-)normalised, the gripper included, as the official
        code does; statistics written by this package always carry the mask explicitly.

        Raises:
            ValueError: when q01/q99 are missing or malformed.
        """
        try:
            q01 = action_stats["q01"]
            q99 = action_stats["q99"]
        except KeyError as exc:
            raise ValueError(f"action statistics lack {exc.args[0]!r}; found keys {sorted(action_stats)}") from exc
        mask = action_stats.get("mask", [True] * len(q01))
        return cls(q01=np.asarray(q01), q99=np.asarray(q99), mask=np.asarray(mask))

    @property
    def dim(self) -> int:
        return int(self.q01.shape[0])

    def normalize(self, actions: np.ndarray) -> np.ndarray:
        """Returns actions mapped to [-1, 1] on masked dimensions (clipped); a dim with q01 == q99 becomes 0."""
        actions = np.asarray(actions, dtype=np.float64)
        span = self.q99 - self.q01
        degenerate = span == 0
        scaled = 2.0 * (actions - self.q01) / np.where(degenerate, 1.0, span) - 1.0
        scaled = np.where(degenerate, 0.0, np.clip(scaled, -1.0, 1.0))
        return np.where(self.mask, scaled, actions)

    def unnormalize(self, normalized: np.ndarray) -> np.ndarray:
        """Returns physical actions: 0.5 * (a + 1) * (q99 - q01) + q01 on masked dimensions."""
        normalized = np.asarray(normalized, dtype=np.float64)
        physical = 0.5 * (normalized + 1.0) * (self.q99 - self.q01) + self.q01
        return np.where(self.mask, physical, normalized)


def select_unnorm_key(norm_stats: Mapping[str, Any], unnorm_key: str | None) -> str:
    """Returns the statistics key to use.

    With ``unnorm_key=None`` the only key is chosen; with several keys the choice is ambiguous.

    Raises:
        UnnormKeyError: when the key is missing, or None while several keys exist, or none exist.
    """
    keys = sorted(norm_stats)
    if not keys:
        raise UnnormKeyError(
            "the checkpoint has no action statistics (norm_stats is empty); fine-tune it on a dataset "
            "or add its dataset_statistics.json to the checkpoint directory"
        )
    if unnorm_key is None:
        if len(keys) == 1:
            return keys[0]
        raise UnnormKeyError(
            f"the checkpoint has statistics for {len(keys)} datasets, so unnorm_key must be given; "
            f"available keys: {', '.join(keys)}"
        )
    if unnorm_key not in norm_stats:
        raise UnnormKeyError(f"unnorm_key {unnorm_key!r} not found; available keys: {', '.join(keys)}")
    return unnorm_key


def array_statistics(values: np.ndarray) -> dict[str, list[float]]:
    """Returns per-column mean, std, max, min, q01 and q99 (lists of floats) of an [N, D] array.

    Raises:
        ValueError: when ``values`` is empty, not 2-D or not finite.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] == 0:
        raise ValueError(f"need a non-empty [N, D] array, got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError("values contain NaN or inf")
    return {
        "mean": values.mean(axis=0).tolist(),
        "std": values.std(axis=0).tolist(),
        "max": values.max(axis=0).tolist(),
        "min": values.min(axis=0).tolist(),
        "q01": np.quantile(values, 0.01, axis=0).tolist(),
        "q99": np.quantile(values, 0.99, axis=0).tolist(),
    }


def compute_action_statistics(
    actions: np.ndarray, num_trajectories: int, mask: tuple[bool, ...] | None = None
) -> dict[str, Any]:
    """Returns OpenVLA-format statistics of an [N, D] action array.

    The result holds mean, std, max, min, q01, q99 and mask (lists of floats/bools) under
    ``"action"``, plus ``num_transitions`` and ``num_trajectories``.

    Raises:
        ValueError: when ``actions`` is empty, not 2-D or not finite.
    """
    actions = np.asarray(actions, dtype=np.float64)
    statistics = array_statistics(actions)
    if mask is None:
        mask = DEFAULT_MASK if actions.shape[1] == ACTION_DIM else (True,) * actions.shape[1]
    return {
        "action": {**statistics, "mask": [bool(m) for m in mask]},
        "num_transitions": int(actions.shape[0]),
        "num_trajectories": int(num_trajectories),
    }
