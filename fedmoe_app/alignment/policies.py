"""Assignment policies: which experts each of this round's clients receives.

A policy is one object (:class:`Policy`), registered once in :data:`REGISTRY`: how it plans a
round, whether it needs the desirability matrix, which clients it leaves read-only, and how a
client that never trained is given experts to evaluate.

``dense``          every client gets every expert (the FedAvg baseline; capacity ignored).
``random``         ``r[c]`` distinct experts uniformly at random.
``greedy``         the ``r[c]`` experts of highest fitness ``F`` (ties broken at random).
``load_balanced``  :func:`~.solver.solve_assignment` on the desirability ``D`` with the bounds
                   of :func:`~.solver.load_bounds`: ``m = S / E``,
                   ``max_load = ceil(m (1 + load_slack))``, ``min_load = floor(m (1 - load_slack))``,
                   clipped to the number of clients with nonzero capacity. These are always
                   feasible: placing clients one by one on their ``r[c]`` least-loaded experts
                   keeps all loads within one of ``m`` (a randomized test checks it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .solver import load_bounds, solve_assignment


def top_by_order(order: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Boolean plan taking the first ``r[c]`` columns of each row's ``order``."""
    plan = np.zeros(order.shape, dtype=bool)
    take = np.arange(order.shape[1])[None, :] < r[:, None]
    np.put_along_axis(plan, order, take, axis=1)
    return plan


def random_plan(r: np.ndarray, num_experts: int, rng: np.random.Generator) -> np.ndarray:
    """``r[c]`` distinct experts per row, uniformly at random."""
    order = np.argsort(rng.random((r.size, num_experts)), axis=1)
    return top_by_order(order, r)


def greedy_plan(score: np.ndarray, r: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Top-``r[c]`` by ``score`` per row; ties at the cut broken uniformly at random.

    One argsort for all rows; only rows whose ``r``-th and ``r+1``-th best scores are equal
    (e.g. new clients, all 0) are re-ranked with a random permutation and a stable sort.
    """
    num_rows, num_experts = score.shape
    if num_rows == 0:
        return np.zeros(score.shape, dtype=bool)
    order = np.argsort(-score, axis=1)
    ranked = np.take_along_axis(score, order, axis=1)
    cut = np.clip(r, 1, max(num_experts - 1, 1)) - 1
    inner = (r > 0) & (r < num_experts)
    ties = np.flatnonzero(
        inner
        & (
            ranked[np.arange(num_rows), cut]
            == ranked[np.arange(num_rows), np.minimum(cut + 1, num_experts - 1)]
        )
    )
    if ties.size:
        sub = score[ties]
        perm = np.argsort(rng.random(sub.shape), axis=1)
        shuffled = np.take_along_axis(sub, perm, axis=1)
        resorted = np.argsort(-shuffled, axis=1, kind="stable")
        order[ties] = np.take_along_axis(perm, resorted, axis=1)
    return top_by_order(order, r)


def balanced_plan(
    desirability: np.ndarray, r: np.ndarray, load_slack: float, approx_min_clients: int
) -> np.ndarray:
    """Max-desirability plan with every expert's load inside :func:`load_bounds`.

    Exact, except from ``approx_min_clients`` clients on (if > 0): then feasible and close to
    optimal (:func:`~.solver.solve_assignment`).
    """
    lo, hi = load_bounds(r, desirability.shape[1], load_slack)
    return solve_assignment(desirability, r, min_load=lo, max_load=hi, approx_min_clients=approx_min_clients)


@dataclass(frozen=True)
class PlanInputs:
    """What a policy may look at when it plans a round.

    Attributes
    ----------
    r : np.ndarray
        int64 ``[C]`` slots, ``min(capacity, E)`` (ignored by ``dense``).
    fitness : np.ndarray
        float64 ``[C, E]``, this round's rows of ``F``.
    desirability : np.ndarray or None
        float64 ``[C, E]``, this round's rows of ``D``; given when the policy needs it.
    load_slack : float
        Relative slack of the ``load_balanced`` load bounds.
    approx_min_clients : int
        ``load_balanced`` rounds with at least this many clients take the fix-and-free
        approximation (0: always exact).
    rng : np.random.Generator
        Randomness of ``random`` and of greedy tie-breaking.

    """

    r: np.ndarray
    fitness: np.ndarray
    desirability: np.ndarray | None
    load_slack: float
    approx_min_clients: int
    rng: np.random.Generator


class Policy:
    """An assignment policy: plans a round, says which clients hold their experts read-only.

    Subclasses set :attr:`name` and implement :meth:`plan`; :meth:`register` makes them known
    by name (run-config ``policy``).
    """

    name: str = ""
    #: Whether :meth:`plan` reads ``PlanInputs.desirability`` (computed only then).
    needs_desirability: bool = False
    #: The policy that picks a never-trained client's experts for evaluation.
    evaluation_policy: str = "greedy"

    def plan(self, inputs: PlanInputs) -> np.ndarray:
        """Return the boolean ``[C, E]`` plan of this round's clients."""
        raise NotImplementedError

    def frozen(self, capacity: np.ndarray, min_trained_experts: int) -> np.ndarray:
        """Clients that train the shared part only: capacity 0, or below ``min-trained-experts``."""
        return capacity < max(min_trained_experts, 1)


class RandomPolicy(Policy):
    """``r[c]`` distinct experts uniformly at random."""

    name = "random"

    def plan(self, inputs: PlanInputs) -> np.ndarray:  # noqa: D102
        return random_plan(inputs.r, inputs.fitness.shape[1], inputs.rng)


class GreedyPolicy(Policy):
    """The ``r[c]`` experts of highest fitness (ties broken at random)."""

    name = "greedy"

    def plan(self, inputs: PlanInputs) -> np.ndarray:  # noqa: D102
        return greedy_plan(inputs.fitness, inputs.r, inputs.rng)


class LoadBalancedPolicy(Policy):
    """Max-desirability plan under per-expert load bounds (:func:`balanced_plan`)."""

    name = "load_balanced"
    needs_desirability = True

    def plan(self, inputs: PlanInputs) -> np.ndarray:  # noqa: D102
        if inputs.desirability is None:
            raise ValueError("policy 'load_balanced' needs the desirability matrix")
        return balanced_plan(inputs.desirability, inputs.r, inputs.load_slack, inputs.approx_min_clients)


class DensePolicy(Policy):
    """Every client gets every expert: the FedAvg baseline (capacity ignored)."""

    name = "dense"

    def plan(self, inputs: PlanInputs) -> np.ndarray:  # noqa: D102
        return np.ones(inputs.fitness.shape, dtype=bool)

    def frozen(self, capacity: np.ndarray, min_trained_experts: int) -> np.ndarray:
        """Every client that can hold an expert trains them all; only capacity 0 is read-only."""
        return capacity == 0


#: Every policy, by name: the one place a policy is registered.
REGISTRY: dict[str, Policy] = {
    p.name: p for p in (RandomPolicy(), GreedyPolicy(), LoadBalancedPolicy(), DensePolicy())
}
#: The names run-config ``policy`` accepts.
POLICIES: tuple[str, ...] = tuple(REGISTRY)


def get_policy(policy: str | Policy) -> Policy:
    """Return the registered policy named ``policy`` (a :class:`Policy` is returned as it is).

    Raises
    ------
    ValueError
        If no policy has that name.

    """
    if isinstance(policy, Policy):
        return policy
    if policy not in REGISTRY:
        raise ValueError(f"unknown policy {policy!r}; expected one of {POLICIES}")
    return REGISTRY[policy]
