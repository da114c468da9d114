"""ROS 2 lifecycle node running an OpenVLA policy: camera image + instruction -> 7-DoF deltas.

Only the ROS part lives here: parameters, lifecycle transitions, subscriptions, publishers, timers and
the ``~/enable`` service. The control logic is DDS-free: :class:`~openvla_ros.ros.control_core.
ControlCore` (enable, instruction, safety stops, input checks) with a mode controller on top,
:class:`~openvla_ros.ros.token_mode.TokenController` (OpenVLA: one inference per tick) or
:class:`~openvla_ros.ros.chunk_controller.ChunkController` (OpenVLA-OFT: a queue of predicted actions).

Lifecycle: ``configure`` loads the model once and subscribes to the inputs, ``activate`` starts the
control timer, ``deactivate`` stops it (one zero delta if the robot was being driven), ``cleanup`` frees
the model. With ``autostart`` (default) the node configures and activates itself; it still publishes
nothing until ``~/enable`` is called with ``true`` (unless ``start_enabled``) and an instruction arrived.

Topics (docs/node.md has the table): in ``image_topic`` (Image, or ``<topic>/compressed``), the
instruction (std_msgs/String, volatile and transient-local subscriptions), in chunk mode the
``wrist_image_topics`` and ``proprio_topic``; out ``~/action``, ``~/delta_twist``, ``~/gripper``,
``~/step_timing`` (with ``publish_step_timing``) and ``/diagnostics`` once per second.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import TwistStamped
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import Float64, Float64MultiArray, String
from std_srvs.srv import SetBool

from openvla_ros.ros.chunk_controller import ChunkController
from openvla_ros.ros.chunk_mode import proprio_from_array, proprio_from_joint_state
from openvla_ros.ros.control import MAX_CHUNK_RATE_HZ, MAX_RATE_HZ, ControlSettings, LatestSlot
from openvla_ros.ros.control_core import ControlCore, Frame
from openvla_ros.ros.messages import action_array, delta_twist, diagnostic_array, timing_array, zero_delta
from openvla_ros.ros.model_setup import (
    LoadedModel,
    ModelSetupError,
    PolicyLoader,
    auto_cpu_threads,
    load_model,
    load_policy,
)
from openvla_ros.ros.node_status import status_summary
from openvla_ros.ros.parameters import (
    ENERGY_FIELDS,
    PARAMETERS,
    SPECS,
    ParameterSpec,
    change_problem,
    settings_from,
    whole_numbers_as_floats,
)
from openvla_ros.ros.shutdown import ShutdownSignals, run_node, wait_for_acknowledgement
from openvla_ros.ros.token_mode import TokenController

__all__ = ["PARAMETERS", "PolicyNode", "ShutdownSignals", "auto_cpu_threads", "load_policy", "main"]

NODE_NAME = "openvla_policy"
DIAGNOSTICS_PERIOD_S = 1.0
DELIVERY_TIMEOUT_S = 1.0  # longest wait for the subscribers to acknowledge the last output
WORKER_TIMEOUT_S = 30.0

SENSOR_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.BEST_EFFORT)
LATCHED_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)
# A transient-local subscription does not match a volatile publisher (DDS QoS rules) and a volatile one
# gets no history: the node subscribes with both, so every kind of publisher reaches it.
INSTRUCTION_VOLATILE_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE)
OUTPUT_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE)


def _ignore_event(event: Any) -> None:
    """An event callback that does nothing (replaces rclpy's default warning)."""


class PolicyNode(LifecycleNode):
    """The OpenVLA policy as a managed (lifecycle) node; see the module docstring.

    ``policy_loader`` builds the policy from the parameter values on configure (default
    :func:`~openvla_ros.ros.model_setup.load_policy`): anything with ``predict_action(rgb, instruction)``,
    ``unnorm_key`` and ``release()``, or a chunked policy (see :mod:`openvla_ros.ros.chunk_mode`).
    """

    def __init__(self, node_name: str = NODE_NAME, policy_loader: PolicyLoader | None = None, **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        self._policy_loader = policy_loader or load_policy
        self._values: dict[str, Any] = {spec.name: spec.default for spec in PARAMETERS}
        self._core = ControlCore(self, self.get_logger(), lambda: self.get_clock().now().nanoseconds)
        self._state_label = "unconfigured"
        self._model_status = "not loaded"
        self._model: LoadedModel | None = None
        self._rate_limit_hz = MAX_CHUNK_RATE_HZ  # until a token policy is loaded
        self._control_timer: Any = None
        self._subscriptions_in_use: list[Any] = []

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

    # ------------------------------------------------------------------ outputs (the core's Outputs)

    def action(self, action: np.ndarray, gripper: float, settings: ControlSettings, stamp: Any) -> None:
        self._action_pub.publish(action_array(action))
        self._twist_pub.publish(delta_twist(action, settings, stamp))
        self._gripper_pub.publish(Float64(data=float(gripper)))

    def zero_delta(self, gripper: float, frame_id: str) -> None:
        array, twist = zero_delta(gripper, frame_id, self.get_clock().now().to_msg())
        self._action_pub.publish(array)
        self._twist_pub.publish(twist)

    def timing(self, kind: str, stamp: Any, values: dict[str, float]) -> None:
        self._timing_pub.publish(timing_array(f"{self.get_name()}: {kind}", stamp, values))

    # ------------------------------------------------------------------ parameters

    @property
    def autostart(self) -> bool:
        return bool(self._values["autostart"])

    def _declare(self, spec: ParameterSpec) -> None:
        """Declares one parameter; an invalid start-up value is logged and replaced by the default.

        A whole number given for a floating-point parameter (``rate_hz: 10`` in YAML, ``-p
        max_translation:=0``) is taken as that float rather than rejected for its type.
        """
        override = self._parameter_overrides.get(spec.name)  # rclpy types ``10`` as an integer
        if override is not None:
            (self._parameter_overrides[spec.name],) = whole_numbers_as_floats([override])
        default = Parameter.Type.STRING_ARRAY if spec.default == [] else spec.default  # [] has no type
        try:
            self.declare_parameter(spec.name, default, spec.descriptor())
        except (InvalidParameterValueException, InvalidParameterTypeException) as exc:
            self.get_logger().error(f"parameter {spec.name!r} rejected at start-up ({exc}); using the default "
                                    f"{spec.default!r}")
            self._core.problems.report(f"parameter:{spec.name}", f"start-up value rejected: {exc}")
            self.declare_parameter(spec.name, default, spec.descriptor(), ignore_override=True)

    def set_parameters_atomically(self, parameter_list: list[Parameter]) -> SetParametersResult:
        """Sets parameters at run time (the parameter services call this); logs a rejection with its reason."""
        result = super().set_parameters_atomically(parameter_list)
        if not result.successful:
            names = ", ".join(parameter.name for parameter in parameter_list)
            self.get_logger().error(f"parameter change rejected ({names}): {result.reason}")
        return result

    def _validate_parameters(self, parameters: list[Parameter]) -> SetParametersResult:
        model = self._model
        problem = change_problem(self._values, parameters, model is not None,
                                 None if model is None else model.chunk_model, self._rate_limit_hz)
        return SetParametersResult(successful=problem is None, reason=problem or "")

    def _apply_parameters(self, parameters: list[Parameter]) -> None:
        core = self._core
        with core.lock:
            for parameter in parameters:
                if parameter.name in SPECS:
                    self._values[parameter.name] = parameter.value
            previous_rate = core.settings.rate_hz
            core.settings = settings_from(self._values, self._rate_limit_hz)
            core.strip_instruction = bool(self._values["strip_instruction"])
            core.publish_timing = bool(self._values["publish_step_timing"])
            if isinstance(core.mode, ChunkController):
                core.mode.apply_settings(core.settings)
                if any(parameter.name in ENERGY_FIELDS for parameter in parameters):
                    core.mode.configure_energy(*(self._values[name] for name in ENERGY_FIELDS))
            if self._control_timer is not None and core.settings.rate_hz != previous_rate:
                self._control_timer.timer_period_ns = int(1e9 / core.settings.rate_hz)
                self._control_timer.reset()
                core.action_rate.reset()
                self.get_logger().info(f"control rate changed to {core.settings.rate_hz:g} Hz")

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> bool:
        """Configures and activates the node; returns True when it ends up active."""
        if self.trigger_configure() != TransitionCallbackReturn.SUCCESS:
            return False
        return self.trigger_activate() == TransitionCallbackReturn.SUCCESS

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        values, core = dict(self._values), self._core
        self._model_status = "loading"
        self.get_logger().info(f"loading model {values['model']!r} (quantization {values['quantization']}, "
                               f"dtype {values['dtype']}, device {values['device']})")
        try:
            model = load_model(self._policy_loader, values, self.get_logger())
        except ModelSetupError as exc:
            return self._fail_configure(str(exc), loaded=exc.loaded)
        self._rate_limit_hz = MAX_RATE_HZ if model.chunk_model is None else MAX_CHUNK_RATE_HZ
        with core.lock:
            core.settings = settings_from(self._values, self._rate_limit_hz)
            core.strip_instruction = bool(values["strip_instruction"])
            core.publish_timing = bool(values["publish_step_timing"])
            core.mode = (TokenController(core, model.policy) if model.chunk_model is None else
                         ChunkController(core, model.policy, model.chunk_model, values["energy_steps"]))
        self._model, self._model_status = model, model.status
        core.problems.resolve("model")
        self.get_logger().info(f"model {values['model']!r} {self._model_status}")
        image_sub = self._subscribe_image(values["image_topic"], values["image_transport"], core.frames)
        extra_subs = self._subscribe_chunk_inputs(core.mode, values)
        # The latched subscription cannot match a volatile publisher: that is expected (the volatile
        # one takes its messages), so rclpy's "incompatible QoS" warning is silenced for it.
        topic = values["instruction_topic"]
        instruction_subs = [
            self.create_subscription(String, topic, self._on_instruction, INSTRUCTION_VOLATILE_QOS),
            self.create_subscription(String, topic, self._on_instruction, LATCHED_QOS,
                                     event_callbacks=SubscriptionEventCallbacks(incompatible_qos=_ignore_event)),
        ]
        self._subscriptions_in_use = [image_sub, *instruction_subs, *extra_subs]
        self._state_label = "inactive"
        extra = "".join(f", {subscription.topic_name}" for subscription in extra_subs)
        self.get_logger().info(
            f"subscribed to {image_sub.topic_name} ({values['image_transport']}){extra} and "
            f"{instruction_subs[0].topic_name} (volatile and latched publishers); torch threads {model.threads}"
        )
        return TransitionCallbackReturn.SUCCESS

    def _subscribe_image(self, topic: str, transport: str, slot: LatestSlot[Frame]) -> Any:
        """Subscribes ``slot`` to the newest image on ``topic`` (``<topic>/compressed`` when compressed)."""

        def store(message: Image | CompressedImage) -> None:
            stamp = message.header.stamp
            slot.put(Frame(message, stamp.sec * 1_000_000_000 + stamp.nanosec, self.get_clock().now().nanoseconds))

        if transport == "compressed":
            return self.create_subscription(CompressedImage, topic.rstrip("/") + "/compressed", store, SENSOR_QOS)
        return self.create_subscription(Image, topic, store, SENSOR_QOS)

    def _subscribe_chunk_inputs(self, mode: Any, values: dict[str, Any]) -> list[Any]:
        """Subscribes to the wrist cameras and the proprio topic a chunked model takes; returns the subscriptions."""
        if not isinstance(mode, ChunkController):
            return []
        subscriptions = []
        for topic in values["wrist_image_topics"] or []:
            slot: LatestSlot[Frame] = LatestSlot()
            subscriptions.append(self._subscribe_image(topic, values["image_transport"], slot))
            mode.add_wrist_camera(subscriptions[-1].topic_name, slot)
        if mode.model.proprio_dim:
            joint_state = values["proprio_type"] == "joint_state"
            message_type = JointState if joint_state else Float64MultiArray
            convert = proprio_from_joint_state if joint_state else proprio_from_array
            proprio_slot = mode.proprio_slot

            def store(message: Any) -> None:
                proprio_slot.put(convert(message, self.get_clock().now().nanoseconds))

            subscriptions.append(self.create_subscription(message_type, values["proprio_topic"], store, SENSOR_QOS))
            mode.add_proprio(subscriptions[-1].topic_name)
        return subscriptions

    def _fail_configure(self, reason: str, loaded: bool = False) -> TransitionCallbackReturn:
        """Ends a failed configure: ``loaded`` says the model loaded but the parameters do not fit it."""
        self._model_status = f"failed: {reason}"
        self._core.problems.report("model", reason)
        if loaded:
            self.get_logger().error(f"the model loaded, but the parameters do not fit it; the node stays "
                                    f"unconfigured. {reason}. Change them and configure again")
        else:
            self.get_logger().error(f"could not load the model; the node stays unconfigured. {reason}")
        return TransitionCallbackReturn.FAILURE

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        core = self._core
        with core.lock:
            core.activate(bool(self._values["start_enabled"]))
            if isinstance(core.mode, ChunkController):
                core.mode.control.inference_rate.reset()
            self._control_timer = self.create_timer(1.0 / core.settings.rate_hz, self._on_control_tick,
                                                    callback_group=self._control_group)
            self._state_label = "active"
        self.get_logger().info(f"active at {core.settings.rate_hz:g} Hz; output "
                               + ("enabled" if core.enabled else "disabled until ~/enable is called with true"))
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
        """Stops the timer, waits for the running step, disables output and sends one zero delta, waited
        for (bounded, see :meth:`wait_for_delivery`): every caller goes on to tear something down."""
        core = self._core
        with core.lock:
            timer, self._control_timer = self._control_timer, None
            core.deactivate()
        if timer is not None:
            self.destroy_timer(timer)
        if core.mode is not None:
            core.mode.wait_idle(WORKER_TIMEOUT_S)
        if core.stop_output("control stopped"):
            self.wait_for_delivery()

    def wait_for_delivery(self, timeout_s: float = DELIVERY_TIMEOUT_S) -> bool:
        """Waits (at most ``timeout_s``) until the outputs' reliable subscribers acknowledged everything
        published: the zero delta of a stop must arrive before the publishers go."""
        return wait_for_acknowledgement((self._action_pub, self._twist_pub, self._gripper_pub), timeout_s,
                                        self.get_logger())

    def stop_now(self, reason: str) -> None:
        """Stops the output at once: no new step starts, a running step is voided, one zero delta goes out.

        Fast and safe from a signal handler (the model, worker and timer are left to :meth:`close`).
        """
        with self._core.lock:
            self._core.disable()
            if self._control_timer is not None:
                self._control_timer.cancel()
        self._core.stop_output(reason)

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
        if self._core.mode is not None:
            self._core.mode.close(WORKER_TIMEOUT_S)
        self._core.release()
        if self._model is not None:
            self._model.policy.release()
            self._model = None
            self._model_status = "released"
        self._rate_limit_hz = MAX_CHUNK_RATE_HZ  # the next model may be chunked

    # ------------------------------------------------------------------ inputs, service, timers

    def _on_instruction(self, message: String) -> None:
        self._core.set_instruction(message.data)

    def _on_enable(self, request: SetBool.Request, response: SetBool.Response) -> SetBool.Response:
        response.success, response.message = self._core.set_enabled(bool(request.data), self._state_label)
        return response

    def _on_control_tick(self) -> None:
        mode = self._core.mode
        if mode is not None:
            mode.tick(self.get_clock().now().nanoseconds)

    def _publish_diagnostics(self) -> None:
        core = self._core
        failed = self._model is None and self._model_status.startswith("failed")
        level, summary = status_summary(self._state_label, core.enabled, self._model_status if failed else None,
                                        core.problems.active())
        now = self.get_clock().now()
        values = {"state": self._state_label, "model": str(self._values["model"]), "model_status": self._model_status,
                  **core.diagnostic_values(now.nanoseconds)}
        remote = getattr(self._model.policy, "diagnostic_values", None) if self._model is not None else None
        if remote is not None:  # remote mode: the server's request latency and failures
            values.update(remote())
        self._diagnostics_pub.publish(diagnostic_array(f"{self.get_name()}: policy", level, summary,
                                                       str(self._values["model"]), values, now.to_msg()))


def main(args: list[str] | None = None, policy_loader: PolicyLoader | None = None) -> None:
    """Runs the policy node until shutdown (SIGINT, SIGTERM or an external shutdown); exits with status 0
    after a clean stop. ``policy_loader`` replaces the model loading (see :class:`PolicyNode`)."""
    run_node(lambda: PolicyNode(policy_loader=policy_loader), args)


if __name__ == "__main__":
    main()
