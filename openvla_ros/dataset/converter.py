"""Conversion of demonstration bags into one RLDS dataset: read, align, filter, resize, write.

Each bag gives one episode, or several when ``split_on_instruction`` / ``split_on_gap`` cut it. Steps
are resampled by :class:`~openvla_ros.dataset.alignment.StepAligner`; stale steps (an image or the
state older than the allowed age) and idle steps are dropped and counted. Images go through the
policy's own :class:`~openvla_ros.model.processor.ImageTransform` and are stored as JPEG, so a stored frame
differs from what the policy node feeds the model only by JPEG loss.
"""

from __future__ import annotations

import io
import os
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from openvla_ros.dataset.alignment import AlignedStep, StepAligner
from openvla_ros.dataset.bag_reader import DemoBag, RawFrame, TopicCount
from openvla_ros.dataset.config import ConversionConfig, validate_dataset_name
from openvla_ros.dataset.rlds_writer import EpisodeStep, RldsWriter
from openvla_ros.errors import DatasetError
from openvla_ros.model.action_codec import ACTION_NAMES


@dataclass
class BagSummary:
    """What one bag contributed."""

    path: Path
    episodes: int = 0
    steps: int = 0
    dropped_idle: int = 0
    dropped_stale: int = 0
    episode_steps: list[int] = field(default_factory=list)  # steps of each episode, in order
    topics: dict[str, TopicCount] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass
class ConversionReport:
    """The outcome of a conversion."""

    dataset_dir: Path
    name: str
    bags: list[BagSummary]
    splits: dict[str, int]
    statistics: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    @property
    def episodes(self) -> int:
        return sum(bag.episodes for bag in self.bags)

    @property
    def steps(self) -> int:
        return sum(bag.steps for bag in self.bags)

    @property
    def dropped_idle(self) -> int:
        return sum(bag.dropped_idle for bag in self.bags)

    @property
    def dropped_stale(self) -> int:
        return sum(bag.dropped_stale for bag in self.bags)


class FrameEncoder:
    """Turns camera frames into stored JPEG bytes on worker threads (decoding, resizing and JPEG
    encoding release the GIL) and checks that each camera keeps one frame size.

    Use as a context manager; :meth:`submit` returns a future of the JPEG bytes.
    """

    def __init__(self, config: ConversionConfig, workers: int | None = None, max_pending: int = 32) -> None:
        from openvla_ros.model.processor import ImageTransform

        self._transform = ImageTransform(image_size=config.image_size)
        self._quality = config.jpeg_quality
        self._sizes: dict[str, tuple[int, int, str]] = {}
        # The newest frame submitted per camera and its future. The frame object itself is kept (not its
        # id()): a freed frame's id can be reused by a later frame, which must not get the old JPEG.
        self._last: dict[str, tuple[RawFrame, Future]] = {}
        self._workers = workers or min(4, os.cpu_count() or 1)
        self._max_pending = max_pending
        self._pending: deque[Future] = deque()
        self._pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> FrameEncoder:
        self._pool = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="frame-encoder")
        return self

    def __exit__(self, *exc_info: object) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, bag: DemoBag, key: str, frame: RawFrame) -> Future:
        """Returns a future of the frame's JPEG bytes at the model size (a frame used twice is encoded once).

        The future raises DatasetError when the frame cannot be decoded or its size differs from the
        camera's first frame.
        """
        cached = self._last.get(key)
        if cached is not None and cached[0] is frame:
            return cached[1]
        while len(self._pending) >= self._max_pending:  # bounded memory: wait for the oldest frame
            self._pending.popleft().result()
        future = self._pool.submit(self._encode, bag, key, frame)
        self._pending.append(future)
        self._last[key] = (frame, future)
        return future

    def _encode(self, bag: DemoBag, key: str, frame: RawFrame) -> bytes:
        rgb = bag.decode_frame(frame)
        size = (rgb.shape[1], rgb.shape[0])
        first = self._sizes.setdefault(key, (*size, f"{bag.path} at {frame.time_ns} ns"))
        if first[:2] != size:
            raise DatasetError(
                f"camera {key} ({frame.topic}) changes image size: {size[0]}x{size[1]} in {bag.path} at "
                f"{frame.time_ns} ns, but {first[0]}x{first[1]} in {first[2]}; convert recordings of one "
                "camera set-up into one dataset"
            )
        return encode_jpeg(self._transform.model_image(rgb), self._quality)


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """Returns the JPEG bytes of an RGB uint8 image."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def convert_bags(
    bags: Sequence[str | Path],
    data_dir: str | Path,
    name: str,
    config: ConversionConfig,
    *,
    overwrite: bool = False,
    progress: bool = False,
    description: str = "",
) -> ConversionReport:
    """Converts bags into the RLDS dataset ``data_dir/name/VERSION`` and returns the report.

    Nothing is left in ``data_dir`` when this raises (Ctrl-C included).

    Raises:
        DatasetError: for a missing or unreadable bag, a missing topic, a metadata/data mismatch, a
            bag that gives no steps, changing image sizes, or an existing dataset without ``overwrite``.
    """
    validate_dataset_name(name)
    if not bags:
        raise DatasetError("no bags given; pass one or more rosbag2 directories")
    bags, notes = expand_bag_folders(bags)
    encoder = FrameEncoder(config)
    summaries: list[BagSummary] = []
    keys = list(config.topics.camera_topics())
    writer = RldsWriter(data_dir, name, image_keys=keys, image_size=config.image_size, overwrite=overwrite,
                        max_shard_bytes=int(config.max_shard_mb * (1 << 20)), description=description)
    with writer, encoder:
        for path in bags:
            summaries.append(_convert_bag(Path(path), config, encoder, writer, progress))
        result = writer.finish(val_fraction=config.val_fraction, seed=config.split_seed)
    warnings = notes + [warning for summary in summaries for warning in summary.warnings]
    warnings += short_episode_warnings(summaries, config.chunk_size)
    warnings += constant_dimension_warnings(result["statistics"]["action"])
    if writer.num_episodes == 1:
        warnings.append("only one episode: it is used as both the train and the val split; record more episodes")
    return ConversionReport(result["path"], name, summaries, result["splits"], result["statistics"], warnings)


def expand_bag_folders(bags: Sequence[str | Path]) -> tuple[list[Path], list[str]]:
    """Returns the bags to convert, each folder of several bags replaced by the bags it holds (each its
    own recording, in name order), and a note per such folder."""
    from openvla_ros.dataset.bag_layout import bags_inside

    expanded: list[Path] = []
    notes: list[str] = []
    for path in map(Path, bags):
        inside = bags_inside(path)
        if inside:
            names = ", ".join(bag.name for bag in inside[:10]) + (", ..." if len(inside) > 10 else "")
            notes.append(f"{path} is a folder of {len(inside)} bags, each converted as its own recording: {names}")
            expanded.extend(inside)
        else:
            expanded.append(path)
    return expanded, notes


def short_episode_warnings(summaries: Sequence[BagSummary], chunk_size: int) -> list[str]:
    """Returns a warning naming the episodes shorter than ``chunk_size`` steps (none when it is 0).

    OpenVLA-OFT's RLDS loader fails ("Requires start <= limit") on an episode shorter than its chunk
    length minus one; this package's OFT training pads such windows with the neutral action instead.
    """
    if not chunk_size:
        return []
    short = [f"{summary.path.name} episode {index} ({steps} steps)"
             for summary in summaries for index, steps in enumerate(summary.episode_steps) if steps < chunk_size]
    if not short:
        return []
    listed = ", ".join(short[:10]) + (f" and {len(short) - 10} more" if len(short) > 10 else "")
    return [
        f"{len(short)} episode(s) are shorter than chunk_size {chunk_size}: {listed}. OpenVLA-OFT's own RLDS loader "
        f"fails on an episode shorter than K - 1 steps ('Requires start <= limit'); this package's OFT training "
        "pads them. Record longer episodes, leave these out, or set conversion.chunk_size to the K you train with"
    ]


def constant_dimension_warnings(action_statistics: dict[str, Any]) -> list[str]:
    """Returns one warning per action dimension that never changes over the dataset (min == max).

    OpenVLA's own RLDS loader sets such a dimension to 0.0, the gripper included (a gripper that never
    moves then reads as closed); this package's fine-tuning keeps the recorded value.
    """
    names = ACTION_NAMES if len(action_statistics["min"]) == len(ACTION_NAMES) else None
    warnings = []
    for index, (low, high) in enumerate(zip(action_statistics["min"], action_statistics["max"], strict=True)):
        if low == high:
            name = names[index] if names else f"dimension {index}"
            warnings.append(
                f"action {name} is constant ({low:g}) over the whole dataset: OpenVLA's own RLDS loader sets "
                "such a dimension to 0.0 (a gripper that never moves reads as closed); record demonstrations "
                "that use it, or expect that when training with OpenVLA's scripts"
            )
    return warnings


def _convert_bag(path: Path, config: ConversionConfig, encoder: FrameEncoder, writer: RldsWriter,
                 progress: bool) -> BagSummary:
    summary = BagSummary(path=path)
    with DemoBag(path, config) as bag:
        aligner = StepAligner(config, bag.action_kind, list(config.topics.camera_topics()),
                              use_state=bool(config.topics.state))
        episode: list[EpisodeStep] = []
        start_ns = 0

        def close_episode() -> None:
            nonlocal episode
            if episode:
                for step in episode:
                    step.images = {key: future.result() for key, future in step.images.items()}
                writer.add_episode(episode, str(path), start_ns)
                summary.episodes += 1
                summary.steps += len(episode)
                summary.episode_steps.append(len(episode))
            episode = []

        def take(steps: list[AlignedStep]) -> None:
            nonlocal start_ns
            for step in steps:
                if step.stale:
                    summary.dropped_stale += 1
                    if config.split_on_gap:
                        close_episode()
                    continue
                if step.idle and config.drop_idle:
                    summary.dropped_idle += 1
                    continue
                if not step.instruction.strip():
                    raise DatasetError(
                        f"bag {path}: the instruction at {step.time_ns} ns is empty; publish a non-empty "
                        "instruction or give one with --instruction"
                    )
                if config.split_on_instruction and episode and episode[-1].instruction != step.instruction:
                    close_episode()
                if not episode:
                    start_ns = step.time_ns
                episode.append(_episode_step(bag, encoder, step))

        bar = _progress_bar(progress, bag.declared_message_count, path.name)
        try:
            for time_ns, stream, value in bag.messages():
                take(aligner.add(time_ns, stream.role, value, stream.camera_key))
                bar(1)
        finally:
            bar(None)
        take(aligner.finish())
        close_episode()
        summary.topics = bag.counts
        summary.warnings = list(bag.warnings)
        if summary.steps == 0:
            raise DatasetError(_empty_reason(path, aligner, summary))
    return summary


def _episode_step(bag: DemoBag, encoder: FrameEncoder, step: AlignedStep) -> EpisodeStep:
    images = {key: encoder.submit(bag, key, frame) for key, frame in step.images.items()}
    return EpisodeStep(images=images, action=step.action, instruction=step.instruction.strip(), state=step.state)


def _empty_reason(path: Path, aligner: StepAligner, summary: BagSummary) -> str:
    missing = aligner.missing_streams()
    if missing:
        return (
            f"bag {path} gives an empty episode: stream(s) {', '.join(missing)} never published, so no step "
            "could start; check the topics in the config"
        )
    return (
        f"bag {path} gives an empty episode: {summary.dropped_idle} idle and {summary.dropped_stale} stale "
        "step(s) were dropped and none remained; check the action source and the idle thresholds "
        "(conversion.idle_translation / idle_rotation, or drop_idle: false) and max_observation_age_s"
    )


def _progress_bar(enabled: bool, total: int, label: str) -> Callable[[int | None], None]:
    """Returns ``update(n)``; ``update(None)`` closes the bar. A no-op when disabled."""
    if not enabled:
        return lambda _count: None
    from tqdm import tqdm

    bar = tqdm(total=total, desc=label, unit="msg", leave=False, mininterval=0.5)

    def update(count: int | None) -> None:
        if count is None:
            bar.close()
        else:
            bar.update(count)

    return update


def format_report(report: ConversionReport) -> str:
    """Returns the human-readable summary printed after a conversion."""
    lines = [
        f"dataset: {report.dataset_dir}",
        f"episodes: {report.episodes} (train {report.splits.get('train', 0)}, val {report.splits.get('val', 0)})",
        f"steps: {report.steps}; dropped idle: {report.dropped_idle}; dropped stale: {report.dropped_stale}",
    ]
    for bag in report.bags:
        lines.append(
            f"  {bag.path}: {bag.episodes} episode(s), {bag.steps} steps, {bag.dropped_idle} idle, "
            f"{bag.dropped_stale} stale"
        )
        for topic, count in sorted(bag.topics.items()):
            lines.append(f"    {topic} ({count.msgtype}): {count.count} msgs, {count.rate_hz:.1f} Hz")
    action = report.statistics["action"]
    lines.append("action q01: " + ", ".join(f"{value:.4g}" for value in action["q01"]))
    lines.append("action q99: " + ", ".join(f"{value:.4g}" for value in action["q99"]))
    lines.append(f"statistics: {report.dataset_dir / 'dataset_statistics.json'} (key {report.name!r})")
    lines.extend(f"warning: {warning}" for warning in report.warnings)
    return "\n".join(lines)
