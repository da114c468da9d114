"""ROS 2 node of the simulated tabletop: an overhead camera, an end effector driven by 7-DoF deltas.

Run with ``ros2 run openvla_ros sim_scene`` (or ``python -m openvla_ros.sim_scene_node``). The scene,
physics, success checks and scripted expert live in :mod:`openvla_ros.sim`; this node puts them on
topics.

Topics:
    out ``image_topic`` (sensor_msgs/Image rgb8, 640x480) at ``camera_rate_hz``, sensor-data QoS;
        with ``publish_compressed`` also ``<image_topic>/compressed`` (JPEG)
    out ``ee_pose_topic`` (geometry_msgs/PoseStamped): fingertip position and gripper orientation
    out ``gripper_topic`` (std_msgs/Float64): 1.0 open, 0.0 closed
    out ``joint_states_topic`` (sensor_msgs/JointState): the arm seen as a gantry, joints ``x``, ``y``,
        ``z`` (m), ``yaw`` (rad) and ``gripper`` (1.0 open, 0.0 closed)
    out ``instruction_topic`` (std_msgs/String), reliable + transient-local, once per episode
    out ``~/task_state`` (diagnostic_msgs/DiagnosticStatus): episode, task, status, steps, distance
    out ``~/success`` (std_msgs/Bool), transient-local: false at each reset, true on success
    out ``teleop_topic`` (std_msgs/Float64MultiArray, 7 values) while the scripted expert runs
    in  ``action_topic`` (std_msgs/Float64MultiArray, 7 values): one step per message
Services:
    ``~/reset`` (std_srvs/Trigger): a new random episode; the response message is its instruction
    ``~/expert`` (std_srvs/SetBool): run or stop the scripted expert (policy actions are ignored
    while it runs); it stops by itself when the episode ends, after a success once it has come to
    rest at its goal (at most ``expert_settle_steps`` steps later)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticStatus, KeyValue
from geometry_msgs.msg import PoseStamped
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import Bool, Float64, Float64MultiArray, MultiArrayDimension, String
from std_srvs.srv import SetBool, Trigger

from openvla_ros.sim import (
    TASKS,
    CameraModel,
    ExpertConfig,
    SceneError,
    ScriptedExpert,
    TabletopRenderer,
    TabletopScene,
)

NODE_NAME = "sim_scene"
TASK_CHOICES = (*TASKS, "random")
ACTION_LABEL = "dx,dy,dz,droll,dpitch,dyaw,gripper"
JOINT_NAMES = ("x", "y", "z", "yaw", "gripper")

SENSOR_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=5, reliability=ReliabilityPolicy.BEST_EFFORT)
LATCHED_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST,
    depth=1,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.TRANSIENT_LOCAL,
)
RELIABLE_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE)
TASK_STATE_PERIOD_S = 0.5


@dataclass(frozen=True)
class SimParameter:
    """One node parameter with its description and constraints."""

    name: str
    default: Any
    description: str
    read_only: bool = True
    float_range: tuple[float, float] | None = None
    integer_range: tuple[int, int] | None = None
    choices: tuple[str, ...] = ()

    def descriptor(self) -> ParameterDescriptor:
        descriptor = ParameterDescriptor(
            name=self.name, description=self.description, read_only=self.read_only
        )
        if self.float_range is not None:
            low, high = self.float_range
            descriptor.floating_point_range = [FloatingPointRange(from_value=low, to_value=high, step=0.0)]
        if self.integer_range is not None:
            low, high = self.integer_range
            descriptor.integer_range = [IntegerRange(from_value=low, to_value=high, step=1)]
        if self.choices:
            descriptor.additional_constraints = f"one of: {', '.join(self.choices)}"
        return descriptor


PARAMETERS: tuple[SimParameter, ...] = (
    SimParameter("image_topic", "/camera/image_raw", "Camera image topic (sensor_msgs/Image, rgb8)."),
    SimParameter("publish_compressed", False, "Also publish JPEG images on <image_topic>/compressed."),
    SimParameter("image_width", 640, "Camera image width in pixels.", integer_range=(64, 1920)),
    SimParameter("image_height", 480, "Camera image height in pixels.", integer_range=(48, 1080)),
    SimParameter("camera_rate_hz", 30.0, "Camera frame rate.", read_only=False, float_range=(1.0, 60.0)),
    SimParameter("camera_frame_id", "overhead_camera", "frame_id of the camera images."),
    SimParameter("camera_upside_down", False, "The camera mounted rotated by 180 degrees about its optical axis."),
    SimParameter("frame_id", "table", "frame_id of the end-effector pose (the table frame, z up)."),
    SimParameter(
        "action_topic", "/openvla_policy/action", "7-DoF delta actions to apply (Float64MultiArray)."
    ),
    SimParameter("teleop_topic", "/teleop/action", "Where the scripted expert publishes its actions."),
    SimParameter(
        "instruction_topic", "/instruction", "Instruction of the current episode (std_msgs/String)."
    ),
    SimParameter("ee_pose_topic", "/ee_pose", "End-effector pose (geometry_msgs/PoseStamped)."),
    SimParameter("gripper_topic", "/gripper_state", "Gripper state (std_msgs/Float64, 1 open, 0 closed)."),
    SimParameter("joint_states_topic", "/joint_states", "Gantry joint states x, y, z, yaw, gripper."),
    SimParameter(
        "task",
        "random",
        "Task of the next episode: reach, pick, stack or random.",
        read_only=False,
        choices=TASK_CHOICES,
    ),
    SimParameter(
        "seed",
        0,
        "Base seed: episode k is drawn from (seed, k).",
        read_only=False,
        integer_range=(0, 2**31 - 1),
    ),
    SimParameter(
        "first_episode",
        0,
        "Number k of the first episode; each ~/reset after it adds episode_stride.",
        integer_range=(0, 2**31 - 1),
    ),
    SimParameter(
        "episode_stride",
        1,
        "Step between episode numbers: sims started with first_episode 0..n-1 and stride n share out one "
        "seed's episodes.",
        integer_range=(1, 1024),
    ),
    SimParameter("expert_rate_hz", 5.0, "Rate of the scripted expert's actions.", float_range=(1.0, 30.0)),
    SimParameter(
        "expert_noise",
        0.002,
        "Noise of the expert's translations at full speed (m).",
        float_range=(0.0, 0.01),
    ),
    SimParameter(
        "expert_settle_steps",
        0,
        "After a success the expert goes on moving to its goal until it comes to rest, for at most this many "
        "steps (0: it stops at the success), so a demonstration ends where the expert stops.",
        read_only=False,
        integer_range=(0, 50),
    ),
    SimParameter("start_expert", False, "Run the scripted expert from the first episode on."),
    SimParameter("reset_on_start", True, "Start the first episode at start-up (else wait for ~/reset)."),
)
_SPECS = {spec.name: spec for spec in PARAMETERS}


class SimSceneNode(Node):
    """The simulated tabletop on ROS topics; see the module docstring for its interface."""

    def __init__(self, node_name: str = NODE_NAME, **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        for spec in PARAMETERS:
            self.declare_parameter(spec.name, spec.default, spec.descriptor())
        self.add_on_set_parameters_callback(self._validate_parameters)
        self.add_post_set_parameters_callback(self._apply_parameters)
        value = self._value

        self.scene = TabletopScene()
        self.renderer = TabletopRenderer(
            CameraModel(width=value("image_width"), height=value("image_height"),
                        upside_down=value("camera_upside_down"))
        )
        self.expert = ScriptedExpert(ExpertConfig(noise=value("expert_noise")), seed=value("seed"))
        self.episode = -1
        self.expert_enabled = False
        self._ignored_actions = 0
        self._settle_steps = 0
        self._last_status = ""
        self._frame_stamp = None

        self._image_pub = self.create_publisher(Image, value("image_topic"), SENSOR_QOS)
        self._compressed_pub = None
        if value("publish_compressed"):
            topic = value("image_topic").rstrip("/") + "/compressed"
            self._compressed_pub = self.create_publisher(CompressedImage, topic, SENSOR_QOS)
        self._pose_pub = self.create_publisher(PoseStamped, value("ee_pose_topic"), RELIABLE_QOS)
        self._gripper_pub = self.create_publisher(Float64, value("gripper_topic"), RELIABLE_QOS)
        self._joints_pub = self.create_publisher(JointState, value("joint_states_topic"), RELIABLE_QOS)
        self._instruction_pub = self.create_publisher(String, value("instruction_topic"), LATCHED_QOS)
        self._teleop_pub = self.create_publisher(Float64MultiArray, value("teleop_topic"), RELIABLE_QOS)
        self._task_state_pub = self.create_publisher(DiagnosticStatus, "~/task_state", RELIABLE_QOS)
        self._success_pub = self.create_publisher(Bool, "~/success", LATCHED_QOS)
        self.create_subscription(Float64MultiArray, value("action_topic"), self._on_action, RELIABLE_QOS)
        self.create_service(Trigger, "~/reset", self._on_reset)
        self.create_service(SetBool, "~/expert", self._on_expert)
        self._camera_timer = self.create_timer(1.0 / value("camera_rate_hz"), self._publish_camera)
        self._expert_timer = self.create_timer(1.0 / value("expert_rate_hz"), self._expert_step)
        self.create_timer(TASK_STATE_PERIOD_S, self._publish_task_state)

        if value("reset_on_start"):
            self.reset_episode()
        if value("start_expert"):
            self.expert_enabled = True
        self.get_logger().info(
            f"camera {value('image_width')}x{value('image_height')}"
            f"{' (mounted upside down)' if value('camera_upside_down') else ''} at {value('camera_rate_hz'):g} Hz on "
            f"{self._image_pub.topic_name}; applying actions from {value('action_topic')}"
        )

    # ------------------------------------------------------------------ parameters

    def _value(self, name: str) -> Any:
        return self.get_parameter(name).value

    def _validate_parameters(self, parameters: list[Parameter]) -> SetParametersResult:
        for parameter in parameters:
            spec = _SPECS.get(parameter.name)
            if spec is not None and spec.choices and parameter.value not in spec.choices:
                return SetParametersResult(
                    successful=False,
                    reason=f"{parameter.name} must be one of {', '.join(spec.choices)}; got {parameter.value!r}",
                )
        return SetParametersResult(successful=True)

    def _apply_parameters(self, parameters: list[Parameter]) -> None:
        for parameter in parameters:
            if parameter.name == "camera_rate_hz":
                self.destroy_timer(self._camera_timer)
                self._camera_timer = self.create_timer(1.0 / parameter.value, self._publish_camera)

    # ------------------------------------------------------------------ episodes

    def reset_episode(self) -> str:
        """Starts the next episode, publishes its instruction and returns it."""
        if self.episode < 0:
            self.episode = int(self._value("first_episode"))
        else:
            self.episode += int(self._value("episode_stride"))
        seed = (int(self._value("seed")), self.episode)
        task = self.scene.reset(seed=seed, task=self._value("task"))
        self.expert.reset(seed=seed)
        self._settle_steps = 0
        self._last_status = ""
        self._instruction_pub.publish(String(data=task.instruction))
        self._success_pub.publish(Bool(data=False))
        self._publish_task_state()
        self.get_logger().info(f"episode {self.episode} (seed {seed[0]}): {task.instruction!r}")
        return task.instruction

    def _on_reset(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        response.message = self.reset_episode()
        response.success = True
        return response

    def _on_expert(self, request: SetBool.Request, response: SetBool.Response) -> SetBool.Response:
        self.expert_enabled = bool(request.data)
        self.expert.reset()
        self._settle_steps = 0
        response.success = True
        response.message = "expert running" if self.expert_enabled else "expert stopped"
        self.get_logger().info(response.message)
        return response

    # ------------------------------------------------------------------ actions

    def _on_action(self, message: Float64MultiArray) -> None:
        if self.expert_enabled:
            self._ignored_actions += 1
            if self._ignored_actions == 1:
                self.get_logger().warning("actions on the action topic are ignored while the expert runs")
            return
        self._apply(np.asarray(message.data, dtype=np.float64))

    def _expert_step(self) -> None:
        if not self.expert_enabled:
            return
        if self.scene.status == "running":
            action = self.expert.act(self.scene)
        else:
            action = None
            if self.scene.status == "success" and self._settle_steps < self._value("expert_settle_steps"):
                action = self.expert.settle(self.scene)
            if action is None:
                self.expert_enabled = False
                settled = f" and {self._settle_steps} settling steps" if self._settle_steps else ""
                self.get_logger().info(f"episode {self.episode} ended ({self.scene.status}{settled}); expert stopped")
                self._publish_task_state()
                return
            self._settle_steps += 1
        message = Float64MultiArray(data=[float(v) for v in action])
        message.layout.dim = [MultiArrayDimension(label=ACTION_LABEL, size=7, stride=7)]
        self._teleop_pub.publish(message)
        self._apply(action)

    def _apply(self, action: np.ndarray) -> None:
        try:
            self.scene.apply_action(action)
        except SceneError as exc:
            self.get_logger().error(f"action ignored: {exc}", throttle_duration_sec=5.0)
            return
        self._publish_state()
        if self.scene.status != self._last_status:
            self._publish_task_state()

    # ------------------------------------------------------------------ outputs

    def _publish_camera(self) -> None:
        rgb = self.renderer.render(self.scene)
        stamp = self.get_clock().now().to_msg()
        height, width, _ = rgb.shape
        image = Image(height=height, width=width, encoding="rgb8", is_bigendian=0, step=width * 3)
        image.header.stamp = stamp
        image.header.frame_id = self._value("camera_frame_id")
        image.data = rgb.tobytes()
        self._image_pub.publish(image)
        if self._compressed_pub is not None:
            ok, jpeg = cv2.imencode(
                ".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90]
            )
            if ok:
                compressed = CompressedImage(format="rgb8; jpeg compressed bgr8", data=jpeg.tobytes())
                compressed.header = image.header
                self._compressed_pub.publish(compressed)
        self._publish_state(stamp)

    def _publish_state(self, stamp: Any = None) -> None:
        stamp = stamp or self.get_clock().now().to_msg()
        pose = PoseStamped()
        pose.header.stamp = stamp
        pose.header.frame_id = self._value("frame_id")
        x, y, z = (float(v) for v in self.scene.ee_position)
        pose.pose.position.x, pose.pose.position.y, pose.pose.position.z = x, y, z
        qx, qy, qz, qw = self.scene.ee_quaternion()
        orientation = pose.pose.orientation
        orientation.x, orientation.y, orientation.z, orientation.w = qx, qy, qz, qw
        self._pose_pub.publish(pose)
        gripper = 1.0 if self.scene.gripper_open else 0.0
        self._gripper_pub.publish(Float64(data=gripper))
        joints = JointState(name=list(JOINT_NAMES), position=[x, y, z, float(self.scene.ee_yaw), gripper])
        joints.header.stamp = stamp
        self._joints_pub.publish(joints)

    def _publish_task_state(self) -> None:
        state = self.scene.evaluate()
        task = self.scene.task
        if state.status != self._last_status:
            if self._last_status and state.status != "running":
                self.get_logger().info(f"episode {self.episode}: {state.status} after {state.steps} steps")
            if state.status == "success":
                self._success_pub.publish(Bool(data=True))
            self._last_status = state.status
        values = {
            "episode": str(self.episode),
            "seed": str(self._value("seed")),
            "task": task.kind if task else "",
            "instruction": task.instruction if task else "",
            "status": state.status,
            "steps": str(state.steps),
            "max_steps": str(state.max_steps),
            "goal_distance_m": f"{state.goal_distance:.4f}" if math.isfinite(state.goal_distance) else "inf",
            "solved_now": str(state.solved_now).lower(),
            "held": self.scene.held or "",
            "gripper": "open" if self.scene.gripper_open else "closed",
            "expert": str(self.expert_enabled).lower(),
        }
        level = DiagnosticStatus.OK if state.status != "timeout" else DiagnosticStatus.WARN
        self._task_state_pub.publish(
            DiagnosticStatus(
                level=level,
                name=f"{self.get_name()}: task",
                message=state.status,
                hardware_id="tabletop",
                values=[KeyValue(key=key, value=value) for key, value in values.items()],
            )
        )


def task_state_values(status: DiagnosticStatus) -> dict[str, str]:
    """Returns the key/value pairs of a ``~/task_state`` message as a dict."""
    return {item.key: item.value for item in status.values}


def main(args: list[str] | None = None) -> None:
    """Runs the simulated tabletop until shutdown (Ctrl-C or an external shutdown)."""
    rclpy.init(args=args)
    node: SimSceneNode | None = None
    try:
        node = SimSceneNode()
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
