"""Writing episodes as an RLDS dataset that tensorflow-datasets, OpenVLA, Octo and Open X-Embodiment load.

Layout (``DATA_DIR/NAME/VERSION/``): TFRecord shards ``NAME-train.tfrecord-*`` and ``NAME-val.tfrecord-*``
of serialized episodes, ``dataset_info.json`` and ``features.json`` (written by
``tfds.folder_dataset.write_metadata``), and ``dataset_statistics.json`` in OpenVLA's format keyed by
NAME. The dataset opens with ``tfds.builder(NAME, data_dir=DATA_DIR)`` and
``tfds.builder_from_directory(DATA_DIR/NAME/VERSION)``.

Everything is written under a hidden temporary directory inside ``DATA_DIR`` and moved into place only
by :meth:`RldsWriter.finish`; :meth:`RldsWriter.abort` (also run on any exception or Ctrl-C inside the
``with`` block) removes it, so a failed conversion leaves no partial dataset behind. TensorFlow is not
needed: records are framed here (length, masked CRC32C) and serialized with tensorflow-datasets' own
example serializer.
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from openvla_ros.dataset.config import validate_dataset_name
from openvla_ros.errors import DatasetError
from openvla_ros.interrupts import mark_owner, remove_stale_staging, staging_in_use
from openvla_ros.model.action_codec import (
    ACTION_DIM,
    ACTION_NAMES,
    array_statistics,
    compute_action_statistics,
)

logger = logging.getLogger(__name__)

VERSION = "1.0.0"
RELEASE_NOTES = {
    "1.0.0": "First release: rosbag2 demonstrations resampled to the control rate, 224x224 JPEG images, "
    "7-DoF end-effector delta actions, train and val splits.",
}
STATISTICS_FILE = "dataset_statistics.json"
FILE_FORMAT = "tfrecord"
TRAIN_SPLIT = "train"
VAL_SPLIT = "val"

# Step and episode field names (the RLDS layout OpenVLA's loader reads).
STEPS = "steps"
OBSERVATION = "observation"
STATE = "state"
ACTION = "action"
LANGUAGE_INSTRUCTION = "language_instruction"
REWARD = "reward"
DISCOUNT = "discount"
IS_FIRST = "is_first"
IS_LAST = "is_last"
IS_TERMINAL = "is_terminal"
EPISODE_METADATA = "episode_metadata"
FILE_PATH = "file_path"
START_TIME_NS = "start_time_ns"

CAMERA_DOCS = {
    "image": "Primary camera, RGB, resized to the model size with the policy's own transform "
    "(PIL bicubic, aspect ratio not kept), JPEG encoded.",
    "wrist_image": "Wrist camera, RGB, resized like the primary camera, JPEG encoded.",
}


@dataclass
class EpisodeStep:
    """One step ready to be written.

    Attributes:
        images: ``{camera key: JPEG bytes}`` of the square model-size images.
        action: ``[dx, dy, dz, droll, dpitch, dyaw, gripper]``.
        instruction: the language instruction.
        state: the robot state, or None when no state is recorded.
    """

    images: dict[str, bytes]
    action: np.ndarray
    instruction: str
    state: np.ndarray | None = None


def make_features(image_keys: Sequence[str], image_size: int, state_dim: int | None) -> Any:
    """Returns the ``tfds.features.FeaturesDict`` of an episode, every feature documented."""
    import tensorflow_datasets as tfds

    observation: dict[str, Any] = {
        key: tfds.features.Image(
            shape=(image_size, image_size, 3),
            dtype=np.uint8,
            encoding_format="jpeg",
            doc=CAMERA_DOCS.get(key, f"Camera {key}, RGB, JPEG encoded."),
        )
        for key in image_keys
    }
    if state_dim is not None:
        observation[STATE] = tfds.features.Tensor(
            shape=(state_dim,),
            dtype=np.float32,
            doc="Robot state at the step time: joint positions (JointState), [x, y, z, roll, pitch, yaw] "
            "(PoseStamped) or the recorded vector, in the recording's units.",
        )
    step = {
        OBSERVATION: tfds.features.FeaturesDict(observation),
        ACTION: tfds.features.Tensor(
            shape=(ACTION_DIM,),
            dtype=np.float32,
            doc=f"End-effector delta over the step, {list(ACTION_NAMES)}: translation in the base frame "
            "(recording units), rotation as roll/pitch/yaw (radians), gripper absolute (1 = open, 0 = closed).",
        ),
        LANGUAGE_INSTRUCTION: tfds.features.Text(doc="Language instruction of the step."),
        REWARD: tfds.features.Scalar(dtype=np.float32, doc="1.0 on the last step of a demonstration, else 0.0."),
        DISCOUNT: tfds.features.Scalar(dtype=np.float32, doc="Always 1.0."),
        IS_FIRST: tfds.features.Scalar(dtype=np.bool_, doc="True on the first step of the episode."),
        IS_LAST: tfds.features.Scalar(dtype=np.bool_, doc="True on the last step of the episode."),
        IS_TERMINAL: tfds.features.Scalar(
            dtype=np.bool_, doc="True on the last step: demonstrations end when the task is done."
        ),
    }
    return tfds.features.FeaturesDict(
        {
            STEPS: tfds.features.Dataset(step),
            EPISODE_METADATA: tfds.features.FeaturesDict(
                {
                    FILE_PATH: tfds.features.Text(doc="Path of the bag the episode comes from."),
                    START_TIME_NS: tfds.features.Scalar(
                        dtype=np.int64, doc="Bag time of the episode's first step (ns since the epoch)."
                    ),
                }
            ),
        }
    )


def tfrecord_frame(data: bytes) -> bytes:
    """Returns ``data`` framed as one TFRecord record (length, masked CRC32C of it, data, masked CRC32C)."""
    length = struct.pack("<Q", len(data))
    return b"".join(
        (length, struct.pack("<I", _masked_crc(length)), data, struct.pack("<I", _masked_crc(data)))
    )


def _masked_crc(data: bytes) -> int:
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def choose_val_episodes(num_episodes: int, val_fraction: float, seed: int) -> list[int]:
    """Returns the sorted indices of the validation episodes.

    At least one episode and, with two or more episodes, at least one training episode remain; with a
    single episode it serves as both (OpenVLA's loader needs a non-empty ``val`` split).
    """
    if num_episodes <= 1:
        return list(range(num_episodes))
    count = min(num_episodes - 1, max(1, round(num_episodes * val_fraction)))
    order = np.random.default_rng(seed).permutation(num_episodes)
    return sorted(int(index) for index in order[:count])


def compute_dataset_statistics(actions: np.ndarray, states: np.ndarray | None, num_episodes: int) -> dict:
    """Returns OpenVLA's statistics of a dataset: action (with mask), proprio when states exist, counts.

    Raises:
        DatasetError: when there are no actions.
    """
    if len(actions) == 0:
        raise DatasetError("no steps to compute statistics over")
    statistics = compute_action_statistics(actions, num_trajectories=num_episodes)
    if states is not None and states.size:
        statistics["proprio"] = array_statistics(states)
    return statistics


class RldsWriter:
    """Writes episodes into a temporary directory and publishes the dataset atomically.

    Use as a context manager: ``add_episode`` for each episode, then ``finish``. Leaving the block by
    an exception (Ctrl-C included) removes everything written.

    Raises (from ``__enter__``):
        DatasetError: for an invalid name or an existing dataset without ``overwrite``.
    """

    def __init__(self, data_dir: str | Path, name: str, *, image_keys: Sequence[str], image_size: int = 224,
                 overwrite: bool = False, max_shard_bytes: int = 256 << 20, description: str = "") -> None:
        self.data_dir = Path(data_dir)
        self.name = validate_dataset_name(name)
        self.image_keys = tuple(image_keys)
        self.image_size = image_size
        self.overwrite = overwrite
        self.max_shard_bytes = max_shard_bytes
        self.description = description
        self.state_dim: int | None = None
        self._features: Any = None
        self._serializer: Any = None
        self._temp_root: Path | None = None
        self._staging: Any = None
        self._created_data_dir = False
        self._records: list[tuple[int, int, int]] = []  # (offset, length, steps)
        self._actions: list[np.ndarray] = []
        self._states: list[np.ndarray] = []

    @property
    def dataset_dir(self) -> Path:
        """Where the dataset ends up: ``DATA_DIR/NAME/VERSION``."""
        return self.data_dir / self.name / VERSION

    @property
    def num_episodes(self) -> int:
        return len(self._records)

    def __enter__(self) -> RldsWriter:
        self._recover_killed_runs()
        self._check_destination()
        self._created_data_dir = not self.data_dir.exists()
        try:
            try:
                self.data_dir.mkdir(parents=True, exist_ok=True)
                # Named before it is made, so that an interrupt at any point after the mkdir finds it to remove.
                self._temp_root = self.data_dir / f".{self.name}-incomplete-{secrets.token_hex(6)}"
                self._temp_root.mkdir()
                mark_owner(self._temp_root)
            except OSError as exc:
                raise DatasetError(f"cannot write into {self.data_dir}: {exc.strerror or exc}") from exc
            self._staging = open(self._temp_root / "episodes.staging", "w+b")  # noqa: SIM115 - closed in finish/abort
        except BaseException:  # Ctrl-C or SIGTERM included: __exit__ does not run when __enter__ raises
            self.abort()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is not None or self._temp_root is not None:
            self.abort()

    def _recover_killed_runs(self) -> None:
        """Removes the staging directories of earlier runs of this name that were killed (SIGKILL, power
        loss), with a warning each; a dataset such a run had set aside to replace is put back first."""
        pattern = f".{self.name}-incomplete-*"
        for staging in sorted(self.data_dir.glob(pattern)) if self.data_dir.is_dir() else []:
            replaced = staging / "replaced"
            if replaced.is_dir() and not self.dataset_dir.exists() and not staging_in_use(staging):
                replaced.rename(self.dataset_dir)
                logger.warning("put back %s, which a killed run had set aside to replace it", self.dataset_dir)
        remove_stale_staging(self.data_dir, pattern)

    def _check_destination(self) -> None:
        if self.dataset_dir.exists() and not self.overwrite:
            raise DatasetError(
                f"dataset {self.dataset_dir} already exists; pass --overwrite to replace it or choose "
                "another --name or --out"
            )

    def add_episode(self, steps: Sequence[EpisodeStep], file_path: str, start_time_ns: int) -> None:
        """Serializes one episode into the staging file.

        Raises:
            DatasetError: for an empty episode, a state size that differs from earlier episodes, or
                missing camera images.
        """
        if not steps:
            raise DatasetError(f"episode from {file_path} has no steps; it cannot be written")
        has_state = steps[0].state is not None
        state_dim = int(np.asarray(steps[0].state).size) if has_state else None
        if self._features is None:
            self.state_dim = state_dim
            self._features = make_features(self.image_keys, self.image_size, state_dim)
            from tensorflow_datasets.core import example_serializer

            self._serializer = example_serializer.ExampleSerializer(self._features.get_serialized_info())
        for step in steps:
            dim = None if step.state is None else int(np.asarray(step.state).size)
            if dim != self.state_dim:
                raise DatasetError(
                    f"episode from {file_path}: state has {dim} values where earlier steps had {self.state_dim}; "
                    "all recordings of one dataset need the same state layout (conversion.joint_names)"
                )
            if set(step.images) != set(self.image_keys):
                raise DatasetError(f"episode from {file_path}: a step lacks images for {sorted(self.image_keys)}")
        last = len(steps) - 1
        example = {
            STEPS: [
                {
                    OBSERVATION: {**step.images, **({STATE: np.asarray(step.state, np.float32)} if has_state else {})},
                    ACTION: np.asarray(step.action, dtype=np.float32),
                    LANGUAGE_INSTRUCTION: step.instruction,
                    REWARD: np.float32(index == last),
                    DISCOUNT: np.float32(1.0),
                    IS_FIRST: index == 0,
                    IS_LAST: index == last,
                    IS_TERMINAL: index == last,
                }
                for index, step in enumerate(steps)
            ],
            EPISODE_METADATA: {FILE_PATH: file_path, START_TIME_NS: np.int64(start_time_ns)},
        }
        record = tfrecord_frame(self._serializer.serialize_example(self._features.encode_example(example)))
        offset = self._staging.tell()
        self._staging.write(record)
        self._records.append((offset, len(record), len(steps)))
        self._actions.append(np.stack([np.asarray(step.action, np.float64) for step in steps]))
        if has_state:
            self._states.append(np.stack([np.asarray(step.state, np.float64) for step in steps]))

    def finish(self, *, val_fraction: float, seed: int = 0) -> dict[str, Any]:
        """Writes the splits, metadata and statistics and moves the dataset into place.

        Returns:
            ``{"path", "splits": {split: episodes}, "val_episodes", "statistics"}``.

        Raises:
            DatasetError: when no episode was added, or the destination appeared meanwhile without
                ``overwrite``.
        """
        import tensorflow_datasets as tfds

        if not self._records:
            raise DatasetError("no episodes to write: every recording was empty after conversion")
        self._check_destination()
        build_dir = self._temp_root / self.name / VERSION
        build_dir.mkdir(parents=True)
        val = choose_val_episodes(len(self._records), val_fraction, seed)
        train = [index for index in range(len(self._records)) if index not in set(val)] or list(val)
        split_infos = [self._write_split(build_dir, split, indices) for split, indices in
                       ((TRAIN_SPLIT, train), (VAL_SPLIT, val))]
        self._staging.close()
        (self._temp_root / "episodes.staging").unlink()

        actions = np.concatenate(self._actions)
        states = np.concatenate(self._states) if self._states else None
        statistics = compute_dataset_statistics(actions, states, len(self._records))
        tfds.folder_dataset.write_metadata(
            data_dir=build_dir,
            features=self._features,
            split_infos=split_infos,
            version=VERSION,
            check_data=False,
            description=self.description or "Robot demonstrations converted from rosbag2 recordings.",
            metadata=tfds.core.MetadataDict(version=VERSION, release_notes=RELEASE_NOTES),
        )
        (build_dir / STATISTICS_FILE).write_text(json.dumps({self.name: statistics}, indent=2))
        self._publish(build_dir)
        return {
            "path": self.dataset_dir,
            "splits": {TRAIN_SPLIT: len(train), VAL_SPLIT: len(val)},
            "val_episodes": val,
            "statistics": statistics,
        }

    def _write_split(self, build_dir: Path, split: str, indices: list[int]) -> Any:
        import tensorflow_datasets as tfds

        shards: list[list[int]] = [[]]
        size = 0
        for index in indices:
            length = self._records[index][1]
            if shards[-1] and size + length > self.max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(index)
            size += length
        total_bytes = 0
        for number, shard in enumerate(shards):
            path = build_dir / f"{self.name}-{split}.{FILE_FORMAT}-{number:05d}-of-{len(shards):05d}"
            with open(path, "wb") as out:
                for index in shard:
                    offset, length, _ = self._records[index]
                    self._staging.seek(offset)
                    out.write(self._staging.read(length))
                    total_bytes += length
        self._staging.seek(0, 2)
        return tfds.core.SplitInfo(name=split, shard_lengths=[len(shard) for shard in shards], num_bytes=total_bytes)

    def _publish(self, build_dir: Path) -> None:
        final = self.dataset_dir
        final.parent.mkdir(parents=True, exist_ok=True)
        replaced = self._temp_root / "replaced"
        if final.exists():
            final.rename(replaced)
        try:
            build_dir.rename(final)
        except BaseException:  # Ctrl-C or a failed rename: put the old dataset back before leaving
            if replaced.exists() and not final.exists():
                replaced.rename(final)
            raise
        shutil.rmtree(self._temp_root, ignore_errors=True)
        self._temp_root = None

    def abort(self) -> None:
        """Removes everything written so far (the published dataset, if any, is left alone)."""
        if self._staging is not None and not self._staging.closed:
            self._staging.close()
        if self._temp_root is not None:
            shutil.rmtree(self._temp_root, ignore_errors=True)
            self._temp_root = None
        if self._created_data_dir:
            try:
                self.data_dir.rmdir()  # only when still empty: a directory this writer created
            except OSError:
                pass
