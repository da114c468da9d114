"""``python -m openvla_ros.serve``: see :mod:`openvla_ros.serve.app`."""

import sys

from openvla_ros.serve.app import main

sys.exit(main())
