"""Where a rosbag2 bag's data lives: its storage files, its storage format and what its metadata declares.

``metadata.yaml`` (versions 1 to 9 are alike in the fields used here: ``storage_identifier``,
``relative_file_paths`` or ``files``, ``topics_with_message_count``, ``compression_format`` and
``compression_mode``; version 1 names each topic under ``topic_and_type`` where later versions have
``topic_metadata``) names the files in recording order and the message count of each topic, which the
reader checks against what it reads. Its
QoS profiles and type hashes are not used. A bag without ``metadata.yaml`` is read from its
``.db3`` or ``.mcap`` files alone, split files in the order of their number suffix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from openvla_ros.dataset.bag_common import BagError

STORAGE_SUFFIXES = {".db3": "sqlite3", ".mcap": "mcap"}
COMPRESSION_FORMATS = ("zstd", "lz4")
_NUMBER_SUFFIX = re.compile(r"(\d+)$")


@dataclass(frozen=True)
class BagLayout:
    """A bag's storage files and what its metadata says about them.

    Attributes:
        path: the bag (its directory, or the single storage file given).
        files: the storage files in recording order.
        storage: ``sqlite3`` or ``mcap``.
        declared_counts: ``{topic: message count}`` from ``metadata.yaml``, or None without one.
        compression_mode: ``""``, ``file`` (each file compressed whole) or ``message`` (each message).
        compression_format: ``zstd`` (or ``lz4``) when compressed.
    """

    path: Path
    files: list[Path]
    storage: str
    declared_counts: dict[str, int] | None
    compression_mode: str = ""
    compression_format: str = ""


def read_layout(path: Path) -> BagLayout:
    """Returns the layout of the bag at ``path`` (a rosbag2 directory, or a ``.db3``/``.mcap`` file).

    Raises:
        BagError: when the path does not exist, ``metadata.yaml`` cannot be read or names missing files,
            or a directory without ``metadata.yaml`` holds no (or mixed) storage files.
    """
    if not path.exists():
        raise BagError(f"bag {path} does not exist; pass a rosbag2 directory (with metadata.yaml)")
    if path.is_file():
        storage = STORAGE_SUFFIXES.get(path.suffix)
        if storage is None:
            raise BagError(f"bag {path} is a file but neither .db3 nor .mcap; pass a rosbag2 directory")
        return BagLayout(path, [path], storage, None)
    metadata_path = path / "metadata.yaml"
    if metadata_path.exists():
        return _layout_from_metadata(path, metadata_path)
    return _layout_from_files(path)


def bags_inside(path: Path) -> list[Path]:
    """Returns the bags a folder holds when it is not a bag itself (no ``metadata.yaml``, no storage file
    of its own) but its subfolders are, e.g. the output directory of several ``ros2 bag record`` runs;
    an empty list otherwise. Sorted by name, ``ep_2`` before ``ep_10``."""
    if not path.is_dir() or (path / "metadata.yaml").exists():
        return []
    if any(file.is_file() and file.suffix in STORAGE_SUFFIXES for file in path.iterdir()):
        return []
    found = [
        child for child in path.iterdir()
        if child.is_dir() and ((child / "metadata.yaml").is_file()
                               or any(f.is_file() and f.suffix in STORAGE_SUFFIXES for f in child.iterdir()))
    ]
    return sorted(found, key=_split_order)


def _layout_from_files(path: Path) -> BagLayout:
    found = [file for file in path.iterdir() if file.is_file() and file.suffix in STORAGE_SUFFIXES]
    kinds = {STORAGE_SUFFIXES[file.suffix] for file in found}
    if not found:
        raise BagError(
            f"bag {path} has no metadata.yaml and no .db3 or .mcap file; pass a rosbag2 directory "
            "(compressed .zstd files need their metadata.yaml)"
        )
    if len(kinds) > 1:
        raise BagError(
            f"bag {path} has no metadata.yaml and holds both .db3 and .mcap files, so which belong to the bag "
            "is unknown; move the other recording out, or restore the bag's metadata.yaml"
        )
    return BagLayout(path, sorted(found, key=_split_order), kinds.pop(), None)


def _split_order(file: Path) -> tuple[str, int, str]:
    """Sorts ``bag_2.mcap`` before ``bag_10.mcap``."""
    match = _NUMBER_SUFFIX.search(file.stem)
    if match is None:
        return file.stem, -1, file.name
    return file.stem[: match.start()], int(match.group(1)), file.name


def _layout_from_metadata(path: Path, metadata_path: Path) -> BagLayout:
    import yaml

    way_out = ("fix it, or move it out of the bag directory to read the bag from its storage files alone "
               "(`ros2 bag reindex` rebuilds it)")
    try:
        document = yaml.safe_load(metadata_path.read_text())
        info = document["rosbag2_bagfile_information"]
        if not isinstance(info, dict):
            raise TypeError("rosbag2_bagfile_information is not a mapping")
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        detail = " ".join(str(exc).split())[:200]
        raise BagError(f"bag {path}: metadata.yaml cannot be read ({type(exc).__name__}: {detail}); {way_out}") from exc

    names = info.get("relative_file_paths") or [item.get("path", "") for item in info.get("files") or []]
    if not names:
        raise BagError(f"bag {path}: metadata.yaml lists no storage files; {way_out}")
    mode = str(info.get("compression_mode") or "").lower()
    mode = "" if mode == "none" else mode
    compression = str(info.get("compression_format") or "").lower() if mode else ""
    if mode not in ("", "file", "message"):
        raise BagError(f"bag {path}: metadata.yaml has an unknown compression_mode {mode!r}; {way_out}")
    if mode and compression not in COMPRESSION_FORMATS:
        raise BagError(
            f"bag {path} is {mode}-compressed with {compression!r}, which cannot be read; decompress it with "
            "`ros2 bag convert` first"
        )
    files = [_locate(path, str(name), way_out) for name in names]
    stored_names = [file.name[: -len(compression) - 1] if mode == "file" else file.name for file in files]
    suffixes = {PurePath(name).suffix for name in stored_names}
    storage = str(info.get("storage_identifier") or "")
    if len(suffixes) == 1 and suffixes <= set(STORAGE_SUFFIXES):
        storage = STORAGE_SUFFIXES[suffixes.pop()]
    if storage not in ("sqlite3", "mcap"):
        raise BagError(f"bag {path} uses storage {storage!r}; only sqlite3 and mcap bags can be read")
    return BagLayout(path, files, storage, _declared_counts(info), mode, compression)


def _locate(path: Path, name: str, way_out: str) -> Path:
    """Returns the bag file ``name`` (old bags list it with their directory's name in front)."""
    for candidate in (path / name, path / PurePath(name).name):
        if candidate.is_file():
            return candidate
    raise BagError(f"bag {path}: metadata.yaml lists {name}, which is not in the bag directory; {way_out}")


def _declared_counts(info: dict[str, Any]) -> dict[str, int]:
    """Returns ``{topic: count}``; the topic is under ``topic_metadata`` (versions 2-9) or, in version 1
    metadata, ``topic_and_type``."""
    counts: dict[str, int] = {}
    for item in info.get("topics_with_message_count") or []:
        try:
            topic = item.get("topic_metadata") or item["topic_and_type"]
            name = str(topic["name"])
            counts[name] = counts.get(name, 0) + int(item.get("message_count", 0))
        except (AttributeError, KeyError, TypeError, ValueError):
            continue
    return counts


def decompress_file(layout: BagLayout, file: Path, target_dir: Path) -> Path:
    """Decompresses one file of a file-compressed bag into ``target_dir``; returns the copy's path.

    Raises:
        BagError: when the file does not decompress.
    """
    target = target_dir / file.name[: -len(layout.compression_format) - 1]
    try:
        if layout.compression_format == "zstd":
            from backports import zstd

            opener: Any = zstd.open
        else:
            import lz4.frame

            opener = lz4.frame.open
        with opener(file, "rb") as source, target.open("wb") as sink:
            while block := source.read(1 << 22):
                sink.write(block)
    except Exception as exc:
        raise BagError(f"bag {layout.path}: {file.name} does not decompress ({exc}); the file is damaged") from exc
    return target
