"""The OpenVLA core: configuration, model, processor, action codec, checkpoint loading, policy.

Plain Python + torch; nothing here imports rclpy.
"""
