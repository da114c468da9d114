"""Runs the stages in order and reports (``python -m openvla_ros.pipeline``)."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from openvla_ros.pipeline.closed_loop import closed_loop, node_check
from openvla_ros.pipeline.report import (
    Report,
    format_table,
    plot_training_curve,
    plot_trajectories,
    prepare_out_dir,
    stage,
)
from openvla_ros.pipeline.settings import (
    DEFAULT_PRETRAINED,
    PipelineError,
    PipelineSettings,
    base_spec,
    build_parser,
    settings_from_args,
)
from openvla_ros.pipeline.stages import (
    convert,
    finetune,
    offline_evaluation,
    record_demonstrations,
    train_energy,
)
from openvla_ros.ros.child_nodes import local_ros_environment


def run(settings: PipelineSettings) -> Report:
    """Runs every stage and returns the report (also written to ``<out>/report.json``).

    Raises:
        PipelineError, OpenVLAError: when a stage fails.
    """
    # The fine-tuning stack (torch, peft, triton) before TensorFlow, which the dataset check loads:
    # importing them after TensorFlow in one process crashes (segmentation fault) with these wheels.
    import peft  # noqa: F401
    import torch

    import openvla_ros.finetune.trainer  # noqa: F401

    torch.set_num_threads(settings.threads)  # the result depends on it: fixed, and recorded in the report
    out = settings.out
    prepare_out_dir(out)
    log_dir = out / "logs"
    log_dir.mkdir()
    report = Report(settings={k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()})
    env = local_ros_environment()
    print(f"pipeline: task {settings.task}{' (camera upside down)' if settings.camera_upside_down else ''}, "
          f"{settings.episodes} demos, {settings.steps} steps, "
          f"{settings.eval_episodes} eval episodes; ROS_DOMAIN_ID={env['ROS_DOMAIN_ID']}; output {out}", flush=True)

    if not (settings.base / "config.json").is_file():
        with stage(report, "build_tiny", f"building the tiny checkpoint in {settings.base}"):
            from openvla_ros.model.tiny import make_tiny_checkpoint

            make_tiny_checkpoint(settings.base, seed=0)
    spec = base_spec(settings.base)
    oft = spec is not None
    if settings.energy_steps and not oft:
        raise PipelineError(f"--energy-steps refines OpenVLA-OFT chunks; {settings.base} is a token-by-token model "
                            f"(use an OFT base such as {DEFAULT_PRETRAINED}, or --energy-steps 0)")
    if settings.localises and not oft:
        raise PipelineError(f"--locate-weights trains beside an OpenVLA-OFT chunk head; {settings.base} is a "
                            "token-by-token model (use an OFT base, or --locate-weights 0,0)")

    with stage(report, "record", f"recording {settings.episodes} expert episodes through sim_scene"):
        recording = record_demonstrations(settings, out / "bags", log_dir, env)
    with stage(report, "convert", "converting the bags to RLDS"):
        report.dataset = convert(settings, recording["bags"], out / "data")
        report.dataset.update(bags=len(recording["bags"]), bag_megabytes=recording["megabytes"],
                              messages=recording["messages"], expert_steps=recording["expert_steps"],
                              expert_failures=recording["expert_failures"],
                              record_lanes=recording["lanes"])
    head = "L1 chunk head" if oft else "token head"
    if settings.localises:
        head += f", localisation losses {settings.locate_patch_weight:g},{settings.locate_point_weight:g}"
    adapted = f"LoRA rank {settings.lora_rank}" if settings.lora_rank else "every weight"
    with stage(report, "finetune", f"fine-tuning {settings.base} ({adapted}, {head})"):
        report.training = finetune(settings, spec, out / "data", out)
        report.files["training_curve"] = str(plot_training_curve(report.training["curve"],
                                                                 out / "training_curve.png"))
        if report.training.get("selection"):
            from openvla_ros.finetune.selection import plot_curve

            kept = report.training["selection"]["best"]
            print(f"  kept the weights of step {kept['step']}: {kept['successes']}/{kept['episodes']} validation "
                  "episodes", flush=True)
            report.files["selection_curve"] = str(plot_curve(
                {"fine-tuning": report.training["selection"]}, out / "selection_curve.png",
                f"fine-tuning: closed-loop validation ({settings.select_episodes} episodes)"))
    merged = out / "merged"
    from openvla_ros.sim.demos import write_sim_setup

    report.files["sim_setup"] = str(write_sim_setup(merged, settings.camera_upside_down))
    if settings.energy_steps:
        with stage(report, "energy", f"training the energy model ({settings.energy_train_steps} steps, VLA frozen)"):
            report.energy = train_energy(settings, merged, out / "data", out / "energy",
                                         report.training["train_samples"])
    with stage(report, "evaluate_offline", "offline evaluation (training/evaluate.py, val split)"):
        report.offline = offline_evaluation(settings, merged, out / "data", out / "evaluate_val.png", log_dir)
        report.files["evaluate_plot"] = report.offline["plot"]
    with stage(report, "closed_loop", f"closed loop on {settings.eval_episodes} fresh episodes (in process)"):
        report.closed_loop = closed_loop(settings, merged)
        report.files["trajectories"] = str(plot_trajectories(report.closed_loop, settings.task,
                                                             out / "trajectories.png"))
    if settings.node_episodes:
        with stage(report, "node_check", f"closed loop through sim_scene + policy_node ({settings.node_episodes} "
                   "episodes)"):
            report.node_check = node_check(settings, spec, merged, log_dir, env)
    report.determinism = determinism(settings)
    report.files["merged_model"] = str(merged)
    report.files["report"] = str(out / "report.json")
    (out / "report.json").write_text(json.dumps(asdict(report), indent=1))
    return report


def determinism(settings: PipelineSettings) -> dict[str, Any]:
    """What the run's result depends on besides its settings: versions, threads and every seed."""
    import platform

    import numpy
    import torch

    from openvla_ros.pipeline.settings import episode_seed_sets
    from openvla_ros.sim.localisation import heads_seed

    seeds: dict[str, Any] = {"training": settings.train_seed}
    if settings.localises:
        seeds["localisation_heads"] = heads_seed(settings.train_seed)
    seeds.update({name: f"({values[0][0]}, 0..{len(values) - 1})" if values else "none"
                  for name, values in episode_seed_sets(settings).items()})
    return {"torch": torch.__version__, "numpy": numpy.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "torch_threads": torch.get_num_threads(), "seeds": seeds}


def main(argv: list[str] | None = None) -> int:
    """Runs the pipeline; returns 0 when every stage ran, 1 when one failed, 2 on bad options."""
    args = build_parser().parse_args(argv)
    from openvla_ros.errors import OpenVLAError

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        settings = settings_from_args(args)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from openvla_ros.interrupts import interrupt_exit_status, interrupt_name, termination_as_interrupt

    try:
        with termination_as_interrupt():
            report = run(settings)
    except (PipelineError, OpenVLAError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interrupt:
        print(f"interrupted ({interrupt_name(interrupt)}): the child processes are stopped; {settings.out} holds a "
              "partial run and no report.json (the next run empties it)", file=sys.stderr)
        return interrupt_exit_status(interrupt)
    print(format_table(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
