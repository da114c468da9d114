"""A simulated tabletop for trying the policy without a robot: scene physics, camera, scripted expert.

Pure Python (numpy + OpenCV); :mod:`openvla_ros.ros.sim_scene_node` puts it on ROS topics.
"""

from openvla_ros.sim.expert import ExpertConfig, ScriptedExpert
from openvla_ros.sim.render import CameraModel, TabletopRenderer
from openvla_ros.sim.scene import COLORS, TASKS, SceneConfig, SceneError, TabletopScene, Task, TaskState

__all__ = [
    "COLORS",
    "TASKS",
    "CameraModel",
    "ExpertConfig",
    "SceneConfig",
    "SceneError",
    "ScriptedExpert",
    "TabletopRenderer",
    "TabletopScene",
    "Task",
    "TaskState",
]
