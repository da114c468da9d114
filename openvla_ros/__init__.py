"""OpenVLA vision-language-action policies for ROS 2.

- :mod:`openvla_ros.model`: the core (configuration, model, processor, action codec, checkpoint
  loading, policy, tiny checkpoints). Plain Python + torch; it never imports rclpy.
- :mod:`openvla_ros.ros`: the ROS 2 layer (policy node, simulated scene node, recorder, message
  conversions, control-loop pieces).
- :mod:`openvla_ros.dataset`, :mod:`openvla_ros.finetune`, :mod:`openvla_ros.sim`: rosbag2 -> RLDS,
  LoRA fine-tuning, the simulated tabletop.

The command-line entry points keep their short names (``python -m openvla_ros.tiny``,
``openvla_ros.predict``, ``openvla_ros.policy_node``, ``openvla_ros.sim_scene_node``,
``openvla_ros.record``, ``openvla_ros.convert_prismatic``).
"""

__version__ = "0.1.0"
