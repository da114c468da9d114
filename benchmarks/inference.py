"""Inference latency per precision / quantisation: token-by-token decoding and OFT chunks.

    python benchmarks/inference.py                       # tiny + mid-size random models on this machine
    python benchmarks/inference.py --model openvla/openvla-7b --unnorm-key bridge_orig   # real model (GPU)
    python benchmarks/inference.py --model moojink/openvla-7b-oft-finetuned-libero-spatial   # real OFT model

For every (model, mode) of a token model it prints the median and p95 latency of one control step
(image + instruction -> 7-DoF action), the rate in Hz, peak accelerator memory on CUDA, and the same
step through plain Hugging Face ``generate()`` (its own cache, unconstrained vocabulary, 7 new tokens)
as a ratio. For an OFT model it prints the latency of one chunk (one forward pass -> K actions), the
chunk rate, actions/s (K / latency) and peak memory. By default the tiny and mid configs run both
ways, OFT with K = 8 on the same VLA weights, and each OFT line gives actions/s against the token
decoding of the same config and mode.
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
from openvla_ros.model.loading import resolve_checkpoint_dir
from openvla_ros.model.oft_loading import is_oft_checkpoint
from openvla_ros.model.oft_policy import OFTPolicy
from openvla_ros.model.policy import OpenVLAPolicy
from openvla_ros.model.tiny import make_tiny_checkpoint
from openvla_ros.model.tiny_oft import make_tiny_oft_checkpoint

OFT_CHUNK = 8  # LIBERO's K

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


def run(name: str, model: str, mode: str, args: argparse.Namespace) -> float | None:
    """Times token-by-token decoding; returns actions/s (the step rate), None when the mode did not run."""
    device = _device(args)
    loaded = _load(OpenVLAPolicy, name, model, mode, args, device)
    if loaded is None:
        return None
    policy, load_s = loaded
    image = np.random.default_rng(0).integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
    try:
        ours = time_steps(functools.partial(policy.predict_action, image, INSTRUCTION), args.warmup, args.steps, device)
        plain = time_steps(plain_generate_step(policy, image), 1, max(3, args.steps // 3), device)
    except (RuntimeError, MemoryError) as exc:
        _failed(name, mode, "while running", exc, policy, device)
        return None
    memory = f"{torch.cuda.max_memory_allocated() / 2**30:6.2f} GiB" if device.type == "cuda" else "     n/a"
    median = statistics.median(ours)
    print(
        f"{name:<22} {mode:<5} load {load_s:6.1f} s  median {median * 1e3:8.1f} ms  p95 {percentile(ours, 95) * 1e3:8.1f} ms"
        f"  {1 / median:7.2f} Hz  peak GPU {memory}  generate() {statistics.median(plain) * 1e3:8.1f} ms"
        f"  ratio {statistics.median(plain) / median:5.2f}x",
        flush=True,
    )
    _free(policy, device)
    return 1 / median


def run_chunk(name: str, model: str, mode: str, args: argparse.Namespace, token_rate: float | None) -> None:
    """Times one OFT chunk (one forward pass) and prints latency, chunk rate and actions/s."""
    device = _device(args)
    loaded = _load(OFTPolicy, name, model, mode, args, device)
    if loaded is None:
        return
    policy, load_s = loaded
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8) for _ in range(policy.num_images)]
    proprio = np.zeros(policy.proprio_dim) if policy.proprio_dim else None
    step = functools.partial(policy.predict_chunk, images[0], INSTRUCTION, wrist_images=images[1:], proprio=proprio)
    try:
        times = time_steps(step, args.warmup, args.steps, device)
    except (RuntimeError, MemoryError) as exc:
        _failed(name, mode, "while running", exc, policy, device)
        return
    memory = f"{torch.cuda.max_memory_allocated() / 2**30:6.2f} GiB" if device.type == "cuda" else "     n/a"
    median = statistics.median(times)
    actions_per_s = policy.chunk_size / median
    versus = f"  vs token decoding {actions_per_s / token_rate:6.2f}x" if token_rate else ""
    print(
        f"{name:<22} {mode:<5} load {load_s:6.1f} s  chunk of {policy.chunk_size}: median {median * 1e3:8.1f} ms"
        f"  p95 {percentile(times, 95) * 1e3:8.1f} ms  {1 / median:7.2f} chunks/s  {actions_per_s:8.2f} actions/s"
        f"  peak GPU {memory}{versus}",
        flush=True,
    )
    _free(policy, device)


def _device(args: argparse.Namespace) -> torch.device:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return device


def _load(policy_class: type[OpenVLAPolicy] | type[OFTPolicy], name: str, model: str, mode: str,
          args: argparse.Namespace, device: torch.device) -> tuple[OpenVLAPolicy | OFTPolicy, float] | None:
    """Returns the loaded policy and its load time, or None (printed) when the mode cannot run."""
    try:
        start = time.perf_counter()
        policy = policy_class.from_pretrained(model, device=args.device, unnorm_key=args.unnorm_key, **MODES[mode])
    except OpenVLAError as exc:
        print(f"{name:<22} {mode:<5} skipped: {exc}")
        return None
    except (RuntimeError, MemoryError) as exc:  # e.g. CUDA out of memory: the other modes still run
        _failed(name, mode, "to load", exc, None, device)
        return None
    return policy, time.perf_counter() - start


def _failed(name: str, mode: str, when: str, exc: BaseException, policy: OpenVLAPolicy | OFTPolicy | None,
            device: torch.device) -> None:
    print(f"{name:<22} {mode:<5} failed {when}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
    _free(policy, device)


def _free(policy: OpenVLAPolicy | OFTPolicy | None, device: torch.device) -> None:
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
        if args.model:
            for model in args.model:
                try:
                    chunked = is_oft_checkpoint(resolve_checkpoint_dir(model))
                except OpenVLAError as exc:  # the other models still run
                    print(f"{model:<22} skipped: {exc}")
                    continue
                for mode in modes:
                    if chunked:
                        run_chunk(model, model, mode, args, None)
                    else:
                        run(model, model, mode, args)
            return 0
        for size, label in (("tiny", "tiny"), ("mid", "mid (~200M params)")):
            token = make_tiny_checkpoint(Path(scratch) / size, size=size)
            oft = make_tiny_oft_checkpoint(Path(scratch) / f"{size}-oft", size=size, chunk=OFT_CHUNK)
            for mode in modes:
                rate = run(label, str(token), mode, args)
                run_chunk(f"{label} OFT", str(oft), mode, args, rate)
    return 0


if __name__ == "__main__":
    sys.exit(main())
