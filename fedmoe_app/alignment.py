"""Client-expert alignment: fitness, usage, desirability, policies and an exact solver.

Pure numpy (plus OR-Tools' min-cost-flow for the exact solver): no torch, no Flower, so
this module can be unit-tested and benchmarked on its own.

Notation
--------
``C`` clients (rows), ``E`` experts (columns). ``r[c] = min(capacity[c], E)`` is the number
of experts client ``c`` receives this round ("slots"); ``S = sum(r)`` is the round's total.

State (:class:`AlignmentState`, keyed by stable client-id strings)
-----------------------------------------------------------------
``F`` fitness, float64 ``[C, E]``
    How well expert ``e`` serves client ``c``. ``F == 0`` means "no evidence yet"; every
    signal is in ``[0, 1]`` so ``F`` stays in ``[0, 1]``.
``U`` usage, float64 ``[E]``
    Decayed training load (tokens) each expert has received.

Feedback (:meth:`AlignmentState.update`), arrays ``[R, E]`` for the ``R`` clients that
replied validly this round:

``held``         bool, the experts the client trained;
``tokens``       tokens the client's (masked) gate routed to each held expert (ignored where
                 not held);
``expert_loss``  mean cross-entropy of expert ``e``'s own output on its routed tokens (NaN or
                 anything where not held; NaN/inf where held means "no tokens");
``gate_hist``    counts of the *unmasked* full gate's top-k choices over all ``E`` experts on
                 the client's data (a cheap signal for experts it does not hold).

Update rules, with ``a = fitness_ema``, ``d = fitness_decay``, ``g = usage_decay``,
``lam = loss_weight``:

* Held pair (direct evidence). ``share = tokens[c,e] / sum_{e' held} tokens[c,e']`` (0 if the
  row routed no tokens), ``score = exp(-loss[c,e])`` (the geometric-mean probability the
  expert gives the true class; 0 when the loss is NaN/inf), and the signal
  ``s = (1 - lam) * share + lam * score``. Then ``F <- (1 - a) * F + a * s``, except that a
  pair with no evidence yet (``F == 0``) is initialised directly, ``F <- s`` (an EMA from 0
  would under-rate every newly tried expert by the factor ``a``).
* Pair not held by a replying client (indirect evidence). ``h = gate_hist[c,e] / sum_e'
  gate_hist[c,e']`` (0 if the client reported an empty histogram) and
  ``F <- d * F + (1 - d) * h``. With ``h = 0`` this is pure decay, ``F <- d * F``: pairs
  without interaction fade, while the full gate's preference pulls them up slowly (step
  ``1 - d`` instead of ``a``: indirect evidence is trusted less than training on the expert).
* Clients that did not reply this round are left unchanged: absence (not sampled, dropped,
  failed) is not evidence about fit.
* Usage: ``U <- g * U + load`` with ``load[e] = sum_c tokens[c,e]`` over held pairs of the
  replies.

Desirability (:meth:`AlignmentState.desirability`)
--------------------------------------------------
``D[c,e] = w_fitness * normF[c,e] - w_usage * normU[e]`` where ``normF`` is ``F`` min-max
scaled per row to ``[0, 1]`` (a row whose entries are all equal, e.g. a new client, becomes
all 0, so only usage decides), and ``normU = U / max(U)`` (all 0 when ``max(U) == 0``).
So ``D`` lies in ``[-w_usage, w_fitness]``.

Policies (:meth:`AlignmentState.plan`)
--------------------------------------
``dense``          every client gets every expert (FedAvg baseline; capacity ignored).
``random``         ``r[c]`` distinct experts uniformly at random.
``greedy``         the ``r[c]`` experts of highest fitness ``F`` (ties broken at random).
``load_balanced``  :func:`solve_assignment` on ``D`` with the bounds of :func:`load_bounds`:
                   ``m = S / E``, ``max_load = ceil(m (1 + load_slack))``,
                   ``min_load = floor(m (1 - load_slack))``, clipped to the number of clients
                   with nonzero capacity. These are always feasible (placing clients one
                   by one on their ``r[c]`` least-loaded experts keeps all loads within one
                   of ``m``); a defensive fallback still widens them (twice, then removes
                   them) rather than raise.

Solver (:func:`solve_assignment`)
---------------------------------
Bipartite b-matching as min-cost flow: each client node supplies ``r[c]`` units, one arc of
capacity 1 and cost ``-round(D[c,e] * scale)`` to each expert, each expert node demands
``min_load[e]`` (the lower bound, moved into node demands) and has an arc of capacity
``max_load[e] - min_load[e]`` and cost 0 to a sink that demands ``S - sum(min_load)``. OR-Tools'
cost-scaling ``SimpleMinCostFlow`` solves it exactly in integers.

Tolerance: ``scale = 2**30 / max|D|``. Rounding moves each arc's cost by at most half a unit,
so the returned plan's true desirability is within ``S * max|D| * 2**-30`` (absolute) of the
optimum (``< 1e-9 * S * max|D|``).

Speed (exactness is never traded): for large instances (``C * E >= 250,000``) the network is
first built on candidate arcs only, and the result is *certified* optimal for the full
problem in exact integer arithmetic before it is returned.

1. Prices: an exactly solved random sample of 2048 clients (bounds scaled to its slots)
   gives expert potentials ``pi`` (minus the dual prices of the load bounds).
2. Candidates: each client's top ``r[c] + 2`` experts by ``K + pi`` (``K`` the integer
   desirability), plus each expert's top ``max_load[e]`` clients.
3. Solve the candidate network; compute potentials ``pi`` of its solution (below).
4. Certificate: if no unheld arc beats a held one at those prices, i.e. for every client
   ``max_{e unheld} K[c,e] + pi[e] <= min_{e held} K[c,e] + pi[e]``, then ``pi`` is a feasible
   potential of the full residual network, which therefore has no negative cycle, so the
   plan is optimal for the full problem. Otherwise the violating arcs join the candidates,
   the 10% of clients closest to indifference are re-optimized with the others fixed
   (a small network), and the certificate is checked again; failing that, back to step 3
   (at most 6 rounds), and finally the full network is solved.

Potentials come from the residual network condensed onto the ``E`` experts plus the sink:
every residual cycle through a client ``c`` enters on an expert ``e1`` it holds and leaves
to an expert ``e2`` it does not hold, so the arc costs
``W[e1, e2] = min_c {K[c,e1] - K[c,e2] : c holds e1, not e2, (c, e2) a candidate}`` and
zero-cost sink arcs where an expert's load may still rise or fall capture every cycle;
Floyd-Warshall on ``E + 1`` nodes gives shortest-path potentials (all values are integers
below ``2**53``, exact in float64).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from ortools.graph.python import min_cost_flow

logger = logging.getLogger(__name__)

__all__ = [
    "POLICIES",
    "AlignmentState",
    "load_bounds",
    "load_cv",
    "solve_assignment",
]

POLICIES: tuple[str, ...] = ("random", "greedy", "load_balanced", "dense")

#: Integer cost range: ``max|D|`` is mapped to this many cost units.
COST_RANGE: int = 2**30
#: Extra candidate experts per client (beyond its ``r[c]``) in the pruned network.
_PRUNE_EXTRA: int = 2
#: Build the pruned network only when the full one has at least this many client arcs.
_PRUNE_MIN_ARCS: int = 250_000
#: Clients in the random sample whose exact solution gives the initial price estimate.
_PRICE_SAMPLE: int = 2048
#: Fraction of clients (those closest to indifference) re-optimized by the cheap repair.
_REPAIR_FRACTION: float = 0.1
#: Pricing rounds (solve pruned network, add violated arcs) before solving the full network.
_PRICING_ROUNDS: int = 6
_STATE_VERSION: int = 1


# ---------------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------------


def _as_slots(capacity: np.ndarray | Sequence[int], num_rows: int, num_experts: int) -> np.ndarray:
    """Validate ``capacity`` and return ``r = min(capacity, E)`` as int64 ``[C]``."""
    cap = np.asarray(capacity)
    if cap.shape != (num_rows,):
        raise ValueError(f"capacity must have shape ({num_rows},), got {cap.shape}")
    if cap.size and not np.issubdtype(cap.dtype, np.integer):
        if not np.issubdtype(cap.dtype, np.number) or not np.all(np.isfinite(cap)):
            raise ValueError("capacity must be finite integers")
        if not np.all(cap == np.round(cap)):
            raise ValueError("capacity must be integers")
    cap = cap.astype(np.int64)
    if np.any(cap < 0):
        raise ValueError(f"capacity must be >= 0, got min {int(cap.min())}")
    return np.minimum(cap, num_experts)


def _as_bound(value: np.ndarray | int | None, default: int, num_experts: int, name: str) -> np.ndarray:
    """Broadcast a load bound (scalar, ``[E]`` array or None) to int64 ``[E]``."""
    if value is None:
        return np.full(num_experts, default, dtype=np.int64)
    arr = np.asarray(value)
    if arr.ndim == 0:
        arr = np.full(num_experts, arr)
    if arr.shape != (num_experts,):
        raise ValueError(f"{name} must be a scalar or have shape ({num_experts},), got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer) and not (
        np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))
    ):
        raise ValueError(f"{name} must be integers")
    arr = arr.astype(np.int64)
    if np.any(arr < 0):
        e = int(np.argmin(arr))
        raise ValueError(f"{name}[{e}] = {int(arr[e])} is negative")
    return arr


def load_cv(plan: np.ndarray) -> float:
    """Coefficient of variation of the per-expert load of a plan.

    Parameters
    ----------
    plan : np.ndarray
        Boolean ``[C, E]`` plan.

    Returns
    -------
    float
        ``std(plan.sum(0)) / mean(plan.sum(0))``; 0.0 when nothing is assigned.

    """
    load = np.asarray(plan).sum(axis=0).astype(np.float64)
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
    r = _as_slots(np.asarray(capacity), len(np.asarray(capacity)), num_experts)
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


# ---------------------------------------------------------------------------------------------
# Exact solver
# ---------------------------------------------------------------------------------------------


def solve_assignment(
    desirability: np.ndarray,
    capacity: np.ndarray,
    *,
    min_load: np.ndarray | int | None = None,
    max_load: np.ndarray | int | None = None,
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

    Returns
    -------
    np.ndarray
        Boolean ``[C, E]`` plan. Its true desirability is within
        ``S * max|D| * 2**-30`` of the optimum, ``S = sum(min(capacity, E))`` (integer cost
        rounding; see the module docstring).

    Raises
    ------
    ValueError
        On malformed input, or when the bounds cannot be met; the message names the bound
        (``min_load`` / ``max_load``) and why.

    """
    d = np.asarray(desirability, dtype=np.float64)
    if d.ndim != 2:
        raise ValueError(f"desirability must be 2-D [C, E], got shape {d.shape}")
    if not np.all(np.isfinite(d)):
        raise ValueError("desirability must be finite")
    num_clients, num_experts = d.shape
    r = _as_slots(capacity, num_clients, num_experts)
    lo = _as_bound(min_load, 0, num_experts, "min_load")
    hi = _as_bound(max_load, num_clients, num_experts, "max_load")
    _check_feasible(r, lo, hi)
    plan = np.zeros((num_clients, num_experts), dtype=bool)
    if num_experts == 0 or int(r.sum()) == 0:
        return plan
    hi = np.minimum(hi, np.count_nonzero(r))
    max_abs = float(np.abs(d).max())
    scale = COST_RANGE / max_abs if max_abs > 0 else 1.0
    k = np.rint(d * scale).astype(np.int64)  # integer desirability
    expected_arcs = int(np.minimum(r + _PRUNE_EXTRA, num_experts).sum())
    if num_clients * num_experts >= _PRUNE_MIN_ARCS and expected_arcs < 0.5 * k.size:
        cand = _candidates(k, r, hi, _estimate_prices(k, r, lo, hi))
        for _ in range(_PRICING_ROUNDS):
            if cand.sum() >= 0.6 * cand.size:
                break  # pruning no longer pays off
            plan = _min_cost_plan(k, r, lo, hi, cand)
            if plan is None:
                break
            prices = _potentials(k, plan, lo, hi, cand)
            if prices is None:  # pragma: no cover - the pruned flow is optimal
                break
            violated = _price_violations(k, plan, prices)
            if not violated.any():
                return plan  # certified optimal for the full network
            cand |= violated
            repaired = _repair(k, r, lo, hi, cand, plan, prices)
            if repaired is not None:
                return repaired
        logger.debug("pruned network not certified optimal; solving the full network")
    full = _min_cost_plan(k, r, lo, hi, None)
    if full is None:
        raise ValueError(
            "min_load/max_load bounds cannot be met jointly with the capacities: "
            "no plan gives every client min(capacity, E) distinct experts within the bounds"
        )
    return full


def _repair(
    k: np.ndarray,
    r: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    cand: np.ndarray,
    plan: np.ndarray,
    prices: np.ndarray,
) -> np.ndarray | None:
    """Re-optimize only the clients closest to indifference; return the plan if certified.

    Clients whose margin at ``prices`` (worst held minus best unheld ``k + prices``) is in the
    lowest ``_REPAIR_FRACTION`` are freed, the others keep their experts (their load is taken
    off the bounds), and the small network of the free clients is solved. The combined plan
    is returned only if the full-network certificate holds; None otherwise.
    """
    v = k + prices[None, :]
    big = np.iinfo(np.int64).max
    worst_held = np.where(plan, v, big).min(axis=1)
    best_free = np.where(plan, -big, v).max(axis=1)
    inner = (r > 0) & (r < k.shape[1])
    margin = np.where(inner, worst_held - best_free, big)
    n_free = max(int(_REPAIR_FRACTION * k.shape[0]), int(np.count_nonzero(margin < 0)))
    if n_free >= k.shape[0] // 2:
        return None
    free = np.zeros(k.shape[0], dtype=bool)
    free[np.argpartition(margin, n_free)[: n_free + 1]] = True
    fixed_load = plan[~free].sum(axis=0)
    hi_sub = hi - fixed_load
    lo_sub = np.minimum(np.maximum(lo - fixed_load, 0), hi_sub)
    sub = _min_cost_plan(k[free], r[free], lo_sub, hi_sub, cand[free])
    if sub is None:
        return None
    new = plan.copy()
    new[free] = sub
    pot = _potentials(k, new, lo, hi, cand)
    if pot is None or _price_violations(k, new, pot).any():
        return None
    return new


def _check_feasible(r: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
    """Raise ValueError naming the bound that necessary feasibility conditions violate."""
    total = int(r.sum())
    n_pos = int(np.count_nonzero(r))
    bad = np.flatnonzero(lo > hi)
    if bad.size:
        e = int(bad[0])
        raise ValueError(
            f"min_load[{e}] = {int(lo[e])} exceeds max_load[{e}] = {int(hi[e])}: bound cannot be met"
        )
    bad = np.flatnonzero(lo > n_pos)
    if bad.size:
        e = int(bad[0])
        raise ValueError(
            f"min_load[{e}] = {int(lo[e])} cannot be met: only {n_pos} clients have nonzero "
            "capacity and a client holds an expert at most once"
        )
    if total < int(lo.sum()):
        raise ValueError(
            f"min_load cannot be met: sum(min_load) = {int(lo.sum())} exceeds the "
            f"{total} slots (sum of min(capacity, E))"
        )
    open_experts = int(np.count_nonzero(hi))
    if total and int(r.max()) > open_experts:
        c = int(np.argmax(r))
        raise ValueError(
            f"max_load cannot be met: client row {c} needs {int(r[c])} distinct experts but "
            f"only {open_experts} have max_load > 0"
        )
    reachable = int(np.minimum(hi, n_pos).sum())
    if total > reachable:
        raise ValueError(
            f"max_load cannot be met: the {total} slots (sum of min(capacity, E)) exceed "
            f"sum(min(max_load, clients with capacity)) = {reachable}"
        )


def _candidates(k: np.ndarray, r: np.ndarray, hi: np.ndarray, prices: np.ndarray | None = None) -> np.ndarray:
    """Candidate arcs: rows' top ``r + extra`` by ``k + prices``, columns' top ``max_load``."""
    num_clients, num_experts = k.shape
    cand = np.zeros(k.shape, dtype=bool)
    keep = np.minimum(r + _PRUNE_EXTRA, num_experts)
    keep[r == 0] = 0
    kmax = int(keep.max())
    score = k if prices is None else k + prices[None, :]
    if kmax >= num_experts:
        order = np.argsort(-score, axis=1, kind="stable")
    else:
        top = np.argpartition(-score, kmax - 1, axis=1)[:, :kmax]
        sub = np.take_along_axis(score, top, axis=1)
        order = np.take_along_axis(top, np.argsort(-sub, axis=1, kind="stable"), axis=1)
    take = np.arange(order.shape[1])[None, :] < keep[:, None]
    np.put_along_axis(cand, order, take, axis=1)
    # Each expert's best max_load[e] clients (among those with capacity), so that the load
    # bounds can be met on the candidate arcs.
    q = int(min(hi.max(), num_clients))
    if q > 0:
        neg = np.where(r[None, :] > 0, -k.T, 2**62)  # [E, C], contiguous rows
        if q < num_clients:
            top = np.argpartition(neg, q - 1, axis=1)[:, :q]
        else:
            top = np.broadcast_to(np.arange(num_clients)[None, :], neg.shape)
        sub = np.take_along_axis(neg, top, axis=1)
        top = np.take_along_axis(top, np.argsort(sub, axis=1, kind="stable"), axis=1)
        take = np.arange(top.shape[1])[None, :] < hi[:, None]
        rows = top[take]
        cols = np.nonzero(take)[0]
        ok = r[rows] > 0
        cand[rows[ok], cols[ok]] = True
    return cand


def _estimate_prices(k: np.ndarray, r: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray | None:
    """Estimate the experts' dual prices from an exactly solved random sample of clients.

    Solves the full network for ``_PRICE_SAMPLE`` random clients (fixed seed) with the load
    bounds scaled to the sample's slots, and returns its potentials; the candidates are then
    each client's best experts *at those prices*. Only a heuristic for pruning: exactness
    comes from the certificate. None when there is nothing to gain or the sample fails.
    """
    num_clients = k.shape[0]
    if num_clients <= 2 * _PRICE_SAMPLE:
        return None
    idx = np.sort(np.random.default_rng(0).choice(num_clients, _PRICE_SAMPLE, replace=False))
    ks, rs = k[idx], r[idx]
    frac = rs.sum() / max(int(r.sum()), 1)
    his = np.minimum(np.ceil(hi * frac), np.count_nonzero(rs)).astype(np.int64)
    los = np.minimum(np.floor(lo * frac), his).astype(np.int64)
    try:
        _check_feasible(rs, los, his)
    except ValueError:
        return None
    plan = _min_cost_plan(ks, rs, los, his, None)
    if plan is None:
        return None
    return _potentials(ks, plan, los, his, np.ones(ks.shape, dtype=bool))


def _min_cost_plan(
    k: np.ndarray,
    r: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    cand: np.ndarray | None,
) -> np.ndarray | None:
    """Solve the flow network (on ``cand`` arcs, or all arcs); None if infeasible."""
    num_clients, num_experts = k.shape
    if cand is None:
        ci = np.repeat(np.arange(num_clients, dtype=np.int32), num_experts)
        ei = np.tile(np.arange(num_experts, dtype=np.int32), num_clients)
        cost = -k.ravel()
    else:
        ci, ei = np.nonzero(cand)
        ci = ci.astype(np.int32)
        ei = ei.astype(np.int32)
        cost = -k[ci, ei]
    n_arcs = ci.size
    sink = num_clients + num_experts
    smcf = min_cost_flow.SimpleMinCostFlow()
    smcf.add_arcs_with_capacity_and_unit_cost(
        ci, (ei + num_clients).astype(np.int32), np.ones(n_arcs, dtype=np.int64), cost
    )
    smcf.add_arcs_with_capacity_and_unit_cost(
        np.arange(num_clients, sink, dtype=np.int32),
        np.full(num_experts, sink, dtype=np.int32),
        (hi - lo).astype(np.int64),
        np.zeros(num_experts, dtype=np.int64),
    )
    supplies = np.concatenate([r, -lo, [-(int(r.sum()) - int(lo.sum()))]]).astype(np.int64)
    smcf.set_nodes_supplies(np.arange(sink + 1, dtype=np.int32), supplies)
    status = smcf.solve()
    if status == min_cost_flow.SimpleMinCostFlow.INFEASIBLE:
        return None
    if status != min_cost_flow.SimpleMinCostFlow.OPTIMAL:
        raise RuntimeError(f"min-cost flow solver failed with status {status}")
    flow = smcf.flows(np.arange(n_arcs, dtype=np.int32))
    used = flow > 0
    plan = np.zeros((num_clients, num_experts), dtype=bool)
    plan[ci[used], ei[used]] = True
    return plan


def _condensed_graph(
    k: np.ndarray,
    plan: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    allowed: np.ndarray | None = None,
) -> np.ndarray:
    """Arc costs of the residual network of ``plan`` condensed onto experts plus the sink.

    ``W[e1, e2] = min_c {k[c,e1] - k[c,e2] : plan[c,e1], not plan[c,e2], allowed[c,e2]}``
    (moving one of ``c``'s slots from ``e1`` to ``e2``); ``W[e, sink] = 0`` where the load of
    ``e`` may rise, ``W[sink, e] = 0`` where it may fall; ``inf`` where there is no arc and
    0 on the diagonal. All finite entries are integers, exact in float64.
    """
    num_experts = k.shape[1]
    w = np.full((num_experts + 1, num_experts + 1), np.inf)
    blocked = plan if allowed is None else plan | ~allowed
    big = np.iinfo(np.int64).max
    for e1 in range(num_experts):
        rows = np.flatnonzero(plan[:, e1])
        if rows.size == 0:
            continue
        kr = k[rows]
        diff = kr[:, e1 : e1 + 1] - kr
        diff[blocked[rows]] = big
        best = diff.min(axis=0)
        w[e1, :num_experts] = np.where(best == big, np.inf, best)
    load = plan.sum(axis=0)
    sink = num_experts
    w[:num_experts, sink] = np.where(load < hi, 0.0, np.inf)
    w[sink, :num_experts] = np.where(load > lo, 0.0, np.inf)
    np.fill_diagonal(w, 0.0)
    return w


def _shortest_paths(w: np.ndarray) -> np.ndarray | None:
    """All-pairs shortest paths (Floyd-Warshall); None if there is a negative cycle.

    Path costs are sums of at most ``len(w)`` integers below ``2**31`` in magnitude, hence
    exact in float64; the early exit keeps them bounded when a negative cycle exists.
    """
    for m in range(w.shape[0]):
        w = np.minimum(w, w[:, m : m + 1] + w[m : m + 1, :])
        if np.any(np.diag(w) < 0):
            return None
    return w


def _has_negative_cycle(k: np.ndarray, plan: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> bool:
    """Return True iff the full residual network of ``plan`` has a negative-cost cycle.

    A cycle through client ``c`` enters on an expert it holds and leaves to one it does not
    hold, so the full residual network has a negative cycle iff the condensed graph on
    ``E`` experts plus the sink has one (module docstring).
    """
    return _shortest_paths(_condensed_graph(k, plan, lo, hi)) is None


def _potentials(
    k: np.ndarray, plan: np.ndarray, lo: np.ndarray, hi: np.ndarray, cand: np.ndarray
) -> np.ndarray | None:
    """Expert potentials ``pi`` [E] (int64) certifying ``plan`` on the candidate network.

    Shortest-path distances from a virtual root (0-cost arcs to every node) in the condensed
    graph restricted to candidate arcs: ``pi[e2] <= pi[e1] + W[e1, e2]`` for every arc, i.e.
    for every client, each held expert's ``k + pi`` is at least every unheld candidate's.
    None if that graph has a negative cycle (the plan is not optimal even there).
    """
    dist = _shortest_paths(_condensed_graph(k, plan, lo, hi, cand))
    if dist is None:
        return None
    pot = np.minimum(dist.min(axis=0), 0.0)
    return pot[: k.shape[1]].astype(np.int64)


def _price_violations(k: np.ndarray, plan: np.ndarray, pot: np.ndarray) -> np.ndarray:
    """Unheld arcs ``(c, e)`` whose ``k + pi`` beats one of ``c``'s held experts.

    If none, ``pi`` is a feasible potential of the full condensed graph (the sink arcs do not
    depend on the candidates), so the full residual network has no negative cycle and
    ``plan`` is optimal for the full network.
    """
    v = k + pot[None, :]
    big = np.iinfo(np.int64).max
    worst_held = np.where(plan, v, big).min(axis=1, keepdims=True)
    return ~plan & (v > worst_held)


# ---------------------------------------------------------------------------------------------
# Policies on plain arrays
# ---------------------------------------------------------------------------------------------


def _top_by_order(order: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Boolean plan taking the first ``r[c]`` columns of each row's ``order``."""
    plan = np.zeros(order.shape, dtype=bool)
    take = np.arange(order.shape[1])[None, :] < r[:, None]
    np.put_along_axis(plan, order, take, axis=1)
    return plan


def _random_plan(r: np.ndarray, num_experts: int, rng: np.random.Generator) -> np.ndarray:
    order = np.argsort(rng.random((r.size, num_experts)), axis=1)
    return _top_by_order(order, r)


def _greedy_plan(score: np.ndarray, r: np.ndarray, rng: np.random.Generator) -> np.ndarray:
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
    return _top_by_order(order, r)


# ---------------------------------------------------------------------------------------------
# Server-side state
# ---------------------------------------------------------------------------------------------


class AlignmentState:
    """Server-side alignment state keyed by stable client-id strings.

    Parameters
    ----------
    num_experts : int
        Number of experts ``E``.
    fitness_ema : float, default 0.5
        EMA step ``a`` for held pairs: ``F <- (1 - a) F + a s``.
    fitness_decay : float, default 0.9
        ``d`` for pairs a replying client did not hold: ``F <- d F + (1 - d) h``.
    usage_decay : float, default 0.8
        ``g`` in ``U <- g U + load``.
    w_fitness, w_usage : float, default 1.0, 0.5
        Weights of normalized fitness and usage in the desirability.
    load_slack : float, default 0.0
        Relative slack of the ``load_balanced`` load bounds around the mean load.
    loss_weight : float, default 0.5
        ``lam``: held signal ``(1 - lam) * token_share + lam * exp(-loss)``.
    seed : int, default 0
        Seed of the internal generator used when :meth:`plan` gets no ``rng``.

    Attributes
    ----------
    client_ids : list of str
        Row order of :attr:`fitness`.
    fitness : np.ndarray
        float64 ``[C, E]``; new clients start at 0 (unknown).
    usage : np.ndarray
        float64 ``[E]``.

    """

    def __init__(
        self,
        num_experts: int,
        *,
        fitness_ema: float = 0.5,
        fitness_decay: float = 0.9,
        usage_decay: float = 0.8,
        w_fitness: float = 1.0,
        w_usage: float = 0.5,
        load_slack: float = 0.0,
        loss_weight: float = 0.5,
        seed: int = 0,
    ) -> None:
        if int(num_experts) < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        for name, val in (
            ("fitness_ema", fitness_ema),
            ("fitness_decay", fitness_decay),
            ("usage_decay", usage_decay),
            ("loss_weight", loss_weight),
        ):
            if not 0.0 <= float(val) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {val}")
        if float(load_slack) < 0 or float(w_fitness) < 0 or float(w_usage) < 0:
            raise ValueError("load_slack, w_fitness and w_usage must be >= 0")
        self.num_experts = int(num_experts)
        self.fitness_ema = float(fitness_ema)
        self.fitness_decay = float(fitness_decay)
        self.usage_decay = float(usage_decay)
        self.w_fitness = float(w_fitness)
        self.w_usage = float(w_usage)
        self.load_slack = float(load_slack)
        self.loss_weight = float(loss_weight)
        self.seed = int(seed)
        self.rng = np.random.default_rng(self.seed)
        self.client_ids: list[str] = []
        self._row: dict[str, int] = {}
        self.fitness = np.zeros((0, self.num_experts), dtype=np.float64)
        self.usage = np.zeros(self.num_experts, dtype=np.float64)

    # -- rows -------------------------------------------------------------------------------

    def index(self, client_ids: Sequence[str]) -> np.ndarray:
        """Rows of ``client_ids`` in :attr:`fitness`, adding unseen clients (zero rows).

        Parameters
        ----------
        client_ids : sequence of str
            Stable client ids; duplicates are rejected.

        Returns
        -------
        np.ndarray
            int64 row indices, in the order given.

        """
        ids = [str(c) for c in client_ids]
        if len(set(ids)) != len(ids):
            raise ValueError("client_ids contain duplicates")
        new = [c for c in ids if c not in self._row]
        if new:
            start = len(self.client_ids)
            self._row.update({c: start + i for i, c in enumerate(new)})
            self.client_ids.extend(new)
            grow = np.zeros((len(new), self.num_experts), dtype=np.float64)
            self.fitness = np.concatenate([self.fitness, grow], axis=0)
        return np.fromiter((self._row[c] for c in ids), dtype=np.int64, count=len(ids))

    # -- scores -----------------------------------------------------------------------------

    def desirability(self, client_ids: Sequence[str]) -> np.ndarray:
        """Desirability ``D = w_fitness * normF - w_usage * normU`` for ``client_ids``.

        ``normF`` is each fitness row min-max scaled to ``[0, 1]`` (constant rows become 0);
        ``normU = U / max(U)`` (0 if ``max(U) == 0``). Unseen clients are added.

        Parameters
        ----------
        client_ids : sequence of str
            Clients (rows of the result).

        Returns
        -------
        np.ndarray
            float64 ``[len(client_ids), E]`` in ``[-w_usage, w_fitness]``.

        """
        rows = self.index(client_ids)  # may grow self.fitness: index before reading it
        f = self.fitness[rows]
        if f.shape[0] == 0:
            return np.zeros_like(f)
        fmin = f.min(axis=1, keepdims=True)
        span = f.max(axis=1, keepdims=True) - fmin
        norm_f = np.divide(f - fmin, span, out=np.zeros_like(f), where=span > 0)
        umax = float(self.usage.max())
        norm_u = self.usage / umax if umax > 0 else np.zeros_like(self.usage)
        return self.w_fitness * norm_f - self.w_usage * norm_u[None, :]

    # -- planning ---------------------------------------------------------------------------

    def plan(
        self,
        client_ids: Sequence[str],
        capacity: np.ndarray | Sequence[int],
        policy: str,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        """Assign experts to this round's clients.

        Parameters
        ----------
        client_ids : sequence of str
            This round's clients (unseen ones are added).
        capacity : array_like of int
            ``[len(client_ids)]``, >= 0; a client gets ``min(capacity, E)`` experts (all ``E``
            under ``dense``).
        policy : {"random", "greedy", "load_balanced", "dense"}
            See the module docstring.
        rng : np.random.Generator, optional
            Randomness for ``random`` and greedy tie-breaking; the state's own generator
            (seeded by ``seed``) when omitted.

        Returns
        -------
        np.ndarray
            Boolean ``[len(client_ids), E]`` plan.

        """
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; expected one of {POLICIES}")
        rows = self.index(client_ids)
        num_experts = self.num_experts
        r = _as_slots(capacity, rows.size, num_experts)
        gen = self.rng if rng is None else rng
        if policy == "dense":
            return np.ones((rows.size, num_experts), dtype=bool)
        if policy == "random":
            return _random_plan(r, num_experts, gen)
        if policy == "greedy":
            return _greedy_plan(self.fitness[rows], r, gen)
        d = self.desirability(client_ids)
        lo, hi = load_bounds(r, num_experts, self.load_slack)
        n_pos = int(np.count_nonzero(r))
        attempts = [(lo, hi)]
        for slack in (2.0 * self.load_slack + 0.1, 4.0 * self.load_slack + 0.5):
            attempts.append(load_bounds(r, num_experts, slack))
        attempts.append((np.zeros(num_experts, np.int64), np.full(num_experts, n_pos, np.int64)))
        for i, (lo_i, hi_i) in enumerate(attempts):
            try:
                return solve_assignment(d, r, min_load=lo_i, max_load=hi_i)
            except ValueError as err:
                if i == len(attempts) - 1:
                    raise
                logger.warning("load bounds infeasible (%s); widening them", err)
        raise AssertionError("unreachable")  # pragma: no cover

    # -- feedback ---------------------------------------------------------------------------

    def update(
        self,
        client_ids: Sequence[str],
        held: np.ndarray,
        tokens: np.ndarray,
        expert_loss: np.ndarray,
        gate_hist: np.ndarray,
    ) -> None:
        """Fold one round's feedback into fitness and usage (rules in the module docstring).

        Parameters
        ----------
        client_ids : sequence of str
            Clients that replied validly (unseen ones are added); others are unchanged.
        held : np.ndarray
            bool ``[R, E]``, the experts each client trained.
        tokens : np.ndarray
            ``[R, E]`` >= 0, tokens routed to each held expert (ignored where not held).
        expert_loss : np.ndarray
            ``[R, E]`` mean cross-entropy of each held expert on its tokens (NaN/inf means
            no evidence; ignored where not held).
        gate_hist : np.ndarray
            ``[R, E]`` >= 0, the full gate's top-k choice counts over all experts.

        """
        num_experts = self.num_experts
        n = len(client_ids)
        shape = (n, num_experts)
        held = np.asarray(held)
        if held.shape != shape:
            raise ValueError(f"held must have shape {shape}, got {held.shape}")
        held = held.astype(bool)
        arrays = {}
        for name, val in (
            ("tokens", tokens),
            ("expert_loss", expert_loss),
            ("gate_hist", gate_hist),
        ):
            arr = np.asarray(val, dtype=np.float64)
            if arr.shape != shape:
                raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
            arrays[name] = arr
        tok = np.where(held, arrays["tokens"], 0.0)
        hist = arrays["gate_hist"]
        if not (np.all(np.isfinite(tok)) and np.all(np.isfinite(hist))):
            raise ValueError("tokens and gate_hist must be finite")
        if np.any(tok < 0) or np.any(hist < 0):
            raise ValueError("tokens and gate_hist must be >= 0")
        rows = self.index(client_ids)
        if n == 0:
            self.usage *= self.usage_decay
            return

        a, d, lam = self.fitness_ema, self.fitness_decay, self.loss_weight
        tok_sum = tok.sum(axis=1, keepdims=True)
        share = np.divide(tok, tok_sum, out=np.zeros_like(tok), where=tok_sum > 0)
        loss = arrays["expert_loss"]
        with np.errstate(over="ignore", invalid="ignore"):
            score = np.where(np.isfinite(loss), np.exp(-np.maximum(loss, 0.0)), 0.0)
        signal = (1.0 - lam) * share + lam * score
        hist_sum = hist.sum(axis=1, keepdims=True)
        h = np.divide(hist, hist_sum, out=np.zeros_like(hist), where=hist_sum > 0)

        f = self.fitness[rows]
        direct = np.where(f == 0.0, signal, (1.0 - a) * f + a * signal)
        indirect = d * f + (1.0 - d) * h
        self.fitness[rows] = np.where(held, direct, indirect)
        self.usage = self.usage_decay * self.usage + tok.sum(axis=0)

    # -- checkpoints ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable snapshot (plain lists/numbers) for checkpoints.

        Returns
        -------
        dict
            Hyper-parameters, ``client_ids``, ``fitness`` (list of rows), ``usage`` and the
            internal generator's state; :meth:`from_state_dict` restores it exactly.

        """
        return {
            "version": _STATE_VERSION,
            "num_experts": self.num_experts,
            "fitness_ema": self.fitness_ema,
            "fitness_decay": self.fitness_decay,
            "usage_decay": self.usage_decay,
            "w_fitness": self.w_fitness,
            "w_usage": self.w_usage,
            "load_slack": self.load_slack,
            "loss_weight": self.loss_weight,
            "seed": self.seed,
            "client_ids": list(self.client_ids),
            "fitness": self.fitness.tolist(),
            "usage": self.usage.tolist(),
            "rng_state": self.rng.bit_generator.state,
        }

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> AlignmentState:
        """Rebuild a state saved by :meth:`state_dict` (exact round trip).

        Parameters
        ----------
        d : dict
            Output of :meth:`state_dict` (possibly through JSON).

        Returns
        -------
        AlignmentState

        """
        version = int(d.get("version", _STATE_VERSION))
        if version != _STATE_VERSION:
            raise ValueError(f"unsupported alignment state version {version}")
        state = cls(
            int(d["num_experts"]),
            fitness_ema=d["fitness_ema"],
            fitness_decay=d["fitness_decay"],
            usage_decay=d["usage_decay"],
            w_fitness=d["w_fitness"],
            w_usage=d["w_usage"],
            load_slack=d["load_slack"],
            loss_weight=d["loss_weight"],
            seed=d["seed"],
        )
        ids = [str(c) for c in d["client_ids"]]
        fitness = np.asarray(d["fitness"], dtype=np.float64).reshape(len(ids), state.num_experts)
        usage = np.asarray(d["usage"], dtype=np.float64)
        if usage.shape != (state.num_experts,):
            raise ValueError("usage has the wrong length")
        state.index(ids)
        state.fitness = fitness.copy()
        state.usage = usage.copy()
        if "rng_state" in d:
            state.rng.bit_generator.state = d["rng_state"]
        return state
