"""Reading a Prismatic training run directory: its model settings, statistics and this project's config.

The original Prismatic/OpenVLA training code writes a run directory holding ``config.json`` (and
``config.yaml``) with a ``vla`` section (``model`` for plain VLMs), ``dataset_statistics.json`` and
``checkpoints/latest-checkpoint.pt`` (plus ``step-*.pt``). The model is named by four settings:
``vision_backbone_id``, ``llm_backbone_id``, ``arch_specifier`` and ``image_resize_strategy``; a VLA
section often names only ``base_vlm``, an id of Prismatic's model registry (the ones OpenVLA builds on
are known here) or the path of the base VLM's own run directory.

A run may also carry :data:`OVERRIDE_KEY`, this project's extension (absent from real Prismatic runs):
fields of :class:`~openvla_ros.model.configuration_openvla.OpenVLAConfig` that the backbone ids cannot
express, such as the tiny model's narrowed towers, and the directory of its tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from openvla_ros.errors import CheckpointError
from openvla_ros.model.configuration_openvla import OpenVLAConfig, make_text_config

CHECKPOINT_NAME = "latest-checkpoint.pt"
STATISTICS_NAME = "dataset_statistics.json"
OVERRIDE_KEY = "openvla_ros_model"
OVERRIDE_FIELDS = ("timm_model_ids", "timm_override_args", "image_sizes", "text_config", "tokenizer")
MODEL_FIELDS = ("vision_backbone_id", "llm_backbone_id", "arch_specifier", "image_resize_strategy")

DINOV2_TIMM_ID = "vit_large_patch14_reg4_dinov2.lvd142m"
SIGLIP_TIMM_ID = "vit_so400m_patch14_siglip_224"
# Prismatic vision backbone id -> (timm ids, DINOv2 first when fused; image side).
VISION_BACKBONES: dict[str, tuple[tuple[str, ...], int]] = {
    "dinosiglip-vit-so-224px": ((DINOV2_TIMM_ID, SIGLIP_TIMM_ID), 224),
    "siglip-vit-so400m": ((SIGLIP_TIMM_ID,), 224),
    "dinov2-vit-l": ((DINOV2_TIMM_ID,), 224),
}
# Prismatic LLM backbone id -> the hub checkpoint its tokenizer comes from (all Llama-2-7B shaped).
LLM_BACKBONES = {
    "llama2-7b-pure": "meta-llama/Llama-2-7b-hf",
    "llama2-7b-chat": "meta-llama/Llama-2-7b-chat-hf",
    "vicuna-v15-7b": "lmsys/vicuna-7b-v1.5",
}
# The text config the official conversion gives openvla-7b: Llama-2-7B's shape with LlamaConfig's own
# defaults for the rest (rms_norm_eps 1e-6, 2048 positions), the vocabulary padded to a multiple of 64
# after adding <PAD> (id 32000).
LLAMA2_7B_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 32064,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "pad_token_id": 32000,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
# Entries of Prismatic's model registry that OpenVLA runs name as `base_vlm`.
_DINOSIGLIP_224 = {
    "vision_backbone_id": "dinosiglip-vit-so-224px",
    "llm_backbone_id": "llama2-7b-pure",
    "arch_specifier": "no-align+fused-gelu-mlp",
    "image_resize_strategy": "resize-naive",
}
BASE_VLMS: dict[str, dict[str, str]] = {
    "prism-dinosiglip-224px+7b": _DINOSIGLIP_224,
    "prism-dinosiglip-224px-controlled+7b": _DINOSIGLIP_224,
    "dinosiglip-224px-resize-naive+7b": {**_DINOSIGLIP_224, "llm_backbone_id": "vicuna-v15-7b"},
    "siglip-224px+7b": {
        "vision_backbone_id": "siglip-vit-so400m",
        "llm_backbone_id": "vicuna-v15-7b",
        "arch_specifier": "no-align+gelu-mlp",
        "image_resize_strategy": "letterbox",
    },
}


def locate_run(source: Path) -> tuple[Path, Path]:
    """Returns ``(run_dir, checkpoint_file)`` for a run directory or one of its ``.pt`` files.

    Raises:
        CheckpointError: when the path does not exist or the directory has no latest checkpoint.
    """
    if source.is_dir():
        checkpoint = source / "checkpoints" / CHECKPOINT_NAME
        if not checkpoint.is_file():
            steps = sorted((source / "checkpoints").glob("step-*.pt"))
            hint = f"; pass one of its step checkpoints instead, e.g. {steps[-1]}" if steps else ""
            raise CheckpointError(f"{checkpoint} not found: {source} is not a Prismatic run directory{hint}")
        return source, checkpoint
    if source.is_file():
        run_dir = source.parent.parent if source.parent.name == "checkpoints" else source.parent
        return run_dir, source
    raise CheckpointError(
        f"{source} does not exist; pass a Prismatic run directory or its checkpoints/*.pt file"
    )


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """Returns the parsed ``config.json`` of a run (``config.yaml`` when there is no JSON).

    Raises:
        CheckpointError: when neither file exists or the file is not a mapping.
    """
    path = next((run_dir / name for name in ("config.json", "config.yaml") if (run_dir / name).is_file()), None)
    if path is None:
        raise CheckpointError(f"{run_dir} has no config.json or config.yaml; the training run's config names the model")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ValueError(str(exc)) from exc
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(f"{path} is unreadable: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a mapping (with a 'vla' or 'model' section)")
    return data


def model_settings(run_config: dict[str, Any], where: Path) -> dict[str, str]:
    """Returns the four Prismatic settings naming the model (see :data:`MODEL_FIELDS`).

    They come from the ``vla`` (or ``model``) section; missing ones from its ``base_vlm``, either a
    known registry id or a base VLM run directory with its own config.

    Raises:
        CheckpointError: when there is no such section, or settings are missing and ``base_vlm``
            cannot supply them.
    """
    section = run_config.get("vla") or run_config.get("model")
    if not isinstance(section, dict):
        raise CheckpointError(f"the run config in {where} has neither a 'vla' nor a 'model' section")
    settings = {key: str(section[key]) for key in MODEL_FIELDS if section.get(key)}
    missing = [key for key in MODEL_FIELDS if key not in settings]
    if missing:
        base = section.get("base_vlm")
        base_settings = BASE_VLMS.get(str(base)) if base else None
        if base_settings is None and base and (Path(str(base)) / "config.json").is_file():
            base_settings = model_settings(read_run_config(Path(str(base))), Path(str(base)))
        if base_settings is None:
            raise CheckpointError(
                f"the run config in {where} does not name {', '.join(missing)}, and its base_vlm {base!r} is "
                f"not a known base model ({', '.join(BASE_VLMS)}) nor a run directory; add the settings "
                "to its 'vla' section"
            )
        settings.update({key: base_settings[key] for key in missing})
    return settings


def read_overrides(run_config: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Returns the run's :data:`OVERRIDE_KEY` section (empty when absent); ``tokenizer`` as a full path.

    Raises:
        CheckpointError: when the section is not a mapping or has unknown fields.
    """
    overrides = run_config.get(OVERRIDE_KEY) or {}
    if not isinstance(overrides, dict):
        raise CheckpointError(f"'{OVERRIDE_KEY}' in the run config of {run_dir} must be a mapping")
    unknown = sorted(set(overrides) - set(OVERRIDE_FIELDS))
    if unknown:
        raise CheckpointError(
            f"'{OVERRIDE_KEY}' in the run config of {run_dir} has unknown field(s) {', '.join(unknown)}; "
            f"known: {', '.join(OVERRIDE_FIELDS)}"
        )
    overrides = dict(overrides)
    if overrides.get("tokenizer"):
        overrides["tokenizer"] = str(run_dir / str(overrides["tokenizer"]))
    return overrides


def read_statistics(run_dir: Path) -> dict[str, Any]:
    """Returns the run's ``dataset_statistics.json`` (the ``norm_stats`` of the converted model).

    Raises:
        CheckpointError: when it is missing, unreadable, or has no action statistics.
    """
    path = run_dir / STATISTICS_NAME
    if not path.is_file():
        raise CheckpointError(
            f"{path} not found: an action model needs the run's dataset statistics (OpenVLA training writes "
            "them beside config.json)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path} is unreadable or not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or not data:
        raise CheckpointError(f"{path} must map dataset names to their statistics")
    without_actions = [key for key, value in data.items() if not isinstance(value, dict) or "action" not in value]
    if without_actions:
        raise CheckpointError(f"{path}: entries without 'action' statistics: {', '.join(without_actions[:5])}")
    return data


def build_config(settings: dict[str, str], overrides: dict[str, Any], norm_stats: dict[str, Any]) -> OpenVLAConfig:
    """Returns the OpenVLA config of a run's model (the overrides win over what the ids imply).

    Raises:
        CheckpointError: for a vision or LLM backbone id without a known architecture, a projector that
            does not match the vision backbone, or settings the config rejects.
    """
    vision_id, llm_id = settings["vision_backbone_id"], settings["llm_backbone_id"]
    if "timm_model_ids" in overrides:
        timm_ids = list(overrides["timm_model_ids"])
        image_sizes = list(overrides.get("image_sizes") or [224] * len(timm_ids))
    elif vision_id in VISION_BACKBONES:
        ids, side = VISION_BACKBONES[vision_id]
        timm_ids, image_sizes = list(ids), list(overrides.get("image_sizes") or [side] * len(ids))
    else:
        raise CheckpointError(
            f"vision backbone {vision_id!r} is not supported; supported: {', '.join(VISION_BACKBONES)}"
        )
    if "text_config" in overrides:
        text = dict(overrides["text_config"])
    elif llm_id in LLM_BACKBONES:
        text = dict(LLAMA2_7B_TEXT_CONFIG)
    else:
        raise CheckpointError(f"LLM backbone {llm_id!r} is not supported; supported: {', '.join(LLM_BACKBONES)}")
    fused = len(timm_ids) == 2
    projector = settings["arch_specifier"].split("+")[-1]
    wanted = "fused-gelu-mlp" if fused else "gelu-mlp"
    if projector != wanted:
        raise CheckpointError(
            f"arch_specifier {settings['arch_specifier']!r} does not fit vision backbone {vision_id!r}: the model "
            f"uses a {wanted} projector with {len(timm_ids)} vision tower(s)"
        )
    try:
        return OpenVLAConfig(
            timm_model_ids=timm_ids,
            image_sizes=image_sizes,
            use_fused_vision_backbone=fused,
            image_resize_strategy=settings["image_resize_strategy"],
            llm_backbone_id=llm_id,
            text_config=make_text_config(text),
            norm_stats=norm_stats,
            timm_override_args=overrides.get("timm_override_args"),
            extra={
                "vision_backbone_id": vision_id,
                "arch_specifier": settings["arch_specifier"],
                **({"hf_llm_id": LLM_BACKBONES[llm_id]} if llm_id in LLM_BACKBONES else {}),
            },
        )
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"the run's model settings are not usable: {exc}") from exc


def tokenizer_source(settings: dict[str, str], overrides: dict[str, Any]) -> str:
    """Returns where the tokenizer comes from: the run's own, else the LLM backbone's hub checkpoint.

    Raises:
        CheckpointError: when neither is known (pass ``--tokenizer-from``).
    """
    if overrides.get("tokenizer"):
        return str(overrides["tokenizer"])
    llm_id = settings["llm_backbone_id"]
    if llm_id in LLM_BACKBONES:
        return LLM_BACKBONES[llm_id]
    raise CheckpointError(
        f"no tokenizer is known for LLM backbone {llm_id!r}; pass --tokenizer-from with the base model's directory"
    )
