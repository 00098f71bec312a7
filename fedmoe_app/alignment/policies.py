"""Assignment policies: which experts each of this round's clients receives.

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

import numpy as np

from .solver import load_bounds, solve_assignment

POLICIES: tuple[str, ...] = ("random", "greedy", "load_balanced", "dense")


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


def plan_experts(
    policy: str,
    r: np.ndarray,
    fitness: np.ndarray,
    desirability: np.ndarray | None,
    *,
    load_slack: float,
    approx_min_clients: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Assign experts to this round's clients under ``policy``.

    Parameters
    ----------
    policy : str
        One of :data:`POLICIES`.
    r : np.ndarray
        int64 ``[C]`` slots, ``min(capacity, E)`` (ignored by ``dense``).
    fitness : np.ndarray
        float64 ``[C, E]``, this round's rows of ``F`` (used by ``greedy``).
    desirability : np.ndarray or None
        float64 ``[C, E]``, this round's rows of ``D``; required by ``load_balanced`` only.
    load_slack : float
        Relative slack of the ``load_balanced`` load bounds.
    approx_min_clients : int
        ``load_balanced`` rounds with at least this many clients take the fix-and-free
        approximation (0: always exact).
    rng : np.random.Generator
        Randomness of ``random`` and of greedy tie-breaking.

    Returns
    -------
    np.ndarray
        Boolean ``[C, E]`` plan.

    """
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; expected one of {POLICIES}")
    if policy == "dense":
        return np.ones(fitness.shape, dtype=bool)
    if policy == "random":
        return random_plan(r, fitness.shape[1], rng)
    if policy == "greedy":
        return greedy_plan(fitness, r, rng)
    if desirability is None:
        raise ValueError("policy 'load_balanced' needs the desirability matrix")
    return balanced_plan(desirability, r, load_slack, approx_min_clients)
