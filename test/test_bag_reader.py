"""The converter's bag reader on bags that real rosbag2 recordings resemble: QoS profiles in metadata.yaml
that differ from the storage's, topics of unparseable types, no metadata.yaml, compressed mcap chunks,
truncated files; counts checked against an independent reading of the storage (sqlite3, the mcap library)."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import yaml
from rosbags.typesys import Stores, get_typestore
from test_bag_to_rlds import CONFIG, expected_steps, frame_index, load_episodes

from openvla_ros.dataset import convert_bags
from openvla_ros.dataset.bag_reader import DemoBag
from openvla_ros.dataset.bag_storage import BagError, open_bag
from openvla_ros.dataset.synthetic import DemoRecording, write_demo_bag
from openvla_ros.errors import DatasetError

TYPESTORE = get_typestore(Stores.LATEST)
# A QoS profile as `ros2 bag record` writes it; rosbags' writer stores none, so the two disagree.
RECORDED_QOS = [{
    "history": "keep_last", "depth": 10, "reliability": "reliable", "durability": "volatile",
    "deadline": {"sec": 9223372036, "nsec": 854775807}, "lifespan": {"sec": 9223372036, "nsec": 854775807},
    "liveliness": "automatic", "liveliness_lease_duration": {"sec": 9223372036, "nsec": 854775807},
    "avoid_ros_namespace_conventions": False,
}]


def rosbags_count(bag: Path) -> int:
    from rosbags.highlevel import AnyReader

    with AnyReader([bag], default_typestore=TYPESTORE) as reader:
        return sum(1 for _ in reader.messages())


def storage_counts(bag: Path) -> dict[str, int]:
    """Returns ``{topic: count}`` read without the project's code: sqlite3 COUNT(*) or the mcap library's summary."""
    counts: dict[str, int] = {}
    for database in sorted(bag.glob("*.db3")):
        with sqlite3.connect(database) as connection:
            for name, count in connection.execute(
                    "SELECT t.name, COUNT(*) FROM messages m JOIN topics t ON m.topic_id = t.id GROUP BY t.name"):
                counts[name] = counts.get(name, 0) + count
    for path in sorted(bag.glob("*.mcap")):
        from mcap.reader import make_reader

        with path.open("rb") as stream:
            summary = make_reader(stream).get_summary()
        for channel_id, count in summary.statistics.channel_message_counts.items():
            name = summary.channels[channel_id].topic
            counts[name] = counts.get(name, 0) + count
    return counts


def read_all(bag: Path) -> tuple[dict[str, int], list[tuple[int, str, object]], list[np.ndarray]]:
    """Returns the counts read, the stream (frames as their time) and every decoded frame."""
    stream, frames = [], []
    with DemoBag(bag, CONFIG) as demo:
        for time_ns, item, value in demo.messages():
            if item.camera_key:
                frames.append(demo.decode_frame(value))
                value = value.time_ns
            stream.append((time_ns, item.topic, value))
        counts = {topic: count.count for topic, count in demo.counts.items()}
    return counts, stream, frames


def assert_same_stream(first: list, second: list) -> None:
    assert len(first) == len(second)
    for (time_a, topic_a, value_a), (time_b, topic_b, value_b) in zip(first, second, strict=True):
        assert (time_a, topic_a) == (time_b, topic_b)
        if isinstance(value_a, np.ndarray):
            np.testing.assert_array_equal(value_a, value_b)
        else:
            assert value_a == value_b


@pytest.fixture(scope="module")
def bags(tmp_path_factory: pytest.TempPathFactory) -> dict[str, DemoRecording]:
    root = tmp_path_factory.mktemp("reader")
    return {storage: write_demo_bag(root / storage, storage=storage, duration_s=2.0, image_size=(160, 120), seed=21)
            for storage in ("sqlite3", "mcap")}


def copy_bag(recording: DemoRecording, target: Path) -> Path:
    shutil.copytree(recording.path, target)
    return target


# --------------------------------------------------------------------------------------------------
# QoS profiles that differ between metadata.yaml and the storage.


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_qos_in_metadata_differing_from_storage_hides_nothing(tmp_path: Path, bags: dict, storage: str) -> None:
    bag = copy_bag(bags[storage], tmp_path / "bag")
    metadata = yaml.safe_load((bag / "metadata.yaml").read_text())
    for topic in metadata["rosbag2_bagfile_information"]["topics_with_message_count"]:
        topic["topic_metadata"]["offered_qos_profiles"] = RECORDED_QOS
    (bag / "metadata.yaml").write_text(yaml.safe_dump(metadata))
    assert rosbags_count(bag) == 0  # what rosbags makes of such a bag

    counts, stream, _ = read_all(bag)
    _, original, _ = read_all(bags[storage].path)
    assert counts == {topic: storage_counts(bag)[topic] for topic in counts}
    assert counts["/camera/image_raw"] == len(bags[storage].image_times) > 50
    assert_same_stream(stream, original)


def test_qos_in_the_storage_record_differing_from_metadata_hides_nothing(tmp_path: Path, bags: dict) -> None:
    bag = copy_bag(bags["sqlite3"], tmp_path / "bag")
    (database,) = bag.glob("*.db3")
    with sqlite3.connect(database) as connection:
        connection.execute("UPDATE topics SET offered_qos_profiles = ?", (yaml.safe_dump(RECORDED_QOS),))
    assert rosbags_count(bag) == 0
    report = convert_bags([bag], tmp_path / "data", "qos", CONFIG)
    assert report.steps == len(expected_steps(bags["sqlite3"], CONFIG)["steps"])
    assert {topic: count.count for topic, count in report.bags[0].topics.items()} == {
        topic: storage_counts(bag)[topic] for topic in report.bags[0].topics}


# --------------------------------------------------------------------------------------------------
# Topics that are not needed are never parsed; a needed one that fails gives one line.


def write_mcap_copy(source: Path, target: Path, *, compression: str = "zstd", chunk_size: int = 786432,
                    extra_topic: bool = False, **options: object) -> None:
    """Rewrites an mcap file with the mcap library (rosbag2's chunking and compression), optionally adding a
    service-event topic whose schema no ROS parser reads."""
    from mcap.reader import make_reader
    from mcap.writer import CompressionType, Writer

    kinds = {"zstd": CompressionType.ZSTD, "lz4": CompressionType.LZ4, "": CompressionType.NONE}
    with source.open("rb") as stream, target.open("wb") as sink:
        writer = Writer(sink, chunk_size=chunk_size, compression=kinds[compression], **options)
        writer.start(profile="ros2", library="test")
        schemas: dict[int, int] = {}
        channels: dict[int, int] = {}
        extra = None
        if extra_topic:
            schema = writer.register_schema("example_interfaces/srv/AddTwoInts_Event", "ros2msg",
                                            b"service_msgs/ServiceEventInfo info\n%%% not a definition {{\n")
            extra = writer.register_channel("/add_two_ints/_service_event", "cdr", schema,
                                            {"offered_qos_profiles": ""})
        for schema, channel, message in make_reader(stream).iter_messages(log_time_order=False):
            if schema.id not in schemas:
                schemas[schema.id] = writer.register_schema(schema.name, schema.encoding, schema.data)
            if channel.id not in channels:
                channels[channel.id] = writer.register_channel(channel.topic, channel.message_encoding,
                                                               schemas[schema.id], dict(channel.metadata))
            writer.add_message(channels[channel.id], message.log_time, message.data, message.publish_time)
            if extra is not None:
                writer.add_message(extra, message.log_time + 1, b"\x00\x01\x00\x00garbage", message.log_time + 1)
        writer.finish()


def test_unparseable_schema_of_an_unneeded_mcap_topic_does_not_matter(tmp_path: Path, bags: dict) -> None:
    bag = tmp_path / "bag"
    bag.mkdir()
    (source,) = bags["mcap"].path.glob("*.mcap")
    write_mcap_copy(source, bag / source.name, extra_topic=True)
    with pytest.raises(Exception):  # noqa: B017 (rosbags fails on the schema, in its own way)
        rosbags_count(bag)
    counts, stream, _ = read_all(bag)
    _, original, _ = read_all(bags["mcap"].path)
    assert_same_stream(stream, original)
    with DemoBag(bag, CONFIG) as demo:
        assert demo.topic_types()["/add_two_ints/_service_event"] == "example_interfaces/srv/AddTwoInts_Event"
    assert storage_counts(bag)["/add_two_ints/_service_event"] == sum(counts.values())


def test_unknown_type_of_an_unneeded_sqlite3_topic_does_not_matter(tmp_path: Path, bags: dict) -> None:
    bag = copy_bag(bags["sqlite3"], tmp_path / "bag")
    (database,) = bag.glob("*.db3")
    with sqlite3.connect(database) as connection:
        connection.execute("INSERT INTO topics VALUES (99, '/weird', 'my_pkg/msg/Weird', 'cdr', '', '')")
        connection.execute("INSERT INTO message_definitions (topic_type, encoding, encoded_message_definition, "
                           "type_description_hash) VALUES ('my_pkg/msg/Weird', 'ros2msg', '%%% {{', '')")
        connection.execute("INSERT INTO messages (topic_id, timestamp, data) VALUES (99, 1, x'00010000ff')")
    report = convert_bags([bag], tmp_path / "data", "weird", CONFIG)
    assert report.steps == len(expected_steps(bags["sqlite3"], CONFIG)["steps"])


def test_a_needed_message_that_does_not_decode_is_one_line_naming_topic_and_type(tmp_path: Path, bags: dict) -> None:
    bag = copy_bag(bags["sqlite3"], tmp_path / "bag")
    (database,) = bag.glob("*.db3")
    with sqlite3.connect(database) as connection:
        connection.execute("UPDATE messages SET data = x'000100000300' WHERE topic_id = "
                           "(SELECT id FROM topics WHERE name = '/joint_states')")
    with pytest.raises(DatasetError) as error:
        convert_bags([bag], tmp_path / "data", "broken", CONFIG)
    message = str(error.value)
    assert "\n" not in message and len(message) < 400
    assert "sensor_msgs/msg/JointState message on /joint_states" in message and str(bag) in message


# --------------------------------------------------------------------------------------------------
# Bags without metadata.yaml, split bags, compressed chunks, truncated files.


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_bag_without_metadata_reads_from_its_storage(tmp_path: Path, bags: dict, storage: str) -> None:
    bag = copy_bag(bags[storage], tmp_path / "bag")
    (bag / "metadata.yaml").unlink()
    counts, stream, frames = read_all(bag)
    original_counts, original, original_frames = read_all(bags[storage].path)
    assert counts == original_counts == {topic: storage_counts(bag)[topic] for topic in counts}
    assert_same_stream(stream, original)
    assert all(np.array_equal(a, b) for a, b in zip(frames, original_frames, strict=True))
    single_file = next(p for p in bag.iterdir() if p.suffix in (".db3", ".mcap"))
    assert read_all(single_file)[0] == counts  # one storage file given directly


def test_split_bag_without_metadata_reads_in_file_number_order(tmp_path: Path) -> None:
    start = 1_700_000_000_000_000_000
    parts = [write_demo_bag(tmp_path / f"part{number}", storage="mcap", duration_s=1.0, seed=number,
                            start_ns=start + number * 1_000_000_000) for number in range(3)]
    split = tmp_path / "split"
    split.mkdir()
    for number, part in enumerate(parts):  # bag_10 must come after bag_2
        shutil.move(str(next(part.path.glob("*.mcap"))), str(split / f"split_{(0, 2, 10)[number]}.mcap"))
    with DemoBag(split, CONFIG) as demo:
        times = [time_ns for time_ns, _, _ in demo.messages()]
    assert times == sorted(times) and len(times) == sum(storage_counts(split).values())
    stored = open_bag(split)
    stored.close()
    assert [storage.path.name for storage in stored.files] == ["split_0.mcap", "split_2.mcap", "split_10.mcap"]


def test_directory_without_metadata_or_storage_says_so(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(BagError, match="has no metadata.yaml and no .db3 or .mcap file"):
        convert_bags([tmp_path / "empty"], tmp_path / "data", "x", CONFIG)


@pytest.mark.parametrize(("compression", "chunk_size"), [("zstd", 32768), ("lz4", 32768), ("zstd", 786432),
                                                          ("lz4", 786432), ("", 32768)])
def test_compressed_mcap_chunks(tmp_path: Path, bags: dict, compression: str, chunk_size: int) -> None:
    bag = copy_bag(bags["mcap"], tmp_path / "bag")
    (source,) = bags["mcap"].path.glob("*.mcap")
    write_mcap_copy(source, bag / source.name, compression=compression, chunk_size=chunk_size)
    counts, stream, frames = read_all(bag)
    original_counts, original, original_frames = read_all(bags["mcap"].path)
    assert counts == original_counts == {topic: storage_counts(bag)[topic] for topic in counts}
    assert_same_stream(stream, original)
    assert all(np.array_equal(a, b) for a, b in zip(frames, original_frames, strict=True))


@pytest.mark.parametrize("layout", ["chunks without message indexes", "no chunks", "no index or statistics"])
def test_mcap_layouts_other_writers_produce(tmp_path: Path, bags: dict, layout: str) -> None:
    from mcap.writer import IndexType

    options = {"chunks without message indexes": {"index_types": IndexType.CHUNK},
               "no chunks": {"use_chunking": False},
               "no index or statistics": {"index_types": IndexType.NONE, "use_statistics": False}}[layout]
    bag = copy_bag(bags["mcap"], tmp_path / "bag")
    (source,) = bags["mcap"].path.glob("*.mcap")
    write_mcap_copy(source, bag / source.name, chunk_size=32768, **options)
    counts, stream, frames = read_all(bag)
    original_counts, original, original_frames = read_all(bags["mcap"].path)
    assert counts == original_counts
    assert_same_stream(stream, original)
    assert all(np.array_equal(a, b) for a, b in zip(frames, original_frames, strict=True))


def test_compressed_chunks_convert_to_the_expected_steps(tmp_path: Path, bags: dict) -> None:
    bag = copy_bag(bags["mcap"], tmp_path / "bag")
    (source,) = bags["mcap"].path.glob("*.mcap")
    write_mcap_copy(source, bag / source.name, compression="lz4", chunk_size=32768)
    convert_bags([bag], tmp_path / "data", "lz4_demo", CONFIG)
    expected = expected_steps(bags["mcap"], CONFIG)["steps"]
    episodes = load_episodes(tmp_path / "data", "lz4_demo", "train")
    steps = [step for episode in episodes for step in episode["steps"]]
    assert [frame_index(step["observation"]["image"]) for step in steps] == [want["image"] for want in expected]


def test_truncated_mcap_without_metadata_reads_what_it_holds(tmp_path: Path, bags: dict) -> None:
    bag = copy_bag(bags["mcap"], tmp_path / "bag")
    (data_file,) = bag.glob("*.mcap")
    (bag / "metadata.yaml").unlink()
    data = data_file.read_bytes()
    data_file.write_bytes(data[: int(len(data) * 0.7)])  # the recorder died: no summary, a cut chunk
    report = convert_bags([bag], tmp_path / "data", "cut", CONFIG.replace(drop_idle=False))
    assert 0 < report.bags[0].topics["/camera/image_raw"].count < len(bags["mcap"].image_times)
    assert any("truncated" in warning for warning in report.warnings)


def test_only_the_frames_steps_use_are_read(tmp_path: Path, bags: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from openvla_ros.dataset.bag_storage import StoredBag

    reads = []
    original = StoredBag.read

    def counting_read(self, locator, topic=""):
        reads.append(locator)
        return original(self, locator, topic)

    monkeypatch.setattr(StoredBag, "read", counting_read)
    report = convert_bags([bags["mcap"].path], tmp_path / "data", "lazy", CONFIG)
    frames = report.bags[0].topics["/camera/image_raw"].count
    assert len(set(reads)) == len(reads) <= report.steps + report.dropped_idle + report.dropped_stale
    assert len(reads) < frames / 4


@pytest.mark.parametrize("mode", ["message", "file"])
def test_zstd_compressed_bags(tmp_path: Path, bags: dict, mode: str) -> None:
    from rosbags.highlevel import AnyReader
    from rosbags.rosbag2 import CompressionFormat, CompressionMode, Writer

    target = tmp_path / "compressed"
    writer = Writer(target, version=9)
    writer.set_compression(CompressionMode[mode.upper()], CompressionFormat.ZSTD)
    with AnyReader([bags["sqlite3"].path], default_typestore=TYPESTORE) as reader, writer:
        connections = {conn.topic: writer.add_connection(conn.topic, conn.msgtype, typestore=TYPESTORE)
                       for conn in reader.connections}
        for connection, time_ns, data in reader.messages():
            writer.write(connections[connection.topic], time_ns, data)
    counts, stream, _ = read_all(target)
    _, original, _ = read_all(bags["sqlite3"].path)
    assert_same_stream(stream, original)
    assert sum(counts.values()) == sum(storage_counts(bags["sqlite3"].path).values())
    stored = open_bag(target)
    decompressed = stored._temporary
    stored.close()
    assert (decompressed is None) == (mode == "message")
    assert decompressed is None or not decompressed.exists()  # the decompressed copy is removed


def _as_version_1(metadata: dict) -> dict:
    """The same metadata written as rosbag2's first format: version 1, topics under ``topic_and_type``."""
    info = metadata["rosbag2_bagfile_information"]
    info["version"] = 1
    for item in info["topics_with_message_count"]:
        topic = item.pop("topic_metadata")
        item["topic_and_type"] = {"name": topic["name"], "type": topic["type"]}
    info.pop("files", None)
    return metadata


def test_version_1_metadata_counts_are_checked_too(tmp_path: Path, bags: dict) -> None:
    bag = copy_bag(bags["sqlite3"], tmp_path / "bag")
    metadata = _as_version_1(yaml.safe_load((bag / "metadata.yaml").read_text()))
    (bag / "metadata.yaml").write_text(yaml.safe_dump(metadata))
    counts, _, _ = read_all(bag)  # the true counts: read without complaint
    assert counts == {topic: storage_counts(bag)[topic] for topic in counts}
    for item in metadata["rosbag2_bagfile_information"]["topics_with_message_count"]:
        if item["topic_and_type"]["name"] == "/teleop/action":
            item["message_count"] = 99
    (bag / "metadata.yaml").write_text(yaml.safe_dump(metadata))
    with pytest.raises(BagError, match=r"does not match its metadata \(/teleop/action: read \d+, metadata declares 99"):
        read_all(bag)


def test_message_compressed_bag_without_its_metadata_says_so(tmp_path: Path, bags: dict) -> None:
    from rosbags.highlevel import AnyReader
    from rosbags.rosbag2 import CompressionFormat, CompressionMode, Writer

    target = tmp_path / "compressed"
    writer = Writer(target, version=9)
    writer.set_compression(CompressionMode.MESSAGE, CompressionFormat.ZSTD)
    with AnyReader([bags["sqlite3"].path], default_typestore=TYPESTORE) as reader, writer:
        connections = {conn.topic: writer.add_connection(conn.topic, conn.msgtype, typestore=TYPESTORE)
                       for conn in reader.connections}
        for connection, time_ns, data in reader.messages():
            writer.write(connections[connection.topic], time_ns, data)
    (target / "metadata.yaml").unlink()
    with pytest.raises(BagError, match="zstd-compressed one by one") as caught:
        read_all(target)
    assert "has no metadata.yaml" in str(caught.value) and "CDR encapsulation" not in str(caught.value)


def test_topics_stored_without_a_leading_slash_can_be_named(tmp_path: Path, bags: dict) -> None:
    from openvla_ros.dataset import TopicConfig

    bag = copy_bag(bags["sqlite3"], tmp_path / "bag")
    (database,) = bag.glob("*.db3")
    with sqlite3.connect(database) as connection:  # as rosbag2's own test bags store them (e.g. `AAA`)
        connection.execute("UPDATE topics SET name = substr(name, 2)")
    metadata = yaml.safe_load((bag / "metadata.yaml").read_text())
    for item in metadata["rosbag2_bagfile_information"]["topics_with_message_count"]:
        item["topic_metadata"]["name"] = item["topic_metadata"]["name"][1:]
    (bag / "metadata.yaml").write_text(yaml.safe_dump(metadata))
    _, original, _ = read_all(bags["sqlite3"].path)
    relative = {name: topic.lstrip("/") for name, topic in vars(CONFIG.topics).items() if topic}
    for config in (CONFIG.replace(topics=TopicConfig(**relative)), CONFIG):  # named as stored, and with '/'
        stream = []
        with DemoBag(bag, config) as demo:
            for time_ns, item, value in demo.messages():
                stream.append((time_ns, "/" + item.topic, value.time_ns if item.camera_key else value))
        assert_same_stream(stream, original)
    with pytest.raises(DatasetError, match="without spaces"):
        TopicConfig(image="camera image")


def test_an_action_topic_of_the_wrong_type_names_its_type_and_the_accepted_ones(tmp_path: Path, bags: dict) -> None:
    from openvla_ros.dataset import TopicConfig

    config = CONFIG.replace(topics=TopicConfig(**{**vars(CONFIG.topics), "action": "/instruction"}))
    with pytest.raises(DatasetError) as caught, DemoBag(bags["sqlite3"].path, config):
        pass
    message = str(caught.value)
    assert "topic /instruction" in message and "is a std_msgs/msg/String" in message
    assert "std_msgs/msg/Float64MultiArray" in message and "gripper" not in message


@pytest.mark.parametrize("cut", ["closing magic", "summary"])
def test_an_mcap_whose_summary_was_cut_reads_every_message_and_warns(tmp_path: Path, bags: dict, cut: str) -> None:
    bag = copy_bag(bags["mcap"], tmp_path / "bag")
    (data_file,) = bag.glob("*.mcap")
    (bag / "metadata.yaml").unlink()
    data = data_file.read_bytes()
    footer_at = len(data) - 8 - 29  # the footer record (29 bytes) before the closing magic (8 bytes)
    summary_start = int.from_bytes(data[footer_at + 9: footer_at + 17], "little")
    keep = len(data) - 4 if cut == "closing magic" else summary_start + (footer_at - summary_start) // 2
    data_file.write_bytes(data[:keep])  # every message is intact, the end is not
    report = convert_bags([bag], tmp_path / "data", "cut_summary", CONFIG.replace(drop_idle=False))
    assert report.bags[0].topics["/camera/image_raw"].count == len(bags["mcap"].image_times)
    assert any("summary cannot be used" in warning for warning in report.warnings), report.warnings


def test_a_folder_of_several_bags_converts_each_as_its_own_recording(tmp_path: Path, bags: dict) -> None:
    folder = tmp_path / "demos"
    for name in ("episode_10", "episode_2"):
        copy_bag(bags["sqlite3"], folder / name)
    report = convert_bags([folder], tmp_path / "data", "folder", CONFIG)
    assert [summary.path.name for summary in report.bags] == ["episode_2", "episode_10"]
    assert f"{folder} is a folder of 2 bags, each converted as its own recording: episode_2, episode_10" in \
        report.warnings
    single = convert_bags([bags["sqlite3"].path], tmp_path / "data", "single", CONFIG)
    assert report.steps == 2 * single.steps
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no metadata.yaml and no .db3 or .mcap file"):
        convert_bags([tmp_path / "empty"], tmp_path / "data", "empty", CONFIG)
