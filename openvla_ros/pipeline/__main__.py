"""``python -m openvla_ros.pipeline``."""

import sys

from openvla_ros.pipeline.app import main

sys.exit(main())
