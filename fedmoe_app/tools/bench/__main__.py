"""``python -m fedmoe_app.tools.bench <name> [options]``: see :mod:`fedmoe_app.tools.bench.cli`."""

from .cli import main

raise SystemExit(main())
