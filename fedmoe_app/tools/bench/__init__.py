"""Micro-benchmarks for fedmoe, one subcommand each.

Usage::

    python -m fedmoe_app.tools.bench alignment [--sizes 1000,10000,100000] [--experts 64] [--repeats 3]
    python -m fedmoe_app.tools.bench experts [--experts 8,16,32,64] [--batch-size 32] [--threads 1]
    python -m fedmoe_app.tools.bench dispatch [--experts 8,16,32,64] [--batch-sizes 32,64]
    python -m fedmoe_app.tools.bench overhead [--clients 10 --rounds 3 --dataset fashion-mnist|synthetic]
    python -m fedmoe_app.tools.bench memory [--models cnn-moe,transformer-moe] [--experts 1,2,4,8]

* :mod:`.alignment` -- time :meth:`~fedmoe_app.alignment.AlignmentState.plan` per policy;
* :mod:`.experts`   -- local training per sample as the number of experts grows
  (criterion: E=64 within 1.5x of E=8);
* :mod:`.dispatch`  -- the expert layer alone (forward + backward) for each dispatch method
  under balanced and skewed routing;
* :mod:`.overhead`  -- the same federated training as a plain PyTorch loop (:mod:`.plain`)
  and through the app (``flwr run`` in local simulation), both times and their ratio
  (criterion: app <= 1.25x plain);
* :mod:`.memory`    -- the capacity memory model against measured peak RSS growth;
* :mod:`.common`    -- shared helpers; :mod:`.cli` -- the parser and :func:`main`.

See ``docs/PERFORMANCE.md``, ``docs/ALIGNMENT.md`` and ``docs/CAPACITY.md`` for results.
"""

from .cli import build_parser, main
from .dispatch import ALTERNATIVES, routing_slots
from .plain import overhead_run_config, plain_loop

__all__ = ["ALTERNATIVES", "build_parser", "main", "overhead_run_config", "plain_loop", "routing_slots"]
