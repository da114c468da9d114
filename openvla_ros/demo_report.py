"""What ``make demo`` shows: its readings, the live line, the summary and ``episode.png``."""

from __future__ import annotations

import math
import sys
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Readings:
    """What the demo has seen on the topics, with arrival times (monotonic seconds)."""

    actions: deque = field(default_factory=lambda: deque(maxlen=10_000))
    poses: deque = field(default_factory=lambda: deque(maxlen=20_000))
    policy_status: dict[str, str] = field(default_factory=dict)
    task_status: dict[str, str] = field(default_factory=dict)
    first_frame: Any = None
    last_frame: Any = None
    lock: threading.Lock = field(default_factory=threading.Lock)


def action_rate(times: list[float], now: float, window_s: float = 2.0) -> float:
    """Returns the arrival rate (Hz) of the events in the last ``window_s`` seconds before ``now``."""
    recent = [t for t in times if now - window_s <= t <= now]
    if len(recent) < 2:
        return 0.0
    return (len(recent) - 1) / (recent[-1] - recent[0]) if recent[-1] > recent[0] else 0.0


def format_action(action: np.ndarray | None) -> str:
    if action is None or len(action) != 7:
        return "[no action yet]"
    translation = " ".join(f"{v * 1000:+5.1f}" for v in action[:3])
    rotation = " ".join(f"{v:+.2f}" for v in action[3:6])
    return f"[d(mm) {translation} | rot {rotation} | grip {action[6]:+.2f}]"


def live_line(elapsed_s: float, readings: Readings, now: float) -> str:
    """Returns the one-line status printed every second."""
    with readings.lock:
        times = [t for t, _ in readings.actions]
        last = readings.actions[-1][1] if readings.actions else None
        policy = dict(readings.policy_status)
        task = dict(readings.task_status)
    rate = action_rate(times, now)
    latency = policy.get("inference_latency_ms_last", "nan")
    image_age = policy.get("image_age_s", "nan")
    state = task.get("status", "?")
    distance = task.get("goal_distance_m", "?")
    return (
        f"t={elapsed_s:4.0f}s  rate {rate:4.1f} Hz  latency {float(latency):6.1f} ms  "
        f"image age {float(image_age):5.3f} s  action {format_action(last)}  "
        f"task {state} (steps {task.get('steps', '?')}, distance {distance} m)"
    )


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else math.nan


def control_intervals(times: np.ndarray, resets: Sequence[tuple[float, float]]) -> np.ndarray:
    """Returns a mask of the intervals ``times[k] -> times[k + 1]`` that are control periods.

    An interval that reaches into a reset window ``(disable requested, enabled again)`` is not: the zero
    delta that disabling publishes comes right after the last action (a point at ~100 Hz) and the first
    action of the next episode long after it. ``resets`` are on the same clock as ``times``.
    """
    keep = np.ones(max(len(times) - 1, 0), dtype=bool)
    for disabled, enabled in resets:
        keep &= ~((times[1:] >= disabled) & (times[:-1] <= enabled))
    return keep


def save_episode_png(path: Path, readings: Readings, instruction: str, start: float, rate_hz: float,
                     resets: Sequence[tuple[float, float]] = ()) -> Path:
    """Saves a figure of the episode: last camera frame with the gripper path, actions, action timing.

    ``resets`` are the ``(disabled, enabled again)`` times of the episode resets (monotonic): they are
    marked, and the rate panel leaves their intervals out.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from openvla_ros.ros.ros_conversions import message_to_rgb
    from openvla_ros.sim.render import CameraModel

    with readings.lock:
        actions = list(readings.actions)
        poses = list(readings.poses)
        frame = readings.last_frame
        task = dict(readings.task_status)
    figure, (camera_axis, action_axis, timing_axis) = plt.subplots(
        1, 3, figsize=(17, 4.8), gridspec_kw={"width_ratios": [1.35, 1, 1]}
    )
    if frame is not None:
        rgb = message_to_rgb(frame)
        camera_axis.imshow(rgb)
        camera = CameraModel(width=rgb.shape[1], height=rgb.shape[0])
        path_poses = [p for t, p in poses if t >= start]
        if path_poses:
            pixels = np.array([camera.project(x, y, 0.0) for x, y, _ in path_poses])
            camera_axis.plot(pixels[:, 0], pixels[:, 1], color="white", linewidth=1.5, label="gripper path (on the table)")
            camera_axis.plot(*pixels[0], "o", color="lime", label="start")
            camera_axis.plot(*pixels[-1], "x", color="magenta", markersize=9, label="end")
            # below the image, so it hides nothing of the scene or the path
            camera_axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.01), ncol=3, fontsize=8, frameon=False)
    camera_axis.set_title(f'"{instruction}": {task.get("status", "?")}', fontsize=10)
    camera_axis.axis("off")

    if actions:
        times = np.array([t - start for t, _ in actions])
        values = np.array([a for _, a in actions])
        for index, label in enumerate(("dx", "dy", "dz")):
            action_axis.plot(times, values[:, index] * 1000, label=f"{label} (mm)")
        action_axis.plot(times, values[:, 6] * 10, "--", label="gripper x10")
        intervals = np.diff(times)
        keep = control_intervals(times + start, resets)
        if keep.any():
            timing_axis.plot(times[1:][keep], 1.0 / np.maximum(intervals[keep], 1e-3), ".", label="achieved (Hz)")
        for number, (disabled, enabled) in enumerate(resets):
            end = enabled if math.isfinite(enabled) else max(disabled, times[-1] + start)
            for axis in (action_axis, timing_axis):
                axis.axvspan(disabled - start, end - start, color="grey", alpha=0.15,
                             label="episode reset (not in the rate)" if number == 0 and axis is timing_axis else None)
    timing_axis.axhline(rate_hz, color="grey", linestyle=":", label=f"target {rate_hz:g} Hz")
    action_axis.set_xlabel("time (s)")
    action_axis.set_title("actions", fontsize=10)
    action_axis.legend(fontsize=8)
    timing_axis.set_xlabel("time (s)")
    timing_axis.set_ylabel("Hz")
    timing_axis.set_title("action rate (1 / interval)", fontsize=10)
    timing_axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def print_summary(
    readings: Readings, start: float, elapsed: float, rate_hz: float, random_model: bool,
    finished: list[dict[str, str]] = (),
) -> None:
    with readings.lock:
        times = [t for t, _ in readings.actions if t >= start]
        policy = dict(readings.policy_status)
        task = dict(readings.task_status)
    rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0
    print("summary:", flush=True)
    print(f"  actions: {len(times)} in {elapsed:.1f} s, {rate:.2f} Hz achieved (target {rate_hz:g} Hz)")
    print(
        f"  model latency median {float(policy.get('inference_latency_ms_median', 'nan')):.1f} ms, "
        f"image-to-action median {float(policy.get('image_to_action_latency_ms_median', 'nan')):.1f} ms, "
        f"dropped camera frames {policy.get('dropped_frames', '?')}, skipped ticks {policy.get('skipped_ticks', '?')}"
    )
    successes = sum(episode.get("status") == "success" for episode in finished)
    for number, episode in enumerate(finished, start=1):
        print(f'  episode {number} "{episode.get("instruction", "?")}": {episode.get("status")} after '
              f"{episode.get('steps', '?')} steps")
    if finished:
        print(f"  success {successes}/{len(finished)} finished episodes")
    if task and task.get("episode") not in {episode.get("episode") for episode in finished}:
        print(f'  episode "{task.get("instruction", "?")}" (unfinished at the end): {task.get("status", "?")} '
              f"after {task.get('steps', '?')} steps, goal distance {task.get('goal_distance_m', '?')} m")
    if random_model:
        print(
            "  (the tiny model is random and untrained: it is not expected to solve the task; "
            "make pretrained builds a pretrained tiny base, make pipeline fine-tunes a model on expert "
            "demonstrations; either is used by make demo once it exists)"
        )
    sys.stdout.flush()
