"""Bags written with rosbags (sqlite3 and mcap) converted to RLDS and read back with tensorflow-datasets."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from openvla_ros.dataset import ConversionConfig, TopicConfig, convert_bags, load_config
from openvla_ros.dataset.alignment import pose_delta
from openvla_ros.dataset.synthetic import DemoRecording, decode_frame_code, make_frame, write_demo_bag
from openvla_ros.errors import DatasetError
from openvla_ros.model.processor import ImageTransform

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "training" / "bag_to_rlds.py"
NAME = "synthetic_demos"
GAP_S = (2.0, 2.7)  # longer than the 0.5 s observation age: steps inside become stale
IDLE_S = (1.0, 1.6)  # zero commands: idle steps
TOPICS = TopicConfig(image="/camera/image_raw", action="/teleop/action", state="/joint_states",
                     instruction="/instruction")
CONFIG = ConversionConfig(topics=TOPICS)


# --------------------------------------------------------------------------------------------------
# Expected steps, worked out directly from what was written (brute force, no shared code).


def newest_at_or_before(times: list[int], t: int) -> int | None:
    index = int(np.searchsorted(np.asarray(times), t, side="right")) - 1
    return index if index >= 0 else None


def expected_steps(rec: DemoRecording, config: ConversionConfig, source: str = "vector") -> dict:
    """Returns kept steps (image index, action, state), and the idle / stale counts."""
    dt = config.step_ns
    firsts = [rec.image_times[0], rec.action_times[0], rec.state_times[0], rec.instruction_times[0]]
    if source != "vector":
        firsts.append(rec.gripper_times[0])
    t0 = max(firsts)
    last = max(rec.image_times[-1], rec.action_times[-1], rec.state_times[-1], rec.instruction_times[-1],
               *(rec.gripper_times[-1:] if source != "vector" else []))
    max_age = config.max_observation_age_s * 1e9
    kept, idle, stale, previous_gripper = [], 0, 0, None
    k = 0
    while t0 + (k + 1) * dt <= last:
        start, end = t0 + k * dt, t0 + (k + 1) * dt
        image = newest_at_or_before(rec.image_times, start)
        state = newest_at_or_before(rec.state_times, start)
        window = [i for i, t in enumerate(rec.action_times) if start < t <= end]
        if source == "vector":
            motion = np.sum([rec.actions[i][:6] for i in window], axis=0) if window else np.zeros(6)
            gripper = rec.actions[newest_at_or_before(rec.action_times, end)][6]
        elif source == "twist":
            motion = np.zeros(6)
            for i, t in enumerate(rec.action_times):
                held_until = min(rec.action_times[i + 1] if i + 1 < len(rec.action_times) else end,
                                 t + config.twist_timeout_s * 1e9)
                overlap = min(end, held_until) - max(start, t)
                if overlap > 0:
                    motion += rec.actions[i] * overlap / 1e9
            gripper = rec.grippers[newest_at_or_before(rec.gripper_times, end)]
        else:
            before = rec.actions[newest_at_or_before(rec.action_times, start)]
            after = rec.actions[newest_at_or_before(rec.action_times, end)]
            motion = np.concatenate([after[:3] - before[:3], np.zeros(3)])
            gripper = rec.grippers[newest_at_or_before(rec.gripper_times, end)]
        is_stale = start - rec.image_times[image] > max_age or start - rec.state_times[state] > max_age
        is_idle = (np.all(np.abs(motion[:3]) < config.idle_translation)
                   and np.all(np.abs(motion[3:]) < config.idle_rotation)
                   and (previous_gripper is None or gripper == previous_gripper))
        previous_gripper = gripper
        if is_stale:
            stale += 1
        elif is_idle:
            idle += 1
        else:
            kept.append({"image": rec.image_indices[image], "action": np.append(motion, gripper),
                         "state": rec.states[state], "time": start})
        k += 1
    return {"steps": kept, "idle": idle, "stale": stale}


def load_episodes(data_dir: Path, name: str, split: str) -> list[dict]:
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=str(data_dir))
    return list(tfds.as_numpy(builder.as_dataset(split=split)))


def episode_steps(episode: dict) -> list[dict]:
    return list(episode["steps"])


def frame_index(image: np.ndarray) -> int:
    band = image[10 : image.shape[0] // 3 - 10, 10:-10].reshape(-1, 3).mean(axis=0)
    return decode_frame_code(tuple(band))


def leftovers(data_dir: Path) -> list[str]:
    return sorted(os.listdir(data_dir)) if data_dir.exists() else []


# --------------------------------------------------------------------------------------------------
# One converted dataset shared by the read-back tests: a sqlite3 bag and an mcap bag.


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("rlds")
    recordings = {
        storage: write_demo_bag(root / f"demo_{storage}", storage=storage, seed=seed, camera_gap_s=GAP_S,
                                idle_s=IDLE_S)
        for storage, seed in (("sqlite3", 1), ("mcap", 2))
    }
    data_dir = root / "data"
    report = convert_bags([recordings["sqlite3"].path, recordings["mcap"].path], data_dir, NAME, CONFIG)
    episodes = {}
    for split in ("train", "val"):
        for episode in load_episodes(data_dir, NAME, split):
            episodes[episode["episode_metadata"]["file_path"].decode()] = (split, episode)
    return {"root": root, "data_dir": data_dir, "report": report, "recordings": recordings, "episodes": episodes}


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_steps_match_the_recording_exactly(converted: dict, storage: str) -> None:
    recording = converted["recordings"][storage]
    expected = expected_steps(recording, CONFIG)
    _, episode = converted["episodes"][str(recording.path)]
    steps = episode_steps(episode)
    assert len(steps) == len(expected["steps"]) > 10
    for step, want in zip(steps, expected["steps"], strict=True):
        assert frame_index(step["observation"]["image"]) == want["image"]
        np.testing.assert_allclose(step["action"], want["action"], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(step["observation"]["state"], want["state"], rtol=1e-6)
        assert step["language_instruction"].decode() == "pick up the red block"
    assert episode["episode_metadata"]["start_time_ns"] == expected["steps"][0]["time"]


def test_no_step_sees_a_frame_from_its_future(converted: dict) -> None:
    recording = converted["recordings"]["sqlite3"]
    expected = expected_steps(recording, CONFIG)
    frame_time = dict(zip(recording.image_indices, recording.image_times, strict=True))
    _, episode = converted["episodes"][str(recording.path)]
    for step, want in zip(episode_steps(episode), expected["steps"], strict=True):
        index = frame_index(step["observation"]["image"])
        assert frame_time[index] <= want["time"]
        later = [t for t in recording.image_times if frame_time[index] < t <= want["time"]]
        assert later == []  # and it is the newest one


def test_flags_rewards_and_splits(converted: dict) -> None:
    splits = sorted(split for split, _ in converted["episodes"].values())
    assert splits == ["train", "val"]
    for _, episode in converted["episodes"].values():
        steps = episode_steps(episode)
        first = [bool(s["is_first"]) for s in steps]
        last = [bool(s["is_last"]) for s in steps]
        assert first == [True] + [False] * (len(steps) - 1)
        assert last == [False] * (len(steps) - 1) + [True]
        assert [bool(s["is_terminal"]) for s in steps] == last
        assert [float(s["reward"]) for s in steps] == [float(flag) for flag in last]
        assert all(float(s["discount"]) == 1.0 for s in steps)


def test_report_counts_dropped_steps_and_topic_rates(converted: dict) -> None:
    report = converted["report"]
    for bag in report.bags:
        storage = "mcap" if bag.path.name.endswith("mcap") else "sqlite3"
        expected = expected_steps(converted["recordings"][storage], CONFIG)
        assert (bag.steps, bag.dropped_idle, bag.dropped_stale) == (
            len(expected["steps"]), expected["idle"], expected["stale"])
        assert bag.dropped_idle >= 2 and bag.dropped_stale >= 1
        assert bag.topics["/teleop/action"].rate_hz == pytest.approx(10.0, rel=0.05)
        assert bag.topics["/joint_states"].rate_hz == pytest.approx(20.0, rel=0.05)
    assert report.episodes == 2 and report.splits == {"train": 1, "val": 1}


def test_statistics_equal_a_hand_computation(converted: dict) -> None:
    actions, states = [], []
    for storage in ("sqlite3", "mcap"):
        for step in expected_steps(converted["recordings"][storage], CONFIG)["steps"]:
            actions.append(step["action"])
            states.append(step["state"])
    actions, states = np.array(actions), np.array(states)
    path = converted["data_dir"] / NAME / "1.0.0" / "dataset_statistics.json"
    stats = json.loads(path.read_text())[NAME]
    assert stats["num_transitions"] == len(actions) and stats["num_trajectories"] == 2
    for key, value in (("mean", actions.mean(0)), ("std", actions.std(0)), ("min", actions.min(0)),
                       ("max", actions.max(0)), ("q01", np.quantile(actions, 0.01, axis=0)),
                       ("q99", np.quantile(actions, 0.99, axis=0))):
        np.testing.assert_allclose(stats["action"][key], value, rtol=1e-9, atol=1e-12, err_msg=key)
    assert stats["action"]["mask"] == [True] * 6 + [False]
    np.testing.assert_allclose(stats["proprio"]["mean"], states.mean(0), rtol=1e-9)
    np.testing.assert_allclose(stats["proprio"]["q99"], np.quantile(states, 0.99, axis=0), rtol=1e-9)


def test_dataset_opens_from_its_directory_with_documented_features(converted: dict) -> None:
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(converted["data_dir"] / NAME / "1.0.0"))
    assert str(builder.info.version) == "1.0.0"
    assert builder.info.splits["train"].num_examples == 1 and builder.info.splits["val"].num_examples == 1
    step = builder.info.features["steps"]
    for key in ("action", "language_instruction", "reward", "discount", "is_first", "is_last", "is_terminal"):
        assert step[key].doc.desc, key
    assert step["observation"]["image"].shape == (224, 224, 3)
    assert step["observation"]["state"].shape == (3,)
    assert builder.info.features["episode_metadata"]["file_path"].doc.desc
    (episode,) = tfds.as_numpy(builder.as_dataset(split="val"))
    assert len(episode_steps(episode)) > 10


def test_stored_images_match_what_the_node_feeds_the_model(converted: dict) -> None:
    transform = ImageTransform(image_size=224)
    recording = converted["recordings"]["mcap"]
    _, episode = converted["episodes"][str(recording.path)]
    width, height = recording.image_size
    for step in episode_steps(episode)[:5]:
        stored = step["observation"]["image"]
        raw = make_frame(frame_index(stored), width, height)
        node_view = transform.model_image(raw)  # the node's resize of the same raw frame
        difference = np.abs(stored.astype(np.int16) - node_view.astype(np.int16))
        assert difference.mean() < 1.5 and np.percentile(difference, 99) <= 12  # JPEG loss only
        # Re-reading the stored image through the core gives (up to JPEG loss) the node's model input.
        assert np.array_equal(transform.model_image(stored), stored)
        delta = (transform.pixel_values(stored) - transform.pixel_values(raw)).abs()
        assert float(delta.mean()) < 0.03


def test_existing_dataset_needs_overwrite(converted: dict) -> None:
    recording = converted["recordings"]["sqlite3"]
    before = (converted["data_dir"] / NAME / "1.0.0" / "dataset_info.json").stat().st_mtime_ns
    with pytest.raises(DatasetError, match="already exists; pass --overwrite"):
        convert_bags([recording.path], converted["data_dir"], NAME, CONFIG)
    assert (converted["data_dir"] / NAME / "1.0.0" / "dataset_info.json").stat().st_mtime_ns == before
    assert leftovers(converted["data_dir"]) == [NAME]


def test_overwrite_replaces_the_dataset(tmp_path: Path, converted: dict) -> None:
    data_dir = tmp_path / "data"
    shutil.copytree(converted["data_dir"], data_dir)
    report = convert_bags([converted["recordings"]["sqlite3"].path], data_dir, NAME, CONFIG, overwrite=True)
    assert report.episodes == 1 and report.warnings  # one episode serves as train and val
    (train,) = load_episodes(data_dir, NAME, "train")
    (val,) = load_episodes(data_dir, NAME, "val")
    assert len(episode_steps(train)) == len(episode_steps(val)) == report.steps
    assert leftovers(data_dir) == [NAME]


def test_interrupted_overwrite_keeps_the_old_dataset(tmp_path: Path, converted: dict, monkeypatch) -> None:
    data_dir = tmp_path / "data"
    shutil.copytree(converted["data_dir"], data_dir)
    before = sorted(p.name for p in (data_dir / NAME / "1.0.0").iterdir())
    original_rename = Path.rename

    def interrupted_rename(self: Path, target):
        if "-incomplete-" in str(self) and self.name == "1.0.0":  # Ctrl-C as the new dataset moves in
            raise KeyboardInterrupt
        return original_rename(self, target)

    monkeypatch.setattr(Path, "rename", interrupted_rename)
    with pytest.raises(KeyboardInterrupt):
        convert_bags([converted["recordings"]["sqlite3"].path], data_dir, NAME, CONFIG, overwrite=True)
    monkeypatch.undo()
    assert leftovers(data_dir) == [NAME]
    assert sorted(p.name for p in (data_dir / NAME / "1.0.0").iterdir()) == before
    assert len(load_episodes(data_dir, NAME, "train")) + len(load_episodes(data_dir, NAME, "val")) == 2


def test_failed_conversion_removes_the_data_dir_it_created(tmp_path: Path) -> None:
    with pytest.raises(DatasetError):
        convert_bags([tmp_path / "no_such_bag"], tmp_path / "new" / "data", "x", CONFIG)
    assert not (tmp_path / "new" / "data").exists()


# --------------------------------------------------------------------------------------------------
# Other action sources, compressed images, split bags and old metadata.


@pytest.mark.parametrize("source,topic", [("twist", "/teleop/twist"), ("pose", "/robot/ee_pose")])
def test_twist_and_pose_action_sources(tmp_path: Path, source: str, topic: str) -> None:
    recording = write_demo_bag(tmp_path / "bag", storage="mcap", duration_s=3.0, action_source=source,
                               jitter_s=0.002, seed=3)
    topics = TopicConfig(image="/camera/image_raw", action=topic, gripper="/teleop/gripper",
                         state="/joint_states", instruction="/instruction")
    config = ConversionConfig(topics=topics, drop_idle=False)
    convert_bags([recording.path], tmp_path / "data", "moves", config)
    expected = expected_steps(recording, config, source)["steps"]
    (episode,) = load_episodes(tmp_path / "data", "moves", "train")
    steps = episode_steps(episode)
    assert len(steps) == len(expected) > 5
    for step, want in zip(steps, expected, strict=True):
        np.testing.assert_allclose(step["action"], want["action"], rtol=1e-5, atol=1e-7)


def test_pose_delta_rotation_is_in_the_base_frame() -> None:
    def yaw_pose(yaw: float) -> np.ndarray:
        return np.array([0.0, 0.0, 0.0, 0.0, 0.0, np.sin(yaw / 2), np.cos(yaw / 2)])

    delta = pose_delta(yaw_pose(0.3), yaw_pose(0.45))
    np.testing.assert_allclose(delta, [0, 0, 0, 0, 0, 0.15], atol=1e-12)


def test_compressed_images_match_the_node_decoding(tmp_path: Path) -> None:
    import cv2

    from openvla_ros.dataset.synthetic import make_texture

    recording = write_demo_bag(tmp_path / "bag", storage="sqlite3", duration_s=2.5, compressed=True, seed=4)
    convert_bags([recording.path], tmp_path / "data", "jpeg_demos", CONFIG)
    (episode,) = load_episodes(tmp_path / "data", "jpeg_demos", "train")
    expected = expected_steps(recording, CONFIG)["steps"]
    transform = ImageTransform()
    width, height = recording.image_size
    texture = make_texture(width, height)
    for step, want in zip(episode_steps(episode), expected, strict=True):
        frame = make_frame(want["image"], width, height, texture)
        _, jpeg = cv2.imencode(".jpg", frame[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
        node_rgb = cv2.cvtColor(cv2.imdecode(jpeg, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        stored = step["observation"]["image"]
        assert frame_index(stored) == want["image"]
        assert np.abs(stored.astype(np.int16) - transform.model_image(node_rgb)).mean() < 1.5


def _merge_into_split_bag(parts: list[Path], target: Path) -> None:
    """Builds one rosbag2 directory with several storage files, as `ros2 bag record --max-bag-*` does."""
    target.mkdir()
    infos = [yaml.safe_load((part / "metadata.yaml").read_text())["rosbag2_bagfile_information"] for part in parts]
    merged = infos[0]
    suffix = Path(merged["relative_file_paths"][0]).suffix
    names = []
    for number, part in enumerate(parts):
        name = f"{target.name}_{number}{suffix}"
        shutil.move(str(part / infos[number]["relative_file_paths"][0]), str(target / name))
        names.append(name)
    counts: dict[str, int] = {}
    for info in infos:
        for topic in info["topics_with_message_count"]:
            counts[topic["topic_metadata"]["name"]] = counts.get(topic["topic_metadata"]["name"], 0) + topic["message_count"]
    for topic in merged["topics_with_message_count"]:
        topic["message_count"] = counts[topic["topic_metadata"]["name"]]
    start = min(info["starting_time"]["nanoseconds_since_epoch"] for info in infos)
    end = max(info["starting_time"]["nanoseconds_since_epoch"] + info["duration"]["nanoseconds"] for info in infos)
    merged["relative_file_paths"] = names
    merged["files"] = [dict(info["files"][0], path=name) for info, name in zip(infos, names, strict=True)]
    merged["message_count"] = sum(info["message_count"] for info in infos)
    merged["starting_time"]["nanoseconds_since_epoch"] = start
    merged["duration"]["nanoseconds"] = end - start
    (target / "metadata.yaml").write_text(yaml.safe_dump({"rosbag2_bagfile_information": merged}))


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_split_bag_reads_as_one_episode(tmp_path: Path, storage: str) -> None:
    start = 1_700_000_000_000_000_000
    first = write_demo_bag(tmp_path / "part0", storage=storage, duration_s=2.0, start_ns=start, seed=5)
    second = write_demo_bag(tmp_path / "part1", storage=storage, duration_s=2.0, start_ns=start + 2_000_000_000,
                            seed=6, instructions=((0.0, "pick up the red block"),))
    _merge_into_split_bag([first.path, second.path], tmp_path / "split")
    whole = DemoRecording(path=tmp_path / "split")
    for field_name in ("image_times", "action_times", "actions", "state_times", "states",
                       "instruction_times", "instructions"):
        setattr(whole, field_name, getattr(first, field_name) + getattr(second, field_name))
    whole.image_indices = first.image_indices + [len(first.image_indices) + i for i in second.image_indices]
    report = convert_bags([whole.path], tmp_path / "data", "split_demo", CONFIG.replace(drop_idle=False))
    expected = expected_steps(whole, CONFIG.replace(drop_idle=False))["steps"]
    assert report.steps == len(expected) > 15
    assert report.bags[0].topics["/camera/image_raw"].count == len(whole.image_times)


def test_split_on_instruction_change_and_on_camera_gap(tmp_path: Path) -> None:
    from dataclasses import replace

    recording = write_demo_bag(tmp_path / "bag", duration_s=5.0, seed=5, camera_gap_s=(3.0, 3.7),
                               instructions=((0.0, "pick up the red block"), (1.5, "put it on the blue block")))
    expected = expected_steps(recording, CONFIG)["steps"]
    for step in expected:
        step["instruction"] = recording.instructions[newest_at_or_before(recording.instruction_times, step["time"])]
    groups: list[list[dict]] = []
    for step in expected:  # a new episode at each instruction change and after each stale gap
        previous = groups[-1][-1] if groups else None
        if (previous is None or previous["instruction"] != step["instruction"]
                or step["time"] - previous["time"] > CONFIG.step_ns):
            groups.append([])
        groups[-1].append(step)
    assert len(groups) == 3, "the recording has one instruction change and one camera gap"

    config = replace(CONFIG, split_on_instruction=True, split_on_gap=True)
    report = convert_bags([recording.path], tmp_path / "data", "split_demo", config)
    episodes = sorted(load_episodes(tmp_path / "data", "split_demo", "train")
                      + load_episodes(tmp_path / "data", "split_demo", "val"),
                      key=lambda episode: episode["episode_metadata"]["start_time_ns"])
    assert report.episodes == len(episodes) == 3
    for episode, group in zip(episodes, groups, strict=True):
        steps = episode_steps(episode)
        assert [frame_index(step["observation"]["image"]) for step in steps] == [want["image"] for want in group]
        assert {step["language_instruction"].decode() for step in steps} == {group[0]["instruction"]}
        assert steps[0]["is_first"] and steps[-1]["is_last"] and not any(step["is_last"] for step in steps[:-1])

    unsplit = convert_bags([recording.path], tmp_path / "data", "unsplit_demo", CONFIG)
    assert unsplit.episodes == 1 and unsplit.steps == len(expected)


# Fields each rosbag2 metadata version added (a v8 bag loses them to become an older version).
_ADDED_IN_VERSION = {5: "files", 6: "custom_data", 7: "ros_distro"}


@pytest.mark.parametrize(
    ("version", "storage"),
    [(4, "sqlite3"), (5, "sqlite3"), (6, "sqlite3"), (7, "sqlite3"), (5, "mcap"), (6, "mcap"), (7, "mcap"),
     (8, "mcap"), (8, "sqlite3")],
)
def test_metadata_versions_4_to_8(tmp_path: Path, version: int, storage: str) -> None:
    recording = write_demo_bag(tmp_path / "old", storage=storage, duration_s=2.0, version=8, seed=7)
    metadata_path = recording.path / "metadata.yaml"
    metadata = yaml.safe_load(metadata_path.read_text())
    info = metadata["rosbag2_bagfile_information"]
    assert info["version"] == 8
    info["version"] = version
    for added_in, key in _ADDED_IN_VERSION.items():
        if version < added_in:
            info.pop(key, None)
    for topic in info["topics_with_message_count"]:
        if version < 8:
            topic["topic_metadata"].pop("type_description_hash", None)
        if version == 4:
            topic["topic_metadata"]["offered_qos_profiles"] = ""
    metadata_path.write_text(yaml.safe_dump(metadata))
    report = convert_bags([recording.path], tmp_path / "data", "old_demo", CONFIG)
    assert report.steps == len(expected_steps(recording, CONFIG)["steps"])


# --------------------------------------------------------------------------------------------------
# Bad input: a clear error and nothing left behind.


@pytest.fixture(scope="module")
def small_bag(tmp_path_factory: pytest.TempPathFactory) -> DemoRecording:
    return write_demo_bag(tmp_path_factory.mktemp("small") / "bag", storage="sqlite3", duration_s=2.0, seed=8)


def _copy_bag(recording: DemoRecording, target: Path) -> Path:
    shutil.copytree(recording.path, target)
    return target


def test_each_frame_gets_its_own_jpeg_when_frames_are_freed(small_bag: DemoRecording) -> None:
    """Frames are freed as conversion goes on; a later frame must never get an earlier frame's JPEG."""
    import io

    from PIL import Image

    from openvla_ros.dataset.bag_reader import DemoBag
    from openvla_ros.dataset.converter import FrameEncoder

    config = ConversionConfig(topics=TopicConfig(image="/camera/image_raw", action="/teleop/action",
                                                 instruction="/instruction"))
    futures = []
    with DemoBag(small_bag.path, config) as bag, FrameEncoder(config, workers=1) as encoder:
        for _, stream, value in bag.messages():
            if stream.camera_key:
                futures.append(encoder.submit(bag, stream.camera_key, value))
                futures[-1].result()  # the encoder caught up, as it does whenever the bag reads slower
            del value  # nothing else holds the frame: its memory (and id) is free for the next one
        codes = [frame_index(np.asarray(Image.open(io.BytesIO(future.result())))) for future in futures]
    assert len(codes) > 30
    assert codes == list(range(len(codes))), "a frame was stored with another frame's image"


def test_missing_topic_lists_the_bags_topics(tmp_path: Path, small_bag: DemoRecording) -> None:
    config = ConversionConfig(topics=TopicConfig(image="/camera/color/image_raw", action="/teleop/action",
                                                 instruction="/instruction"))
    with pytest.raises(DatasetError) as error:
        convert_bags([small_bag.path], tmp_path / "data", "x", config)
    message = str(error.value)
    assert "no topic /camera/color/image_raw" in message
    assert "/camera/image_raw (sensor_msgs/msg/Image)" in message and "/joint_states" in message
    assert leftovers(tmp_path / "data") == []


def _rewrite_one_message(bag: Path, topic: str, change) -> None:
    """Deserialises the 5th message on ``topic`` in a sqlite3 bag, applies ``change`` and writes it back."""
    import sqlite3

    from rosbags.typesys import Stores, get_typestore

    typestore = get_typestore(Stores.LATEST)
    (database,) = bag.glob("*.db3")
    with sqlite3.connect(database) as connection:
        topic_id, msgtype = connection.execute("SELECT id, type FROM topics WHERE name = ?", (topic,)).fetchone()
        row_id, data = connection.execute(
            "SELECT id, data FROM messages WHERE topic_id = ? ORDER BY timestamp LIMIT 1 OFFSET 4", (topic_id,)
        ).fetchone()
        message = typestore.deserialize_cdr(data, msgtype)
        change(message)
        connection.execute("UPDATE messages SET data = ? WHERE id = ?",
                           (bytes(typestore.serialize_cdr(message, msgtype)), row_id))


def test_nan_action_is_an_error_naming_the_message(tmp_path: Path, small_bag: DemoRecording) -> None:
    bag = _copy_bag(small_bag, tmp_path / "bag")

    def poison(message) -> None:
        data = np.array(message.data)
        data[2] = np.nan
        message.data = data

    _rewrite_one_message(bag, "/teleop/action", poison)
    with pytest.raises(DatasetError, match=r"action on /teleop/action at \d+ ns holds NaN or infinity") as error:
        convert_bags([bag], tmp_path / "data", "x", CONFIG)
    assert str(bag) in str(error.value)
    assert leftovers(tmp_path / "data") == []


def test_pose_action_without_orientation_is_an_error(tmp_path: Path) -> None:
    recording = write_demo_bag(tmp_path / "bag", storage="sqlite3", duration_s=2.0, seed=3, action_source="pose")

    def zero_quaternion(message) -> None:
        orientation = message.pose.orientation
        orientation.x = orientation.y = orientation.z = orientation.w = 0.0

    _rewrite_one_message(recording.path, "/robot/ee_pose", zero_quaternion)
    config = ConversionConfig(topics=TopicConfig(image="/camera/image_raw", action="/robot/ee_pose",
                                                 gripper="/teleop/gripper", instruction="/instruction"))
    with pytest.raises(DatasetError, match=r"pose on /robot/ee_pose at \d+ ns: quaternion .* has no valid orientation"):
        convert_bags([recording.path], tmp_path / "data", "x", config)
    assert leftovers(tmp_path / "data") == []


def test_count_differing_from_metadata_is_an_error(tmp_path: Path, small_bag: DemoRecording) -> None:
    bag = _copy_bag(small_bag, tmp_path / "bag")
    text = (bag / "metadata.yaml").read_text()
    metadata = yaml.safe_load(text)
    topic = next(t for t in metadata["rosbag2_bagfile_information"]["topics_with_message_count"]
                 if t["topic_metadata"]["name"] == "/teleop/action")
    topic["message_count"] += 3
    (bag / "metadata.yaml").write_text(yaml.safe_dump(metadata))
    with pytest.raises(DatasetError, match=r"/teleop/action: read \d+, metadata declares \d+"):
        convert_bags([bag], tmp_path / "data", "x", CONFIG)
    assert leftovers(tmp_path / "data") == []


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_unreadable_bag_is_an_error(tmp_path: Path, storage: str) -> None:
    recording = write_demo_bag(tmp_path / "bag", storage=storage, duration_s=1.0, seed=9)
    (data_file,) = [p for p in recording.path.iterdir() if p.suffix in (".db3", ".mcap")]
    raw = bytearray(data_file.read_bytes())
    raw[: len(raw) // 2] = b"\x5a" * (len(raw) // 2)  # wreck the header and the first half
    data_file.write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match=f"bag {recording.path}"):
        convert_bags([recording.path], tmp_path / "data", "x", CONFIG)
    assert leftovers(tmp_path / "data") == []


def test_empty_episode_is_an_error_and_leaves_nothing(tmp_path: Path, small_bag: DemoRecording) -> None:
    idle = write_demo_bag(tmp_path / "idle", storage="mcap", duration_s=1.4, idle_s=(0.0, 9.0), seed=10)
    with pytest.raises(DatasetError, match="empty episode: .* idle"):
        convert_bags([small_bag.path, idle.path], tmp_path / "data", "x", CONFIG)
    assert leftovers(tmp_path / "data") == []


def test_changing_image_size_is_an_error(tmp_path: Path, small_bag: DemoRecording) -> None:
    other = write_demo_bag(tmp_path / "big", storage="sqlite3", duration_s=2.0, image_size=(80, 60), seed=11)
    with pytest.raises(DatasetError, match="changes image size: 80x60 .* but 64x48"):
        convert_bags([small_bag.path, other.path], tmp_path / "data", "x", CONFIG)
    assert leftovers(tmp_path / "data") == []


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("topics:\n  image: /cam\nconversion:\n  rate: 5\n")
    with pytest.raises(DatasetError, match="unknown key.*rate.*allowed keys"):
        load_config(path)
    path.write_text("conversion:\n  rate_hz: -1\n")
    with pytest.raises(DatasetError, match="rate_hz must be a number > 0"):
        load_config(path)
    with pytest.raises(DatasetError, match="try 'my_demos'"):
        convert_bags([tmp_path], tmp_path / "data", "My-Demos", CONFIG)


def test_record_yaml_drives_the_converter() -> None:
    config = load_config(REPO / "config" / "record.yaml")
    assert config.topics.image == "/camera/image_raw" and config.rate_hz == 5.0
    assert config.topics.state == "/joint_states" and config.drop_idle


# --------------------------------------------------------------------------------------------------
# The command line.


def _run_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CLI), *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120, **kwargs)


def test_cli_converts_checks_and_reports(tmp_path: Path, small_bag: DemoRecording) -> None:
    config = tmp_path / "record.yaml"
    config.write_text(yaml.safe_dump({"topics": {"image": "/camera/image_raw", "action": "/teleop/action",
                                                  "state": "/joint_states", "instruction": ""}}))
    result = _run_cli(str(small_bag.path), "--out", str(tmp_path / "data"), "--name", "cli_demo", "--config",
                      str(config), "--rate", "10", "--instruction", "Stack the cups", "--quiet", "--check")
    assert result.returncode == 0, result.stderr
    assert "episodes: 1 (train 1, val 1)" in result.stdout
    assert "/camera/image_raw (sensor_msgs/msg/Image):" in result.stdout and "Hz" in result.stdout
    assert "step 0: image (224, 224, 3), state (3,)" in result.stdout
    assert "instruction 'Stack the cups'" in result.stdout
    expected = expected_steps(small_bag, CONFIG.replace(rate_hz=10.0))
    assert f"steps: {len(expected['steps'])}; dropped idle: {expected['idle']}" in result.stdout


def test_cli_bad_input_exits_1_with_a_message(tmp_path: Path) -> None:
    result = _run_cli(str(tmp_path / "nope"), "--out", str(tmp_path / "data"), "--name", "x", "--quiet",
                      "--instruction", "go")
    assert result.returncode == 1
    assert "error: bag" in result.stderr and "does not exist" in result.stderr


def _start_and_signal(data_dir: Path, bag: Path, signal_number: int, point: str) -> subprocess.Popen:
    """Starts a long conversion named ``interrupted`` and sends it ``signal_number`` once it is under way:
    ``early`` as soon as its staging directory exists, ``late`` once episodes are in its staging file."""
    bags = [str(bag)] * 2000  # far more work than the time between the poll and the signal
    process = subprocess.Popen([sys.executable, str(CLI), *bags, "--out", str(data_dir), "--name", "interrupted",
                                "--quiet", "--instruction", "go"], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)

    def under_way() -> bool:
        staging = sorted(data_dir.glob(".interrupted-incomplete-*")) if data_dir.exists() else []
        if not staging:
            return False
        episodes = staging[0] / "episodes.staging"
        return point == "early" or (episodes.exists() and episodes.stat().st_size > 0)

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not under_way() and process.poll() is None:
        time.sleep(0.02)
    assert under_way(), f"the conversion never got {point} enough to interrupt"
    process.send_signal(signal_number)
    return process


@pytest.mark.parametrize("where", ["mark_owner", "open"])
def test_an_interrupt_while_the_writer_sets_up_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              where: str) -> None:
    """A Ctrl-C just after the staging directory is made (``__exit__`` does not run when ``__enter__``
    raises): the writer removes what it made before the interrupt goes on."""
    import builtins

    from openvla_ros.dataset import rlds_writer

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    if where == "mark_owner":
        monkeypatch.setattr(rlds_writer, "mark_owner", interrupted)
    else:
        real_open = builtins.open
        monkeypatch.setattr(builtins, "open", lambda path, *a, **k: interrupted() if str(path).endswith(
            "episodes.staging") else real_open(path, *a, **k))
    data_dir = tmp_path / "data"
    with pytest.raises(KeyboardInterrupt):
        with rlds_writer.RldsWriter(data_dir, "setup", image_keys=["image"]):
            pass
    assert not data_dir.exists(), leftovers(data_dir)


@pytest.mark.parametrize(
    ("signal_number", "point"),
    [(signal.SIGINT, "early"), (signal.SIGTERM, "early"), (signal.SIGTERM, "late"), (signal.SIGHUP, "late")],
)
def test_a_stop_signal_leaves_nothing_half_written_and_the_next_run_works(
    tmp_path: Path, small_bag: DemoRecording, signal_number: int, point: str
) -> None:
    data_dir = tmp_path / "data"
    process = _start_and_signal(data_dir, small_bag.path, signal_number, point)
    _, stderr = process.communicate(timeout=120)
    name = signal.Signals(signal_number).name
    assert process.returncode == 128 + signal_number, stderr
    assert f"interrupted ({'Ctrl-C' if name == 'SIGINT' else name}): nothing was written" in stderr, stderr
    assert leftovers(data_dir) == []
    report = convert_bags([small_bag.path], data_dir, "interrupted", CONFIG.replace(instruction="go"))
    assert report.dataset_dir.is_dir() and leftovers(data_dir) == ["interrupted"]


def test_what_a_killed_conversion_left_is_removed_by_the_next_run(
    tmp_path: Path, small_bag: DemoRecording, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "data"
    process = _start_and_signal(data_dir, small_bag.path, signal.SIGKILL, "late")
    process.communicate(timeout=60)
    stale = [name for name in leftovers(data_dir) if name.startswith(".interrupted-incomplete-")]
    assert stale, "SIGKILL left no staging directory: the test did not kill it mid-way"
    with caplog.at_level("WARNING", logger="openvla_ros.interrupts"):
        report = convert_bags([small_bag.path], data_dir, "interrupted", CONFIG.replace(instruction="go"))
    assert report.dataset_dir.is_dir() and leftovers(data_dir) == ["interrupted"]
    assert f"removed {data_dir / stale[0]}, left by an earlier run that was killed" in caplog.text


def test_a_dataset_set_aside_by_a_killed_overwrite_is_put_back(tmp_path: Path, small_bag: DemoRecording) -> None:
    data_dir = tmp_path / "data"
    report = convert_bags([small_bag.path], data_dir, "kept", CONFIG.replace(instruction="go"))
    # killed between moving the old dataset aside and moving the new one in (no owner process alive)
    staging = data_dir / ".kept-incomplete-dead"
    staging.mkdir()
    (staging / ".owner-pid").write_text("999999999")
    report.dataset_dir.rename(staging / "replaced")
    with pytest.raises(DatasetError, match="already exists"):
        convert_bags([small_bag.path], data_dir, "kept", CONFIG.replace(instruction="go"))
    assert report.dataset_dir.is_dir() and leftovers(data_dir) == ["kept"]


def test_constant_action_dimensions_are_warned_about() -> None:
    from openvla_ros.dataset.converter import constant_dimension_warnings

    stats = {"min": [-0.1, -0.1, 0.0, 0.0, 0.0, -0.2, 1.0], "max": [0.1, 0.1, 0.05, 0.0, 0.0, 0.2, 1.0]}
    warnings = constant_dimension_warnings(stats)
    assert [w.split(" is constant")[0] for w in warnings] == ["action droll", "action dpitch", "action gripper"]
    assert "reads as closed" in warnings[-1] and "(1)" in warnings[-1]
    assert constant_dimension_warnings({"min": [0.0, 1.0], "max": [1.0, 2.0]}) == []


def test_episodes_shorter_than_the_chunk_are_named_in_a_warning(tmp_path: Path, small_bag: DemoRecording) -> None:
    from openvla_ros.dataset.converter import short_episode_warnings

    report = convert_bags([small_bag.path], tmp_path / "data", "short", CONFIG.replace(instruction="go"))
    steps = report.steps
    long_enough = convert_bags([small_bag.path], tmp_path / "data", "fine", CONFIG.replace(instruction="go",
                                                                                          chunk_size=steps))
    assert not [w for w in long_enough.warnings if "shorter than chunk_size" in w]
    short = convert_bags([small_bag.path], tmp_path / "data", "shorter", CONFIG.replace(instruction="go",
                                                                                       chunk_size=steps + 1))
    (warning,) = [w for w in short.warnings if "shorter than chunk_size" in w]
    assert f"{small_bag.path.name} episode 0 ({steps} steps)" in warning and "Requires start <= limit" in warning
    assert short_episode_warnings(short.bags, 0) == []
    with pytest.raises(DatasetError, match="chunk_size must be an integer >= 0"):
        CONFIG.replace(chunk_size=-1)
