"""``python -m openvla_ros.policy_node``: the command of :mod:`openvla_ros.ros.policy_node`."""

from openvla_ros.ros.policy_node import main

if __name__ == "__main__":
    raise SystemExit(main())
