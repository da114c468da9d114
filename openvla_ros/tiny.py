"""``python -m openvla_ros.tiny``: the command of :mod:`openvla_ros.model.tiny`."""

from openvla_ros.model.tiny import main

if __name__ == "__main__":
    raise SystemExit(main())
