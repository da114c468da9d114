"""Offline evaluation of a policy on an RLDS dataset: the sanity check before touching a robot.

    python training/evaluate.py --model DIR --data-dir DIR --dataset-name NAME [--split val]
        [--center-crop] [--max-steps N] [--episode K] [--plot PATH]
        [--energy-steps N --energy-step-size A --energy-max-step-fraction F]   (OFT models with an energy model)

Feeds the dataset's images through exactly the inference path, prints per-dimension L1 as JSON, and
writes a PNG of predicted against recorded actions over one episode. Token models
(OpenVLAPolicy.predict_action) also report token accuracy; OFT models (OFTPolicy.predict_chunk) are
scored on every window of K steps (L1 per dimension and per chunk step), and the PNG draws the chunks
predicted every K steps of the episode over the recording. An OFT model with an energy model also gets
an "energy" section: E_pos (recorded chunk, own observation) against E_neg (other windows' recorded
chunks) and, with --energy-steps, L1 to the recording without and with the correction (the main
figures are then those of the corrected chunks).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from openvla_ros.errors import DatasetError, OpenVLAError
from openvla_ros.finetune.chunks import chunk_windows
from openvla_ros.finetune.data import load_frames, open_rlds
from openvla_ros.finetune.evaluation import (
    action_metrics,
    chunk_metrics,
    energy_metrics,
    plot_episode,
    plot_episode_chunks,
    predict_frames,
    predict_window_chunks,
    predict_window_details,
)
from openvla_ros.model.oft_policy import load_policy_auto


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python training/evaluate.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint directory or hub id (e.g. runs/x/merged)")
    parser.add_argument("--data-dir", required=True, help="directory holding the RLDS dataset")
    parser.add_argument("--dataset-name", required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--unnorm-key", default=None, help="statistics key (default: the dataset name if present)")
    parser.add_argument("--adapter", default=None, help="optional LoRA adapter directory")
    parser.add_argument("--quantization", default="none", choices=("none", "8bit", "4bit"))
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--center-crop",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="centre crop; default: on exactly for models fine-tuned with image augmentation",
    )
    parser.add_argument("--max-steps", type=int, default=None, help="evaluate at most this many steps")
    parser.add_argument("--episode", type=int, default=0, help="episode index to plot")
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default: evaluate_<split>.png beside --model)")
    parser.add_argument("--energy-steps", type=int, default=0, help="energy refinement steps per chunk (OFT; 0 = off)")
    parser.add_argument("--energy-step-size", type=float, default=0.5, help="energy refinement step size")
    parser.add_argument("--energy-max-step-fraction", type=float, default=0.2,
                        help="each energy step moves the normalised chunk by at most this fraction of its norm")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        frames = load_frames(open_rlds(args.data_dir, args.dataset_name), args.split)
        if args.max_steps is not None:
            frames = frames[: max(1, args.max_steps)]
        from openvla_ros.model.loading import read_config, resolve_checkpoint_dir

        unnorm_key = args.unnorm_key
        if unnorm_key is None and args.dataset_name in read_config(resolve_checkpoint_dir(args.model)).norm_stats:
            unnorm_key = args.dataset_name
        policy = load_policy_auto(
            args.model, unnorm_key=unnorm_key, adapter=args.adapter, quantization=args.quantization,
            device=args.device, center_crop=args.center_crop, energy_steps=args.energy_steps,
            energy_step_size=args.energy_step_size, energy_max_step_fraction=args.energy_max_step_fraction,
        )
        plot_path = args.plot or Path(args.model) / f"evaluate_{args.split}.png"
        if not Path(args.model).is_dir() and args.plot is None:
            plot_path = Path(f"evaluate_{args.split}.png")
        title = f"{args.dataset_name} {args.split} episode {args.episode}"
        episode = [i for i, f in enumerate(frames) if f.episode == args.episode]
        if not episode:
            raise DatasetError(f"episode {args.episode} is not among the evaluated steps of split {args.split!r}")
        if getattr(policy, "is_chunked", False):
            windows = chunk_windows(frames, policy.chunk_size)
            if not windows:
                raise DatasetError(f"no episode of split {args.split!r} is {policy.chunk_size} steps long (the chunk)")
            if getattr(policy, "energy_model", None) is not None:
                predictions = predict_window_details(policy, windows)
                metrics = chunk_metrics(windows, np.stack([p.chunk for p in predictions]))
                metrics["energy"] = energy_metrics(policy, windows, predictions)
            else:
                metrics = chunk_metrics(windows, predict_window_chunks(policy, windows))
            shown = args.episode
            if not any(w.first.episode == shown for w in windows):
                # too short for one chunk: plot the first episode that has one (the metrics cover them all)
                shown = windows[0].first.episode
                print(f"note: episode {args.episode} is shorter than a chunk ({policy.chunk_size} steps); "
                      f"plotting episode {shown}", file=sys.stderr)
                title = f"{args.dataset_name} {args.split} episode {shown}"
            episode_frames = [f for f in frames if f.episode == shown]
            starts = list(range(0, len(episode_frames) - policy.chunk_size + 1, policy.chunk_size))
            plotted = [w for w in windows if w.first.episode == shown and w.first.step in starts]
            plot_episode_chunks(episode_frames, starts, predict_window_chunks(policy, plotted), plot_path, title)
        else:
            ids, actions = predict_frames(policy, frames)
            metrics = action_metrics(policy, frames, ids, actions)
            plot_episode([frames[i] for i in episode], actions[episode], plot_path, title)
    except (OpenVLAError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    metrics.update({"model": args.model, "unnorm_key": policy.unnorm_key, "split": args.split, "plot": str(plot_path)})
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
