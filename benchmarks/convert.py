"""Conversion throughput and peak memory of training/bag_to_rlds.py's pipeline, before and after its own bag reader.

    .venv/bin/python benchmarks/convert.py [--frames 2000] [--storage mcap sqlite3] [--images rgb8 jpeg]
        [--reader rosbags ours] [--repeat 1]

Writes synthetic bags of 640x480 rgb8 frames and of JPEG-compressed frames (camera 30 Hz, actions
10 Hz, joint states 20 Hz), each at half and at full length, and converts each at 5 Hz in a fresh
process, once through the former rosbags reading path (``benchmarks/rosbags_reader.py``, "before")
and once through the converter's own reader ("after"). Prints steps/s, camera frames/s, MB/s of bag,
CPU seconds (steps per CPU second is the figure least moved by other work on a shared machine) and
peak resident memory; the half-length bag shows whether memory grows with bag length. With
``--repeat N`` each conversion runs N times and the fastest is printed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKER = r"""
import json, resource, sys, time
import openvla_ros.dataset.converter as converter
from openvla_ros.dataset import ConversionConfig, TopicConfig, convert_bags
import openvla_ros.model.processor, tensorflow_datasets  # import cost is not conversion cost
bag, out, reader = sys.argv[1], sys.argv[2], sys.argv[3]
if reader == "rosbags":
    from benchmarks.rosbags_reader import RosbagsDemoBag
    converter.DemoBag = RosbagsDemoBag
config = ConversionConfig(topics=TopicConfig(state="/joint_states"))
before = resource.getrusage(resource.RUSAGE_SELF)
start = time.perf_counter()
report = convert_bags([bag], out, "bench", config)
elapsed = time.perf_counter() - start
after = resource.getrusage(resource.RUSAGE_SELF)
cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
print(json.dumps({"seconds": elapsed, "cpu_seconds": cpu, "steps": report.steps,
                  "frames": report.bags[0].topics["/camera/image_raw"].count,
                  "peak_rss_mb": after.ru_maxrss / 1024}))
"""
READERS = {"rosbags": "before (rosbags)", "ours": "after (own reader)"}


def bag_megabytes(path: Path) -> float:
    return sum(file.stat().st_size for file in path.iterdir()) / 1e6


def run(bag: Path, out: Path, reader: str) -> dict:
    """Converts ``bag`` in a fresh interpreter and returns its measurements."""
    result = subprocess.run([sys.executable, "-c", WORKER, str(bag), str(out), reader], capture_output=True,
                            text=True, check=True, cwd=REPO)
    return json.loads(result.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=2000, help="camera frames in the long bag (30 Hz)")
    parser.add_argument("--storage", nargs="+", default=["mcap", "sqlite3"], choices=("mcap", "sqlite3"))
    parser.add_argument("--images", nargs="+", default=["rgb8", "jpeg"], choices=("rgb8", "jpeg"))
    parser.add_argument("--reader", nargs="+", default=list(READERS), choices=tuple(READERS))
    parser.add_argument("--repeat", type=int, default=1, help="runs per conversion; the fastest is printed")
    args = parser.parse_args()

    from openvla_ros.dataset.synthetic import write_demo_bag

    print(f"bag -> RLDS conversion, 640x480 camera at 30 Hz, 5 Hz steps; {datetime.date.today()}, "
          f"{os.cpu_count()} CPUs ({cpu_model()})")
    print(f"{'storage':<9}{'images':<8}{'reader':<20}{'frames':>7}{'bag MB':>8}{'steps':>6}{'seconds':>9}"
          f"{'steps/s':>9}{'frames/s':>10}{'MB/s':>7}{'CPU s':>7}{'steps/CPU s':>13}{'peak RSS MB':>13}")
    with tempfile.TemporaryDirectory(prefix="convert-bench-") as temp:
        root = Path(temp)
        for storage in args.storage:
            for label in args.images:
                for frames in (args.frames // 2, args.frames):
                    bag = root / f"{storage}_{label}_{frames}"
                    write_demo_bag(bag, storage=storage, duration_s=frames / 30.0 + 0.02, image_size=(640, 480),
                                   compressed=label == "jpeg", seed=frames)
                    megabytes = bag_megabytes(bag)
                    for reader in args.reader:
                        runs = [run(bag, root / f"out_{reader}_{index}", reader) for index in range(args.repeat)]
                        figures = min(runs, key=lambda item: item["seconds"])
                        print(f"{storage:<9}{label:<8}{READERS[reader]:<20}{figures['frames']:>7}{megabytes:>8.0f}"
                              f"{figures['steps']:>6}{figures['seconds']:>9.2f}"
                              f"{figures['steps'] / figures['seconds']:>9.0f}"
                              f"{figures['frames'] / figures['seconds']:>10.0f}{megabytes / figures['seconds']:>7.0f}"
                              f"{figures['cpu_seconds']:>7.2f}{figures['steps'] / figures['cpu_seconds']:>13.0f}"
                              f"{figures['peak_rss_mb']:>13.0f}", flush=True)
                    for output in [bag, *root.glob("out_*")]:  # keep the disk use to one bag
                        shutil.rmtree(output)
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (wall-clock figures "
          "shrink when the machine is shared; steps/CPU s much less)")
    print("target: >= 600 steps/s for rgb8 mcap, peak memory independent of bag length")


if __name__ == "__main__":
    main()
