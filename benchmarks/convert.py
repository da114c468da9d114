"""Conversion throughput and peak memory of training/bag_to_rlds.py's pipeline.

    .venv/bin/python benchmarks/convert.py [--frames 2000] [--storage mcap]

Writes synthetic bags of 640x480 rgb8 frames and of JPEG-compressed frames (camera 30 Hz, actions
10 Hz, joint states 20 Hz), converts each in a fresh process at 5 Hz, and prints steps/s, camera
frames/s, MB/s of bag read and the peak resident memory. A second, half-length bag shows whether the
peak memory grows with bag length.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

WORKER = r"""
import json, resource, sys, time
from openvla_ros.dataset import ConversionConfig, TopicConfig, convert_bags
import openvla_ros.processor, tensorflow_datasets  # import cost is not conversion cost
bag, out = sys.argv[1], sys.argv[2]
config = ConversionConfig(topics=TopicConfig(state="/joint_states"))
before = resource.getrusage(resource.RUSAGE_SELF)
start = time.perf_counter()
report = convert_bags([bag], out, "bench", config)
elapsed = time.perf_counter() - start
after = resource.getrusage(resource.RUSAGE_SELF)
cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
print(json.dumps({"seconds": elapsed, "cpu_seconds": cpu, "steps": report.steps,
                  "frames": report.bags[0].topics["/camera/image_raw"].count,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def bag_megabytes(path: Path) -> float:
    return sum(file.stat().st_size for file in path.iterdir()) / 1e6


def run(bag: Path, out: Path) -> dict:
    """Converts ``bag`` in a fresh interpreter and returns its measurements."""
    result = subprocess.run([sys.executable, "-c", WORKER, str(bag), str(out)], capture_output=True, text=True,
                            check=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=2000, help="camera frames in the long bag (30 Hz)")
    parser.add_argument("--storage", default="mcap", choices=("mcap", "sqlite3"))
    args = parser.parse_args()

    from openvla_ros.dataset.synthetic import write_demo_bag

    print(f"bag -> RLDS conversion, 640x480 camera at 30 Hz, 5 Hz steps, {args.storage} storage")
    print(f"{'images':<12}{'frames':>8}{'bag MB':>9}{'steps':>7}{'seconds':>9}{'steps/s':>9}{'frames/s':>10}"
          f"{'MB/s':>8}{'CPU s':>7}{'steps/CPU s':>13}{'peak RSS MB':>13}")
    with tempfile.TemporaryDirectory(prefix="convert-bench-") as temp:
        root = Path(temp)
        for compressed in (False, True):
            label = "jpeg" if compressed else "rgb8"
            for frames in (args.frames // 2, args.frames):
                bag = root / f"{label}_{frames}"
                write_demo_bag(bag, storage=args.storage, duration_s=frames / 30.0 + 0.02, image_size=(640, 480),
                               compressed=compressed, seed=frames)
                figures = run(bag, root / f"out_{label}_{frames}")
                megabytes = bag_megabytes(bag)
                print(f"{label:<12}{figures['frames']:>8}{megabytes:>9.0f}{figures['steps']:>7}"
                      f"{figures['seconds']:>9.2f}{figures['steps'] / figures['seconds']:>9.0f}"
                      f"{figures['frames'] / figures['seconds']:>10.0f}{megabytes / figures['seconds']:>8.0f}"
                      f"{figures['cpu_seconds']:>7.2f}{figures['steps'] / figures['cpu_seconds']:>13.0f}"
                      f"{figures['peak_rss_mb']:>13.0f}")
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
          "(wall-clock figures shrink when the machine is shared)")
    print("target: >= 300 steps/s, peak memory independent of bag length")


if __name__ == "__main__":
    main()
