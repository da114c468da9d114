"""``python -m openvla_ros.convert_prismatic``: the command of :mod:`openvla_ros.model.convert_prismatic`."""

from openvla_ros.model.convert_prismatic import main

if __name__ == "__main__":
    raise SystemExit(main())
