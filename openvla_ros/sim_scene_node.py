"""``python -m openvla_ros.sim_scene_node``: the command of :mod:`openvla_ros.ros.sim_scene_node`."""

from openvla_ros.ros.sim_scene_node import main

if __name__ == "__main__":
    raise SystemExit(main())
