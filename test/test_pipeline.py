"""``make pipeline`` in its short form: every stage runs and leaves outputs that load.

The success target belongs to the full run; here the sizes are too small to learn anything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ros_helpers import reserve_domain_id

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_run(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Runs ``python -m openvla_ros.pipeline --quick`` on the tiny checkpoint; returns (out dir, stdout)."""
    out = tmp_path_factory.mktemp("pipeline") / "out"
    env = dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
               ROS_DOMAIN_ID=str(reserve_domain_id()))
    result = subprocess.run(
        [sys.executable, "-m", "openvla_ros.pipeline", "--quick", "--out", str(out), "--base", str(tiny_checkpoint)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout


def test_bags_are_rosbag2_recordings_of_the_sim_topics(quick_run: tuple[Path, str]) -> None:
    from rosbags.highlevel import AnyReader

    out, _ = quick_run
    bags = sorted((out / "bags").iterdir())
    assert [bag.name for bag in bags] == ["episode_000", "episode_001", "episode_002"]
    with AnyReader([bags[0]]) as reader:
        topics = {connection.topic: connection.msgtype for connection in reader.connections}
        counts = {topic: 0 for topic in topics}
        for connection, _, _ in reader.messages():
            counts[connection.topic] += 1
    assert topics["/camera/image_raw/compressed"] == "sensor_msgs/msg/CompressedImage"
    assert topics["/teleop/action"] == "std_msgs/msg/Float64MultiArray"
    assert counts["/instruction"] == 1 and counts["/teleop/action"] >= 5
    assert counts["/camera/image_raw/compressed"] > counts["/teleop/action"]


def test_rlds_dataset_opens_with_tfds_builder(quick_run: tuple[Path, str]) -> None:
    import tensorflow_datasets as tfds

    out, _ = quick_run
    builder = tfds.builder("sim_reach", data_dir=str(out / "data"))
    assert builder.info.splits["train"].num_examples == 2
    assert builder.info.splits["val"].num_examples == 1
    report = json.loads((out / "report.json").read_text())
    assert report["dataset"]["episodes"] == 3 and report["dataset"]["steps"] >= 10
    episode = next(iter(tfds.as_numpy(builder.as_dataset(split="train").take(1))))
    step = next(iter(episode["steps"]))
    assert step["observation"]["image"].shape == (224, 224, 3)
    assert step["language_instruction"].decode().startswith("move to the ")


def test_merged_model_loads_in_the_policy(quick_run: tuple[Path, str]) -> None:
    import numpy as np

    from openvla_ros.model.policy import OpenVLAPolicy
    from openvla_ros.sim import TabletopRenderer, TabletopScene

    out, _ = quick_run
    policy = OpenVLAPolicy.from_pretrained(str(out / "merged"), unnorm_key="sim_reach", device="cpu")
    scene = TabletopScene()
    task = scene.reset(seed=(5, 0), task="reach")
    action = policy.predict_action(TabletopRenderer().render(scene), task.instruction)
    assert action.shape == (7,) and np.all(np.isfinite(action))
    q01 = np.array(json.loads((out / "report.json").read_text())["dataset"]["action_q01"])
    q99 = np.array(json.loads((out / "report.json").read_text())["dataset"]["action_q99"])
    assert np.all(action[:6] >= q01[:6] - 1e-9) and np.all(action[:6] <= q99[:6] + 1e-9)


def test_report_has_success_rates_timings_and_plots(quick_run: tuple[Path, str]) -> None:
    out, stdout = quick_run
    report = json.loads((out / "report.json").read_text())
    assert set(report["timings_s"]) >= {"record", "convert", "finetune", "evaluate_offline", "closed_loop"}
    loop = report["closed_loop"]
    recorded_seeds = {(0, index) for index in range(3)}
    assert len(loop["seeds"]) == 2 and not recorded_seeds & {tuple(seed) for seed in loop["seeds"]}
    for label in ("base", "fine_tuned"):
        episodes = loop[label]["episodes"]
        assert len(episodes) == 2
        assert loop[label]["success_rate"] == sum(e["success"] for e in episodes) / 2
        assert all(len(e["path_xy"]) == e["steps"] + 1 for e in episodes)
        low, high = loop[label]["ci95"]
        assert 0.0 <= low <= loop[label]["success_rate"] <= high <= 1.0
    assert "fine_tuned_energy" not in loop, "energy refinement is off unless asked for"
    assert report["training"]["steps"] == 3 and report["training"]["curve"]
    assert report["settings"]["camera_upside_down"] is False, "a token base keeps the camera it was made for"
    assert _first_frame_orientation(out / "data") == "upright"
    assert json.loads((out / "merged" / "sim_setup.json").read_text()) == {"camera_upside_down": False}
    assert 0.0 <= report["offline"]["token_accuracy"] <= 1.0
    for name in ("trajectories.png", "training_curve.png", "evaluate_val.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert "closed loop (in-process, one action per step" in stdout and "base              success" in stdout
    assert "fine_tuned        success" in stdout and "stage timings" in stdout


def _steps_by_bag(data_dir: Path) -> dict[str, tuple[str, list[list[np.ndarray]]]]:
    """Returns {bag name: (split, every step's action, instruction and observations)} of a sim_reach dataset."""
    import tensorflow_datasets as tfds

    builder = tfds.builder("sim_reach", data_dir=str(data_dir))
    found = {}
    for split in ("train", "val"):
        for episode in tfds.as_numpy(builder.as_dataset(split=split)):
            name = Path(episode["episode_metadata"]["file_path"].decode()).name
            found[name] = (split, [[np.asarray(step["action"]), np.asarray(step["language_instruction"]),
                                    *(np.asarray(step["observation"][key]) for key in sorted(step["observation"]))]
                                   for step in episode["steps"]])
    return found


def test_one_sim_records_the_steps_that_three_lanes_recorded(quick_run: tuple[Path, str], tmp_path: Path) -> None:
    """The quick run records with three sims side by side; one sim, episode after episode, gives the
    same bags and dataset steps (the stamps differ, the steps do not)."""
    from openvla_ros.pipeline.settings import QUICK, PipelineSettings
    from openvla_ros.pipeline.stages import convert, record_demonstrations
    from openvla_ros.ros.child_nodes import local_ros_environment

    out, stdout = quick_run
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["record_lanes"] == 3 and report["dataset"]["record_lanes"] == 3
    assert (out / "logs" / "sim_scene_lane2.log").is_file()
    settings = PipelineSettings(out=tmp_path, episodes=QUICK["episodes"], record_lanes=1)
    recording = record_demonstrations(settings, tmp_path / "bags", tmp_path / "logs", local_ros_environment())
    assert [Path(bag).name for bag in recording["bags"]] == ["episode_000", "episode_001", "episode_002"]
    assert recording["expert_steps"] == report["dataset"]["expert_steps"]
    convert(settings, recording["bags"], tmp_path / "data")
    one, three = _steps_by_bag(tmp_path / "data"), _steps_by_bag(out / "data")
    assert sorted(one) == sorted(three) == ["episode_000", "episode_001", "episode_002"]
    for name, (split, steps) in one.items():
        assert split == three[name][0] and len(steps) == len(three[name][1]) > 0, name
        for step, other in zip(steps, three[name][1], strict=True):
            assert all(np.array_equal(a, b) for a, b in zip(step, other, strict=True)), name


def test_the_episode_book_keeps_the_first_successes_by_episode_number() -> None:
    """Lanes finish episodes out of order; the kept ones are the first successes by number, and a lane
    stops once enough successes have lower numbers than its next episode."""
    from openvla_ros.pipeline import PipelineError
    from openvla_ros.pipeline.stages import EpisodeBook

    book = EpisodeBook(wanted=3, max_failures=2)
    book.add(1, {"steps": 11})
    book.add(0, None)  # the expert failed episode 0
    book.add(4, {"steps": 14})
    assert book.needs(5), "episodes 2 and 3 are not known yet: 5 may still be needed"
    book.add(2, {"steps": 12})
    assert not book.needs(5) and not book.needs(6), "1, 2 and 4 succeeded: nothing from 5 on is kept"
    assert book.needs(3), "only 1 and 2 are below 3"
    book.add(3, {"steps": 13})
    kept, beyond, failures = book.outcome()
    assert [number for number, _ in kept] == [1, 2, 3] and [facts["steps"] for _, facts in kept] == [11, 12, 13]
    assert beyond == [4] and failures == 1
    book.add(7, None)
    with pytest.raises(PipelineError, match="the expert failed 3 episodes"):
        book.add(8, None)


def test_apps_and_test_runs_reserve_ros_domains_no_other_process_holds() -> None:
    from openvla_ros.ros.child_nodes import reserved_domain_ids

    probe = ("import fcntl, os, sys\n"
             "from openvla_ros.ros.child_nodes import _DOMAIN_LOCKS\n"
             "for domain_id in sys.argv[1:]:\n"
             "    fd = os.open(_DOMAIN_LOCKS / f'{domain_id}.lock', os.O_RDWR)\n"
             "    try:\n"
             "        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
             "        print('free')\n"
             "    except OSError:\n"
             "        print('held')\n")
    own = int(os.environ["ROS_DOMAIN_ID"])
    with reserved_domain_ids(2, exclude=(own,)) as domain_ids:
        assert len(set(domain_ids)) == 2 and own not in domain_ids
        held = subprocess.run([sys.executable, "-c", probe, *map(str, domain_ids)], cwd=REPO, capture_output=True,
                              text=True, timeout=60, check=True).stdout.split()
    released = subprocess.run([sys.executable, "-c", probe, *map(str, domain_ids)], cwd=REPO, capture_output=True,
                              text=True, timeout=60, check=True).stdout.split()
    assert held == ["held", "held"] and released == ["free", "free"]


def test_when_no_domain_is_free_for_a_lane_the_recording_says_so_before_it_starts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from openvla_ros.pipeline import PipelineError
    from openvla_ros.pipeline.settings import PipelineSettings
    from openvla_ros.pipeline.stages import record_demonstrations
    from openvla_ros.ros import child_nodes

    own = int(os.environ["ROS_DOMAIN_ID"])
    monkeypatch.setattr(child_nodes, "DOMAIN_IDS", range(own, own + 1))  # the run's own domain alone
    settings = PipelineSettings(out=tmp_path, episodes=4, record_lanes=2)
    with pytest.raises(PipelineError, match=r"every ROS domain id .* is held.*--record-lanes 1"):
        record_demonstrations(settings, tmp_path / "bags", tmp_path / "logs", dict(os.environ))
    assert not (tmp_path / "logs").exists(), "no sim was started"


def test_refuses_an_output_directory_it_did_not_create(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    result = subprocess.run(
        [sys.executable, "-m", "openvla_ros.pipeline", "--quick", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 1
    assert "was not created by the pipeline" in result.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_rejects_evaluation_on_recorded_seeds() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "openvla_ros.pipeline", "--record-seed", "3", "--eval-seed", "3"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 2 and "eval_seed must differ" in result.stderr


@pytest.fixture(scope="module")
def oft_run(small_pretrained_base: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The pipeline on a pretrained (OFT, proprio) base with energy refinement and one episode through the node."""
    out = tmp_path_factory.mktemp("pipeline_oft") / "out"
    env = dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST", ROS_DOMAIN_ID=str(reserve_domain_id()))
    result = subprocess.run(
        [sys.executable, "-m", "openvla_ros.pipeline", "--out", str(out), "--base", str(small_pretrained_base),
         "--episodes", "3", "--eval-episodes", "2", "--steps", "3", "--batch-size", "2", "--node-episodes", "1",
         "--energy-steps", "1", "--energy-train-steps", "4", "--select-episodes", "2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout


def _first_frame_orientation(data_dir: Path) -> str:
    """Returns which camera ("upright" or "upside down") best explains a recorded episode's first frame."""
    import tensorflow_datasets as tfds
    from PIL import Image

    from openvla_ros.sim import CameraModel, TabletopRenderer, TabletopScene

    episode = next(iter(tfds.as_numpy(tfds.builder("sim_reach", data_dir=str(data_dir)).as_dataset(split="train"))))
    frame = next(iter(episode["steps"]))["observation"]["image"].astype(np.float32)
    errors = {}
    for name, upside_down in (("upright", False), ("upside down", True)):
        renderer = TabletopRenderer(CameraModel(upside_down=upside_down))
        for index in range(5):  # the recorded episodes' seeds are (record_seed 0, k); failures are skipped
            scene = TabletopScene()
            scene.reset(seed=(0, index), task="reach")
            image = np.asarray(Image.fromarray(renderer.render(scene)).resize((224, 224), Image.BICUBIC), np.float32)
            errors[(name, index)] = float(np.abs(image - frame).mean())
    return min(errors, key=errors.get)[0]


def test_an_oft_base_is_fine_tuned_with_its_own_head_and_layout(oft_run: tuple[Path, str],
                                                                  small_pretrained_base: Path) -> None:
    from openvla_ros.model.oft_policy import OFTPolicy, load_policy_auto

    out, stdout = oft_run
    report = json.loads((out / "report.json").read_text())
    assert report["training"]["action_head"] == "l1" and "L1 chunk head" in stdout
    # an OFT base is fine-tuned in full, at the full fine-tune's rate, writing the weight average
    assert (report["settings"]["lora_rank"], report["settings"]["learning_rate"]) == (0, 3e-4)
    assert report["settings"]["ema_decay"] == 0.995 and "every weight, L1 chunk head" in stdout
    assert not (out / "adapter").exists(), "a full fine-tune writes no adapter"
    # the held-out variation by default for an OFT base: a camera pose the base never saw
    assert report["settings"]["camera_upside_down"] is True and "task reach (camera upside down)" in stdout
    assert _first_frame_orientation(out / "data") == "upside down", "the demonstrations come from that camera"
    # make demo reads it to run the sim with the camera the model was fine-tuned for
    assert json.loads((out / "merged" / "sim_setup.json").read_text()) == {"camera_upside_down": True}
    tuned = load_policy_auto(str(out / "merged"), unnorm_key="sim_reach", device="cpu")
    base = load_policy_auto(str(small_pretrained_base), device="cpu")
    assert isinstance(tuned, OFTPolicy) and isinstance(base, OFTPolicy)
    assert (tuned.chunk_size, tuned.proprio_dim) == (base.chunk_size, base.proprio_dim) == (8, 5)
    assert set(report["offline"]["l1_per_dimension"]) == {"dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"}
    assert "L1 per dimension: dx" in stdout
    assert [p["step"] for p in report["training"]["curve"] if p["split"] == "val"], "val L1 on the curve"


def test_energy_refinement_is_trained_and_evaluated_beside_the_plain_chunks(oft_run: tuple[Path, str]) -> None:
    out, stdout = oft_run
    report = json.loads((out / "report.json").read_text())
    assert report["energy"]["steps"] == 4 and (out / "merged" / "energy_model.safetensors").is_file()
    loop = report["closed_loop"]
    assert loop["policy"] == "chunks (half of each applied)"
    assert [loop[label]["energy_steps"] for label in ("base", "fine_tuned", "fine_tuned_energy")] == [0, 0, 1]
    for label in ("base", "fine_tuned", "fine_tuned_energy"):
        episodes = loop[label]["episodes"]
        assert [e["seed"] for e in episodes] == loop["seeds"], "every policy runs the same fresh episodes"
        assert all(len(e["path_xy"]) == e["steps"] + 1 for e in episodes)
    energy = report["offline"]["energy"]
    assert energy["steps"] == 1 and np.isfinite([energy["l1_uncorrected"], energy["l1_corrected"]]).all()
    assert "fine_tuned_energy success" in stdout and "with 1 energy step(s): L1" in stdout


def test_the_fine_tuned_oft_model_runs_through_the_node_with_proprio(oft_run: tuple[Path, str]) -> None:
    out, _ = oft_run
    check = json.loads((out / "report.json").read_text())["node_check"]
    assert len(check["episodes"]) == 1 and check["episodes"][0]["status"] in ("success", "timeout")
    assert check["episodes"][0]["steps"] > 0, "the node's chunks moved the sim"
    log = (out / "logs" / "policy_node_check.log").read_text()
    assert "chunk mode: K = 8, 1 image(s), proprio 5" in log


def test_the_fine_tuning_defaults_follow_the_base_and_explicit_options_win(tiny_checkpoint: Path,
                                                                           small_pretrained_base: Path) -> None:
    from openvla_ros.pipeline.settings import build_parser, settings_from_args

    def settings(*argv: str):
        return settings_from_args(build_parser().parse_args(list(argv)))

    token = settings("--base", str(tiny_checkpoint))
    assert (token.lora_rank, token.learning_rate, token.camera_upside_down) == (32, 3e-3, False)
    assert (token.locate_patch_weight, token.locate_point_weight) == (0.0, 0.0)
    oft = settings("--base", str(small_pretrained_base))
    assert (oft.lora_rank, oft.learning_rate, oft.ema_decay, oft.camera_upside_down) == (0, 3e-4, 0.995, True)
    assert (oft.locate_patch_weight, oft.locate_point_weight) == (0.1, 0.5)
    plain = settings("--base", str(small_pretrained_base), "--locate-weights", "0,0")
    assert (plain.locate_patch_weight, plain.locate_point_weight) == (0.0, 0.0)
    from openvla_ros.pipeline.app import determinism

    assert determinism(oft)["seeds"]["localisation_heads"] not in (None, oft.train_seed)
    assert "localisation_heads" not in determinism(plain)["seeds"], "no heads, no seed recorded"
    lora = settings("--base", str(small_pretrained_base), "--lora-rank", "32")
    assert (lora.lora_rank, lora.learning_rate) == (32, 1e-3)
    chosen = settings("--base", str(small_pretrained_base), "--lora-rank", "0", "--learning-rate", "1e-4",
                      "--ema-decay", "0")
    assert (chosen.lora_rank, chosen.learning_rate, chosen.ema_decay) == (0, 1e-4, 0.0)
    from openvla_ros.pipeline.settings import PipelineError

    with pytest.raises(PipelineError, match="ema_decay must be in"):
        settings("--base", str(tiny_checkpoint), "--ema-decay", "1")
    with pytest.raises(PipelineError, match="lora_rank must be >= 0"):
        settings("--base", str(tiny_checkpoint), "--lora-rank", "-1")
    located = settings("--base", str(small_pretrained_base), "--locate-weights", "0.2,1")
    assert (located.locate_patch_weight, located.locate_point_weight) == (0.2, 1.0)
    with pytest.raises(PipelineError, match="--locate-weights takes two numbers"):
        settings("--base", str(small_pretrained_base), "--locate-weights", "0.2")
    with pytest.raises(PipelineError, match="locate_point_weight must be >= 0"):
        settings("--base", str(small_pretrained_base), "--locate-weights=0,-1")


@pytest.mark.parametrize(("flags", "words"), [
    (["--energy-steps", "1"], "refines OpenVLA-OFT chunks"),
    (["--locate-weights", "0.1,0.5"], "--locate-weights trains beside an OpenVLA-OFT"),
])
def test_oft_only_options_are_refused_for_a_token_base_before_recording(tiny_checkpoint: Path, tmp_path: Path,
                                                                         flags: list[str], words: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "openvla_ros.pipeline", "--quick", "--out", str(tmp_path / "out"),
         "--base", str(tiny_checkpoint), *flags],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 1 and words in result.stderr
    assert not (tmp_path / "out" / "bags").exists(), "refused before anything is recorded"


def test_a_wait_that_times_out_is_told_apart_from_a_dead_process() -> None:
    """The node check counts an episode that never ends as a failure and goes on (WaitTimeoutError); a
    child process that died still stops the run (the PipelineError its check raises)."""
    from openvla_ros.pipeline import PipelineError, WaitTimeoutError, wait_for

    with pytest.raises(WaitTimeoutError, match="timed out after 0 s waiting for the end of node episode 3"):
        wait_for(lambda: False, 0.05, "the end of node episode 3", lambda: None)

    def dead() -> None:
        raise PipelineError("policy_node_check exited with code 1")

    with pytest.raises(PipelineError, match="exited with code 1") as caught:
        wait_for(lambda: False, 5.0, "anything", dead)
    assert not isinstance(caught.value, WaitTimeoutError)
    wait_for(lambda: True, 0.0, "something already true", dead)


def _start_time(pid: int) -> str | None:
    """Returns when process ``pid`` started (clock ticks since boot), None when it is gone: a pid reused
    by a later process starts later."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _child_nodes(parent: int) -> dict[int, tuple[str, str]]:
    """Returns {pid: (start time, command line)} of the running node processes (``--ros-args``) started
    by ``parent``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        if int(fields[1]) == parent and "--ros-args" in cmdline:
            found[int(entry.name)] = (fields[19], cmdline)
    return found


def test_sigterm_stops_the_children_and_says_what_is_left(tiny_checkpoint: Path, tmp_path: Path) -> None:
    import signal

    from process_helpers import signal_when

    from openvla_ros.pipeline import MARKER, prepare_out_dir

    out = tmp_path / "out"
    domain = str(reserve_domain_id())
    env = dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST", ROS_DOMAIN_ID=domain, PYTHONUNBUFFERED="1")
    log = tmp_path / "pipeline.log"
    with open(log, "wb") as stdout:
        process = subprocess.Popen(
            [sys.executable, "-m", "openvla_ros.pipeline", "--quick", "--out", str(out), "--base", str(tiny_checkpoint)],
            cwd=REPO, env=env, stdout=stdout, stderr=subprocess.STDOUT,
        )
    bags = out / "bags"
    children: dict[int, tuple[str, str]] = {}

    def recording() -> bool:  # a bag is being written and every recording lane's sim runs
        running = _child_nodes(process.pid)
        children.update(running)
        return bags.is_dir() and any(bags.iterdir()) and len(running) == 3

    signal_when(process, recording, signal.SIGTERM, "to recording with its three sims", log.read_text)
    output = log.read_text()
    assert process.returncode == 143, output[-3000:]
    assert f"interrupted (SIGTERM): the child processes are stopped; {out} holds a partial run" in output
    assert not (out / "report.json").exists()
    assert all("sim_scene_node" in line for _, line in children.values())
    assert [line for pid, (start, line) in children.items() if _start_time(pid) == start] == []
    prepare_out_dir(out)  # the next run takes the directory over
    assert [path.name for path in out.iterdir()] == [MARKER]


def test_the_training_curve_keeps_metric_names_with_digits() -> None:
    import logging

    from openvla_ros.pipeline.stages import _TrainerLog

    handler = _TrainerLog()
    logger = logging.getLogger("curve_test")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        logger.info("step %d %s: %s", 3, "val", "loss 0.5167  l1_normalized 0.5167  l1_first_step 0.4809  acc nan")
    finally:
        logger.removeHandler(handler)
    (point,) = handler.curve
    assert point["step"] == 3 and point["split"] == "val"
    assert point["l1_first_step"] == 0.4809 and point["l1_normalized"] == 0.5167 and point["loss"] == 0.5167
    assert "_first_step" not in point
