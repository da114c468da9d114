"""The policy server under load: requests/s and latency against 1, 2, 4 and 8 concurrent clients.

    .venv/bin/python benchmarks/serve.py [--sizes tiny,mid] [--kinds token,oft] [--clients 1,2,4,8] [--seconds 8]

For each model (tiny and mid (~200M), token and OFT with one image) a server process
(``python -m openvla_ros.serve`` on the CPU, fp32) runs twice: without batching (``--max-batch 1``) and
with it (``--max-batch 8 --batch-window-ms 5``). Each client is a thread that posts official-style requests
(json-numpy 224x224 images, different per client) back to back for ``--seconds``; the table gives
requests/s, p50/p95 latency seen by the clients and the server's mean batch size. The headline is the
ratio of batched to unbatched throughput at 8 clients.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "test"))
from serve_helpers import Server  # noqa: E402

INSTRUCTIONS = ["pick up the red block", "open the top drawer", "push the cube left", "close the gripper",
                "stack the cups", "move to the bowl", "wipe the table", "place it in the bin"]


def encoded(image: np.ndarray) -> dict:
    import base64

    return {"__numpy__": base64.b64encode(image.tobytes()).decode(), "dtype": "|u1", "shape": list(image.shape)}


def make_checkpoint(kind: str, size: str, directory: Path) -> Path:
    target = directory / f"{kind}-{size}"
    if kind == "oft":
        from openvla_ros.model.tiny_oft import make_tiny_oft_checkpoint

        return make_tiny_oft_checkpoint(target, size=size)
    from openvla_ros.model.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(target, size=size)


def load(url: str, clients: int, seconds: float) -> dict:
    """``clients`` threads posting back to back for ``seconds``: requests/s and the latencies they saw."""
    bodies = []
    for index in range(clients):
        image = np.random.default_rng(index).integers(0, 256, size=(224, 224, 3), dtype=np.uint8)
        bodies.append(json.dumps({"image": encoded(image), "instruction": INSTRUCTIONS[index % len(INSTRUCTIONS)]}))
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(body: str) -> None:
        session = requests.Session()
        start.wait()
        while time.monotonic() < stop_at[0]:
            sent = time.monotonic()
            response = session.post(f"{url}/act", data=body, headers={"Content-Type": "application/json"},
                                    timeout=300)
            with lock:
                if response.status_code == 200:
                    latencies.append(time.monotonic() - sent)
                else:
                    errors[0] += 1

    threads = [threading.Thread(target=client, args=(body,)) for body in bodies]
    for thread in threads:
        thread.start()
    began = time.monotonic()
    stop_at[0] = began + seconds
    start.wait()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - began
    ordered = sorted(latencies)
    return {"clients": clients, "requests": len(ordered), "errors": errors[0], "rps": len(ordered) / elapsed,
            "p50_ms": statistics.median(ordered) * 1e3 if ordered else float("nan"),
            "p95_ms": ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))] * 1e3 if ordered
            else float("nan")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,mid")
    parser.add_argument("--kinds", default="token,oft")
    parser.add_argument("--clients", default="1,2,4,8")
    parser.add_argument("--seconds", type=float, default=8.0, help="load time per row (default 8)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    clients = [int(value) for value in args.clients.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for size in args.sizes.split(","):
            for kind in args.kinds.split(","):
                checkpoint = make_checkpoint(kind, size, Path(scratch))
                for batching, options in (("off", ["--max-batch", "1"]),
                                          ("on", ["--max-batch", "8", "--batch-window-ms", "5"])):
                    server = Server(checkpoint, "--dtype", "float32", *options)
                    try:
                        load(server.url, 1, 2.0)  # warm-up
                        for count in clients:
                            before = requests.get(f"{server.url}/health", timeout=30).json()
                            result = load(server.url, count, args.seconds)
                            after = requests.get(f"{server.url}/health", timeout=30).json()
                            batches = after["batches"] - before["batches"]
                            served = after["requests_served"] - before["requests_served"]
                            result |= {"size": size, "kind": kind, "batching": batching,
                                       "mean_batch": served / batches if batches else float("nan")}
                            rows.append(result)
                            print(json.dumps(result), flush=True)
                    finally:
                        server.stop()
    cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True,
                         text=True).stdout.strip()
    print(f"\nserve benchmark, {datetime.date.today()}, {platform.machine()} {cpu}, "
          f"{subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores, CPU fp32")
    print("| model | batching | clients | requests/s | p50 | p95 | mean batch |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['size']} {row['kind']} | {row['batching']} | {row['clients']} | {row['rps']:.2f} | "
              f"{row['p50_ms']:.0f} ms | {row['p95_ms']:.0f} ms | {row['mean_batch']:.2f} |")
    for size in args.sizes.split(","):
        for kind in args.kinds.split(","):
            at = {row["batching"]: row for row in rows
                  if row["size"] == size and row["kind"] == kind and row["clients"] == max(clients)}
            if {"on", "off"} <= set(at):
                print(f"{size} {kind}: batched / unbatched throughput at {max(clients)} clients = "
                      f"{at['on']['rps'] / at['off']['rps']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
