"""Loading and running a full-size checkpoint on this machine: memory and time per mode, one table.

    .venv/bin/python benchmarks/full_size.py DIR [--modes bf16,8bit,4bit] [--no-step] [--node 4bit]

DIR is a checkpoint (``python -m openvla_ros.tiny DIR --size 7b`` writes openvla-7b's shapes with random
weights, ``--size 7b --oft`` OpenVLA-OFT-7B's LIBERO layout). Each mode runs in a fresh process: the load
time, the peak RSS during the load and the RSS after it, the bytes of each component as loaded (vision
towers, projector, LLM, lm_head, and the OFT heads) and the time of one ``predict_action`` (token model)
or one chunk (OFT model, with as many images and the proprio it takes). Before loading, the loader's own estimate is printed beside the measurement,
and a mode that would not fit in this machine's memory is reported as refused, with the loader's
reason. With ``--node MODE`` the policy node is started on DIR as a process (``python -m
openvla_ros.policy_node``, the same node ``ros2 launch`` runs) with a synthetic 640x480 camera (and wrist
cameras and a joint state for an OFT model that takes them), and the times to activation (for an OFT
model: chunk mode) and to its first published action are measured (configure, activate, first inference).

Targets (reported either way): 4-bit load peak at most the final 4-bit footprint plus one shard; bf16
load peak at most 1.15x the bf16 weights; nothing in float32 unless asked for.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = {"bf16": ("none", "bfloat16"), "fp32": ("none", "float32"), "8bit": ("8bit", "bfloat16"),
         "4bit": ("4bit", "bfloat16")}


def rss_bytes(field: str) -> int:
    """VmRSS or VmHWM (peak) of this process, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def component_bytes(model) -> dict[str, int]:
    """Bytes held by each part of a loaded model (quantised weights counted as stored; an OFT model's heads)."""
    vla = getattr(model, "vla", model)
    parts = {"vision": vla.vision_backbone, "projector": vla.projector,
             "llm": vla.language_model.model, "lm_head": vla.language_model.lm_head}
    for name in ("action_head", "proprio_projector", "film"):
        if getattr(model, name, None) is not None:
            parts[name] = getattr(model, name)
    sizes = {}
    for name, module in parts.items():
        tensors = list(module.parameters()) + list(module.buffers())
        sizes[name] = sum(t.numel() * t.element_size() for t in tensors)
    return sizes


def measure_mode(checkpoint: Path, mode: str, step: bool) -> dict:
    """Runs in the child process: load in ``mode``, measure, optionally one predict_action."""
    import numpy as np
    import torch

    from openvla_ros.errors import OpenVLAError
    from openvla_ros.model.loading import read_config, weight_files
    from openvla_ros.model.memory import available_bytes, load_peak_bytes, read_headers
    from openvla_ros.model.oft_loading import component_file_bytes, is_oft_checkpoint
    from openvla_ros.model.oft_policy import OFTPolicy
    from openvla_ros.model.policy import OpenVLAPolicy

    quantization, dtype = MODES[mode]
    oft = is_oft_checkpoint(checkpoint, read_config(checkpoint))
    headers = read_headers(weight_files(checkpoint))
    estimate = load_peak_bytes(headers, quantization, getattr(torch, dtype))
    if oft:
        estimate += component_file_bytes(checkpoint)
    result = {"mode": mode, "model": "oft" if oft else "token", "estimate_peak_gb": estimate / 1e9,
              "available_gb": (available_bytes(torch.device("cpu")) or 0) / 1e9}
    baseline = rss_bytes("VmRSS")
    started = time.perf_counter()
    try:
        policy_class = OFTPolicy if oft else OpenVLAPolicy
        policy = policy_class.from_pretrained(str(checkpoint), quantization=quantization, dtype=dtype, device="cpu")
    except OpenVLAError as exc:
        result["refused"] = str(exc)
        return result
    result["load_s"] = time.perf_counter() - started
    result["peak_rss_gb"] = rss_bytes("VmHWM") / 1e9
    result["rss_after_gb"] = rss_bytes("VmRSS") / 1e9
    result["baseline_rss_gb"] = baseline / 1e9
    result["components_gb"] = {name: size / 1e9 for name, size in component_bytes(policy.model).items()}
    result["float32_tensors"] = sum(1 for t in policy.model.parameters() if t.dtype == torch.float32)
    if step:
        rng = np.random.default_rng(0)
        image = rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
        started = time.perf_counter()
        if oft:
            spec = policy.model.spec
            result["spec"] = spec.to_dict()
            wrists = [rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8) for _ in range(spec.num_images - 1)]
            proprio = np.zeros(spec.proprio_dim) if spec.proprio_dim else None
            action = policy.predict_chunk(image, "pick up the red block", wrist_images=wrists, proprio=proprio)
        else:
            action = policy.predict_action(image, "pick up the red block")
        result["step_s"] = time.perf_counter() - started
        result["action_finite"] = bool(np.isfinite(action).all())
    return result


def node_first_action(checkpoint: Path, mode: str, timeout_s: float) -> dict:
    """Starts the policy node on ``checkpoint`` with a synthetic camera; returns the times to active and to
    the first action."""
    import numpy as np
    import rclpy
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image, JointState
    from std_msgs.msg import Float64MultiArray, String
    from std_srvs.srv import SetBool

    from openvla_ros.model.loading import read_config
    from openvla_ros.model.oft_loading import is_oft_checkpoint, read_oft_spec
    from openvla_ros.ros.child_nodes import ChildNode, local_ros_environment

    quantization, dtype = MODES[mode]
    config = read_config(checkpoint)
    spec = read_oft_spec(checkpoint, config) if is_oft_checkpoint(checkpoint, config) else None
    wrist_topics = [f"/camera/wrist_{index}/image_raw" for index in range(1, spec.num_images)] if spec else []
    env = local_ros_environment()
    rclpy.init()
    node = rclpy.create_node("full_size_benchmark")
    first: dict[str, float] = {}
    node.create_subscription(Float64MultiArray, "/openvla_policy/action",
                             lambda _: first.setdefault("action", time.perf_counter()), 10)
    camera = node.create_publisher(Image, "/camera/image_raw", 1)
    latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    node.create_publisher(String, "/instruction", latched).publish(String(data="pick up the red block"))
    frame = Image(height=480, width=640, encoding="rgb8", step=640 * 3,
                  data=np.random.default_rng(0).integers(0, 256, 480 * 640 * 3, dtype=np.uint8).tobytes())
    wrists = [node.create_publisher(Image, topic, 1) for topic in wrist_topics]
    joints = node.create_publisher(JointState, "/joint_states", 1) if spec and spec.proprio_dim else None
    extra = []
    if wrist_topics:
        extra += ["-p", "wrist_image_topics:=[" + ",".join(f"'{topic}'" for topic in wrist_topics) + "]"]
    if joints is not None:
        extra += ["-p", "proprio_topic:=/joint_states", "-p", "max_proprio_age_s:=10.0"]
    log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / "full_size_node"
    started = time.perf_counter()
    child = ChildNode("policy_node", "openvla_ros.policy_node", [
        "-p", f"model:={checkpoint}", "-p", f"quantization:={quantization}", "-p", f"dtype:={dtype}",
        "-p", "device:=cpu", "-p", "start_enabled:=true", "-p", "max_image_age_s:=10.0", "-p", "rate_hz:=1.0",
        "-p", "cpu_threads:=2", *extra],
        log_dir, env)
    enable = node.create_client(SetBool, "/openvla_policy/enable")
    try:
        while "action" not in first and time.perf_counter() - started < timeout_s and child.alive():
            frame.header.stamp = node.get_clock().now().to_msg()
            camera.publish(frame)
            for wrist in wrists:
                wrist.publish(frame)
            if joints is not None:
                joints.publish(JointState(header=frame.header, name=[f"j{i}" for i in range(spec.proprio_dim)],
                                          position=[0.0] * spec.proprio_dim))
            if "active" not in first and "active" in child.log_tail(40):
                first["active"] = time.perf_counter()
                enable.call_async(SetBool.Request(data=True))
            rclpy.spin_once(node, timeout_sec=0.2)
    finally:
        child.stop(timeout_s=60)
        node.destroy_node()
        rclpy.shutdown()
    return {"mode": mode, "to_active_s": first.get("active", float("nan")) - started,
            "to_first_action_s": first.get("action", float("nan")) - started,
            "log": str(child.log_path)}


def table(results: list[dict]) -> str:
    lines = ["| model | mode | load | peak RSS (estimate) | RSS after | vision / projector / LLM / lm_head (+ OFT heads) "
             "| fp32 tensors | one step (chunk) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        if "refused" in r:
            lines.append(f"| {r.get('model', '')} | {r['mode']} | refused before loading: {r['refused']} | | | | | |")
            continue
        c = r["components_gb"]
        step = f"{r['step_s']:.1f} s" if "step_s" in r else "not run"
        heads = "".join(f" + {name} {c[name]:.2f}" for name in ("action_head", "proprio_projector", "film") if name in c)
        lines.append(f"| {r['model']} | {r['mode']} | {r['load_s']:.0f} s | {r['peak_rss_gb']:.2f} GB "
                     f"({r['estimate_peak_gb']:.2f}) | {r['rss_after_gb']:.2f} GB | {c['vision']:.2f} / "
                     f"{c['projector']:.2f} / {c['llm']:.2f} / {c['lm_head']:.2f}{heads} GB | {r['float32_tensors']} "
                     f"| {step} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="checkpoint directory (e.g. from --size 7b)")
    parser.add_argument("--modes", default="bf16,8bit,4bit", help="comma-separated: bf16, fp32, 8bit, 4bit")
    parser.add_argument("--no-step", action="store_true", help="load only, no predict_action")
    parser.add_argument("--node", default="", help="also time the node to its first action in this mode")
    parser.add_argument("--node-timeout", type=float, default=1800.0)
    parser.add_argument("--json", type=Path, default=None, help="write the results here too")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_mode(args.checkpoint, args.child, not args.no_step)))
        return 0
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
    results = []
    for mode in modes:
        command = [sys.executable, __file__, str(args.checkpoint), "--child", mode] + (["--no-step"] if args.no_step else [])
        run = subprocess.run(command, capture_output=True, text=True, check=False)
        if run.returncode != 0:
            results.append({"mode": mode, "refused": f"the process failed ({run.returncode}): {run.stderr[-400:]}"})
        else:
            results.append(json.loads(run.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    print(table(results))
    if args.node:
        node = node_first_action(args.checkpoint.resolve(), args.node, args.node_timeout)
        results.append({"node": node})
        print(f"node ({args.node}): active after {node['to_active_s']:.0f} s, first action after "
              f"{node['to_first_action_s']:.0f} s (log {node['log']})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
