"""``python -m ovseg.runtime.ros``: the ovseg-ros node."""

import sys

from .node import main

sys.exit(main())
