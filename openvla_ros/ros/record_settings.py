"""The recorder's settings (from ``config/record.yaml``), its errors and the summary of a recording."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

STORAGE_PLUGINS = ("mcap", "sqlite3")


class RecordError(RuntimeError):
    """The recorder cannot start: a bad config, an existing output, an unknown storage plugin."""


@dataclass(frozen=True)
class RecordSettings:
    """What to record and where, from the config file's ``topics`` and ``record`` sections."""

    topics: tuple[str, ...]
    storage: str = "mcap"
    output_dir: str = "demos"
    max_bag_duration_s: float = 0.0

    def __post_init__(self) -> None:
        if self.storage not in STORAGE_PLUGINS:
            raise RecordError(f"storage must be one of {', '.join(STORAGE_PLUGINS)}, got {self.storage!r}")
        if not self.topics:
            raise RecordError("no topics to record")
        for topic in self.topics:
            if not topic.startswith("/"):
                raise RecordError(f"topic {topic!r} must be an absolute name starting with '/'")


@dataclass
class TopicRecord:
    """One recorded topic: its type and the messages written so far."""

    topic: str
    msgtype: str
    count: int = 0
    first_ns: int = 0
    last_ns: int = 0

    @property
    def rate_hz(self) -> float:
        from openvla_ros.dataset.bag_reader import mean_rate_hz

        return mean_rate_hz(self.count, self.first_ns, self.last_ns)


@dataclass
class RecordSummary:
    """What a recording wrote: the bag directory, per-topic records and topics never seen."""

    path: Path
    storage: str
    topics: dict[str, TopicRecord] = field(default_factory=dict)
    missing: tuple[str, ...] = ()
    duration_s: float = 0.0

    @property
    def message_count(self) -> int:
        return sum(record.count for record in self.topics.values())

    def describe(self) -> str:
        """Returns a multi-line human summary (one line per topic)."""
        lines = [
            f"bag {self.path} ({self.storage}): {self.message_count} messages in {self.duration_s:.1f} s"
        ]
        for record in self.topics.values():
            lines.append(
                f"  {record.topic:<28} {record.msgtype:<34} {record.count:>6}  {record.rate_hz:6.1f} Hz"
            )
        for topic in self.missing:
            lines.append(f"  {topic:<28} not recorded: no publisher appeared")
        return "\n".join(lines)


def default_config_path() -> Path:
    """Returns the package's ``config/record.yaml`` (installed share directory, else the source tree)."""
    try:
        from ament_index_python.packages import get_package_share_directory

        installed = Path(get_package_share_directory("openvla_ros")) / "config" / "record.yaml"
    except (ImportError, LookupError, OSError):  # no ament index, or the package is not installed in it
        installed = None
    if installed is not None and installed.is_file():
        return installed
    return Path(__file__).resolve().parents[2] / "config" / "record.yaml"


def load_record_settings(path: str | Path | None = None) -> RecordSettings:
    """Returns the recording settings of a ``record.yaml`` file (the package's own when None).

    Raises:
        RecordError: when the file is missing or unreadable, or its topics or record section are bad.
    """
    import yaml

    from openvla_ros.dataset.config import config_from_mapping
    from openvla_ros.errors import DatasetError

    path = Path(path) if path is not None else default_config_path()
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise RecordError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise RecordError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise RecordError(f"config file {path} must hold a mapping with topics/record sections")
    try:
        configured = config_from_mapping(data).topics
    except DatasetError as exc:
        raise RecordError(f"config file {path}: {exc}") from exc
    for name, topic in vars(configured).items():
        if topic and not topic.startswith("/"):
            raise RecordError(
                f"config file {path}: topics.{name} {topic!r} must be an absolute topic name starting with '/' "
                "to be recorded"
            )
    topics = configured.recorded_topics()
    record = data.get("record") or {}
    if not isinstance(record, dict):
        raise RecordError(f"config file {path}: section 'record' must be a mapping")
    extra = [str(topic) for topic in record.get("extra_topics") or []]
    return RecordSettings(
        topics=tuple(dict.fromkeys([*topics, *extra])),
        storage=str(record.get("storage") or "mcap"),
        output_dir=str(record.get("output_dir") or "demos"),
        max_bag_duration_s=float(record.get("max_bag_duration_s") or 0.0),
    )
