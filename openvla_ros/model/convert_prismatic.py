"""Convert a Prismatic/OpenVLA training checkpoint into the checkpoint layout this package loads.

    python -m openvla_ros.convert_prismatic RUN_DIR_OR_PT OUT_DIR [--dtype bf16|fp32]
        [--tokenizer-from DIR_OR_HUB_ID] [--no-check]

Training or fully fine-tuning OpenVLA with the original Prismatic code leaves a run directory (see
:mod:`openvla_ros.model.prismatic_config`) whose ``checkpoints/*.pt`` holds
``{"model": {"vision_backbone": ..., "projector": ..., "llm_backbone": ...}}``. The file is read with
``torch.load(weights_only=True)`` only; the weights are renamed to the official Hugging Face names
(``llm.`` -> ``language_model.``, projector ``0/2/4`` -> ``fc1/fc2/fc3``, ``dino_featurizer`` /
``siglip_featurizer`` (or ``featurizer`` / ``fused_featurizer``) -> ``vision_backbone.featurizer`` /
``vision_backbone.fused_featurizer``, LayerScale ``gamma`` -> ``scale_factor``), every weight is checked
against the architecture, and OUT_DIR gets config.json, safetensors weights, the tokenizer,
preprocessor_config.json and dataset_statistics.json. Everything is written beside OUT_DIR and renamed
into place after the result has loaded through :meth:`OpenVLAPolicy.from_pretrained` and predicted
one action (the self-check), so a failure leaves nothing behind.
"""

from __future__ import annotations

import argparse
import gc
import pickle
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from openvla_ros.errors import CheckpointError, OpenVLAError
from openvla_ros.model.configuration_openvla import OpenVLAConfig
from openvla_ros.model.loading import (
    load_tokenizer,
    move_into_place,
    official_to_internal_key,
    resolve_checkpoint_dir,
    save_checkpoint,
    scratch_beside,
)
from openvla_ros.model.modeling_openvla import OpenVLAForActionPrediction
from openvla_ros.model.prismatic_config import (
    build_config,
    locate_run,
    model_settings,
    read_overrides,
    read_run_config,
    read_statistics,
    tokenizer_source,
)
from openvla_ros.model.processor import DINOV2_MEAN, DINOV2_STD, SIGLIP_MEAN, SIGLIP_STD, ImageSettings

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
MODULE_GROUPS = ("vision_backbone", "projector", "llm_backbone")
TOKENIZER_FILES = ["tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
SELF_CHECK_INSTRUCTION = "pick up the red block"
_UNSAFE_GLOBAL = re.compile(r"unsupported (?:global: )?GLOBAL ([\w.]+)", re.IGNORECASE)  # the refused global


@dataclass(frozen=True)
class ConversionResult:
    """What a conversion wrote.

    Attributes:
        out_dir: the converted checkpoint directory.
        checkpoint: the training checkpoint it came from.
        num_weights: number of weight tensors written.
        dtype: ``bfloat16`` or ``float32``.
        unnorm_key: the statistics key the self-check un-normalised with.
        action: the self-check's action on a test image (None when the check was skipped).
    """

    out_dir: Path
    checkpoint: Path
    num_weights: int
    dtype: str
    unnorm_key: str
    action: np.ndarray | None


def load_training_checkpoint(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Returns the per-module state dicts of a Prismatic ``.pt``, read with ``weights_only=True``.

    Raises:
        CheckpointError: when the file is unreadable, holds Python objects other than tensors and plain
            containers (refused without running them), or has no ``model`` dict of tensor dicts.
    """
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        found = _UNSAFE_GLOBAL.search(str(exc))
        raise CheckpointError(
            f"{path} is refused: it holds Python objects other than tensors and plain containers"
            f"{f' ({found.group(1)})' if found else ''}, which are never unpickled for safety "
            "(torch.load with weights_only=True); a Prismatic training checkpoint holds only tensors"
        ) from exc
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({str(exc).splitlines()[0] if str(exc) else exc!r}); "
            "it may be truncated: copy it again"
        ) from exc
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        found = ", ".join(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(
            f"{path} is not a Prismatic training checkpoint: it needs a 'model' dict of module state dicts "
            f"(found {found})"
        )
    not_tensors = []
    for group, state in model.items():
        if not isinstance(state, dict):
            not_tensors.append(f"{group} ({type(state).__name__})")
            continue
        not_tensors += [f"{group}:{key}" for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{path} has model entries that are not tensors: {_preview(not_tensors)}")
    return {str(group): state for group, state in model.items()}


def _rules(fused: bool) -> list[tuple[str, str, str]]:
    """(module group, Prismatic prefix, module name prefix), in the order names are mapped back."""
    rules = [
        ("projector", "projector.0.", "projector.fc1."),
        ("projector", "projector.2.", "projector.fc2."),
        ("llm_backbone", "llm.", "language_model."),
    ]
    if not fused:
        return rules + [("vision_backbone", "featurizer.", "vision_backbone.featurizer.")]
    return rules + [
        ("projector", "projector.4.", "projector.fc3."),
        ("vision_backbone", "dino_featurizer.", "vision_backbone.featurizer."),
        ("vision_backbone", "siglip_featurizer.", "vision_backbone.fused_featurizer."),
        ("vision_backbone", "featurizer.", "vision_backbone.featurizer."),
        ("vision_backbone", "fused_featurizer.", "vision_backbone.fused_featurizer."),
    ]


def _to_module_name(group: str, key: str, rules: list[tuple[str, str, str]]) -> str | None:
    for rule_group, prefix, target in rules:
        if group == rule_group and key.startswith(prefix):
            return official_to_internal_key(target + key[len(prefix):])
    return None


def _to_prismatic_name(name: str, rules: list[tuple[str, str, str]]) -> str:
    for group, prefix, target in rules:
        if name.startswith(target):
            return f"{group}:{prefix}{name[len(target):]}"
    return name


def map_weights(
    groups: dict[str, dict[str, torch.Tensor]], model: OpenVLAForActionPrediction, source: Path
) -> dict[str, torch.Tensor]:
    """Returns the checkpoint's tensors under ``model``'s parameter names.

    Raises:
        CheckpointError: one error naming the first few missing, unknown and wrongly shaped weights.
    """
    rules = _rules(model.config.use_fused_vision_backbone)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    mapped: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unknown: list[str] = []
    for group, state in groups.items():
        for key, tensor in state.items():
            name = _to_module_name(group, key, rules) if group in MODULE_GROUPS else None
            if name is None and key.endswith("rotary_emb.inv_freq"):
                continue  # a buffer derived from rope_theta, not a weight
            if name not in expected or name in mapped:
                unknown.append(f"{group}:{key}")
                continue
            mapped[name], origin[name] = tensor, f"{group}:{key}"
    missing = [_to_prismatic_name(name, rules) for name in expected if name not in mapped]
    shapes = [
        f"{origin[name]} {list(tensor.shape)} (expected {list(expected[name])})"
        for name, tensor in mapped.items()
        if tuple(tensor.shape) != expected[name]
    ]
    if missing or unknown or shapes:
        absent = [group for group in MODULE_GROUPS if not groups.get(group)]
        hint = (
            f"; it has no {' or '.join(absent)} weights at all (a run with frozen modules saves only the ones "
            "it trained; convert a checkpoint that holds all three)" if absent else ""
        )
        problems = [
            f"{len(names)} {what} {_preview(names)}"
            for what, names in (("missing weight(s)", missing), ("unknown weight(s)", unknown),
                                ("weight(s) with the wrong shape", shapes))
            if names
        ]
        raise CheckpointError(
            f"{source} does not fit the architecture its run config names "
            f"({model.config.extra.get('vision_backbone_id')} + {model.config.llm_backbone_id}): "
            f"{', '.join(problems)}{hint}; nothing was written"
        )
    return mapped


def image_settings(config: OpenVLAConfig) -> ImageSettings:
    """Returns the image processor settings of the run's towers (what the official converter writes).

    Raises:
        CheckpointError: for a tower that is neither DINOv2 nor SigLIP.
    """
    families = {"siglip": (SIGLIP_MEAN, SIGLIP_STD), "dinov2": (DINOV2_MEAN, DINOV2_STD)}
    constants = []
    for timm_id in config.timm_model_ids:
        family = next((name for name in families if name in timm_id), None)
        if family is None:
            raise CheckpointError(f"no image normalisation is known for vision tower {timm_id!r}")
        constants.append(families[family])
    return ImageSettings(
        image_size=config.image_size,
        resize_strategy=config.image_resize_strategy,
        means=tuple(mean for mean, _ in constants),
        stds=tuple(std for _, std in constants),
    )


def load_base_tokenizer(source: str, config: OpenVLAConfig):
    """Returns the base model's tokenizer with Prismatic's ``<PAD>`` token, checked against ``config``.

    ``source`` is a directory or a hub id (only the tokenizer files are fetched).

    Raises:
        CheckpointError: when it cannot be found or fetched, or its padding id or size do not fit.
    """
    path = Path(source).expanduser()
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1:
        directory = resolve_checkpoint_dir(source)
    else:
        try:
            from huggingface_hub import snapshot_download

            directory = Path(snapshot_download(repo_id=source, allow_patterns=TOKENIZER_FILES))
        except Exception as exc:  # the hub client raises many unrelated types for one cause
            raise CheckpointError(
                f"{source!r} is not a local directory, and as a hub id its tokenizer cannot be fetched from the "
                "model hub nor found in the local cache "
                f"({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); on a machine with "
                f"network access (and access to the gated repository) run `hf download {source} "
                f"{' '.join(TOKENIZER_FILES)} --local-dir DIR` and pass --tokenizer-from DIR"
            ) from exc
    tokenizer = load_tokenizer(directory)
    if tokenizer.pad_token != "<PAD>":  # Prismatic adds it whatever the base tokenizer pads with
        tokenizer.add_special_tokens({"pad_token": "<PAD>"})
    pad_id, vocab = config.text_config.pad_token_id, config.text_config.vocab_size
    if tokenizer.pad_token_id != pad_id or len(tokenizer) > vocab:
        raise CheckpointError(
            f"the tokenizer from {source} does not fit the model: padding id {tokenizer.pad_token_id} and "
            f"{len(tokenizer)} tokens, where the model has padding id {pad_id} and {vocab} embeddings; pass the "
            "base LLM's tokenizer with --tokenizer-from"
        )
    return tokenizer


def self_check(checkpoint_dir: Path, dtype: str, unnorm_key: str) -> np.ndarray:
    """Returns one action of the checkpoint, loaded through the normal loader, on a fixed test image.

    Raises:
        CheckpointError: when the checkpoint does not load or predict.
    """
    from openvla_ros.model.policy import OpenVLAPolicy

    image = np.random.default_rng(0).integers(0, 256, size=(224, 224, 3), dtype=np.uint8)
    try:
        policy = OpenVLAPolicy.from_pretrained(str(checkpoint_dir), dtype=dtype, unnorm_key=unnorm_key)
        try:
            return policy.predict_action(image, SELF_CHECK_INSTRUCTION)
        finally:
            policy.release()
    except OpenVLAError as exc:
        raise CheckpointError(f"the converted checkpoint fails its self-check: {exc}; nothing was written") from exc


def convert_prismatic_checkpoint(
    source: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "bf16",
    tokenizer_from: str | None = None,
    check: bool = True,
) -> ConversionResult:
    """Converts a Prismatic run directory (or one of its ``.pt`` files) into ``out_dir``.

    Args:
        source: run directory (its ``checkpoints/latest-checkpoint.pt`` is taken) or a ``.pt`` file in it.
        out_dir: the directory to create; it must not exist or be empty.
        dtype: ``bf16`` or ``fp32`` for the written weights.
        tokenizer_from: directory or hub id of the base LLM's tokenizer (default: the run's own when it
            records one, else the LLM backbone's hub checkpoint such as ``meta-llama/Llama-2-7b-hf``).
        check: load the result and predict one action before moving it into place.

    Raises:
        CheckpointError: for anything wrong with the input or the output directory; nothing is written.
    """
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; use {' or '.join(DTYPES)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise CheckpointError(f"{out_dir} exists and is not empty; choose a new directory or remove it")
    run_dir, checkpoint = locate_run(Path(source))
    run_config = read_run_config(run_dir)
    settings = model_settings(run_config, run_dir)
    overrides = read_overrides(run_config, run_dir)
    config = build_config(settings, overrides, read_statistics(run_dir))
    tokenizer = load_base_tokenizer(tokenizer_from or tokenizer_source(settings, overrides), config)
    model = _converted_model(config, checkpoint)
    num_weights = len(model.state_dict())
    dtype_name = str(DTYPES[dtype]).replace("torch.", "")
    unnorm_key = next(iter(config.norm_stats))
    with scratch_beside(out_dir, "convert-") as staging:
        written = save_checkpoint(
            model, staging / "checkpoint", tokenizer=tokenizer, dtype=DTYPES[dtype], image_settings=image_settings(config)
        )
        del model
        gc.collect()
        action = self_check(written, dtype_name, unnorm_key) if check else None
        move_into_place(written, out_dir)
    return ConversionResult(out_dir, checkpoint, num_weights, dtype_name, unnorm_key, action)


def _converted_model(config: OpenVLAConfig, checkpoint: Path) -> OpenVLAForActionPrediction:
    """Returns the model of ``config`` holding the checkpoint's tensors (no copy; weights not yet cast)."""
    from accelerate import init_empty_weights

    groups = load_training_checkpoint(checkpoint)
    with init_empty_weights(include_buffers=False):
        model = OpenVLAForActionPrediction(config)
    model.load_state_dict(map_weights(groups, model, checkpoint), strict=True, assign=True)
    return model.eval()


def _preview(names: list[str], limit: int = 5) -> str:
    return f"[{', '.join(names[:limit])}{', ...' if len(names) > limit else ''}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m openvla_ros.convert_prismatic", description=__doc__.splitlines()[0]
    )
    parser.add_argument("source", help="Prismatic run directory, or a checkpoints/*.pt file of one")
    parser.add_argument("out_dir", type=Path, help="checkpoint directory to create (must not exist or be empty)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="weight precision (default bf16)")
    parser.add_argument(
        "--tokenizer-from", default=None,
        help="directory or hub id of the base LLM tokenizer (default: the LLM backbone's, e.g. meta-llama/Llama-2-7b-hf)",
    )
    parser.add_argument("--no-check", action="store_true", help="skip loading the result and predicting one action")
    args = parser.parse_args(argv)
    try:
        result = convert_prismatic_checkpoint(
            args.source, args.out_dir, dtype=args.dtype, tokenizer_from=args.tokenizer_from, check=not args.no_check
        )
    except (OpenVLAError, OSError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(f"wrote {result.out_dir} ({result.num_weights} weights, {result.dtype}) from {result.checkpoint}")
    if result.action is not None:
        from openvla_ros.model.action_codec import ACTION_NAMES

        values = "  ".join(f"{name}={value:+.6f}" for name, value in zip(ACTION_NAMES, result.action, strict=True))
        print(f"self-check ({result.unnorm_key}, test image, {SELF_CHECK_INSTRUCTION!r}): {values}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
