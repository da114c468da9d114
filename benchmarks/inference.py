"""Per-step latency of OpenVLAPolicy.predict_action for each precision / quantisation.

    python benchmarks/inference.py                       # tiny + mid-size random models on this machine
    python benchmarks/inference.py --model openvla/openvla-7b --unnorm-key bridge_orig   # real model (GPU)

For every (model, mode) it prints the median and p95 latency of one control step (image + instruction
-> 7-DoF action), the rate in Hz, peak accelerator memory on CUDA, and the same step through plain
Hugging Face ``generate()`` (its own cache, unconstrained vocabulary, 7 new tokens) as a ratio.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from openvla_ros.errors import OpenVLAError
from openvla_ros.model.policy import OpenVLAPolicy
from openvla_ros.model.tiny import make_tiny_checkpoint

MODES = {
    "fp32": {"dtype": "float32", "quantization": "none"},
    "bf16": {"dtype": "bfloat16", "quantization": "none"},
    "fp16": {"dtype": "float16", "quantization": "none"},
    "8bit": {"dtype": "auto", "quantization": "8bit"},
    "4bit": {"dtype": "auto", "quantization": "4bit"},
}
INSTRUCTION = "pick up the red block"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def time_steps(step, warmup: int, steps: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def plain_generate_step(policy: OpenVLAPolicy, image: np.ndarray):
    """Returns a callable running the same step through plain ``generate()`` (no action constraint)."""

    def step() -> None:
        input_ids, pixel_values = policy.prepare_inputs(image, INSTRUCTION)
        with torch.inference_mode():
            embeds = policy.model.embed_multimodal(input_ids, pixel_values)
            policy.model.language_model.generate(
                inputs_embeds=embeds, max_new_tokens=7, min_new_tokens=7, do_sample=False,
                pad_token_id=policy.config.text_config.pad_token_id,
            )

    return step


def run(name: str, model: str, mode: str, args: argparse.Namespace) -> None:
    settings = MODES[mode]
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        load_start = time.perf_counter()
        policy = OpenVLAPolicy.from_pretrained(model, device=args.device, unnorm_key=args.unnorm_key, **settings)
        load_s = time.perf_counter() - load_start
    except OpenVLAError as exc:
        print(f"{name:<22} {mode:<5} skipped: {exc}")
        return
    except (RuntimeError, MemoryError) as exc:  # e.g. CUDA out of memory: the other modes still run
        print(f"{name:<22} {mode:<5} failed to load: {type(exc).__name__}: {str(exc).splitlines()[0]}")
        _free(None, device)
        return
    image = np.random.default_rng(0).integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
    try:
        ours = time_steps(functools.partial(policy.predict_action, image, INSTRUCTION), args.warmup, args.steps, device)
        plain = time_steps(plain_generate_step(policy, image), 1, max(3, args.steps // 3), device)
    except (RuntimeError, MemoryError) as exc:
        print(f"{name:<22} {mode:<5} failed while running: {type(exc).__name__}: {str(exc).splitlines()[0]}")
        _free(policy, device)
        return
    memory = f"{torch.cuda.max_memory_allocated() / 2**30:6.2f} GiB" if device.type == "cuda" else "     n/a"
    median = statistics.median(ours)
    print(
        f"{name:<22} {mode:<5} load {load_s:6.1f} s  median {median * 1e3:8.1f} ms  p95 {percentile(ours, 95) * 1e3:8.1f} ms"
        f"  {1 / median:7.2f} Hz  peak GPU {memory}  generate() {statistics.median(plain) * 1e3:8.1f} ms"
        f"  ratio {statistics.median(plain) / median:5.2f}x",
        flush=True,
    )
    _free(policy, device)


def _free(policy: OpenVLAPolicy | None, device: torch.device) -> None:
    if policy is not None:
        policy.release()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="checkpoint dir or hub id (repeatable); default: tiny + mid")
    parser.add_argument("--modes", default=None, help="comma list of fp32,bf16,fp16,8bit,4bit (default: all on CPU, bf16,8bit,4bit on CUDA)")
    parser.add_argument("--unnorm-key", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and args.device != "cpu"
    modes = (args.modes or ("bf16,8bit,4bit" if cuda else "fp32,bf16,fp16,8bit,4bit")).split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
    where = torch.cuda.get_device_name() if cuda else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC  torch {torch.__version__}  device: {where}  "
          f"threads {torch.get_num_threads()}  steps {args.steps}")
    with tempfile.TemporaryDirectory() as scratch:
        models = [(m, m) for m in args.model or []]
        if not models:
            tiny = make_tiny_checkpoint(Path(scratch) / "tiny")
            mid = make_tiny_checkpoint(Path(scratch) / "mid", size="mid")
            models = [("tiny", str(tiny)), ("mid (~200M params)", str(mid))]
        for name, model in models:
            for mode in modes:
                run(name, model, mode, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
