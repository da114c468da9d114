"""Tiny RLDS datasets for the training tests, written with the package's own RldsWriter.

Each episode moves a red or green block (by episode parity) across the primary camera, with a 7-DoF
action whose signs follow the colour, so a model can learn to tell the two apart; optional wrist camera
and state make OFT-style inputs.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from openvla_ros.dataset.rlds_writer import EpisodeStep, RldsWriter

COLOURS = {"red": (230, 30, 30), "green": (30, 200, 60)}
EPISODES = 6


def jpeg(image: np.ndarray) -> bytes:
    """Returns ``image`` as JPEG bytes (quality 95), as the converter stores frames."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def toy_action(sign: float, t: int, steps: int, dz_ramp: bool = False) -> np.ndarray:
    """The action of step ``t``: dx/dz/dyaw signed by the colour, a cosine dy, the gripper closing halfway."""
    dz = 0.002 * sign * (t if dz_ramp else 1)
    return np.array([0.01 * sign, 0.004 * np.cos(t), dz, 0.0, 0.0, 0.05 * sign, float(t >= steps // 2)])


def toy_episode(index: int, steps: int, x_start: int, x_step: int, extras: bool = False,
                dz_ramp: bool = False) -> list[EpisodeStep]:
    """Returns episode ``index``: the block at x = ``x_start + x_step * t``; ``extras`` adds a wrist camera
    (a colour band that widens) and a 3-value state."""
    colour = "red" if index % 2 == 0 else "green"
    sign = 1.0 if colour == "red" else -1.0
    episode = []
    for t in range(steps):
        image = np.full((224, 224, 3), 40, np.uint8)
        x = x_start + x_step * t
        image[90:140, x:x + 40] = COLOURS[colour]
        images = {"image": jpeg(image)}
        state = None
        if extras:
            wrist = np.full((224, 224, 3), 90, np.uint8)
            wrist[:, : 20 + 20 * t] = COLOURS[colour]
            images["wrist_image"] = jpeg(wrist)
            state = np.array([t / steps, sign, 0.5 + 0.01 * index])
        episode.append(EpisodeStep(images=images, action=toy_action(sign, t, steps, dz_ramp),
                                   instruction=f"move to the {colour} block", state=state))
    return episode


def write_toy_dataset(data_dir: Path, name: str, steps: int, x_start: int, x_step: int, extras: bool = False,
                      dz_ramp: bool = False) -> Path:
    """Writes :data:`EPISODES` toy episodes as dataset ``name`` (train + val) into ``data_dir``; returns it."""
    keys = ["image", "wrist_image"] if extras else ["image"]
    with RldsWriter(data_dir, name, image_keys=keys) as writer:
        for index in range(EPISODES):
            writer.add_episode(toy_episode(index, steps, x_start, x_step, extras, dz_ramp),
                               file_path=f"episode_{index}", start_time_ns=index)
        writer.finish(val_fraction=0.34, seed=0)
    return data_dir
