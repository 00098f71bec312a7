"""Exact max-desirability client-expert assignment under capacity and per-expert load bounds.

Notation: ``C`` clients (rows), ``E`` experts (columns); ``r[c] = min(capacity[c], E)`` is the
number of experts client ``c`` receives this round ("slots") and ``S = sum(r)``.

:func:`solve_assignment` maximizes ``sum(D * X)`` over boolean ``X`` with row sums ``r`` and
column sums inside ``[min_load, max_load]`` as a min-cost flow (:mod:`.flow`); large
instances are pruned and certified (:mod:`.pricing`).

Tolerance: costs are ``K = round(D * scale)`` with ``scale = 2**30 / max|D|``. Rounding moves
each arc's cost by at most half a unit, so the returned plan's true desirability is within
``S * max|D| * 2**-30`` (absolute) of the optimum (``< 1e-9 * S * max|D|``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

from . import flow, multilevel, pricing

logger = logging.getLogger(__name__)

#: Build the pruned network only when the full one has at least this many client arcs.
PRUNE_MIN_ARCS: int = 250_000


#: Pricing rounds (solve pruned network, add violated arcs) before solving the full network.
PRICING_ROUNDS: int = 6


def load_cv(load: np.ndarray | Sequence[float]) -> float:
    """Coefficient of variation (std / mean) of a per-expert load vector.

    Parameters
    ----------
    load : array_like
        ``[E]`` load of each expert: clients assigned (``plan.sum(0)``) or tokens trained.

    Returns
    -------
    float
        ``std(load) / mean(load)``; 0.0 when empty or nothing is assigned.

    """
    load = np.asarray(load, dtype=np.float64)
    mean = float(load.mean()) if load.size else 0.0
    return float(load.std() / mean) if mean > 0 else 0.0


def load_bounds(
    capacity: np.ndarray | Sequence[int], num_experts: int, load_slack: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per-expert load bounds used by the ``load_balanced`` policy.

    Parameters
    ----------
    capacity : array_like of int
        Capacities ``[C]`` (>= 0); a client gets ``r[c] = min(capacity[c], E)`` experts.
    num_experts : int
        ``E``.
    load_slack : float
        Relative slack around the mean load ``m = S / E`` (``S = sum(r)``).

    Returns
    -------
    min_load, max_load : np.ndarray
        int64 ``[E]``: ``floor(m (1 - slack))`` and ``ceil(m (1 + slack))``, clipped to
        ``[0, n]`` with ``n`` the number of clients with nonzero capacity (a client holds an
        expert at most once), and ``min_load <= max_load``. With uniform bounds these always
        satisfy ``E * min_load <= S <= E * max_load``.

    """
    r = flow.as_slots(np.asarray(capacity), len(np.asarray(capacity)), num_experts)
    total = int(r.sum())
    n_pos = int(np.count_nonzero(r))
    m = total / num_experts
    slack = max(float(load_slack), 0.0)
    hi = min(math.ceil(m * (1.0 + slack) - 1e-9), n_pos)
    lo = max(min(math.floor(m * (1.0 - slack) + 1e-9), hi), 0)
    return (
        np.full(num_experts, lo, dtype=np.int64),
        np.full(num_experts, hi, dtype=np.int64),
    )


def solve_assignment(
    desirability: np.ndarray,
    capacity: np.ndarray,
    *,
    min_load: np.ndarray | int | None = None,
    max_load: np.ndarray | int | None = None,
    approx_min_clients: int = 0,
) -> np.ndarray:
    """Exact max-desirability client-expert plan under capacity and per-expert load bounds.

    Solves ``max sum(D * X)`` over boolean ``X`` ``[C, E]`` with row sums
    ``X.sum(1) == min(capacity, E)`` and column sums
    ``min_load <= X.sum(0) <= max_load``, as a min-cost flow (see the module docstring).

    Parameters
    ----------
    desirability : np.ndarray
        Finite float ``[C, E]`` matrix ``D``.
    capacity : np.ndarray
        Integer ``[C]``, values >= 0. Rows with capacity 0 get nothing.
    min_load, max_load : np.ndarray or int or None, optional
        Integer ``[E]`` bounds on each expert's number of clients (scalars broadcast).
        Defaults: 0 and ``C``.
    approx_min_clients : int, optional
        From this many clients on (0: never), large instances take the uncertified
        fix-and-free plan of :func:`.multilevel.solve_approx`: feasible, close to optimal,
        faster. Default 0: always exact.

    Returns
    -------
    np.ndarray
        Boolean ``[C, E]`` plan. Its true desirability is within
        ``S * max|D| * 2**-30`` of the optimum, ``S = sum(min(capacity, E))`` (integer cost
        rounding; see the module docstring), unless the approximation was used.

    Raises
    ------
    ValueError
        On malformed input, or when the bounds cannot be met; the message names the bound
        (``min_load`` / ``max_load``) and why.

    """
    if int(approx_min_clients) < 0:
        raise ValueError(f"approx_min_clients must be >= 0, got {approx_min_clients}")
    k, r, lo, hi = integer_problem(desirability, capacity, min_load, max_load)
    num_clients, num_experts = k.shape
    if num_experts == 0 or int(r.sum()) == 0:
        return np.zeros((num_clients, num_experts), dtype=bool)
    return solve_integer(k, r, lo, hi, int(approx_min_clients))


def integer_problem(
    desirability: np.ndarray,
    capacity: np.ndarray,
    min_load: np.ndarray | int | None,
    max_load: np.ndarray | int | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validate an assignment problem and return it in integers: ``(K, r, min_load, max_load)``.

    ``K = round(D * 2**30 / max|D|)`` (int64 ``[C, E]``), ``r = min(capacity, E)``, the bounds
    broadcast to int64 ``[E]`` with ``max_load`` clipped to the clients with capacity.

    Raises
    ------
    ValueError
        On malformed input or bounds that violate the necessary feasibility conditions
        (:func:`.flow.check_feasible`).

    """
    d = np.asarray(desirability, dtype=np.float64)
    if d.ndim != 2:
        raise ValueError(f"desirability must be 2-D [C, E], got shape {d.shape}")
    if not np.all(np.isfinite(d)):
        raise ValueError("desirability must be finite")
    num_clients, num_experts = d.shape
    r = flow.as_slots(capacity, num_clients, num_experts)
    lo = flow.as_bound(min_load, 0, num_experts, "min_load")
    hi = flow.as_bound(max_load, num_clients, num_experts, "max_load")
    flow.check_feasible(r, lo, hi)
    hi = np.minimum(hi, np.count_nonzero(r))
    max_abs = float(np.abs(d).max()) if d.size else 0.0
    scale = flow.COST_RANGE / max_abs if max_abs > 0 else 1.0
    return np.rint(d * scale).astype(np.int64), r, lo, hi


def solve_integer(
    k: np.ndarray, r: np.ndarray, lo: np.ndarray, hi: np.ndarray, approx_min_clients: int
) -> np.ndarray:
    """Plan of the integer problem of :func:`integer_problem`.

    Exact (pruned and certified when large), or from ``approx_min_clients`` clients on (if
    > 0) the fix-and-free approximation of :func:`.multilevel.solve_approx`.
    """
    num_clients, num_experts = k.shape
    expected_arcs = int(np.minimum(r + pricing.PRUNE_EXTRA, num_experts).sum())
    if num_clients * num_experts >= PRUNE_MIN_ARCS and expected_arcs < 0.5 * k.size:
        top = pricing.top_at_prices(k, r, np.zeros(num_experts, dtype=np.int64))
        load = top.sum(axis=0)
        if np.all(load >= lo) and np.all(load <= hi):
            return top  # the unconstrained optimum meets the bounds, hence is optimal
        if 0 < approx_min_clients <= num_clients:
            plan = multilevel.solve_approx(k, r, lo, hi)
            if plan is not None:
                return plan  # feasible, not certified (opt-in)
        plan = multilevel.solve_large(k, r, lo, hi)
        if plan is not None:
            return plan  # certified optimal (fix-and-free at multi-level prices)
        cand = pricing.candidates(k, r, hi, pricing.estimate_prices(k, r, lo, hi))
        for _ in range(PRICING_ROUNDS):
            if cand.sum() >= 0.6 * cand.size:
                break  # pruning no longer pays off
            plan = flow.min_cost_plan(k, r, lo, hi, cand)
            if plan is None:
                break
            prices = pricing.potentials(k, plan, lo, hi, cand)
            if prices is None:  # pragma: no cover - the pruned flow is optimal
                break
            violated = pricing.price_violations(k, plan, prices)
            if not violated.any():
                return plan  # certified optimal for the full network
            cand |= violated
            repaired = pricing.repair(k, r, lo, hi, cand, plan, prices)
            if repaired is not None:
                return repaired
        logger.debug("pruned network not certified optimal; solving the full network")
    full = flow.min_cost_plan(k, r, lo, hi, None)
    if full is None:
        raise ValueError(
            "min_load/max_load bounds cannot be met jointly with the capacities: "
            "no plan gives every client min(capacity, E) distinct experts within the bounds"
        )
    return full
