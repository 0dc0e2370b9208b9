"""``python simulations/run.py APP ...`` is ``fedlowrank run APP ...`` (fedlowrank.cli.runner)."""

import sys

from fedlowrank.cli.runner import *  # noqa: F401,F403  (tests import superlink_healthy from here)
from fedlowrank.cli.runner import main

if __name__ == "__main__":
    sys.exit(main())
