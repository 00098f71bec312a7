"""Client-expert alignment: fitness, usage, desirability, policies and an exact solver.

Pure numpy (plus OR-Tools' min-cost flow for the exact solver): no torch, no Flower (an
import-linter contract checks it), so this package can be unit-tested and benchmarked on
its own.

* :mod:`.state`     -- :class:`AlignmentState`: fitness ``F[c, e]``, usage ``U[e]`` and the
  desirability ``D = w_fitness * norm(F) - w_usage * norm(U)``;
* :mod:`.layered`   -- :class:`LayeredAlignment`, one state per MoE layer (untied layers);
* :mod:`.policies`  -- ``random``, ``greedy``, ``load_balanced`` and ``dense``, one object each;
* :mod:`.solver`    -- :func:`solve_assignment`, exact b-matching under per-expert load bounds;
* :mod:`.minimum`   -- :func:`enforce_min_trainers`, at least ``m`` trainers per planned expert;
* :mod:`.flow`, :mod:`.pricing` -- its min-cost-flow network and, for large instances, the
  pruned network with an optimality certificate;
* :mod:`.multilevel` -- for very large rounds, multi-level prices, fix-and-free and a cheap
  exact certificate (tried first; certified plans only).

docs/ALIGNMENT.md explains the formulas and shows the planner's speed.
"""

from .layered import LayeredAlignment, alignment_from_state_dict
from .minimum import enforce_min_trainers
from .policies import POLICIES, REGISTRY, PlanInputs, Policy, get_policy
from .solver import load_bounds, load_cv, solve_assignment
from .state import FITNESS_INITS, AlignmentState

__all__ = [
    "FITNESS_INITS",
    "POLICIES",
    "REGISTRY",
    "PlanInputs",
    "Policy",
    "AlignmentState",
    "LayeredAlignment",
    "alignment_from_state_dict",
    "enforce_min_trainers",
    "get_policy",
    "load_bounds",
    "load_cv",
    "solve_assignment",
]
