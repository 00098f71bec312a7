"""Multi-level prices and fix-and-free: the exact planner's fast path for very large rounds.

The optimum of the assignment is characterized by expert prices ``pi``: at an optimal ``pi``
every client holds its ``r[c]`` best experts by ``K + pi`` (``K`` the integer desirability).
With prices close to optimal, most clients' choices are already final and only a few need
the min-cost flow:

1. Prices, in two levels: the exact solution of a random sample of
   ``pricing.PRICE_SAMPLE`` clients (:func:`.pricing.estimate_prices`), then the solution of
   a larger sample of :data:`REFINE_SAMPLE` clients on its candidate arcs at those prices;
   its potentials are the price estimate (the sample's bounds are scaled to its slots).
2. Every client takes its ``r[c]`` best experts by ``K + pi``.
3. Free clients: the :data:`FREE_FRACTION` of smallest margin (worst held minus best unheld
   ``K + pi``) and, for every expert whose fixed load exceeds ``(1 - BUFFER) * min_load``,
   enough of its holders (those losing the least by giving it up) to bring it there; the
   others keep their experts. The free clients are solved exactly with the fixed clients'
   loads taken off the bounds (on their candidate arcs, else on all their arcs).
4. Certificate, exact in integers: potentials ``pi*`` of the combined plan from the residual
   network of the free clients (on the arcs of their sub-solve) condensed onto the experts
   plus the sink (as :func:`.pricing.potentials`; the sink arcs depend on the loads only), then one check that
   **no** client, fixed or free, has an unheld expert beating a held one at ``pi*``
   (:func:`.pricing.price_violations`). Then ``pi*`` is a feasible potential of the full
   residual network, which has no negative cycle, so the plan is optimal. If the check
   fails, steps 2-4 are repeated once at ``pi*``; failing that, the caller solves the problem
   its other way. Only certified plans are returned: exactness never depends on the prices.

:func:`solve_approx` is the opt-in approximation (run config ``approx-min-clients``): steps
1 (first level only), 2 and 3 without the certificate, a feasible plan close to optimal.
"""

from __future__ import annotations

import numpy as np

from . import flow, pricing

#: Clients in the second-level price sample (solved on candidate arcs).
REFINE_SAMPLE: int = 32768

#: Fraction of clients (smallest margin at the estimated prices) freed for the exact sub-solve.
FREE_FRACTION: float = 0.01

#: Fixed loads are brought down to ``(1 - BUFFER) * min_load`` so the free clients can fill.
BUFFER: float = 0.05

#: Fix-and-free rounds (the second at the first round's certificate potentials).
ROUNDS: int = 2


def top_with_margin(v: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``r[c]`` largest entries of ``v`` and its margin (worst held - best unheld).

    Rows with ``r[c]`` equal to 0 or ``E`` have nothing to decide: margin ``int64`` max.
    """
    num_clients, num_experts = v.shape
    plan = np.zeros(v.shape, dtype=bool)
    big = np.iinfo(np.int64).max
    margin = np.full(num_clients, big, dtype=np.int64)
    kmax = int(r.max()) if r.size else 0
    if kmax == 0:
        return plan, margin
    width = min(kmax + 1, num_experts)
    if width < num_experts:
        top = np.argpartition(-v, width - 1, axis=1)[:, :width]
    else:
        top = np.broadcast_to(np.arange(num_experts), v.shape)
    sub = np.take_along_axis(v, top, axis=1)
    rank = np.argsort(-sub, axis=1, kind="stable")
    order = np.take_along_axis(top, rank, axis=1)
    vals = np.take_along_axis(sub, rank, axis=1)
    np.put_along_axis(plan, order, np.arange(width)[None, :] < r[:, None], axis=1)
    inner = np.flatnonzero((r > 0) & (r < num_experts))
    cut = r[inner]
    margin[inner] = vals[inner, cut - 1] - vals[inner, cut]
    return plan, margin


def refine_prices(
    k: np.ndarray, r: np.ndarray, lo: np.ndarray, hi: np.ndarray, prices: np.ndarray
) -> np.ndarray:
    """Potentials of a :data:`REFINE_SAMPLE`-client sample solved on candidates at ``prices``."""
    num_clients = k.shape[0]
    idx = np.sort(np.random.default_rng(1).choice(num_clients, REFINE_SAMPLE, replace=False))
    ks, rs = k[idx], r[idx]
    frac = rs.sum() / max(int(r.sum()), 1)
    his = np.minimum(np.ceil(hi * frac), np.count_nonzero(rs)).astype(np.int64)
    los = np.minimum(np.floor(lo * frac), his).astype(np.int64)
    try:
        flow.check_feasible(rs, los, his)
    except ValueError:
        return prices
    cand = pricing.candidates(ks, rs, his, prices)
    plan = flow.min_cost_plan(ks, rs, los, his, cand)
    if plan is None:
        return prices
    pot = pricing.potentials(ks, plan, los, his, cand)
    return prices if pot is None else pot


def free_clients(v: np.ndarray, plan: np.ndarray, margin: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Clients to re-optimize: small margins, plus the cheapest holders of crowded experts."""
    num_clients = v.shape[0]
    free = np.zeros(num_clients, dtype=bool)
    n_margin = int(FREE_FRACTION * num_clients)
    if 0 < n_margin < num_clients:
        free[np.argpartition(margin, n_margin - 1)[:n_margin]] = True
    big = np.iinfo(np.int64).max
    best_unheld = np.where(plan, -big, v).max(axis=1)
    target = np.floor(lo * (1.0 - BUFFER)).astype(np.int64)
    need = plan[~free].sum(axis=0) - target
    for e in np.flatnonzero(need > 0):
        rows = np.flatnonzero(plan[:, e] & ~free)
        n = min(int(need[e]), rows.size)
        if n < rows.size:
            loss = v[rows, e] - best_unheld[rows]
            rows = rows[np.argpartition(loss, n - 1)[:n]]
        free[rows] = True
    return free


def fix_and_free(
    k: np.ndarray, r: np.ndarray, lo: np.ndarray, hi: np.ndarray, prices: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Fix clients at their best experts by ``k + prices``, solve the free ones exactly.

    Returns the combined plan (capacities and bounds met), the free-client mask and the free
    clients' arcs of the sub-solve, or None
    when the free clients cannot meet the bounds left by the fixed ones.
    """
    plan, margin = top_with_margin(k + prices[None, :], r)
    free = free_clients(k + prices[None, :], plan, margin, lo)
    fixed_load = plan[~free].sum(axis=0)
    hi_sub = hi - fixed_load
    if np.any(hi_sub < 0):
        return None
    lo_sub = np.minimum(np.maximum(lo - fixed_load, 0), hi_sub)
    k_free, r_free = k[free], r[free]
    try:
        flow.check_feasible(r_free, lo_sub, hi_sub)
    except ValueError:
        return None
    cand = pricing.candidates(k_free, r_free, hi_sub, prices)
    sub = flow.min_cost_plan(k_free, r_free, lo_sub, hi_sub, cand)
    if sub is None:
        cand = np.ones(k_free.shape, dtype=bool)
        sub = flow.min_cost_plan(k_free, r_free, lo_sub, hi_sub, None)
    if sub is None:
        return None
    plan[free] = sub
    return plan, free, cand


def certify(
    k: np.ndarray,
    plan: np.ndarray,
    free: np.ndarray,
    cand: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
) -> tuple[bool, np.ndarray | None]:
    """Check ``plan`` optimal for the full problem; also return the potentials found.

    Potentials come from the free clients' condensed residual network on their sub-solve's
    arcs ``cand`` with the sink arcs of the combined loads; the plan is optimal iff no
    client's unheld expert (any arc, candidate or not) beats a held one at those potentials
    (module docstring).
    """
    num_experts = k.shape[1]
    graph = pricing.condensed_graph(k[free], plan[free], lo, hi, cand)
    load = plan.sum(axis=0)
    sink = num_experts
    graph[:num_experts, sink] = np.where(load < hi, 0.0, np.inf)
    graph[sink, :num_experts] = np.where(load > lo, 0.0, np.inf)
    dist = pricing.shortest_paths(graph)
    if dist is None:
        return False, None
    pot = np.minimum(dist.min(axis=0), 0.0)[:num_experts].astype(np.int64)
    return not pricing.price_violations(k, plan, pot).any(), pot


def solve_large(k: np.ndarray, r: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray | None:
    """Certified optimal plan of a large integer problem, or None if not certified.

    Parameters
    ----------
    k : np.ndarray
        int64 ``[C, E]`` integer desirability.
    r : np.ndarray
        int64 ``[C]`` slots ``min(capacity, E)``.
    lo, hi : np.ndarray
        int64 ``[E]`` load bounds (feasible: :func:`.flow.check_feasible`).

    Returns
    -------
    np.ndarray or None
        A boolean ``[C, E]`` plan proven optimal (module docstring), or None when the
        fix-and-free rounds did not produce a certified plan.

    """
    if k.shape[0] < 2 * REFINE_SAMPLE:
        return None
    prices = pricing.estimate_prices(k, r, lo, hi)
    if prices is None:
        return None
    prices = refine_prices(k, r, lo, hi, prices)
    for _ in range(ROUNDS):
        found = fix_and_free(k, r, lo, hi, prices)
        if found is None:
            return None
        plan, free, cand = found
        ok, pot = certify(k, plan, free, cand, lo, hi)
        if ok:
            return plan
        if pot is None:
            return None
        prices = pot
    return None


def solve_approx(k: np.ndarray, r: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray | None:
    """Feasible plan by one fix-and-free round at sampled prices, **not** certified.

    Steps 1 (its first level only, :func:`.pricing.estimate_prices`), 2 and 3 of the module
    docstring without the certificate: the plan meets the capacities and load bounds and its
    objective is close to the optimum (the gap measured in ``docs/ALIGNMENT.md``), but it is
    not proven optimal.

    Parameters are those of :func:`solve_large`.

    Returns
    -------
    np.ndarray or None
        A boolean ``[C, E]`` plan within the bounds, or None when the price sample or the
        free clients' sub-solve fails (the caller then solves exactly).

    """
    prices = pricing.estimate_prices(k, r, lo, hi)
    if prices is None:
        return None
    found = fix_and_free(k, r, lo, hi, prices)
    return None if found is None else found[0]
