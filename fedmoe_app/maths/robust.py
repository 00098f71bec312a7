"""Bounded influence of one client: update norms clipped and weights capped, per aggregated group.

A reply can be well formed (keys, shapes, finite values: :mod:`.protocol`) and still wreck the
model: tensors of 1e30, an honest update scaled ×50, or a claim of 10^12 examples. Before
aggregation (:mod:`.aggregation`) every validated update is bounded:

* **Norms, per group.** A group is the shared part (every non-expert tensor) or one expert.
  A client's update of a group is ``Δ = w_client − w_global``; its relative size
  ``ρ = ‖Δ‖ / ‖w_global‖`` is compared across all (client, group) pairs of the round, and a
  pair above ``bound × median(ρ)`` is left out: its expert copy is dropped from the average
  (with its tokens), or, for the shared part, the whole reply is (a client whose shared update
  is that far off is not trusted with its experts either). Scaling such an update back onto
  the bound was tried first and kept too much of it: a 1e30 tensor clipped to five typical
  update sizes still pushes every weight the same way (20 points of accuracy lost in
  ``tests/maths/test_robust.py``). Relative sizes make groups of different sizes comparable, so an
  expert trained by a single client is bounded too, as long as most pairs of the round are
  honest.
* **Weights.** A client's example count (its weight for the shared part) is capped at
  ``weight_cap × median`` of the round's counts, and its token counts (its weight for each
  expert) are scaled down by the same factor. The server's own bound on a client's count
  (what it reported when first queried) is applied by reply validation and never raised by
  the client's later claims.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..tensors import parse_expert_key
from .aggregation import ClientUpdate

SHARED = -1  # group id of the shared part (experts are 0..E-1)


@dataclass(frozen=True)
class Bounded:
    """Updates after bounding, and what was changed."""

    updates: list[ClientUpdate]
    kept: list[int]  # indices (into the input) of the updates that remain, in order
    dropped: int  # (client, group) pairs left out for their update size
    capped: int  # clients whose weight was capped


def _group(key: str) -> int:
    parsed = parse_expert_key(key)
    return SHARED if parsed is None else parsed[0]


def bound_updates(
    global_arrays: Mapping[str, np.ndarray],
    updates: Sequence[ClientUpdate],
    *,
    bound: float,
    weight_cap: float,
) -> Bounded:
    """Leave out oversized (client, group) updates and cap each client's weight (module docstring).

    Parameters
    ----------
    global_arrays : Mapping[str, np.ndarray]
        The global model the updates started from.
    updates : sequence of ClientUpdate
        Validated replies.
    bound : float
        Largest relative update size of a pair, as a multiple of the round's median; 0 turns
        the check off.
    weight_cap : float
        Bound on a client's example count, as a multiple of the round's median; 0 turns the
        cap off.

    Returns
    -------
    Bounded
        The remaining updates (inputs untouched), which inputs they are, and the counts of
        dropped pairs and capped clients.

    """
    if not updates:
        return Bounded([], [], 0, 0)
    groups: dict[int, list[str]] = {}
    for key in global_arrays:
        groups.setdefault(_group(key), []).append(key)
    ref = {g: _norm(global_arrays[k] for k in ks) for g, ks in groups.items()}
    rel: dict[tuple[int, int], float] = {}  # (client, group) -> relative update size
    for i, u in enumerate(updates):
        for g, ks in groups.items():
            present = [k for k in ks if k in u.arrays]
            if present:
                delta = (u.arrays[k].astype(np.float64) - global_arrays[k] for k in present)
                rel[i, g] = _norm(delta) / (ref[g] + 1e-12)
    limit = bound * float(np.median(list(rel.values()))) if bound > 0 and rel else np.inf
    over = {pair for pair, r in rel.items() if not r <= limit}  # NaN-safe
    counts = np.array([u.num_examples for u in updates], dtype=np.float64)
    cap = weight_cap * float(np.median(counts)) if weight_cap > 0 else np.inf
    out, kept = [], []
    for i, u in enumerate(updates):
        if (i, SHARED) in over:
            continue
        drop = {g for (ci, g) in over if ci == i}
        arrays = {k: v for k, v in u.arrays.items() if _group(k) not in drop}
        tokens = np.asarray(u.tokens, dtype=np.float64).copy()
        tokens[list(drop)] = 0.0
        n = u.num_examples
        factor = min(1.0, cap / n) if n > 0 else 1.0
        layer_tokens = u.layer_tokens
        if layer_tokens is not None:
            layer_tokens = np.asarray(layer_tokens, dtype=np.float64).copy()
            layer_tokens[:, list(drop)] = 0.0
            layer_tokens = layer_tokens * factor
        out.append(
            dataclasses.replace(
                u,
                arrays=arrays,
                num_examples=max(1, int(round(n * factor))),
                tokens=tokens * factor,
                layer_tokens=layer_tokens,
            )
        )
        kept.append(i)
    return Bounded(out, kept, dropped=len(over), capped=int(np.sum(counts > cap)))


def _norm(arrays) -> float:
    """Euclidean norm of a group of arrays taken together."""
    return float(np.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays)))
