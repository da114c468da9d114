"""The OFT policy on tiny checkpoints: chunks, inputs it refuses, save -> load."""

from __future__ import annotations

import numpy as np
import pytest

from openvla_ros.errors import ImageError
from openvla_ros.model.oft_policy import OFTPolicy, ProprioError, load_policy_auto
from openvla_ros.model.tiny_oft import make_tiny_oft_checkpoint


@pytest.fixture(scope="module")
def oft_dir(tmp_path_factory):
    return make_tiny_oft_checkpoint(tmp_path_factory.mktemp("oftp") / "m", chunk=3, proprio_dim=8, num_images=2)


def test_chunk_of_physical_actions_and_refused_inputs(oft_dir) -> None:
    policy = load_policy_auto(str(oft_dir))
    assert isinstance(policy, OFTPolicy)
    rng = np.random.default_rng(0)
    image, wrist = (rng.integers(0, 256, (96, 128, 3), dtype=np.uint8) for _ in range(2))
    chunk = policy.predict_chunk(image, "pick up the red block", [wrist], np.zeros(8))
    assert chunk.shape == (3, 7) and np.all(np.isfinite(chunk))
    other = policy.predict_chunk(image, "pick up the red block", [wrist], np.full(8, 1.0))
    assert np.abs(chunk - other).max() > 1e-6  # proprio reaches the head
    with pytest.raises(ImageError, match="wrist"):
        policy.predict_chunk(image, "pick up the red block", [], np.zeros(8))
    with pytest.raises(ProprioError, match="takes 8"):
        policy.predict_chunk(image, "pick up the red block", [wrist], np.zeros(5))
    with pytest.raises(ProprioError, match="not finite"):
        policy.predict_chunk(image, "pick up the red block", [wrist], np.full(8, np.nan))


def test_predict_command_prints_the_chunk(oft_dir, tmp_path) -> None:
    import json
    import subprocess
    import sys

    from PIL import Image

    rng = np.random.default_rng(1)
    paths = []
    for name in ("primary.png", "wrist.png"):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / name)
        paths.append(str(tmp_path / name))
    command = [sys.executable, "-m", "openvla_ros.predict", "--model", str(oft_dir), "--image", paths[0],
               "--instruction", "open the drawer", "--wrist-image", paths[1], "--proprio", ",".join(["-0.05"] + ["0.1"] * 7)]  # a negative first value, as its own word
    done = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    chunk = json.loads(done.stdout)
    assert len(chunk) == 3 and all(len(step) == 7 for step in chunk)
    missing = subprocess.run(command[:-4], capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "wrist" in missing.stderr


def test_a_token_checkpoint_is_not_taken_for_an_oft_one(tiny_checkpoint) -> None:
    from openvla_ros.model.policy import OpenVLAPolicy

    assert isinstance(load_policy_auto(str(tiny_checkpoint)), OpenVLAPolicy)
