"""Loading and saving OpenVLA-OFT checkpoints.

Two layouts load through the same code:

- **Official** (``moojink/openvla-7b-oft-finetuned-libero-*`` and what its training code writes): the
  merged VLA in safetensors + ``config.json`` + ``dataset_statistics.json`` (action and proprio
  statistics) + ``action_head--N_checkpoint.pt``, ``proprio_projector--N_checkpoint.pt`` and, with
  FiLM, ``vision_backbone--N_checkpoint.pt``. The ``.pt`` files are read with
  ``torch.load(weights_only=True)`` only; their DDP ``module.`` prefix is stripped. The FiLM file holds
  the whole wrapped vision backbone, LoRA sublayers included: the LoRA update is merged here
  (``W = base + alpha / r * B @ A``, alpha from ``lora_adapter/adapter_config.json``, else the
  official ``min(r, 16)``).
- **Ours** (``training/finetune.py --action-head l1`` and ``python -m openvla_ros.tiny --oft`` without
  ``--official``): ``action_head.safetensors``, ``proprio_projector.safetensors``,
  ``film.safetensors``, with the layout in ``config.json["oft"]``.

Either layout may also hold an energy model (``training/train_energy.py``): ``energy_model.safetensors``
with its sizes in ``energy_model.json``, beside the head; :func:`load_energy_model` reads it.

The action and proprio widths come from the head weights' shapes. The chunk size and the image count
are not in any weight: they come from ``config.json`` (``oft.chunk`` / ``num_actions_chunk``,
``oft.num_images`` / ``num_images_in_input``), else from the published platforms' constants matched
by action and proprio width (LIBERO: 7-D actions, 8-D proprio, K=8, 2 images; ALOHA: 14/14, K=25,
3 images; BRIDGE: 7/7, K=5, 1 image), logged; never from the command line.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights

from openvla_ros.errors import CheckpointError
from openvla_ros.model.configuration_openvla import OpenVLAConfig
from openvla_ros.model.energy import EnergyModel, EnergySpec
from openvla_ros.model.loading import load_model, official_to_internal_key, read_config
from openvla_ros.model.oft import OFTSpec, OpenVLAOFT

logger = logging.getLogger(__name__)

HEAD_NAME = "action_head.safetensors"
PROPRIO_NAME = "proprio_projector.safetensors"
FILM_NAME = "film.safetensors"
ENERGY_NAME = "energy_model.safetensors"
ENERGY_CONFIG_NAME = "energy_model.json"
# Official run files: "<component>--<step>_checkpoint.pt" (or "...--latest_checkpoint.pt").
OFFICIAL_COMPONENTS = ("action_head", "proprio_projector", "vision_backbone", "noisy_action_projector")
# The published OFT repositories and the training step of their head files.
KNOWN_HUB_REPOS = {
    "moojink/openvla-7b-oft-finetuned-libero-spatial": 150000,
    "moojink/openvla-7b-oft-finetuned-libero-object": 150000,
    "moojink/openvla-7b-oft-finetuned-libero-10": 150000,
    "moojink/openvla-7b-oft-finetuned-libero-goal": 50000,
    "moojink/openvla-7b-oft-finetuned-libero-spatial-object-goal-10": 300000,
}
# (action_dim, proprio_dim) -> (chunk, images, normalisation) of the official platforms.
PLATFORMS = {
    (7, 8): ("LIBERO", 8, 2, "bounds_q99"),
    (7, 0): ("LIBERO", 8, 1, "bounds_q99"),
    (14, 14): ("ALOHA", 25, 3, "bounds"),
    (14, 0): ("ALOHA", 25, 3, "bounds"),
    (7, 7): ("BRIDGE", 5, 1, "bounds_q99"),
}
_LORA_PART = re.compile(r"^(.*)\.(base_layer|lora_A\.default|lora_B\.default)\.(weight|bias)$")
_FILM_BLOCK = re.compile(r"^(featurizer|fused_featurizer)\.blocks\.(\d+)\.(scale|shift)\.(weight|bias)$")


def official_component_file(checkpoint_dir: Path, component: str) -> Path | None:
    """Returns the directory's single ``<component>--*checkpoint.pt`` file, None when there is none.

    Raises:
        CheckpointError: when several match (the official loader requires exactly one).
    """
    found = sorted(p for p in checkpoint_dir.glob(f"{component}--*checkpoint.pt") if p.is_file())
    if len(found) > 1:
        raise CheckpointError(
            f"{checkpoint_dir} holds {len(found)} {component} files ({', '.join(p.name for p in found)}); "
            "keep the one of the step you want to run"
        )
    return found[0] if found else None


def is_oft_checkpoint(checkpoint_dir: Path, config: OpenVLAConfig | None = None) -> bool:
    """Returns True when the directory holds an OFT model (either layout)."""
    if config is not None and "oft" in config.extra:
        return True
    if (checkpoint_dir / HEAD_NAME).is_file():
        return True
    return any(any(checkpoint_dir.glob(f"{c}--*checkpoint.pt")) for c in ("action_head", "noisy_action_projector"))


def read_torch_state(path: Path) -> dict[str, torch.Tensor]:
    """Returns the tensors of an official ``.pt`` state dict (weights only; ``module.`` stripped).

    Raises:
        CheckpointError: when the file is not a plain state dict of tensors.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle refusals and corrupt files raise many types
        raise CheckpointError(
            f"{path} cannot be read as a weights-only state dict ({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); only tensors are loaded from .pt files"
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{path} is unreadable: {exc}") from exc


def _component_state(checkpoint_dir: Path, ours: str, official: str) -> tuple[dict[str, torch.Tensor] | None, str]:
    """Returns (state dict, file name) of a head in our layout (``ours``) or the official one; (None, "")."""
    path = checkpoint_dir / ours
    if path.is_file():
        return _read_safetensors(path), path.name
    found = official_component_file(checkpoint_dir, official)
    if found is None:
        return None, ""
    return read_torch_state(found), found.name


def _head_state(checkpoint_dir: Path) -> tuple[dict[str, torch.Tensor] | None, str]:
    return _component_state(checkpoint_dir, HEAD_NAME, "action_head")


def _proprio_state(checkpoint_dir: Path) -> tuple[dict[str, torch.Tensor] | None, str]:
    return _component_state(checkpoint_dir, PROPRIO_NAME, "proprio_projector")


def _shape(state: dict[str, torch.Tensor], key: str, source: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(
            f"{source} has no {key!r} (keys: {', '.join(sorted(state)[:6])}...); it is not an OFT L1 action "
            "head / proprio projector of the official structure"
        )
    return tuple(state[key].shape)


def read_oft_spec(checkpoint_dir: Path, config: OpenVLAConfig) -> OFTSpec:
    """Returns the chunk layout of an OFT checkpoint, from its head weights and config.

    Raises:
        CheckpointError: missing/mismatched head files, an unsupported (diffusion) head, or a chunk
            size that neither the config nor a known platform gives.
    """
    if official_component_file(checkpoint_dir, "noisy_action_projector") is not None:
        raise CheckpointError(
            f"{checkpoint_dir} is an OpenVLA-OFT model with the diffusion action head "
            "(noisy_action_projector file), which this package does not run; use an L1-regression OFT "
            "checkpoint (e.g. moojink/openvla-7b-oft-finetuned-libero-spatial)"
        )
    head, head_source = _head_state(checkpoint_dir)
    if head is None:
        raise CheckpointError(
            f"{checkpoint_dir} is an OFT model without its action head: expected {HEAD_NAME} or "
            "action_head--<step>_checkpoint.pt beside the weights; copy it from the training run"
        )
    if any(k.startswith("noise_predictor.") for k in head):
        raise CheckpointError(
            f"{head_source} is a diffusion action head (noise_predictor.*), which this package does not "
            "run; use an L1-regression OFT checkpoint"
        )
    llm_dim = config.text_config.hidden_size
    action_dim = _shape(head, "model.fc2.weight", head_source)[0]
    width = _shape(head, "model.layer_norm1.weight", head_source)[0]
    fc1 = _shape(head, "model.fc1.weight", head_source)
    if width != action_dim * llm_dim or fc1[1] != width:
        raise CheckpointError(
            f"{head_source} takes inputs {width} wide, but this model's {action_dim}-D actions x hidden size "
            f"{llm_dim} = {action_dim * llm_dim}; the head belongs to another base model"
        )
    proprio, proprio_source = _proprio_state(checkpoint_dir)
    proprio_dim = 0
    if proprio is not None:
        proprio_dim = _shape(proprio, "fc1.weight", proprio_source)[1]
        if _shape(proprio, "fc2.weight", proprio_source)[0] != llm_dim:
            raise CheckpointError(
                f"{proprio_source} projects to {_shape(proprio, 'fc2.weight', proprio_source)[0]} features, "
                f"but this model's hidden size is {llm_dim}; it belongs to another base model"
            )
    film = (checkpoint_dir / FILM_NAME).is_file() or official_component_file(
        checkpoint_dir, "vision_backbone") is not None
    stated = dict(config.extra.get("oft") or {})
    if "proprio_dim" in stated and int(stated["proprio_dim"] or 0) != proprio_dim:
        found = f"{proprio_source} takes {proprio_dim}" if proprio is not None else f"there is no {PROPRIO_NAME}"
        raise CheckpointError(
            f"{checkpoint_dir}/config.json states a {stated['proprio_dim']}-value proprio input, but {found}; "
            "copy the run's files together or fix config.json"
        )
    if stated.get("film") and not film:
        raise CheckpointError(f"{checkpoint_dir}/config.json states FiLM, but there is no {FILM_NAME}; copy it "
                              "from the training run")
    platform = PLATFORMS.get((action_dim, proprio_dim))
    chunk = stated.get("chunk", config.extra.get("num_actions_chunk"))
    images = stated.get("num_images", config.extra.get("num_images_in_input"))
    normalization = stated.get("normalization", config.extra.get("action_normalization"))
    if chunk is not None and images is not None and normalization is None and platform is None:
        logger.info("%s: no action_normalization in config.json; using bounds_q99 (q01/q99), the OFT default",
                    checkpoint_dir)
        normalization = "bounds_q99"
    if chunk is None or images is None or normalization is None:
        if platform is None:
            raise CheckpointError(
                f"{checkpoint_dir}: the chunk size and image count are not in any weight, config.json does not "
                f"state them and {action_dim}-D actions with {proprio_dim}-D proprio match no published platform; "
                'add "num_actions_chunk": K and "num_images_in_input": N to config.json'
            )
        name, default_chunk, default_images, default_norm = platform
        logger.info(
            "%s: %d-D actions with %d-D proprio: the %s layout (chunk %s, %s image(s), %s); state "
            "num_actions_chunk / num_images_in_input in config.json to override",
            checkpoint_dir, action_dim, proprio_dim, name, chunk or default_chunk, images or default_images,
            normalization or default_norm,
        )
        chunk = chunk or default_chunk
        images = images or default_images
        normalization = normalization or default_norm
    try:
        return OFTSpec(
            chunk=int(chunk), action_dim=action_dim, proprio_dim=proprio_dim, num_images=int(images),
            film=film, normalization=str(normalization), head_hidden_dim=fc1[0],
        )
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{checkpoint_dir}/config.json: {exc}") from exc


def _lora_alpha(checkpoint_dir: Path, rank: int) -> float:
    path = checkpoint_dir / "lora_adapter" / "adapter_config.json"
    if path.is_file():
        try:
            settings = json.loads(path.read_text())
            return float(settings.get("lora_alpha", min(rank, 16)))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is unreadable: {exc}") from exc
    return float(min(rank, 16))


def merge_film_backbone(state: dict[str, torch.Tensor], checkpoint_dir: Path, source: str
                        ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Splits an official FiLM ``vision_backbone`` state into (vision weights, FiLM weights).

    Vision keys come back as the model's ``vision_backbone.*`` names with every LoRA layer merged;
    FiLM keys as ``featurizer.N.scale.weight`` etc. (the :class:`~openvla_ros.model.oft.VisionFiLM`
    names).
    """
    vision: dict[str, torch.Tensor] = {}
    film: dict[str, torch.Tensor] = {}
    lora: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        name = key[len("vision_backbone."):] if key.startswith("vision_backbone.") else key
        name = re.sub(r"\.blocks\.(\d+)\.block\.", r".blocks.\1.", name)
        film_match = _FILM_BLOCK.match(name)
        if film_match:
            tower, block, kind, param = film_match.groups()
            film[f"{tower}.{block}.{kind}.{param}"] = tensor
            continue
        lora_match = _LORA_PART.match(name)
        if lora_match:
            layer, part, param = lora_match.groups()
            lora.setdefault(layer, {})[f"{part}.{param}"] = tensor
            continue
        vision[official_to_internal_key(f"vision_backbone.{name}")] = tensor
    for layer, parts in lora.items():
        try:
            base, down, up = parts["base_layer.weight"], parts["lora_A.default.weight"], parts["lora_B.default.weight"]
        except KeyError as exc:
            raise CheckpointError(f"{source}: LoRA layer {layer} lacks {exc.args[0]}") from exc
        rank = down.shape[0]
        scale = _lora_alpha(checkpoint_dir, rank) / rank
        delta = (up.float().flatten(1) @ down.float().flatten(1)).reshape(base.shape) * scale
        vision[official_to_internal_key(f"vision_backbone.{layer}.weight")] = (base.float() + delta).to(base.dtype)
        if "base_layer.bias" in parts:
            vision[official_to_internal_key(f"vision_backbone.{layer}.bias")] = parts["base_layer.bias"]
    return vision, film


def load_component_state(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str,
                         device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
    """Loads ``state`` into ``module`` (all keys, right shapes). With ``dtype`` the tensors are converted (to
    ``device``) and become the module's parameters, so a module built on the ``meta`` device is filled
    without ever existing in float32."""
    expected = set(module.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not fit the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}; it belongs to another model "
            "or layout"
        )
    assign = dtype is not None
    if assign:
        state = {key: value.to(device=device, dtype=dtype if value.is_floating_point() else None)
                 for key, value in state.items()}
    try:
        module.load_state_dict(state, strict=True, assign=assign)
    except RuntimeError as exc:
        raise CheckpointError(f"{source} does not fit the model: {exc}") from exc


def component_file_bytes(checkpoint_dir: Path) -> int:
    """Returns the size of the head files beside the VLA (either layout): what loading them reads at most at once."""
    names = [HEAD_NAME, PROPRIO_NAME, FILM_NAME]
    files = [checkpoint_dir / name for name in names]
    files += [p for component in OFFICIAL_COMPONENTS for p in checkpoint_dir.glob(f"{component}--*checkpoint.pt")]
    return sum(path.stat().st_size for path in files if path.is_file())


def load_oft_model(
    checkpoint_dir: Path,
    *,
    dtype: str = "auto",
    device: str = "auto",
    quantization: str = "none",
    config: OpenVLAConfig | None = None,
) -> OpenVLAOFT:
    """Returns the OFT model of a checkpoint directory (either layout), in eval mode.

    The VLA loads (and quantises) exactly as a token-head OpenVLA; the heads run in its compute dtype.

    Raises:
        CheckpointError, QuantizationError: with the problem and the way out.
    """
    config = config or read_config(checkpoint_dir)
    spec = read_oft_spec(checkpoint_dir, config)
    vla = load_model(checkpoint_dir, dtype=dtype, device=device, quantization=quantization, config=config,
                     extra_bytes=component_file_bytes(checkpoint_dir))
    compute_dtype = vla.language_model.get_input_embeddings().weight.dtype
    with init_empty_weights(include_buffers=False):  # the heads' weights come from their files only
        model = OpenVLAOFT(vla, spec)
    head, head_source = _head_state(checkpoint_dir)
    load_component_state(model.action_head, head, head_source, vla.device, compute_dtype)
    if spec.proprio_dim:
        proprio, proprio_source = _proprio_state(checkpoint_dir)
        load_component_state(model.proprio_projector, proprio, proprio_source, vla.device, compute_dtype)
    if spec.film:
        _load_film(model, checkpoint_dir)
    model.action_head.to(device=vla.device, dtype=compute_dtype)
    if model.proprio_projector is not None:
        model.proprio_projector.to(device=vla.device, dtype=compute_dtype)
    if model.film is not None:
        model.film.to(device=vla.device, dtype=vla.vision_backbone.featurizer.patch_embed.proj.weight.dtype)
    model.eval()
    model.requires_grad_(False)
    return model


def _load_film(model: OpenVLAOFT, checkpoint_dir: Path) -> None:
    ours = checkpoint_dir / FILM_NAME
    towers_dtype = model.vla.vision_backbone.featurizer.patch_embed.proj.weight.dtype
    if ours.is_file():
        load_component_state(model.film, _read_safetensors(ours), ours.name, model.vla.device, towers_dtype)
        return
    path = official_component_file(checkpoint_dir, "vision_backbone")
    vision, film = merge_film_backbone(read_torch_state(path), checkpoint_dir, path.name)
    load_component_state(model.film, film, path.name, model.vla.device, towers_dtype)
    backbone_state = {k: v for k, v in model.vla.state_dict().items() if k.startswith("vision_backbone.")}
    missing = sorted(set(backbone_state) - set(vision))
    unexpected = sorted(set(vision) - set(backbone_state))
    if missing or unexpected:
        raise CheckpointError(
            f"{path.name} does not fit the vision backbone: missing {missing[:5]}, unexpected {unexpected[:5]}; "
            "it belongs to another model"
        )
    dtype = model.vla.vision_backbone.featurizer.patch_embed.proj.weight.dtype
    model.vla.load_state_dict({k: v.to(dtype) for k, v in vision.items()}, strict=False)


def oft_state_files(model: OpenVLAOFT) -> dict[str, dict[str, torch.Tensor]]:
    """Returns our layout's head files ({file name: state dict}) for :func:`~openvla_ros.model.loading.save_checkpoint`."""
    files = {HEAD_NAME: model.action_head.state_dict()}
    if model.proprio_projector is not None:
        files[PROPRIO_NAME] = model.proprio_projector.state_dict()
    if model.film is not None:
        files[FILM_NAME] = model.film.state_dict()
    return files


def save_oft_checkpoint(model: OpenVLAOFT, out_dir: Path, **kwargs: Any) -> Path:
    """Writes an OFT model in our layout (heads as safetensors, the layout in ``config.json["oft"]``).

    Keyword arguments go to :func:`~openvla_ros.model.loading.save_checkpoint`.
    """
    from openvla_ros.model.loading import save_checkpoint

    model.vla.config.extra["oft"] = model.spec.to_dict()
    return save_checkpoint(model.vla, Path(out_dir), extra_weights=oft_state_files(model), **kwargs)


def has_energy_model(checkpoint_dir: Path) -> bool:
    """Returns True when the directory holds an energy model file."""
    return (Path(checkpoint_dir) / ENERGY_NAME).is_file()


def load_energy_model(checkpoint_dir: Path, spec: OFTSpec, context_dim: int,
                      device: torch.device | str = "cpu") -> EnergyModel | None:
    """Returns the directory's energy model (float32, eval mode, frozen) on ``device``; None without one.

    Raises:
        CheckpointError: the sizes file is missing or unreadable, or the model does not fit the OFT model
            (hidden size, action width, chunk size) or its own sizes.
    """
    checkpoint_dir = Path(checkpoint_dir)
    weights = checkpoint_dir / ENERGY_NAME
    if not weights.is_file():
        return None
    sizes = checkpoint_dir / ENERGY_CONFIG_NAME
    try:
        stated = json.loads(sizes.read_text())
        energy_spec = EnergySpec.from_dict(stated["spec"])
    except FileNotFoundError:
        raise CheckpointError(
            f"{weights} has no {ENERGY_CONFIG_NAME} beside it (the energy model's sizes); copy both files from "
            "the energy training run"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{sizes} is unreadable or malformed: {exc}") from exc
    found = (energy_spec.context_dim, energy_spec.action_dim, energy_spec.chunk)
    expected = (context_dim, spec.action_dim, spec.chunk)
    if found != expected:
        raise CheckpointError(
            f"{weights.name} was trained for hidden size {found[0]}, {found[1]}-D actions and chunks of {found[2]}, "
            f"but this OFT model has hidden size {expected[0]}, {expected[1]}-D actions and chunks of {expected[2]}; "
            "it belongs to another model: train one for this model (training/train_energy.py) or remove it"
        )
    model = EnergyModel(energy_spec)
    load_component_state(model, _read_safetensors(weights), weights.name)
    model.to(device=device, dtype=torch.float32)
    model.eval()
    model.requires_grad_(False)
    return model


def save_energy_model(model: EnergyModel, directory: Path, info: dict[str, Any] | None = None) -> Path:
    """Writes ``energy_model.safetensors`` and ``energy_model.json`` (sizes + ``info``) into ``directory``.

    Each file is written beside its final name and renamed into place, so a reader never sees half a file.
    Returns the weights' path.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / ENERGY_NAME
    staging = directory / f".{ENERGY_NAME}.partial"
    save_file({k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}, str(staging))
    sizes = directory / ENERGY_CONFIG_NAME
    sizes_staging = directory / f".{ENERGY_CONFIG_NAME}.partial"
    sizes_staging.write_text(json.dumps({"spec": model.spec.to_dict(), **(info or {})}, indent=2))
    sizes_staging.rename(sizes)
    staging.rename(weights)
    return weights
