"""A guard against train/inference mismatch: a cue any working chain must learn, through every stage.

Camera frames (wide, 2:1) hold one large square in their outer left or right quarter: its side sets
dx and its colour (red or blue) the gripper. Episodes are written as rosbag2 bags (half rgb8, half
bgr8, as cameras deliver), converted by the converter, fine-tuned by the trainer (the OFT L1 head,
which learns this in a few hundred steps), and the merged model is asked through the node's image
path (a ``sensor_msgs/Image`` decoded by the node's conversion, then the policy) and through the
real node over DDS. Each mismatch a chain can have (a mirrored or rotated image, swapped channels,
another resize, another dataset's statistics) is then injected into the inference side alone, and
each must break the check: so the check would catch it. (A vertical-only flip is not covered: the cue
has no vertical part, which the tiny model does not learn reliably in seconds.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from openvla_ros.dataset import convert_bags
from openvla_ros.dataset.config import config_from_mapping
from openvla_ros.dataset.synthetic import write_episode_bag
from openvla_ros.finetune.config import FinetuneConfig
from openvla_ros.finetune.trainer import run_finetune
from openvla_ros.model.oft_policy import OFTPolicy

NAME = "cue_guard"
WIDTH, HEIGHT, SIDE = 256, 128, 40
STEP = 0.04
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}
CUES = [(left, colour) for left in (True, False) for colour in COLOURS]
INSTRUCTION = "follow the square"
STEPS = 450


def cue_frame(left: bool, colour: str, rng: np.random.Generator) -> np.ndarray:
    """A grey 2:1 frame with one square in the outer quarter of its side, at a random height."""
    frame = np.clip(rng.normal(110, 6, size=(HEIGHT, WIDTH, 3)), 0, 255).astype(np.uint8)
    x = int(rng.integers(4, 16)) if left else WIDTH - SIDE - int(rng.integers(4, 16))
    y = int(rng.integers(2, HEIGHT - SIDE - 2))
    frame[y:y + SIDE, x:x + SIDE] = COLOURS[colour]
    return frame


def cue_action(left: bool, colour: str) -> np.ndarray:
    """dx towards the square's side, gripper open for red."""
    return np.array([STEP if left else -STEP, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0 if colour == "red" else 0.0])


@pytest.fixture(scope="module")
def merged(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("guard")
    rng = np.random.default_rng(0)
    bags = []
    for episode in range(24):
        cue = CUES[episode % len(CUES)]
        images = [cue_frame(*cue, rng) for _ in range(5)]
        actions = [cue_action(*cue) for _ in images]
        encoding = "bgr8" if episode % 2 else "rgb8"
        bags.append(write_episode_bag(root / "bags" / f"ep_{episode:02d}", images, actions, INSTRUCTION,
                                      encoding=encoding))
    config = config_from_mapping({
        "topics": {"image": "/camera/image_raw", "action": "/teleop/action", "instruction": "/instruction"},
        "conversion": {"rate_hz": 10.0, "action_aggregate": "last", "val_fraction": 0.0},
    })
    convert_bags(bags, root / "data", NAME, config)
    out = root / "run"
    # Two torch threads whatever the worker's setting: the thread count changes the floating-point order,
    # and this short run learns the left/right cue with two (the order the check was set up with) but not
    # always with one. The check is of the chain, so its training is kept fixed. At 3e-3 the loss jumped
    # mid-run and seed 1 missed the left/right cue for red on another VM (seeds 0 and 2 learned it); at
    # 1e-3 seeds 0, 1 and 2 with two threads and 0 and 1 with one all learn it.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_finetune(FinetuneConfig(
            vla_path=str(tiny_checkpoint), data_dir=str(root / "data"), dataset_name=NAME, out=str(out),
            max_steps=STEPS, batch_size=8, learning_rate=1e-3, lora_rank=16, save_steps=STEPS, eval_steps=0,
            log_steps=50, image_aug=False, device="cpu", seed=1, action_head="l1", chunk=2,
        ))
    finally:
        torch.set_num_threads(threads)
    return out / "merged"


def _image_message(frame: np.ndarray, encoding: str):
    from sensor_msgs.msg import Image

    pixels = frame[..., ::-1] if encoding == "bgr8" else frame
    return Image(height=frame.shape[0], width=frame.shape[1], encoding=encoding, step=frame.shape[1] * 3,
                 data=np.ascontiguousarray(pixels).tobytes())


def node_image_path(frame: np.ndarray, encoding: str = "bgr8") -> np.ndarray:
    """The frame as the node receives it from a camera publishing ``encoding`` and decodes it."""
    from openvla_ros.ros.ros_conversions import image_to_rgb

    return image_to_rgb(_image_message(frame, encoding), backend="numpy")


def wrong_cues(predict, seed: int = 5) -> list[str]:
    """Returns the cues whose predicted action does not follow them (empty when the chain works)."""
    rng = np.random.default_rng(seed)
    wrong = []
    for cue in CUES:
        action = predict(cue_frame(*cue, rng))
        target = cue_action(*cue)
        if not (abs(action[0] - target[0]) < STEP / 2 and (action[6] > 0.5) == (target[6] > 0.5)):
            wrong.append(f"{cue}: predicted dx, gripper {np.round(action[[0, 6]], 3).tolist()}, "
                         f"wanted {target[[0, 6]].tolist()}")
    return wrong


def _policy(directory: Path, **kwargs) -> OFTPolicy:
    return OFTPolicy.from_pretrained(str(directory), device="cpu", **kwargs)


def test_the_fine_tuned_model_follows_the_cue_through_the_nodes_image_path(merged: Path) -> None:
    policy = _policy(merged, unnorm_key=NAME)
    for encoding in ("bgr8", "rgb8"):
        wrong = wrong_cues(lambda frame, e=encoding: policy.predict_action(node_image_path(frame, e), INSTRUCTION))
        assert not wrong, f"{encoding}: {wrong}"


def _copy(merged: Path, tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    shutil.copytree(merged, target)
    return target


def _with_preprocessor(merged: Path, tmp_path: Path, **changes) -> Path:
    """A copy of the model whose preprocessor file has ``changes``; the ``tvf_*`` fields, which the
    official processor applies in preference, are dropped so that the changed fields take effect."""
    target = _copy(merged, tmp_path, "resized")
    path = target / "preprocessor_config.json"
    data = {key: value for key, value in json.loads(path.read_text()).items() if not key.startswith("tvf_")}
    data.update(changes)
    path.write_text(json.dumps(data))
    return target


def _with_other_statistics(merged: Path, tmp_path: Path) -> Path:
    target = _copy(merged, tmp_path, "other_stats")
    path = target / "config.json"
    data = json.loads(path.read_text())
    other = json.loads(json.dumps(data["norm_stats"][NAME]))
    other["action"]["q01"] = [-0.2] * 6 + [0.0]
    other["action"]["q99"] = [0.2] * 6 + [1.0]
    data["norm_stats"]["other_robot"] = other
    path.write_text(json.dumps(data))
    return target


MISMATCHES = ("horizontal flip", "rotated 180 degrees", "channels swapped", "centre crop instead of resize",
              "another dataset's statistics")


@pytest.mark.parametrize("mismatch", MISMATCHES)
def test_each_mismatch_on_the_inference_side_breaks_the_check(merged: Path, tmp_path: Path, mismatch: str) -> None:
    policy = _policy(merged, unnorm_key=NAME)
    if mismatch == "horizontal flip":
        def predict(frame):
            return policy.predict_action(node_image_path(frame)[:, ::-1], INSTRUCTION)
    elif mismatch == "rotated 180 degrees":
        rotated = _policy(merged, unnorm_key=NAME, rotate_180=True)

        def predict(frame):
            return rotated.predict_action(node_image_path(frame), INSTRUCTION)
    elif mismatch == "channels swapped":
        def predict(frame):  # a bgr8 camera whose messages claim rgb8
            message = _image_message(frame, "bgr8")
            message.encoding = "rgb8"
            from openvla_ros.ros.ros_conversions import image_to_rgb

            return policy.predict_action(image_to_rgb(message, backend="numpy"), INSTRUCTION)
    elif mismatch == "centre crop instead of resize":
        cropped = _policy(_with_preprocessor(merged, tmp_path, image_resize_strategy="resize-crop"), unnorm_key=NAME)

        def predict(frame):
            return cropped.predict_action(node_image_path(frame), INSTRUCTION)
    else:
        other = _policy(_with_other_statistics(merged, tmp_path), unnorm_key="other_robot")

        def predict(frame):
            return other.predict_action(node_image_path(frame), INSTRUCTION)
    wrong = wrong_cues(predict)
    assert len(wrong) >= len(CUES) // 2, f"{mismatch} went unnoticed: only {wrong} wrong"


def test_the_real_node_over_dds_follows_the_cue_from_a_bgr8_camera(merged: Path, tmp_path: Path) -> None:
    import rclpy  # noqa: F401  (after conftest's DDS isolation)
    from policy_helpers import Driver, start_node, wait_active
    from ros_helpers import spinning_node, wait_until

    name = "policy_guard"
    node_process = start_node(name, tmp_path, f"model:={merged}", f"unnorm_key:={NAME}", "device:=cpu",
                              "image_topic:=/guard/camera", "instruction_topic:=/guard/instruction", "rate_hz:=5.0")
    with spinning_node("guard_driver") as ros_node:
        driver = Driver(ros_node, name, "/guard/camera", "/guard/instruction", compressed=False)
        rng = np.random.default_rng(9)
        try:
            wait_active(driver, node_process)
            wait_until(lambda: driver.camera.publisher.get_subscription_count() > 0, 60, "the image subscription")
            driver.instruct(INSTRUCTION)
            assert driver.enable(True).success
            for cue in ((True, "red"), (False, "blue")):
                frame = cue_frame(*cue, rng)
                driver.camera.pixels = np.ascontiguousarray(frame[..., ::-1])  # sent as bgr8 bytes below
                driver.camera.encoding = "bgr8"
                driver.camera.mode = "good"
                switched = driver.wait_for_actions(1)
                driver.wait_for_actions(10)
                # the early actions come from chunks planned before the switch (queued, and from frames
                # still in flight); a zero delta is a stop (e.g. a frame late on a busy machine), not a
                # prediction: the last three moving actions are the new frame's
                after = [np.array(a.data) for _, a in driver.actions.since(switched)]
                moving = [a for a in after if np.any(a[:3] != 0.0)][-3:]
                assert moving, f"{cue}: only stops after the switch; log:\n{node_process.log()[-2000:]}"
                latest = np.median(np.stack(moving), axis=0)
                target = cue_action(*cue)
                assert abs(latest[0] - target[0]) < STEP / 2 and (latest[6] > 0.5) == (target[6] > 0.5), (
                    f"{cue}: the node published {np.round(np.stack(after), 3).tolist()}; "
                    f"log:\n{node_process.log()[-2000:]}"
                )
        finally:
            driver.camera.mode = "stopped"
            assert node_process.stop() == 0, node_process.log()[-3000:]
