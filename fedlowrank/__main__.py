"""``python -m fedlowrank``: the ``fedlowrank`` command."""

import sys

from .cli import main

sys.exit(main())
