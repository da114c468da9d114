"""Offline expert demonstrations: bags the converter reads with the pipeline's config, contents as simulated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from openvla_ros.dataset import convert_bags, load_config
from openvla_ros.finetune.data import decode_image, load_frames, open_rlds
from openvla_ros.sim import ScriptedExpert, TabletopRenderer, TabletopScene
from openvla_ros.sim.demos import record_expert_episodes, scene_state

REPO = Path(__file__).resolve().parents[1]


def test_expert_episodes_convert_with_the_pipeline_config_step_for_step(tmp_path: Path) -> None:
    from openvla_ros.model.processor import ImageTransform

    seed = (0, 0)
    episodes = record_expert_episodes(tmp_path / "bags", [seed, (0, 1)], task="reach")
    assert [e.seed for e in episodes] == [seed, (0, 1)] and all(e.success for e in episodes)
    config = load_config(REPO / "config" / "pipeline.yaml", val_fraction=0.0)
    assert convert_bags([episodes[0].path], tmp_path / "data", "sim_demo", config).episodes == 1
    frames = load_frames(open_rlds(tmp_path / "data", "sim_demo"), "train")
    # the episode again, step by step, as the expert ran it
    scene, renderer, expert = TabletopScene(), TabletopRenderer(), ScriptedExpert()
    task = scene.reset(seed=seed, task="reach")
    expert.reset(seed=seed)
    images, actions, states = [], [], []
    while scene.status == "running":
        images.append(renderer.render(scene))
        states.append(scene_state(scene))
        actions.append(expert.act(scene))
        scene.apply_action(actions[-1])
    assert len(frames) == len(actions) == episodes[0].steps, "every step is kept, none shifted"
    assert all(f.instruction == task.instruction for f in frames)
    np.testing.assert_allclose(np.stack([f.action for f in frames]), np.stack(actions), atol=1e-9)
    np.testing.assert_allclose(np.stack([f.state for f in frames]), np.stack(states), atol=1e-6)
    transform = ImageTransform()
    for frame, image in zip(frames, images, strict=True):
        stored = decode_image(frame.image).astype(float)
        assert np.abs(stored - transform.model_image(image).astype(float)).mean() < 3.0, "the rendered frame (JPEG)"


def test_failed_expert_episodes_are_left_out_unless_asked(tmp_path: Path) -> None:
    kept = record_expert_episodes(tmp_path / "a", [(0, 3)], task="reach", expert_noise=0.5)
    every = record_expert_episodes(tmp_path / "b", [(0, 3)], task="reach", expert_noise=0.5, keep_failures=True)
    assert len(every) == 1 and len(kept) == (1 if every[0].success else 0)


def test_episodes_are_recorded_with_the_asked_number_of_blocks(tmp_path: Path) -> None:
    from openvla_ros.sim.scene import COLORS

    config = load_config(REPO / "config" / "pipeline.yaml", val_fraction=0.0)
    for blocks in (1, 3):
        episodes = record_expert_episodes(tmp_path / f"bags{blocks}", [(0, 5)], task="reach", num_blocks=blocks)
        convert_bags([episodes[0].path], tmp_path / f"data{blocks}", "sim_demo", config)
        image = decode_image(load_frames(open_rlds(tmp_path / f"data{blocks}", "sim_demo"), "train")[0].image)
        seen = [name for name, rgb in COLORS.items()
                if (np.abs(image.astype(int) - np.array(rgb)).max(axis=-1) < 30).sum() > 20]
        assert len(seen) == blocks, f"{blocks} block(s) asked, colours seen in the first frame: {seen}"


def _bag_bytes(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_recording_in_several_processes_writes_the_same_bags_in_the_same_order(tmp_path: Path) -> None:
    # noise high enough that some of these seeds fail: the left-out numbers must match too
    seeds = [(0, n) for n in range(7)]
    one = record_expert_episodes(tmp_path / "one", seeds, task="reach", expert_noise=0.1)
    two = record_expert_episodes(tmp_path / "two", seeds, task="reach", expert_noise=0.1, workers=2)
    assert [(e.path.name, e.seed, e.steps, e.instruction) for e in two] == \
        [(e.path.name, e.seed, e.steps, e.instruction) for e in one]
    assert 0 < len(one) < len(seeds), "some of these seeds fail at this noise"
    assert [e.seed for e in two] == sorted(e.seed for e in two), "returned in seed order"
    assert _bag_bytes(tmp_path / "two") == _bag_bytes(tmp_path / "one")
    with pytest.raises(ValueError, match="workers must be >= 1"):
        record_expert_episodes(tmp_path / "none", seeds, workers=0)


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_signal_stops_every_recording_process_at_once(tmp_path: Path, signal_name: str) -> None:
    import signal
    import subprocess
    import sys
    import time

    from process_helpers import signal_when

    out = tmp_path / "bags"
    script = ("import sys\nfrom openvla_ros.interrupts import termination_as_interrupt\n"
              "from openvla_ros.sim.demos import record_expert_episodes\n"
              "with termination_as_interrupt():\n"
              f"    record_expert_episodes({str(out)!r}, [(0, n) for n in range(400)], workers=2)\n")
    log = tmp_path / "record.log"
    with open(log, "wb") as output:
        process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=output, stderr=subprocess.STDOUT)
    signal_when(process, lambda: out.is_dir() and len(list(out.iterdir())) >= 4, getattr(signal, signal_name),
                "once the workers are writing bags", log.read_text)
    assert process.returncode != 0, "stopped before its 400 episodes"
    time.sleep(1.0)
    written = sorted(p.name for p in out.iterdir())
    time.sleep(3.0)
    assert sorted(p.name for p in out.iterdir()) == written, "no worker went on writing after the caller stopped"
    assert len(written) < 200
