"""Expert demonstrations of the simulated tabletop written straight to rosbag2 bags, without DDS.

Each episode is rendered by the same camera the ``sim_scene`` node publishes and written with
:func:`~openvla_ros.dataset.synthetic.write_episode_bag` in the layout of ``config/pipeline.yaml``
(JPEG camera, 7-DoF actions, the end effector's [x, y, z, yaw, gripper] as state, the instruction),
so the bags go through the same converter and trainer as a robot's recordings. Much faster than
recording over DDS in real time, for datasets of hundreds of episodes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from openvla_ros.sim.expert import ExpertConfig, ScriptedExpert
from openvla_ros.sim.render import TabletopRenderer
from openvla_ros.sim.scene import SceneConfig, TabletopScene


@dataclass(frozen=True)
class DemoEpisode:
    """One written demonstration."""

    path: Path
    seed: tuple[int, ...]
    instruction: str
    steps: int
    success: bool


# Written beside a model fine-tuned in the sim: the sim setting its demonstrations were recorded in.
SIM_SETUP_FILE = "sim_setup.json"


def write_sim_setup(model_dir: str | Path, camera_upside_down: bool) -> Path:
    """Records in ``model_dir`` the sim camera pose the model was fine-tuned with (read by ``make demo``)."""
    path = Path(model_dir) / SIM_SETUP_FILE
    path.write_text(json.dumps({"camera_upside_down": bool(camera_upside_down)}, indent=1) + "\n")
    return path


def read_sim_setup(model_dir: str | Path) -> dict:
    """Returns the sim setting recorded beside a model, ``{}`` when there is none (or it is unreadable)."""
    try:
        setup = json.loads((Path(model_dir) / SIM_SETUP_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return setup if isinstance(setup, dict) else {}


def scene_state(scene: TabletopScene) -> np.ndarray:
    """Returns the robot state the demonstrations record: fingertip x, y, z, yaw and gripper (1 = open)."""
    return np.array([*scene.ee_position, scene.ee_yaw, 1.0 if scene.gripper_open else 0.0])


def record_expert_episodes(out_dir: str | Path, seeds: Sequence[tuple[int, ...]], task: str = "reach",
                           expert_noise: float | None = None, keep_failures: bool = False,
                           num_blocks: int | None = None, workers: int = 1) -> list[DemoEpisode]:
    """Runs the scripted expert on each seeded episode and writes one bag per episode into ``out_dir``.

    Episodes the expert fails are not written unless ``keep_failures``. The camera is JPEG on
    /camera/image_raw/compressed, one step per 0.1 s (the pipeline's 10 Hz). ``num_blocks`` overrides
    the scene's number of blocks on the table (default: :class:`~openvla_ros.sim.scene.SceneConfig`'s).
    ``workers`` > 1 records in that many processes; each episode depends on its seed alone, so the
    bags and the returned list (in the order of ``seeds``) are the same for any number of workers.

    Raises:
        SceneError: for an unknown task.
        ValueError: for ``workers`` < 1.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    numbered = [(number, tuple(seed)) for number, seed in enumerate(seeds)]
    options = (task, expert_noise, keep_failures, num_blocks)
    workers = min(workers, len(numbered))
    if workers <= 1:
        return _record_numbered(out_dir, numbered, *options)
    import multiprocessing

    # spawn: the caller may hold torch's thread pools, which a forked child must not inherit. Leaving the
    # block on an error or a signal (SIGTERM, Ctrl-C) terminates the workers at once.
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_leave_interrupts_to_the_caller) as pool:
        parts = [pool.apply_async(_record_numbered, (out_dir, numbered[start::workers], *options))
                 for start in range(workers)]
        written = [episode for part in parts for episode in part.get()]
    return sorted(written, key=lambda episode: int(episode.path.name.rsplit("_", 1)[1]))


def _leave_interrupts_to_the_caller() -> None:
    """A worker ignores Ctrl-C (sent to the whole process group): the caller handles it and ends the pool."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _record_numbered(out_dir: Path, numbered: Sequence[tuple[int, tuple[int, ...]]], task: str,
                     expert_noise: float | None, keep_failures: bool, num_blocks: int | None) -> list[DemoEpisode]:
    """Records the episodes of the given (number, seed) pairs; each bag is named by its number."""
    from openvla_ros.dataset.synthetic import write_episode_bag

    scene = TabletopScene(SceneConfig() if num_blocks is None else SceneConfig(num_blocks=num_blocks))
    renderer = TabletopRenderer()
    config = ExpertConfig() if expert_noise is None else ExpertConfig(noise=expert_noise)
    written = []
    for number, seed in numbered:
        episode = scene.reset(seed=seed, task=task)
        expert = ScriptedExpert(config, seed=None)
        expert.reset(seed=seed)
        images, actions, states = [], [], []
        while scene.status == "running":
            images.append(renderer.render(scene))
            states.append(scene_state(scene))
            action = expert.act(scene)
            actions.append(action)
            scene.apply_action(action)
        success = scene.status == "success"
        if not success and not keep_failures:
            continue
        path = out_dir / f"episode_{number:04d}"
        write_episode_bag(path, images, actions, episode.instruction, states=states, encoding="jpeg",
                          start_ns=1_700_000_000_000_000_000 + number * 1_000_000_000_000)
        written.append(DemoEpisode(path, seed, episode.instruction, len(actions), success))
    return written
