"""Untied MoE layers on the wire: the experts a client holds per layer, in messages and state.

With run-config ``tie-layers = true`` (the default) a client holds the same experts in every
MoE layer and a message names them once (``expert-ids``). With ``tie-layers = false`` the plan
is a bool ``[L, E]`` matrix per client (row ``l``: the experts it holds in MoE layer ``l``,
layers in the order of :func:`fedmoe_app.tensors.moe_layers`); the message carries only those
(layer, expert) tensors (:func:`~fedmoe_app.tensors.select_layers`), ``expert-ids`` names their
union and ``layer-experts`` the flat ``[L, E]`` 0/1 mask. A client builds its sub-model from
:func:`held_from_config`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..tensors import Arrays, select, select_layers

LAYER_EXPERTS = "layer-experts"

Held = list[int] | list[list[int]]


def held_from_config(conf: Mapping[str, Any], num_experts: int) -> Held:
    """Return the experts a train or evaluate message asks a client to hold: one list, or per layer.

    Raises
    ------
    ValueError
        If ``layer-experts`` is not a whole number of rows of ``num_experts`` 0/1 values.

    """
    mask = conf.get(LAYER_EXPERTS)
    if mask is None:
        return [int(e) for e in conf["expert-ids"]]
    flat = np.asarray(list(mask), dtype=np.int64)
    if flat.size == 0 or flat.size % num_experts or not np.isin(flat, (0, 1)).all():
        raise ValueError(
            f"'{LAYER_EXPERTS}' must be rows of {num_experts} 0/1 values, got {flat.size} values"
        )
    return [np.flatnonzero(row).tolist() for row in flat.reshape(-1, num_experts)]


def held_matrix(held: Sequence[Sequence[int]], num_experts: int) -> np.ndarray:
    """Bool ``[L, E]`` of per-layer expert lists."""
    out = np.zeros((len(held), num_experts), dtype=bool)
    for layer, ids in enumerate(held):
        out[layer, list(ids)] = True
    return out


def payload(
    global_arrays: Mapping[str, np.ndarray],
    expert_ids: list[int],
    held: np.ndarray | None,
    layers: Sequence[str],
) -> tuple[Arrays, dict[str, Any]]:
    """Return what one client is sent: its arrays and the config entries naming its experts.

    ``held`` is its bool ``[L, E]`` plan (untied) or ``None`` (tied: ``expert_ids`` in every layer).
    """
    if held is None:
        return select(global_arrays, expert_ids), {"expert-ids": expert_ids}
    union = np.flatnonzero(held.any(axis=0)).tolist()
    conf = {"expert-ids": union, LAYER_EXPERTS: held.astype(np.int64).ravel().tolist()}
    return select_layers(global_arrays, held, layers), conf


def plan_lists(plan: np.ndarray) -> Held:
    """Expert ids of one client's plan row: a list (bool ``[E]``, tied) or one per layer (``[L, E]``)."""
    if plan.ndim == 1:
        return np.flatnonzero(plan).tolist()
    return [np.flatnonzero(row).tolist() for row in plan]


def stored_payload(
    global_arrays: Mapping[str, np.ndarray], experts: Held, num_experts: int, layers: Sequence[str]
) -> tuple[Arrays, dict[str, Any]]:
    """Build :func:`payload` for experts stored as :func:`plan_lists` gives them (one list or per layer)."""
    if experts and not isinstance(experts[0], (int, np.integer)):
        held = held_matrix(experts, num_experts)
        return payload(global_arrays, np.flatnonzero(held.any(axis=0)).tolist(), held, layers)
    return payload(global_arrays, list(experts), None, layers)
