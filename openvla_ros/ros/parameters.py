"""The policy node's parameters: one :class:`ParameterSpec` per parameter, in the order of config/policy.yaml.

Plain data (no node): the node declares each spec with its descriptor, and tests compare the table
with the parameter file and the README.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.parameter import Parameter

from openvla_ros.ros.chunk_mode import ChunkModel, actions_per_inference_problem, energy_steps_problem
from openvla_ros.ros.control import (
    CHUNK_BLENDS,
    GRIPPER_MODES,
    MAX_CHUNK_RATE_HZ,
    MAX_RATE_HZ,
    MIN_RATE_HZ,
    TWIST_MODES,
    ControlSettings,
)

IMAGE_TRANSPORTS = ("raw", "compressed")
QUANTIZATIONS = ("none", "8bit", "4bit")
DECODINGS = ("actions_only", "official")
DTYPES = ("auto", "bfloat16", "float16", "float32")
PROPRIO_TYPES = ("joint_state", "float64_array")


@dataclass(frozen=True)
class ParameterSpec:
    """One node parameter: default, description, and the constraints rclpy or the node enforce."""

    name: str
    default: Any
    description: str
    read_only: bool = False
    choices: tuple[str, ...] = ()
    float_range: tuple[float, float] | None = None
    integer_range: tuple[int, int] | None = None

    def descriptor(self) -> ParameterDescriptor:
        """Returns the descriptor rclpy declares the parameter with (ranges it enforces itself)."""
        descriptor = ParameterDescriptor(
            name=self.name, description=self.description, read_only=self.read_only
        )
        if self.choices:
            descriptor.additional_constraints = f"one of: {', '.join(self.choices)}"
        if self.float_range is not None:
            descriptor.floating_point_range = [
                FloatingPointRange(from_value=self.float_range[0], to_value=self.float_range[1], step=0.0)
            ]
        if self.integer_range is not None:
            descriptor.integer_range = [
                IntegerRange(from_value=self.integer_range[0], to_value=self.integer_range[1], step=1)
            ]
        return descriptor


_CONTROL_DEFAULTS = ControlSettings()

PARAMETERS: tuple[ParameterSpec, ...] = (
    # Model (read-only: changing any of these needs a cleanup + configure with a new node).
    ParameterSpec(
        "model", "openvla/openvla-7b", "Checkpoint directory or hub id of the OpenVLA model, or http://host:port "
        "of a policy server (python -m openvla_ros.serve): remote mode.", read_only=True
    ),
    ParameterSpec(
        "quantization",
        "none",
        "Weight quantisation of the LLM layers (bitsandbytes).",
        read_only=True,
        choices=QUANTIZATIONS,
    ),
    ParameterSpec(
        "dtype",
        "auto",
        "Compute dtype; auto = bfloat16 on CUDA, float32 on CPU.",
        read_only=True,
        choices=DTYPES,
    ),
    ParameterSpec("device", "auto", "Torch device: auto, cpu, cuda or cuda:N.", read_only=True),
    ParameterSpec("adapter", "", "Optional LoRA adapter directory; empty for none.", read_only=True),
    ParameterSpec(
        "api_key",
        "",
        "Remote mode (model http://host:port, a policy server): the server's API key; empty: $OPENVLA_API_KEY, "
        "else none.",
        read_only=True,
    ),
    ParameterSpec(
        "remote_jpeg_quality",
        90,
        "Remote mode: JPEG quality (1..100) of the frames sent to the policy server.",
        read_only=True,
        integer_range=(1, 100),
    ),
    ParameterSpec(
        "unnorm_key",
        "",
        "Dataset key of the action statistics; empty when the checkpoint has only one.",
        read_only=True,
    ),
    ParameterSpec(
        "center_crop",
        False,
        "Take the centre 90%-area crop (models trained with crop augmentation).",
        read_only=True,
    ),
    ParameterSpec(
        "center_crop_auto",
        True,
        "Turn center_crop on by itself (logged) for a model fine-tuned with image augmentation, as its "
        "config records; false keeps center_crop as given.",
        read_only=True,
    ),
    ParameterSpec(
        "rotate_180", False, "Rotate camera images by 180 degrees before inference.", read_only=True
    ),
    ParameterSpec(
        "cpu_threads",
        0,
        "Torch CPU threads for inference; 0 = auto: all cores but one, leaving one to the executor, DDS "
        "and the camera driver (one thread on a 2-core machine).",
        read_only=True,
        integer_range=(0, 256),
    ),
    ParameterSpec(
        "decoding",
        "actions_only",
        "actions_only: each action token is chosen among the 256 action ids; official: argmax over the "
        "whole vocabulary as the official code (a non-action id decodes to an edge bin).",
        read_only=True,
        choices=DECODINGS,
    ),
    # Inputs.
    ParameterSpec(
        "image_topic",
        "camera/image_raw",
        "Camera topic (base topic for compressed transport); relative names resolve in the node's namespace.",
        read_only=True,
    ),
    ParameterSpec(
        "instruction_topic",
        "instruction",
        "Language instruction topic (std_msgs/String); relative names resolve in the node's namespace.",
        read_only=True,
    ),
    ParameterSpec(
        "strip_instruction",
        False,
        "Remove whitespace around each instruction before building the prompt. Off by default: the "
        "official code prompts with the instruction as given (lower-cased), so ' pick' and 'pick' differ.",
        read_only=True,
    ),
    ParameterSpec(
        "image_transport",
        "raw",
        "raw: sensor_msgs/Image on image_topic; compressed: CompressedImage on <image_topic>/compressed.",
        read_only=True,
        choices=IMAGE_TRANSPORTS,
    ),
    ParameterSpec(
        "wrist_image_topics",
        [],
        "Chunked (OpenVLA-OFT) models with wrist cameras: one topic per wrist camera, in the model's image "
        "order, with image_transport's message type; as many as the model takes (num_images - 1).",
        read_only=True,
    ),
    ParameterSpec(
        "proprio_topic",
        "",
        "Chunked models that take proprio: the robot state topic (see proprio_type); empty for none.",
        read_only=True,
    ),
    ParameterSpec(
        "proprio_type",
        "joint_state",
        "joint_state: sensor_msgs/JointState, position in message order, aged by its header stamp; "
        "float64_array: std_msgs/Float64MultiArray, data, aged by its arrival time.",
        read_only=True,
        choices=PROPRIO_TYPES,
    ),
    # Start-up behaviour.
    ParameterSpec("autostart", True, "Configure and activate on start-up.", read_only=True),
    ParameterSpec(
        "start_enabled", False, "Publish actions on activation without waiting for ~/enable.", read_only=True
    ),
    ParameterSpec(
        "publish_step_timing",
        False,
        "Publish per-step timings on ~/step_timing (for profiling).",
        read_only=True,
    ),
    # Control loop (changeable at run time).
    ParameterSpec(
        "rate_hz",
        _CONTROL_DEFAULTS.rate_hz,
        f"Control rate: actions published per second (an inference each in token mode, up to "
        f"{MAX_RATE_HZ:g} Hz; from the chunk queue in chunk mode, up to {MAX_CHUNK_RATE_HZ:g} Hz).",
        float_range=(MIN_RATE_HZ, MAX_CHUNK_RATE_HZ),
    ),
    ParameterSpec(
        "twist_mode",
        _CONTROL_DEFAULTS.twist_mode,
        "delta: ~/delta_twist carries the per-step delta; velocity: delta x rate_hz (for MoveIt Servo).",
        choices=TWIST_MODES,
    ),
    ParameterSpec("frame_id", _CONTROL_DEFAULTS.frame_id, "frame_id of ~/delta_twist (the actions' frame)."),
    ParameterSpec(
        "gripper_mode",
        _CONTROL_DEFAULTS.gripper_mode,
        "raw: model value; binary: 0/1 at 0.5; signed_binary: LIBERO's [0,1] -> [-1,1] then sign.",
        choices=GRIPPER_MODES,
    ),
    ParameterSpec(
        "gripper_flip", _CONTROL_DEFAULTS.gripper_flip, "Invert the open/closed sense of ~/gripper."
    ),
    ParameterSpec(
        "max_image_age_s",
        _CONTROL_DEFAULTS.max_image_age_s,
        "Older images (by header stamp) stop the output: one zero delta, then silence until fresh images.",
        float_range=(0.01, 10.0),
    ),
    ParameterSpec(
        "max_translation",
        _CONTROL_DEFAULTS.max_translation,
        "Per-axis clip of |dx|, |dy|, |dz| per step, in the dataset's units (usually metres).",
        float_range=(0.0, 1.0),
    ),
    ParameterSpec(
        "max_rotation",
        _CONTROL_DEFAULTS.max_rotation,
        "Per-axis clip of |droll|, |dpitch|, |dyaw| per step, in radians.",
        float_range=(0.0, math.pi),
    ),
    ParameterSpec(
        "max_proprio_age_s",
        _CONTROL_DEFAULTS.max_proprio_age_s,
        "Older proprio messages stop the output like a stale camera (chunk mode with proprio_topic).",
        float_range=(0.01, 10.0),
    ),
    # Chunk mode (changeable at run time; ignored by token-by-token models).
    ParameterSpec(
        "actions_per_inference",
        _CONTROL_DEFAULTS.actions_per_inference,
        "Actions of each chunk planned before the next chunk takes over: 0 = all K (open loop over the "
        "whole chunk), 1..K; more than the model's K is refused. The next chunk is requested early by the "
        "recent inference latency, so it is ready when they run out.",
        integer_range=(0, 1024),
    ),
    ParameterSpec(
        "chunk_blend",
        _CONTROL_DEFAULTS.chunk_blend,
        "none: a new chunk replaces the queued actions; ensemble: temporal ensembling (ACT), each tick's "
        "action is the weighted average of every chunk's prediction for it.",
        choices=CHUNK_BLENDS,
    ),
    ParameterSpec(
        "ensemble_decay",
        _CONTROL_DEFAULTS.ensemble_decay,
        "chunk_blend ensemble: prediction i (0 = oldest) weighs exp(-ensemble_decay * i); 0 = plain mean.",
        float_range=(0.0, 10.0),
    ),
    # Energy-guided refinement (chunked models with an energy model beside the head; changeable at run time).
    ParameterSpec(
        "energy_steps",
        0,
        "Energy-descent steps on each chunk (0 = off); needs energy_model.safetensors beside the OFT head.",
        integer_range=(0, 20),
    ),
    ParameterSpec(
        "energy_step_size",
        0.5,
        "Step size alpha of a <- a - alpha * dE/da, in normalised action units.",
        float_range=(0.0, 100.0),
    ),
    ParameterSpec(
        "energy_max_step_fraction",
        0.2,
        "Each energy step moves the normalised chunk by at most this fraction of its norm.",
        float_range=(0.0, 1.0),
    ),
)
ENERGY_FIELDS = ("energy_steps", "energy_step_size", "energy_max_step_fraction")
SPECS = {spec.name: spec for spec in PARAMETERS}
CONTROL_FIELDS = tuple(field.name for field in fields(ControlSettings) if field.name in SPECS)


def whole_numbers_as_floats(parameters: list[Parameter]) -> list[Parameter]:
    """Returns ``parameters`` with whole numbers given for floating-point parameters as floats.

    ``ros2 param set ... rate_hz 10`` and ``rate_hz: 10`` in YAML arrive as integers; rclpy would
    reject them for their type.
    """
    converted = []
    for parameter in parameters:
        spec = SPECS.get(parameter.name)
        if spec is not None and isinstance(spec.default, float) and parameter.type_ == Parameter.Type.INTEGER:
            parameter = Parameter(parameter.name, value=float(parameter.value))
        converted.append(parameter)
    return converted


def value_problem(name: str, value: Any) -> str | None:
    """Returns why ``value`` cannot be set for parameter ``name`` on its own (choices, empty topics), or None.

    Ranges and read-only are rclpy's; settings that depend on each other are
    :class:`~openvla_ros.ros.control.ControlSettings`'.
    """
    spec = SPECS.get(name)
    if spec is None:
        return None
    if spec.choices and value not in spec.choices:
        return f"{name} must be one of {', '.join(spec.choices)}; got {value!r}"
    if name in ("image_topic", "instruction_topic") and not str(value).strip():
        return f"{name} must not be empty"
    return None


def settings_from(values: dict[str, Any], rate_limit_hz: float) -> ControlSettings:
    """Returns the control settings of the parameter ``values`` under the loaded model's rate limit.

    Raises:
        ValueError: naming the field that does not validate.
    """
    return ControlSettings(**{name: values[name] for name in CONTROL_FIELDS}, rate_limit_hz=rate_limit_hz)


def change_problem(values: dict[str, Any], changes: list[Parameter], model_loaded: bool,
                   chunk_model: ChunkModel | None, rate_limit_hz: float) -> str | None:
    """Returns why the parameter ``changes`` cannot be applied to the current ``values``, or None.

    Each value on its own (choices, empty topics), against the loaded model (``actions_per_inference``
    within K, ``energy_steps`` only with an energy model), and the control settings together.
    """
    candidate = dict(values)
    for parameter in changes:
        if parameter.name not in SPECS:
            continue
        problem = value_problem(parameter.name, parameter.value)
        if problem is None and parameter.name == "actions_per_inference" and chunk_model is not None:
            problem = actions_per_inference_problem(int(parameter.value), chunk_model.chunk_size)
        if problem is None and parameter.name == "energy_steps" and model_loaded:
            problem = energy_steps_problem(chunk_model, int(parameter.value))
        if problem:
            return problem
        candidate[parameter.name] = parameter.value
    if any(parameter.name in CONTROL_FIELDS for parameter in changes):
        try:
            settings_from(candidate, rate_limit_hz)
        except ValueError as exc:
            return str(exc)
    if candidate["image_topic"] == candidate["instruction_topic"]:
        return "image_topic and instruction_topic must differ"
    return None
