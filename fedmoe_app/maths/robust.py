"""Bounded influence of one client: update norms clipped or dropped, weights capped, per group.

A reply can be well formed (keys, shapes, finite values: :mod:`.protocol`) and still wreck the
model: tensors of 1e30, an honest update scaled ×50, a claim of 10^12 examples, or all of its
tokens reported on one expert. Before aggregation (:mod:`.aggregation`) every validated update
is bounded (``update-bound`` and ``weight-cap`` on by default, ``token-cap`` opt-in):

* **Norms, per group.** A group is the shared part (every non-expert tensor) or one expert. A
  client's update of a group is ``Δ = w_client − w_global``, its relative size
  ``ρ = ‖Δ‖ / ‖w_global‖``. The yardstick is one vote per client, so that no client owns it:
  for the shared part the median over clients of their shared ``ρ``; for experts the median
  over clients of each client's *largest* expert ``ρ`` (its most trained expert: rarely routed
  experts, whose updates are tiny, do not pull it down). A client holding every expert, or
  returning the model unchanged, casts one vote like any other, so in a round of three it moves
  neither yardstick past an honest client's value. A pair above ``bound ×`` its yardstick is
  scaled back onto that limit when within :data:`DROP_FACTOR` times it (an honest outlier keeps
  its direction and most of its work), and left out beyond: its expert copy is dropped from the
  average (with its tokens), or, for the shared part, the whole reply is (a client whose shared
  update is that far off is not trusted with its experts either). Far-off updates are dropped,
  not clipped, because a clipped hostile update still pulls: a 1e30 tensor clipped to five
  typical update sizes still pushes every weight the same way (20 points of accuracy lost), and
  one expert scaled x50 and clipped onto 3x cost 10 points (``tests/maths/test_robust.py``).
* **Example weights.** A client's example count (its weight for the shared part) is capped at
  ``weight_cap × median`` of the round's counts, its token counts scaled by the same factor.
  The server's own bound on a client's count (the first it reported, kept across reconnects
  and resume: :mod:`~fedmoe_app.server.discovery`) is applied by reply validation before.
* **Token weights.** Reply validation already keeps a client's tokens on one expert under its
  layer's routes (every example choosing that expert): what an honest client with the same data
  can report. ``token-cap`` (opt-in) caps them further, at ``token_cap ×`` the client's fair
  share of the layer's reported tokens, ``layer total / experts held in the layer``: what a
  client with the same data whose routing spread evenly over its experts would report. It costs
  honest rounds accuracy (a client's heavily used experts lose weight; 5.5 points in one round
  of ``tests/maths/test_robust.py``), hence off by default. Only the weights are capped: the
  routing feedback for alignment (:attr:`Bounded.feedback`) keeps the reported counts (of the
  groups that entered).

With fewer than three clients in a round no statistic tells an honest client from a hostile
one; the bounds then limit, but do not stop, a client's pull (docs/THREAT_MODEL.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..tensors import parse_expert_key
from .aggregation import ClientUpdate

SHARED = -1  # group id of the shared part (experts are 0..E-1)
#: A pair up to this many times its limit is scaled onto the limit; a farther one is left out.
DROP_FACTOR = 2.0


@dataclass(frozen=True)
class Bounded:
    """Updates after bounding, and what was changed."""

    updates: list[ClientUpdate]  # what enters the average: clipped arrays, capped weights
    kept: list[int]  # indices (into the input) of the updates that remain, in order
    dropped: int = 0  # (client, group) pairs left out for their update size
    capped: int = 0  # clients whose example count was capped
    clipped: int = 0  # (client, group) pairs scaled back onto the limit
    token_capped: int = 0  # (client, layer, expert) token weights capped at the fair share
    feedback: list[ClientUpdate] | None = None  # routing feedback of the kept (None: ``updates``)

    @property
    def routing(self) -> list[ClientUpdate]:
        """The kept updates with the token counts alignment learns from (dropped groups at 0)."""
        return self.updates if self.feedback is None else self.feedback


def _group(key: str) -> int:
    parsed = parse_expert_key(key)
    return SHARED if parsed is None else parsed[0]


def bound_updates(
    global_arrays: Mapping[str, np.ndarray],
    updates: Sequence[ClientUpdate],
    *,
    bound: float,
    weight_cap: float,
    token_cap: float = 0.0,
) -> Bounded:
    """Clip or leave out oversized (client, group) updates and cap weights (module docstring).

    Parameters
    ----------
    global_arrays : Mapping[str, np.ndarray]
        The global model the updates started from.
    updates : sequence of ClientUpdate
        Validated replies.
    bound : float
        Largest relative update size of a pair, as a multiple of its group kind's yardstick
        (one vote per client); 0 turns the check off.
    weight_cap : float
        Bound on a client's example count, as a multiple of the round's median; 0 turns the
        cap off.
    token_cap : float
        Bound on a client's token weight on an expert in a layer, as a multiple of its fair
        share there; 0 turns the cap off.

    Returns
    -------
    Bounded
        The remaining updates (inputs untouched), which inputs they are, and the counts of
        dropped and clipped pairs, capped clients and capped token weights.

    """
    if not updates:
        return Bounded([], [])
    groups: dict[int, list[str]] = {}
    for key in global_arrays:
        groups.setdefault(_group(key), []).append(key)
    rel = _relative_sizes(global_arrays, updates, groups) if bound > 0 else {}
    shared_limit, expert_limit = _limits(rel, bound)
    limit = {g: shared_limit if g == SHARED else expert_limit for g in groups}
    scale = {  # pair -> factor onto its limit, for the pairs above it (NaN-safe)
        (i, g): limit[g] / r for (i, g), r in rel.items() if not r <= limit[g]
    }
    over = {pair for pair, s in scale.items() if not s * DROP_FACTOR >= 1.0}  # NaN-safe
    counts = np.array([u.num_examples for u in updates], dtype=np.float64)
    cap = weight_cap * float(np.median(counts)) if weight_cap > 0 else np.inf
    out, feedback, kept, token_capped = [], [], [], 0
    for i, u in enumerate(updates):
        if (i, SHARED) in over:
            continue
        drop = {g for (ci, g) in over if ci == i}
        arrays = {k: v for k, v in u.arrays.items() if _group(k) not in drop}
        for g in {g for (ci, g) in scale if ci == i} - drop:
            for k in groups[g]:
                if k in arrays:
                    step = (arrays[k].astype(np.float64) - global_arrays[k]) * scale[i, g]
                    arrays[k] = (global_arrays[k].astype(np.float64) + step).astype(u.arrays[k].dtype)
        reported = _without(u, drop)
        n = u.num_examples
        factor = min(1.0, cap / n) if n > 0 else 1.0
        fair, capped_here = _fair_share(reported, token_cap) if token_cap > 0 else (reported, 0)
        token_capped += capped_here
        out.append(
            dataclasses.replace(
                fair,
                arrays=arrays,
                num_examples=max(1, int(round(n * factor))),
                tokens=fair.tokens * factor,
                layer_tokens=None if fair.layer_tokens is None else fair.layer_tokens * factor,
            )
        )
        feedback.append(reported)
        kept.append(i)
    return Bounded(
        out,
        kept,
        dropped=len(over),
        capped=int(np.sum(counts > cap)),
        clipped=len(scale) - len(over),
        token_capped=token_capped,
        feedback=feedback,
    )


def _relative_sizes(
    global_arrays: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate], groups: dict[int, list[str]]
) -> dict[tuple[int, int], float]:
    """Return ``ρ`` of every (client, group) pair the updates hold."""
    ref = {g: _norm(global_arrays[k] for k in ks) for g, ks in groups.items()}
    rel: dict[tuple[int, int], float] = {}
    for i, u in enumerate(updates):
        for g, ks in groups.items():
            present = [k for k in ks if k in u.arrays]
            if present:
                delta = (u.arrays[k].astype(np.float64) - global_arrays[k] for k in present)
                rel[i, g] = _norm(delta) / (ref[g] + 1e-12)
    return rel


def _limits(rel: Mapping[tuple[int, int], float], bound: float) -> tuple[float, float]:
    """Return the largest allowed ``ρ`` for the shared part and for experts.

    ``bound ×`` the median over clients of one vote each: its shared ``ρ``, its largest expert ``ρ``.
    """
    if bound <= 0 or not rel:
        return np.inf, np.inf
    shared: dict[int, float] = {}
    experts: dict[int, float] = {}
    for (i, g), r in rel.items():
        if g == SHARED:
            shared[i] = r
        else:
            experts[i] = max(experts.get(i, 0.0), r) if np.isfinite(r) else np.inf
    return (
        bound * float(np.median(list(shared.values()))) if shared else np.inf,
        bound * float(np.median(list(experts.values()))) if experts else np.inf,
    )


def _without(u: ClientUpdate, drop: set[int]) -> ClientUpdate:
    """Return ``u``'s feedback with the dropped experts' tokens at zero (arrays untouched)."""
    if not drop:
        return u
    tokens = np.asarray(u.tokens, dtype=np.float64).copy()
    tokens[list(drop)] = 0.0
    layer_tokens = u.layer_tokens
    if layer_tokens is not None:
        layer_tokens = np.asarray(layer_tokens, dtype=np.float64).copy()
        layer_tokens[:, list(drop)] = 0.0
    return dataclasses.replace(u, tokens=tokens, layer_tokens=layer_tokens)


def _fair_share(u: ClientUpdate, times: float) -> tuple[ClientUpdate, int]:
    """Return ``u`` with each token weight capped at ``times`` its layer's total over the experts held there.

    Also returns how many (layer, expert) weights were capped.
    """
    if u.layer_tokens is not None:
        t = np.asarray(u.layer_tokens, dtype=np.float64)
        held = u.layer_held if u.layer_held is not None else t > 0
        per = np.maximum(np.asarray(held, dtype=bool).sum(axis=1, keepdims=True), 1)
        fair = times * t.sum(axis=1, keepdims=True) / per
        capped = np.minimum(t, fair)
        return dataclasses.replace(u, tokens=capped.sum(axis=0), layer_tokens=capped), int(
            np.sum(t > fair * (1 + 1e-9))
        )
    t = np.asarray(u.tokens, dtype=np.float64)
    held = u.num_held if u.num_held is not None else int(np.sum(t > 0))
    fair = times * t.sum() / max(held, 1)
    return dataclasses.replace(u, tokens=np.minimum(t, fair)), int(np.sum(t > fair * (1 + 1e-9)))


def _norm(arrays) -> float:
    """Euclidean norm of a group of arrays taken together."""
    return float(np.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays)))
