"""The one-shot command line: output format and one clear error per bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from openvla_ros.predict import main


@pytest.fixture(scope="module")
def image_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("images") / "frame.png"
    pixels = np.random.default_rng(0).integers(0, 256, size=(120, 160, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "openvla_ros.predict", *args],
        capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})},
    )


def test_cli_prints_seven_numbers_as_json(tiny_checkpoint: Path, image_file: Path) -> None:
    result = _run("--model", str(tiny_checkpoint), "--image", str(image_file),
                  "--instruction", "pick up the red block", "--json", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    values = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(values) == 7 and all(isinstance(v, float) for v in values)
    assert all(abs(v) <= 0.1 + 1e-9 for v in values[:6])


def test_cli_plain_output_names_each_dimension(tiny_checkpoint: Path, image_file: Path, capsys) -> None:
    code = main(["--model", str(tiny_checkpoint), "--image", str(image_file), "--instruction", "open the drawer",
                 "--center-crop", "--quantization", "4bit", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0
    names = [field.split("=")[0] for field in out.split()]
    assert names == ["dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image", "missing.png"], "image file missing.png not found"),
        (["--instruction", "  "], "instruction is empty"),
        (["--unnorm-key", "bridge_orig"], "unnorm_key 'bridge_orig' not found; available keys: tiny_demo"),
    ],
)
def test_cli_bad_input_gets_one_error_line(
    tiny_checkpoint: Path, image_file: Path, capsys, args: list[str], message: str
) -> None:
    base = {"--model": str(tiny_checkpoint), "--image": str(image_file), "--instruction": "pick up the cup"}
    base.update(dict(zip(args[::2], args[1::2], strict=True)))
    code = main([item for pair in base.items() for item in pair] + ["--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_cli_corrupt_image_file(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    code = main(["--model", str(tiny_checkpoint), "--image", str(bad), "--instruction", "pick up the cup"])
    assert code == 2 and "not a readable image" in capsys.readouterr().err


def test_cli_hub_id_offline_without_cache(image_file: Path, tmp_path: Path) -> None:
    result = _run("--model", "openvla/openvla-7b", "--image", str(image_file), "--instruction", "pick up the cup",
                  env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 'openvla/openvla-7b' is not a local directory")
    assert "cannot be fetched from the model hub" in last and "hf download openvla/openvla-7b" in last
    assert "Traceback" not in result.stderr and result.stderr.count("error:") == 1


def test_readme_one_shot_commands_build_a_tiny_checkpoint_and_predict(image_file: Path, tmp_path: Path,
                                                                       tiny_checkpoint: Path) -> None:
    """``python -m openvla_ros.tiny DIR`` then ``python -m openvla_ros.predict ... --json``, as the README has them."""
    built = subprocess.run([sys.executable, "-m", "openvla_ros.tiny", str(tmp_path / "tiny")],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    assert built.stdout.strip() == str(tmp_path / "tiny")
    assert (tmp_path / "tiny" / "config.json").read_bytes() == (tiny_checkpoint / "config.json").read_bytes()
    again = subprocess.run([sys.executable, "-m", "openvla_ros.tiny", str(tmp_path / "tiny")],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and again.stderr.startswith("error:") and "not empty" in again.stderr
    result = _run("--model", str(tmp_path / "tiny"), "--image", str(image_file),
                  "--instruction", "pick up the red block", "--json")
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout.strip().splitlines()[-1])) == 7
