"""Configuration of an OpenVLA checkpoint (``config.json`` with ``model_type: openvla``).

The official checkpoints write only a few fields; everything else follows from them:

- ``timm_model_ids`` / ``image_sizes``: the DINOv2 and SigLIP ViTs run on the same image.
- ``use_fused_vision_backbone``: both ViTs (True for OpenVLA-7B) or only the first.
- ``text_config``: the Llama-2 config; ``rms_norm_eps`` and ``rope_theta`` default to the values the
  official model relies on (1e-6 and 10000) when they are not written.
- ``norm_stats``: per-dataset action statistics used to un-normalise actions.
- ``timm_override_args`` (this project's extension, absent from official checkpoints): keyword
  arguments passed to each ``timm.create_model`` to build toy-sized ViTs with the same structure.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from transformers import LlamaConfig

from openvla_ros.model.processor import RESIZE_STRATEGIES

MODEL_TYPE = "openvla"
DEFAULT_TIMM_IDS = ("vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224")
LLAMA_DEFAULTS = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0}
# Keys of config.json that describe the HF wrapper, not the model; kept on save only if present.
_PASSTHROUGH_KEYS = (
    "architectures", "auto_map", "torch_dtype", "transformers_version", "hf_llm_id", "openvla_ros",
    # OpenVLA-OFT: the chunk layout (our saved models: "oft"; official-layout directories may state the
    # counts their training code took from the command line).
    "oft", "num_actions_chunk", "num_images_in_input", "action_normalization",
)


@dataclass
class OpenVLAConfig:
    """The fields of an OpenVLA ``config.json`` that the model needs.

    Attributes:
        timm_model_ids: timm ids of the vision backbones (DINOv2 first, SigLIP second).
        image_sizes: input side of each backbone (224 for both).
        use_fused_vision_backbone: run both backbones and concatenate their features.
        image_resize_strategy: ``resize-naive`` (resize without keeping aspect, OpenVLA's), ``letterbox``
            or ``resize-crop``; ``preprocessor_config.json`` wins when present.
        llm_backbone_id: name of the language model (informational).
        pad_to_multiple_of: the vocabulary is padded to a multiple of this (64 -> 32064 ids).
        text_config: the Llama config of the language model.
        norm_stats: ``{dataset_name: {"action": {...}, ...}}`` action statistics.
        timm_override_args: per-backbone keyword overrides for ``timm.create_model`` (tiny models).
        extra: other keys of config.json, written back unchanged.
    """

    timm_model_ids: list[str] = field(default_factory=lambda: list(DEFAULT_TIMM_IDS))
    image_sizes: list[int] = field(default_factory=lambda: [224, 224])
    use_fused_vision_backbone: bool = True
    image_resize_strategy: str = "resize-naive"
    llm_backbone_id: str = "llama2-7b-pure"
    pad_to_multiple_of: int = 64
    text_config: LlamaConfig = field(default_factory=LlamaConfig)
    norm_stats: dict[str, Any] = field(default_factory=dict)
    timm_override_args: list[dict[str, Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n_backbones = 2 if self.use_fused_vision_backbone else 1
        if len(self.timm_model_ids) != n_backbones:
            raise ValueError(
                f"timm_model_ids must list {n_backbones} backbone(s) when use_fused_vision_backbone="
                f"{self.use_fused_vision_backbone}, got {self.timm_model_ids}"
            )
        if len(self.image_sizes) < 1 or len(set(self.image_sizes)) != 1:
            raise ValueError(f"image_sizes must name one size shared by all backbones, got {self.image_sizes}")
        if self.image_resize_strategy not in RESIZE_STRATEGIES:
            raise ValueError(
                f"image_resize_strategy {self.image_resize_strategy!r} is not supported; use one of "
                f"{', '.join(RESIZE_STRATEGIES)} ('resize-naive' is the OpenVLA release setting)"
            )
        if self.timm_override_args is not None and len(self.timm_override_args) != n_backbones:
            raise ValueError("timm_override_args must have one entry per vision backbone")
        if isinstance(self.text_config, dict):
            self.text_config = make_text_config(self.text_config)

    @property
    def image_size(self) -> int:
        """Side of the square image both backbones take."""
        return int(self.image_sizes[0])

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OpenVLAConfig:
        """Returns the config described by a parsed ``config.json``.

        Raises:
            ValueError: when ``model_type`` is not ``openvla`` or a field is malformed.
        """
        data = copy.deepcopy(data)
        model_type = data.pop("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ValueError(f"config.json has model_type {model_type!r}, expected {MODEL_TYPE!r}")
        known = {
            "timm_model_ids",
            "image_sizes",
            "use_fused_vision_backbone",
            "image_resize_strategy",
            "llm_backbone_id",
            "pad_to_multiple_of",
            "text_config",
            "norm_stats",
            "timm_override_args",
        }
        kwargs = {key: data.pop(key) for key in list(data) if key in known}
        if "text_config" not in kwargs:
            raise ValueError("config.json has no text_config (the Llama language model settings)")
        kwargs["text_config"] = make_text_config(kwargs["text_config"])
        kwargs["norm_stats"] = kwargs.get("norm_stats") or {}
        return cls(**kwargs, extra={key: data[key] for key in data if key in _PASSTHROUGH_KEYS})

    def to_dict(self) -> dict[str, Any]:
        """Returns the ``config.json`` content (official field names; no remote-code mapping)."""
        text = self.text_config.to_diff_dict()
        text.pop("transformers_version", None)
        text["model_type"] = "llama"
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                    "rms_norm_eps", "pad_token_id"):
            text[key] = getattr(self.text_config, key)
        text["rope_theta"] = rope_theta(self.text_config)
        data: dict[str, Any] = {
            "model_type": MODEL_TYPE,
            "timm_model_ids": list(self.timm_model_ids),
            "image_sizes": list(self.image_sizes),
            "use_fused_vision_backbone": self.use_fused_vision_backbone,
            "image_resize_strategy": self.image_resize_strategy,
            "llm_backbone_id": self.llm_backbone_id,
            "pad_to_multiple_of": self.pad_to_multiple_of,
            "text_config": text,
            "norm_stats": copy.deepcopy(self.norm_stats),
        }
        if self.timm_override_args is not None:
            data["timm_override_args"] = copy.deepcopy(self.timm_override_args)
        for key, value in self.extra.items():
            if key not in ("auto_map",):
                data.setdefault(key, value)
        data["architectures"] = ["OpenVLAForActionPrediction"]
        return data


def make_text_config(text_config: dict[str, Any] | LlamaConfig) -> LlamaConfig:
    """Returns a LlamaConfig with the defaults the official model relies on filled in."""
    if isinstance(text_config, LlamaConfig):
        return text_config
    values = dict(text_config)
    values.pop("model_type", None)
    values.pop("architectures", None)
    for key, default in LLAMA_DEFAULTS.items():
        values.setdefault(key, default)
    theta = values.pop("rope_theta")
    values.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": float(theta)})
    return LlamaConfig(**values)


def rope_theta(text_config: LlamaConfig) -> float:
    """Returns the RoPE base of a Llama config, wherever this transformers version stores it."""
    parameters = getattr(text_config, "rope_parameters", None) or {}
    return float(parameters.get("rope_theta", getattr(text_config, "rope_theta", 10000.0)))
