"""Added cost of energy refinement per OFT chunk: 1 and 3 correction steps against the chunk's inference.

    python benchmarks/energy.py                          # tiny + mid-size random OFT models on this machine
    python benchmarks/energy.py --model DIR [--dtype bfloat16]   # a real OFT checkpoint (CUDA when present)

For each model it times one chunk without refinement (images + instruction + proprio -> K actions), the
refinement alone (capped energy-descent steps on that chunk's context, as the policy runs them) and the
whole chunk with refinement, and prints the added milliseconds and their fraction of the plain chunk.
The energy model has the published sizes (width 512, 8 heads) on the model's hidden size; a model
directory without an energy file gets a randomly initialised one (the cost does not depend on the
weights; the line says so). Measurements of the configurations are interleaved, so that a machine that
slows down in the middle affects all of them alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from openvla_ros.model.energy import EnergyModel, EnergySpec, RefinementSettings, refine_chunk
from openvla_ros.model.loading import resolve_checkpoint_dir
from openvla_ros.model.oft_loading import has_energy_model, save_energy_model
from openvla_ros.model.oft_policy import OFTPolicy
from openvla_ros.model.tiny_oft import make_tiny_oft_checkpoint

INSTRUCTION = "pick up the red block"
STEP_COUNTS = (1, 3)
CHUNK = 8  # LIBERO's K
PROPRIO_DIM = 8
NUM_IMAGES = 2


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(step, device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    step()
    _synchronize(device)
    return time.perf_counter() - start


def with_energy_file(model_dir: Path, scratch: Path) -> tuple[Path, bool]:
    """Returns (a directory with the model and an energy file, whether that file is a random stand-in)."""
    if has_energy_model(model_dir):
        return model_dir, False
    from openvla_ros.model.loading import read_config
    from openvla_ros.model.oft_loading import read_oft_spec

    config = read_config(model_dir)
    spec = read_oft_spec(model_dir, config)
    target = scratch / f"{model_dir.name}-with-energy"
    if not target.exists():
        target.mkdir(parents=True)
        for item in model_dir.iterdir():  # links, not copies: a 7B model stays where it is
            (target / item.name).symlink_to(item.resolve())
    torch.manual_seed(0)
    save_energy_model(EnergyModel(EnergySpec(config.text_config.hidden_size, spec.action_dim, spec.chunk)), target)
    return target, True


def bench(label: str, model_dir: Path, args: argparse.Namespace, random_energy: bool) -> None:
    """Prints the plain chunk, the refinement alone and the refined chunk for each step count."""
    policy = OFTPolicy.from_pretrained(str(model_dir), device=args.device, dtype=args.dtype,
                                       unnorm_key=args.unnorm_key)
    device = policy.model.device
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8) for _ in range(policy.num_images)]
    proprio = rng.uniform(-0.5, 0.5, policy.proprio_dim) if policy.proprio_dim else None
    inputs = dict(image=images[0], instruction=INSTRUCTION, wrist_images=images[1:], proprio=proprio)
    normalized, context, visible = policy.observe(**inputs, with_context=True)

    def chunk(steps: int):
        def run() -> None:
            policy.configure_energy(steps, 0.5, 0.2)
            policy.predict(**inputs)
        return run

    def refinement(steps: int):
        settings = RefinementSettings(steps, 0.5, 0.2)
        return lambda: refine_chunk(policy.energy_model, context, visible, normalized, settings)

    configs = {"chunk": chunk(0)}
    for steps in STEP_COUNTS:
        configs[f"refine{steps}"] = refinement(steps)
        configs[f"chunk{steps}"] = chunk(steps)
    for run in configs.values():
        for _ in range(args.warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.steps):
        for name, run in configs.items():
            times[name].append(_timed(run, device))
    median = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    base = median["chunk"]
    note = "  (random energy weights: timing only)" if random_energy else ""
    vla_dtype = str(policy.model.llm_dtype).replace("torch.", "")
    print(f"{label}: hidden {policy.config.text_config.hidden_size}, K {policy.chunk_size}, "
          f"{policy.num_images} image(s), proprio {policy.proprio_dim}, VLA {vla_dtype} on {device}, energy fp32 "
          f"({sum(p.numel() for p in policy.energy_model.parameters()) / 1e6:.2f}M params){note}", flush=True)
    print(f"  chunk without refinement   median {base:8.2f} ms")
    for steps in STEP_COUNTS:
        alone = median[f"refine{steps}"]
        whole = median[f"chunk{steps}"]
        print(f"  {steps} step(s): refinement {alone:8.2f} ms = {alone / base:6.1%} of the chunk;  whole chunk "
              f"{whole:8.2f} ms (+{whole - base:7.2f} ms, {(whole - base) / base:+6.1%})", flush=True)
    policy.release()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="OFT checkpoint dir or hub id (repeatable); default: tiny + mid")
    parser.add_argument("--unnorm-key", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"))
    parser.add_argument("--steps", type=int, default=20, help="timed repetitions of each configuration")
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and args.device != "cpu"
    where = torch.cuda.get_device_name() if cuda else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC  torch {torch.__version__}  device: {where}  "
          f"threads {torch.get_num_threads()}  repetitions {args.steps}")
    scratch = Path(tempfile.mkdtemp(prefix="energy-bench-"))
    try:
        if args.model:
            for model in args.model:
                directory, random_energy = with_energy_file(resolve_checkpoint_dir(model), scratch)
                bench(model, directory, args, random_energy)
            return 0
        for size, label in (("tiny", "tiny"), ("mid", "mid (~200M params)")):
            directory = make_tiny_oft_checkpoint(scratch / size, size=size, chunk=CHUNK, proprio_dim=PROPRIO_DIM,
                                                 num_images=NUM_IMAGES, official=False)
            directory, random_energy = with_energy_file(directory, scratch)
            bench(label, directory, args, random_energy)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
