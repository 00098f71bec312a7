"""The min-cost-flow network behind the exact assignment, and the checks of its inputs.

Bipartite b-matching as min-cost flow: each client node supplies ``r[c]`` units, one arc of
capacity 1 and cost ``-K[c,e]`` to each expert (``K`` the integer desirability), each expert
node demands ``min_load[e]`` (the lower bound, moved into node demands) and has an arc of
capacity ``max_load[e] - min_load[e]`` and cost 0 to a sink that demands
``S - sum(min_load)``. OR-Tools' cost-scaling ``SimpleMinCostFlow`` solves it exactly in
integers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from ortools.graph.python import min_cost_flow

#: Integer cost range: ``max|D|`` is mapped to this many cost units.
COST_RANGE: int = 2**30


def as_slots(capacity: np.ndarray | Sequence[int], num_rows: int, num_experts: int) -> np.ndarray:
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


def as_bound(value: np.ndarray | int | None, default: int, num_experts: int, name: str) -> np.ndarray:
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


def check_feasible(r: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
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


def min_cost_plan(
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
