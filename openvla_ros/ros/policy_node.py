"""ROS 2 lifecycle node running an OpenVLA policy: camera image + instruction -> 7-DoF deltas.

Lifecycle: ``configure`` loads the model once and subscribes to the camera and instruction topics,
``activate`` starts the control timer, ``deactivate`` stops it (publishing one zero delta if the robot
was being driven), ``cleanup`` frees the model. With ``autostart`` (default) the node configures and
activates itself; it still publishes nothing until ``~/enable`` is called with ``true`` (unless
``start_enabled``) and an instruction has arrived.

Token mode (OpenVLA): one inference per control tick on a worker thread. Chunk mode (a chunked
policy, OpenVLA-OFT): one inference per chunk of K actions, one queued action per tick
(:mod:`openvla_ros.ros.chunk_control`); a stop drops the queue. With ``energy_steps > 0`` (an OFT model
with an energy model beside its head) each chunk is refined down the energy gradient before it is
queued; /diagnostics reports the last chunk's energy before and after.

Topics:
    in  ``image_topic`` (sensor_msgs/Image, or ``<image_topic>/compressed`` CompressedImage with
        ``image_transport: compressed``), depth-1 keep-last best-effort QoS
    in  ``wrist_image_topics`` (chunk mode, models with wrist cameras), as ``image_topic``
    in  ``proprio_topic`` (chunk mode, models that take proprio): sensor_msgs/JointState or
        std_msgs/Float64MultiArray (``proprio_type``), depth-1 best-effort
    in  ``instruction_topic`` (std_msgs/String), reliable; two subscriptions, volatile (matches every
        publisher, e.g. ``ros2 topic pub``) and transient-local (a latched publisher's last message
        reaches a node started after it)
    out ``~/action`` (std_msgs/Float64MultiArray) [dx, dy, dz, droll, dpitch, dyaw, gripper]
    out ``~/delta_twist`` (geometry_msgs/TwistStamped), stamped with the image's stamp (chunk mode:
        the image the chunk was predicted from)
    out ``~/gripper`` (std_msgs/Float64), mapped by ``gripper_mode``
    out ``~/step_timing`` (diagnostic_msgs/DiagnosticArray, only with ``publish_step_timing``): one
        status per step (token mode) or per chunk (chunk mode)
    out ``/diagnostics`` (diagnostic_msgs/DiagnosticArray), once per second
Services: ``~/enable`` (std_srvs/SetBool) and the standard lifecycle services."""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import TwistStamped
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.duration import Duration
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
from rclpy.executors import ExternalShutdownException
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import Float64, Float64MultiArray, String
from std_srvs.srv import SetBool

from openvla_ros.errors import OpenVLAError
from openvla_ros.model.processor import validate_instruction
from openvla_ros.ros.chunk_control import ChunkControl
from openvla_ros.ros.chunk_mode import (
    ChunkModel,
    ProprioReading,
    actions_per_inference_problem,
    chunk_model_of,
    chunk_problem,
    configuration_problems,
    energy_steps_problem,
    proprio_from_array,
    proprio_from_joint_state,
)
from openvla_ros.ros.control import (
    GRIPPER_INDEX,
    MAX_CHUNK_RATE_HZ,
    MAX_RATE_HZ,
    ControlSettings,
    LatencyStats,
    LatestSlot,
    ProblemTracker,
    RateMeter,
    SingleJobWorker,
    limit_action,
    map_gripper,
)
from openvla_ros.ros.executor import HandoffExecutor
from openvla_ros.ros.input_freshness import CAMERA, InputSource, proprio, wrist_camera
from openvla_ros.ros.messages import action_array, delta_twist, timing_array, zero_delta
from openvla_ros.ros.node_status import EnergyStats, status_summary
from openvla_ros.ros.parameters import (
    CONTROL_FIELDS,
    ENERGY_FIELDS,
    PARAMETERS,
    SPECS,
    ParameterSpec,
    value_problem,
    whole_numbers_as_floats,
)
from openvla_ros.ros.ros_conversions import message_to_rgb
from openvla_ros.ros.shutdown import ShutdownSignals, exit_now, finish_callbacks
from openvla_ros.ros.tick_schedule import LateTick

__all__ = ["PARAMETERS", "PolicyNode", "ShutdownSignals", "auto_cpu_threads", "load_policy", "main"]

NODE_NAME = "openvla_policy"
DIAGNOSTICS_PERIOD_S = 1.0
# Longest wait for the subscribers' acknowledgement of the last output before the publishers go.
DELIVERY_TIMEOUT_S = 1.0

SENSOR_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.BEST_EFFORT)
LATCHED_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST,
    depth=1,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.TRANSIENT_LOCAL,
)
# A transient-local subscription does not match a volatile publisher (DDS QoS rules) and a volatile one
# gets no history: the node subscribes with both, so every kind of publisher reaches it.
INSTRUCTION_VOLATILE_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE)
OUTPUT_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE)


@dataclass(frozen=True)
class Frame:
    """A received camera message, kept undecoded until a control step uses it."""

    message: Image | CompressedImage
    stamp_ns: int
    received_ns: int


@dataclass(frozen=True)
class Step:
    """One unit of work for the inference worker."""

    frame: Frame
    instruction: str
    tick_ns: int
    settings: ControlSettings
    stop_count: int  # the node's stop count when the step started: a stop since then voids it


@dataclass(frozen=True)
class ChunkRequest:
    """One chunk for the inference worker to compute (chunk mode)."""

    frame: Frame
    wrist_frames: tuple[Frame, ...]
    proprio: np.ndarray | None
    instruction: str
    tick: int  # the control tick that requested it
    settings: ControlSettings
    stop_count: int  # a stop since the request voids the chunk
    requested: float  # time.perf_counter() at the request


PolicyLoader = Callable[[dict[str, Any]], Any]


def load_policy(values: dict[str, Any]) -> Any:
    """Returns the policy that the node's parameter values describe: an
    :class:`~openvla_ros.model.oft_policy.OFTPolicy` (chunk mode) for an OpenVLA-OFT checkpoint, else an
    :class:`~openvla_ros.model.policy.OpenVLAPolicy` (token mode).

    Raises:
        OpenVLAError: when the model cannot be loaded (the node reports it and stays unconfigured).
    """
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


def _ignore_event(event: Any) -> None:
    """An event callback that does nothing (replaces rclpy's default warning)."""


def auto_cpu_threads(cpu_count: int | None = None) -> int:
    """Returns the torch thread count for ``cpu_threads: 0``: every core but one, at least one.

    On a 2-core machine two inference threads made the step's tail ten times longer whenever anything
    else ran (the camera driver, DDS, the executor): one core is left to them.
    """
    cores = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    return max(1, cores - 1)


class PolicyNode(LifecycleNode):
    """The OpenVLA policy as a managed (lifecycle) node; see the module docstring for its interface.

    ``policy_loader`` builds the policy from the parameter values on configure (default
    :func:`load_policy`); anything with ``predict_action(rgb, instruction)``, ``unnorm_key`` and
    ``release()`` will do, or a chunked policy (see :mod:`openvla_ros.ros.chunk_mode`).
    """

    def __init__(self, node_name: str = NODE_NAME, policy_loader: PolicyLoader | None = None, **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        self._policy_loader = policy_loader or load_policy
        self._lock = threading.RLock()
        self._problems = ProblemTracker()
        self._values: dict[str, Any] = {spec.name: spec.default for spec in PARAMETERS}
        self._settings = ControlSettings()
        self._state_label = "unconfigured"
        self._model_status = "not loaded"
        self._policy: Any = None
        self._worker: SingleJobWorker[Step] | None = None
        self._frames: LatestSlot[Frame] = LatestSlot()
        self._instruction: str | None = None
        self._enabled = False
        self._output_live = False
        self._stop_count = 0
        self._last_gripper = math.nan
        self._control_timer = None
        self._subscriptions_in_use: list[Any] = []
        self._action_rate = RateMeter(window_s=5.0)
        self._latency_ms = LatencyStats()
        self._model_ms = LatencyStats()
        self._ticks_reusing_frame = 0
        self._late_tick = LateTick()  # a tick that came while a step ran (see _late_step)
        self._steps = 0
        # chunk mode
        self._chunk_model: ChunkModel | None = None
        self._rate_limit_hz = MAX_CHUNK_RATE_HZ  # until a token policy is loaded
        self._wrist_slots: list[LatestSlot[Frame]] = []
        self._wrist_sources: list[InputSource] = []
        self._proprio_slot: LatestSlot[ProprioReading] = LatestSlot()
        self._proprio_source: InputSource | None = None
        self._chunk: ChunkControl | None = None  # the queue and its schedule, with a chunked model
        self._energy = EnergyStats()
        self._energy_warned = False

        self.add_pre_set_parameters_callback(whole_numbers_as_floats)
        self.add_on_set_parameters_callback(self._validate_parameters)
        self.add_post_set_parameters_callback(self._apply_parameters)
        for spec in PARAMETERS:
            self._declare(spec)

        self._control_group = MutuallyExclusiveCallbackGroup()
        self._action_pub = self.create_lifecycle_publisher(Float64MultiArray, "~/action", OUTPUT_QOS)
        self._twist_pub = self.create_lifecycle_publisher(TwistStamped, "~/delta_twist", OUTPUT_QOS)
        self._gripper_pub = self.create_lifecycle_publisher(Float64, "~/gripper", OUTPUT_QOS)
        self._timing_pub = self.create_lifecycle_publisher(DiagnosticArray, "~/step_timing", OUTPUT_QOS)
        self._diagnostics_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._enable_srv = self.create_service(SetBool, "~/enable", self._on_enable)
        self._diagnostics_timer = self.create_timer(DIAGNOSTICS_PERIOD_S, self._publish_diagnostics)

    # ------------------------------------------------------------------ parameters

    @property
    def autostart(self) -> bool:
        return bool(self._values["autostart"])

    def _declare(self, spec: ParameterSpec) -> None:
        """Declares one parameter; an invalid start-up value is logged and replaced by the default.

        A whole number given for a floating-point parameter (``rate_hz: 10`` in YAML, ``-p
        max_translation:=0``) is taken as that float rather than rejected for its type.
        """
        # rclpy keeps the start-up overrides here and types ``10`` as an integer.
        override = self._parameter_overrides.get(spec.name)
        if override is not None:
            (self._parameter_overrides[spec.name],) = whole_numbers_as_floats([override])
        default = Parameter.Type.STRING_ARRAY if spec.default == [] else spec.default  # [] has no type
        try:
            self.declare_parameter(spec.name, default, spec.descriptor())
        except (InvalidParameterValueException, InvalidParameterTypeException) as exc:
            self.get_logger().error(
                f"parameter {spec.name!r} rejected at start-up ({exc}); using the default {spec.default!r}"
            )
            self._problems.report(f"parameter:{spec.name}", f"start-up value rejected: {exc}")
            self.declare_parameter(spec.name, default, spec.descriptor(), ignore_override=True)

    def set_parameters_atomically(self, parameter_list: list[Parameter]) -> SetParametersResult:
        """Sets parameters at run time (the parameter services call this); logs a rejection with its reason."""
        result = super().set_parameters_atomically(parameter_list)
        if not result.successful:
            names = ", ".join(parameter.name for parameter in parameter_list)
            self.get_logger().error(f"parameter change rejected ({names}): {result.reason}")
        return result

    def _validate_parameters(self, parameters: list[Parameter]) -> SetParametersResult:
        """Rejects enum values outside their choices and control settings that do not validate."""
        candidate = dict(self._values)
        for parameter in parameters:
            if parameter.name not in SPECS:
                continue
            problem = value_problem(parameter.name, parameter.value)
            if problem is None and parameter.name == "actions_per_inference" and self._chunk_model is not None:
                problem = actions_per_inference_problem(int(parameter.value), self._chunk_model.chunk_size)
            if problem is None and parameter.name == "energy_steps" and self._policy is not None:
                problem = energy_steps_problem(self._chunk_model, int(parameter.value))
            if problem:
                return SetParametersResult(successful=False, reason=problem)
            candidate[parameter.name] = parameter.value
        if any(parameter.name in CONTROL_FIELDS for parameter in parameters):
            try:
                self._settings_from(candidate)
            except ValueError as exc:
                return SetParametersResult(successful=False, reason=str(exc))
        if candidate["image_topic"] == candidate["instruction_topic"]:
            return SetParametersResult(
                successful=False, reason="image_topic and instruction_topic must differ"
            )
        return SetParametersResult(successful=True)

    def _apply_parameters(self, parameters: list[Parameter]) -> None:
        with self._lock:
            for parameter in parameters:
                if parameter.name in SPECS:
                    self._values[parameter.name] = parameter.value
            previous_rate = self._settings.rate_hz
            self._settings = self._settings_from(self._values)
            if self._chunk is not None:
                self._chunk.set_blend(self._settings.chunk_blend, self._settings.ensemble_decay)
            if any(parameter.name in ENERGY_FIELDS for parameter in parameters):
                self._configure_energy()
            if self._control_timer is not None and self._settings.rate_hz != previous_rate:
                self._control_timer.timer_period_ns = int(1e9 / self._settings.rate_hz)
                self._control_timer.reset()
                self._action_rate.reset()
                self.get_logger().info(f"control rate changed to {self._settings.rate_hz:g} Hz")

    def _configure_energy(self) -> None:
        """Hands the energy parameters to a loaded chunked policy that refines (takes effect at the next chunk)."""
        configure = getattr(self._policy, "configure_energy", None)
        if configure is None:
            return
        try:
            configure(*(self._values[name] for name in ENERGY_FIELDS))
        except ValueError as exc:  # validated before, so only a policy that changed its mind gets here
            self.get_logger().error(f"energy settings not applied: {exc}")
            return
        steps = int(self._values["energy_steps"])
        self.get_logger().info(
            f"energy refinement {'off' if not steps else f'on: {steps} step(s)'} (step size "
            f"{self._values['energy_step_size']:g}, at most {self._values['energy_max_step_fraction']:g} of the "
            "chunk's norm per step)"
        )

    def _settings_from(self, values: dict[str, Any]) -> ControlSettings:
        """Returns the control settings of ``values`` under the loaded model's rate limit.

        Raises:
            ValueError: naming the field that does not validate.
        """
        return ControlSettings(
            **{name: values[name] for name in CONTROL_FIELDS}, rate_limit_hz=self._rate_limit_hz
        )

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> bool:
        """Configures and activates the node; returns True when it ends up active."""
        if self.trigger_configure() != TransitionCallbackReturn.SUCCESS:
            return False
        return self.trigger_activate() == TransitionCallbackReturn.SUCCESS

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        values = dict(self._values)
        self._model_status = "loading"
        self.get_logger().info(
            f"loading model {values['model']!r} (quantization {values['quantization']}, dtype {values['dtype']}, "
            f"device {values['device']})"
        )
        started = time.perf_counter()
        try:
            import torch

            threads = int(values["cpu_threads"]) or auto_cpu_threads()
            torch.set_num_threads(threads)
            policy = self._policy_loader(values)
        except OpenVLAError as exc:
            return self._fail_configure(f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # a model that fails to load must not take the node down
            return self._fail_configure(f"unexpected {type(exc).__name__} while loading: {exc}")
        chunk_model = chunk_model_of(policy)
        errors, warnings = configuration_problems(chunk_model, values)
        for warning in warnings:
            self.get_logger().warning(warning)
        if errors:
            policy.release()
            return self._fail_configure("; ".join(errors), loaded=True)
        with self._lock:
            self._chunk_model = chunk_model
            self._rate_limit_hz = MAX_RATE_HZ if chunk_model is None else MAX_CHUNK_RATE_HZ
            self._settings = self._settings_from(self._values)
            self._chunk = None if chunk_model is None else ChunkControl(chunk_model.chunk_size)
            self._energy, self._energy_warned = EnergyStats(), False
            if self._chunk is not None:
                self._chunk.set_blend(self._settings.chunk_blend, self._settings.ensemble_decay)
        if hasattr(policy, "log_energy_fallback"):
            policy.log_energy_fallback = False  # the node warns once itself, through its own logger
        self._policy = policy
        mode = "token mode" if chunk_model is None else (
            f"chunk mode: K = {chunk_model.chunk_size}, {chunk_model.num_images} image(s), "
            f"proprio {chunk_model.proprio_dim or 'none'}"
        )
        self._model_status = (
            f"loaded in {time.perf_counter() - started:.1f} s (unnorm_key {policy.unnorm_key}; {mode})"
        )
        self._problems.resolve("model")
        self.get_logger().info(f"model {values['model']!r} {self._model_status}")
        transform = getattr(policy, "image_transform", None)
        if transform is not None and transform.center_crop and not values["center_crop"]:
            self.get_logger().info(
                "center_crop turned on: the model was fine-tuned with image augmentation (random 90%-area "
                "crops); set center_crop_auto: false to keep it off"
            )

        run = self._run_step if chunk_model is None else self._run_chunk
        self._worker = SingleJobWorker(run, self._on_worker_error)  # type: ignore[arg-type]
        image_sub = self._subscribe_image(values["image_topic"], values["image_transport"], self._frames)
        extra_subs = self._subscribe_chunk_inputs(chunk_model, values)
        # The latched subscription cannot match a volatile publisher: that is expected (the volatile
        # one takes its messages), so rclpy's "incompatible QoS" warning is silenced for it.
        instruction_subs = [
            self.create_subscription(String, values["instruction_topic"], self._on_instruction, INSTRUCTION_VOLATILE_QOS),
            self.create_subscription(
                String,
                values["instruction_topic"],
                self._on_instruction,
                LATCHED_QOS,
                event_callbacks=SubscriptionEventCallbacks(incompatible_qos=_ignore_event),
            ),
        ]
        self._subscriptions_in_use = [image_sub, *instruction_subs, *extra_subs]
        self._state_label = "inactive"
        extra = "".join(f", {subscription.topic_name}" for subscription in extra_subs)
        self.get_logger().info(
            f"subscribed to {image_sub.topic_name} ({values['image_transport']}){extra} and "
            f"{instruction_subs[0].topic_name} (volatile and latched publishers); torch threads {threads}"
        )
        return TransitionCallbackReturn.SUCCESS

    def _subscribe_image(self, topic: str, transport: str, slot: LatestSlot[Frame]) -> Any:
        """Subscribes ``slot`` to the newest image on ``topic`` (``<topic>/compressed`` when compressed)."""

        def store(message: Image | CompressedImage) -> None:
            stamp = message.header.stamp
            received_ns = self.get_clock().now().nanoseconds
            slot.put(Frame(message, stamp.sec * 1_000_000_000 + stamp.nanosec, received_ns))

        if transport == "compressed":
            return self.create_subscription(CompressedImage, topic.rstrip("/") + "/compressed", store, SENSOR_QOS)
        return self.create_subscription(Image, topic, store, SENSOR_QOS)

    def _subscribe_chunk_inputs(self, model: ChunkModel | None, values: dict[str, Any]) -> list[Any]:
        """Subscribes to the wrist cameras and the proprio topic that ``model`` takes; returns the subscriptions."""
        self._wrist_slots, self._wrist_sources, self._proprio_source = [], [], None
        self._proprio_slot.clear()
        if model is None:
            return []
        subscriptions = []
        for index, topic in enumerate(values["wrist_image_topics"] or [], start=1):
            slot: LatestSlot[Frame] = LatestSlot()
            subscription = self._subscribe_image(topic, values["image_transport"], slot)
            subscriptions.append(subscription)
            self._wrist_slots.append(slot)
            self._wrist_sources.append(wrist_camera(index, subscription.topic_name))
        if model.proprio_dim:
            if values["proprio_type"] == "joint_state":
                message_type, convert = JointState, proprio_from_joint_state
            else:
                message_type, convert = Float64MultiArray, proprio_from_array

            def store(message: Any) -> None:
                self._proprio_slot.put(convert(message, self.get_clock().now().nanoseconds))

            subscription = self.create_subscription(message_type, values["proprio_topic"], store, SENSOR_QOS)
            subscriptions.append(subscription)
            self._proprio_source = proprio(subscription.topic_name)
        return subscriptions

    def _fail_configure(self, reason: str, loaded: bool = False) -> TransitionCallbackReturn:
        """Ends a failed configure: ``loaded`` says the model loaded but the parameters do not fit it."""
        self._model_status = f"failed: {reason}"
        self._problems.report("model", reason)
        if loaded:
            self.get_logger().error(
                f"the model loaded, but the parameters do not fit it; the node stays unconfigured. {reason}. "
                "Change them and configure again"
            )
        else:
            self.get_logger().error(f"could not load the model; the node stays unconfigured. {reason}")
        return TransitionCallbackReturn.FAILURE

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        with self._lock:
            self._enabled = bool(self._values["start_enabled"])
            self._action_rate.reset()
            if self._chunk is not None:
                self._chunk.inference_rate.reset()
            self._control_timer = self.create_timer(
                1.0 / self._settings.rate_hz, self._on_control_tick, callback_group=self._control_group
            )
            self._state_label = "active"
        self.get_logger().info(
            f"active at {self._settings.rate_hz:g} Hz; output "
            + ("enabled" if self._enabled else "disabled until ~/enable is called with true")
        )
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_control()
        self._state_label = "inactive"
        self.get_logger().info("deactivated; output stopped")
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        self._state_label = "unconfigured"
        self.get_logger().info("cleaned up; model released")
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        if self._control_timer is not None:
            self._stop_control()
        self._release()
        self._state_label = "finalized"
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.get_logger().error(f"error during a transition from {state.label}; releasing everything")
        self._stop_control()
        self._release()
        self._state_label = "unconfigured"
        return TransitionCallbackReturn.SUCCESS

    def _stop_control(self) -> None:
        """Stops the timer, waits for the running step, disables output and sends one zero delta.

        The zero delta is waited for (bounded, see :meth:`wait_for_delivery`): every caller goes on to
        tear something down (deactivate, cleanup, shutdown, process exit).
        """
        with self._lock:
            timer, self._control_timer = self._control_timer, None
            self._enabled = False
        if timer is not None:
            self.destroy_timer(timer)
        if self._worker is not None:
            self._worker.wait_idle(timeout_s=30.0)
        if self._stop_output("control stopped"):
            self.wait_for_delivery()

    def wait_for_delivery(self, timeout_s: float = DELIVERY_TIMEOUT_S) -> bool:
        """Waits until the reliable subscribers of the outputs acknowledged everything published, at most
        ``timeout_s`` in all; returns True when they all did.

        A reliable publisher destroyed right after its last message can lose it (the zero delta of a
        stop); call this before the publishers go. False is not proof of a loss (rclpy can report it
        although the message arrived), only that the wait ended: it never holds a shutdown longer.
        """
        deadline = time.monotonic() + timeout_s
        acknowledged = True
        for publisher in (self._action_pub, self._twist_pub, self._gripper_pub):
            remaining_ns = max(0, int((deadline - time.monotonic()) * 1e9))
            try:
                acknowledged = publisher.wait_for_all_acked(Duration(nanoseconds=remaining_ns)) and acknowledged
            except Exception as exc:  # the context may be shut down already: nothing more can be waited for
                self.get_logger().warning(f"could not wait for the outputs' delivery: {exc}")
                return False
        if not acknowledged:  # common and harmless: Fast DDS readers acknowledge on the writer's heartbeat
            self.get_logger().debug(f"not every subscriber acknowledged the last output within {timeout_s:g} s")
        return acknowledged

    def stop_now(self, reason: str) -> None:
        """Stops the output at once: no new step starts, a running step is voided, one zero delta goes out.

        Fast and safe from a signal handler (takes no slow path: the model, worker and timer are left to
        :meth:`close`).
        """
        with self._lock:
            self._enabled = False
            timer = self._control_timer
            if timer is not None:
                timer.cancel()
        self._stop_output(reason)

    def close(self) -> None:
        """Stops control and frees the model outside the lifecycle (process exit); safe to call twice."""
        if self._control_timer is not None:
            try:
                self._stop_control()
            except Exception as exc:  # the context may already be shut down: nothing can be published
                self.get_logger().warning(f"could not publish the final zero delta: {exc}")
        self._release()

    def _release(self) -> None:
        for subscription in self._subscriptions_in_use:
            self.destroy_subscription(subscription)
        self._subscriptions_in_use = []
        if self._worker is not None:
            self._worker.stop(timeout_s=30.0)
            self._worker = None
        if self._policy is not None:
            self._policy.release()
            self._policy = None
            self._model_status = "released"
        self._frames.clear()
        for slot in self._wrist_slots:
            slot.clear()
        self._proprio_slot.clear()
        with self._lock:
            self._instruction = None
            self._chunk_model, self._chunk = None, None
            self._rate_limit_hz = MAX_CHUNK_RATE_HZ  # the next model may be chunked

    # ------------------------------------------------------------------ inputs

    def _on_instruction(self, message: String) -> None:
        try:
            instruction = validate_instruction(message.data, strip=bool(self._values["strip_instruction"]))
        except OpenVLAError as exc:
            self.get_logger().error(f"instruction rejected, output stopped until a valid one arrives: {exc}")
            self._problems.report("instruction", str(exc))
            with self._lock:
                self._instruction = None
            self._stop_output("invalid instruction")
            return
        with self._lock:
            changed = instruction != self._instruction
            self._instruction = instruction
            if changed and self._chunk is not None:
                self._chunk.clear()  # the queued actions were for the previous task
        self._problems.resolve("instruction")
        if changed:
            self.get_logger().info(f"instruction: {instruction!r}")

    def _on_enable(self, request: SetBool.Request, response: SetBool.Response) -> SetBool.Response:
        with self._lock:
            if request.data and self._control_timer is None:
                response.success = False
                response.message = f"node is {self._state_label}; activate it before enabling output"
                return response
            was_enabled, self._enabled = self._enabled, bool(request.data)
        if not request.data:
            self._stop_output("disabled")
        if was_enabled != self._enabled:
            self.get_logger().info("output enabled" if self._enabled else "output disabled")
        response.success = True
        waiting = "" if self._instruction is not None else " (waiting for an instruction)"
        response.message = ("enabled" + waiting) if self._enabled else "disabled"
        return response

    # ------------------------------------------------------------------ control loop

    def _on_control_tick(self) -> None:
        now_ns = self.get_clock().now().nanoseconds
        if self._chunk_model is not None:
            self._chunk_tick(now_ns)
            return
        inputs = self._checked_inputs(now_ns)
        if inputs is None:
            return
        worker = self._worker
        if worker is None:
            return
        if worker.busy:
            # The previous step overran: this tick's step starts as soon as it ends, unless the next
            # tick comes first (then this one is skipped). One late tick at most: never a queue.
            with self._lock:
                self._late_tick.note(now_ns)
            return
        if not worker.submit(self._make_step(*inputs, now_ns)):
            with self._lock:
                self._late_tick.skipped += 1

    def _checked_inputs(self, now_ns: int) -> tuple[Frame, str, ControlSettings] | None:
        """Returns (newest frame, instruction, settings) when a step may run now, else None.

        Applies the safety checks of a control tick: enabled, an instruction, a frame, its stamp not
        ahead of the clock and not older than ``max_image_age_s`` (those two stop the output).
        """
        with self._lock:
            enabled, instruction, settings, worker = (
                self._enabled,
                self._instruction,
                self._settings,
                self._worker,
            )
        if not enabled or worker is None:
            return None
        if instruction is None:
            self._report(
                "no_instruction", "enabled but no instruction received yet; publishing nothing", warn=False
            )
            return None
        self._resolve("no_instruction")
        frame = self._frames.peek()
        if not self._input_is_fresh(CAMERA, None if frame is None else frame.stamp_ns, now_ns,
                                    settings.max_image_age_s):
            return None
        assert frame is not None
        return frame, instruction, settings

    def _input_is_fresh(self, source: InputSource, stamp_ns: int | None, now_ns: int, max_age_s: float) -> bool:
        """Checks one input's newest stamp; a problem is reported (logged once) and, when it is one that
        stops the output, one zero delta goes out. Returns True when the input may be used."""
        finding = source.check(stamp_ns, now_ns, max_age_s)
        for key, recovery in source.recoveries(finding):
            self._resolve(key, recovery)
        if finding is None:
            return True
        self._report(finding.key, finding.message, warn=finding.warn, detail=finding.detail)
        if finding.stops_output:
            self._stop_output(finding.key.replace("_", " "))
        return False

    # ------------------------------------------------------------------ chunk mode

    def _chunk_tick(self, now_ns: int) -> None:
        """A control tick in chunk mode: publish this tick's queued action, request a chunk when due.

        Every input is checked first; a failed check stops the output, which drops the whole queue.
        """
        inputs = self._checked_inputs(now_ns)
        if inputs is None:
            return
        frame, instruction, settings = inputs
        extra = self._checked_chunk_inputs(now_ns, settings)
        if extra is None:
            return
        wrist_frames, proprio_values = extra
        worker, chunk = self._worker, self._chunk
        if worker is None or chunk is None:
            return
        with self._lock:
            plan = chunk.next_tick(1.0 / settings.rate_hz, worker.busy, driving=self._output_live)
            stop_count = self._stop_count
        if plan.request:
            newest = self._frames.take_new() or frame
            request = ChunkRequest(newest, wrist_frames, proprio_values, instruction, plan.tick, settings,
                                   stop_count, time.perf_counter())
            worker.submit(request)
        if plan.action is not None:
            self._publish_queued(plan.action, settings, plan.stamp, stop_count)

    def _checked_chunk_inputs(
        self, now_ns: int, settings: ControlSettings
    ) -> tuple[tuple[Frame, ...], np.ndarray | None] | None:
        """Returns (newest wrist frames, newest proprio) when they are fresh, else None (output stopped)."""
        wrist_frames = []
        for source, slot in zip(self._wrist_sources, self._wrist_slots, strict=True):
            wrist = slot.peek()
            if not self._input_is_fresh(source, None if wrist is None else wrist.stamp_ns, now_ns,
                                        settings.max_image_age_s):
                return None
            assert wrist is not None
            wrist_frames.append(wrist)
        proprio_values = None
        if self._proprio_source is not None:
            reading = self._proprio_slot.peek()
            if not self._input_is_fresh(self._proprio_source, None if reading is None else reading.stamp_ns, now_ns,
                                        settings.max_proprio_age_s):
                return None
            assert reading is not None
            proprio_values = reading.values
        return tuple(wrist_frames), proprio_values

    def _publish_queued(self, action: np.ndarray, settings: ControlSettings, stamp: Any, stop_count: int) -> None:
        """Control thread: limits and publishes one queued action, unless a stop came since the tick began."""
        try:
            limited = limit_action(action, settings.max_translation, settings.max_rotation)
            gripper = map_gripper(limited[GRIPPER_INDEX], settings.gripper_mode, settings.gripper_flip)
        except ValueError as exc:
            self._report("non_finite", f"action not published: {exc}")
            self._stop_output("invalid action")
            return
        with self._lock:
            if not self._enabled or self._control_timer is None or self._stop_count != stop_count:
                return
            self._publish_action(limited, gripper, settings, stamp)
            self._output_live = True
            self._last_gripper = float(limited[GRIPPER_INDEX])
        self._steps += 1
        self._action_rate.tick()

    def _run_chunk(self, request: ChunkRequest) -> None:
        """Worker thread: decode the images, predict a chunk and queue it (if no stop came meanwhile)."""
        started = time.perf_counter()
        try:
            rgb = message_to_rgb(request.frame.message)
            wrist_rgb = [message_to_rgb(frame.message) for frame in request.wrist_frames]
        except OpenVLAError as exc:
            self._report("image", f"camera image rejected: {exc}")
            self._stop_output("camera image rejected")
            return
        self._resolve("image", "camera images are valid again")
        decoded = time.perf_counter()
        policy, model, control = self._policy, self._chunk_model, self._chunk
        if policy is None or model is None or control is None:
            return
        try:
            chunk = policy.predict_chunk(rgb, request.instruction, wrist_images=wrist_rgb, proprio=request.proprio)
        except OpenVLAError as exc:
            self._report("inference", f"inference failed: {type(exc).__name__}: {exc}")
            self._stop_output("inference failed")
            return
        inferred = time.perf_counter()
        if self._energy.record(getattr(policy, "last_prediction", None)) and not self._energy_warned:
            self._energy_warned = True
            self.get_logger().warning(
                f"energy refinement skipped, the uncorrected chunk is used: {self._energy.problem} (said once; "
                "energy_fallbacks in /diagnostics counts them)"
            )
        problem = chunk_problem(chunk, model)
        if problem is not None:
            self._report("non_finite", f"chunk not used: {problem}")
            self._stop_output("invalid chunk")
            return
        self._resolve("inference", "inference works again")
        self._resolve("non_finite")
        with self._lock:
            if not self._still_current(request.instruction, request.stop_count):
                control.discarded += 1  # stopped, disabled or re-instructed while the model ran
                return
            settings = self._settings
            latency_s = time.perf_counter() - request.requested
            placed = control.add_chunk(np.asarray(chunk, dtype=np.float64), settings.actions_per_inference,
                                       request.frame.message.header.stamp, latency_s)
            depth = control.depth()
            lead = control.schedule.lead_ticks(1.0 / settings.rate_hz)
        self._model_ms.add((inferred - decoded) * 1e3)
        self._latency_ms.add((self.get_clock().now().nanoseconds - request.frame.stamp_ns) / 1e6)
        if self._values["publish_step_timing"]:
            values = {
                "decode_ms": (decoded - started) * 1e3,
                "model_ms": (inferred - decoded) * 1e3,
                "chunk_ms": latency_s * 1e3,  # from the request to the actions being queued
                "queue_depth": float(depth),
                "lead_ticks": float(lead),
                "start_delay_ticks": float(placed.start_tick - request.tick),
            }
            stamp = request.frame.message.header.stamp
            self._timing_pub.publish(timing_array(f"{self.get_name()}: chunk", stamp, values))

    # ------------------------------------------------------------------ token mode

    def _make_step(self, frame: Frame, instruction: str, settings: ControlSettings, tick_ns: int) -> Step:
        """Returns the step of a tick, on a frame newer than the last step's when there is one."""
        with self._lock:
            stop_count = self._stop_count
        newest = self._frames.take_new()
        if newest is None:
            # No frame since the last step (camera jitter, or a camera slower than rate_hz): the rate is
            # kept with the newest frame, whose age the checks bound; counted in diagnostics.
            self._ticks_reusing_frame += 1
            newest = frame
        return Step(newest, instruction, tick_ns, settings, stop_count)

    def _still_current(self, instruction: str, stop_count: int) -> bool:
        """True when a result computed for (instruction, stop_count) may still be used (lock held)."""
        return (
            self._enabled
            and self._control_timer is not None
            and self._instruction == instruction
            and self._stop_count == stop_count
        )

    def _late_step(self) -> Step | None:
        """Worker thread, after a step: the step of a tick that came while it ran, if still due."""
        now_ns = self.get_clock().now().nanoseconds
        with self._lock:
            late_ns = self._late_tick.take_due(now_ns, 1e9 / self._settings.rate_hz)
        if late_ns is None:  # none waiting, or the next tick is due already (this one is skipped)
            return None
        inputs = self._checked_inputs(now_ns)
        return None if inputs is None else self._make_step(*inputs, now_ns)

    def _run_step(self, step: Step) -> None:
        """Worker thread: runs ``step``, then the step of a tick that came while it ran (if still due)."""
        current: Step | None = step
        while current is not None:
            self._run_one_step(current)
            current = self._late_step()

    def _run_one_step(self, step: Step) -> None:
        """Worker thread: decode, infer, limit and publish one action."""
        started = time.perf_counter()
        try:
            rgb = message_to_rgb(step.frame.message)
        except OpenVLAError as exc:
            self._report("image", f"camera image rejected: {exc}")
            self._stop_output("camera image rejected")
            return
        self._resolve("image", "camera images are valid again")
        decoded = time.perf_counter()
        policy = self._policy
        if policy is None:
            return
        try:
            action = policy.predict_action(rgb, step.instruction)
        except OpenVLAError as exc:
            self._report("inference", f"inference failed: {type(exc).__name__}: {exc}")
            self._stop_output("inference failed")
            return
        inferred = time.perf_counter()
        settings = step.settings
        try:
            limited = limit_action(action, settings.max_translation, settings.max_rotation)
            gripper = map_gripper(limited[GRIPPER_INDEX], settings.gripper_mode, settings.gripper_flip)
        except ValueError as exc:
            self._report("non_finite", f"action not published: {exc}")
            self._stop_output("invalid action")
            return
        self._resolve("inference", "inference works again")
        self._resolve("non_finite")
        with self._lock:
            if not self._still_current(step.instruction, step.stop_count):
                return  # disabled, deactivated, re-instructed or stopped (stale camera...) while the model ran
            self._publish_action(limited, gripper, settings, step.frame.message.header.stamp)
            self._output_live = True
            self._last_gripper = float(limited[GRIPPER_INDEX])
        published = time.perf_counter()
        self._steps += 1
        self._action_rate.tick()
        self._model_ms.add((inferred - decoded) * 1e3)
        self._latency_ms.add((self.get_clock().now().nanoseconds - step.frame.stamp_ns) / 1e6)
        if self._values["publish_step_timing"]:
            self._publish_step_timing(step, started, decoded, inferred, published)

    def _publish_action(self, action: Any, gripper: float, settings: ControlSettings, stamp: Any) -> None:
        self._action_pub.publish(action_array(action))
        self._twist_pub.publish(delta_twist(action, settings, stamp))
        self._gripper_pub.publish(Float64(data=float(gripper)))

    def _stop_output(self, reason: str) -> bool:
        """Publishes one zero delta (gripper held) if actions were being published, then stays silent.

        Also voids any step still running, so nothing it computed is published after the zero delta.
        Returns True when a zero delta went out.
        """
        with self._lock:
            self._stop_count += 1
            self._late_tick.clear()
            if self._chunk is not None:
                self._chunk.clear()
            if not self._output_live:
                return False
            self._output_live = False
            array, twist = zero_delta(self._last_gripper, self._settings.frame_id, self.get_clock().now().to_msg())
            self._action_pub.publish(array)
            self._twist_pub.publish(twist)
        self.get_logger().info(f"published a zero delta ({reason})")
        return True

    def _publish_step_timing(
        self, step: Step, started: float, decoded: float, inferred: float, published: float
    ) -> None:
        wait_ms = (step.tick_ns - step.frame.stamp_ns) / 1e6
        values = {
            "image_age_at_tick_ms": wait_ms,
            "image_delivery_ms": (step.frame.received_ns - step.frame.stamp_ns) / 1e6,
            "decode_ms": (decoded - started) * 1e3,
            "model_ms": (inferred - decoded) * 1e3,
            "publish_ms": (published - inferred) * 1e3,
            "step_ms": (published - started) * 1e3,
        }
        stamp = step.frame.message.header.stamp
        self._timing_pub.publish(timing_array(f"{self.get_name()}: step", stamp, values))

    def _on_worker_error(self, exc: Exception) -> None:
        self._report("worker", f"unexpected {type(exc).__name__} in a control step: {exc}")
        try:
            self._stop_output("control step failed")
        except Exception as publish_error:  # nothing more can be done from the worker thread
            self.get_logger().error(f"could not publish the zero delta: {publish_error}")

    # ------------------------------------------------------------------ reporting

    def _report(self, key: str, message: str, warn: bool = True, detail: str = "") -> None:
        """Logs a recurring problem once (again only when it changes or every 10 s while it lasts)."""
        if not self._problems.report(key, message):
            return
        if detail:
            message = f"{message} ({detail})"
        if not warn:
            self.get_logger().info(message)
        elif key == "stale_image":
            self.get_logger().warning(message)
        else:
            self.get_logger().error(message)

    def _resolve(self, key: str, recovery_message: str | None = None) -> bool:
        resolved = self._problems.resolve(key)
        if resolved and recovery_message:
            self.get_logger().info(recovery_message)
        return resolved

    def _publish_diagnostics(self) -> None:
        failed = self._policy is None and self._model_status.startswith("failed")
        level, summary = status_summary(
            self._state_label, self._enabled, self._model_status if failed else None, self._problems.active()
        )
        values = {
            "state": self._state_label,
            "enabled": str(self._enabled).lower(),
            "instruction": self._instruction or "",
            "model": str(self._values["model"]),
            "model_status": self._model_status,
            "rate_hz_target": f"{self._settings.rate_hz:g}",
            "rate_hz_achieved": f"{self._action_rate.rate_hz():.2f}",
            "inference_latency_ms_last": f"{self._model_ms.last:.1f}",
            "inference_latency_ms_median": f"{self._model_ms.percentile(50):.1f}",
            "image_to_action_latency_ms_median": f"{self._latency_ms.percentile(50):.1f}",
            "dropped_frames": str(self._frames.dropped),
            "skipped_ticks": str(self._late_tick.skipped),
            "ticks_reusing_frame": str(self._ticks_reusing_frame),
            "steps": str(self._steps),
            "image_errors": str(self._problems.count("image")),
            "inference_errors": str(self._problems.count("inference")),
            "mode": "token" if self._chunk_model is None else "chunk",
        }
        chunk = self._chunk
        if chunk is not None:
            with self._lock:
                values |= chunk.diagnostic_values(self._settings.actions_per_inference)
            if self._chunk_model is not None and self._chunk_model.has_energy:
                values |= self._energy.values(int(self._values["energy_steps"]))
        array = DiagnosticArray()
        now = self.get_clock().now()
        newest = self._frames.peek()
        image_age_s = (now.nanoseconds - newest.stamp_ns) / 1e9 if newest is not None else math.nan
        values["image_age_s"] = f"{image_age_s:.3f}"
        array.header.stamp = now.to_msg()
        array.status = [
            DiagnosticStatus(
                level=level,
                name=f"{self.get_name()}: policy",
                message=summary,
                hardware_id=str(self._values["model"]),
                values=[KeyValue(key=key, value=value) for key, value in values.items()],
            )
        ]
        self._diagnostics_pub.publish(array)


def main(args: list[str] | None = None, policy_loader: PolicyLoader | None = None) -> None:
    """Runs the policy node until shutdown (SIGINT, SIGTERM or an external shutdown).

    ``policy_loader`` replaces the model loading (see :class:`PolicyNode`).
    """
    # rclpy's own SIGINT handler would shut the context down before the final zero delta could be
    # published: the node's handlers stop the output first (see ShutdownSignals).
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    signals = ShutdownSignals()
    signals.install()
    node: PolicyNode | None = None
    executor: HandoffExecutor | None = None
    try:
        node = PolicyNode(policy_loader=policy_loader)
        if node.autostart and not node.start():
            node.get_logger().error("autostart did not reach the active state; see the errors above")
        executor = HandoffExecutor(num_threads=2)
        executor.add_node(node)
        signals.node = node
        while not signals.requested.is_set() and rclpy.ok():
            executor.spin_once(timeout_sec=0.1)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        signals.closing = True
        if node is not None:
            signals.node = node
            node.stop_now("shutdown")
        if executor is not None:
            finish_callbacks(executor)
            executor.shutdown(timeout_sec=10.0)
        if node is not None:
            node.close()
            # The zero delta of the stop must reach the subscribers before the publishers go.
            node.wait_for_delivery()
            node.destroy_node()
        rclpy.try_shutdown()
        # The process ends now: a signal that comes late (ros2 launch forwards the terminal's Ctrl-C a
        # moment after the terminal delivered it) must not turn a clean exit into death by signal.
        for signum in ShutdownSignals.SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
    # Reached only after a clean stop (an error above propagates with its traceback instead): the
    # outputs are stopped and delivered, the model released and the context shut down. Exit at once:
    # the interpreter's own teardown (torch's finalisers) takes seconds on a busy machine, longer than
    # `ros2 launch` waits before it escalates to SIGTERM and SIGKILL.
    exit_now(0)


if __name__ == "__main__":
    main()
