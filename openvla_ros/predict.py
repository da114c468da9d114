"""One-shot prediction from the command line.

    python -m openvla_ros.predict --model DIR_OR_ID --image PATH --instruction TEXT
        [--unnorm-key K] [--quantization none|8bit|4bit] [--center-crop] [--decoding official] [--json]
        [--wrist-image PATH ...] [--proprio v1,v2,...]        (OpenVLA-OFT models)
        [--energy-steps N [--energy-step-size A] [--energy-max-step-fraction F]]   (OFT + energy model)

Prints the 7 action values [dx, dy, dz, droll, dpitch, dyaw, gripper] (a JSON list with --json); for an
OpenVLA-OFT model the K x A chunk, one action per line (a JSON list of lists with --json); with
--energy-steps the refined chunk, and the chunk's energy before and after on stderr.
Exit status 0 on success, 2 with one error line on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from openvla_ros.errors import ImageError, OpenVLAError
from openvla_ros.model.action_codec import ACTION_NAMES
from openvla_ros.model.loading import QUANTIZATIONS


def read_image(path: Path) -> np.ndarray:
    """Returns an image file as a uint8 HxWx3 RGB array.

    Raises:
        ImageError: when the file is missing or not a decodable image.
    """
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise ImageError(f"image file {path} not found")
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageError(f"{path} is not a readable image ({exc}); pass a PNG or JPEG file") from exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m openvla_ros.predict", description="Predict one OpenVLA action for an image and an instruction."
    )
    parser.add_argument("--model", required=True, help="checkpoint directory or hub id (e.g. openvla/openvla-7b)")
    parser.add_argument("--image", required=True, type=Path, help="RGB image file (PNG/JPEG)")
    parser.add_argument("--instruction", required=True, help="what the robot should do")
    parser.add_argument("--unnorm-key", default=None, help="dataset statistics key (e.g. bridge_orig)")
    parser.add_argument("--quantization", default="none", choices=QUANTIZATIONS)
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"))
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--adapter", default=None, help="optional LoRA adapter directory")
    parser.add_argument(
        "--center-crop",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="centre 90%%-area crop (crop-augmented models); default: on exactly for models fine-tuned with "
        "image augmentation",
    )
    parser.add_argument("--rotate-180", action="store_true", help="rotate the image by 180 degrees first")
    parser.add_argument(
        "--decoding",
        default="actions_only",
        choices=("actions_only", "official"),
        help="actions_only: choose among the 256 action tokens (default); official: argmax over the whole "
        "vocabulary as the official code (reproduces its outputs exactly)",
    )
    parser.add_argument("--wrist-image", action="append", type=Path, default=[],
                        help="wrist camera image (repeatable, in the model's camera order; OFT models)")
    parser.add_argument("--proprio", default=None, help="comma-separated proprio vector (OFT models trained with it)")
    parser.add_argument("--energy-steps", type=int, default=0,
                        help="energy refinement steps (OFT models with energy_model.safetensors; 0 = off)")
    parser.add_argument("--energy-step-size", type=float, default=0.5, help="energy refinement step size")
    parser.add_argument("--energy-max-step-fraction", type=float, default=0.2,
                        help="each energy step moves the normalised chunk by at most this fraction of its norm")
    parser.add_argument("--json", action="store_true", help="print a JSON list")
    return parser


# Options whose value may start with '-' (a negative number first): argparse would take
# "--proprio -0.05,0.1" for two options, so such a value is joined to its option first.
VALUE_OPTIONS_ALLOWING_DASH = ("--proprio",)


def join_dash_values(argv: list[str]) -> list[str]:
    """Returns ``argv`` with ``--proprio -0.05,...`` written as ``--proprio=-0.05,...``."""
    joined: list[str] = []
    index = 0
    while index < len(argv):
        word = argv[index]
        if word in VALUE_OPTIONS_ALLOWING_DASH and index + 1 < len(argv) and argv[index + 1].startswith("-") \
                and not argv[index + 1].startswith("--"):
            joined.append(f"{word}={argv[index + 1]}")
            index += 2
            continue
        joined.append(word)
        index += 1
    return joined


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(join_dash_values(sys.argv[1:] if argv is None else list(argv)))
    from openvla_ros.model.oft_policy import load_policy_auto

    try:
        proprio = None
        if args.proprio is not None:
            try:
                proprio = np.array([float(v) for v in args.proprio.split(",")])
            except ValueError:
                print(f"error: --proprio {args.proprio!r} is not a comma-separated list of numbers", file=sys.stderr)
                return 2
        image = read_image(args.image)
        wrist_images = [read_image(path) for path in args.wrist_image]
        policy = load_policy_auto(
            args.model,
            quantization=args.quantization,
            dtype=args.dtype,
            device=args.device,
            adapter=args.adapter,
            unnorm_key=args.unnorm_key,
            center_crop=args.center_crop,
            rotate_180=args.rotate_180,
            decoding=args.decoding,
            energy_steps=args.energy_steps,
            energy_step_size=args.energy_step_size,
            energy_max_step_fraction=args.energy_max_step_fraction,
        )
        if getattr(policy, "is_chunked", False):
            chunk = policy.predict_chunk(image, args.instruction, wrist_images, proprio)
            prediction = policy.last_prediction
            if prediction is not None and prediction.energy_before is not None:
                note = f" (not applied: {prediction.problem})" if prediction.problem else ""
                print(f"energy: before {prediction.energy_before:.6f} after {prediction.energy_after:.6f}, "
                      f"{args.energy_steps} step(s){note}", file=sys.stderr)
        else:
            if wrist_images or proprio is not None:
                raise OpenVLAError(
                    "--wrist-image and --proprio are for OpenVLA-OFT models; this model takes one image only"
                )
            chunk = None
            action = policy.predict_action(image, args.instruction)
    except (OpenVLAError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if chunk is not None:
        if args.json:
            print(json.dumps([[float(v) for v in step] for step in chunk]))
        else:
            for step in chunk:
                print("  ".join(f"{value:+.6f}" for value in step))
        return 0
    if args.json:
        print(json.dumps([float(v) for v in action]))
    else:
        print("  ".join(f"{name}={value:+.6f}" for name, value in zip(ACTION_NAMES, action, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
