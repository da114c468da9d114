"""The pretrained tiny base: time to build it and its closed-loop success on its pretraining tasks.

    python benchmarks/pretrain.py                                # the default build (make pretrained)
    python benchmarks/pretrain.py --episodes 2000 --steps 3000   # another setting, in a scratch directory
    python benchmarks/pretrain.py --cached artifacts/tiny-pretrained   # report a finished base's figures

A fresh build runs every stage (expert bags, conversion, full training, closed-loop evaluation) in a
scratch directory and prints the seconds per stage and the success rate per task with a 95% Wilson
interval. ``--cached`` verifies a finished base and prints the figures its manifest recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from openvla_ros.pipeline_report import wilson_interval


def report(manifest: dict) -> dict:
    figures = {"elapsed_s": manifest["elapsed_s"], "total_build_s": round(sum(manifest["elapsed_s"].values()), 1),
               "settings": manifest["settings"], "success": {}}
    for task, result in manifest["success"].items():
        low, high = wilson_interval(result["successes"], result["episodes"])
        figures["success"][task] = {"successes": result["successes"], "episodes": result["episodes"],
                                    "rate": result["rate"], "ci95": [round(low, 3), round(high, 3)]}
    return figures


def main(argv: list[str] | None = None) -> int:
    from openvla_ros.pretrain import PretrainError, PretrainSettings, build_pretrained, verify_pretrained

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cached", type=Path, help="a finished base: print its recorded figures")
    parser.add_argument("--episodes", type=int, default=PretrainSettings.episodes)
    parser.add_argument("--steps", type=int, default=PretrainSettings.steps)
    parser.add_argument("--tasks", default=",".join(PretrainSettings.tasks))
    parser.add_argument("--eval-episodes", type=int, default=PretrainSettings.eval_episodes)
    args = parser.parse_args(argv)
    try:
        if args.cached:
            manifest = verify_pretrained(args.cached)
        else:
            settings = PretrainSettings(tasks=tuple(args.tasks.split(",")), episodes=args.episodes, steps=args.steps,
                                        eval_episodes=args.eval_episodes)
            with tempfile.TemporaryDirectory() as scratch:
                manifest = build_pretrained(Path(scratch) / "base", settings)
    except PretrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    figures = report(manifest)
    figures["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    figures["date"] = datetime.now(timezone.utc).isoformat(timespec="minutes")
    print(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
