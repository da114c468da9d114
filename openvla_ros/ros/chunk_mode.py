"""What chunk mode needs to know of a policy and its inputs, without a node.

A *chunked* policy (OpenVLA-OFT) has ``is_chunked = True``, ``chunk_size`` (K), ``action_dim`` (A),
``num_images`` (1 + wrist cameras), ``proprio_dim`` (0 = none) and
``predict_chunk(image, instruction, wrist_images=(), proprio=None) -> float64[K, A]``; a token policy
has no ``is_chunked``. :func:`configuration_problems` checks such a policy against the node's parameter
values before the node subscribes to anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from openvla_ros.model.action_codec import ACTION_NAMES
from openvla_ros.ros.control import MAX_CHUNK_RATE_HZ, MAX_RATE_HZ


@dataclass(frozen=True)
class ChunkModel:
    """The shape of a chunked policy's output and inputs."""

    chunk_size: int
    action_dim: int
    num_images: int
    proprio_dim: int
    has_energy: bool = False  # an energy model for refinement (energy_steps > 0)

    @property
    def wrist_cameras(self) -> int:
        return self.num_images - 1


def chunk_model_of(policy: Any) -> ChunkModel | None:
    """Returns the chunk layout of ``policy``, or None for a token-by-token policy (no ``is_chunked``)."""
    if not getattr(policy, "is_chunked", False):
        return None
    return ChunkModel(
        chunk_size=int(policy.chunk_size),
        action_dim=int(policy.action_dim),
        num_images=int(getattr(policy, "num_images", 1)),
        proprio_dim=int(getattr(policy, "proprio_dim", 0)),
        has_energy=getattr(policy, "energy_model", None) is not None,
    )


def energy_steps_problem(model: ChunkModel | None, steps: int) -> str | None:
    """Returns why ``energy_steps`` cannot be used with ``model`` (None: a token policy), or None."""
    if not steps:
        return None
    if model is None:
        return f"energy_steps {steps} refines OpenVLA-OFT chunks; this is a token-by-token model: set energy_steps 0"
    if not model.has_energy:
        return (
            f"energy_steps {steps} needs an energy model (energy_model.safetensors beside the OFT head), and this "
            "model has none: train one with training/train_energy.py or set energy_steps 0"
        )
    return None


def actions_per_inference_problem(requested: int, chunk_size: int) -> str | None:
    """Returns why ``actions_per_inference`` cannot be used with chunks of ``chunk_size``, or None."""
    if requested > chunk_size:
        return (
            f"actions_per_inference {requested} is more than the model's chunk size K = {chunk_size}: use 1..{chunk_size}, "
            "or 0 for the whole chunk"
        )
    return None


def configuration_problems(model: ChunkModel | None, values: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Returns (errors, warnings) of running ``model`` (None: a token policy) with the parameter ``values``.

    Errors stop the configure transition (the node stays unconfigured and says why); warnings name
    parameters that the model does not use.
    """
    errors: list[str] = []
    warnings: list[str] = []
    wrist_topics = list(values.get("wrist_image_topics") or [])
    proprio_topic = str(values.get("proprio_topic") or "")
    rate_hz = float(values["rate_hz"])
    energy_problem = energy_steps_problem(model, int(values.get("energy_steps") or 0))
    if energy_problem:
        errors.append(energy_problem)
    if model is None:
        if rate_hz > MAX_RATE_HZ:
            errors.append(
                f"rate_hz {rate_hz:g} is above {MAX_RATE_HZ:g} Hz, the limit for a token-by-token model (one "
                f"inference per action); up to {MAX_CHUNK_RATE_HZ:g} Hz needs a chunked (OpenVLA-OFT) model"
            )
        if wrist_topics or proprio_topic:
            warnings.append("wrist_image_topics and proprio_topic are ignored: this model takes one image and no proprio")
        return errors, warnings
    if model.action_dim != len(ACTION_NAMES):
        errors.append(
            f"the model predicts {model.action_dim}-D actions; the node publishes {len(ACTION_NAMES)}-DoF "
            f"deltas ({', '.join(ACTION_NAMES)}) and needs action_dim {len(ACTION_NAMES)}"
        )
    problem = actions_per_inference_problem(int(values["actions_per_inference"]), model.chunk_size)
    if problem:
        errors.append(problem)
    if len(wrist_topics) != model.wrist_cameras:
        errors.append(
            f"the model takes {model.num_images} image(s): the camera and {model.wrist_cameras} wrist camera(s); "
            f"wrist_image_topics names {len(wrist_topics)} ({wrist_topics})"
        )
    if any(not topic.strip() for topic in wrist_topics):
        errors.append("wrist_image_topics must not contain empty names")
    if model.proprio_dim and not proprio_topic:
        errors.append(f"the model takes a proprio vector of {model.proprio_dim} values: set proprio_topic")
    if proprio_topic and not model.proprio_dim:
        warnings.append(f"proprio_topic {proprio_topic!r} is ignored: this model takes no proprio")
    return errors, warnings


@dataclass(frozen=True)
class ProprioReading:
    """The newest robot state: its values, the stamp it is aged by and when it arrived."""

    values: np.ndarray
    stamp_ns: int
    received_ns: int


def proprio_from_joint_state(message: Any, received_ns: int) -> ProprioReading:
    """Returns the positions of a ``sensor_msgs/JointState``, aged by its header stamp (arrival if unset)."""
    stamp = message.header.stamp
    stamp_ns = stamp.sec * 1_000_000_000 + stamp.nanosec
    return ProprioReading(np.asarray(message.position, dtype=np.float64), stamp_ns or received_ns, received_ns)


def proprio_from_array(message: Any, received_ns: int) -> ProprioReading:
    """Returns the data of a ``std_msgs/Float64MultiArray``, aged by its arrival (it has no stamp)."""
    return ProprioReading(np.asarray(message.data, dtype=np.float64), received_ns, received_ns)


def chunk_problem(chunk: Any, model: ChunkModel) -> str | None:
    """Returns why a predicted chunk cannot be queued (shape, non-finite values), or None."""
    values = np.asarray(chunk, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] < 1 or values.shape[1] != len(ACTION_NAMES):
        return f"the predicted chunk has shape {values.shape}; expected [K, {len(ACTION_NAMES)}]"
    bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
    if bad:
        return f"the predicted chunk has {bad} non-finite value(s)"
    if values.shape[0] != model.chunk_size:
        return f"the predicted chunk has {values.shape[0]} actions; the model said K = {model.chunk_size}"
    return None
