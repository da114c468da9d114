"""Fidelity to what official checkpoints ship: preprocessor settings, mask-less statistics, decoding."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from openvla_ros.errors import CheckpointError, InstructionError
from openvla_ros.model.action_codec import ActionNormalizer
from openvla_ros.model.loading import PREPROCESSOR_NAME, read_config, read_image_settings, save_checkpoint
from openvla_ros.model.policy import OpenVLAPolicy
from openvla_ros.model.processor import ImageSettings, ImageTransform, validate_instruction

INSTRUCTION = "pick up the red block"
# openvla-7b's preprocessor_config.json: the DINOv2 constants rounded to bfloat16.
ROUNDED_MEAN = [0.484375, 0.455078125, 0.40625]
ROUNDED_STD = [0.228515625, 0.2236328125, 0.224609375]


def _image(seed: int = 0, height: int = 480, width: int = 640) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _official_preprocessor(**changes) -> dict:
    config = {
        "image_processor_type": "PrismaticImageProcessor",
        "image_resize_strategy": "resize-naive",
        "input_sizes": [[3, 224, 224], [3, 224, 224]],
        "interpolations": ["bicubic", "bicubic"],
        "means": [ROUNDED_MEAN, [0.5, 0.5, 0.5]],
        "processor_class": "PrismaticProcessor",
        "stds": [ROUNDED_STD, [0.5, 0.5, 0.5]],
        "use_fused_vision_backbone": True,
    }
    config.update(changes)
    return config


def _saved_by_training_code(**changes) -> dict:
    """preprocessor_config.json as the original training code saves it: the textbook ``means``/``stds``
    beside the ``tvf_*`` parameters that ``apply_transform`` reads, with the DINOv2 values bf16-rounded."""
    config = _official_preprocessor(means=[[0.485, 0.456, 0.406], [0.5, 0.5, 0.5]],
                                    stds=[[0.229, 0.224, 0.225], [0.5, 0.5, 0.5]])
    config.update(
        tvf_resize_params=[{"size": [224, 224], "interpolation": 3, "max_size": None, "antialias": True}] * 2,
        tvf_crop_params=[{"output_size": [224, 224]}] * 2,
        tvf_normalize_params=[{"mean": ROUNDED_MEAN, "std": ROUNDED_STD, "inplace": False},
                              {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "inplace": False}],
        tvf_do_letterbox=False,
        tvf_letterbox_fill=None,
    )
    config.update(changes)
    return config


def _rounded_pixels(image: np.ndarray) -> np.ndarray:
    """The official pixel values of ``image`` with the bf16-rounded DINOv2 normalisation."""
    resized = np.asarray(Image.fromarray(image).resize((224, 224), Image.Resampling.BICUBIC), np.float32) / 255
    dino = (resized - np.array(ROUNDED_MEAN, np.float32)) / np.array(ROUNDED_STD, np.float32)
    return np.concatenate([dino.transpose(2, 0, 1), ((resized - 0.5) / 0.5).transpose(2, 0, 1)])


def _with_preprocessor(tiny_checkpoint: Path, target: Path, preprocessor: dict) -> Path:
    """A copy of the tiny checkpoint at ``target`` with ``preprocessor`` as its preprocessor_config.json."""
    shutil.copytree(tiny_checkpoint, target)
    (target / PREPROCESSOR_NAME).write_text(json.dumps(preprocessor))
    return target


@pytest.fixture(scope="module")
def training_code_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with a preprocessor file laid out as the original training code saves it."""
    return _with_preprocessor(tiny_checkpoint, tmp_path_factory.mktemp("tvf") / "ckpt", _saved_by_training_code())


@pytest.fixture(scope="module")
def rounded_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint whose preprocessor_config.json holds bf16-rounded DINOv2 `means`/`stds` only."""
    return _with_preprocessor(tiny_checkpoint, tmp_path_factory.mktemp("rounded") / "ckpt", _official_preprocessor())


def test_tiny_checkpoint_ships_the_textbook_preprocessor_settings(tiny_checkpoint: Path) -> None:
    written = json.loads((tiny_checkpoint / PREPROCESSOR_NAME).read_text())
    assert written["means"] == [[0.485, 0.456, 0.406], [0.5, 0.5, 0.5]]
    assert written["image_resize_strategy"] == "resize-naive" and written["input_sizes"] == [[3, 224, 224]] * 2


def test_pixel_values_use_the_checkpoints_means_and_stds(rounded_checkpoint: Path) -> None:
    policy = OpenVLAPolicy.from_pretrained(str(rounded_checkpoint), device="cpu")
    image = _image()
    pixels = policy.image_transform.pixel_values(image).numpy()
    resized = np.asarray(Image.fromarray(image).resize((224, 224), Image.Resampling.BICUBIC), np.float32) / 255
    dino = (resized - np.array(ROUNDED_MEAN, np.float32)) / np.array(ROUNDED_STD, np.float32)
    np.testing.assert_allclose(pixels[:3], dino.transpose(2, 0, 1), atol=1e-6)
    np.testing.assert_allclose(pixels[3:], ((resized - 0.5) / 0.5).transpose(2, 0, 1), atol=1e-6)
    textbook = ImageTransform().pixel_values(image).numpy()
    assert np.abs(textbook[:3] - pixels[:3]).max() > 5e-3  # the rounding moves values by up to ~0.008
    np.testing.assert_array_equal(textbook[3:], pixels[3:])


def test_the_checkpoints_settings_change_the_models_logits(tiny_checkpoint: Path, rounded_checkpoint: Path) -> None:
    image = _image(1)
    logits = []
    for checkpoint in (tiny_checkpoint, rounded_checkpoint):
        policy = OpenVLAPolicy.from_pretrained(str(checkpoint), device="cpu")
        input_ids, pixel_values = policy.prepare_inputs(image, INSTRUCTION)
        with torch.no_grad():
            logits.append(policy.model(input_ids, pixel_values).logits[0, -1])
    assert (logits[0] - logits[1]).abs().max() > 1e-4


def test_saving_keeps_the_preprocessor_settings(rounded_checkpoint: Path, tmp_path: Path) -> None:
    policy = OpenVLAPolicy.from_pretrained(str(rounded_checkpoint), device="cpu")
    out = save_checkpoint(
        policy.model, tmp_path / "copy", tokenizer=policy.tokenizer, image_settings=policy.image_transform.settings
    )
    reloaded = read_image_settings(out, read_config(out))
    assert reloaded == policy.image_transform.settings
    assert [list(m) for m in reloaded.means] == [ROUNDED_MEAN, [0.5, 0.5, 0.5]]


def test_without_a_preprocessor_file_the_textbook_values_apply(tiny_checkpoint: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(tiny_checkpoint, bare)
    (bare / PREPROCESSOR_NAME).unlink()
    assert read_image_settings(bare, read_config(bare)) == ImageSettings()


@pytest.mark.parametrize(
    ("layout", "changes", "words"),
    [
        (_official_preprocessor, {"means": [ROUNDED_MEAN]}, "1 means and 2 stds"),
        (_official_preprocessor, {"means": [ROUNDED_MEAN] * 3, "stds": [ROUNDED_STD] * 3},
         "3 vision tower(s), the model has 2"),
        (_official_preprocessor, {"input_sizes": [[3, 448, 448], [3, 448, 448]]}, "input size 448"),
        (_official_preprocessor, {"image_resize_strategy": "resize-stretch"}, "'resize-stretch' is not supported"),
        (_official_preprocessor, {"interpolations": ["bicubic", "bilinear"]}, "the same for every tower"),
        # the tvf_* fields the official processor applies, laid out as the training code saves them
        (_saved_by_training_code, {"tvf_normalize_params": [{"mean": ROUNDED_MEAN, "std": ROUNDED_STD}] * 3},
         "3 vision tower(s), the model has 2"),
        (_saved_by_training_code, {"tvf_crop_params": [{"output_size": [448, 448]}] * 2, "tvf_resize_params": [
            {"size": [448, 448], "interpolation": 3, "max_size": None}] * 2}, "input size 448"),
        (_saved_by_training_code, {"tvf_resize_params": [{"size": [224, 256], "interpolation": 3, "max_size": None}] * 2},
         "square input"),
        (_saved_by_training_code, {"tvf_resize_params": [{"size": [224, 224], "interpolation": 9, "max_size": None}] * 2},
         "PIL filter code"),
        (_saved_by_training_code, {"tvf_resize_params": [{"size": [224, 224], "interpolation": 3, "max_size": 300}] * 2},
         "max_size"),
        (_saved_by_training_code, {"tvf_crop_params": [{"output_size": [200, 200]}] * 2}, "crops 200"),
        (_saved_by_training_code, {"tvf_resize_params": [{"size": [224, 224], "interpolation": 3, "max_size": None},
                                                         {"size": [224, 224], "interpolation": 2, "max_size": None}]},
         "same for every tower"),
        (_saved_by_training_code, {"tvf_normalize_params": [{"mean": ROUNDED_MEAN}] * 2}, "'mean' and 'std'"),
    ],
)
def test_preprocessor_settings_that_do_not_fit_are_one_clear_error(
    tiny_checkpoint: Path, tmp_path: Path, layout, changes: dict, words: str
) -> None:
    broken = _with_preprocessor(tiny_checkpoint, tmp_path / "broken", layout(**changes))
    with pytest.raises(CheckpointError, match=PREPROCESSOR_NAME) as caught:
        OpenVLAPolicy.from_pretrained(str(broken), device="cpu")
    assert words in str(caught.value)


def test_the_tvf_normalisation_wins_over_the_textbook_means_for_the_token_policy(
    training_code_checkpoint: Path, tiny_checkpoint: Path
) -> None:
    policy = OpenVLAPolicy.from_pretrained(str(training_code_checkpoint), device="cpu")
    image = _image(3)
    pixels = policy.image_transform.pixel_values(image).numpy()
    np.testing.assert_allclose(pixels, _rounded_pixels(image), atol=1e-6)
    textbook = ImageTransform().pixel_values(image).numpy()
    assert np.abs(textbook[:3] - pixels[:3]).max() > 5e-3  # reading `means` would be this far off
    # and the model sees it: the first-step logits differ from the textbook normalisation's
    textbook_policy = OpenVLAPolicy.from_pretrained(str(tiny_checkpoint), device="cpu")
    with torch.no_grad():
        logits = [p.model(*p.prepare_inputs(image, INSTRUCTION)).logits[0, -1] for p in (policy, textbook_policy)]
    assert (logits[0] - logits[1]).abs().max() > 1e-4


def test_the_tvf_normalisation_wins_for_the_oft_policy(tmp_path: Path) -> None:
    from openvla_ros.model.oft_policy import OFTPolicy
    from openvla_ros.model.tiny_oft import make_tiny_oft_checkpoint

    checkpoint = make_tiny_oft_checkpoint(tmp_path / "oft", chunk=2, proprio_dim=0, num_images=1)
    textbook = OFTPolicy.from_pretrained(str(checkpoint), device="cpu")
    (checkpoint / PREPROCESSOR_NAME).write_text(json.dumps(_saved_by_training_code()))
    policy = OFTPolicy.from_pretrained(str(checkpoint), device="cpu")
    image = _image(4)
    np.testing.assert_allclose(policy.image_transform.pixel_values(image).numpy(), _rounded_pixels(image), atol=1e-6)
    chunks = [p.predict_chunk(image, INSTRUCTION, [], None) for p in (policy, textbook)]
    assert np.abs(chunks[0] - chunks[1]).max() > 0  # the normalisation reaches the chunk


def test_saving_writes_both_forms_and_reloads_the_same_settings(training_code_checkpoint: Path,
                                                                tmp_path: Path) -> None:
    policy = OpenVLAPolicy.from_pretrained(str(training_code_checkpoint), device="cpu")
    out = save_checkpoint(
        policy.model, tmp_path / "copy", tokenizer=policy.tokenizer, image_settings=policy.image_transform.settings
    )
    written = json.loads((out / PREPROCESSOR_NAME).read_text())
    assert written["tvf_normalize_params"][0]["mean"] == ROUNDED_MEAN and written["means"][0] == ROUNDED_MEAN
    assert written["tvf_resize_params"][0] == {"size": [224, 224], "interpolation": 3, "max_size": None,
                                               "antialias": True}
    assert written["tvf_crop_params"] == [{"output_size": [224, 224]}] * 2 and written["tvf_do_letterbox"] is False
    assert read_image_settings(out, read_config(out)) == policy.image_transform.settings


@pytest.mark.parametrize(
    ("tvf", "strategy", "interpolation"),
    [
        ({"tvf_resize_params": [{"size": 224, "interpolation": 2, "max_size": None}] * 2}, "resize-crop", "bilinear"),
        ({"tvf_resize_params": [{"size": 224, "interpolation": 3, "max_size": None}] * 2, "tvf_do_letterbox": True,
          "tvf_letterbox_fill": [10, 20, 30]}, "letterbox", "bicubic"),
    ],
)
def test_the_tvf_resize_and_letterbox_win_over_the_resize_strategy(tvf: dict, strategy: str,
                                                                   interpolation: str) -> None:
    settings = ImageSettings.from_preprocessor_config(_saved_by_training_code(**tvf), num_towers=2)
    assert settings.resize_strategy == strategy and settings.interpolation == interpolation
    image = np.full((100, 201, 3), 255, np.uint8)
    image[:, :100] = 0
    resized = ImageTransform(settings=settings).model_image(image)
    assert resized.shape == (224, 224, 3)
    if strategy == "letterbox":
        # padded by int(101 / 2) = 50 rows each side (200 x 201), short side to 224 (225 x 224), centre crop
        np.testing.assert_array_equal(resized[3, 112], [10, 20, 30])
        padded = np.concatenate([np.full((50, 201, 3), (10, 20, 30), np.uint8), image,
                                 np.full((50, 201, 3), (10, 20, 30), np.uint8)])
        expected = np.asarray(Image.fromarray(padded).resize((225, 224), Image.Resampling.BICUBIC))
        np.testing.assert_array_equal(resized, expected[:, 0:224])  # round(0.5) = 0, as torchvision
    else:
        # short side to 224: int(224 * 201 / 100) = 450 wide, then the centre 224 from round(113.0)
        expected = np.asarray(Image.fromarray(image).resize((450, 224), Image.Resampling.BILINEAR))
        np.testing.assert_array_equal(resized, expected[:, 113:337])

def test_letterbox_pads_with_the_mean_colour_then_resizes() -> None:
    settings = ImageSettings(resize_strategy="letterbox")
    image = np.full((100, 200, 3), 255, np.uint8)
    resized = ImageTransform(settings=settings).model_image(image)
    assert resized.shape == (224, 224, 3)
    fill = [int(v * 255) for v in settings.means[-1]]  # the official processor keeps the last tower's
    assert fill == [127, 127, 127]
    np.testing.assert_array_equal(resized[5, 112], fill)  # the padding band above the image
    np.testing.assert_array_equal(resized[112, 112], [255, 255, 255])


def test_resize_crop_keeps_the_aspect_and_takes_the_centre() -> None:
    image = np.zeros((100, 300, 3), np.uint8)
    image[:, 100:200] = 200  # the centre third
    resized = ImageTransform(settings=ImageSettings(resize_strategy="resize-crop")).model_image(image)
    assert resized.shape == (224, 224, 3)
    assert resized[112, 112, 0] == 200 and abs(int(resized[112, 5, 0]) - 200) < 60


def test_statistics_without_a_mask_unnormalise_every_dimension_as_the_official_code() -> None:
    stats = {"q01": [-1.0] * 7, "q99": [3.0] * 7}
    normalizer = ActionNormalizer.from_stats(stats)
    np.testing.assert_allclose(normalizer.unnormalize(np.zeros(7)), [1.0] * 7)
    with_mask = ActionNormalizer.from_stats({**stats, "mask": [True] * 6 + [False]})
    np.testing.assert_allclose(with_mask.unnormalize(np.zeros(7)), [1.0] * 6 + [0.0])


def test_a_checkpoint_without_mask_moves_the_gripper_through_its_bounds(tiny_checkpoint: Path, tmp_path: Path) -> None:
    checkpoint = tmp_path / "nomask"
    shutil.copytree(tiny_checkpoint, checkpoint)
    for name in ("config.json", "dataset_statistics.json"):
        data = json.loads((checkpoint / name).read_text())
        stats = data["norm_stats"] if name == "config.json" else data
        for entry in stats.values():
            entry["action"].pop("mask", None)
            entry["action"]["q01"][6], entry["action"]["q99"][6] = 10.0, 20.0
        (checkpoint / name).write_text(json.dumps(data))
    policy = OpenVLAPolicy.from_pretrained(str(checkpoint), device="cpu")
    gripper = policy.predict_action(_image(2), INSTRUCTION)[6]
    assert 10.0 <= gripper <= 20.0


def _full_vocabulary_greedy(policy: OpenVLAPolicy, image: np.ndarray, steps: int) -> list[int]:
    """The official rule written out: argmax over every id, recomputing the whole sequence each step."""
    input_ids, pixel_values = policy.prepare_inputs(image, INSTRUCTION)
    chosen: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([input_ids, torch.tensor([chosen], dtype=torch.long)], dim=1)
            logits = policy.model(ids, pixel_values).logits[0, -1]
            chosen.append(int(logits.argmax()))
            if chosen[-1] == 2:
                break
    return chosen


def test_official_decoding_takes_the_argmax_over_the_whole_vocabulary(tiny_checkpoint: Path) -> None:
    ours = OpenVLAPolicy.from_pretrained(str(tiny_checkpoint), device="cpu")
    official = OpenVLAPolicy.from_pretrained(str(tiny_checkpoint), device="cpu", decoding="official")
    outside = compared = 0
    for seed in range(4):
        image = _image(10 + seed, 120, 160)
        expected = _full_vocabulary_greedy(official, image, 7)
        if len(expected) == 7:
            assert official.predict_action_ids(image, INSTRUCTION).tolist() == expected
            compared += 1
        restricted = ours.predict_action_ids(image, INSTRUCTION)
        assert ((restricted >= 31744) & (restricted <= 31999)).all()
        outside += sum(not 31744 <= i <= 31999 for i in expected)
        action = official.predict_action(image, INSTRUCTION)
        normalized = official.action_tokenizer.decode(official.predict_action_ids(image, INSTRUCTION))
        np.testing.assert_allclose(action, official.normalizer.unnormalize(normalized))
    # the random tiny model rarely prefers action ids: official decoding then reads edge bins
    assert outside > 0 and compared > 0


def test_official_decoding_after_an_early_eos_reads_the_prompts_tail(tiny_checkpoint: Path) -> None:
    official = OpenVLAPolicy.from_pretrained(str(tiny_checkpoint), device="cpu", decoding="official")
    calls = {"n": 0}

    def eos_on_third_step(module, inputs, output):
        calls["n"] += 1
        if calls["n"] == 3:
            output = output.clone()
            output[..., 2] = output.max() + 10.0
        return output

    handle = official.model.language_model.lm_head.register_forward_hook(eos_on_third_step)
    try:
        ids = official.predict_action_ids(_image(3, 120, 160), INSTRUCTION).tolist()
    finally:
        handle.remove()
    prompt = official.prompt_ids(INSTRUCTION)[0].tolist()
    assert calls["n"] == 3 and ids[-1] == 2
    assert ids[:4] == prompt[-4:]  # 7 ids = the prompt's last 4 + 2 generated + EOS


def test_unknown_decoding_is_refused(tiny_checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="actions_only, official"):
        OpenVLAPolicy.from_pretrained(str(tiny_checkpoint), device="cpu", decoding="sampled")


@pytest.mark.parametrize("text", ["pick up <s> the block", "stop</s>", "put it on </S> top", "<unk> block"])
def test_instructions_with_special_token_text_are_refused(text: str) -> None:
    with pytest.raises(InstructionError, match="special-token text"):
        validate_instruction(text)


def test_center_crop_turns_on_for_models_fine_tuned_with_image_augmentation(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    assert not OpenVLAPolicy.from_pretrained(str(tiny_checkpoint), device="cpu").image_transform.center_crop
    augmented = tmp_path / "augmented"
    shutil.copytree(tiny_checkpoint, augmented)
    config = json.loads((augmented / "config.json").read_text())
    config["openvla_ros"] = {"dataset_name": "tiny_demo", "trained_with_image_aug": True}
    (augmented / "config.json").write_text(json.dumps(config))
    assert OpenVLAPolicy.from_pretrained(str(augmented), device="cpu").image_transform.center_crop
    kept_off = OpenVLAPolicy.from_pretrained(str(augmented), device="cpu", center_crop=False)
    assert not kept_off.image_transform.center_crop
