"""Sparse MoE aggregation: each expert over the clients that trained it, shared over all.

Weights
-------
* expert ``e`` (``experts.e.*``): average over the clients that returned it, weighted by
  the tokens each routed to it. A client holding ``e`` read-only (``under-capacity =
  "shared-only"``) sends no copy back.
* the gate's row ``e`` (``gate.weight[e]``, ``gate.bias[e]``): average over the clients
  that routed tokens to ``e`` *and held at least two experts*, weighted by those tokens.
  The row belongs with its expert: a client that does not hold ``e`` masks that logit and
  never changes the row. A client holding a single expert cannot change it either: the
  softmax over one unmasked logit is constantly 1 (and so is its balance loss), so the
  gate gets no gradient; its unchanged copy, weighted by all of its tokens, would only
  drag the row back towards last round's value.
  With a routing loss (``route-loss-weight > 0``) every client trains every row of the full
  gate (it pulls the rows of its experts up on its data and the others down), so the gate
  is then either averaged over all replies like any shared tensor (``gate_from_all``), or
  still row by row over the experts' holders, now including clients that hold a single
  expert (``single_holders``: the loss gives their row a gradient); the push-down of rows a
  client does not hold is then left out.
* every other tensor: average over all replies, weighted by ``num_examples``.

An expert (or gate row) with zero total weight keeps its value.

Memory: the result shares every tensor it does not change with ``global_arrays`` and computes
the others one at a time, in float64 for a float32 tensor and in float32 for a narrower one
(a bfloat16 global model), cast back to the tensor's dtype; no copy of the whole model is made.
With ``in_place`` each result is written into the global tensor itself, so the server holds one
model plus one tensor's temporaries.

Gate balancing (:func:`balance_gate_bias`, ``gate-balance-rate > 0``): after aggregation the
server moves the gate's bias, as Loss-Free Balancing (Wang et al. 2024, arXiv 2408.15664) moves
a router bias, by a fixed step towards equal load: up for experts the *unmasked* gate chose
less often than ``1/E`` of its top-k choices on the clients' data this round (the reported
``gate-hist``), down for those chosen more often; ``gate-balance-step = "proportional"`` scales
the step by the expert's load gap relative to the mean, so it fades as the load evens out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..tensors import Arrays, experts_in, gate_prefix, is_gate_key, layer_prefix, moe_layers, parse_expert_key


@dataclass
class ClientUpdate:
    """One validated training reply."""

    arrays: Arrays  # shared + held experts, global names
    num_examples: int
    tokens: np.ndarray  # [E], tokens routed to each expert (0 where not held)
    num_held: int | None = None  # experts the client held (unmasked); None: those with tokens
    layer_tokens: np.ndarray | None = None  # [L, E] tokens per MoE layer (None: not reported)
    layer_held: np.ndarray | None = None  # bool [L, E] experts held per MoE layer


AGGREGATIONS = ("mean", "median", "trimmed-mean")


def robust_combine(stacked: np.ndarray, method: str, trim_fraction: float) -> np.ndarray:
    """Combine ``stacked`` coordinate-wise over axis 0: median, or trimmed mean (unweighted).

    As Flower's FedMedian and FedTrimmedAvg compute them for dense models; ``trimmed-mean``
    drops ``int(trim_fraction * n)`` values at each end of every coordinate.
    """
    if method == "median":
        return np.median(stacked, axis=0)
    cut = int(trim_fraction * stacked.shape[0])
    ordered = np.sort(stacked, axis=0)
    return ordered[cut : stacked.shape[0] - cut].mean(axis=0)


def aggregate(
    global_arrays: Mapping[str, np.ndarray],
    updates: Sequence[ClientUpdate],
    *,
    gate_from_all: bool,
    single_holders: bool = False,
    method: str = "mean",
    trim_fraction: float | None = None,
    per_layer: bool = False,
    in_place: bool = False,
) -> Arrays:
    """Return the new global arrays from ``updates`` (``global_arrays`` is not modified unless ``in_place``).

    Parameters
    ----------
    global_arrays : Mapping[str, np.ndarray]
        Current global model (shared + all experts), float32 or bfloat16 tensors.
    updates : Sequence[ClientUpdate]
        Validated replies; each holds the shared tensors and the experts it trained.
    gate_from_all : bool
        Average the gate over every reply (clients trained it with a routing loss) instead
        of row by row over the clients that routed to the row's expert.
    single_holders : bool
        Row by row, count clients holding a single expert too (they train its row only with
        a routing loss).
    method : {"mean", "median", "trimmed-mean"}
        ``mean``: the weighted averages above. The robust choices combine each group
        coordinate-wise and unweighted over its trainers (each expert over the clients that
        returned it, everything else, the gate included, over all replies):
        :func:`robust_combine`.
    trim_fraction : float, optional
        Share of values cut at each end; required by ``trimmed-mean`` (run-config ``trim-fraction``).
    per_layer : bool
        Untied layers: expert ``e`` of MoE layer ``l`` is averaged over the clients that
        returned it, weighted by the tokens *that layer* routed to it, and the rows of layer
        ``l``'s router by layer ``l``'s tokens (clients holding at least two experts in it);
        needs every update's ``layer_tokens`` and ``layer_held``.
    in_place : bool
        Write each new tensor into ``global_arrays``' own (writeable) tensor, cast to its dtype,
        instead of a new array: the model is never held twice.

    Returns
    -------
    Arrays
        New global model with the same keys, shapes and dtypes; tensors no update changed are
        ``global_arrays``' own (treat both as read-only).

    """
    if method not in AGGREGATIONS or (method == "trimmed-mean" and trim_fraction is None):
        raise ValueError(f"aggregation {method!r}: one of {AGGREGATIONS} (trimmed-mean with a trim_fraction)")
    out = dict(global_arrays)  # tensors that do not change are shared, not copied
    if not updates:
        return out
    weights = (_LayerWeights if per_layer else _TiedWeights)(global_arrays, updates, single_holders)
    examples = np.array([u.num_examples for u in updates], dtype=np.float64)
    for key, old in global_arrays.items():
        parsed = parse_expert_key(key)
        if method != "mean":
            new = _robust(key, updates, weights.returned(key, parsed), method, trim_fraction)
        elif parsed is not None:
            new = _expert_mean(key, old, updates, *weights.expert(key, parsed))
        elif is_gate_key(key) and not gate_from_all:
            new = _gate_rows(key, old, updates, weights.gate(key))
        else:
            new = _example_mean(key, old, updates, examples)
        if new is None:
            continue
        if in_place and old.flags.writeable:
            np.copyto(old, new, casting="unsafe")  # the cast astype would make
        else:
            out[key] = new.astype(old.dtype)
    return out


def _robust(
    key: str, updates: Sequence[ClientUpdate], returned: np.ndarray, method: str, trim_fraction: float | None
) -> np.ndarray | None:
    """Median or trimmed mean of ``key`` over the updates that returned it (None if none did)."""
    trainers = [u for u, r in zip(updates, returned) if r]
    if not trainers:
        return None
    acc = accumulator_dtype(trainers[0].arrays[key])
    return robust_combine(np.stack([u.arrays[key].astype(acc) for u in trainers]), method, trim_fraction)


def accumulator_dtype(value: np.ndarray) -> np.dtype:
    """Return the dtype to average a tensor like ``value`` in: float64 from float32 up, else float32."""
    return np.dtype(np.float64) if value.dtype.itemsize >= 4 else np.dtype(np.float32)


def _expert_mean(
    key: str, old: np.ndarray, updates: Sequence[ClientUpdate], weight: np.ndarray, total: float
):
    """``sum_c weight[c] * update_c[key] / total`` over its trainers (None if ``total <= 0``)."""
    if total <= 0:
        return None
    dtype = accumulator_dtype(old)
    acc = np.zeros(old.shape, dtype=dtype)
    for u, w in zip(updates, weight):
        if w > 0:
            acc += dtype.type(w) * u.arrays[key].astype(dtype, copy=False)
    acc /= dtype.type(total)
    return acc


def _example_mean(key: str, old: np.ndarray, updates: Sequence[ClientUpdate], examples: np.ndarray):
    """Example-weighted mean of a shared tensor over every update (None without examples)."""
    if examples.sum() <= 0:
        return None
    dtype = accumulator_dtype(old)
    stacked = np.stack([u.arrays[key].astype(dtype, copy=False) for u in updates])
    w = examples.astype(dtype).reshape((-1,) + (1,) * old.ndim)
    return (w * stacked).sum(axis=0) / dtype.type(examples.sum())


def _gate_rows(key: str, old: np.ndarray, updates: Sequence[ClientUpdate], g: np.ndarray) -> np.ndarray:
    """Each router row ``e`` averaged over the updates by their weights ``g[:, e]`` (untrained rows kept)."""
    col_total = g.sum(axis=0)  # [E]
    dtype = accumulator_dtype(old)
    stacked = np.stack([u.arrays[key].astype(dtype, copy=False) for u in updates])  # [C, E, ...]
    w = g.astype(dtype).reshape(g.shape + (1,) * (old.ndim - 1))
    summed = (w * stacked).sum(axis=0)
    trained = col_total > 0
    denom = np.where(trained, col_total, 1.0).reshape((-1,) + (1,) * (old.ndim - 1))
    return np.where(trained.reshape(denom.shape), summed / denom, old)


class _TiedWeights:
    """Tied weights: expert ``e`` of every layer and router row ``e`` by the tokens routed to ``e``."""

    def __init__(
        self, global_arrays: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate], single_holders: bool
    ) -> None:
        tokens = np.stack([u.tokens for u in updates]).astype(np.float64)  # [C, E]
        held = np.array(
            [u.num_held if u.num_held is not None else int(np.count_nonzero(u.tokens)) for u in updates]
        )
        # one held expert: no gate gradient, unless a routing loss trains its row
        self.gate_tokens = np.where((held >= (1 if single_holders else 2))[:, None], tokens, 0.0)
        # Experts: only clients that returned expert e (read-only holders send none back).
        self.returned_experts = np.zeros_like(tokens, dtype=bool)
        for i, u in enumerate(updates):
            self.returned_experts[i, experts_in(u.arrays)] = True
        self.expert_tokens = np.where(self.returned_experts, tokens, 0.0)
        self.expert_total = self.expert_tokens.sum(axis=0)

    def returned(self, key: str, parsed: tuple[int, str] | None) -> np.ndarray:
        """``[C]`` whether each update returned ``key`` (every update for a shared tensor)."""
        if parsed is None:
            return np.ones(len(self.expert_tokens), dtype=bool)
        return self.returned_experts[:, parsed[0]]

    def expert(self, key: str, parsed: tuple[int, str]) -> tuple[np.ndarray, float]:
        """``([C] weights, their total)`` of expert tensor ``key``: the tokens its trainers routed to it."""
        return self.expert_tokens[:, parsed[0]], self.expert_total[parsed[0]]

    def gate(self, key: str) -> np.ndarray:
        """``[C, E]`` weight of each update for each router row: its tokens (clients holding two or more)."""
        return self.gate_tokens


class _LayerWeights:
    """Untied aggregation weights: each (layer, expert) and each layer's gate rows by its tokens."""

    def __init__(
        self, global_arrays: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate], single_holders: bool
    ) -> None:
        if any(u.layer_tokens is None or u.layer_held is None for u in updates):
            raise ValueError("per-layer aggregation needs every update's layer_tokens and layer_held")
        self.row = {p: i for i, p in enumerate(moe_layers(global_arrays))}
        self.tokens = np.stack([u.layer_tokens for u in updates]).astype(np.float64)  # [C, L, E]
        held = np.stack([u.layer_held for u in updates]).sum(axis=2)  # [C, L] experts held per layer
        self.gate_tokens = np.where((held >= (1 if single_holders else 2))[:, :, None], self.tokens, 0.0)
        self.updates = updates

    def returned(self, key: str, parsed: tuple[int, str] | None) -> np.ndarray:
        """``[C]`` whether each update returned ``key``."""
        return np.array([key in u.arrays for u in self.updates])

    def expert(self, key: str, parsed: tuple[int, str]) -> tuple[np.ndarray, float]:
        """``([C] weights, their total)`` of expert tensor ``key``: its layer's tokens, if it returned it."""
        col = self.tokens[:, self.row[layer_prefix(parsed[1])], parsed[0]]
        col = np.where(self.returned(key, parsed), col, 0.0)
        return col, col.sum()

    def gate(self, key: str) -> np.ndarray:
        """``[C, E]`` weight of each update for each row of the router ``key``: its layer's tokens."""
        layer = self.row.get(gate_prefix(key))
        if layer is None:  # a gate outside the MoE layers: all layers' tokens, as tied
            return self.gate_tokens.sum(axis=1)
        return self.gate_tokens[:, layer]


def balance_gate_bias(
    global_arrays: Mapping[str, np.ndarray], gate_hist: np.ndarray, rate: float, *, step: str = "sign"
) -> Arrays:
    """Return ``global_arrays`` with ``gate.bias`` stepped by ``rate`` towards equal gate load.

    Parameters
    ----------
    global_arrays : Mapping[str, np.ndarray]
        The aggregated model (not modified).
    gate_hist : np.ndarray
        ``[C, E]`` top-k choices of the unmasked gate per replying client.
    rate : float
        Largest step per round.
    step : str
        ``"sign"``: ``bias[e] += rate * sign(mean - load[e])`` (Loss-Free Balancing's fixed
        step); ``"proportional"``: ``bias[e] += rate * clip((mean - load[e]) / mean, -1, 1)``,
        a step that shrinks as the load nears balance (``mean``: the mean load per expert).

    Returns
    -------
    Arrays
        The model with the new bias (unchanged when no choices were reported).

    """
    load = np.asarray(gate_hist, dtype=np.float64).sum(axis=0)
    out = dict(global_arrays)
    if rate <= 0 or load.sum() <= 0 or "gate.bias" not in out:
        return out
    bias = out["gate.bias"]
    gap = load.mean() - load
    move = np.sign(gap) if step == "sign" else np.clip(gap / load.mean(), -1.0, 1.0)
    out["gate.bias"] = (bias + rate * move).astype(bias.dtype)
    return out
