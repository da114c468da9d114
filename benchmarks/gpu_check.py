"""Everything a GPU has to answer about the full-size models, in one command.

    python benchmarks/gpu_check.py [--steps 20] [--compile] [--out gpu_check.json]
    python benchmarks/gpu_check.py --device cpu --size tiny --steps 2     # the same path, here, in seconds

Offline and self-contained: it needs torch, transformers, timm, safetensors, sentencepiece, tokenizers,
numpy and pillow (a stock CUDA PyTorch image), and bitsandbytes for the 8-bit and 4-bit rows (reported
as skipped, with the reason, when it is missing). No ROS, no TensorFlow, no pinned environment, no
download: the models are built in place with random weights (the speed does not depend on them).

It runs, each row timed over ``--steps`` calls after warm-up (median, p95, Hz, actions/s, peak GPU
memory, build/quantise time):
- the token model (openvla-7b's shapes) in bf16, 8-bit and 4-bit: ``predict_action`` (7 decoded tokens);
- the OFT-7B model in bf16, 8-bit and 4-bit, with 1 image and with 2 images + proprio 8: one chunk of 8;
- on the tiny model, CUDA against the CPU: whether the fp32 action ids are identical, and the largest
  difference between the bf16 chunks;
- with ``--compile``: the token step with a static KV cache
  (:class:`~openvla_ros.model.static_decode.StaticActionDecoder`), eager and with its decode step compiled
  (``torch.compile`` mode ``reduce-overhead``, i.e. captured in a CUDA graph, on CUDA), and the OFT pass
  compiled, each beside the eager one, with whether the action ids are identical (token) or the largest
  chunk difference (OFT).
It writes one JSON file and prints one markdown table headed by the device, driver, torch version and date.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the package's model core, without installing the package

import numpy as np  # noqa: E402
import torch  # noqa: E402

INSTRUCTION = "pick up the red block"
MODES = ("bf16", "8bit", "4bit")


def device_info(device: torch.device) -> dict:
    info = {"device": device.type, "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = "unknown"
    else:
        info["cpu"] = platform.processor() or platform.machine()
    try:
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    except Exception as exc:  # not installed, or no kernels for this machine
        info["bitsandbytes"] = f"unavailable ({type(exc).__name__}: {exc})"
    return info


def bitsandbytes_problem() -> str | None:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:
        return f"bitsandbytes not importable: {type(exc).__name__}: {exc}"
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")


def vla_config(size: str):
    if size == "7b":
        from openvla_ros.model.full_size import full_config

        return full_config()
    from openvla_ros.model.tiny import tiny_config

    return tiny_config()


def build_vla(size: str, mode: str, device: torch.device):
    """Returns the VLA of ``size`` built on ``device`` in bf16 (fp32 on request), quantised for 8bit/4bit."""
    from openvla_ros.model.loading import quantize_llm
    from openvla_ros.model.modeling_openvla import OpenVLAForActionPrediction

    dtype = torch.float32 if mode == "fp32" else torch.bfloat16
    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = OpenVLAForActionPrediction(vla_config(size))
    finally:
        torch.set_default_dtype(previous)
    if mode in ("8bit", "4bit"):
        quantize_llm(model, mode, torch.bfloat16, device)
    return model.eval().requires_grad_(False)


def timed(call, steps: int, warmup: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        call()
    synchronize(device)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        call()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return times


def summary(times: list[float], actions_per_call: int) -> dict:
    ordered = sorted(times)
    median = statistics.median(ordered)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return {"median_ms": median * 1e3, "p95_ms": p95 * 1e3, "hz": 1.0 / median,
            "actions_per_s": actions_per_call / median, "steps": len(times)}


def image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(480, 640, 3), dtype=np.uint8)


def token_row(size: str, mode: str, device: torch.device, tokenizer, steps: int, warmup: int,
              compile_: bool = False) -> dict:
    from openvla_ros.model.policy import OpenVLAPolicy
    from openvla_ros.model.tiny import TINY_UNNORM_KEY

    reset_peak(device)
    started = time.perf_counter()
    model = build_vla(size, mode, device)
    synchronize(device)
    build_s = time.perf_counter() - started
    policy = OpenVLAPolicy(model, tokenizer, unnorm_key=TINY_UNNORM_KEY)
    frame = image()
    times = timed(lambda: policy.predict_action(frame, INSTRUCTION), steps, warmup, device)
    row = {"model": "token", "mode": mode, "images": 1, "build_s": build_s, **summary(times, 1),
           "peak_gpu_gb": peak_gb(device)}
    if compile_:
        row |= static_cache_rows(policy, device, steps, warmup)
    return row


def static_cache_rows(policy, device: torch.device, steps: int, warmup: int) -> dict:
    """The token step with a static KV cache, eager and compiled; whether the ids equal the dynamic cache's."""
    from openvla_ros.model.static_decode import StaticActionDecoder

    frames = [image(seed) for seed in range(3)]
    reference = [policy.predict_action_ids(frame, INSTRUCTION).tolist() for frame in frames]
    tokenizer = policy.action_tokenizer
    inputs = [policy.prepare_inputs(frame, INSTRUCTION) for frame in frames]
    results = {}
    for label, mode in (("static", None), ("static_compiled", "reduce-overhead" if device.type == "cuda" else "default")):
        decoder = StaticActionDecoder(policy.model, tokenizer.first_action_id, tokenizer.last_action_id,
                                      compile_mode=mode)
        started = time.perf_counter()
        ids = [decoder(*pair)[0].tolist() for pair in inputs]  # the first call compiles
        synchronize(device)
        first_s = time.perf_counter() - started
        results[label] = {**summary(timed(lambda decoder=decoder: decoder(*inputs[0]), steps, warmup, device), 1),
                          "first_calls_s": first_s, "ids_identical": ids == reference}
    return results


def oft_policy(size: str, mode: str, device: torch.device, tokenizer, num_images: int, proprio_dim: int):
    from openvla_ros.model.oft import OFTSpec, OpenVLAOFT
    from openvla_ros.model.oft_policy import OFTPolicy
    from openvla_ros.model.tiny import TINY_UNNORM_KEY
    from openvla_ros.model.tiny_oft import tiny_proprio_stats

    vla = build_vla(size, mode, device)
    spec = OFTSpec(chunk=8, action_dim=7, proprio_dim=proprio_dim, num_images=num_images)
    torch.manual_seed(1)
    with torch.device(device):
        model = OpenVLAOFT(vla, spec)
    dtype = torch.float32 if mode == "fp32" else torch.bfloat16
    for head in (model.action_head, model.proprio_projector):
        if head is not None:
            head.to(device=device, dtype=dtype)
    if proprio_dim:
        vla.config.norm_stats[TINY_UNNORM_KEY]["proprio"] = tiny_proprio_stats(proprio_dim)
    return OFTPolicy(model.eval(), tokenizer, unnorm_key=TINY_UNNORM_KEY)


def oft_row(size: str, mode: str, device: torch.device, tokenizer, steps: int, warmup: int, num_images: int,
            proprio_dim: int, compile_: bool) -> dict:
    reset_peak(device)
    started = time.perf_counter()
    policy = oft_policy(size, mode, device, tokenizer, num_images, proprio_dim)
    synchronize(device)
    build_s = time.perf_counter() - started
    frames = [image(seed) for seed in range(num_images)]
    proprio = np.zeros(proprio_dim) if proprio_dim else None

    def call():
        return policy.predict_chunk(frames[0], INSTRUCTION, wrist_images=frames[1:], proprio=proprio)

    times = timed(call, steps, warmup, device)
    row = {"model": "oft", "mode": mode, "images": num_images, "proprio": proprio_dim, "build_s": build_s,
           **summary(times, 8), "peak_gpu_gb": peak_gb(device)}
    if compile_:
        eager = np.asarray(call())
        policy.model.forward = torch.compile(policy.model.forward)
        started = time.perf_counter()
        compiled = np.asarray(call())
        row["compile_s"] = time.perf_counter() - started
        row["compiled"] = summary(timed(call, steps, warmup, device), 8)
        row["compiled_max_difference"] = float(np.abs(compiled - eager).max())
    return row


def cuda_against_cpu(tokenizer) -> dict:
    """The tiny model on CUDA and on the CPU: fp32 action ids, and the bf16 chunk difference."""
    from openvla_ros.model.policy import OpenVLAPolicy
    from openvla_ros.model.tiny import TINY_UNNORM_KEY

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    frames = [image(seed) for seed in range(4)]
    ids = {}
    for device in (cpu, cuda):
        policy = OpenVLAPolicy(build_vla("tiny", "fp32", device), tokenizer, unnorm_key=TINY_UNNORM_KEY)
        ids[device.type] = [policy.predict_action_ids(frame, INSTRUCTION).tolist() for frame in frames]
    chunks = {}
    for device in (cpu, cuda):
        policy = oft_policy("tiny", "bf16", device, tokenizer, 1, 0)
        chunks[device.type] = np.asarray(policy.predict_chunk(frames[0], INSTRUCTION))
    return {"fp32_action_ids_identical": ids["cpu"] == ids["cuda"], "fp32_ids": ids,
            "bf16_chunk_max_difference": float(np.abs(chunks["cpu"] - chunks["cuda"]).max())}


def markdown(info: dict, rows: list[dict], checks: dict) -> str:
    head = ", ".join(f"{key} {value}" for key, value in info.items())
    lines = [f"gpu_check: {head}", "",
             "| model | mode | images | median | p95 | Hz | actions/s | peak GPU memory | build |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        label = f"{row['model']}" + (f" + proprio {row['proprio']}" if row.get("proprio") else "")
        if "skipped" in row:
            lines.append(f"| {label} | {row['mode']} | {row.get('images', 1)} | skipped: {row['skipped']} | | | | | |")
            continue
        lines.append(f"| {label} | {row['mode']} | {row['images']} | {row['median_ms']:.1f} ms | {row['p95_ms']:.1f} ms | "
                     f"{row['hz']:.2f} | {row['actions_per_s']:.1f} | {row['peak_gpu_gb']:.2f} GB | {row['build_s']:.1f} s |")
        for key in ("static", "static_compiled"):
            if key in row:
                static = row[key]
                lines.append(f"| {label}, {key.replace('_', ' ')} KV cache | {row['mode']} | {row['images']} | "
                             f"{static['median_ms']:.1f} ms | {static['p95_ms']:.1f} ms | {static['hz']:.2f} | "
                             f"{static['actions_per_s']:.1f} | | {static['first_calls_s']:.1f} s for the first 3 calls; "
                             f"ids identical: {static['ids_identical']} |")
        if "compiled" in row:
            compiled = row["compiled"]
            lines.append(f"| {label}, compiled | {row['mode']} | {row['images']} | {compiled['median_ms']:.1f} ms | "
                         f"{compiled['p95_ms']:.1f} ms | {compiled['hz']:.2f} | {compiled['actions_per_s']:.1f} | | "
                         f"{row['compile_s']:.1f} s to compile; max difference {row['compiled_max_difference']:.2e} |")
    lines.append("")
    lines += [f"- {key}: {value}" for key, value in checks.items() if key != "fp32_ids"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--size", default="7b", choices=("7b", "tiny"))
    parser.add_argument("--steps", type=int, default=20, help="timed calls per row, after warm-up (default 20)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: bf16, 8bit, 4bit")
    parser.add_argument("--compile", action="store_true",
                        help="also time the token step with a static KV cache (eager and compiled; a CUDA graph on "
                        "CUDA) and the OFT pass under torch.compile")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; running the CPU path at tiny size (--device cpu --size tiny)")
        args.device, args.size = "cpu", "tiny"
    device = torch.device(args.device)
    modes = [mode for mode in args.modes.split(",") if mode]
    info = device_info(device)
    from openvla_ros.model.tiny import make_tiny_tokenizer

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = make_tiny_tokenizer(Path(scratch) / "tokenizer")
    problem = bitsandbytes_problem()
    rows: list[dict] = []
    for mode in modes:
        if mode != "bf16" and problem:
            rows.append({"model": "token", "mode": mode, "skipped": problem})
            continue
        rows.append(token_row(args.size, mode, device, tokenizer, args.steps, args.warmup,
                              args.compile and mode == "bf16"))
        print(json.dumps(rows[-1]), flush=True)
    for num_images, proprio_dim in ((1, 0), (2, 8)):
        for mode in modes:
            if mode != "bf16" and problem:
                rows.append({"model": "oft", "mode": mode, "images": num_images, "proprio": proprio_dim,
                             "skipped": problem})
                continue
            rows.append(oft_row(args.size, mode, device, tokenizer, args.steps, args.warmup, num_images, proprio_dim,
                                args.compile and mode == "bf16"))
            print(json.dumps(rows[-1]), flush=True)
    checks: dict = {}
    if device.type == "cuda":
        checks |= cuda_against_cpu(tokenizer)
    else:
        checks["cuda_against_cpu"] = "skipped: no CUDA device"
    args.out.write_text(json.dumps({"info": info, "rows": rows, "checks": checks}, indent=1))
    print(markdown(info, rows, checks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
