"""End-to-end latency and rate of the policy node over DDS.

Starts ``openvla_ros.policy_node`` in a subprocess (the tiny checkpoint, built into a temporary
directory, unless ``--model`` is given), publishes 640x480 rgb8 frames at 30 Hz and an instruction,
and for each control rate prints the achieved rate, the image-stamp-to-action latency and the node's
own overhead per step (latency minus model time, from the node's ``~/step_timing``).

    .venv/bin/python benchmarks/node_latency.py [--model DIR] [--rates 5 10 20] [--seconds 10]

Chunk mode (OpenVLA-OFT): ``--chunk K --standin-step S`` runs the node with the chunked stand-in policy
of test/standin_policy_node.py (K actions per inference, S seconds per inference), ``--model DIR``
with an OFT checkpoint runs the real model; either prints the achieved control rate, the inference
rate, the chunk latency, the queue depth and the ticks that found the queue empty.

    .venv/bin/python benchmarks/node_latency.py --chunk 8 --standin-step 0.1 --rates 10 20 50
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CAMERA_HZ = 30.0
HEIGHT, WIDTH = 480, 640
NODE_NAME = "openvla_policy"


@dataclass
class Sample:
    received_ns: int
    stamp_ns: int


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="checkpoint directory; default: a tiny checkpoint built for the run")
    parser.add_argument("--rates", type=float, nargs="+", default=[5.0, 10.0, 20.0], help="control rates, Hz")
    parser.add_argument("--seconds", type=float, default=10.0, help="measurement window per rate")
    parser.add_argument("--warmup", type=float, default=1.5, help="seconds discarded after each rate change")
    parser.add_argument("--cpu-threads", type=int, default=1, help="torch threads of the node (0: default)")
    parser.add_argument("--chunk", type=int, help="chunk mode with the stand-in policy: K actions per inference")
    parser.add_argument("--standin-step", type=float, default=0.1, help="stand-in seconds per inference (--chunk)")
    parser.add_argument("--actions-per-inference", type=int, default=0, help="chunk mode: 0 = K")
    parser.add_argument("--chunk-blend", default="none", choices=("none", "ensemble"))
    return parser.parse_args()


def percentiles(values: list[float]) -> str:
    if not values:
        return "n/a"
    array = np.asarray(values)
    return (
        f"median {np.percentile(array, 50):7.2f}  p95 {np.percentile(array, 95):7.2f}  "
        f"p99 {np.percentile(array, 99):7.2f}  (n={len(values)})"
    )


def main() -> int:
    args = parse_args()
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ.setdefault("ROS_DOMAIN_ID", str(random.SystemRandom().randint(1, 100)))

    with tempfile.TemporaryDirectory(prefix="node_latency_") as temporary:
        model = args.model
        if args.chunk is not None:
            model = "standin"
        elif model is None:
            from openvla_ros.model.tiny import make_tiny_checkpoint

            started = time.perf_counter()
            model = str(make_tiny_checkpoint(Path(temporary) / "tiny-openvla", seed=0))
            print(f"built the tiny checkpoint in {time.perf_counter() - started:.1f} s: {model}")
        return run(args, model, Path(temporary))


def run(args: argparse.Namespace, model: str, workdir: Path) -> int:
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import TwistStamped
    from rcl_interfaces.srv import SetParameters
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image
    from std_msgs.msg import String

    log_path = workdir / "node.log"
    entry = ["-m", "openvla_ros.policy_node"]
    if args.chunk is not None:
        entry = [str(REPO / "test" / "standin_policy_node.py"), f"{args.standin_step}", f"chunk={args.chunk}"]
    command = [
        sys.executable, *entry, "--ros-args",
        "--params-file", str(REPO / "config" / "policy.yaml"),
        "-p", f"model:={model}",
        "-p", f"cpu_threads:={args.cpu_threads}",
        "-p", "start_enabled:=true",
        "-p", "publish_step_timing:=true",
        "-p", f"rate_hz:={float(args.rates[0])}",
        "-p", f"actions_per_inference:={args.actions_per_inference}",
        "-p", f"chunk_blend:={args.chunk_blend}",
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        node_process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

    rclpy.init()
    node = rclpy.create_node("node_latency_benchmark")
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        sensor_qos = QoSProfile(
            history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.BEST_EFFORT
        )
        latched_qos = QoSProfile(
            history=HistoryPolicy.KEEP_LAST,
            depth=1,
            reliability=ReliabilityPolicy.RELIABLE,
            durability=DurabilityPolicy.TRANSIENT_LOCAL,
        )
        image_pub = node.create_publisher(Image, "/camera/image_raw", sensor_qos)
        instruction_pub = node.create_publisher(String, "/instruction", latched_qos)
        frame = Image(height=HEIGHT, width=WIDTH, encoding="rgb8", step=WIDTH * 3)
        frame.header.frame_id = "camera"
        frame.data = np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8).tobytes()
        frames_sent = [0]

        def publish_frame() -> None:
            frame.header.stamp = node.get_clock().now().to_msg()
            image_pub.publish(frame)
            frames_sent[0] += 1

        samples: list[Sample] = []
        timings: dict[int, dict[str, float]] = {}
        chunk_timings: list[tuple[int, dict[str, float]]] = []  # (arrival, values) of each chunk
        status: dict[str, str] = {}
        lock = threading.Lock()

        def on_twist(message: TwistStamped) -> None:
            now = node.get_clock().now().nanoseconds
            stamp = message.header.stamp.sec * 1_000_000_000 + message.header.stamp.nanosec
            with lock:
                samples.append(Sample(now, stamp))

        def on_timing(message: DiagnosticArray) -> None:
            stamp = message.header.stamp.sec * 1_000_000_000 + message.header.stamp.nanosec
            values = {item.key: float(item.value) for item in message.status[0].values}
            with lock:
                if message.status[0].name.endswith(": chunk"):
                    chunk_timings.append((node.get_clock().now().nanoseconds, values))
                else:
                    timings[stamp] = values

        def on_diagnostics(message: DiagnosticArray) -> None:
            for item in message.status:
                if item.name == f"{NODE_NAME}: policy":
                    with lock:
                        status.clear()
                        status.update({value.key: value.value for value in item.values})

        node.create_subscription(TwistStamped, f"/{NODE_NAME}/delta_twist", on_twist, 100)
        node.create_subscription(DiagnosticArray, f"/{NODE_NAME}/step_timing", on_timing, 100)
        node.create_subscription(DiagnosticArray, "/diagnostics", on_diagnostics, 10)
        set_parameters = node.create_client(SetParameters, f"/{NODE_NAME}/set_parameters")

        print("waiting for the node to load the model and subscribe ...")
        deadline = time.monotonic() + 120
        while image_pub.get_subscription_count() == 0 or not set_parameters.service_is_ready():
            if node_process.poll() is not None or time.monotonic() > deadline:
                print(log_path.read_text()[-3000:])
                raise SystemExit("the policy node did not come up")
            time.sleep(0.05)
        instruction_pub.publish(String(data="pick up the red block"))
        node.create_timer(1.0 / CAMERA_HZ, publish_frame)

        print(
            f"camera: {WIDTH}x{HEIGHT} rgb8 at {CAMERA_HZ:g} Hz; window {args.seconds:g} s per rate; "
            f"node torch threads: {args.cpu_threads or 'default'}\n"
        )
        rows = []
        for rate in args.rates:
            request = SetParameters.Request(
                parameters=[Parameter("rate_hz", value=float(rate)).to_parameter_msg()]
            )
            future = set_parameters.call_async(request)
            while not future.done():
                time.sleep(0.01)
            if not future.result().results[0].successful:
                raise SystemExit(f"rate_hz {rate} rejected: {future.result().results[0].reason}")
            time.sleep(args.warmup)
            start = node.get_clock().now().nanoseconds
            frames_before = frames_sent[0]
            with lock:
                starved_before = int(status.get("starved_ticks", "0"))
            time.sleep(args.seconds)
            end = node.get_clock().now().nanoseconds
            time.sleep(1.2)  # let the last step_timing and diagnostics messages arrive
            with lock:
                window = [sample for sample in samples if start <= sample.received_ns < end]
                timing = dict(timings)
                chunks = [values for arrival, values in chunk_timings if start <= arrival < end]
                starved = int(status.get("starved_ticks", "0")) - starved_before
            camera_hz = (frames_sent[0] - frames_before) / args.seconds
            if status.get("mode") == "chunk":
                rows.append(summarise_chunks(rate, window, chunks, (end - start) / 1e9, starved, status))
            else:
                rows.append(summarise(rate, window, timing, camera_hz))

        print("\n".join(rows))
        if status.get("mode") == "chunk":
            return 0
        print(
            "\nlatency = action arrival - image stamp (includes the frame's wait for the next tick, up to one "
            "camera period);\noverhead = latency - model time; node work = overhead - frame wait "
            "(conversion, publishing, DDS, scheduling);\nimage delivery = image stamp to its arrival in the node."
        )
        return 0
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
        if node_process.poll() is None:
            node_process.send_signal(signal.SIGINT)
            try:
                node_process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                node_process.kill()


def summarise(
    rate: float, window: list[Sample], timings: dict[int, dict[str, float]], camera_hz: float
) -> str:
    if len(window) < 2:
        return f"rate_hz {rate:5.1f}: fewer than two actions received"
    span_s = (window[-1].received_ns - window[0].received_ns) / 1e9
    achieved = (len(window) - 1) / span_s
    latency = [(sample.received_ns - sample.stamp_ns) / 1e6 for sample in window]
    overhead, node_work, model, delivery = [], [], [], []
    for sample, total in zip(window, latency, strict=True):
        step = timings.get(sample.stamp_ns)
        if step is None:
            continue
        model.append(step["model_ms"])
        delivery.append(step["image_delivery_ms"])
        overhead.append(total - step["model_ms"])
        node_work.append(total - step["model_ms"] - step["image_age_at_tick_ms"])
    error = 100.0 * (achieved - rate) / rate
    return "\n".join(
        [
            f"rate_hz {rate:5.1f}: achieved {achieved:6.2f} Hz ({error:+.1f}%), camera {camera_hz:.1f} Hz, "
            f"{len(window)} actions",
            f"  latency  ms  {percentiles(latency)}",
            f"  model    ms  {percentiles(model)}",
            f"  overhead ms  {percentiles(overhead)}",
            f"  node work ms {percentiles(node_work)}",
            f"  image delivery ms {percentiles(delivery)}",
        ]
    )


def summarise_chunks(
    rate: float, window: list[Sample], chunks: list[dict[str, float]], seconds: float, starved: int,
    status: dict[str, str],
) -> str:
    """Returns the chunk-mode lines of one rate: control rate, inference rate, latency, queue depth."""
    if len(window) < 2:
        return f"rate_hz {rate:5.1f}: fewer than two actions received"
    span_s = (window[-1].received_ns - window[0].received_ns) / 1e9
    achieved = (len(window) - 1) / span_s
    intervals = np.diff([sample.received_ns for sample in window]) / 1e6
    error = 100.0 * (achieved - rate) / rate
    return "\n".join(
        [
            f"rate_hz {rate:5.1f}: achieved {achieved:6.2f} Hz ({error:+.1f}%), {len(window)} actions; "
            f"{len(chunks)} chunks of K = {status.get('chunk_size', '?')} "
            f"(inference {len(chunks) / seconds:.2f} Hz), ticks with an empty queue {starved}",
            f"  action interval ms {percentiles(list(intervals))}",
            f"  model ms           {percentiles([chunk['model_ms'] for chunk in chunks])}",
            f"  chunk latency ms   {percentiles([chunk['chunk_ms'] for chunk in chunks])}",
            f"  queue depth after queueing {percentiles([chunk['queue_depth'] for chunk in chunks])}",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
