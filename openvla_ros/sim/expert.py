"""A scripted expert for the tabletop tasks: smooth 7-DoF delta actions, like a careful teleoperator.

The expert reads the scene's true state (no camera) and moves the fingertips along straight segments
with a speed that ramps up, cruises at ``max_speed`` metres per step and slows down near each waypoint,
so consecutive actions change gradually and never idle. Grasping and releasing take one step each.
The gripper value is absolute: 1.0 = open, 0.0 = closed (Bridge's convention, which OpenVLA's data
loader expects).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from openvla_ros.sim.scene import TabletopScene

OPEN = 1.0
CLOSED = 0.0
# Smallest translation of a moving step (metres): smaller ones would look like idle steps.
MIN_STEP = 1e-3


@dataclass(frozen=True)
class ExpertConfig:
    """Speeds and heights of the scripted expert (metres per step, metres)."""

    # Largest translation per step (OpenVLA's tiny demo statistics clip at 0.02 per axis).
    max_speed: float = 0.02
    # Largest change of the translation between consecutive steps (the smoothness).
    max_speed_change: float = 0.008
    # Clearance above the block tops when travelling.
    travel_clearance: float = 0.05
    # A waypoint counts as reached within this distance.
    tolerance: float = 0.003
    # Descend onto a grasp or place point once within this distance of it in x/y.
    descend_radius: float = 0.008
    # Yaw correction gain per step (the expert keeps the gripper square to the blocks).
    yaw_gain: float = 0.5
    # Standard deviation of the Gaussian noise added to each translation at full speed (metres), for
    # varied demonstrations; it shrinks with the speed so waypoints are still reached precisely.
    noise: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.max_speed <= 0.05:
            raise ValueError(f"max_speed must be in (0, 0.05] m per step, got {self.max_speed}")
        if not 0 < self.max_speed_change <= self.max_speed:
            raise ValueError(f"max_speed_change must be in (0, max_speed], got {self.max_speed_change}")
        if self.noise < 0:
            raise ValueError(f"noise must be >= 0, got {self.noise}")


class ScriptedExpert:
    """Computes the next demonstration action from the scene's state for the scene's current task."""

    def __init__(self, config: ExpertConfig | None = None, seed: int | None = None) -> None:
        self.config = config or ExpertConfig()
        self._rng = np.random.default_rng(seed)
        self._velocity = np.zeros(3)
        self._descending = False

    def reset(self, seed: int | tuple[int, ...] | None = None) -> None:
        """Forgets the previous motion (call at the start of each episode); reseeds the noise if given."""
        self._velocity = np.zeros(3)
        self._descending = False
        if seed is not None:
            self._rng = np.random.default_rng(seed)

    def act(self, scene: TabletopScene) -> np.ndarray:
        """Returns the next action ``[dx, dy, dz, 0, 0, dyaw, gripper]`` (float64[7]) for ``scene.task``.

        Raises:
            ValueError: when the scene has no task (call ``scene.reset`` first).
        """
        task = scene.task
        if task is None:
            raise ValueError("the scene has no task; call reset() first")
        waypoint, gripper = self._plan(scene)
        action = np.zeros(7)
        if waypoint is None:
            self._velocity = np.zeros(3)
        else:
            action[:3] = self._move_towards(scene.ee_position, waypoint)
        action[5] = float(np.clip(-self.config.yaw_gain * scene.ee_yaw, -0.1, 0.1))
        action[6] = gripper
        return action

    def settle(self, scene: TabletopScene) -> np.ndarray | None:
        """Returns the next action after the task succeeded, while the expert is still arriving; else None.

        A success check fires on the edge of its region (a reach within ``reach_tolerance`` of the
        block), often with the fingertips still moving. A demonstration cut there teaches a policy to stop
        on that edge. While the expert would keep moving towards its goal with the gripper as it is, this
        returns that step; once it comes to rest (a step under ``MIN_STEP``) or would open or close the
        gripper (a new phase of the task, e.g. grasping a stacked block again), it returns None.
        """
        if scene.status != "success":
            return None
        action = self.act(scene)
        gripper_now = OPEN if scene.gripper_open else CLOSED
        if action[6] != gripper_now or float(np.linalg.norm(action[:3])) < MIN_STEP:
            return None
        return action

    # ------------------------------------------------------------------ planning

    def _plan(self, scene: TabletopScene) -> tuple[np.ndarray | None, float]:
        """Returns (waypoint for the fingertips or None to stay put this step, gripper command)."""
        task = scene.task
        assert task is not None  # checked by act()
        cfg, scene_cfg = self.config, scene.config
        size = scene_cfg.block_size
        tip = scene.ee_position
        target = scene.blocks[task.target]
        # Height at which a held block's bottom (or the empty fingertips) clears every other block.
        travel_z = max(b.top(size) for b in scene.blocks.values() if b.color != scene.held)
        travel_z += cfg.travel_clearance

        if task.kind == "reach":
            goal = np.array([target.position[0], target.position[1], tip[2]])
            return goal, OPEN

        if scene.held != task.target:
            if not scene.gripper_open:
                return None, OPEN  # open first (one step)
            above = np.array([target.position[0], target.position[1], travel_z])
            grasp = target.position + np.array([0.0, 0.0, size / 2])
            return self._descend_and_act(tip, above, grasp, open_now=True, lift_first=scene_cfg.grasp_radius)

        # Holding the target block.
        offset_z = tip[2] - target.position[2]  # fingertips above the held block's bottom
        if task.kind == "pick":
            return np.array([tip[0], tip[1], scene_cfg.lift_height + 0.02 + offset_z]), CLOSED
        base = scene.blocks[task.base]
        above_base = np.array([base.position[0], base.position[1], travel_z + offset_z])
        place = np.array([base.position[0], base.position[1], base.top(size) + offset_z])
        return self._descend_and_act(tip, above_base, place, open_now=False, lift_first=size)

    def _descend_and_act(
        self, tip: np.ndarray, above: np.ndarray, goal: np.ndarray, open_now: bool, lift_first: float
    ) -> tuple[np.ndarray | None, float]:
        """Travels to ``above``, descends to ``goal`` and toggles the gripper there (grasp or release).

        ``open_now`` is the gripper state kept while moving; ``lift_first``: when lower than the travel
        height and further than this from the goal in x/y, rise vertically before crossing.
        """
        cfg = self.config
        keep = OPEN if open_now else CLOSED
        gap_xy = float(np.linalg.norm(tip[:2] - goal[:2]))
        # Hysteresis: once descending, small x/y drifts are corrected on the way down.
        radius = cfg.descend_radius * (2.5 if self._descending else 1.0)
        if gap_xy <= radius:
            self._descending = True
            arrived = abs(tip[2] - goal[2]) <= cfg.tolerance and gap_xy <= cfg.descend_radius
            if not arrived or np.linalg.norm(self._velocity) > cfg.max_speed_change:
                return goal, keep  # descend (or settle), correcting x/y on the way
            self._descending = False
            return None, CLOSED if open_now else OPEN  # grasp or release (one step)
        self._descending = False
        if tip[2] < above[2] - cfg.tolerance and gap_xy > lift_first:
            return np.array([tip[0], tip[1], above[2]]), keep
        return above, keep

    def _move_towards(self, position: np.ndarray, waypoint: np.ndarray) -> np.ndarray:
        """Returns a smooth step towards ``waypoint`` (speed changes of at most ``max_speed_change``)."""
        cfg = self.config
        error = waypoint - position
        distance = float(np.linalg.norm(error))
        if distance < 1e-9:
            self._velocity = np.zeros(3)
            return np.zeros(3)
        # Braking profile: n more steps of speeds n*a, (n-1)*a, ..., a cover a*n*(n+1)/2, so the speed
        # that still stops at the waypoint with speed changes of at most a per step is a*n.
        a = cfg.max_speed_change
        steps_left = (math.sqrt(1.0 + 8.0 * distance / a) - 1.0) / 2.0
        speed = min(cfg.max_speed, a * steps_left, distance)
        # Head for the waypoint without passing it along any axis, then limit the change of velocity.
        desired = np.clip(error / distance * speed, np.minimum(error, 0.0), np.maximum(error, 0.0))
        change = desired - self._velocity
        change_norm = float(np.linalg.norm(change))
        if change_norm > a:
            desired = self._velocity + change / change_norm * a
        if np.linalg.norm(desired) < MIN_STEP < distance:
            # Still turning round (e.g. after noise pushed the fingertips past the waypoint): head back.
            desired = error / distance * min(distance, a)
        self._velocity = desired
        step = desired
        if cfg.noise > 0:
            # Noise scaled by the speed: wobbly while cruising, precise near the waypoints.
            step = step + self._rng.normal(0.0, cfg.noise, size=3) * (np.linalg.norm(step) / cfg.max_speed)
        return np.clip(step, -cfg.max_speed, cfg.max_speed)
