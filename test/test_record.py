"""The recorder: settings from record.yaml, QoS choice, bags that rosbags and the converter read back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rclpy  # noqa: E402  (imported after the DDS isolation variables are set)
import yaml
from diagnostic_msgs.msg import DiagnosticStatus  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from ros_helpers import LATCHED_QOS, wait_until  # sets up DDS isolation first
from rosbags.highlevel import AnyReader  # noqa: E402
from std_msgs.msg import Float64MultiArray, String  # noqa: E402
from std_srvs.srv import SetBool  # noqa: E402

from openvla_ros.ros.record import (  # noqa: E402
    BagRecorder,
    RecordError,
    load_record_settings,
    subscription_qos,
)

REPO = Path(__file__).resolve().parents[1]
BEST_EFFORT_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST, depth=5, reliability=ReliabilityPolicy.BEST_EFFORT
)



def read_bag(path: Path) -> tuple[dict[str, list[Any]], dict[str, int]]:
    """Returns the messages per topic (deserialized) and the counts the metadata declares."""
    messages: dict[str, list[Any]] = {}
    with AnyReader([path]) as reader:
        declared = {conn.topic: conn.msgcount for conn in reader.connections}
        for connection, _, raw in reader.messages():
            messages.setdefault(connection.topic, []).append(reader.deserialize(raw, connection.msgtype))
    return messages, declared


# ---------------------------------------------------------------------------------------- settings


def test_settings_come_from_the_packages_record_yaml() -> None:
    settings = load_record_settings(REPO / "config" / "record.yaml")
    data = yaml.safe_load((REPO / "config" / "record.yaml").read_text())
    configured = [topic for topic in data["topics"].values() if topic]
    assert set(configured) <= set(settings.topics)
    assert settings.storage == data["record"]["storage"]
    assert settings.output_dir == data["record"]["output_dir"]


def test_bad_settings_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(RecordError, match="cannot read config file"):
        load_record_settings(tmp_path / "missing.yaml")
    bad_storage = tmp_path / "bad_storage.yaml"
    bad_storage.write_text("topics: {image: /cam, action: /act}\nrecord: {storage: zip}\n")
    with pytest.raises(RecordError, match="storage must be one of mcap, sqlite3"):
        load_record_settings(bad_storage)
    bad_topic = tmp_path / "bad_topic.yaml"
    bad_topic.write_text("topics: {image: camera, action: /act}\n")
    with pytest.raises(RecordError, match="topics.image"):
        load_record_settings(bad_topic)


def test_subscription_qos_follows_the_publishers() -> None:
    latched = subscription_qos([LATCHED_QOS, LATCHED_QOS])
    assert latched.reliability == ReliabilityPolicy.RELIABLE
    assert latched.durability == DurabilityPolicy.TRANSIENT_LOCAL
    mixed = subscription_qos([LATCHED_QOS, BEST_EFFORT_QOS])
    assert mixed.reliability == ReliabilityPolicy.BEST_EFFORT
    assert mixed.durability == DurabilityPolicy.VOLATILE


# ---------------------------------------------------------------------------------------- in process


def test_recorder_writes_a_sqlite3_bag_with_latched_and_late_topics(ros_node: Any, tmp_path: Path) -> None:
    # A latched instruction published before recording starts must still be recorded.
    instruction_pub = ros_node.create_publisher(String, "/rec_test/instruction", LATCHED_QOS)
    instruction_pub.publish(String(data="stack the cups"))
    recorder_context = rclpy.Context()
    rclpy.init(context=recorder_context)
    recorder_node = rclpy.create_node("record_test_recorder", context=recorder_context)
    executor = SingleThreadedExecutor(context=recorder_context)
    executor.add_node(recorder_node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    bag = tmp_path / "bags" / "episode_1"
    recorder = BagRecorder(
        recorder_node,
        ["/rec_test/instruction", "/rec_test/action", "/rec_test/never"],
        bag,
        storage="sqlite3",
    )
    try:
        recorder.start()
        wait_until(
            lambda: "/rec_test/instruction" in recorder.subscribed_topics(), 20, "the instruction topic"
        )
        # A topic whose publisher appears after the recorder started.
        action_pub = ros_node.create_publisher(Float64MultiArray, "/rec_test/action", 50)
        wait_until(lambda: action_pub.get_subscription_count() > 0, 20, "the recorder's action subscription")
        sent = [[0.001 * i, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0] for i in range(1, 21)]
        for values in sent:
            action_pub.publish(Float64MultiArray(data=values))
        wait_until(
            lambda: recorder.counts().get("/rec_test/action", 0) == len(sent), 10, "20 actions recorded"
        )
        with pytest.raises(RecordError, match="exists already"):
            BagRecorder(recorder_node, ["/x"], bag).start()
    finally:
        summary = recorder.stop()
        executor.shutdown()
        recorder_node.destroy_node()
        rclpy.try_shutdown(context=recorder_context)
        spinner.join(timeout=5)
    assert summary.missing == ("/rec_test/never",)
    assert summary.topics["/rec_test/action"].count == len(sent)
    assert "/rec_test/never" in summary.describe() and "not recorded" in summary.describe()
    assert sorted(p.suffix for p in bag.iterdir()) == [".db3", ".yaml"]
    messages, declared = read_bag(bag)
    assert declared == {"/rec_test/instruction": 1, "/rec_test/action": len(sent)}
    assert messages["/rec_test/instruction"][0].data == "stack the cups"
    np.testing.assert_allclose([list(m.data) for m in messages["/rec_test/action"]], sent)
    metadata = yaml.safe_load((bag / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    assert metadata["version"] == 9 and metadata["storage_identifier"] == "sqlite3"
    qos = {
        t["topic_metadata"]["name"]: t["topic_metadata"]["offered_qos_profiles"]
        for t in metadata["topics_with_message_count"]
    }
    assert qos["/rec_test/instruction"][0]["durability"] == "transient_local"  # as offered


def test_a_callback_run_late_keeps_the_time_its_message_arrived(ros_node: Any, tmp_path: Path) -> None:
    """The recorder's executor is held back while two messages 0.4 s apart arrive, then runs both callbacks
    at once: the bag keeps their spacing and order (the middleware's receive time), which stamping at the
    callback would squeeze to the same instant, reordering them against other topics."""
    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node("record_late_recorder", context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    bag = tmp_path / "late"
    recorder = BagRecorder(node, ["/rec_late/action"], bag)
    publisher = ros_node.create_publisher(Float64MultiArray, "/rec_late/action", 10)

    def spin_until(condition: Any, what: str) -> None:
        deadline = time.monotonic() + 20
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            executor.spin_once(timeout_sec=0.05)

    try:
        recorder.start()
        spin_until(lambda: publisher.get_subscription_count() > 0 and recorder.subscribed_topics(),
                   "the recorder's subscription")
        publisher.publish(Float64MultiArray(data=[1.0] * 7))
        time.sleep(0.4)  # the recorder's executor does not run: its callbacks wait
        publisher.publish(Float64MultiArray(data=[2.0] * 7))
        time.sleep(0.1)
        spin_until(lambda: recorder.counts().get("/rec_late/action", 0) == 2, "both messages")
    finally:
        recorder.stop()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown(context=context)
    with AnyReader([bag]) as reader:
        stamped = [(timestamp, reader.deserialize(raw, connection.msgtype).data[0])
                   for connection, timestamp, raw in reader.messages()]
    assert [value for _, value in stamped] == [1.0, 2.0]
    assert stamped[1][0] - stamped[0][0] > 0.2e9, f"spacing {(stamped[1][0] - stamped[0][0]) / 1e9:.3f} s"


# ---------------------------------------------------------------------------------------- with the sim


def test_recording_an_expert_episode_gives_a_bag_the_converter_reads(ros_node: Any, tmp_path: Path) -> None:
    from openvla_ros.dataset.bag_reader import DemoBag
    from openvla_ros.dataset.config import load_config

    config_path = tmp_path / "record.yaml"
    config = yaml.safe_load((REPO / "config" / "record.yaml").read_text())
    config["topics"]["state"] = "/joint_states"
    config_path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, RCUTILS_LOGGING_BUFFERED_STREAM="0", PYTHONUNBUFFERED="1")
    sim_log = open(tmp_path / "sim.log", "wb")  # noqa: SIM115 (closed below)
    sim = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "openvla_ros.sim_scene_node",
            "--ros-args",
            "-p",
            "task:=reach",
            "-p",
            "seed:=11",
        ],
        cwd=REPO,
        env=env,
        stdout=sim_log,
        stderr=subprocess.STDOUT,
    )
    record_command = [sys.executable, "-m", "openvla_ros.record", "--config", str(config_path)]
    record_command += ["--output-dir", str(tmp_path / "demos"), "--episode", "reach_01"]
    recorder = subprocess.Popen(
        record_command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    task_states: list[dict[str, str]] = []
    ros_node.create_subscription(
        DiagnosticStatus,
        "/sim_scene/task_state",
        lambda m: task_states.append({i.key: i.value for i in m.values}),
        20,
    )
    expert = ros_node.create_client(SetBool, "/sim_scene/expert")
    try:
        assert expert.wait_for_service(timeout_sec=60.0)
        # Every recorded topic must have the recorder as a subscriber before the expert starts.
        for topic in ("/camera/image_raw", "/teleop/action", "/joint_states", "/instruction"):
            wait_until(
                lambda topic=topic: ros_node.count_subscribers(topic) >= 1, 30, f"a subscriber on {topic}"
            )
        future = expert.call_async(SetBool.Request(data=True))
        wait_until(future.done, 60, "the expert service")  # a loaded machine can take seconds to answer
        wait_until(lambda: any(s["status"] == "success" for s in task_states), 40, "the expert to succeed")
        steps = int(next(s for s in task_states if s["status"] == "success")["steps"])
        time.sleep(0.5)  # a few frames after the last action
        recorder.send_signal(signal.SIGINT)
        output, _ = recorder.communicate(timeout=30)
    finally:
        for process in (recorder, sim):
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
        sim_log.close()
    assert recorder.returncode == 0, output
    assert "/teleop/action" in output and "messages in" in output
    bag = tmp_path / "demos" / "reach_01"
    messages, declared = read_bag(bag)
    assert {topic: len(items) for topic, items in messages.items()} == declared
    assert len(messages["/teleop/action"]) == steps  # every applied expert action is in the bag
    assert len(messages["/instruction"]) == 1  # published before recording began: latched
    instruction = messages["/instruction"][0].data
    assert instruction.startswith("move to the ")
    assert len(messages["/camera/image_raw"]) >= steps  # the camera runs faster than the expert

    # The converter's reader opens it like a `ros2 bag record` bag and finds the same content.
    read: dict[str, int] = {}
    with DemoBag(bag, load_config(config_path)) as demo:
        for _, stream, value in demo.messages():
            read[stream.topic] = read.get(stream.topic, 0) + 1
            if stream.topic == "/instruction":
                assert value == instruction
            if stream.topic == "/camera/image_raw":
                frame = demo.decode_frame(value)
                assert frame.shape == (480, 640, 3) and frame.dtype == np.uint8
    assert read == {topic: declared[topic] for topic in read}
    assert set(read) == {"/camera/image_raw", "/teleop/action", "/joint_states", "/instruction"}


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_close_the_bag_as_ctrl_c_does(ros_node: Any, tmp_path: Path, signal_number: int) -> None:
    topic = f"/stop_signal_{signal_number}"
    publisher = ros_node.create_publisher(String, topic, 10)
    command = [sys.executable, "-m", "openvla_ros.record", "--output-dir", str(tmp_path), "--episode", "ep",
               "--storage", "sqlite3", "--topics", topic]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    recorder = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    try:
        wait_until(lambda: ros_node.count_subscribers(topic) >= 1 or recorder.poll() is not None, 60,
                   f"the recorder's subscription on {topic}")
        assert recorder.poll() is None, recorder.communicate()[0]
        for number in range(5):
            publisher.publish(String(data=f"message {number}"))
            time.sleep(0.05)
        time.sleep(0.5)
        recorder.send_signal(signal_number)
        output, _ = recorder.communicate(timeout=30)
    finally:
        if recorder.poll() is None:
            recorder.kill()
    assert recorder.returncode == 0, output
    messages, declared = read_bag(tmp_path / "ep")
    assert [m.data for m in messages[topic]] == [f"message {n}" for n in range(5)] and declared[topic] == 5


def test_the_summary_gives_each_topic_its_mean_rate_and_names_the_missing_ones() -> None:
    from openvla_ros.ros.record_settings import RecordSummary, TopicRecord

    summary = RecordSummary(Path("bag"), "sqlite3", {
        "/camera": TopicRecord("/camera", "sensor_msgs/msg/Image", count=21, first_ns=0, last_ns=2_000_000_000),
        "/once": TopicRecord("/once", "std_msgs/msg/String", count=1, first_ns=5, last_ns=5),
    }, missing=("/action",), duration_s=2.0)
    lines = summary.describe().splitlines()
    assert lines[0] == "bag bag (sqlite3): 22 messages in 2.0 s"
    assert lines[1].split()[-2:] == ["10.0", "Hz"] and lines[2].split()[-2:] == ["0.0", "Hz"]
    assert lines[3].split()[0] == "/action" and "no publisher appeared" in lines[3]
