"""The pretrained tiny base: time to build it and its closed-loop success on its pretraining tasks.

    python benchmarks/pretrain.py                                # the default build (make pretrained)
    python benchmarks/pretrain.py --episodes 2000 --steps 3000   # another setting, in a scratch directory
    python benchmarks/pretrain.py --cached artifacts/tiny-pretrained   # report a finished base's figures
    python benchmarks/pretrain.py --cached artifacts/tiny-pretrained --by-blocks 20   # and per block count

A fresh build runs every stage (expert bags, conversion, full training, closed-loop evaluation) in a
scratch directory and prints the seconds per stage and the success rate per task with a 95% Wilson
interval. ``--cached`` verifies a finished base and prints the figures its manifest recorded.

``--by-blocks N`` also runs N fresh reach episodes with 1, 2 and 3 blocks on the table. With one block
there is nothing to choose, so that rate measures finding a block and getting to it; the drop from
there to three blocks is what picking the named one costs.
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

from openvla_ros.pipeline.report import wilson_interval


def report(manifest: dict) -> dict:
    figures = {"elapsed_s": manifest["elapsed_s"], "total_build_s": round(sum(manifest["elapsed_s"].values()), 1),
               "settings": manifest["settings"], "success": {}}
    for task, result in manifest["success"].items():
        low, high = wilson_interval(result["successes"], result["episodes"])
        figures["success"][task] = {"successes": result["successes"], "episodes": result["episodes"],
                                    "rate": result["rate"], "ci95": [round(low, 3), round(high, 3)]}
    return figures


def success_by_blocks(model: Path, episodes: int, seed: int) -> dict:
    """Returns the reach success of ``model`` with 1, 2 and 3 blocks on the table (fresh seeds)."""
    from openvla_ros.model.oft_policy import OFTPolicy
    from openvla_ros.pretrain import DATASET_NAME, rollout_success

    policy = OFTPolicy.from_pretrained(str(model), device="cpu", unnorm_key=DATASET_NAME)
    figures = {}
    for blocks in (1, 2, 3):
        seeds = [(seed, 9500 + blocks, index) for index in range(episodes)]
        successes = sum(o["success"] for o in rollout_success(policy, seeds, "reach", num_blocks=blocks))
        low, high = wilson_interval(successes, episodes)
        figures[f"{blocks} block{'s' if blocks > 1 else ''}"] = {
            "successes": successes, "episodes": episodes, "ci95": [round(low, 3), round(high, 3)]}
    return figures


def main(argv: list[str] | None = None) -> int:
    from openvla_ros.pretrain import PretrainError, PretrainSettings, build_pretrained, verify_pretrained

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cached", type=Path, help="a finished base: print its recorded figures")
    parser.add_argument("--episodes", type=int, default=PretrainSettings.episodes)
    parser.add_argument("--steps", type=int, default=PretrainSettings.steps)
    parser.add_argument("--batch-size", type=int, default=PretrainSettings.batch_size)
    parser.add_argument("--tasks", default=",".join(PretrainSettings.tasks))
    parser.add_argument("--eval-episodes", type=int, default=PretrainSettings.eval_episodes)
    parser.add_argument("--by-blocks", type=int, default=0, metavar="N",
                        help="also N reach episodes each with 1, 2 and 3 blocks on the table (--cached only)")
    args = parser.parse_args(argv)
    if args.by_blocks and not args.cached:
        parser.error("--by-blocks needs --cached (a scratch build is gone when the benchmark ends)")
    try:
        if args.cached:
            manifest = verify_pretrained(args.cached)
        else:
            settings = PretrainSettings(tasks=tuple(args.tasks.split(",")), episodes=args.episodes, steps=args.steps,
                                        batch_size=args.batch_size, eval_episodes=args.eval_episodes)
            with tempfile.TemporaryDirectory() as scratch:
                manifest = build_pretrained(Path(scratch) / "base", settings)
    except PretrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    figures = report(manifest)
    if args.by_blocks:
        figures["reach_by_blocks"] = success_by_blocks(args.cached, args.by_blocks, manifest["settings"]["seed"])
    figures["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    figures["date"] = datetime.now(timezone.utc).isoformat(timespec="minutes")
    print(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
