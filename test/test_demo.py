"""``make demo``: model choice, a short headless run, and clean-up of its child processes on SIGTERM."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest
from ros_helpers import reserve_domain_id

from openvla_ros.demo import ModelChoice, model_proprio_dim, resolve_model, resolve_unnorm_key

REPO = Path(__file__).resolve().parents[1]
LIVE_LINE = re.compile(
    r"^t=\s*\d+s  rate\s+[\d.]+ Hz  latency\s+([\d.]+|nan) ms  image age\s+([\d.]+|nan) s  "
    r"action \[.*\]  task (running|success|timeout) \(steps \d+, distance [\d.]+ m\)$"
)


def demo_env() -> dict[str, str]:
    return dict(
        os.environ,
        ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
        ROS_DOMAIN_ID=str(reserve_domain_id()),
        PYTHONUNBUFFERED="1",
    )


def run_make_demo(model: Path, demo_args: str) -> tuple[subprocess.CompletedProcess, str]:
    """Runs ``make demo`` on ``model`` as the README does; returns the result and its whole output, which
    must end with exit code 0."""
    command = ["make", "-s", "demo", f"MODEL={model}", f"DEMO_ARGS={demo_args}"]
    result = subprocess.run(command, cwd=REPO, env=demo_env(), capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return result, output


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by anyone) is not running either.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_model_choice_prefers_argument_then_fine_tuned_then_tiny(tmp_path: Path) -> None:
    tiny = resolve_model(None, tmp_path)
    assert tiny.source == "tiny" and tiny.needs_build and tiny.model == str(tmp_path / "tiny")
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text("{}")
    assert not resolve_model(None, tmp_path).needs_build
    pretrained = tmp_path / "tiny-pretrained"
    pretrained.mkdir()
    (pretrained / "config.json").write_text("{}")
    assert resolve_model(None, tmp_path).source == "tiny", "a base without its manifest is not finished"
    (pretrained / "pretrain.json").write_text("{}")
    assert resolve_model(None, tmp_path) == ModelChoice(str(pretrained), "pretrained")
    merged = tmp_path / "pipeline" / "merged"
    merged.mkdir(parents=True)
    (merged / "config.json").write_text("{}")
    assert resolve_model(None, tmp_path).model == str(merged)
    assert resolve_model("openvla/openvla-7b", tmp_path).model == "openvla/openvla-7b"


def test_an_oft_model_with_proprio_runs_episode_after_episode_on_the_sim_state(
    small_pretrained_base: Path, tmp_path: Path
) -> None:
    """The pretrained base is an OFT model with proprio: the demo feeds it the sim's joint states and
    starts a new episode whenever one ends, each outcome on its own line and counted in the summary."""
    assert model_proprio_dim(str(small_pretrained_base)) == 5 and model_proprio_dim(str(tmp_path)) == 0
    out = tmp_path / "demo"
    result, output = run_make_demo(small_pretrained_base,
                                   f"--duration 30 --out {out} --task reach --seed 4 --rate-hz 20")
    assert "proprio 5" in (out / "openvla_policy.log").read_text()
    assert "sim camera: upside down" not in output and "upside down" not in (out / "sim_scene.log").read_text()
    finished = re.findall(r'^episode (\d+): "move to the \w+ block" -> (success|timeout) after (\d+) steps$',
                          result.stdout, flags=re.MULTILINE)
    assert len(finished) >= 1, output  # 60 steps each: a loaded VM runs well below the 20 Hz set
    if len(finished) == 1 and 'episode 2: "move to the ' not in result.stdout:
        assert "(unfinished at the end)" not in result.stdout, "no new episode starts in the last 3 s"
    assert [int(number) for number, _, _ in finished] == list(range(1, len(finished) + 1))
    successes = sum(outcome == "success" for _, outcome, _ in finished)
    assert f"success {successes}/{len(finished)} finished episodes" in result.stdout


def test_unnorm_key_is_the_fine_tuned_dataset_when_there_are_several(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    assert resolve_unnorm_key(str(tiny_checkpoint)) == ""  # one key: the node picks it
    (tmp_path / "config.json").write_text(json.dumps({"norm_stats": {"tiny_demo": {}, "sim_tabletop": {}}}))
    assert resolve_unnorm_key(str(tmp_path)) == ""
    (tmp_path / "dataset_statistics.json").write_text(json.dumps({"sim_tabletop": {}}))
    assert resolve_unnorm_key(str(tmp_path)) == "sim_tabletop"
    assert resolve_unnorm_key("openvla/openvla-7b") == ""


def test_make_demo_runs_headless_prints_live_lines_and_saves_the_episode_png(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """The README's first command, as written there (with a short duration and a scratch output)."""
    out = tmp_path / "demo"
    result, output = run_make_demo(tiny_checkpoint, f"--duration 5 --out {out} --task reach --seed 2")
    live = [line for line in result.stdout.splitlines() if line.startswith("t=")]
    assert len(live) >= 4, output
    for line in live:
        assert LIVE_LINE.match(line), line
    assert any(float(re.search(r"rate\s+([\d.]+) Hz", line).group(1)) > 0 for line in live), output
    assert re.search(r'episode: "move to the \w+ block"', output)
    assert "summary:" in output and re.search(r"actions: \d+ in [\d.]+ s, [\d.]+ Hz achieved", output)
    image = cv2.imread(str(out / "episode.png"))
    assert image is not None and image.shape[0] > 300 and image.shape[1] > 1000
    assert "stopped sim_scene (exit 0), openvla_policy (exit 0)" in output
    assert (out / "sim_scene.log").is_file() and (out / "openvla_policy.log").is_file()


def test_a_model_fine_tuned_with_the_camera_upside_down_gets_that_camera(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """make pipeline writes the camera pose of its demonstrations beside the fine-tuned model; the demo
    runs the sim with that pose."""
    from openvla_ros.sim.demos import write_sim_setup

    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model)
    write_sim_setup(model, camera_upside_down=True)
    out = tmp_path / "demo"
    _, output = run_make_demo(model, f"--duration 3 --out {out} --task reach --seed 2")
    assert "sim camera: upside down, as the model was fine-tuned (sim_setup.json)" in output
    assert "(mounted upside down)" in (out / "sim_scene.log").read_text()


@pytest.mark.parametrize("to_group", [False, True], ids=["SIGTERM to the demo", "Ctrl-C in a terminal"])
def test_demo_stops_its_child_processes_when_terminated(tiny_checkpoint: Path, tmp_path: Path, to_group: bool) -> None:
    command = [sys.executable, "-m", "openvla_ros.demo", "--model", str(tiny_checkpoint), "--duration", "600"]
    command += ["--out", str(tmp_path / "demo")]
    process = subprocess.Popen(
        command, cwd=REPO, env=demo_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("started "):
                pids = [int(pid) for pid in re.findall(r"pid (\d+)", line)]
                break
        assert len(pids) == 2, "".join(lines)
        if to_group:  # a terminal's Ctrl-C reaches the demo and its children at once
            time.sleep(3.0)
            os.killpg(process.pid, signal.SIGINT)
        else:
            process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    output = "".join(lines) + rest
    assert process.returncode == 130, output
    assert f"stopped early ({'SIGINT' if to_group else 'SIGTERM'})" in output
    assert "stopped sim_scene" in output and "openvla_policy" in output
    for pid in pids:
        assert not pid_alive(pid), f"child {pid} still running\n{output}"


def test_the_rate_panel_leaves_the_intervals_around_a_reset_out() -> None:
    import numpy as np

    from openvla_ros.demo_report import control_intervals

    # 5 Hz control, disabled at 1.01 (its zero delta arrives at 1.02), enabled again at 3.0, then 5 Hz again
    times = np.array([0.2, 0.4, 0.6, 0.8, 1.0, 1.02, 3.1, 3.3, 3.5])
    keep = control_intervals(times, [(1.01, 3.0)])
    assert keep.tolist() == [True, True, True, True, False, False, True, True]
    rates = 1.0 / np.diff(times)[keep]
    assert np.allclose(rates, 5.0)  # without the mask: a 50 Hz point and a 0.5 Hz point
    assert control_intervals(times, []).all() and control_intervals(times[:1], []).size == 0
    final = control_intervals(times, [(3.45, float("inf"))])
    assert final.tolist() == [True] * 7 + [False]
