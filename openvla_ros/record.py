"""``python -m openvla_ros.record``: the command of :mod:`openvla_ros.ros.record`."""

from openvla_ros.ros.record import main

if __name__ == "__main__":
    raise SystemExit(main())
