"""Step-time tails of the tiny model on the CPU for each torch thread count, quiet and with a CPU hog.

    python benchmarks/cpu_threads.py [--steps 40] [--threads 1 2]

On a small machine the tail of a control step decides whether a rate holds: this prints the median,
p95 and max of ``predict_action`` for each thread count, first with nothing else running, then with one
busy-looping process beside it (what a camera driver or another node does to a 2-core robot computer).
The policy node's ``cpu_threads: 0`` (auto) uses every core but one.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from openvla_ros.model.policy import OpenVLAPolicy
from openvla_ros.model.tiny import make_tiny_checkpoint


def _hog(stop: multiprocessing.Event) -> None:
    while not stop.is_set():
        pass


def measure(policy: OpenVLAPolicy, threads: int, steps: int) -> list[float]:
    torch.set_num_threads(threads)
    image = np.random.default_rng(0).integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
    for _ in range(3):
        policy.predict_action(image, "pick up the red block")
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        policy.predict_action(image, "pick up the red block")
        times.append((time.perf_counter() - start) * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        policy = OpenVLAPolicy.from_pretrained(str(make_tiny_checkpoint(Path(tmp) / "tiny")), device="cpu")
        print(f"{'load':<8} {'threads':>7} {'median':>9} {'p95':>9} {'max':>9}")
        for load in ("quiet", "cpu hog"):
            stop = multiprocessing.Event()
            hog = multiprocessing.Process(target=_hog, args=(stop,), daemon=True) if load != "quiet" else None
            if hog is not None:
                hog.start()
            try:
                for threads in args.threads:
                    times = measure(policy, threads, args.steps)
                    print(f"{load:<8} {threads:>7} {np.median(times):>7.1f}ms {np.percentile(times, 95):>7.1f}ms "
                          f"{max(times):>7.1f}ms", flush=True)
            finally:
                stop.set()
                if hog is not None:
                    hog.join(timeout=5)


if __name__ == "__main__":
    main()
