"""A simulated tabletop: coloured blocks, an end effector driven by 7-DoF deltas, success checks.

Plain Python + numpy, no ROS. The world frame has x to the right, y away from the viewer (up in the
camera image) and z up, in metres; the table top is z = 0. The end effector is a parallel gripper seen
from above with a position (its fingertips), a yaw and an open/closed state. Actions are OpenVLA's
``[dx, dy, dz, droll, dpitch, dyaw, gripper]`` per step: the translation and yaw are integrated (roll
and pitch are ignored: the gripper always points down), and the gripper value is absolute, as in
Bridge and OpenVLA's datasets: above 0.5 opens, at or below closes.

The physics is kinematic and deliberately small:

- the fingertips stay inside the workspace box, and a held block never goes through the table or
  through a block below it;
- closing the gripper grasps the topmost block whose centre is within ``grasp_radius`` of the
  fingertips in x/y and whose side the fingertips are level with; the block is centred between the
  fingers and moves with them;
- opening drops a held block onto the highest surface under its centre (the table or a block top);
- the open gripper passes around blocks (it never pushes them).

Tasks and their success checks (see :meth:`TabletopScene.evaluate`):

- ``reach``: "move to the red block": fingertips within ``reach_tolerance`` of the block centre in x/y;
- ``pick``: "pick up the red block": the block held with its bottom at least ``lift_height`` up;
- ``stack``: "put the red block on the blue block": the block released and resting on the other one.

An episode's outcome is latched: once it succeeded it stays a success; after ``max_steps`` actions
without success it is a timeout. Actions are still applied after either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

TASKS = ("reach", "pick", "stack")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (210, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 200, 35),
}
ACTION_SIZE = 7
GRIPPER_OPEN_THRESHOLD = 0.5


class SceneError(ValueError):
    """A bad scene setting, task name or action."""


@dataclass(frozen=True)
class SceneConfig:
    """Geometry, limits and success tolerances of the tabletop (metres, radians, steps)."""

    # Workspace of the fingertips: x in [-x_half_extent, x_half_extent], same for y; z in [0, max_height].
    x_half_extent: float = 0.3
    y_half_extent: float = 0.225
    max_height: float = 0.3
    # Side of the cubic blocks.
    block_size: float = 0.04
    # Blocks on the table at the start of an episode (at most len(COLORS)).
    num_blocks: int = 3
    # Smallest distance between block centres, and between the start position and any block, in x/y.
    min_spacing: float = 0.09
    # Keep-out margin from the workspace edge for the initial block and gripper positions.
    margin: float = 0.05
    # Starting height of the fingertips.
    start_height: float = 0.12
    # Largest translation per axis applied in one step; larger commands are clipped.
    max_step_translation: float = 0.05
    # Largest yaw change applied in one step.
    max_step_rotation: float = 0.25
    # Closing grasps a block whose centre is this close to the fingertips in x/y.
    grasp_radius: float = 0.02
    # reach: fingertips this close to the block centre in x/y.
    reach_tolerance: float = 0.03
    # pick: the held block's bottom at least this high.
    lift_height: float = 0.08
    # stack: the top block's centre this close to the lower block's centre in x/y.
    stack_tolerance: float = 0.02
    # Steps (actions) after which an unsolved episode is a timeout, per task.
    max_steps: dict[str, int] = field(default_factory=lambda: {"reach": 60, "pick": 90, "stack": 150})

    def __post_init__(self) -> None:
        for name in ("x_half_extent", "y_half_extent", "max_height", "block_size", "min_spacing"):
            if not getattr(self, name) > 0:
                raise SceneError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not 1 <= self.num_blocks <= len(COLORS):
            raise SceneError(f"num_blocks must be within 1..{len(COLORS)}, got {self.num_blocks}")
        if 2 * self.margin >= min(self.x_half_extent, self.y_half_extent) * 2:
            raise SceneError(f"margin {self.margin} leaves no room in the workspace")
        unknown = set(self.max_steps) - set(TASKS)
        if unknown:
            raise SceneError(f"max_steps has unknown task(s) {sorted(unknown)}; tasks are {', '.join(TASKS)}")


@dataclass
class Block:
    """One block: its colour name and the position of the centre of its bottom face."""

    color: str
    position: np.ndarray

    def top(self, size: float) -> float:
        return float(self.position[2] + size)


@dataclass(frozen=True)
class Task:
    """What an episode asks for: the kind, the instruction, the block to act on and, for stack, the base."""

    kind: str
    instruction: str
    target: str
    base: str = ""


@dataclass(frozen=True)
class TaskState:
    """The sim's verdict after the latest step.

    Attributes:
        status: ``running``, ``success`` or ``timeout`` (latched until the next reset).
        steps: actions applied in this episode.
        max_steps: the step budget of the task.
        goal_distance: how far the scene is from success, in metres (0 once solved).
        solved_now: whether the success condition holds right now (it may stop holding after success).
    """

    status: str
    steps: int
    max_steps: int
    goal_distance: float
    solved_now: bool


def make_instruction(kind: str, target: str, base: str = "") -> str:
    """Returns the instruction of a task, e.g. ``put the red block on the blue block``.

    Raises:
        SceneError: for an unknown task kind or a stack task without a base.
    """
    if kind == "reach":
        return f"move to the {target} block"
    if kind == "pick":
        return f"pick up the {target} block"
    if kind == "stack":
        if not base:
            raise SceneError("a stack task needs a base block")
        return f"put the {target} block on the {base} block"
    raise SceneError(f"unknown task {kind!r}; tasks are {', '.join(TASKS)}")


class TabletopScene:
    """The tabletop's state, its kinematic physics and the success check of the current task."""

    def __init__(self, config: SceneConfig | None = None) -> None:
        self.config = config or SceneConfig()
        self.blocks: dict[str, Block] = {}
        self.ee_position = np.array([0.0, 0.0, self.config.start_height])
        self.ee_yaw = 0.0
        self.gripper_open = True
        self.held: str | None = None
        self.task: Task | None = None
        self.steps = 0
        self.status = "running"
        self._held_offset_z = 0.0

    # ------------------------------------------------------------------ episodes

    def reset(self, seed: int | tuple[int, ...] | None = None, task: str = "random") -> Task:
        """Starts a new episode with random block and gripper positions and a random task.

        Args:
            seed: seed (or seed sequence) of the episode; the same seed gives the same episode.
            task: ``reach``, ``pick``, ``stack`` or ``random`` (one of the three).

        Returns:
            The episode's task.

        Raises:
            SceneError: for an unknown task name.
        """
        if task != "random" and task not in TASKS:
            raise SceneError(f"unknown task {task!r}; choose one of {', '.join(TASKS)} or random")
        cfg = self.config
        rng = np.random.default_rng(seed)
        kind = str(rng.choice(TASKS)) if task == "random" else task
        colors = [str(c) for c in rng.choice(list(COLORS), size=cfg.num_blocks, replace=False)]
        if kind == "stack" and len(colors) < 2:
            raise SceneError("a stack task needs num_blocks >= 2")
        points = self._sample_points(rng, cfg.num_blocks + 1)
        self.blocks = {
            color: Block(color, np.array([x, y, 0.0]))
            for color, (x, y) in zip(colors, points[1:], strict=True)
        }
        self.ee_position = np.array([points[0][0], points[0][1], cfg.start_height])
        self.ee_yaw = 0.0
        self.gripper_open = True
        self.held = None
        self._held_offset_z = 0.0
        self.steps = 0
        self.status = "running"
        target, base = colors[0], (colors[1] if kind == "stack" else "")
        self.task = Task(kind, make_instruction(kind, target, base), target, base)
        return self.task

    def _sample_points(self, rng: np.random.Generator, count: int) -> list[tuple[float, float]]:
        """Returns ``count`` x/y points inside the margins, pairwise at least ``min_spacing`` apart."""
        cfg = self.config
        x_max, y_max = cfg.x_half_extent - cfg.margin, cfg.y_half_extent - cfg.margin
        for _ in range(1000):
            points = rng.uniform((-x_max, -y_max), (x_max, y_max), size=(count, 2))
            gaps = np.linalg.norm(points[:, None, :] - points[None, :, :], axis=-1)
            if np.all(gaps[np.triu_indices(count, 1)] >= cfg.min_spacing):
                return [(float(x), float(y)) for x, y in points]
        raise SceneError(f"cannot place {count} objects {cfg.min_spacing} m apart; enlarge the workspace")

    # ------------------------------------------------------------------ physics

    def apply_action(self, action: np.ndarray | list[float]) -> TaskState:
        """Applies one 7-DoF delta action and returns the task state after it.

        Translations are clipped to ``max_step_translation`` per axis and the workspace, the yaw change
        to ``max_step_rotation``; roll and pitch are ignored.

        Raises:
            SceneError: when the action does not have 7 finite values (nothing is applied).
        """
        values = np.asarray(action, dtype=np.float64).reshape(-1)
        if values.shape != (ACTION_SIZE,):
            raise SceneError(f"an action has {ACTION_SIZE} values, got {values.size}")
        if not np.all(np.isfinite(values)):
            raise SceneError(f"action has non-finite values: {values.tolist()}")
        cfg = self.config
        if self.task is None:
            self.reset()
        delta = np.clip(values[:3], -cfg.max_step_translation, cfg.max_step_translation)
        target = self.ee_position + delta
        target[0] = np.clip(target[0], -cfg.x_half_extent, cfg.x_half_extent)
        target[1] = np.clip(target[1], -cfg.y_half_extent, cfg.y_half_extent)
        target[2] = np.clip(target[2], 0.0, cfg.max_height)
        if self.held is not None:
            # The held block's bottom rests at most on the surface below it.
            floor = self.support_height(target[:2], exclude=self.held)
            target[2] = max(target[2], floor - self._held_offset_z)
        self.ee_position = target
        yaw_step = float(np.clip(values[5], -cfg.max_step_rotation, cfg.max_step_rotation))
        self.ee_yaw = math.remainder(self.ee_yaw + yaw_step, math.tau)
        if self.held is not None:
            self.blocks[self.held].position = self.ee_position + np.array([0.0, 0.0, self._held_offset_z])

        want_open = bool(values[6] > GRIPPER_OPEN_THRESHOLD)
        if want_open and not self.gripper_open:
            self._release()
        elif not want_open and self.gripper_open:
            self._grasp()
        self.gripper_open = want_open
        self.steps += 1
        return self.evaluate()

    def support_height(self, xy: np.ndarray, exclude: str | None = None) -> float:
        """Returns the height of the highest surface (table or block top) under the point ``xy``."""
        size = self.config.block_size
        height = 0.0
        for color, block in self.blocks.items():
            if color == exclude:
                continue
            if np.all(np.abs(block.position[:2] - np.asarray(xy)[:2]) <= size / 2):
                height = max(height, block.top(size))
        return height

    def _grasp(self) -> None:
        cfg = self.config
        tip = self.ee_position
        candidates = [
            block
            for block in self.blocks.values()
            if np.linalg.norm(block.position[:2] - tip[:2]) <= cfg.grasp_radius
            and block.position[2] <= tip[2] <= block.top(cfg.block_size)
        ]
        if not candidates:
            return
        block = max(candidates, key=lambda b: b.position[2])
        self.held = block.color
        self._held_offset_z = float(block.position[2] - tip[2])
        block.position = tip + np.array([0.0, 0.0, self._held_offset_z])

    def _release(self) -> None:
        if self.held is None:
            return
        block = self.blocks[self.held]
        block.position = np.array(
            [block.position[0], block.position[1], self.support_height(block.position, exclude=self.held)]
        )
        self.held = None

    # ------------------------------------------------------------------ success

    def evaluate(self) -> TaskState:
        """Returns the task state now, latching success and timeout into ``status``."""
        if self.task is None:
            return TaskState("running", 0, 0, math.inf, False)
        distance = self.goal_distance()
        solved = distance == 0.0
        budget = self.config.max_steps.get(self.task.kind, 100)
        if self.status == "running":
            if solved:
                self.status = "success"
            elif self.steps >= budget:
                self.status = "timeout"
        return TaskState(self.status, self.steps, budget, distance, solved)

    def goal_distance(self) -> float:
        """Returns how far (metres) the scene is from the task's success condition; 0.0 when it holds."""
        if self.task is None:
            return math.inf
        cfg = self.config
        target = self.blocks[self.task.target]
        if self.task.kind == "reach":
            gap = float(np.linalg.norm(self.ee_position[:2] - target.position[:2]))
            return 0.0 if gap <= cfg.reach_tolerance else gap - cfg.reach_tolerance
        if self.task.kind == "pick":
            if self.held != target.color:
                grasp_point = target.position + np.array([0.0, 0.0, cfg.block_size / 2])
                return float(np.linalg.norm(self.ee_position - grasp_point) + cfg.lift_height)
            return max(0.0, cfg.lift_height - float(target.position[2]))
        base = self.blocks[self.task.base]
        gap_xy = float(np.linalg.norm(target.position[:2] - base.position[:2]))
        gap_z = abs(float(target.position[2]) - base.top(cfg.block_size))
        resting = self.held != target.color and gap_xy <= cfg.stack_tolerance and gap_z < 1e-6
        if resting:
            return 0.0
        return max(gap_xy - cfg.stack_tolerance, 0.0) + gap_z + (cfg.block_size if self.held else 0.0) + 1e-3

    # ------------------------------------------------------------------ views

    def ee_quaternion(self) -> tuple[float, float, float, float]:
        """Returns the gripper orientation (x, y, z, w): pointing down (roll pi) and turned by the yaw."""
        half = self.ee_yaw / 2
        # Rz(yaw) * Rx(pi): the gripper's z axis points at the table.
        return (math.cos(half), math.sin(half), 0.0, 0.0)
