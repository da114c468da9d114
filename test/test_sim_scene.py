"""The simulated tabletop without ROS: episodes, physics, success checks, camera and scripted expert."""

from __future__ import annotations

import math

import numpy as np
import pytest

from openvla_ros.sim import (
    COLORS,
    TASKS,
    CameraModel,
    ExpertConfig,
    SceneConfig,
    SceneError,
    ScriptedExpert,
    TabletopRenderer,
    TabletopScene,
)

SIZE = SceneConfig().block_size


def action(
    dx: float = 0.0, dy: float = 0.0, dz: float = 0.0, dyaw: float = 0.0, gripper: float = 1.0
) -> list:
    return [dx, dy, dz, 0.0, 0.0, dyaw, gripper]


def place_gripper(scene: TabletopScene, x: float, y: float, z: float) -> None:
    scene.ee_position = np.array([x, y, z])


def scene_with(task: str, seed: int = 0) -> TabletopScene:
    scene = TabletopScene()
    scene.reset(seed=seed, task=task)
    return scene


# ---------------------------------------------------------------------------------------- episodes


def test_reset_is_deterministic_per_seed_and_varies_across_seeds() -> None:
    first, again, other = TabletopScene(), TabletopScene(), TabletopScene()
    task = first.reset(seed=(4, 2))
    assert again.reset(seed=(4, 2)) == task
    for color, block in first.blocks.items():
        np.testing.assert_array_equal(block.position, again.blocks[color].position)
    other.reset(seed=(4, 3))
    assert any(
        color not in other.blocks or not np.allclose(block.position, other.blocks[color].position)
        for color, block in first.blocks.items()
    )


def test_reset_places_blocks_apart_inside_the_workspace_with_matching_instructions() -> None:
    cfg = SceneConfig()
    kinds = set()
    for seed in range(60):
        scene = TabletopScene()
        task = scene.reset(seed=seed)
        kinds.add(task.kind)
        assert len(scene.blocks) == cfg.num_blocks and set(scene.blocks) <= set(COLORS)
        points = [b.position[:2] for b in scene.blocks.values()] + [scene.ee_position[:2]]
        for i, p in enumerate(points):
            assert abs(p[0]) <= cfg.x_half_extent - cfg.margin and abs(p[1]) <= cfg.y_half_extent - cfg.margin
            for q in points[i + 1 :]:
                assert np.linalg.norm(p - q) >= cfg.min_spacing
        assert task.target in scene.blocks and task.target in task.instruction
        if task.kind == "stack":
            assert task.instruction == f"put the {task.target} block on the {task.base} block"
            assert task.base in scene.blocks and task.base != task.target
        elif task.kind == "reach":
            assert task.instruction == f"move to the {task.target} block"
        else:
            assert task.instruction == f"pick up the {task.target} block"
        assert scene.evaluate().status == "running" and scene.goal_distance() > 0
    assert kinds == set(TASKS)


def test_unknown_task_and_bad_config_are_rejected() -> None:
    with pytest.raises(SceneError, match="unknown task 'juggle'"):
        TabletopScene().reset(seed=0, task="juggle")
    with pytest.raises(SceneError, match="num_blocks"):
        SceneConfig(num_blocks=9)


# ---------------------------------------------------------------------------------------- physics


def test_actions_integrate_translation_and_yaw_and_ignore_roll_and_pitch() -> None:
    scene = scene_with("reach")
    start = scene.ee_position.copy()
    scene.apply_action([0.01, -0.02, 0.005, 0.3, -0.3, 0.1, 1.0])
    np.testing.assert_allclose(scene.ee_position, start + [0.01, -0.02, 0.005])
    assert scene.ee_yaw == pytest.approx(0.1)
    assert scene.steps == 1


def test_large_steps_are_clipped_per_axis_and_to_the_workspace() -> None:
    cfg = SceneConfig()
    scene = scene_with("reach")
    start = scene.ee_position.copy()
    scene.apply_action(action(dx=1.0, dy=-1.0, dz=0.0, dyaw=2.0))
    np.testing.assert_allclose(
        scene.ee_position[:2], start[:2] + [cfg.max_step_translation, -cfg.max_step_translation]
    )
    assert scene.ee_yaw == pytest.approx(cfg.max_step_rotation)
    for _ in range(40):
        scene.apply_action(action(dx=0.05, dz=-0.05))
    assert scene.ee_position[0] == pytest.approx(cfg.x_half_extent)
    assert scene.ee_position[2] == 0.0


def test_bad_actions_raise_and_change_nothing() -> None:
    scene = scene_with("reach")
    before = scene.ee_position.copy()
    with pytest.raises(SceneError, match="7 values"):
        scene.apply_action([0.01, 0.0, 0.0])
    with pytest.raises(SceneError, match="non-finite"):
        scene.apply_action(action(dx=math.nan))
    np.testing.assert_array_equal(scene.ee_position, before)
    assert scene.steps == 0


def test_closing_over_a_block_grasps_it_and_the_block_follows() -> None:
    scene = scene_with("pick")
    block = scene.blocks[scene.task.target]
    x, y = block.position[:2]
    place_gripper(scene, x + 0.01, y - 0.005, SIZE / 2)
    scene.apply_action(action(gripper=0.0))
    assert scene.held == block.color and not scene.gripper_open
    np.testing.assert_allclose(block.position, [x + 0.01, y - 0.005, 0.0])  # centred between the fingers
    scene.apply_action(action(dx=0.02, dz=0.03, gripper=0.0))
    np.testing.assert_allclose(block.position, [x + 0.03, y - 0.005, 0.03])


def test_closing_away_from_blocks_or_above_them_grasps_nothing() -> None:
    scene = scene_with("pick")
    block = scene.blocks[scene.task.target]
    place_gripper(scene, block.position[0] + 0.03, block.position[1], SIZE / 2)
    scene.apply_action(action(gripper=0.0))
    assert scene.held is None
    scene.apply_action(action(gripper=1.0))
    place_gripper(scene, block.position[0], block.position[1], SIZE + 0.01)
    scene.apply_action(action(gripper=0.0))
    assert scene.held is None


def test_a_held_block_stops_on_the_table_and_on_other_blocks() -> None:
    scene = scene_with("stack")
    top, base = scene.blocks[scene.task.target], scene.blocks[scene.task.base]
    place_gripper(scene, *top.position[:2], 0.01)
    scene.apply_action(action(gripper=0.0))
    scene.apply_action(action(dz=-0.05, gripper=0.0))
    assert top.position[2] == 0.0  # pressed against the table: stays on it
    place_gripper(scene, *base.position[:2], 0.2)
    scene.apply_action(action(gripper=0.0))  # moves the held block over the base
    for _ in range(10):
        scene.apply_action(action(dz=-0.05, gripper=0.0))
    assert top.position[2] == pytest.approx(SIZE)  # rests on the base, not inside it


def test_released_blocks_drop_onto_the_highest_surface_below() -> None:
    scene = scene_with("stack")
    top, base = scene.blocks[scene.task.target], scene.blocks[scene.task.base]
    place_gripper(scene, *top.position[:2], 0.01)
    scene.apply_action(action(gripper=0.0))
    place_gripper(scene, base.position[0] + 0.01, base.position[1], 0.15)
    scene.apply_action(action(gripper=0.0))
    assert top.position[2] > 0.1
    scene.apply_action(action(gripper=1.0))
    assert scene.held is None
    assert top.position[2] == pytest.approx(SIZE)
    np.testing.assert_allclose(top.position[:2], base.position[:2] + [0.01, 0.0])
    # Released over bare table: it falls to the table.
    place_gripper(scene, *top.position[:2], SIZE + 0.01)
    scene.apply_action(action(gripper=0.0))
    place_gripper(scene, 0.0, 0.0, 0.15)
    scene.apply_action(action(gripper=0.0))
    if scene.support_height(np.zeros(2), exclude=top.color) == 0.0:
        scene.apply_action(action(gripper=1.0))
        assert top.position[2] == 0.0


# ---------------------------------------------------------------------------------------- success


def test_reach_succeeds_within_tolerance_only_and_latches() -> None:
    cfg = SceneConfig()
    scene = scene_with("reach")
    target = scene.blocks[scene.task.target]
    place_gripper(scene, target.position[0] + cfg.reach_tolerance + 0.012, target.position[1], 0.1)
    state = scene.apply_action(action())
    assert state.status == "running" and not state.solved_now
    assert state.goal_distance == pytest.approx(0.012)
    state = scene.apply_action(action(dx=-0.02))
    assert state.status == "success" and state.solved_now and state.goal_distance == 0.0
    state = scene.apply_action(action(dx=0.05))
    assert state.status == "success" and not state.solved_now


def test_episodes_time_out_after_their_step_budget() -> None:
    scene = TabletopScene(SceneConfig(max_steps={"reach": 5}))
    scene.reset(seed=1, task="reach")
    target = scene.blocks[scene.task.target]
    statuses = [scene.apply_action(action(dz=0.001)).status for _ in range(5)]
    assert statuses == ["running"] * 4 + ["timeout"]
    place_gripper(scene, *target.position[:2], 0.1)
    assert scene.apply_action(action()).status == "timeout"  # too late: the outcome is latched


def test_pick_succeeds_when_the_block_is_lifted_high_enough() -> None:
    cfg = SceneConfig()
    scene = scene_with("pick")
    block = scene.blocks[scene.task.target]
    place_gripper(scene, *block.position[:2], SIZE / 2)
    assert scene.apply_action(action(gripper=0.0)).status == "running"
    place_gripper(scene, *block.position[:2], SIZE / 2 + cfg.lift_height - 0.02)
    assert scene.apply_action(action(gripper=0.0)).status == "running"
    assert scene.apply_action(action(dz=0.021, gripper=0.0)).status == "success"


def test_stack_succeeds_only_once_released_on_the_base() -> None:
    scene = scene_with("stack")
    top, base = scene.blocks[scene.task.target], scene.blocks[scene.task.base]
    place_gripper(scene, *top.position[:2], 0.01)
    scene.apply_action(action(gripper=0.0))
    place_gripper(scene, *base.position[:2], 0.2)
    scene.apply_action(action(gripper=0.0))
    for _ in range(10):
        state = scene.apply_action(action(dz=-0.05, gripper=0.0))
    assert state.status == "running"  # on the base but still held
    assert scene.apply_action(action(gripper=1.0)).status == "success"


def test_stack_fails_when_released_beside_the_base() -> None:
    scene = scene_with("stack")
    top, base = scene.blocks[scene.task.target], scene.blocks[scene.task.base]
    place_gripper(scene, *top.position[:2], 0.01)
    scene.apply_action(action(gripper=0.0))
    place_gripper(scene, base.position[0] + SIZE * 0.6, base.position[1], 0.2)
    scene.apply_action(action(gripper=0.0))
    state = scene.apply_action(action(gripper=1.0))
    assert state.status == "running" and top.position[2] == 0.0


# ---------------------------------------------------------------------------------------- camera


def colour_mask(image: np.ndarray, color: str) -> np.ndarray:
    return np.all(image == np.array(COLORS[color], np.uint8), axis=-1)


def test_camera_shows_blocks_where_they_are_and_the_gripper_moving() -> None:
    scene = scene_with("pick", seed=3)
    renderer = TabletopRenderer()
    image = renderer.render(scene)
    assert image.shape == (480, 640, 3) and image.dtype == np.uint8
    for color, block in scene.blocks.items():
        u, v = renderer.world_to_pixel(*block.position[:2], SIZE)
        ys, xs = np.nonzero(colour_mask(image, color))
        assert len(xs) > 300, color
        assert abs(xs.mean() - u) < 3 and abs(ys.mean() - v) < 3, color
    scene.apply_action(action(dx=0.05))
    moved = renderer.render(scene)
    changed = np.any(moved != image, axis=-1)
    assert changed.sum() > 500
    ys, xs = np.nonzero(changed)
    u, _ = renderer.world_to_pixel(*scene.ee_position)
    assert xs.min() < u < xs.max() + 1


def test_a_lifted_block_looks_bigger() -> None:
    scene = scene_with("pick", seed=5)
    block = scene.blocks[scene.task.target]
    renderer = TabletopRenderer()

    def width_px() -> int:
        _, xs = np.nonzero(colour_mask(renderer.render(scene), block.color))
        return int(xs.max() - xs.min() + 1)

    on_table = width_px()
    place_gripper(scene, *block.position[:2], SIZE / 2)
    scene.apply_action(action(gripper=0.0))
    scene.apply_action(action(dz=0.05, gripper=0.0))
    scene.apply_action(action(dz=0.05, gripper=0.0))
    assert block.position[2] == pytest.approx(0.1)
    assert width_px() > on_table * 1.08  # 10 cm closer to a camera 1 m up: about 11% wider


# ---------------------------------------------------------------------------------------- expert


def run_expert_episode(task: str, index: int, noise: float) -> tuple[TabletopScene, list[np.ndarray]]:
    scene = TabletopScene()
    scene.reset(seed=(7, index), task=task)
    expert = ScriptedExpert(ExpertConfig(noise=noise), seed=index)
    actions = []
    while scene.status == "running":
        act = expert.act(scene)
        moved = np.linalg.norm(act[:3]) > 1e-4
        toggles = (act[6] > 0.5) != scene.gripper_open
        assert moved or toggles, f"idle step in {task} episode {index} at step {scene.steps}"
        actions.append(act)
        scene.apply_action(act)
    return scene, actions


@pytest.mark.parametrize("task", TASKS)
def test_scripted_expert_solves_its_tasks(task: str) -> None:
    episodes = 40
    limits = np.array([0.02, 0.02, 0.02, 0.1, 0.1, 0.1])
    solved = 0
    for index in range(episodes):
        scene, actions = run_expert_episode(task, index, noise=0.002)
        for act in actions:
            assert np.all(np.abs(act[:6]) <= limits + 1e-12) and act[6] in (0.0, 1.0)
        solved += scene.status == "success"
    assert solved / episodes >= 0.95, f"{task}: {solved}/{episodes}"


@pytest.mark.parametrize("task", TASKS)
def test_scripted_expert_moves_smoothly(task: str) -> None:
    max_change = ExpertConfig().max_speed_change
    for index in range(20):
        scene, actions = run_expert_episode(task, index, noise=0.0)
        assert scene.status == "success"
        translations = np.array([np.zeros(3), *(act[:3] for act in actions)])  # starts at rest
        changes = np.linalg.norm(np.diff(translations, axis=0), axis=1)
        assert changes.max() <= max_change + 1e-9, (
            f"{task} episode {index}: jump of {changes.max():.4f} m/step"
        )


def test_after_a_reach_the_expert_settles_on_the_block_centre_then_stops() -> None:
    tolerance = TabletopScene().config.reach_tolerance
    settled = []
    for index in range(20):
        scene = TabletopScene()
        scene.reset(seed=(7, index), task="reach")
        expert = ScriptedExpert(ExpertConfig(noise=0.002), seed=index)
        while scene.status == "running":
            scene.apply_action(expert.act(scene))
        target = scene.blocks[scene.task.target].position[:2]
        at_success = float(np.linalg.norm(scene.ee_position[:2] - target))
        steps = 0
        while (action := expert.settle(scene)) is not None:
            assert steps < 15, f"episode {index}: the expert never came to rest"
            assert action[6] == 1.0 and np.linalg.norm(action[:3]) <= ExpertConfig().max_speed * np.sqrt(3)
            scene.apply_action(action)
            steps += 1
        final = float(np.linalg.norm(scene.ee_position[:2] - target))
        assert scene.status == "success" and final < 0.005, (index, at_success, final)
        settled.append((at_success, steps))
    assert np.mean([d for d, _ in settled]) > tolerance / 3, "successes fire on the edge of the region"
    assert all(1 <= steps <= 8 for _, steps in settled), settled


def test_the_expert_does_not_settle_while_running_or_into_a_new_gripper_phase() -> None:
    scene = TabletopScene()
    scene.reset(seed=(7, 0), task="reach")
    assert ScriptedExpert().settle(scene) is None, "an episode still running is not settled"
    # After a stack the expert's next step would close the gripper on the block again: no settling.
    scene, _ = run_expert_episode("stack", 0, noise=0.0)
    assert scene.status == "success" and scene.gripper_open
    assert ScriptedExpert().settle(scene) is None


def test_expert_refuses_a_scene_without_a_task() -> None:
    with pytest.raises(ValueError, match="no task"):
        ScriptedExpert().act(TabletopScene())


def test_an_upside_down_camera_sees_the_scene_rotated_by_180_degrees() -> None:
    scene = TabletopScene()
    scene.reset(seed=(2, 7), task="reach")
    upright = TabletopRenderer().render(scene)
    camera = CameraModel(upside_down=True)
    rotated = TabletopRenderer(camera).render(scene)
    height, width = upright.shape[:2]
    for color in scene.blocks:
        top = np.array(COLORS[color])
        centres = []
        for image in (upright, rotated):
            rows, cols = np.nonzero(np.all(image == top, axis=-1))
            assert rows.size > 50, f"the {color} block's top is visible"
            centres.append((cols.mean(), rows.mean()))
        (u, v), (u_rotated, v_rotated) = centres
        assert abs(u_rotated - (width - 1 - u)) <= 1.5 and abs(v_rotated - (height - 1 - v)) <= 1.5
    x, y, _ = scene.ee_position
    assert camera.project(x, y, 0.0) == pytest.approx((width - CameraModel().project(x, y, 0.0)[0],
                                                       height - CameraModel().project(x, y, 0.0)[1]))
