"""Convert demonstration bags into an RLDS dataset for OpenVLA fine-tuning.

    python training/bag_to_rlds.py BAG [BAG ...] --out DATA_DIR --name NAME [--config YAML]
        [--rate HZ] [--instruction TEXT] [--val-fraction F] [--overwrite] [--check]

Each BAG is a rosbag2 directory (sqlite3 or mcap), or a folder of such directories (each converted as
its own recording, in name order). The dataset is written to DATA_DIR/NAME/VERSION and
opens with ``tfds.builder(NAME, data_dir=DATA_DIR)``; its ``dataset_statistics.json`` holds the action
statistics the policy needs to un-normalise actions. Exit status: 0 on success, 1 on bad input,
130 on Ctrl-C, 143 on SIGTERM, 129 on SIGHUP (nothing half-written is left behind in any case; what a
killed run left is removed by the next run into the same DATA_DIR).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from openvla_ros.errors import DatasetError
from openvla_ros.interrupts import interrupt_exit_status, interrupt_name, termination_as_interrupt


def build_parser() -> argparse.ArgumentParser:
    """Returns the command-line parser."""
    parser = argparse.ArgumentParser(
        description="Convert rosbag2 demonstrations into an RLDS dataset (train + val) for OpenVLA.",
    )
    parser.add_argument("bags", nargs="+", metavar="BAG",
                        help="rosbag2 directories, one episode each, or folders of them")
    parser.add_argument("--out", required=True, metavar="DATA_DIR", help="tensorflow-datasets data directory")
    parser.add_argument("--name", required=True, help="dataset name (lower snake_case)")
    parser.add_argument("--config", metavar="YAML", help="topics and conversion settings (config/record.yaml)")
    parser.add_argument("--rate", type=float, metavar="HZ", help="control rate (default 5 Hz or the config's)")
    parser.add_argument("--instruction", metavar="TEXT", help="fixed instruction instead of the instruction topic")
    parser.add_argument("--val-fraction", type=float, metavar="F", help="share of episodes in the val split")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset of that name")
    parser.add_argument("--check", action="store_true", help="open the result as OpenVLA's loader does")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the conversion; returns the exit status."""
    args = build_parser().parse_args(argv)
    from openvla_ros.dataset import convert_bags, format_report, load_config
    from openvla_ros.dataset.check import check_dataset

    try:
        with termination_as_interrupt():
            config = load_config(args.config, rate_hz=args.rate, instruction=args.instruction,
                                 val_fraction=args.val_fraction)
            report = convert_bags(args.bags, args.out, args.name, config, overwrite=args.overwrite,
                                  progress=not args.quiet)
            print(format_report(report))
            if args.check:
                print("\n".join(check_dataset(args.out, args.name)))
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interrupt:
        print(f"interrupted ({interrupt_name(interrupt)}): nothing was written; a dataset already at "
              f"{args.out}/{args.name} is unchanged", file=sys.stderr)
        return interrupt_exit_status(interrupt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
