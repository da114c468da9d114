"""Loading and saving OpenVLA checkpoints in the Hugging Face layout, without remote code.

A checkpoint directory holds ``config.json`` (``model_type: openvla``), ``model.safetensors`` or
sharded ``model-*.safetensors`` with ``model.safetensors.index.json``, tokenizer files,
``preprocessor_config.json`` (the image processor's resize and normalisation settings) and often
``dataset_statistics.json``. Any ``auto_map`` or ``*.py`` file in it is ignored: only safetensors
weights and JSON are read. Hub ids are resolved with ``huggingface_hub.snapshot_download`` restricted to
those files.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from openvla_ros.errors import CheckpointError, QuantizationError
from openvla_ros.model.configuration_openvla import OpenVLAConfig
from openvla_ros.model.memory import (
    LOAD_GROUP_BYTES,
    check_fits,
    check_index_total,
    parameter_count,
    read_headers,
    read_tensors,
)
from openvla_ros.model.modeling_openvla import OpenVLAForActionPrediction
from openvla_ros.model.processor import ImageSettings, default_image_settings

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
STATISTICS_NAME = "dataset_statistics.json"
PREPROCESSOR_NAME = "preprocessor_config.json"
SINGLE_WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# dtype "auto" on the CPU is float32 up to this many parameters, bfloat16 above (a 7B model: 30 GB in float32).
AUTO_FLOAT32_LIMIT = 2 * 10**9
HUB_FILE_PATTERNS = [
    "*.json", "*.safetensors", "tokenizer.model",
    # OpenVLA-OFT heads (read with torch.load(weights_only=True)) and the LoRA settings FiLM needs.
    "action_head--*checkpoint.pt", "proprio_projector--*checkpoint.pt", "vision_backbone--*checkpoint.pt",
]
# The merged weights already hold the LoRA update; the adapter itself is not needed.
HUB_IGNORE_PATTERNS = ["lora_adapter/*.safetensors"]
QUANTIZATIONS = ("none", "8bit", "4bit")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# DINOv2 LayerScale weights are saved as `scale_factor` by the official code and named `gamma` in timm.
_OFFICIAL_LAYERSCALE = re.compile(r"^(vision_backbone\..*\.ls[12])\.scale_factor$")
_INTERNAL_LAYERSCALE = re.compile(r"^(vision_backbone\..*\.ls[12])\.gamma$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def official_to_internal_key(key: str) -> str:
    """Returns the module key of an official checkpoint weight name (LayerScale rename)."""
    return _OFFICIAL_LAYERSCALE.sub(r"\1.gamma", key)


def internal_to_official_key(key: str) -> str:
    """Returns the official checkpoint name of a module key (LayerScale rename)."""
    return _INTERNAL_LAYERSCALE.sub(r"\1.scale_factor", key)


def resolve_checkpoint_dir(model: str) -> Path:
    """Returns the local directory of ``model``: a directory path, or a hub id fetched/cached locally.

    Raises:
        CheckpointError: when the path does not exist, or the hub id cannot be fetched (offline and
            not in the local cache, unknown repository).
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{model} is a file; pass the checkpoint directory that holds config.json")
    if not _HUB_ID.match(model) or model.startswith((".", "/", "~")):
        raise CheckpointError(
            f"checkpoint directory {model} does not exist; pass an existing directory or a hub id "
            "such as openvla/openvla-7b"
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(
            repo_id=model, allow_patterns=HUB_FILE_PATTERNS, ignore_patterns=HUB_IGNORE_PATTERNS
        ))
    except Exception as exc:  # the hub client raises many unrelated types for one cause
        raise CheckpointError(
            f"{model!r} is not a local directory (relative to {Path.cwd()}), and as a hub id it cannot be "
            f"fetched from the model hub nor found in the local cache ({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); on a machine with network access run "
            f"`hf download {model}` and pass the downloaded directory (or copy the cache, HF_HOME)"
        ) from exc


def read_config(checkpoint_dir: Path) -> OpenVLAConfig:
    """Returns the checkpoint's config with ``dataset_statistics.json`` merged into ``norm_stats``.

    Raises:
        CheckpointError: when config.json is missing, not JSON, or not an OpenVLA config.
    """
    config_path = checkpoint_dir / CONFIG_NAME
    data = _read_json(config_path, what="the model config")
    try:
        config = OpenVLAConfig.from_dict(data)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{config_path} is not a usable OpenVLA config: {exc}") from exc
    statistics_path = checkpoint_dir / STATISTICS_NAME
    if statistics_path.is_file():
        for key, value in _read_json(statistics_path, what="dataset statistics").items():
            config.norm_stats.setdefault(key, value)
    return config


def staging_prefix(out_dir: Path) -> str:
    """Returns the name prefix of the directory beside ``out_dir`` that a checkpoint is written into
    before it is renamed to ``out_dir`` (what a killed write leaves behind)."""
    return f".{out_dir.name}."


@contextmanager
def fresh_directory(parent: Path, prefix: str) -> Iterator[Path]:
    """Yields a new empty directory ``parent/<prefix><random>``; whatever is left of it when the block
    ends (returned, raised or interrupted) is removed, so a block that keeps its work renames it away.

    The name is chosen before the directory is made and the making happens inside the clean-up, so an
    interrupt at any point leaves nothing behind (``tempfile.mkdtemp`` followed by a ``try`` leaves a
    window between the two).
    """
    path = Path(parent) / f"{prefix}{secrets.token_hex(6)}"
    try:
        path.mkdir()
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def scratch_beside(out_dir: Path, tag: str = "") -> Iterator[Path]:
    """Yields a fresh scratch directory beside ``out_dir`` (its name starts with :func:`staging_prefix`
    plus ``tag``); it is removed when the block ends, whether it returned or raised. What the block
    writes there reaches ``out_dir`` only through :func:`move_into_place`."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with fresh_directory(out_dir.parent, staging_prefix(out_dir) + tag) as scratch:
        yield scratch


def move_into_place(written: Path, out_dir: Path) -> None:
    """Renames the finished directory ``written`` to ``out_dir`` (an empty ``out_dir`` is replaced)."""
    if out_dir.exists():
        out_dir.rmdir()
    written.rename(out_dir)


@contextmanager
def staged_directory(out_dir: Path) -> Iterator[Path]:
    """Yields a fresh directory beside ``out_dir`` to write into; renames it to ``out_dir`` (an empty one is
    replaced) when the block ends, removes it when the block raises. Nothing half-written ever has the
    final name."""
    with scratch_beside(out_dir) as staging:
        yield staging
        staging.chmod(0o755)
        for path in staging.iterdir():
            if path.is_file():
                path.chmod(0o644)
        move_into_place(staging, out_dir)


def read_image_settings(checkpoint_dir: Path, config: OpenVLAConfig) -> ImageSettings:
    """Returns the image settings the official processor would apply to this checkpoint.

    They come from ``preprocessor_config.json`` when the file exists: its ``tvf_*`` parameters (what the
    official ``apply_transform`` reads) where present, else ``means``, ``stds``, ``input_sizes``,
    ``image_resize_strategy`` and ``interpolations``; without the file, from the config's image size and
    resize strategy with the textbook DINOv2/SigLIP constants.

    Raises:
        CheckpointError: when the file is unreadable or its settings do not fit the model.
    """
    path = checkpoint_dir / PREPROCESSOR_NAME
    towers = 2 if config.use_fused_vision_backbone else 1
    if not path.is_file():
        defaults = default_image_settings(config.use_fused_vision_backbone, config.image_size)
        return ImageSettings(
            image_size=defaults.image_size,
            resize_strategy=config.image_resize_strategy,
            interpolation=defaults.interpolation,
            means=defaults.means,
            stds=defaults.stds,
        )
    data = _read_json(path, what="the image processor settings")
    try:
        settings = ImageSettings.from_preprocessor_config(data, num_towers=towers)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(
            f"{path} does not fit the model: {exc}; fix the file, or remove it to use the default "
            "DINOv2/SigLIP settings"
        ) from exc
    if settings.image_size != config.image_size:
        raise CheckpointError(
            f"{path} gives input size {settings.image_size}, but config.json's image_sizes say "
            f"{config.image_size}; make them agree"
        )
    return settings


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(
            f"{path} not found: {path.parent} is not an OpenVLA checkpoint (it needs {path.name} for {what})"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} ({what}) is unreadable or not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} ({what}) must hold a JSON object")
    return data


def weight_files(checkpoint_dir: Path) -> list[Path]:
    """Returns the safetensors files of a checkpoint, in index order.

    Raises:
        CheckpointError: when there are none, a shard named by the index is missing, or only
            pickle (``*.bin``) weights exist.
    """
    index_path = checkpoint_dir / INDEX_NAME
    if index_path.is_file():
        index = _read_json(index_path, what="the weight index")
        names = sorted(set(index.get("weight_map", {}).values()))
        if not names:
            raise CheckpointError(f"{index_path} has an empty weight_map")
        files = [checkpoint_dir / name for name in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(
                f"checkpoint {checkpoint_dir} is incomplete: missing shard(s) {', '.join(missing)}; "
                "download it again"
            )
        return files
    if (checkpoint_dir / SINGLE_WEIGHTS_NAME).is_file():
        return [checkpoint_dir / SINGLE_WEIGHTS_NAME]
    shards = sorted(checkpoint_dir.glob("model-*.safetensors"))
    if shards:
        return shards
    if list(checkpoint_dir.glob("*.bin")):
        raise CheckpointError(
            f"{checkpoint_dir} holds only pickle (*.bin) weights, which are not loaded for safety; "
            "convert them to safetensors"
        )
    raise CheckpointError(f"no *.safetensors weights in {checkpoint_dir}")


def _iter_shard(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields the tensors of one weight file, each in memory of its own (see :func:`memory.read_tensors`)."""
    yield from read_tensors(path)


def resolve_device(device: str) -> torch.device:
    """Returns the torch device for ``auto`` / ``cpu`` / ``cuda`` / ``cuda:N``.

    Raises:
        QuantizationError: when CUDA is requested but not available, or the name is unknown.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if re.fullmatch(r"cuda(:\d+)?", device):
        if not torch.cuda.is_available():
            raise QuantizationError(f"device {device!r} requested but CUDA is not available; use device 'cpu'")
        return torch.device(device)
    raise QuantizationError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Returns the compute dtype: ``auto`` is bfloat16 on CUDA and float32 on CPU.

    Raises:
        QuantizationError: for an unknown dtype name.
    """
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise QuantizationError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _require_bitsandbytes(quantization: str):
    try:
        import bitsandbytes
    except ImportError as exc:
        raise QuantizationError(
            f"quantization {quantization!r} needs bitsandbytes, which is not importable ({exc}); "
            "pip install bitsandbytes, or use quantization 'none'"
        ) from exc
    if quantization == "8bit":
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    return bitsandbytes


def quantizable_linears(model: OpenVLAForActionPrediction) -> list[str]:
    """Returns the names of the Linear layers that quantisation replaces: the LLM's, lm_head excluded.

    The vision backbone, projector and lm_head stay in the compute dtype (accuracy, and bitsandbytes'
    CPU 4-bit path needs output sizes that are multiples of 32).
    """
    return [
        f"language_model.model.{name}"
        for name, module in model.language_model.model.named_modules()
        if isinstance(module, nn.Linear)
    ]


def _quantized_linear(linear: nn.Linear, quantization: str, compute_dtype: torch.dtype, device: torch.device):
    bnb = _require_bitsandbytes(quantization)
    weight = linear.weight.data
    bias = linear.bias is not None
    if quantization == "4bit":
        layer = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=bias, compute_dtype=compute_dtype,
            quant_type="nf4", device="meta",
        )
        layer.weight = bnb.nn.Params4bit(weight.to(compute_dtype), requires_grad=False, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False, threshold=6.0,
            device="meta",
        )
        layer.weight = bnb.nn.Int8Params(weight.to(compute_dtype), requires_grad=False, has_fp16_weights=False)
    if bias:
        layer.bias = nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
    return layer.to(device)


def quantize_llm(model: OpenVLAForActionPrediction, quantization: str, compute_dtype: torch.dtype,
                 device: torch.device) -> None:
    """Replaces the LLM's Linear layers of a loaded model by bitsandbytes 8-bit or 4-bit layers, one by one."""
    for name in quantizable_linears(model):
        _set_submodule(model, name, _quantized_linear(model.get_submodule(name), quantization, compute_dtype, device))


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name), child, module)


def load_model(
    checkpoint_dir: Path,
    *,
    dtype: str = "auto",
    device: str = "auto",
    quantization: str = "none",
    config: OpenVLAConfig | None = None,
    extra_bytes: int = 0,
) -> OpenVLAForActionPrediction:
    """Returns the model of a local checkpoint directory, in eval mode on ``device``.

    Weights are streamed shard by shard into an empty model; with ``quantization`` 8bit/4bit the LLM's
    Linear layers become bitsandbytes layers as soon as they are loaded. ``extra_bytes`` (what the caller
    loads beside the model, e.g. OFT heads) counts in the memory check made before the load.

    Raises:
        CheckpointError: missing/corrupt files, or weights that do not match the config (missing or
            unexpected keys, wrong shapes).
        QuantizationError: unknown quantisation/dtype/device, or bitsandbytes unavailable.
    """
    from accelerate import init_empty_weights

    if quantization not in QUANTIZATIONS:
        raise QuantizationError(f"unknown quantization {quantization!r}; use one of {', '.join(QUANTIZATIONS)}")
    target_device = resolve_device(device)
    compute_dtype = resolve_dtype(dtype, target_device)
    if quantization != "none":
        _require_bitsandbytes(quantization)
    config = config or read_config(checkpoint_dir)
    files = weight_files(checkpoint_dir)
    headers = read_headers(files)  # a truncated shard is refused here, before anything is loaded
    if dtype == "auto" and target_device.type == "cpu" and parameter_count(headers) > AUTO_FLOAT32_LIMIT:
        compute_dtype = torch.bfloat16  # a full-size model in float32 needs 30 GB: only when asked for
        logger.info("dtype auto: bfloat16 on the CPU for a model of %.1f B parameters (pass dtype float32 for "
                    "float32)", parameter_count(headers) / 1e9)
    check_fits(checkpoint_dir, headers, quantization, compute_dtype, target_device, extra_bytes=extra_bytes)
    with init_empty_weights(include_buffers=False):
        model = OpenVLAForActionPrediction(config)
    expected = set(model.state_dict())
    pending_linears = set(quantizable_linears(model)) if quantization != "none" else set()
    # Weights go straight to the target device in the compute dtype; only those of the Linear layers about to
    # be quantised wait on the CPU (bitsandbytes quantises them as it moves them to the device).
    quantized_weights = {f"{name}.{part}" for name in pending_linears for part in ("weight", "bias")}
    seen: set[str] = set()
    unexpected: list[str] = []
    def assign(group: dict[str, torch.Tensor], path: Path) -> None:
        """Puts a group of loaded weights into the model and quantises the Linear layers now complete."""
        try:
            model.load_state_dict(group, strict=False, assign=True)
        except RuntimeError as exc:
            raise CheckpointError(f"weights in {path.name} do not fit the architecture in config.json: {exc}") from exc
        seen.update(group)
        for name in sorted(pending_linears):
            linear = model.get_submodule(name)
            if all(not p.is_meta for p in linear.parameters()):
                _set_submodule(model, name, _quantized_linear(linear, quantization, compute_dtype, target_device))
                pending_linears.discard(name)

    # Weights go in by groups of at most LOAD_GROUP_BYTES, each quantised as soon as it is complete: a
    # 4-bit load holds the quantised model plus one group, never a whole 7 GB shard in bf16.
    for path in files:
        group: dict[str, torch.Tensor] = {}
        group_bytes = 0
        for key, tensor in _iter_shard(path):
            name = official_to_internal_key(key)
            if name not in expected:
                unexpected.append(key)
                continue
            place = torch.device("cpu") if name in quantized_weights else target_device
            group[name] = tensor.to(device=place, dtype=compute_dtype if tensor.is_floating_point() else None)
            group_bytes += group[name].numel() * group[name].element_size()
            if group_bytes >= LOAD_GROUP_BYTES:
                assign(group, path)
                group, group_bytes = {}, 0
        if group:
            assign(group, path)
        del group
    missing = sorted(expected - seen)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {checkpoint_dir} does not match its config: {len(missing)} missing weight(s) "
            f"{_preview(missing)} and {len(unexpected)} unexpected weight(s) {_preview(unexpected)}; "
            "the files may be incomplete or from another architecture"
        )
    check_index_total(checkpoint_dir / INDEX_NAME, headers)
    move_buffers(model, target_device)  # the weights are there already; buffers built with the model are not
    model.eval()
    model.requires_grad_(False)
    return model


def move_buffers(model: nn.Module, device: torch.device) -> None:
    """Moves every buffer of ``model`` to ``device`` and leaves its parameters where they are."""
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None and buffer.device != device:
                setattr(module, name, buffer.to(device))


def _preview(names: Iterable[str], limit: int = 5) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}]"


def load_tokenizer(checkpoint_dir: Path):
    """Returns the checkpoint's tokenizer (never running code from the checkpoint).

    The class comes from ``tokenizer_config.json`` when it is a Llama tokenizer, otherwise the generic
    fast tokenizer reads ``tokenizer.json``.

    Raises:
        CheckpointError: when no tokenizer files are present or they cannot be read.
    """
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast

    if not any((checkpoint_dir / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise CheckpointError(
            f"{checkpoint_dir} has no tokenizer (tokenizer.json or tokenizer.model); copy the base model's "
            "tokenizer files into it"
        )
    settings_path = checkpoint_dir / "tokenizer_config.json"
    settings = _read_json(settings_path, what="tokenizer settings") if settings_path.is_file() else {}
    is_llama = str(settings.get("tokenizer_class", "LlamaTokenizer")).startswith("LlamaTokenizer")
    tokenizer_class = LlamaTokenizer if is_llama else PreTrainedTokenizerFast
    try:
        return tokenizer_class.from_pretrained(str(checkpoint_dir))
    except Exception as exc:  # tokenizers/transformers raise a variety of types for bad files
        raise CheckpointError(f"cannot load the tokenizer of {checkpoint_dir}: {exc}") from exc


def save_checkpoint(
    model: OpenVLAForActionPrediction,
    out_dir: Path,
    *,
    tokenizer=None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 1024**3,
    image_settings: ImageSettings | None = None,
    extra_weights: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Writes ``model`` in the official layout (official weight names) and returns ``out_dir``.

    The directory is written beside ``out_dir`` and renamed into place, so an interrupted save never
    leaves a half-written checkpoint. ``dataset_statistics.json`` mirrors ``config.norm_stats``;
    ``preprocessor_config.json`` holds ``image_settings`` (pass the base checkpoint's, from
    :func:`read_image_settings`; the textbook settings when None). ``extra_weights`` maps file names
    to state dicts written beside the model as safetensors (the OFT heads).

    Raises:
        CheckpointError: when ``out_dir`` exists and is not empty.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CheckpointError(f"{out_dir} exists and is not empty; choose a new directory or remove it")
    with staged_directory(out_dir) as staging:
        state = {
            internal_to_official_key(key): (tensor.to(dtype) if dtype and tensor.is_floating_point() else tensor)
            .detach().cpu().contiguous()
            for key, tensor in model.state_dict().items()
        }
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for key in sorted(state):
            nbytes = state[key].numel() * state[key].element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][key] = state[key]
            size += nbytes
        if len(shards) == 1:
            save_file(shards[0], str(staging / SINGLE_WEIGHTS_NAME), metadata={"format": "pt"})
        else:
            weight_map = {}
            for number, shard in enumerate(shards, start=1):
                name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(staging / name), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (staging / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
        for name, extra in (extra_weights or {}).items():
            tensors = {
                key: (t.to(dtype) if dtype and t.is_floating_point() else t).detach().cpu().contiguous()
                for key, t in extra.items()
            }
            save_file(tensors, str(staging / name), metadata={"format": "pt"})
        config_dict = model.config.to_dict()
        config_dict["torch_dtype"] = str(dtype or next(iter(state.values())).dtype).replace("torch.", "")
        (staging / CONFIG_NAME).write_text(json.dumps(config_dict, indent=2))
        if model.config.norm_stats:
            (staging / STATISTICS_NAME).write_text(json.dumps(model.config.norm_stats, indent=2))
        fused = model.config.use_fused_vision_backbone
        settings = image_settings or default_image_settings(fused, model.config.image_size)
        (staging / PREPROCESSOR_NAME).write_text(json.dumps(settings.to_preprocessor_config(fused), indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
            vocab_file = getattr(tokenizer, "vocab_file", None)
            if vocab_file and os.path.isfile(vocab_file):
                shutil.copyfile(vocab_file, staging / "tokenizer.model")
    return out_dir
