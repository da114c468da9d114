"""Loading the node's model from its parameter values, and checking the values fit it (no DDS).

:func:`load_model` is what ``configure`` does before any subscription exists: set torch's thread count,
load the policy (an OpenVLA-OFT checkpoint as a chunked policy, anything else in token mode), then check
the chunk-mode parameters against the model. A model that does not load, or parameters that do not fit
it, raise :class:`ModelSetupError`; the node then stays unconfigured and says why.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from openvla_ros.errors import OpenVLAError
from openvla_ros.ros.chunk_mode import ChunkModel, chunk_model_of, configuration_problems
from openvla_ros.ros.control_core import Log

PolicyLoader = Callable[[dict[str, Any]], Any]


class ModelSetupError(Exception):
    """The model did not load (``loaded`` False) or the parameters do not fit it (``loaded`` True)."""

    def __init__(self, reason: str, loaded: bool) -> None:
        super().__init__(reason)
        self.loaded = loaded


@dataclass(frozen=True)
class LoadedModel:
    """A loaded policy: its chunk layout (None in token mode), the status line and the torch threads."""

    policy: Any
    chunk_model: ChunkModel | None
    status: str
    threads: int


def load_policy(values: dict[str, Any]) -> Any:
    """Returns the policy that the node's parameter values describe: an
    :class:`~openvla_ros.model.oft_policy.OFTPolicy` (chunk mode) for an OpenVLA-OFT checkpoint, else an
    :class:`~openvla_ros.model.policy.OpenVLAPolicy` (token mode).

    Raises:
        OpenVLAError: when the model cannot be loaded (the node reports it and stays unconfigured).
    """
    from openvla_ros.serve.client import RemotePolicy, is_remote

    if is_remote(values["model"]):  # a policy server runs the model: frames go there, actions come back
        return RemotePolicy(values["model"], api_key=values["api_key"] or os.environ.get("OPENVLA_API_KEY"),
                            timeout_s=float(values["max_image_age_s"]), jpeg_quality=int(values["remote_jpeg_quality"]),
                            unnorm_key=values["unnorm_key"] or None)
    from openvla_ros.model.oft_policy import load_policy_auto

    return load_policy_auto(
        values["model"],
        quantization=values["quantization"],
        dtype=values["dtype"],
        device=values["device"],
        adapter=values["adapter"] or None,
        unnorm_key=values["unnorm_key"] or None,
        center_crop=True if values["center_crop"] else (None if values["center_crop_auto"] else False),
        rotate_180=values["rotate_180"],
        decoding=values["decoding"],
        energy_steps=values["energy_steps"],
        energy_step_size=values["energy_step_size"],
        energy_max_step_fraction=values["energy_max_step_fraction"],
    )


def auto_cpu_threads(cpu_count: int | None = None) -> int:
    """Returns the torch thread count for ``cpu_threads: 0``: every core but one, at least one.

    On a 2-core machine two inference threads made the step's tail ten times longer whenever anything
    else ran (the camera driver, DDS, the executor): one core is left to them.
    """
    cores = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    return max(1, cores - 1)


def load_model(loader: PolicyLoader, values: dict[str, Any], log: Log) -> LoadedModel:
    """Loads the model ``values`` describe with ``loader`` and checks the chunk-mode values against it.

    Raises:
        ModelSetupError: naming what failed; a model that loaded but does not fit is released first.
    """
    started = time.perf_counter()
    try:
        import torch

        threads = int(values["cpu_threads"]) or auto_cpu_threads()
        torch.set_num_threads(threads)
        policy = loader(values)
    except OpenVLAError as exc:
        raise ModelSetupError(f"{type(exc).__name__}: {exc}", loaded=False) from exc
    except Exception as exc:  # a model that fails to load must not take the node down
        raise ModelSetupError(f"unexpected {type(exc).__name__} while loading: {exc}", loaded=False) from exc
    chunk_model = chunk_model_of(policy)
    errors, warnings = configuration_problems(chunk_model, values)
    for warning in warnings:
        log.warning(warning)
    if errors:
        policy.release()
        raise ModelSetupError("; ".join(errors), loaded=True)
    mode = "token mode" if chunk_model is None else (
        f"chunk mode: K = {chunk_model.chunk_size}, {chunk_model.num_images} image(s), "
        f"proprio {chunk_model.proprio_dim or 'none'}"
    )
    status = f"loaded in {time.perf_counter() - started:.1f} s (unnorm_key {policy.unnorm_key}; {mode})"
    transform = getattr(policy, "image_transform", None)
    if transform is not None and transform.center_crop and not values["center_crop"]:
        log.info(
            "center_crop turned on: the model was fine-tuned with image augmentation (random 90%-area "
            "crops); set center_crop_auto: false to keep it off"
        )
    return LoadedModel(policy, chunk_model, status, threads)
