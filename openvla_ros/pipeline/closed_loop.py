"""Closed-loop evaluation: in process against the sim, and through the real sim_scene and policy_node processes."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from openvla_ros.pipeline.processes import ChildProcess, RosSession, wait_for
from openvla_ros.pipeline.report import POLICY_RUNS, wilson_interval
from openvla_ros.pipeline.settings import (
    ENERGY_MAX_STEP_FRACTION,
    ENERGY_STEP_SIZE,
    REPO,
    SIM_NODE,
    PipelineError,
    PipelineSettings,
    WaitTimeoutError,
)


@dataclass
class EpisodeResult:
    """One closed-loop episode: outcome and the fingertips' x/y path."""

    seed: list[int]
    instruction: str
    success: bool
    steps: int
    final_distance_m: float
    path_xy: list[list[float]]
    target_xy: list[float]
    blocks: dict[str, list[float]]


def rollout(policy: Any, seed: tuple[int, ...], task: str, upside_down: bool = False) -> EpisodeResult:
    """Runs one closed-loop episode of ``policy`` in the pure-Python sim and returns its outcome.

    Each step renders the overhead camera exactly as the ``sim_scene`` node publishes it. A token
    policy is called once per step (``policy.predict_action(rgb, instruction)``, as the policy node
    does); an OFT policy predicts a chunk from the frame and the robot state the demonstrations record
    (as the node's chunk mode does with ``proprio_topic``), and its first half is applied before the next.
    ``upside_down``: the camera mounted rotated by 180 degrees (the sim's ``camera_upside_down``).
    """
    from openvla_ros.sim import CameraModel, TabletopRenderer, TabletopScene
    from openvla_ros.sim.demos import scene_state

    scene = TabletopScene()
    renderer = TabletopRenderer(CameraModel(upside_down=upside_down))
    episode = scene.reset(seed=seed, task=task)
    path = [scene.ee_position[:2].tolist()]
    state = scene.evaluate()
    chunked = hasattr(policy, "predict_chunk")
    while scene.status == "running":
        if chunked:
            proprio = scene_state(scene) if policy.proprio_dim else None
            chunk = policy.predict_chunk(renderer.render(scene), episode.instruction, proprio=proprio)
            actions = chunk[: max(1, policy.chunk_size // 2)]
        else:
            actions = [policy.predict_action(renderer.render(scene), episode.instruction)]
        for action in actions:
            state = scene.apply_action(action)
            path.append(scene.ee_position[:2].tolist())
            if scene.status != "running":
                break
    return EpisodeResult(
        seed=list(seed), instruction=episode.instruction, success=scene.status == "success", steps=state.steps,
        final_distance_m=round(float(state.goal_distance), 4), path_xy=path,
        target_xy=scene.blocks[episode.target].position[:2].tolist(),
        blocks={color: block.position[:2].tolist() for color, block in scene.blocks.items()},
    )


def closed_loop(settings: PipelineSettings, merged: Path) -> dict[str, Any]:
    """Evaluates the base and the fine-tuned model on the same fresh episodes.

    A token base un-normalises with the dataset's statistics, so both act in the same physical units;
    an OFT base keeps its own statistics (those of its pretraining data, in the same units). With
    ``energy_steps`` > 0 the fine-tuned OFT model runs the same episodes a second time with energy
    refinement on (``fine_tuned_energy``).
    """
    from openvla_ros.model.oft_policy import OFTPolicy, load_policy_auto

    tuned = load_policy_auto(str(merged), unnorm_key=settings.dataset_name, device="cpu",
                             center_crop=settings.image_aug)
    base = load_policy_auto(str(settings.base), device="cpu")
    if not isinstance(base, OFTPolicy):
        base.normalizer = tuned.normalizer
    seeds = [(settings.eval_seed, index) for index in range(settings.eval_episodes)]
    results: dict[str, Any] = {"seeds": [list(s) for s in seeds], "mode": "in-process",
                               "policy": "chunks (half of each applied)" if isinstance(tuned, OFTPolicy)
                               else "one action per step"}
    runs: dict[str, tuple[Any, int]] = {"base": (base, 0), "fine_tuned": (tuned, 0)}
    if settings.energy_steps:
        runs["fine_tuned_energy"] = (tuned, settings.energy_steps)
    for label, _ in POLICY_RUNS:
        if label not in runs:
            continue
        policy, energy_steps = runs[label]
        if isinstance(policy, OFTPolicy) and policy.energy_model is not None:
            policy.configure_energy(energy_steps, ENERGY_STEP_SIZE, ENERGY_MAX_STEP_FRACTION)
        start = time.monotonic()
        episodes = [rollout(policy, seed, settings.task, settings.camera_upside_down) for seed in seeds]
        steps = sum(e.steps for e in episodes)
        successes = sum(e.success for e in episodes)
        low, high = wilson_interval(successes, len(episodes))
        results[label] = {
            "success_rate": successes / len(episodes),
            "successes": successes,
            "ci95": [round(low, 3), round(high, 3)],
            "energy_steps": energy_steps,
            "episodes": [asdict(e) for e in episodes],
            "ms_per_step": round(1000 * (time.monotonic() - start) / max(1, steps), 1),
        }
        print(f"  {label:<17} success {successes}/{len(episodes)} (95% CI {100 * low:.0f}-{100 * high:.0f} %, "
              f"{results[label]['ms_per_step']} ms per step, in process)", flush=True)
    return results


def node_check(settings: PipelineSettings, spec: Any, merged: Path, log_dir: Path,
               env: dict[str, str]) -> dict[str, Any]:
    """Runs the fine-tuned model through the real ``sim_scene`` and ``policy_node`` processes.

    Episodes use seeds ``(eval_seed + 1, k)``, never recorded. ``spec`` is the OFT layout the model kept
    from its base (None for a token model). Returns per-episode outcomes.
    """
    from std_srvs.srv import SetBool, Trigger

    rate_hz = 5.0
    sim = ChildProcess("sim_scene_check", "openvla_ros.sim_scene_node", [
        "-p", f"task:={settings.task}", "-p", f"seed:={settings.eval_seed + 1}", "-p", "reset_on_start:=false",
        "-p", f"camera_upside_down:={str(settings.camera_upside_down).lower()}",
    ], log_dir, env)
    policy_args = ["--params-file", str(REPO / "config" / "policy.yaml"), "-p", f"model:={merged}",
                   "-p", f"unnorm_key:={settings.dataset_name}", "-p", f"rate_hz:={rate_hz}", "-p", "device:=cpu"]
    if settings.image_aug:
        policy_args += ["-p", "center_crop:=true"]
    if spec is not None and spec.proprio_dim:
        policy_args += ["-p", "proprio_topic:=/joint_states", "-p", "proprio_type:=joint_state"]
    policy = ChildProcess("policy_node_check", "openvla_ros.policy_node", policy_args, log_dir, env)

    def alive() -> None:
        sim.check_alive()
        policy.check_alive()

    session = RosSession("pipeline_node_check")
    episodes = []
    try:
        for episode in range(settings.node_episodes):
            reset = session.call(f"/{SIM_NODE}/reset", Trigger, Trigger.Request(), 60.0, alive)
            wait_for(lambda episode=episode: session.task_state.get("episode") == str(episode), 10.0,
                     f"the task state of episode {episode}", alive)
            enabled = session.call("/openvla_policy/enable", SetBool, SetBool.Request(data=True), 120.0, alive)
            if not enabled.success:
                raise PipelineError(f"the policy node refused to enable: {enabled.message}")
            try:
                wait_for(lambda episode=episode: session.task_state.get("episode") == str(episode)
                         and session.task_state.get("status") != "running",
                         90 / rate_hz + 30.0, f"the end of node episode {episode}", alive)
                stalled = ""
            except WaitTimeoutError as exc:
                # a stalled episode (the nodes alive, the sim starved of CPU) is a failure, not the end
                # of the run: everything before it is kept and the next episode starts afresh
                stalled = str(exc)
            session.call("/openvla_policy/enable", SetBool, SetBool.Request(data=False), 10.0, alive)
            state = dict(session.task_state)
            status = "stalled" if stalled else state.get("status")
            episodes.append({"instruction": reset.message, "status": status,
                             "steps": int(state.get("steps", 0)), "seed": [settings.eval_seed + 1, episode]})
            print(f"  node episode {episode}: {reset.message!r} -> {status} after {state.get('steps')} steps"
                  + (f" ({stalled}; counted as a failure)" if stalled else ""), flush=True)
    finally:
        session.close()
        policy.stop()
        sim.stop()
    successes = sum(e["status"] == "success" for e in episodes)
    return {"mode": f"sim_scene + policy_node over DDS at {rate_hz:g} Hz", "episodes": episodes,
            "successes": successes, "success_rate": successes / max(1, len(episodes))}
