"""Pruning and its optimality certificate for large assignment instances.

For ``C * E >= solver.PRUNE_MIN_ARCS`` the flow network is first built on candidate arcs
only, and the result is *certified* optimal for the full problem in exact integer arithmetic
before it is returned (exactness is never traded for speed):

1. Prices: an exactly solved random sample of :data:`PRICE_SAMPLE` clients (bounds scaled to
   its slots) gives expert potentials ``pi`` (minus the dual prices of the load bounds).
2. Candidates: each client's top ``r[c] + PRUNE_EXTRA`` experts by ``K + pi``, plus each
   expert's top ``max_load[e]`` clients.
3. Solve the candidate network; compute potentials ``pi`` of its solution (below).
4. Certificate: if no unheld arc beats a held one at those prices, i.e. for every client
   ``max_{e unheld} K[c,e] + pi[e] <= min_{e held} K[c,e] + pi[e]``, then ``pi`` is a feasible
   potential of the full residual network, which therefore has no negative cycle, so the
   plan is optimal for the full problem. Otherwise the violating arcs join the candidates,
   the :data:`REPAIR_FRACTION` of clients closest to indifference are re-optimized with the
   others fixed (a small network), and the certificate is checked again; failing that, back
   to step 3 (at most ``solver.PRICING_ROUNDS`` rounds), and finally the full network is
   solved.

Potentials come from the residual network condensed onto the ``E`` experts plus the sink:
every residual cycle through a client ``c`` enters on an expert ``e1`` it holds and leaves
to an expert ``e2`` it does not hold, so the arc costs
``W[e1, e2] = min_c {K[c,e1] - K[c,e2] : c holds e1, not e2, (c, e2) a candidate}`` and
zero-cost sink arcs where an expert's load may still rise or fall capture every cycle;
Floyd-Warshall on ``E + 1`` nodes gives shortest-path potentials (all values are integers
below ``2**53``, exact in float64).
"""

from __future__ import annotations

import numpy as np

from . import flow

#: Extra candidate experts per client (beyond its ``r[c]``) in the pruned network.
PRUNE_EXTRA: int = 2


#: Clients in the random sample whose exact solution gives the initial price estimate.
PRICE_SAMPLE: int = 2048


#: Fraction of clients (those closest to indifference) re-optimized by the cheap repair.
REPAIR_FRACTION: float = 0.1


def candidates(k: np.ndarray, r: np.ndarray, hi: np.ndarray, prices: np.ndarray | None = None) -> np.ndarray:
    """Candidate arcs: rows' top ``r + extra`` by ``k + prices``, columns' top ``max_load``."""
    num_clients, num_experts = k.shape
    cand = np.zeros(k.shape, dtype=bool)
    keep = np.minimum(r + PRUNE_EXTRA, num_experts)
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


def estimate_prices(k: np.ndarray, r: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray | None:
    """Estimate the experts' dual prices from an exactly solved random sample of clients.

    Solves the full network for ``PRICE_SAMPLE`` random clients (fixed seed) with the load
    bounds scaled to the sample's slots, and returns its potentials; the candidates are then
    each client's best experts *at those prices*. Only a heuristic for pruning: exactness
    comes from the certificate. None when there is nothing to gain or the sample fails.
    """
    num_clients = k.shape[0]
    if num_clients <= 2 * PRICE_SAMPLE:
        return None
    idx = np.sort(np.random.default_rng(0).choice(num_clients, PRICE_SAMPLE, replace=False))
    ks, rs = k[idx], r[idx]
    frac = rs.sum() / max(int(r.sum()), 1)
    his = np.minimum(np.ceil(hi * frac), np.count_nonzero(rs)).astype(np.int64)
    los = np.minimum(np.floor(lo * frac), his).astype(np.int64)
    try:
        flow.check_feasible(rs, los, his)
    except ValueError:
        return None
    plan = flow.min_cost_plan(ks, rs, los, his, None)
    if plan is None:
        return None
    return potentials(ks, plan, los, his, np.ones(ks.shape, dtype=bool))


def condensed_graph(
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


def shortest_paths(w: np.ndarray) -> np.ndarray | None:
    """All-pairs shortest paths (Floyd-Warshall); None if there is a negative cycle.

    Path costs are sums of at most ``len(w)`` integers below ``2**31`` in magnitude, hence
    exact in float64; the early exit keeps them bounded when a negative cycle exists.
    """
    for m in range(w.shape[0]):
        w = np.minimum(w, w[:, m : m + 1] + w[m : m + 1, :])
        if np.any(np.diag(w) < 0):
            return None
    return w


def has_negative_cycle(k: np.ndarray, plan: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> bool:
    """Return True iff the full residual network of ``plan`` has a negative-cost cycle.

    A cycle through client ``c`` enters on an expert it holds and leaves to one it does not
    hold, so the full residual network has a negative cycle iff the condensed graph on
    ``E`` experts plus the sink has one (module docstring).
    """
    return shortest_paths(condensed_graph(k, plan, lo, hi)) is None


def potentials(
    k: np.ndarray, plan: np.ndarray, lo: np.ndarray, hi: np.ndarray, cand: np.ndarray
) -> np.ndarray | None:
    """Expert potentials ``pi`` [E] (int64) certifying ``plan`` on the candidate network.

    Shortest-path distances from a virtual root (0-cost arcs to every node) in the condensed
    graph restricted to candidate arcs: ``pi[e2] <= pi[e1] + W[e1, e2]`` for every arc, i.e.
    for every client, each held expert's ``k + pi`` is at least every unheld candidate's.
    None if that graph has a negative cycle (the plan is not optimal even there).
    """
    dist = shortest_paths(condensed_graph(k, plan, lo, hi, cand))
    if dist is None:
        return None
    pot = np.minimum(dist.min(axis=0), 0.0)
    return pot[: k.shape[1]].astype(np.int64)


def price_violations(k: np.ndarray, plan: np.ndarray, pot: np.ndarray) -> np.ndarray:
    """Unheld arcs ``(c, e)`` whose ``k + pi`` beats one of ``c``'s held experts.

    If none, ``pi`` is a feasible potential of the full condensed graph (the sink arcs do not
    depend on the candidates), so the full residual network has no negative cycle and
    ``plan`` is optimal for the full network.
    """
    v = k + pot[None, :]
    big = np.iinfo(np.int64).max
    worst_held = np.where(plan, v, big).min(axis=1, keepdims=True)
    return ~plan & (v > worst_held)


def top_at_prices(k: np.ndarray, r: np.ndarray, prices: np.ndarray) -> np.ndarray:
    """Each client's ``r[c]`` best experts by ``k + prices`` (the warm-start plan).

    Ignores the load bounds; :func:`repair` then re-optimizes the least decided clients
    within them, and only a certified result is used.
    """
    num_clients, num_experts = k.shape
    plan = np.zeros(k.shape, dtype=bool)
    kmax = int(r.max()) if r.size else 0
    if kmax == 0:
        return plan
    score = k + prices[None, :]
    if kmax >= num_experts:
        order = np.argsort(-score, axis=1, kind="stable")
    else:
        top = np.argpartition(-score, kmax - 1, axis=1)[:, :kmax]
        sub = np.take_along_axis(score, top, axis=1)
        order = np.take_along_axis(top, np.argsort(-sub, axis=1, kind="stable"), axis=1)
    take = np.arange(order.shape[1])[None, :] < r[:, None]
    np.put_along_axis(plan, order, take, axis=1)
    return plan


def repair(
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
    lowest ``REPAIR_FRACTION`` are freed, the others keep their experts (their load is taken
    off the bounds), and the small network of the free clients is solved. The combined plan
    is returned only if the full-network certificate holds; None otherwise.
    """
    v = k + prices[None, :]
    big = np.iinfo(np.int64).max
    worst_held = np.where(plan, v, big).min(axis=1)
    best_free = np.where(plan, -big, v).max(axis=1)
    inner = (r > 0) & (r < k.shape[1])
    margin = np.where(inner, worst_held - best_free, big)
    n_free = max(int(REPAIR_FRACTION * k.shape[0]), int(np.count_nonzero(margin < 0)))
    if n_free >= k.shape[0] // 2:
        return None
    free = np.zeros(k.shape[0], dtype=bool)
    free[np.argpartition(margin, n_free)[: n_free + 1]] = True
    fixed_load = plan[~free].sum(axis=0)
    hi_sub = hi - fixed_load
    if np.any(hi_sub < 0):
        return None  # the fixed clients alone overfill an expert
    lo_sub = np.minimum(np.maximum(lo - fixed_load, 0), hi_sub)
    sub = flow.min_cost_plan(k[free], r[free], lo_sub, hi_sub, cand[free])
    if sub is None:
        return None
    new = plan.copy()
    new[free] = sub
    pot = potentials(k, new, lo, hi, cand)
    if pot is None or price_violations(k, new, pot).any():
        return None
    return new
