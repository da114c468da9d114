"""OpenVLA vision-language-action policies for ROS 2.

The core (model, processor, action codec, policy) is plain Python + torch and never imports rclpy;
the ROS layer (``policy_node``) and the training scripts build on it.
"""

__version__ = "0.1.0"
