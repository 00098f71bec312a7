"""``python -m fedmoe_app.tools.experiments``: the experiment command line (:mod:`.cli`)."""

import sys

from .cli import main

sys.exit(main())
