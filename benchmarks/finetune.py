"""Fine-tuning throughput: samples/s and peak memory for LoRA (fp32 base) and 8-bit / 4-bit QLoRA.

    python benchmarks/finetune.py                 # tiny and mid-size (~200M) random models, CPU
    python benchmarks/finetune.py --sizes mid --modes 4bit --steps 5
    python benchmarks/finetune.py --adaptation    # the pretrained base and make pipeline's outcome

``--adaptation`` prints the figures the last runs recorded (nothing is trained): the time to build
the pretrained tiny base and its closed-loop success (``artifacts/tiny-pretrained/pretrain.json``),
and the pipeline's base against fine-tuned (and energy-refined) success with 95% Wilson intervals
(``artifacts/pipeline/report.json``).

Each (size, mode) runs in its own process so that peak memory (max RSS on CPU, max allocated on CUDA)
belongs to that configuration alone. A step is a real training step of the fine-tuning code: batch
building through the shared processor and codec (with augmentation), forward, backward, AdamW.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

MODES = {"fp32-lora": "none", "8bit-qlora": "8bit", "4bit-qlora": "4bit"}


def measure(size: str, mode: str, steps: int, batch_size: int, scratch: Path) -> dict:
    """Runs ``steps`` training steps in this process and returns the figures."""
    import numpy as np
    import torch
    from PIL import Image

    from openvla_ros.finetune.config import FinetuneConfig
    from openvla_ros.finetune.data import Frame, SampleBuilder, collate, sample_rng
    from openvla_ros.finetune.trainer import build_trainable_model
    from openvla_ros.model.loading import load_tokenizer
    from openvla_ros.model.tiny import tiny_norm_stats

    checkpoint = scratch / size
    config = FinetuneConfig(vla_path=str(checkpoint), data_dir="-", dataset_name="bench", out=str(scratch / "out"),
                            batch_size=batch_size, quantization=MODES[mode], device="auto")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_trainable_model(config, checkpoint, str(device))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate)
    samples = SampleBuilder(load_tokenizer(checkpoint), tiny_norm_stats()["tiny_demo"], 224, image_aug=True)
    rng = np.random.default_rng(0)
    frames = []
    for index in range(16):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(buffer, format="JPEG")
        action = np.concatenate([rng.uniform(-0.02, 0.02, 6), [float(index % 2)]])
        frames.append(Frame(0, index, buffer.getvalue(), action, "pick up the red block"))

    def step(number: int) -> None:
        batch = [samples(frames[(number * batch_size + i) % len(frames)], sample_rng(0, number * batch_size + i))
                 for i in range(batch_size)]
        tensors = {key: value.to(device) for key, value in collate(batch, 32000).items()}
        optimizer.zero_grad(set_to_none=True)
        model(**tensors).loss.backward()
        optimizer.step()

    step(0)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for number in range(1, steps + 1):
        step(number)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {
        "size": size,
        "mode": mode,
        "samples_per_s": steps * batch_size / elapsed,
        "step_s": elapsed / steps,
        "trainable_params": sum(p.numel() for p in trainable),
        "peak_memory_gib": (torch.cuda.max_memory_allocated() if device.type == "cuda"
                            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30,
        "memory_kind": "GPU allocated" if device.type == "cuda" else "process max RSS",
    }


def adaptation(base_dir: Path, pipeline_dir: Path) -> int:
    """Prints the pretrained base's build time and success, and the pipeline's success per policy."""
    from openvla_ros.pipeline.report import wilson_interval
    from openvla_ros.pretrain import PretrainError, verify_pretrained

    print(f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC  {platform.machine()}, {os.cpu_count()} CPUs")
    try:
        manifest = verify_pretrained(base_dir)
    except PretrainError as exc:
        print(f"pretrained base: {exc}")
    else:
        settings = manifest["settings"]
        print(f"pretrained base {base_dir}: size {settings['size']}, {manifest['demos']['episodes']} episodes, "
              f"{settings['steps']} steps; built in {sum(manifest['elapsed_s'].values()):.0f} s "
              f"({', '.join(f'{k} {v:.0f} s' for k, v in manifest['elapsed_s'].items())})")
        for task, result in manifest["success"].items():
            low, high = wilson_interval(result["successes"], result["episodes"])
            print(f"  {task}: success {result['successes']}/{result['episodes']} (95% CI {100 * low:.0f}-{100 * high:.0f} %)")
    report_path = pipeline_dir / "report.json"
    if not report_path.is_file():
        print(f"pipeline: no {report_path}; run make pipeline")
        return 0
    report = json.loads(report_path.read_text())
    loop = report["closed_loop"]
    print(f"pipeline {report_path}: base {report['settings']['base']}, task {report['settings']['task']}, "
          f"{report['dataset']['episodes']} demos, {report['training']['steps']} steps "
          f"({report['training'].get('action_head', 'tokens')} head), total {sum(report['timings_s'].values()):.0f} s")
    for label in ("base", "fine_tuned", "fine_tuned_energy"):
        if label in loop:
            entry = loop[label]
            low, high = wilson_interval(entry["successes"], len(entry["episodes"]))
            print(f"  {label:<17} success {entry['successes']}/{len(entry['episodes'])} "
                  f"(95% CI {100 * low:.0f}-{100 * high:.0f} %)")
    if report.get("node_check"):
        check = report["node_check"]
        print(f"  through the node:  success {check['successes']}/{len(check['episodes'])}")
    per_dimension = report.get("offline", {}).get("l1_per_dimension", {})
    if per_dimension:
        print("  val L1 per dimension: " + ", ".join(f"{k} {v:.4f}" for k, v in per_dimension.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adaptation", action="store_true",
                        help="print the pretrained base's and the pipeline's recorded figures instead")
    parser.add_argument("--base-dir", type=Path, default=Path("artifacts") / "tiny-pretrained")
    parser.add_argument("--pipeline-dir", type=Path, default=Path("artifacts") / "pipeline")
    parser.add_argument("--sizes", default="tiny,mid")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--one", nargs=3, metavar=("SIZE", "MODE", "SCRATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.adaptation:
        return adaptation(args.base_dir, args.pipeline_dir)
    if args.one:
        size, mode, scratch = args.one
        print(json.dumps(measure(size, mode, args.steps, args.batch_size, Path(scratch))))
        return 0
    import torch

    where = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{platform.machine()} CPU, {os.cpu_count()} cores"
    print(f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC  device: {where}  batch {args.batch_size}  "
          f"steps {args.steps} (after 1 warm-up)")
    print(f"{'size':<6} {'mode':<11} {'samples/s':>10} {'s/step':>8} {'LoRA params':>12} {'peak memory':>12}")
    with tempfile.TemporaryDirectory() as scratch:
        from openvla_ros.model.tiny import make_tiny_checkpoint

        for size in args.sizes.split(","):
            make_tiny_checkpoint(Path(scratch) / size, size=size)  # built here: not part of the measured peak
            for mode in args.modes.split(","):
                if mode not in MODES:
                    parser.error(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
                command = [sys.executable, __file__, "--one", size, mode, scratch, "--steps", str(args.steps),
                           "--batch-size", str(args.batch_size)]
                result = subprocess.run(command, capture_output=True, text=True)
                if result.returncode != 0:
                    print(f"{size:<6} {mode:<11} failed: {result.stderr.strip().splitlines()[-1]}")
                    continue
                row = json.loads(result.stdout.strip().splitlines()[-1])
                print(f"{size:<6} {mode:<11} {row['samples_per_s']:>10.2f} {row['step_s']:>8.2f} "
                      f"{row['trainable_params']:>12,} {row['peak_memory_gib']:>8.2f} GiB ({row['memory_kind']})",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
