"""Checkpoint selection by closed-loop success: keep the weights that act best, not the last ones.

Validation loss says little about whether a policy reaches its goal: two runs with the same val L1 can
succeed 8/20 and 0/20 in closed loop. During training, :class:`ClosedLoopSelection` runs a policy
built from the current weights on a fixed set of validation episodes every ``every`` steps (and at the
last step), keeps a copy of the trainable weights with the most successes (ties: the lower val L1, then
the earlier step), and puts them back before the model is written. The curve (success and val L1
against step) goes into the run's report.

The validation episodes must never be those a reported figure uses; the callers (the pretraining build
and the pipeline) draw them from seeds of their own, and their tests check that the sets are disjoint.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

SELECTION_JSON = "selection.json"
SELECTION_WEIGHTS = "selection_best.pt"


@dataclass(frozen=True)
class SelectionPoint:
    """One closed-loop validation during training."""

    step: int
    successes: int
    episodes: int
    val_l1: float | None = None

    @property
    def rate(self) -> float:
        return self.successes / self.episodes if self.episodes else 0.0

    def better_than(self, other: SelectionPoint | None) -> bool:
        """More successes wins; equal successes: the lower val L1 (an unknown L1 never wins a tie)."""
        if other is None:
            return True
        if self.successes != other.successes:
            return self.successes > other.successes
        mine = math.inf if self.val_l1 is None else self.val_l1
        theirs = math.inf if other.val_l1 is None else other.val_l1
        return mine < theirs


class ClosedLoopSelection:
    """Closed-loop validation every ``every`` steps; the best weights are kept (see the module docstring).

    Args:
        evaluate: takes a policy built from the current weights, returns (successes, episodes).
        every: steps between validations (the last step is always validated).
        directory: where the curve and the best weights are kept, so a resumed run goes on with them.
    """

    def __init__(self, evaluate: Callable[[Any], tuple[int, int]], every: int, directory: Path | None = None) -> None:
        if every < 1:
            raise ValueError(f"selection every must be >= 1 step, got {every}")
        self.evaluate = evaluate
        self.every = every
        self.directory = directory
        self.curve: list[SelectionPoint] = []
        self.best: SelectionPoint | None = None
        self.best_state: dict[str, torch.Tensor] | None = None

    def due(self, step: int, max_steps: int) -> bool:
        return step % self.every == 0 or step == max_steps

    def consider(self, point: SelectionPoint, weights: Callable[[], dict[str, torch.Tensor]]) -> bool:
        """Adds ``point`` to the curve; keeps ``weights()`` when it is the best so far. Returns whether it is."""
        self.curve.append(point)
        improved = point.better_than(self.best)
        if improved:
            self.best = point
            self.best_state = {name: tensor.detach().to("cpu", copy=True) for name, tensor in weights().items()}
        self._save(improved)
        return improved

    def as_dict(self) -> dict[str, Any]:
        return {"every": self.every, "curve": [asdict(p) | {"rate": p.rate} for p in self.curve],
                "best": None if self.best is None else asdict(self.best) | {"rate": self.best.rate}}

    def _save(self, weights_changed: bool) -> None:
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        if weights_changed and self.best_state is not None:
            staging = self.directory / (SELECTION_WEIGHTS + ".new")
            torch.save(self.best_state, staging)
            staging.replace(self.directory / SELECTION_WEIGHTS)
        staging = self.directory / (SELECTION_JSON + ".new")
        staging.write_text(json.dumps(self.as_dict(), indent=1))
        staging.replace(self.directory / SELECTION_JSON)

    def restore(self, up_to_step: int) -> None:
        """Takes back what a previous run of the same training kept (validations up to ``up_to_step``)."""
        if self.directory is None or not (self.directory / SELECTION_JSON).is_file():
            return
        saved = json.loads((self.directory / SELECTION_JSON).read_text())
        fields = ("step", "successes", "episodes", "val_l1")
        self.curve = [SelectionPoint(**{k: p[k] for k in fields}) for p in saved["curve"] if p["step"] <= up_to_step]
        best = saved.get("best")
        weights = self.directory / SELECTION_WEIGHTS
        if best and best["step"] <= up_to_step and weights.is_file():
            self.best = SelectionPoint(**{k: best[k] for k in fields})
            self.best_state = torch.load(weights, map_location="cpu", weights_only=True)


def plot_curve(curves: dict[str, dict[str, Any]], path: Path, title: str) -> Path:
    """Draws success rate (and val L1) against step for one or more selections' ``as_dict()``; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, success_axis = plt.subplots(figsize=(7, 4))
    l1_axis = success_axis.twinx()
    for label, selection in curves.items():
        points = selection.get("curve", [])
        steps = [p["step"] for p in points]
        line = success_axis.plot(steps, [p["rate"] for p in points], marker="o", label=f"{label}: success")[0]
        l1 = [(p["step"], p["val_l1"]) for p in points if p.get("val_l1") is not None]
        if l1:
            l1_axis.plot(*zip(*l1, strict=True), linestyle="--", color=line.get_color(), label=f"{label}: val L1")
        best = selection.get("best")
        if best:
            success_axis.scatter([best["step"]], [best["rate"]], s=120, facecolors="none", edgecolors="black",
                                 zorder=5, label=f"{label}: kept (step {best['step']})")
    success_axis.set_xlabel("training step")
    success_axis.set_ylabel("closed-loop success on validation episodes")
    success_axis.set_ylim(-0.02, 1.02)
    l1_axis.set_ylabel("val L1 (dashed)")
    handles = success_axis.get_legend_handles_labels()
    extra = l1_axis.get_legend_handles_labels()
    success_axis.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=7, loc="lower right")
    success_axis.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
