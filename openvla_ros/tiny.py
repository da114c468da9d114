"""``python -m openvla_ros.tiny``: write a tiny checkpoint (:mod:`openvla_ros.model.tiny`), or build the
pretrained tiny base (``--pretrain``, :mod:`openvla_ros.pretrain`).

    python -m openvla_ros.tiny OUT_DIR [--seed N] [--size tiny|small|mid] [--prismatic]
    python -m openvla_ros.tiny OUT_DIR --oft [--chunk K] [--proprio-dim N] [--images N] [--film] [--ours]
    python -m openvla_ros.tiny OUT_DIR --pretrain [--tasks reach] [--episodes N] [--steps N] [--select-every N]
    python -m openvla_ros.tiny OUT_DIR --size 7b [--dry-run] [--layers N]   # openvla-7b's shapes, random
    python -m openvla_ros.tiny OUT_DIR --size 7b --oft [--film]              # OFT-7B (LIBERO layout), random

This command lives above the model core so that the core never imports the pretraining application.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from openvla_ros.model.tiny import SIZES, make_tiny_checkpoint, make_tiny_prismatic_run


def main(argv: list[str] | None = None) -> int:
    from openvla_ros.pretrain import PretrainSettings

    defaults = PretrainSettings()
    parser = argparse.ArgumentParser(prog="python -m openvla_ros.tiny",
                                     description="Write a tiny OpenVLA checkpoint, or build the pretrained tiny base.")
    parser.add_argument("out_dir", type=Path, help="directory to create (must not exist or be empty)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--size", default=None, choices=[*sorted(SIZES), "7b"],
                        help="tiny (tests, the default), small (4 Llama layers: the --pretrain default), mid "
                             "(~200M, benchmarks) or 7b (openvla-7b's shapes and layout, 15 GB in bf16, written "
                             "tensor by tensor)")
    full = parser.add_argument_group("full size (--size 7b)")
    full.add_argument("--dry-run", action="store_true",
                      help="print the files, tensor count and bytes it would write, and write nothing")
    full.add_argument("--layers", type=int, default=32,
                      help="Llama layers (default 32); fewer keep every width, for quick checks")
    parser.add_argument(
        "--prismatic", action="store_true",
        help="write a Prismatic training run directory (config.json, dataset_statistics.json, "
        "checkpoints/latest-checkpoint.pt) instead of a checkpoint",
    )
    oft = parser.add_argument_group("OpenVLA-OFT (--oft)")
    oft.add_argument("--oft", action="store_true",
                     help="add the OFT L1 action head: official layout (.pt heads with the module. prefix)")
    oft.add_argument("--chunk", type=int, default=None, help="actions per chunk K (default 8)")
    oft.add_argument("--proprio-dim", type=int, default=None,
                     help="proprio vector length (default 0: no proprio; at --size 7b LIBERO's 8)")
    oft.add_argument("--images", type=int, default=None,
                     help="input images: primary + wrist cameras (default 1; at --size 7b LIBERO's 2)")
    oft.add_argument("--film", action="store_true", help="FiLM in every ViT block")
    oft.add_argument("--ours", action="store_true",
                     help="write this package's OFT layout (safetensors heads) instead of the official one")
    pretrain = parser.add_argument_group("pretrained base (--pretrain; see openvla_ros.pretrain)")
    pretrain.add_argument("--pretrain", action="store_true",
                          help="train the tiny OFT model fully on a broad simulated dataset; reuses a finished "
                          "OUT_DIR, resumes an interrupted build, rebuilds a corrupt one")
    pretrain.add_argument("--tasks", default="", help="task families, comma-separated (default: reach)")
    pretrain.add_argument("--episodes", type=int, default=0, help=f"expert episodes (default {defaults.episodes})")
    pretrain.add_argument("--steps", type=int, default=0, help=f"training steps (default {defaults.steps})")
    pretrain.add_argument("--batch-size", type=int, default=0,
                          help=f"samples per training step (default {defaults.batch_size})")
    pretrain.add_argument("--learning-rate", type=float, default=0.0,
                          help=f"peak learning rate of the cosine schedule (default {defaults.learning_rate:g})")
    pretrain.add_argument("--block-counts", default="",
                          help="blocks on the table in the recorded episodes, comma-separated, taken in turn "
                          f"(default {','.join(map(str, defaults.block_counts))})")
    pretrain.add_argument("--eval-episodes", type=int, default=-1,
                          help=f"closed-loop episodes per task after training (default {defaults.eval_episodes})")
    pretrain.add_argument("--select-every", type=int, default=-1,
                          help="steps between closed-loop validations that pick the kept weights "
                          f"(default {defaults.select_every}; 0: keep the last weights)")
    pretrain.add_argument("--select-episodes", type=int, default=-1,
                          help=f"closed-loop validation episodes per task (default {defaults.select_episodes})")
    pretrain.add_argument("--threads", type=int, default=0,
                          help=f"torch CPU threads the build trains with (default {defaults.threads}; the result "
                          "depends on it)")
    pretrain.add_argument("--ema-decay", type=float, default=-1.0,
                          help="decay of the weight average that is validated and kept (0: the trained weights)")
    pretrain.add_argument("--locate-weights", default="", metavar="PATCH,POINT",
                          help="weights of the auxiliary localisation losses (default "
                          f"{defaults.locate_patch_weight:g},{defaults.locate_point_weight:g}; 0,0: the action loss "
                          "alone)")
    pretrain.add_argument("--no-film", action="store_true",
                          help="train the base without FiLM (default: FiLM in every ViT block, as OpenVLA-OFT+)")
    args = parser.parse_args(argv)
    from openvla_ros.errors import OpenVLAError

    if args.pretrain:
        return _pretrain_main(parser, args)

    if args.size == "7b":
        return _full_size_main(parser, args)
    oft_given = args.chunk is not None or args.proprio_dim is not None or args.images is not None
    args.chunk = 8 if args.chunk is None else args.chunk
    args.proprio_dim = 0 if args.proprio_dim is None else args.proprio_dim
    args.images = 1 if args.images is None else args.images
    if args.dry_run or args.layers != 32:
        parser.error("--dry-run and --layers need --size 7b")
    if args.oft and args.prismatic:
        parser.error("--oft and --prismatic exclude each other")
    if args.no_film:
        parser.error("--no-film is a --pretrain option")
    if not args.oft and (args.film or args.ours or oft_given):
        parser.error("--chunk, --proprio-dim, --images, --film and --ours need --oft")
    try:
        if args.oft:
            from openvla_ros.model.tiny_oft import make_tiny_oft_checkpoint

            path = make_tiny_oft_checkpoint(
                args.out_dir, seed=args.seed, size=args.size or "tiny", chunk=args.chunk, proprio_dim=args.proprio_dim,
                num_images=args.images, film=args.film, official=not args.ours,
            )
        else:
            make = make_tiny_prismatic_run if args.prismatic else make_tiny_checkpoint
            path = make(args.out_dir, seed=args.seed, size=args.size or "tiny")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OpenVLAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


def _full_size_main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``--size 7b``: writes (or with ``--dry-run`` lists) the full-size random checkpoint."""
    import torch

    from openvla_ros.errors import OpenVLAError
    from openvla_ros.model.full_size import (
        FULL_SHARD_BYTES,
        LIBERO_OFT,
        full_config,
        oft_head_files,
        plan_checkpoint,
        write_full_checkpoint,
    )
    from openvla_ros.model.oft import OFTSpec

    if args.prismatic or args.ours:
        parser.error("--size 7b writes the official layouts only; --prismatic and --ours are not available at 7b")
    if not 1 <= args.layers <= 32:
        parser.error(f"--layers must be 1..32, got {args.layers}")
    if not args.oft and (args.film or args.chunk is not None or args.proprio_dim is not None or args.images is not None):
        parser.error("--chunk, --proprio-dim, --images and --film need --oft")
    spec = None
    if args.oft:
        layout = dict(LIBERO_OFT)
        for key, given in (("chunk", args.chunk), ("proprio_dim", args.proprio_dim), ("num_images", args.images)):
            if given is not None:
                layout[key] = given
        try:
            spec = OFTSpec(action_dim=7, film=args.film, **layout)
        except ValueError as exc:
            parser.error(str(exc))
    config = full_config(args.layers)
    if args.dry_run:
        plan = plan_checkpoint(config, FULL_SHARD_BYTES)
        for shard in dict.fromkeys(tensor.shard for tensor in plan):
            tensors = [tensor for tensor in plan if tensor.shard == shard]
            print(f"{shard}: {len(tensors)} tensors, {sum(t.nbytes for t in tensors) / 1e9:.2f} GB")
        parameters = sum(tensor.nbytes for tensor in plan) // 2
        print(f"total: {len(plan)} tensors, {parameters / 1e9:.3f} B parameters, "
              f"{2 * parameters / 1e9:.2f} GB in bf16 (nothing written)")
        if spec is not None:
            for file, entries in oft_head_files(config, spec).items():
                count = sum(int(torch.Size(shape).numel()) for _, shape, _ in entries)
                size = sum(int(torch.Size(shape).numel()) * dtype.itemsize for _, shape, dtype in entries)
                print(f"{file}: {len(entries)} tensors, {count / 1e6:.1f} M parameters, {size / 1e9:.2f} GB")
        return 0
    try:
        path = write_full_checkpoint(args.out_dir, seed=args.seed, layers=args.layers, oft=spec)
    except OpenVLAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


def _pretrain_main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``--pretrain``: builds (or reuses) the pretrained base and prints its success rates."""
    from openvla_ros.pretrain import PretrainError, PretrainSettings, ensure_pretrained

    if args.oft or args.prismatic:
        parser.error("--pretrain builds an OFT model of its own; drop --oft/--prismatic")
    given = {"seed": args.seed}
    if args.size:
        given["size"] = args.size
    if args.tasks:
        given["tasks"] = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    for name in ("episodes", "steps", "batch_size", "learning_rate"):
        if getattr(args, name):
            given[name] = getattr(args, name)
    if args.block_counts:
        try:
            given["block_counts"] = tuple(int(n) for n in args.block_counts.split(","))
        except ValueError:
            parser.error(f"--block-counts takes whole numbers separated by commas, got {args.block_counts!r}")
    if args.locate_weights:
        try:
            patch, point = (float(w) for w in args.locate_weights.split(","))
        except ValueError:
            parser.error(f"--locate-weights takes two numbers separated by a comma, got {args.locate_weights!r}")
        given["locate_patch_weight"], given["locate_point_weight"] = patch, point
    if args.eval_episodes >= 0:
        given["eval_episodes"] = args.eval_episodes
    if args.select_every >= 0:
        given["select_every"] = args.select_every
    if args.select_episodes >= 0:
        given["select_episodes"] = args.select_episodes
    if args.threads:
        given["threads"] = args.threads
    if args.ema_decay >= 0:
        given["ema_decay"] = args.ema_decay
    if args.no_film:
        given["film"] = False
    from openvla_ros.interrupts import interrupt_exit_status, interrupt_name, termination_as_interrupt
    from openvla_ros.pretrain import kept_stages_note, weak_base_advice

    try:
        with termination_as_interrupt():
            manifest = ensure_pretrained(args.out_dir, PretrainSettings(**given))
    except PretrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        print(f"interrupted ({interrupt_name(interrupt)}): {kept_stages_note(args.out_dir)}", file=sys.stderr)
        return interrupt_exit_status(interrupt)
    for task, result in manifest["success"].items():
        print(f"{task}: success {result['successes']}/{result['episodes']} on fresh episodes")
    for line in weak_base_advice(manifest, args.out_dir):
        print(f"note: {line}")
    print(args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
