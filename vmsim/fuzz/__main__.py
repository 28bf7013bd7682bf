"""``python -m vmsim.fuzz``: the same as ``vmsim fuzz``."""

import sys

from vmsim.fuzz.command import main

sys.exit(main())
