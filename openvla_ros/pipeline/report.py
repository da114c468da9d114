"""The pipeline's report: what a run measured, its output folder and stage timing, success intervals,
the trajectory and training plots and the summary table."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from openvla_ros.pipeline.settings import MARKER, PipelineError

# The closed-loop runs on the same fresh episodes, in report order, with their plot colours.
POLICY_RUNS: tuple[tuple[str, str], ...] = (
    ("base", "tab:gray"),
    ("fine_tuned", "tab:orange"),
    ("fine_tuned_energy", "tab:green"),
)


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """Returns the Wilson score interval (95% for the default z) of a success rate."""
    if trials == 0:
        return 0.0, 1.0
    rate = successes / trials
    centre = (rate + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * np.sqrt(rate * (1 - rate) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def expert_path(seed: tuple[int, int], task: str) -> list[list[float]]:
    """Returns the noise-free expert's fingertip x/y path on an episode (the reference in the plot)."""
    from openvla_ros.sim import ScriptedExpert, TabletopScene

    scene, expert = TabletopScene(), ScriptedExpert()
    scene.reset(seed=seed, task=task)
    path = [scene.ee_position[:2].tolist()]
    while scene.status == "running":
        scene.apply_action(expert.act(scene))
        path.append(scene.ee_position[:2].tolist())
    return path


# ------------------------------------------------------------------------------------------ plots


def plot_trajectories(results: dict[str, Any], task: str, path: Path, max_panels: int = 8) -> Path:
    """Writes overhead x/y paths of both policies and the expert against the blocks, one panel per episode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle, Rectangle

    from openvla_ros.sim import COLORS, SceneConfig

    scene_config = SceneConfig()
    count = min(max_panels, len(results["seeds"]))
    columns = min(4, count)
    rows = (count + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 4.2 * rows), squeeze=False)
    for index, axis in enumerate(axes.flat):
        if index >= count:
            axis.axis("off")
            continue
        tuned = results["fine_tuned"]["episodes"][index]
        half_x, half_y = scene_config.x_half_extent, scene_config.y_half_extent
        axis.add_patch(Rectangle((-half_x, -half_y), 2 * half_x, 2 * half_y, fill=False, color="0.6"))
        size = scene_config.block_size
        for color, (x, y) in tuned["blocks"].items():
            axis.add_patch(Rectangle((x - size / 2, y - size / 2), size, size, color=np.array(COLORS[color]) / 255))
        target = tuned["target_xy"]
        axis.add_patch(Circle(target, scene_config.reach_tolerance, fill=False, linestyle=":", color="black"))
        reference = np.array(expert_path(tuple(tuned["seed"]), task))
        axis.plot(reference[:, 0], reference[:, 1], color="black", linewidth=0.8, linestyle=":", label="expert")
        for key, color in POLICY_RUNS:
            if key not in results:
                continue
            episode, label = results[key]["episodes"][index], key.replace("_", "-")
            xy = np.array(episode["path_xy"])
            outcome = "ok" if episode["success"] else "fail"
            axis.plot(xy[:, 0], xy[:, 1], color=color, linewidth=1.5, label=f"{label} ({outcome})")
            axis.plot(xy[-1, 0], xy[-1, 1], marker="x", color=color)
        axis.plot(*tuned["path_xy"][0], marker="o", color="black")
        axis.set_title(f"{tuned['instruction']}\nseed {tuple(tuned['seed'])}", fontsize=8)
        axis.set_xlim(-half_x - 0.01, half_x + 0.01)
        axis.set_ylim(-half_y - 0.01, half_y + 0.01)
        axis.set_aspect("equal")
        axis.tick_params(labelsize=6)
        # below the table, so it hides no block, path or target
        axis.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, frameon=False)
    figure.suptitle("closed loop, overhead view (x right, y up, metres): start o, end x, target circle")
    figure.tight_layout(rect=(0, 0, 1, 0.94))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80, bbox_inches="tight")  # "tight" keeps the legends below the panels
    plt.close(figure)
    return path


def plot_training_curve(curve: list[dict[str, Any]], path: Path) -> Path:
    """Writes loss and action-token accuracy against the step, train and val."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    # token models: loss, action-token accuracy, L1; OFT models: L1 loss, first and last chunk step
    keys = ("loss", "action_accuracy", "l1_normalized")
    if curve and not any("action_accuracy" in point for point in curve):
        keys = ("loss", "l1_first_step", "l1_last_step")
    for split, style in (("train", "-"), ("val", "o--")):
        points = [p for p in curve if p["split"] == split]
        if not points:
            continue
        steps = [p["step"] for p in points]
        for axis, key in zip(axes, keys, strict=True):
            axis.plot(steps, [p.get(key, float("nan")) for p in points], style, label=split)
            axis.set_title(key)
            axis.set_xlabel("step")
            axis.grid(alpha=0.3)
    axes[0].legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


# ------------------------------------------------------------------------------------------ report


def format_table(report: Any) -> str:
    """Returns the final summary table of a :class:`openvla_ros.pipeline.Report`."""
    lines = ["", "=" * 72, "pipeline summary", "=" * 72, "stage timings (s):"]
    lines += [f"  {name:<22} {seconds:8.1f}" for name, seconds in report.timings_s.items()]
    dataset = report.dataset
    if dataset:
        lines.append(f"dataset: {dataset['name']}: {dataset['episodes']} episodes, {dataset['steps']} steps "
                     f"(train {dataset['splits'].get('train', 0)} / val {dataset['splits'].get('val', 0)} "
                     f"episodes), bags {dataset.get('bag_megabytes', 0):.1f} MB")
    training = report.training
    if training:
        last = training["last"]
        train, val = last.get("train", {}), last.get("val", {})
        before = training["val_before"]
        lines.append(f"training ({training.get('action_head', 'tokens')} head): {training['steps']} steps x batch "
                     f"{training['batch_size']} ({training['epochs']} epochs of {training['train_frames']} frames, "
                     f"{training['samples_per_s']} samples/s)")
        line = f"  val loss {before['loss']:.3f} -> {val.get('loss', float('nan')):.3f}"
        if "action_accuracy" in before:
            line += (f"; val action-token accuracy {before['action_accuracy']:.3f} -> "
                     f"{val.get('action_accuracy', float('nan')):.3f}")
        line += (f"; val L1 (normalised) {before['l1_normalized']:.3f} -> "
                 f"{val.get('l1_normalized', float('nan')):.3f}")
        lines.append(line)
        lines.append(f"  last train loss {train.get('loss', float('nan')):.3f}")
        selection = training.get("selection")
        if selection and selection.get("best"):
            kept = selection["best"]
            curve = ", ".join(f"{p['step']}: {p['successes']}/{p['episodes']}" for p in selection["curve"])
            lines.append(f"  kept step {kept['step']} ({kept['successes']}/{kept['episodes']} validation episodes); "
                         f"success by step: {curve}")
    if report.offline:
        offline = report.offline
        per_dimension = offline.get("l1_per_dimension")
        text = f"offline (training/evaluate.py, val): L1 mean {offline['l1_mean']:.4f}"
        if "token_accuracy" in offline:
            text += f", token accuracy {offline['token_accuracy']:.3f}"
        if "num_windows" in offline:
            text += f" over {offline['num_windows']} chunk windows of {offline['chunk_size']} steps"
        else:
            text += f" over {offline['num_steps']} steps"
        lines.append(text)
        if isinstance(per_dimension, dict):
            lines.append("  L1 per dimension: " + ", ".join(f"{k} {v:.4f}" for k, v in per_dimension.items()))
        energy = offline.get("energy") or {}
        if "l1_corrected" in energy:
            lines.append(f"  with {energy['steps']} energy step(s): L1 {energy['l1_uncorrected']:.4f} -> "
                         f"{energy['l1_corrected']:.4f}")
    if report.energy:
        val = report.energy["last"].get("val") or report.energy["last"].get("train", {})
        lines.append(f"energy model: {report.energy['steps']} steps; E_pos {val.get('energy_positive', float('nan')):.3f} "
                     f"vs E_neg {val.get('energy_negative', float('nan')):.3f}, retrieval accuracy "
                     f"{val.get('retrieval_accuracy', float('nan')):.3f}")
    loop = report.closed_loop
    if loop:
        total = len(loop["seeds"])
        lines.append(f"closed loop ({loop['mode']}, {loop['policy']}, {total} fresh episodes):")
        for label, _ in POLICY_RUNS:
            if label not in loop:
                continue
            entry = loop[label]
            low, high = entry["ci95"]
            lines.append(f"  {label:<17} success {entry['successes']:>3}/{total} = {100 * entry['success_rate']:5.1f} %"
                         f"  (95% CI {100 * low:.0f}-{100 * high:.0f} %, {entry['ms_per_step']} ms/step)")
    if report.node_check:
        check = report.node_check
        lines.append(f"node check ({check['mode']}): fine-tuned success {check['successes']}/{len(check['episodes'])}")
    lines.append(f"total: {sum(report.timings_s.values()):.1f} s")
    lines += [f"{name}: {path}" for name, path in report.files.items()]
    return "\n".join(lines)

@dataclass
class Report:
    """Everything the run measured; written as ``report.json``."""

    settings: dict[str, Any]
    timings_s: dict[str, float] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    offline: dict[str, Any] = field(default_factory=dict)
    closed_loop: dict[str, Any] = field(default_factory=dict)
    node_check: dict[str, Any] = field(default_factory=dict)
    energy: dict[str, Any] = field(default_factory=dict)
    determinism: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ helpers


def prepare_out_dir(out: Path) -> None:
    """Empties the pipeline's output directory (only one that a previous run created).

    Raises:
        PipelineError: when ``out`` exists, is not empty and was not made by the pipeline.
    """
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise PipelineError(f"{out} exists and was not created by the pipeline; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("created by python -m openvla_ros.pipeline; emptied on every run\n")


@contextmanager
def stage(report: Report, name: str, title: str) -> Iterator[None]:
    """Prints the stage's start, times it into ``report.timings_s[name]``."""
    print(f"\n=== {title} ===", flush=True)
    start = time.monotonic()
    try:
        yield
    finally:
        report.timings_s[name] = round(time.monotonic() - start, 1)
    print(f"--- {name}: {report.timings_s[name]:.1f} s", flush=True)
